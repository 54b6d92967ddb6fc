"""Data sets by name, plus the two CPU-study options every set takes: a per-class subset and
injected label noise.

``get_dataset(name, root, ...)`` returns an :class:`ArrayData`. ``root`` is the data directory
(default ``$FLATMINIMA_DATA`` or ``./data``); sets that need no file ignore it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flatminima.data.arraydata import ArrayData

Loader = Callable[..., ArrayData]
_DATASETS: dict[str, tuple[Loader, bool, str]] = {}


def register_dataset(name: str, *, needs_root: bool, doc: str) -> Callable[[Loader], Loader]:
    """Decorator: register ``fn(root, *, download, **kw) -> ArrayData`` under ``name``."""

    def deco(fn: Loader) -> Loader:
        if name in _DATASETS:
            raise ValueError(f"data set {name!r} is already registered")
        _DATASETS[name] = (fn, needs_root, doc)
        return fn

    return deco


def list_datasets() -> list[str]:
    """Names accepted by :func:`get_dataset`, sorted."""
    return sorted(_DATASETS)


def describe_datasets() -> dict[str, str]:
    """One line per data set: what it is and where its files come from."""
    return {k: _DATASETS[k][2] for k in list_datasets()}


_SEEDED = ("spirals", "synthetic_images")


def default_root() -> Path:
    """``$FLATMINIMA_DATA`` if set, else ``./data``."""
    return Path(os.environ.get("FLATMINIMA_DATA", "data"))


def get_dataset(name: str, root: str | os.PathLike | None = None, *, download: bool = True,
                subset_per_class: int | None = None, label_noise: float = 0.0, seed: int = 0,
                classes: Sequence[int] | None = None, **kw: Any) -> ArrayData:
    """Load a data set by name.

    Args:
        name: one of :func:`list_datasets`.
        root: data directory (``npz``: the file itself, or a directory holding ``data.npz``).
        download: fetch absent files from the official source (checksum-verified); when False or
            offline, a missing file raises :class:`DataError` naming it and where to put it.
        subset_per_class: keep ``N`` training examples of each class: the first ``N`` of each
            class in a permutation drawn from ``seed`` (original order kept); test untouched.
        label_noise: fraction ``p`` of training labels replaced by a different class drawn
            uniformly (exactly ``round(p * N)`` examples, chosen from ``seed``); the clean labels
            stay in ``y_train_clean``.
        seed: seed of the subset and noise draws (and of generated sets like ``spirals``).
        classes: keep only these classes (train and test), relabelled ``0..len(classes)-1`` in
            the order given (a pretraining / fine-tuning split of one data set); applied first.
        **kw: passed to the loader (e.g. ``archive=``, ``image_size=`` for ``imagefolder``;
            ``noise=`` for ``spirals``; ``extra=`` for ``svhn``).
    """
    if name not in _DATASETS:
        raise ValueError(f"unknown data set {name!r}; available: {', '.join(list_datasets())}")
    if subset_per_class is not None and (isinstance(subset_per_class, bool)
                                         or not isinstance(subset_per_class, int)
                                         or subset_per_class < 1):
        raise ValueError(f"subset_per_class must be a positive integer, got {subset_per_class!r}")
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise!r}")
    fn, needs_root, _ = _DATASETS[name]
    try:
        if needs_root:
            data = fn(Path(root) if root is not None else default_root(), download=download,
                      **kw)
        else:
            # Generated sets take the seed; the others are fixed files or fixed generators.
            data = fn(seed=seed, **kw) if name in _SEEDED else fn(**kw)
    except TypeError as e:
        # An option this data set does not take: report it as a bad argument, by name.
        if "unexpected keyword argument" not in str(e):
            raise
        bad = str(e).split("unexpected keyword argument")[-1].strip()
        raise ValueError(f"data set {name!r} takes no option {bad}") from None
    if classes is not None:
        data = select_classes(data, classes)
    if subset_per_class is not None:
        data = subset(data, subset_per_class, seed=seed)
    if label_noise > 0:
        data = add_label_noise(data, label_noise, seed=seed)
    return data


def select_classes(data: ArrayData, classes: Sequence[int]) -> ArrayData:
    """Only the examples of ``classes``, relabelled ``0..len(classes)-1`` in the given order."""
    wanted = list(classes)
    if (not wanted or len(set(wanted)) != len(wanted)
            or any(isinstance(c, bool) or not isinstance(c, int) for c in wanted)
            or any(not 0 <= c < data.num_classes for c in wanted)):
        raise ValueError(f"classes must be distinct integers in [0, {data.num_classes}), got "
                         f"{list(classes)!r}")
    relabel = torch.full((data.num_classes,), -1, dtype=torch.long)
    relabel[torch.tensor(wanted)] = torch.arange(len(wanted))

    def keep(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        mask = relabel[y] >= 0
        return x[mask], relabel[y[mask]]

    x_tr, y_tr = keep(data.x_train, data.y_train)
    x_te, y_te = keep(data.x_test, data.y_test)
    clean = None
    if data.y_train_clean is not None:
        clean = relabel[data.y_train_clean[relabel[data.y_train] >= 0]]
    return _replace(data, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
                    num_classes=len(wanted), y_train_clean=clean,
                    label=f"{data.label or data.name} (classes {','.join(map(str, wanted))})")


def subset(data: ArrayData, per_class: int, *, seed: int = 0) -> ArrayData:
    """Keep the first ``per_class`` training examples of each class in a seeded permutation."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(data.y_train), generator=gen)
    y = data.y_train[perm]
    # Rank of each example within its class along the permutation: a stable sort by class
    # keeps permutation order inside each class, so position minus class start is the rank.
    order = torch.sort(y, stable=True).indices
    counts = torch.bincount(y, minlength=data.num_classes)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order)) - starts[y[order]]
    keep = perm[rank < per_class].sort().values
    return _replace(data, x_train=data.x_train[keep], y_train=data.y_train[keep],
                    y_train_clean=None if data.y_train_clean is None
                    else data.y_train_clean[keep])


