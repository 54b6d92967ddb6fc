"""Model registry: parameter counts against published numbers, forward/backward smoke tests,
channels_last equivalence, argument checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flatminima.models import count_parameters, create_model, list_models


@pytest.fixture(autouse=True)
def one_thread():
    """These small-batch passes gain nothing from intra-op threads, and on a CPU shared with
    other jobs two threads can stall each other badly; restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


EXPECTED_NAMES = {"mlp", "cnn1d", "cnn", "resnet18", "vgg16", "wrn28_10", "pyramidnet164", "vit",
                  "vit_b16", "vit_small", "resnet50", "resnet101"}


def meta_count(name: str, num_classes: int, input_shape: tuple[int, ...], **kw) -> int:
    """Parameter count without allocating memory (modules built on the meta device)."""
    with torch.device("meta"):
        return count_parameters(create_model(name, num_classes, input_shape, **kw))


def test_registry_lists_every_required_model():
    assert EXPECTED_NAMES <= set(list_models())


# ---- parameter counts -----------------------------------------------------------------------
# Exact numbers are those printed by the reference implementations named beside them; "M" numbers
# are the papers' tables, rounded to 0.1M, so they are checked to within half a unit (or, where
# the paper's own rounding is looser than that, the stated tolerance).


def test_resnet_imagenet_counts_match_torchvision():
    # torchvision's model documentation ("Params" column): resnet18 11,689,512,
    # resnet50 25,557,032, resnet101 44,549,160 (He et al. 2016 architectures, 1000 classes).
    assert meta_count("resnet18", 1000, (3, 224, 224), stem="imagenet") == 11_689_512
    assert meta_count("resnet50", 1000, (3, 224, 224)) == 25_557_032
    assert meta_count("resnet101", 1000, (3, 224, 224)) == 44_549_160


def test_resnet18_cifar_count_follows_from_the_imagenet_one():
    # The CIFAR variant (as in kuangliu/pytorch-cifar, used by the SAM/NRS line of work) swaps the
    # 7x7x3x64 stem for a 3x3x3x64 one and the 512x1000 head for 512x10: 11,173,962.
    derived = 11_689_512 - 7 * 7 * 3 * 64 + 3 * 3 * 3 * 64 - (512 * 1000 + 1000) + (512 * 10 + 10)
    assert derived == 11_173_962
    assert meta_count("resnet18", 10, (3, 32, 32)) == derived


def test_vgg16_counts():
    # Simonyan & Zisserman 2015, Table 2: configuration D has 138M parameters; torchvision's
    # documentation: vgg16 138,357,544 and vgg16_bn 138,365,992.
    assert meta_count("vgg16", 1000, (3, 224, 224), batch_norm=False) == 138_357_544
    assert meta_count("vgg16", 1000, (3, 224, 224)) == 138_365_992
    # CIFAR head (512 -> 512 -> 512 -> 10 with dropout): the same convolutions and BN, new head.
    imagenet_head = (25088 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 1000 + 1000)
    cifar_head = 2 * (512 * 512 + 512) + (512 * 10 + 10)
    assert meta_count("vgg16", 10, (3, 32, 32)) == 138_365_992 - imagenet_head + cifar_head


@pytest.mark.parametrize("depth,k,published_m", [
    # Zagoruyko & Komodakis 2016, Tables 1, 4 and 5 (CIFAR-10).
    (16, 4, 2.7), (16, 8, 11.0), (16, 10, 17.1), (28, 10, 36.5), (40, 1, 0.6), (40, 2, 2.2),
    (40, 4, 8.9), (40, 8, 35.7),
])
def test_wide_resnet_counts_match_the_paper(depth, k, published_m):
    n = meta_count("wrn28_10", 10, (3, 32, 32), depth=depth, widen_factor=k)
    assert abs(n / 1e6 - published_m) <= 0.05 + 1e-9, n


