"""Batched, device-side image augmentation: every op transforms a whole ``(N, C, H, W)`` batch with
tensor ops, with no per-sample Python loop (airbench's approach).

Random parameters (offsets, flips, boxes, factors) are drawn on the CPU from an explicit
``torch.Generator`` and then moved to the batch's device, so a seed gives the same batch on any
device. Geometric ops work on uint8 as well as float batches.

* :func:`random_crop`: zero-pad by ``p`` pixels and take a random ``H x W`` window: the "Basic"
  CIFAR augmentation (4-pixel padding, random crop; He et al. 2016).
* :func:`hflip`: mirror each image left-right with probability 1/2.
* :func:`cutout`: zero a ``s x s`` square centred uniformly in the image, clipped at the borders
  (DeVries & Taylor 2017; applied after normalization, so the square holds the data mean).
* :func:`random_resized_crop`: crop a box of random area fraction and aspect ratio and resize it
  (Szegedy et al. 2015); torchvision's sampling rule (10 tries, then a centre fallback), batched.
* :func:`color_jitter`: random brightness, contrast and saturation factors in ``[1-a, 1+a]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

Generator = torch.Generator | None


def _check_batch(x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected an (N, C, H, W) batch, got shape {tuple(x.shape)}")


def random_crop(x: Tensor, padding: int, *, generator: Generator = None,
                offsets: tuple[Tensor, Tensor] | None = None,
                flip: Tensor | None = None) -> Tensor:
    """Zero-pad by ``padding`` on every side, then crop each image at a random offset.

    ``offsets = (dy, dx)``, integer tensors of shape ``(N,)`` in ``[0, 2 * padding]``, fix the
    window instead of drawing it: output pixel ``(i, j)`` is padded pixel ``(i + dy, j + dx)``.
    ``flip`` (bool, ``(N,)``) mirrors the chosen images in the same pass, reading padded column
    ``dx + W - 1 - j`` instead: crop then flip fused into one gather.
    Implemented as one ``gather`` over the flattened padded images.
    """
    _check_batch(x)
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    n, c, h, w = x.shape
    if offsets is None:
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    else:
        dy, dx = offsets
    dev = x.device
    dy, dx = dy.to(dev), dx.to(dev)
    cols = torch.arange(w, device=dev).expand(n, w)
    if flip is not None:
        cols = torch.where(flip.to(dev)[:, None], w - 1 - cols, cols)
    wp = w + 2 * padding
    xp = F.pad(x, (padding, padding, padding, padding)) if padding else x
    idx = ((dy[:, None] + torch.arange(h, device=dev))[:, :, None] * wp
           + (dx[:, None] + cols)[:, None, :])
    out = xp.reshape(n, c, -1).gather(2, idx.view(n, 1, h * w).expand(n, c, h * w))
    return out.view(n, c, h, w)


def hflip(x: Tensor, p: float = 0.5, *, generator: Generator = None,
          mask: Tensor | None = None) -> Tensor:
    """Mirror each image along its width with probability ``p`` (or where ``mask`` is True)."""
    _check_batch(x)
    if mask is None:
        mask = torch.rand(x.shape[0], generator=generator) < p
    mask = mask.to(x.device)[:, None, None, None]
    return torch.where(mask, x.flip(3), x)


def cutout(x: Tensor, size: int, *, generator: Generator = None,
           centers: tuple[Tensor, Tensor] | None = None, fill: float = 0.0) -> Tensor:
    """Set a ``size x size`` square of each image to ``fill`` (all channels).

    The centre ``(cy, cx)`` is uniform over the image (or given by ``centers``); the square covers
    rows ``[cy - size // 2, cy - size // 2 + size)`` and the same for columns, clipped to the image,
    as in DeVries & Taylor's reference code.
    """
    _check_batch(x)
    if size < 0:
        raise ValueError(f"cutout size must be >= 0, got {size!r}")
    if size == 0:
        return x
    n, _, h, w = x.shape
    if centers is None:
        cy = torch.randint(0, h, (n,), generator=generator)
        cx = torch.randint(0, w, (n,), generator=generator)
    else:
        cy, cx = centers
    y0 = (cy.to(x.device) - size // 2)[:, None]
    x0 = (cx.to(x.device) - size // 2)[:, None]
    r = torch.arange(h, device=x.device)[None, :]
    k = torch.arange(w, device=x.device)[None, :]
    in_rows = (r >= y0) & (r < y0 + size)
    in_cols = (k >= x0) & (k < x0 + size)
    mask = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
    return x.masked_fill(mask, fill)


def resized_crop_boxes(n: int, height: int, width: int, scale: Sequence[float] = (0.08, 1.0),
                       ratio: Sequence[float] = (3 / 4, 4 / 3), *, generator: Generator = None,
                       tries: int = 10) -> Tensor:
    """Boxes ``(top, left, h, w)`` (int64, ``(n, 4)``) by torchvision's RandomResizedCrop rule.

    Each try draws an area fraction ``s ~ U(scale)`` and a log aspect ``log r ~ U(log ratio)``,
    giving ``w = round(sqrt(s A r))``, ``h = round(sqrt(s A / r))``; the first try that fits wins.
    If none fits, the whole image cropped centrally to the nearest allowed aspect ratio is used.
    """
    if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"bad scale {tuple(scale)} or ratio {tuple(ratio)}")
    area = height * width
    s = torch.empty(n, tries, dtype=torch.float64).uniform_(scale[0], scale[1],
                                                            generator=generator)
    logr = torch.empty(n, tries, dtype=torch.float64).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = logr.exp()
    w = torch.round(torch.sqrt(s * area * r)).long()
    h = torch.round(torch.sqrt(s * area / r)).long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    # Fallback: the largest central box with an aspect inside `ratio`.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fh, fw = height, round(height * ratio[1])
    else:
        fw, fh = width, height
    idx = first.clamp_min(0)[:, None]
    hh = torch.where(first >= 0, h.gather(1, idx)[:, 0], torch.full((n,), fh))
    ww = torch.where(first >= 0, w.gather(1, idx)[:, 0], torch.full((n,), fw))
    top = torch.where(first >= 0, (u[:, 0] * (height - hh + 1)).long(), (height - hh) // 2)
    left = torch.where(first >= 0, (u[:, 1] * (width - ww + 1)).long(), (width - ww) // 2)
    return torch.stack([top, left, hh, ww], dim=1)


def crop_and_resize(x: Tensor, boxes: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinearly resample box ``(top, left, h, w)`` of each image to ``size`` (float batch out).

    One ``affine_grid`` + ``grid_sample`` for the whole batch: output pixel centres are spread
    evenly over the box, the same geometry as resizing the cropped box (without antialiasing).
    """
    _check_batch(x)
    out_h, out_w = (size, size) if isinstance(size, int) else size
    n, c, h, w = x.shape
    xf = x if x.is_floating_point() else x.float()
    b = boxes.to(device=x.device, dtype=xf.dtype)
    top, left, bh, bw = b.unbind(1)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=xf.dtype)
    theta[:, 0, 0] = bw / w
    theta[:, 0, 2] = (2 * left + bw) / w - 1
    theta[:, 1, 1] = bh / h
    theta[:, 1, 2] = (2 * top + bh) / h - 1
    grid = F.affine_grid(theta, [n, c, out_h, out_w], align_corners=False)
    out = F.grid_sample(xf, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out if x.is_floating_point() else out.round_().clamp_(0, 255).to(x.dtype)


def random_resized_crop(x: Tensor, size: int | tuple[int, int] | None = None,
                        scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3), *,
                        generator: Generator = None) -> Tensor:
    """Random area/aspect crop resized to ``size`` (default: the input size)."""
    _check_batch(x)
    n, _, h, w = x.shape
    boxes = resized_crop_boxes(n, h, w, scale, ratio, generator=generator)
    return crop_and_resize(x, boxes, size if size is not None else (h, w))