def add_label_noise(data: ArrayData, fraction: float, *, seed: int = 0) -> ArrayData:
    """Replace ``round(fraction * N)`` training labels by a uniformly drawn *different* class."""
    if data.num_classes < 2:
        raise ValueError("label noise needs at least two classes")
    # An offset seed keeps the noise draw independent of the subset draw made with `seed`.
    gen = torch.Generator().manual_seed(seed + 1_000_003)
    n = len(data.y_train)
    flip = torch.randperm(n, generator=gen)[: round(fraction * n)]
    y = data.y_train.clone()
    shift = torch.randint(1, data.num_classes, (len(flip),), generator=gen)
    y[flip] = (y[flip] + shift) % data.num_classes
    clean = data.y_train if data.y_train_clean is None else data.y_train_clean
    return _replace(data, y_train=y, y_train_clean=clean)


def _replace(data: ArrayData, **changes: Any) -> ArrayData:
    fields = {k: getattr(data, k) for k in ("x_train", "y_train", "x_test", "y_test",
                                             "num_classes", "input_shape", "mean", "std", "name",
                                             "label", "y_train_clean")}
    fields.update(changes)
    return ArrayData(**fields)


# ---- the built-in sets -------------------------------------------------------------------------


@register_dataset("mnist", needs_root=True, doc="MNIST, IDX files (gzip or raw)")
def _mnist(root: Path, *, download: bool = True) -> ArrayData:
    from flatminima.data.idx import load_mnist

    return load_mnist(root, download=download)


@register_dataset("cifar10", needs_root=True, doc="CIFAR-10, official binary archive")
def _cifar10(root: Path, *, download: bool = True, **kw: Any) -> ArrayData:
    from flatminima.data.cifar import load_cifar

    return load_cifar("cifar10", root, download=download, **kw)


@register_dataset("cifar100", needs_root=True, doc="CIFAR-100, official binary archive")
def _cifar100(root: Path, *, download: bool = True, **kw: Any) -> ArrayData:
    from flatminima.data.cifar import load_cifar

    return load_cifar("cifar100", root, download=download, **kw)


