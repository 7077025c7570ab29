"""Checkpoint folders as uncompressed tar files: what the lease checkpoint routes carry.

Uncompressed because safetensors weights barely compress and gzip would cost seconds
of CPU per checkpoint on the node that is busy training.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path


class UnsafeArchive(ValueError):
    """A checkpoint archive that tries to write outside its destination or holds odd members."""


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


def unpack(archive: Path, dest: Path, *, inside: Path) -> Path:
    """Extract `archive` into `dest`, which must lie inside `inside` (the trial's work dir).

    The archive comes over the network, so it is untrusted: tarfile's 'data' filter
    refuses absolute names, '..', links that leave `dest`, devices and setuid bits.
    """
    root = inside.resolve()
    target = dest.resolve()
    if not target.is_relative_to(root):
        raise UnsafeArchive(f"refusing to extract outside the work dir: {target} is not inside {root}")
    target.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:") as tar:
            tar.extractall(target, filter="data")
    except tarfile.TarError as exc:  # FilterError is a TarError too
        raise UnsafeArchive(f"bad checkpoint archive {archive.name}: {exc}") from exc
    return target
