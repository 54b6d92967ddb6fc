"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

Non-overlapping ``p x p`` patches are linearly embedded (a stride-``p`` convolution), a learned
class token is prepended and learned position embeddings added; ``depth`` pre-norm encoder blocks
(``x + MHSA(LN(x))``, ``x + MLP(LN(x))`` with a GELU MLP of ``mlp_ratio * dim``) follow; the final
LayerNorm of the class token feeds a linear head. Attention uses
``torch.nn.functional.scaled_dot_product_attention`` (fused kernels, ``torch.compile`` friendly).

Presets: ``vit_b16`` (ViT-Base/16: dim 768, depth 12, 12 heads, MLP 3072; 86M parameters at
224x224 with 1000 classes), ``vit_small`` (for 32x32 inputs: 4x4 patches, dim 256, depth 6,
8 heads, MLP 512), and ``vit`` with every size given explicitly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatminima.models.registry import image_shape, register_model


class Attention(nn.Module):
    """Multi-head self-attention with a fused QKV projection."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(o.transpose(1, 2).reshape(n, t, d))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT with a class token and learned position embeddings."""

    def __init__(self, image_size: tuple[int, int], patch_size: int, num_classes: int,
                 dim: int, depth: int, heads: int, mlp_dim: int, in_channels: int = 3,
                 dropout: float = 0.0) -> None:
        super().__init__()
        h, w = image_size
        if patch_size < 1 or h % patch_size or w % patch_size:
            raise ValueError(f"patch_size {patch_size!r} must divide the {h}x{w} image")
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth!r}")
        num_patches = (h // patch_size) * (w // patch_size)
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, mlp_dim, dropout)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # The paper zero-initializes the classification head.
        nn.init.zeros_(self.head.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(self.dropout(x)))
        return self.head(x[:, 0])


@register_model("vit")
def vit(num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32), patch_size: int = 4,
        dim: int = 256, depth: int = 6, heads: int = 8, mlp_dim: int | None = None,
        dropout: float = 0.0) -> VisionTransformer:
    """ViT with explicit sizes; ``mlp_dim`` defaults to ``2 * dim``."""
    c, h, w = image_shape(input_shape, "vit")
    return VisionTransformer((h, w), patch_size, num_classes, dim, depth, heads,
                             mlp_dim or 2 * dim, c, dropout)


@register_model("vit_small")
def vit_small(num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32),
              **kw: object) -> VisionTransformer:
    """Small ViT for 32x32 images: 4x4 patches, dim 256, depth 6, 8 heads, MLP 512."""
    return vit(num_classes, input_shape, **kw)  # type: ignore[arg-type]


@register_model("vit_b16")
def vit_b16(num_classes: int = 10, input_shape: tuple[int, ...] = (3, 224, 224),
            patch_size: int = 16, dropout: float = 0.0) -> VisionTransformer:
    """ViT-B/16: 16x16 patches, dim 768, depth 12, 12 heads, MLP 3072."""
    c, h, w = image_shape(input_shape, "vit_b16")
    return VisionTransformer((h, w), patch_size, num_classes, 768, 12, 12, 3072, c, dropout)


__all__ = ["Attention", "EncoderBlock", "VisionTransformer", "vit", "vit_small", "vit_b16"]