@register_dataset("svhn", needs_root=True, doc="SVHN cropped digits, official .mat files")
def _svhn(root: Path, *, download: bool = True, **kw: Any) -> ArrayData:
    from flatminima.data.svhn import load_svhn

    return load_svhn(root, download=download, **kw)


@register_dataset("imagefolder", needs_root=True,
                  doc="train/<class>/* and test/<class>/* image tree (or one archive of it)")
def _imagefolder(root: Path, *, download: bool = True, **kw: Any) -> ArrayData:
    from flatminima.data.imagefolder import load_imagefolder

    return load_imagefolder(root, **kw)


@register_dataset("cifar10-jpeg", needs_root=True,
                  doc="CIFAR-10 (JPEG): the lossy JPEG image-folder copy, cifar10-jpeg.tar.gz")
def _cifar10_jpeg(root: Path, *, download: bool = True, **kw: Any) -> ArrayData:
    from flatminima.data.imagefolder import CIFAR10_JPEG_ARCHIVE, load_imagefolder

    kw.setdefault("archive", CIFAR10_JPEG_ARCHIVE)
    return load_imagefolder(root, **kw)


@register_dataset("npz", needs_root=True, doc="your own x_train, y_train, x_test, y_test (.npz)")
def _npz(root: Path, *, download: bool = True, **kw: Any) -> ArrayData:
    from flatminima.data.npz import load_npz

    return load_npz(root, **kw)


@register_dataset("mnist1d", needs_root=False, doc="MNIST-1D, generated by the mnist1d package")
def _mnist1d(**kw: Any) -> ArrayData:
    from flatminima.data.mnist1d import load_mnist1d

    return load_mnist1d(**kw)


@register_dataset("digits", needs_root=False, doc="scikit-learn's bundled 8x8 digits")
def _digits(**kw: Any) -> ArrayData:
    from flatminima.data.digits import load_digits

    return load_digits(**kw)


@register_dataset("spirals", needs_root=False,
                  doc="two spirals of the generalization-visualization study (generated)")
def _spirals(*, seed: int = 0, n_per_class: int = 200, noise: float = 1.0) -> ArrayData:
    """The study's set: ``n_per_class`` points per class, half for training, half for testing."""
    # Imported at call time: the generator lives in its own module.
    from flatminima.data.spirals import make_spirals

    x, y = make_spirals(n_per_class, noise=noise, seed=seed)
    # The points of a class are i.i.d. draws, so alternating them is a random half/half split.
    train = torch.zeros(len(y), dtype=torch.bool)
    train[0::2] = True
    return ArrayData(x[train], y[train], x[~train], y[~train], num_classes=2, input_shape=(2,),
                     mean=(0.0,), std=(1.0,), name="spirals", label="two spirals")


@register_dataset("synthetic_images", needs_root=False,
                  doc="small generated colour images, a smooth pattern per class (smoke runs)")
def _synthetic_images(*, seed: int = 0, n_per_class: int = 40, num_classes: int = 10,
                      size: int = 32) -> ArrayData:
    """``uint8`` images ``(3, size, size)``: class ``c`` is a fixed random low-frequency pattern
    plus per-image noise, so that a small network can learn it in a few epochs. Half of each
    class is for training, half for testing. No file, no download: the smoke scale of the paper
    protocols runs on it wherever the real data set is absent."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, 3, 4, 4, generator=gen)
    patterns = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear",
                                               align_corners=False)
    y = torch.arange(num_classes).repeat_interleave(2 * n_per_class)
    noise = 0.25 * torch.randn(len(y), 3, size, size, generator=gen)
    x = ((patterns[y] + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    train = torch.zeros(len(y), dtype=torch.bool)
    train[0::2] = True
    return ArrayData(x[train], y[train], x[~train], y[~train], num_classes=num_classes,
                     input_shape=(3, size, size), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                     name="synthetic_images", label="synthetic images")


__all__ = ["get_dataset", "list_datasets", "describe_datasets", "register_dataset", "subset",
           "select_classes", "add_label_noise", "default_root"]