def test_wrn28_10_exact_count():
    # The reference PyTorch port of the official code prints 36,479,194 for CIFAR-10; derived
    # here from the architecture: stem, 12 blocks, three 1x1 shortcuts, final BN, head.
    w = [16, 160, 320, 640]
    conv = 3 * 9 * 16
    c = 16
    for s in range(3):
        for j in range(4):
            conv += 9 * c * w[s + 1] + 9 * w[s + 1] ** 2 + (c * w[s + 1] if j == 0 else 0)
            conv += 2 * c + 2 * w[s + 1]   # the two BatchNorms of the block
            c = w[s + 1]
    total = conv + 2 * 640 + 640 * 10 + 10
    assert total == 36_479_194
    assert meta_count("wrn28_10", 10, (3, 32, 32)) == total


@pytest.mark.parametrize("depth,alpha,published_m", [
    # Han et al. 2017, Table 4 (bottleneck PyramidNets on CIFAR). The official code gives counts
    # about 0.8% above the table (e.g. 26.21M for depth 272), so 1% is allowed here.
    (164, 270, 27.0), (200, 240, 26.6), (236, 220, 26.8), (272, 200, 26.0),
])
def test_pyramidnet_counts_match_the_paper(depth, alpha, published_m):
    n = meta_count("pyramidnet164", 10, (3, 32, 32), depth=depth, alpha=alpha)
    assert abs(n / 1e6 / published_m - 1) < 0.01, n


def test_pyramidnet164_default_is_alpha_270_bottleneck():
    assert meta_count("pyramidnet164", 10, (3, 32, 32)) == meta_count(
        "pyramidnet164", 10, (3, 32, 32), depth=164, alpha=270, bottleneck=True)
    # Doubling alpha roughly quadruples the width-squared term: the option is really used.
    assert meta_count("pyramidnet164", 10, (3, 32, 32), alpha=135) < 0.35 * meta_count(
        "pyramidnet164", 10, (3, 32, 32))


def vit_count(patch: int, tokens: int, d: int, depth: int, m: int, classes: int) -> int:
    """Closed form: patch embedding, class token, positions, ``depth`` blocks of (2 LayerNorms +
    QKV + projection + MLP), final LayerNorm, head."""
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)
    return (3 * patch * patch * d + d) + d + (tokens + 1) * d + depth * block + 2 * d \
        + (d * classes + classes)


def test_vit_b16_count():
    # Dosovitskiy et al. 2021, Table 1: ViT-Base 86M; timm's vit_base_patch16_224 (1000 classes,
    # 224x224): 86,567,656.
    total = vit_count(16, 196, 768, 12, 3072, 1000)
    assert total == 86_567_656
    assert meta_count("vit_b16", 1000, (3, 224, 224)) == total



def test_create_model_without_input_shape_keeps_the_builders_default():
    # vit_b16 is made for 224x224 inputs (196 patches, 86,567,656 weights with 1000 classes);
    # the registry used to impose (3, 32, 32) instead: 4 patches, 86,420,200 weights.
    with torch.device("meta"):
        assert count_parameters(create_model("vit_b16", num_classes=1000)) == 86_567_656
        assert count_parameters(create_model("resnet50", num_classes=1000)) == 25_557_032
        # mlp's default is MNIST-1D's (40,) input: 40*100 + 100 + 100*100 + 100 + 100*10 + 10.
        assert count_parameters(create_model("mlp", widths=(100, 100))) == 15_210


EXPLICIT_SHAPES = {
    # name: an input shape unlike the builder's default (a channel count or size it must use).
    "mlp": (3, 8, 8), "cnn1d": (2, 24), "cnn": (1, 28, 28), "resnet18": (1, 28, 28),
    "vgg16": (3, 64, 64), "wrn28_10": (1, 28, 28), "pyramidnet164": (1, 28, 28),
    "vit": (3, 16, 16), "vit_small": (1, 64, 64), "vit_b16": (3, 32, 32),
    "resnet50": (1, 32, 32), "resnet101": (1, 32, 32),
}


