"""Image-folder trees: ``train/<class>/*`` and ``test/<class>/*`` (ImageNet's layout).

Small trees (the CIFAR-10 JPEG copy, a few thousand NSO fine-tuning images) are decoded once into
uint8 tensors and cached as an ``.npz`` beside the tree; trees too large for memory (ImageNet)
go through :class:`flatminima.data.stream.ImageFolderStream` instead, which decodes in worker
processes. A tree may also be given as an archive (``.tar.gz``, ``.tgz``, ``.tar``, ``.zip``),
which is extracted with path-traversal protection first.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import zipfile
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
    """Decode ``paths`` into one preallocated uint8 ``(N, C, H, W)`` array.

    Each thread decodes a contiguous slice (PIL releases the GIL while decoding): one task per
    thread rather than one per image, whose bookkeeping costs as much as decoding a 32x32 JPEG.
    """
    first = decode_image(paths[0], mode=mode, size=size, resize=resize)
    out = np.empty((len(paths), *first.shape), dtype=np.uint8)
    out[0] = first

    def work(lo: int, hi: int) -> set[tuple[int, ...]]:
        odd = set()
        for i in range(lo, hi):
            a = decode_image(paths[i], mode=mode, size=size, resize=resize)
            if a.shape != first.shape:
                odd.add(a.shape)
            else:
                out[i] = a
        return odd

    # A thread per ~1000 images at most: starting one costs more than decoding a few images.
    n = max(1, min(num_threads, len(paths) // 1000))
    bounds = np.linspace(1, len(paths), n + 1).round().astype(int).tolist()
    shapes = {first.shape}
    if n == 1:
        shapes |= work(1, len(paths))
    else:
        with ThreadPoolExecutor(n) as pool:
            for odd in pool.map(work, bounds[:-1], bounds[1:]):
                shapes |= odd
    if len(shapes) > 1:
        raise DataError(f"images under {paths[0].parent.parent} differ in size "
                        f"({sorted(shapes)[:3]}...): pass image_size= to resize and crop "
                        "them, or stream them")
    return out


def _find_archive(root: Path, archive: str | None) -> Path | None:
    """The archive the tree comes from, or None when ``root`` itself holds ``train/``."""
    if archive is None and (root / "train").is_dir():
        return None
    if archive is None:
        found = sorted(p for p in root.iterdir() if p.is_file()
                       and p.name.endswith(ARCHIVE_SUFFIXES)) if root.is_dir() else []
        if len(found) != 1:
            raise DataError(f"no image folder in {root}: expected {root}/train/<class>/* and "
                            f"{root}/test/<class>/*, or one archive of that tree "
                            f"(found {len(found)} archives)")
        return found[0]
    archive_path = Path(archive) if Path(archive).is_absolute() else root / archive
    if not archive_path.is_file():
        raise DataError(f"missing archive {archive_path}: put the image-folder archive there")
    return archive_path


def _archive_stem(archive_path: Path) -> str:
    stem = archive_path.name
    for suffix in ARCHIVE_SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _extracted(archive_path: Path, tree: Path) -> Path:
    """``tree``, the archive extracted there first unless that was done before."""
    if not (tree / "train").is_dir():
        safe_extract(archive_path, tree)
        if not (tree / "train").is_dir():
            raise DataError(f"archive {archive_path} has no top-level train/ folder")
    return tree


def _resolve_tree(root: Path, archive: str | None, cache_dir: str | os.PathLike | None
                  ) -> tuple[Path, Path | None]:
    """The directory holding ``train/`` and ``test/`` (extracting an archive if that is needed)
    and the archive it came from, if any."""
    archive_path = _find_archive(root, archive)
    if archive_path is None:
        return root, None
    dest = Path(cache_dir) if cache_dir is not None else default_cache_dir(root)
    return _extracted(archive_path, dest / _archive_stem(archive_path)), archive_path


def _list_tree(tree: Path) -> tuple[list[str], list[Path], list[int], list[Path], list[int]]:
    classes = find_classes(tree / "train")
    train_paths, train_labels = list_images(tree / "train", classes)
    test_paths, test_labels = list_images(tree / "test", classes)
    return classes, train_paths, train_labels, test_paths, test_labels


def default_cache_dir(root: Path) -> Path:
    """``$FLATMINIMA_CACHE`` when set, else ``root`` itself when writable, else
    ``~/.cache/flatminima``.

    A folder whose permission bits allow nobody to write counts as read-only even where
    ``os.access`` says otherwise (for root it always does): a data folder marked read-only is
    not written into.
    """
    env = os.environ.get("FLATMINIMA_CACHE")
    if env:
        return Path(env)
    if root.is_dir() and os.access(root, os.W_OK) and root.stat().st_mode & 0o222:
        return root
    return Path.home() / ".cache" / "flatminima"


_CACHED = ("x_train", "y_train", "x_test", "y_test", "classes")


def _valid_cache(arrays: dict[str, np.ndarray]) -> bool:
    """The checks a decode guarantees: uint8 ``(N, C, H, W)`` images, one int64 label in
    ``[0, classes)`` per image, at least one class name."""
    classes = arrays["classes"]
    if classes.ndim != 1 or len(classes) == 0 or classes.dtype.kind != "U":
        return False
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if (x.dtype != np.uint8 or x.ndim != 4 or y.dtype != np.int64 or y.ndim != 1
                or len(x) != len(y) or len(y) == 0
                or int(y.min()) < 0 or int(y.max()) >= len(classes)):
            return False
    return True


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    """The decoded arrays cached at ``path``; None when absent, damaged or malformed (rebuilt,
    never trusted)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in _CACHED}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    return arrays if _valid_cache(arrays) else None


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write the cache atomically: a uniquely named temporary file beside it (so that processes
    decoding the same tree at once never write into one file), fsync-ed, then renamed over it.
    A read-only location just means no cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


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
    archive_path = _find_archive(root, archive)
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir(root)
    listing = None
    if archive_path is not None:
        # An archive identifies its tree: its size and time stamp key the cache, so a cached
        # load needs neither the extracted tree nor a walk over tens of thousands of files.
        tree = cache_root / _archive_stem(archive_path)
        st = archive_path.stat()
        ident: object = (archive_path.name, st.st_size, st.st_mtime_ns)
    else:
        tree = root
        listing = _list_tree(tree)
        # Every file's name, size and time stamp: an image replaced, added or removed (even by
        # one of the same size) makes a new key, so a stale cache is never read.
        ident = []
        for p in listing[1] + listing[3]:
            st = p.stat()
            ident.append((str(p.relative_to(tree)), st.st_size, st.st_mtime_ns))
    is_cifar_jpeg = (archive_path is not None and archive_path.name == CIFAR10_JPEG_ARCHIVE) \
        or tree.name == "cifar10-jpeg"
    key = hashlib.sha256(repr((ident, image_size, resize, mode)).encode()).hexdigest()[:16]
    cache = cache_root / f".{tree.name}-{key}.npz"
    arrays = _read_cache(cache) if use_cache else None
    if arrays is None:
        if archive_path is not None:
            tree = _extracted(archive_path, tree)
        classes, train_paths, train_labels, test_paths, test_labels = listing or _list_tree(tree)
        arrays = {"x_train": _decode_all(train_paths, mode, image_size, resize, num_threads),
                  "y_train": np.asarray(train_labels, dtype=np.int64),
                  "x_test": _decode_all(test_paths, mode, image_size, resize, num_threads),
                  "y_test": np.asarray(test_labels, dtype=np.int64),
                  "classes": np.asarray(classes, dtype=str)}
        if use_cache:
            _write_cache(cache, arrays)
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
