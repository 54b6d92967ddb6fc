"""Fetching data files: download with checksum verification, and archive extraction that refuses
path traversal.

A loader asks :func:`ensure_file` for each file it needs. A file already in the data directory is
used as is (the loader then validates its contents). An absent file is downloaded from its
official source when ``download=True`` and a network is reachable, verified against the published
checksum, and only then moved into place; otherwise a one-line :class:`DataError` names the file
and where to put it. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from flatminima.data.errors import DataError

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Remote:
    """One downloadable file: its name in the data directory, mirrors, and checksum.

    ``algorithm`` is ``"md5"`` or ``"sha256"``: the one the source publishes.
    """

    filename: str
    urls: tuple[str, ...]
    checksum: str | None = None
    algorithm: str = "md5"


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    if algorithm not in ("md5", "sha256"):
        raise ValueError(f"algorithm must be 'md5' or 'sha256', got {algorithm!r}")
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_checksum(path: str | os.PathLike, expected: str, algorithm: str = "md5") -> None:
    """Raise :class:`DataError` unless the file's digest equals ``expected``."""
    got = file_digest(path, algorithm)
    if got.lower() != expected.lower():
        raise DataError(f"checksum mismatch for {Path(path).name}: {algorithm} {got}, "
                        f"expected {expected}; delete the file and download it again")


def download_url(url: str, dest: str | os.PathLike, *, checksum: str | None = None,
                 algorithm: str = "md5", timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying ``checksum`` before the file appears.

    The bytes go to a temporary file beside ``dest``; a wrong checksum deletes it and raises
    :class:`DataError`, so a half-written or tampered file never sits under the final name.
    ``file://`` URLs work too (used by the tests).
    """
    dest = Path(dest)
    # Folders this call creates are removed again if it fails: a failed download leaves nothing.
    created = [d for d in (dest.parent, *dest.parent.parents) if not d.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        h = hashlib.new(algorithm) if checksum else None
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while chunk := resp.read(_CHUNK):
                out.write(chunk)
                if h is not None:
                    h.update(chunk)
        if h is not None and h.hexdigest().lower() != checksum.lower():
            raise DataError(f"checksum mismatch for {dest.name} downloaded from {url}: "
                            f"{algorithm} {h.hexdigest()}, expected {checksum}")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        _remove_empty(created)
        raise
    return dest


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) where they are still empty."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            break


def ensure_file(root: str | os.PathLike, remote: Remote, *, download: bool = True,
                what: str = "") -> Path:
    """Path of ``remote.filename`` under ``root``; download it if absent and allowed.

    Raises :class:`DataError` with one line naming the file, the directory to put it in and the
    official URL when the file is absent and cannot be fetched.
    """
    root = Path(root)
    path = root / remote.filename
    if path.is_file():
        return path
    hint = f"put {remote.filename}{f' ({what})' if what else ''} in {root}/ " \
           f"(official source: {remote.urls[0] if remote.urls else 'none'})"
    if not download or not remote.urls:
        raise DataError(f"missing data file {path}: {hint}")
    errors = []
    for url in remote.urls:
        try:
            return download_url(url, path, checksum=remote.checksum, algorithm=remote.algorithm)
        except DataError:
            raise
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            errors.append(f"{url}: {getattr(e, 'reason', e)}")
    raise DataError(f"missing data file {path} and download failed ({'; '.join(errors)}): {hint}")


def _check_member_name(name: str, archive: Path) -> PurePosixPath:
    """Refuse absolute paths, drive letters and ``..`` components: the path-traversal guard."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise DataError(f"refusing to extract {archive.name}: member {name!r} "
                        "would be written outside the target directory")
    return p


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike,
                 members: Sequence[str] | None = None) -> Path:
    """Extract a tar (any compression) or zip archive into ``dest``, refusing unsafe members.

    Every member name is checked before anything is written: absolute paths, ``..`` components,
    links (symbolic or hard) and device or FIFO entries make the whole archive refused with a
    :class:`DataError`. Extraction goes to a temporary directory inside ``dest`` that is renamed
    into place member by member only after the whole archive was read, so a corrupted archive leaves
    nothing half-written. ``members`` restricts extraction to those names (and their contents).
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                infos = zf.infolist()
                for info in infos:
                    _check_member_name(info.filename, archive)
                    # A zip entry whose external attributes say "symlink" (0o120000).
                    if (info.external_attr >> 16) & 0o170000 == 0o120000:
                        raise DataError(f"refusing to extract {archive.name}: member "
                                        f"{info.filename!r} is a link")
                names = [i for i in infos if _wanted(i.filename, members)]
                for info in names:
                    zf.extract(info, tmp)
        else:
            try:
                tf = tarfile.open(archive, "r:*")
            except (tarfile.TarError, EOFError, OSError) as e:
                raise DataError(f"cannot read archive {archive}: {e}") from None
            with tf:
                try:
                    infos = tf.getmembers()
                except (tarfile.TarError, EOFError, OSError) as e:
                    raise DataError(f"corrupted archive {archive}: {e}") from None
                for info in infos:
                    _check_member_name(info.name, archive)
                    if not (info.isfile() or info.isdir()):
                        raise DataError(f"refusing to extract {archive.name}: member "
                                        f"{info.name!r} is a link or special file")
                for info in infos:
                    if not _wanted(info.name, members):
                        continue
                    target = tmp / _check_member_name(info.name, archive)
                    if info.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        src = tf.extractfile(info)
                        with src, open(target, "wb") as out:
                            shutil.copyfileobj(src, out, _CHUNK)
                    except (tarfile.TarError, EOFError, OSError, zipfile.BadZipFile) as e:
                        raise DataError(f"corrupted archive {archive}: {e}") from None
        # Move the extracted entries into place only once everything was read.
        _merge_into(tmp, dest)
    except zipfile.BadZipFile as e:
        raise DataError(f"corrupted archive {archive}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _merge_into(src: Path, dest: Path) -> None:
    """Move the tree ``src`` into ``dest``: files replace files of the same name, folders merge
    (nothing else already in ``dest`` is deleted)."""
    for entry in src.iterdir():
        final = dest / entry.name
        if entry.is_dir() and final.is_dir():
            _merge_into(entry, final)
        else:
            if final.is_dir():
                shutil.rmtree(final)
            os.replace(entry, final)


def _wanted(name: str, members: Sequence[str] | None) -> bool:
    if members is None:
        return True
    name = name.rstrip("/")
    return any(name == m or name.startswith(m.rstrip("/") + "/") for m in members)


__all__ = ["Remote", "file_digest", "verify_checksum", "download_url", "ensure_file",
           "safe_extract"]