def test_an_explicit_input_shape_still_applies_to_every_model():
    assert set(EXPLICIT_SHAPES) == set(list_models())
    for name, shape in EXPLICIT_SHAPES.items():
        with torch.device("meta"):      # shapes are checked, nothing is computed
            out = create_model(name, 10, shape)(torch.empty(2, *shape))
        assert out.shape == (2, 10), name
    # vit_b16 at 32x32: 4 patches of 16x16, so 192 fewer position embeddings than at 224.
    assert meta_count("vit_b16", 1000, (3, 32, 32)) == 86_420_200
    assert meta_count("vit_b16", 1000, (3, 32, 32)) == 86_567_656 - 192 * 768


def test_builders_must_give_input_shape_a_default():
    from flatminima.models.registry import register_model

    with pytest.raises(TypeError, match="input_shape"):
        register_model("no_default_shape")(lambda num_classes, input_shape: torch.nn.Identity())
    assert "no_default_shape" not in list_models()

def test_vit_small_count_closed_form():
    # The 32x32 preset (no published counterpart): 4x4 patches -> 64 tokens, dim 256, depth 6,
    # MLP 512.
    assert meta_count("vit_small", 10, (3, 32, 32)) == vit_count(4, 64, 256, 6, 512, 10)
    assert meta_count("vit", 100, (3, 32, 32), patch_size=8, dim=64, depth=3, heads=2,
                      mlp_dim=96) == vit_count(8, 16, 64, 3, 96, 100)


def test_small_model_counts_closed_form():
    # MLP 40-256-256-10 (the design notes' MNIST-1D probe): (40+1)256 + (256+1)256 + (256+1)10.
    assert meta_count("mlp", 10, (40,)) == 41 * 256 + 257 * 256 + 257 * 10
    assert meta_count("mlp", 3, (2,), widths=(8,)) == 3 * 8 + 9 * 3
    # cnn1d: MNIST-1D's reference ConvBase (25 channels; kernels 5, 3, 3; stride 2; 40 -> 5
    # positions; linear 125 -> 10): 150 + 1900 + 1900 + 1260.
    assert meta_count("cnn1d", 10, (40,)) == 5210
    # cnn: conv 3->32 and 32->64 (no bias, BN scale and shift), head 64 -> 128 -> 10.
    assert meta_count("cnn", 10, (3, 32, 32)) == (27 * 32 + 64) + (9 * 32 * 64 + 128) \
        + (64 * 128 + 128) + (128 * 10 + 10)


# ---- forward / backward ---------------------------------------------------------------------

SMOKE = {
    # name: (input_shape, kwargs) at a small size; global pooling makes most accept tiny inputs.
    "mlp": ((40,), {}),
    "cnn1d": ((40,), {}),
    "cnn": ((3, 16, 16), {}),
    "resnet18": ((3, 16, 16), {}),
    "vgg16": ((3, 32, 32), {}),
    "wrn28_10": ((3, 8, 8), {}),
    "pyramidnet164": ((3, 8, 8), {}),
    "vit": ((3, 16, 16), {"dim": 32, "depth": 2, "heads": 4}),
    "vit_small": ((3, 32, 32), {}),
    "vit_b16": ((3, 32, 32), {}),
    "resnet50": ((3, 32, 32), {}),
    "resnet101": ((3, 32, 32), {}),
}


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_forward_backward_shapes(name):
    torch.manual_seed(0)
    shape, kw = SMOKE[name]
    model = create_model(name, 7, shape, **kw)
    x = torch.randn(2, *shape)
    out = model(x)
    assert out.shape == (2, 7)
    F.cross_entropy(out, torch.tensor([1, 5])).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # Some gradient is nonzero (a ViT's zero-initialized head blocks the earlier ones at init).
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", ["cnn", "resnet18", "wrn28_10", "pyramidnet164", "vgg16"])
def test_channels_last_gives_the_same_outputs(name):
    torch.manual_seed(0)
    shape = (3, 32, 32) if name == "vgg16" else (3, 8, 8)
    model = create_model(name, 5, shape, **({"depth": 10, "widen_factor": 2}
                                              if name == "wrn28_10" else
                                              {"depth": 20, "alpha": 12} if name == "pyramidnet164"
                                              else {})).eval()
    x = torch.randn(3, *shape)
    ref = model(x)
    model = model.to(memory_format=torch.channels_last)
    cl = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-5)


