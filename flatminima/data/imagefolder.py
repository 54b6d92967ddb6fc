"""Image-folder trees: ``train/<class>/*`` and ``test/<class>/*`` (ImageNet's layout).

Small trees (the CIFAR-10 JPEG copy, a few thousand NSO fine-tuning images) are decoded once into
uint8 tensors and cached as an ``.npz`` beside the tree; trees too large for memory (ImageNet)
go through :class:`flatminima.data.stream.ImageFolderStream` instead, which decodes in worker
processes. A tree may also be given as an archive (``.tar.gz``, ``.tgz``, ``.tar``, ``.zip``),
which is extracted with path-traversal protection first.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from flatminima.data.arraydata import ArrayData
from flatminima.data.download import safe_extract
from flatminima.data.errors import DataError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip", ".tar.bz2", ".tar.xz")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The offline CIFAR-10 JPEG copy: a lossy re-encoding, to be labelled as such and never compared
# directly with published CIFAR-10 numbers.
CIFAR10_JPEG_ARCHIVE = "cifar10-jpeg.tar.gz"
CIFAR10_JPEG_LABEL = "CIFAR-10 (JPEG)"


def find_classes(split_dir: str | os.PathLike) -> list[str]:
    """Sorted class folder names of one split directory."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DataError(f"image folder {split_dir} not found: expected "
                        f"{split_dir}/<class>/<image files>")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir()
                     and not p.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {split_dir} has no class subfolders")
    return classes


def list_images(split_dir: str | os.PathLike, classes: Sequence[str]
                ) -> tuple[list[Path], list[int]]:
    """All image files of a split (sorted within each class) and their class indices.

    A split may lack some classes (a test set without examples of one); a folder that is not in
    ``classes`` is an error, since its label would be undefined.
    """
    split_dir = Path(split_dir)
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for cdir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if cdir.name not in index:
            raise DataError(f"{cdir} is a class absent from the training split")
        files = sorted(f for f in cdir.iterdir() if f.suffix.lower() in IMG_EXTENSIONS)
        paths += files
        labels += [index[cdir.name]] * len(files)
    if not paths:
        raise DataError(f"image folder {split_dir} contains no image files "
                        f"({', '.join(IMG_EXTENSIONS)})")
    return paths, labels


def decode_image(path: str | os.PathLike, *, mode: str = "RGB",
                 size: int | None = None, resize: int | None = None) -> np.ndarray:
    """Decode one image to uint8 ``(C, H, W)``.

    ``resize`` scales the shorter side to that many pixels (bilinear, antialiased), then ``size``
    takes the centre ``size x size`` crop: the usual ImageNet evaluation transform (256 then 224).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if resize is not None:
                w, h = im.size
                s = resize / min(w, h)
                im = im.resize((max(1, round(w * s)), max(1, round(h * s))),
                               Image.Resampling.BILINEAR)
            if size is not None:
                w, h = im.size
                if w < size or h < size:
                    raise DataError(f"{path}: {w}x{h} image is smaller than the crop {size}")
                left, top = (w - size) // 2, (h - size) // 2
                im = im.crop((left, top, left + size, top + size))
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot decode image {path}: {e}") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _decode_all(paths: Sequence[Path], mode: str, size: int | None, resize: int | None,
                num_threads: int) -> np.ndarray:
    # PIL releases the GIL while decoding, so threads give real parallelism here without the
    # start-up cost of processes.
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        arrays = list(pool.map(lambda p: decode_image(p, mode=mode, size=size, resize=resize),
                               paths, chunksize=256))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DataError(f"images under {paths[0].parent.parent} differ in size "
                        f"({sorted(shapes)[:3]}...): pass image_size= to resize and crop "
                        "them, or stream them")
    return np.stack(arrays)


def _resolve_tree(root: Path, archive: str | None, cache_dir: str | os.PathLike | None
                  ) -> tuple[Path, Path | None]:
    """The directory holding ``train/`` and ``test/`` (extracting an archive if that is needed)
    and the archive it came from, if any."""
    if archive is None and (root / "train").is_dir():
        return root, None
    if archive is None:
        found = sorted(p for p in root.iterdir() if p.is_file()
                       and p.name.endswith(ARCHIVE_SUFFIXES)) if root.is_dir() else []
        if len(found) != 1:
            raise DataError(f"no image folder in {root}: expected {root}/train/<class>/* and "
                            f"{root}/test/<class>/*, or one archive of that tree "
                            f"(found {len(found)} archives)")
        archive_path = found[0]
    else:
        archive_path = Path(archive) if Path(archive).is_absolute() else root / archive
        if not archive_path.is_file():
            raise DataError(f"missing archive {archive_path}: put the image-folder archive there")
    stem = archive_path.name
    for suffix in ARCHIVE_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    dest = Path(cache_dir) if cache_dir is not None else default_cache_dir(root)
    tree = dest / stem
    if not (tree / "train").is_dir():
        safe_extract(archive_path, tree)
        if not (tree / "train").is_dir():
            raise DataError(f"archive {archive_path} has no top-level train/ folder")
    return tree, archive_path


def _list_tree(tree: Path) -> tuple[list[str], list[Path], list[int], list[Path], list[int]]:
    classes = find_classes(tree / "train")
    train_paths, train_labels = list_images(tree / "train", classes)
    test_paths, test_labels = list_images(tree / "test", classes)
    return classes, train_paths, train_labels, test_paths, test_labels


def default_cache_dir(root: Path) -> Path:
    """``root`` itself when writable, else ``$FLATMINIMA_CACHE`` or ``~/.cache/flatminima``."""
    if root.is_dir() and os.access(root, os.W_OK):
        return root
    return Path(os.environ.get("FLATMINIMA_CACHE", Path.home() / ".cache" / "flatminima"))


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 ``(N, C, H, W)`` images, in [0, 1] units.

    Exact and cheap: a 256-bin histogram per channel, then the moments of the histogram in
    float64 (population standard deviation).
    """
    v = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1).to(torch.int64) if x.dtype != torch.uint8
                                else x[:, c].reshape(-1), minlength=256).to(torch.float64)
        n = counts.sum()
        m = (counts * v).sum() / n
        var = (counts * v.square()).sum() / n - m.square()
        means.append(float(m))
        stds.append(float(var.clamp_min(1e-12).sqrt()))
    return tuple(means), tuple(stds)