def center_crop(x: Tensor, size: int) -> Tensor:
    """The central ``size x size`` window (the evaluation counterpart of the random crops)."""
    _check_batch(x)
    h, w = x.shape[-2:]
    if size > h or size > w:
        raise ValueError(f"center crop {size} larger than the {h}x{w} images")
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as PIL and torchvision use


def _gray(x: Tensor) -> Tensor:
    wts = torch.tensor(_GRAY, device=x.device, dtype=x.dtype)[None, :, None, None]
    return (x * wts).sum(1, keepdim=True)


def color_jitter(x: Tensor, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.4, *, generator: Generator = None) -> Tensor:
    """Random brightness, contrast, saturation (in that fixed order) of a float batch in [0, 1].

    Factors ``f ~ U(max(0, 1 - a), 1 + a)`` per image. Brightness: ``f x``. Contrast: blend with the
    image's mean luma, ``f x + (1 - f) mean(gray(x))``. Saturation: blend with the luma image,
    ``f x + (1 - f) gray(x)`` (RGB only). Each step is clamped to [0, 1] like torchvision's; unlike
    it, the order is fixed and there is no hue jitter.
    """
    _check_batch(x)
    if not x.is_floating_point():
        raise ValueError("color_jitter expects a float batch in [0, 1]")
    for name, a in (("brightness", brightness), ("contrast", contrast),
                    ("saturation", saturation)):
        if a < 0:
            raise ValueError(f"{name} must be >= 0, got {a!r}")
    n = x.shape[0]

    def factor(a: float) -> Tensor:
        f = torch.empty(n).uniform_(max(0.0, 1 - a), 1 + a, generator=generator)
        return f.to(device=x.device, dtype=x.dtype)[:, None, None, None]

    fb, fc, fs = factor(brightness), factor(contrast), factor(saturation)
    rgb = x.shape[1] == 3
    x = (x * fb).clamp(0, 1)
    m = (_gray(x) if rgb else x.mean(1, keepdim=True)).mean(dim=(2, 3), keepdim=True)
    x = (fc * x + (1 - fc) * m).clamp(0, 1)
    if rgb:
        x = (fs * x + (1 - fs) * _gray(x)).clamp(0, 1)
    return x


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x - mean) / std`` per channel (dim 1) as float32; uint8 input is first mapped to [0, 1].

    A length-1 ``mean``/``std`` applies to every channel or feature.
    """
    if len(mean) == 1:
        xf = x.float() if x.is_floating_point() else x.float().div_(255.0)
        if mean[0] == 0.0 and std[0] == 1.0:
            return xf
        return (xf - mean[0]) / std[0]
    if x.dim() < 2 or x.shape[1] != len(mean):
        raise ValueError(f"{len(mean)} channel means for a batch of shape {tuple(x.shape)}")
    shape = (1, -1) + (1,) * (x.dim() - 2)
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    # One fused pass: x * (1 / (k std)) - mean / std, with k = 255 folded in for uint8 input.
    k = 1.0 if x.is_floating_point() else 255.0
    scale = (1.0 / (k * s)).to(device=x.device, dtype=torch.float32).view(shape)
    bias = (-m / s).to(device=x.device, dtype=torch.float32).view(shape)
    return torch.addcmul(bias, x.float(), scale)


@dataclass
class Augment:
    """A batch pipeline: uint8 geometry, then float photometry, normalization, Cutout.

    Order: random crop with ``crop_padding`` -> horizontal flip -> (to float in [0, 1]) ->
    random resized crop with area range ``resized_crop`` (output ``out_size`` or the input size) ->
    colour ``jitter`` ``(brightness, contrast, saturation)`` -> normalize -> Cutout of side
    ``cutout`` (after normalization, so the hole holds the mean, as in DeVries & Taylor's code).
    ``center_crop`` is the evaluation-side crop for streamed images.
    """

    crop_padding: int = 0
    flip: bool = False
    resized_crop: tuple[float, float] | None = None
    out_size: int | None = None
    jitter: tuple[float, float, float] | None = None
    cutout: int = 0
    center_crop: int | None = None

    def __post_init__(self) -> None:
        if self.crop_padding < 0 or self.cutout < 0:
            raise ValueError(f"crop_padding {self.crop_padding!r} and cutout {self.cutout!r} "
                             "must be >= 0")

    def __call__(self, x: Tensor, mean: Sequence[float], std: Sequence[float],
                 generator: Generator = None) -> Tensor:
        if self.center_crop is not None:
            x = center_crop(x, self.center_crop)
        if self.crop_padding:
            # Crop and flip in one gather; the flip draws come first, then the offsets.
            mask = (torch.rand(x.shape[0], generator=generator) < 0.5) if self.flip else None
            x = random_crop(x, self.crop_padding, generator=generator, flip=mask)
        elif self.flip:
            x = hflip(x, generator=generator)
        if self.resized_crop is not None or self.jitter is not None:
            x = x.float().div_(255.0) if not x.is_floating_point() else x
            if self.resized_crop is not None:
                x = random_resized_crop(x, self.out_size, self.resized_crop,
                                        generator=generator).clamp_(0, 1)
            if self.jitter is not None:
                x = color_jitter(x, *self.jitter, generator=generator)
        x = normalize(x, mean, std)
        if self.cutout:
            x = cutout(x, self.cutout, generator=generator)
        return x


PRESETS: dict[str, Callable[..., Augment]] = {
    # He et al. 2016: 4-pixel zero padding, random 32x32 crop, horizontal flip.
    "basic": lambda **kw: Augment(crop_padding=kw.get("padding", 4), flip=True),
    # Basic plus Cutout; 16x16 is DeVries & Taylor's choice for CIFAR-10 (8x8 for CIFAR-100).
    "cutout": lambda **kw: Augment(crop_padding=kw.get("padding", 4), flip=True,
                                   cutout=kw.get("cutout", 16)),
    # For ViT on small images: random resized crop (area 25-100%), flip, colour jitter 0.4.
    "heavy": lambda **kw: Augment(flip=True, resized_crop=kw.get("scale", (0.25, 1.0)),
                                  jitter=kw.get("jitter", (0.4, 0.4, 0.4))),
    # ImageNet training: random resized crop (area 8-100%) to out_size, flip.
    "imagenet": lambda **kw: Augment(flip=True, resized_crop=kw.get("scale", (0.08, 1.0)),
                                     out_size=kw.get("out_size", 224)),
}


def make_augment(name: str, **kw: object) -> Augment:
    """A preset pipeline by name: ``basic``, ``cutout``, ``heavy`` or ``imagenet``."""
    if name not in PRESETS:
        raise ValueError(f"unknown augmentation {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name](**kw)


__all__ = ["random_crop", "hflip", "cutout", "random_resized_crop", "resized_crop_boxes",
           "crop_and_resize", "center_crop", "color_jitter", "normalize", "Augment",
           "make_augment", "PRESETS"]
