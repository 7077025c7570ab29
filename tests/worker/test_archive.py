"""Hostile checkpoint archives: refused whole by the worker's extraction (`unpack`) and by
the service's check of an upload (`_check_archive`), before anything is written."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from service.errors import Invalid
from service.scheduler.checkpoints import _check_archive
from trainer.worker.archive import MAX_MEMBERS, UnsafeArchive, pack, unpack

TarWriter = Callable[[tarfile.TarFile], None]


def _file(tar: tarfile.TarFile, name: str, data: bytes = b"x", **attrs: object) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data))


def _special(tar: tarfile.TarFile, name: str, kind: bytes, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    tar.addfile(info)


def _sparse(tar: tarfile.TarFile) -> None:
    # GNU sparse 0.1 in PAX headers: a few bytes on disk declaring a terabyte file.
    info = tarfile.TarInfo("weights.bin")
    info.size = 0
    info.pax_headers = {"GNU.sparse.map": "0,0", "GNU.sparse.size": str(2**40)}
    tar.addfile(info, io.BytesIO(b""))


def _sparse_small(tar: tarfile.TarFile) -> None:
    # Refused for being sparse at all, not for its size: `pack` never writes one.
    info = tarfile.TarInfo("weights.bin")
    info.size = 0
    info.pax_headers = {"GNU.sparse.map": "0,0", "GNU.sparse.size": "10"}
    tar.addfile(info, io.BytesIO(b""))


def _too_many(tar: tarfile.TarFile) -> None:
    for i in range(MAX_MEMBERS + 1):
        _file(tar, f"f{i}", b"")


def _declared_huge(tar: tarfile.TarFile) -> None:
    # A header claiming 1 TiB of data that the archive does not hold.
    info = tarfile.TarInfo("model.safetensors")
    info.size = 2**40
    tar.addfile(info)


HOSTILE: dict[str, TarWriter] = {
    "parent": lambda t: _file(t, "../escape.txt"),
    "nested-parent": lambda t: _file(t, "a/../../escape.txt"),
    "absolute": lambda t: _file(t, "/tmp/tuneforge-escape.txt"),
    "symlink-out": lambda t: _special(t, "link", tarfile.SYMTYPE, "/etc/passwd"),
    "symlink-relative-out": lambda t: _special(t, "link", tarfile.SYMTYPE, "../../outside"),
    "symlink-inside": lambda t: _special(t, "link", tarfile.SYMTYPE, "model.safetensors"),
    "hardlink-out": lambda t: _special(t, "hard", tarfile.LNKTYPE, "/etc/passwd"),
    "char-device": lambda t: _special(t, "zero", tarfile.CHRTYPE),
    "block-device": lambda t: _special(t, "disk", tarfile.BLKTYPE),
    "fifo": lambda t: _special(t, "pipe", tarfile.FIFOTYPE),
    "sparse-huge": _sparse,
    "sparse-small": _sparse_small,
    "too-many-members": _too_many,
    "declared-huge": _declared_huge,
    "empty-name": lambda t: _file(t, ""),
}


def _write(tmp_path: Path, writer: TarWriter) -> Path:
    path = tmp_path / "hostile.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        writer(tar)
    return path


def _work(tmp_path: Path) -> tuple[Path, Path]:
    work = tmp_path / "work"
    work.mkdir()
    return work, work / "resume"


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_worker_refuses_hostile_archive_before_writing(tmp_path: Path, kind: str) -> None:
    archive = _write(tmp_path, HOSTILE[kind])
    work, dest = _work(tmp_path)
    with pytest.raises(UnsafeArchive):
        unpack(archive, dest, inside=work)
    assert not any(dest.rglob("*")), "nothing may be extracted from a refused archive"
    assert not (tmp_path / "escape.txt").exists()


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_server_refuses_hostile_archive(tmp_path: Path, kind: str) -> None:
    archive = _write(tmp_path, HOSTILE[kind])
    with pytest.raises(Invalid) as err:
        _check_archive(archive, 10_000_000)
    assert err.value.items[0][0] == "body"


@pytest.mark.parametrize("body", [b"", b"not a tar" * 100, b"\x1f\x8b\x08\x00" + b"\x00" * 600])
def test_non_tar_bodies(tmp_path: Path, body: bytes) -> None:
    archive = tmp_path / "odd.tar"
    archive.write_bytes(body)
    work, dest = _work(tmp_path)
    with pytest.raises(UnsafeArchive):
        unpack(archive, dest, inside=work)
    with pytest.raises(Invalid):
        _check_archive(archive, 10_000_000)


def test_gzip_tar_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "ckpt.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        _file(tar, "model.safetensors", b"w" * 100)
    work, dest = _work(tmp_path)
    with pytest.raises(UnsafeArchive):
        unpack(archive, dest, inside=work)
    with pytest.raises(Invalid):
        _check_archive(archive, 10_000_000)


def test_truncated_archive_is_refused(tmp_path: Path) -> None:
    archive = _write(tmp_path, lambda t: _file(t, "model.safetensors", b"w" * 5000))
    data = archive.read_bytes()
    archive.write_bytes(data[:2048])
    work, dest = _work(tmp_path)
    with pytest.raises(UnsafeArchive):
        unpack(archive, dest, inside=work)
    with pytest.raises(Invalid):
        _check_archive(archive, 10_000_000)


def test_size_caps_per_member_and_total(tmp_path: Path) -> None:
    one_big = _write(tmp_path, lambda t: _file(t, "w", b"x" * 3000))
    work, dest = _work(tmp_path)
    with pytest.raises(UnsafeArchive, match="expands to more than"):
        unpack(one_big, dest, inside=work, max_bytes=2000)
    with pytest.raises(Invalid, match="expands to more than"):
        _check_archive(one_big, 2000)

    def two(t: tarfile.TarFile) -> None:
        _file(t, "a", b"x" * 1500)
        _file(t, "b", b"x" * 1500)

    (tmp_path / "hostile.tar").unlink()
    both = _write(tmp_path, two)
    with pytest.raises(UnsafeArchive, match="expands to more than"):
        unpack(both, dest, inside=work, max_bytes=2000)
    with pytest.raises(Invalid, match="expands to more than"):
        _check_archive(both, 2000)
    assert not any(dest.rglob("*"))


def test_destination_outside_work_dir(tmp_path: Path) -> None:
    archive = _write(tmp_path, lambda t: _file(t, "a"))
    work, _ = _work(tmp_path)
    with pytest.raises(UnsafeArchive, match="outside the work dir"):
        unpack(archive, tmp_path / "elsewhere", inside=work)


def test_pack_unpack_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "ckpt"
    (src / "tokenizer").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(b"\x00" * 4096)
    (src / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    archive = pack(src, tmp_path / "out" / "checkpoint.tar")
    _check_archive(archive, archive.stat().st_size)
    work, dest = _work(tmp_path)
    out = unpack(archive, dest, inside=work)
    assert (out / "model.safetensors").read_bytes() == b"\x00" * 4096
    assert (out / "tokenizer" / "vocab.txt").read_text() == "a\nb\n"
