"""Checkpoint folders as uncompressed tar files: what the lease checkpoint routes carry.

Uncompressed because safetensors weights barely compress and gzip would cost seconds
of CPU per checkpoint on the node that is busy training.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path, PurePosixPath

# A checkpoint folder holds a few dozen files (weights, optimizer, tokenizer, state);
# thousands of members can only be an attempt to exhaust inodes or memory.
MAX_MEMBERS = 1_000


class UnsafeArchive(ValueError):
    """A checkpoint archive that tries to write outside its destination or holds odd members."""


def check_members(
    tar: tarfile.TarFile, *, max_bytes: int, data_end: int, max_members: int = MAX_MEMBERS
) -> list[tarfile.TarInfo]:
    """Every member of `tar`, read header by header (never the data) and refused with
    UnsafeArchive before anything is written: more than `max_members` members, a name that
    is absolute or climbs out with '..', anything but regular files and folders (links,
    devices, FIFOs, sparse files), a member or a total whose real size is over `max_bytes`,
    or a member whose data runs past `data_end` (a truncated archive).

    Shared by the service's check of an upload and the worker's extraction, so both
    sides refuse the same archives. `member.size` is the expanded size, also for sparse
    members, but those are refused outright: `pack` never writes one, and a sparse
    member is the cheap way to declare terabytes in a few bytes.
    """
    members: list[tarfile.TarInfo] = []
    total = 0
    try:
        for member in tar:
            if len(members) >= max_members:
                raise UnsafeArchive(f"checkpoint archive has more than {max_members} members")
            name = PurePosixPath(member.name)
            if not member.name or name.is_absolute() or ".." in name.parts:
                raise UnsafeArchive(f"unsafe name in checkpoint archive: {member.name!r}")
            if member.issparse() or not (member.isfile() or member.isdir()):
                raise UnsafeArchive(f"checkpoint archive may hold only files and folders: {member.name!r}")
            if member.size > max_bytes or total + member.size > max_bytes:
                raise UnsafeArchive(f"checkpoint archive expands to more than {max_bytes} bytes")
            total += member.size
            if member.isfile() and member.offset_data + member.size > data_end:
                raise UnsafeArchive(f"checkpoint archive is truncated in {member.name!r}")
            members.append(member)
    except (tarfile.TarError, EOFError, ValueError) as exc:
        # ValueError: malformed numbers in GNU/PAX extension headers escape tarfile's own checks.
        if isinstance(exc, UnsafeArchive):
            raise
        raise UnsafeArchive(f"not an uncompressed tar archive: {exc}") from None
    return members


def pack(folder: Path, dest: Path) -> Path:
    """Write `folder`'s files into the tar `dest`, names relative to `folder`.

    Written to a temporary name and renamed, so a reader never sees half a file.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
    os.replace(tmp, dest)
    return dest


def unpack(archive: Path, dest: Path, *, inside: Path, max_bytes: int | None = None) -> Path:
    """Extract `archive` into `dest`, which must lie inside `inside` (the trial's work dir).

    The archive comes over the network, so it is untrusted: `check_members` refuses it
    whole before anything is written (extracted size capped at `max_bytes`, by default
    the archive's own size, which a tar of plain files can never exceed), and tarfile's
    'data' filter stays on as a second guard (links leaving `dest`, setuid bits).
    """
    root = inside.resolve()
    target = dest.resolve()
    if not target.is_relative_to(root):
        raise UnsafeArchive(f"refusing to extract outside the work dir: {target} is not inside {root}")
    target.mkdir(parents=True, exist_ok=True)
    size = archive.stat().st_size
    try:
        with tarfile.open(archive, "r:") as tar:
            members = check_members(tar, max_bytes=size if max_bytes is None else max_bytes, data_end=size)
            tar.extractall(target, members=members, filter="data")
    except tarfile.TarError as exc:  # FilterError is a TarError too
        raise UnsafeArchive(f"bad checkpoint archive {archive.name}: {exc}") from exc
    return target