def test_vit_attention_matches_explicit_softmax():
    # The fused attention against softmax(QK^T / sqrt(d_h)) V written out.
    torch.manual_seed(0)
    model = create_model("vit", 4, (3, 8, 8), patch_size=4, dim=16, depth=1, heads=2).eval()
    attn = model.blocks[0].attn
    x = torch.randn(2, 5, 16)
    q, k, v = attn.qkv(x).view(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-6)


def test_vit_patch_embedding_sees_every_pixel_once():
    # A patch's embedding depends only on its own pixels: perturb one pixel, only its token moves.
    torch.manual_seed(0)
    model = create_model("vit", 4, (3, 8, 8), patch_size=4, dim=16, depth=1, heads=2)
    x = torch.randn(1, 3, 8, 8)
    e0 = model.patch_embed(x).flatten(2)
    x2 = x.clone()
    x2[0, 1, 5, 2] += 1.0        # row 5, column 2: patch (1, 0), token index 2
    diff = (model.patch_embed(x2).flatten(2) - e0).abs().sum(1)[0]
    assert diff.nonzero().flatten().tolist() == [2]


def test_vgg_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    model = create_model("vgg16", 10, (3, 32, 32))
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    for m in model.modules():   # freeze BN statistics so only dropout can differ
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    assert not torch.allclose(model(x), model(x))
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.modules()) == 2


def test_wrn_uses_projection_only_where_width_or_stride_changes():
    model = create_model("wrn28_10", 10, depth=16, widen_factor=2)
    projecting = [b.project for b in model.blocks]
    assert projecting == [True, False, True, False, True, False]


@pytest.mark.parametrize("bad", [
    lambda: create_model("nope"),
    lambda: create_model("mlp", 0, (4,)),
    lambda: create_model("mlp", 3, (4,), widths=(0,)),
    lambda: create_model("wrn28_10", 10, depth=27),
    lambda: create_model("pyramidnet164", 10, depth=100),
    lambda: create_model("vit", 10, (3, 30, 30), patch_size=4),
    lambda: create_model("vit", 10, (3, 32, 32), dim=30, heads=4),
    lambda: create_model("resnet18", 10, (40,)),
    lambda: create_model("vgg16", 10, (3, 48, 48), head="cifar"),
    lambda: create_model("resnet18", 10, stem="tiny"),
])
def test_bad_arguments_raise_value_error(bad):
    with pytest.raises(ValueError):
        bad()


def test_unknown_model_error_names_it():
    with pytest.raises(ValueError, match="'resnet7'"):
        create_model("resnet7")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cnn", "resnet18", "vit_small"])
def test_torch_compile_matches_eager(name):
    torch.manual_seed(0)
    model = create_model(name, 10, (3, 32, 32)).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,shape,kw", [
    ("mlp", (40,), {}), ("cnn1d", (40,), {}), ("cnn", (3, 16, 16), {}),
    ("resnet18", (3, 8, 8), {}), ("vit", (3, 16, 16), {"dim": 32, "depth": 2, "heads": 4}),
])
def test_vmap_over_weight_sets_matches_separate_calls(name, shape, kw):
    # The methods evaluate several perturbed weight sets in one pass with torch.func; the models
    # must be pure functions of (params, buffers, input) for that.
    import warnings

    from torch.func import functional_call, vmap

    torch.manual_seed(0)
    model = create_model(name, 5, shape, **kw).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    stacked = {k: torch.stack([v, v + 0.01 * torch.randn_like(v)]) for k, v in params.items()}
    x = torch.randn(3, *shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # fused attention has no batching rule
        out = vmap(lambda p: functional_call(model, (p, buffers), (x,)))(stacked)
    for i in range(2):
        ref = functional_call(model, ({k: v[i] for k, v in stacked.items()}, buffers), (x,))
        torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=1e-5)
