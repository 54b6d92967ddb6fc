"""Download with checksum verification, and archive extraction that refuses path traversal."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from flatminima.data import DataError, download_url, get_dataset, safe_extract, verify_checksum
from flatminima.data import idx as idx_module
from flatminima.data.download import Remote, ensure_file


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_download_verifies_checksum_before_the_file_appears(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload" * 100)
    dest = tmp_path / "out" / "file.bin"
    download_url(src.as_uri(), dest, checksum=md5(src.read_bytes()))
    assert dest.read_bytes() == src.read_bytes()
    dest.unlink()
    with pytest.raises(DataError, match="checksum mismatch") as e:
        download_url(src.as_uri(), dest, checksum="0" * 32)
    assert "\n" not in str(e.value) and "file.bin" in str(e.value)
    assert not dest.exists() and not list(dest.parent.glob("*.part"))   # nothing left behind
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    download_url(src.as_uri(), dest, checksum=sha, algorithm="sha256")
    verify_checksum(dest, sha, "sha256")
    with pytest.raises(DataError, match="checksum mismatch"):
        verify_checksum(dest, "f" * 64, "sha256")


def test_ensure_file_without_network_names_file_and_place(tmp_path):
    remote = Remote("thing.gz", ((tmp_path / "nowhere" / "thing.gz").as_uri(),), "0" * 32)
    with pytest.raises(DataError, match="download failed") as e:
        ensure_file(tmp_path / "data", remote, download=True)
    msg = str(e.value)
    assert "\n" not in msg and "thing.gz" in msg and str(tmp_path / "data") in msg
    assert not (tmp_path / "data").exists()          # the failed download left no folder
    remote2 = Remote("thing.gz", remote.urls, "0" * 32)
    with pytest.raises(DataError):
        ensure_file(tmp_path / "a" / "b", remote2, download=True)
    assert not (tmp_path / "a").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(DataError):
        ensure_file(tmp_path / "kept", remote2, download=True)
    assert (tmp_path / "kept").is_dir()               # folders that existed before stay
    with pytest.raises(DataError, match="missing data file"):
        ensure_file(tmp_path / "data", remote, download=False)


def test_mnist_download_path_end_to_end(tmp_path, monkeypatch):
    """Files fetched from a (local) mirror are md5-checked, then parsed; a bad mirror is refused."""
    from tests.test_data_formats import write_mnist

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    write_mnist(mirror)
    sums = {p.name: md5(p.read_bytes()) for p in mirror.iterdir()}
    monkeypatch.setattr(idx_module, "_MIRRORS", (mirror.as_uri() + "/",))
    monkeypatch.setattr(idx_module, "_MD5", sums)
    d = get_dataset("mnist", tmp_path / "data", download=True)
    assert d.x_train.shape == (30, 1, 28, 28)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(sums)
    # A mirror serving different bytes fails the checksum and leaves no file.
    monkeypatch.setattr(idx_module, "_MD5", {k: "0" * 32 for k in sums})
    with pytest.raises(DataError, match="checksum mismatch"):
        get_dataset("mnist", tmp_path / "data2", download=True)
    assert not list((tmp_path / "data2").glob("*.gz"))


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tf.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def regular(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def link(name: str, target: str, kind=tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def test_safe_extract_extracts_a_clean_archive(tmp_path):
    arc = make_tar(tmp_path / "ok.tar.gz", [(regular("a/b.txt"), b"hi"), (regular("c.txt"), b"x")])
    safe_extract(arc, tmp_path / "out")
    assert (tmp_path / "out" / "a" / "b.txt").read_bytes() == b"hi"
    # Extracting over an existing folder merges: files already there are kept.
    (tmp_path / "out" / "a" / "mine.txt").write_text("keep")
    safe_extract(arc, tmp_path / "out")
    assert (tmp_path / "out" / "a" / "mine.txt").read_text() == "keep"
    safe_extract(arc, tmp_path / "only", members=["a"])
    assert (tmp_path / "only" / "a" / "b.txt").exists()
    assert not (tmp_path / "only" / "c.txt").exists()


@pytest.mark.parametrize("member", [
    regular("../escape.txt"),
    regular("a/../../escape.txt"),
    regular("/tmp/abs-escape.txt"),
    link("innocent", "../../escape.txt"),
    link("hard", "/etc/passwd", tarfile.LNKTYPE),
])
def test_safe_extract_refuses_unsafe_tar_members(tmp_path, member):
    arc = make_tar(tmp_path / "evil.tar.gz", [(regular("good.txt"), b"ok"), (member, b"bad")])
    out = tmp_path / "a" / "out"
    with pytest.raises(DataError, match="refusing") as e:
        safe_extract(arc, out)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "a" / "escape.txt").exists() and not (tmp_path / "escape.txt").exists()
    assert not (out / "good.txt").exists()        # refused as a whole, before writing anything


def test_safe_extract_refuses_zip_traversal(tmp_path):
    arc = tmp_path / "evil.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("ok.txt", "fine")
        zf.writestr("../escape.txt", "bad")
    with pytest.raises(DataError, match="outside"):
        safe_extract(arc, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_safe_extract_corrupted_archive(tmp_path):
    arc = make_tar(tmp_path / "ok.tar.gz", [(regular("a.txt"), b"y" * 100000)])
    data = arc.read_bytes()
    arc.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="archive"):
        safe_extract(arc, tmp_path / "out")
    assert not (tmp_path / "out" / "a.txt").exists()
    (tmp_path / "junk.tar.gz").write_bytes(gzip.compress(b"not a tar at all"))
    with pytest.raises(DataError):
        safe_extract(tmp_path / "junk.tar.gz", tmp_path / "out")