def load_imagefolder(root: str | os.PathLike, *, archive: str | None = None,
                     cache_dir: str | os.PathLike | None = None, image_size: int | None = None,
                     resize: int | None = None, mode: str = "RGB", label: str | None = None,
                     num_threads: int = 2, use_cache: bool = True) -> ArrayData:
    """Decode an image-folder tree into memory as uint8 ``(N, C, H, W)``.

    Args:
        root: directory with ``train/`` and ``test/``, or holding one archive of such a tree.
        archive: archive file name (in ``root``) or path, when ``root`` holds several.
        cache_dir: where an archive is extracted and the decoded arrays are cached
            (default: ``root`` when writable, else ``$FLATMINIMA_CACHE`` / ``~/.cache/flatminima``).
        image_size, resize: centre-crop size and shorter-side resize (see :func:`decode_image`);
            needed when the images differ in size.
        mode: PIL mode, ``"RGB"`` or ``"L"``.
        label: how results are labelled; the CIFAR-10 JPEG copy is recognised by its archive name
            and labelled ``"CIFAR-10 (JPEG)"``.

    The channel mean and standard deviation are measured on the training images (for the CIFAR-10
    JPEG copy they come out at 0.4913/0.4821/0.4465, the figures published with it).
    """
    root = Path(root)
    tree, archive_path = _resolve_tree(root, archive, cache_dir)
    is_cifar_jpeg = (archive_path is not None and archive_path.name == CIFAR10_JPEG_ARCHIVE) \
        or tree.name == "cifar10-jpeg"
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir(root)
    listing = None
    if archive_path is not None:
        # An archive identifies its tree: its size and time stamp key the cache, so a cached
        # load needs no walk over tens of thousands of files.
        st = archive_path.stat()
        ident: object = (archive_path.name, st.st_size, st.st_mtime_ns)
    else:
        listing = _list_tree(tree)
        ident = [(str(p.relative_to(tree)), p.stat().st_size)
                 for p in listing[1] + listing[3]]
    key = hashlib.sha256(repr((ident, image_size, resize, mode)).encode()).hexdigest()[:16]
    cache = cache_root / f".{tree.name}-{key}.npz"
    arrays = None
    if use_cache and cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test", "classes")}
        except (OSError, ValueError, KeyError, EOFError):
            arrays = None  # a damaged cache is rebuilt, never trusted
    if arrays is None:
        classes, train_paths, train_labels, test_paths, test_labels = listing or _list_tree(tree)
        arrays = {"x_train": _decode_all(train_paths, mode, image_size, resize, num_threads),
                  "y_train": np.asarray(train_labels, dtype=np.int64),
                  "x_test": _decode_all(test_paths, mode, image_size, resize, num_threads),
                  "y_test": np.asarray(test_labels, dtype=np.int64),
                  "classes": np.asarray(classes, dtype=str)}
        if use_cache:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(".tmp.npz")
                np.savez(tmp, **arrays)
                os.replace(tmp, cache)
            except OSError:
                pass  # a read-only location just means no cache
    x_train, x_test = arrays["x_train"], arrays["x_test"]
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"train images are {x_train.shape[1:]} but test images are "
                        f"{x_test.shape[1:]} under {tree}: pass image_size=")
    mean, std = channel_stats(torch.from_numpy(x_train))
    name = "cifar10-jpeg" if is_cifar_jpeg else "imagefolder"
    label = label or (CIFAR10_JPEG_LABEL if is_cifar_jpeg else f"imagefolder:{tree}")
    return ArrayData(torch.from_numpy(x_train), torch.from_numpy(arrays["y_train"]),
                     torch.from_numpy(x_test), torch.from_numpy(arrays["y_test"]),
                     num_classes=len(arrays["classes"]), input_shape=tuple(x_train.shape[1:]),
                     mean=mean, std=std, name=name, label=label)


__all__ = ["find_classes", "list_images", "decode_image", "load_imagefolder",
           "default_cache_dir", "channel_stats", "IMAGENET_MEAN", "IMAGENET_STD",
           "CIFAR10_JPEG_LABEL"]
