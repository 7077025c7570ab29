"""Checkpoint uploads and downloads: uncompressed tars of a trial's checkpoint folder.

Layout: `settings.artifact_dir/<study id>/<trial number>/attempt-<n>/checkpoint.tar`,
one file per attempt (a newer upload of the same attempt replaces it). The upload is
streamed to a temporary file beside it, checked, recorded on the trial row, and only
after that commit renamed into place: a reader never sees half an archive, and an
upload the database refused leaves the previous archive and step as they were. With
several API processes, `artifact_dir` must be storage they share (a volume, NFS).

The archive is never extracted here; it is checked with the worker's own check
(`trainer.worker.archive.check_members`): at most MAX_MEMBERS regular files and
folders with relative names that stay inside the archive, no links, devices or sparse
files, and an expanded size within max_checkpoint_bytes.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.errors import Forbidden, Invalid, LeaseLost, NotFound
from service.models import Lease, LeaseState, Trial, TrialState
from service.scheduler._sql import aware, guarded_update, utcnow
from trainer.worker.archive import UnsafeArchive, check_members

if TYPE_CHECKING:
    from service.auth import Principal
    from service.scheduler.leases import Scheduler

log = logging.getLogger(__name__)

ARCHIVE_NAME = "checkpoint.tar"
_ATTEMPT_DIR = re.compile(r"^attempt-(\d+)$")


class CheckpointTooLarge(Invalid):
    """More bytes than settings.max_checkpoint_bytes (the body-size middleware answers 413 first)."""


@dataclass(frozen=True)
class StoredCheckpoint:
    path: Path
    step: int | None
    size: int


class Upload:
    """One checkpoint upload in progress: `write` chunks, then `commit` or `abort`."""

    def __init__(self, store: CheckpointStore, lease_id: str, trial_id: int, attempt: int, folder: Path, step: int):
        self._store = store
        self.lease_id = lease_id
        self.trial_id = trial_id
        self.attempt = attempt
        self.folder = folder
        self.step = step
        self.size = 0
        folder.mkdir(parents=True, exist_ok=True)
        self.tmp = folder / f".{ARCHIVE_NAME}.{uuid.uuid4().hex}.part"
        self._file = self.tmp.open("wb")
        self._done = False

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        limit = self._store.max_bytes
        if self.size > limit:
            raise CheckpointTooLarge("body", f"checkpoint larger than {limit} bytes (settings.max_checkpoint_bytes)")
        self._file.write(chunk)

    def commit(self) -> StoredCheckpoint:
        """Check the archive, move it into place and record it on the trial, if the lease
        still holds the trial (else LeaseLost, and the file is dropped)."""
        self._file.close()
        if self.size == 0:
            raise Invalid("body", "empty checkpoint archive")
        _check_archive(self.tmp, self._store.max_bytes)
        dest = self.folder / ARCHIVE_NAME
        rel = dest.relative_to(self._store.root).as_posix()
        sched = self._store.sched
        step_tmp = _step_file(self.tmp)
        step_tmp.write_text(str(self.step), encoding="ascii")

        def _record(s: Session) -> None:
            now = utcnow()
            lease = s.get(Lease, self.lease_id, populate_existing=True)
            if lease is None or not _may_upload(s, lease, now):
                raise LeaseLost("lease expired or finished; the checkpoint is not kept")
            guarded_update(
                s,
                Trial,
                [Trial.id == lease.trial_id, Trial.attempts == lease.attempt],
                {"checkpoint_path": rel, "checkpoint_step": self.step},
            )

        sched.db.run(_record)
        # Only now that the row says so: a refused or failed commit (abort drops both
        # temporary files) must leave the old archive and its step in place. Each rename
        # stays within one folder, so it is atomic.
        os.replace(self.tmp, dest)
        os.replace(step_tmp, _step_file(dest))
        self._done = True
        return StoredCheckpoint(dest, self.step, self.size)

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._file.close()
        self.tmp.unlink(missing_ok=True)
        _step_file(self.tmp).unlink(missing_ok=True)


def _may_upload(s: Session, lease: Lease, now: object) -> bool:
    """The holder may upload while its lease is live, and its final checkpoint after completing."""
    expires = aware(lease.expires_at)
    if lease.state == LeaseState.ACTIVE:
        return expires is not None and expires > now  # type: ignore[operator]
    if lease.state == LeaseState.FINISHED and lease.stop_reason == "complete":
        trial = s.get(Trial, lease.trial_id)
        return trial is not None and trial.state == TrialState.COMPLETE and trial.attempts == lease.attempt
    return False


def _holder_only(lease: Lease | None, lease_id: str, principal: Principal | None) -> None:
    """Like `Scheduler.check_holder`, on a row already read: checkpoints hold a trial's
    weights, so only the token that took the lease reads or replaces them."""
    if lease is None or principal is None or lease.token_id is None:
        return
    if lease.token_id != principal.token_id:
        raise Forbidden(f"lease {lease_id} was granted to another token; only its holder may use it", field="lease_id")


def _check_archive(path: Path, max_bytes: int) -> None:
    try:
        with tarfile.open(path, "r:") as tar:
            check_members(tar, max_bytes=max_bytes, data_end=path.stat().st_size)
    except UnsafeArchive as exc:
        raise Invalid("body", str(exc)) from None
    except tarfile.TarError as exc:
        raise Invalid("body", f"not an uncompressed tar archive: {exc}") from None


class CheckpointStore:
    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched

    @property
    def root(self) -> Path:
        return self.sched.settings.artifact_dir.resolve()

    @property
    def max_bytes(self) -> int:
        return self.sched.settings.max_checkpoint_bytes

    def _trial_dir(self, study_id: int, number: int) -> Path:
        return self.root / str(study_id) / str(number)

    def begin_upload(self, lease_id: str, step: int, principal: Principal | None = None) -> Upload:
        """Start an upload for a live lease (LeaseLost otherwise) held by `principal`'s token."""
        with self.sched.db.scope() as s:
            lease = s.get(Lease, lease_id)
            _holder_only(lease, lease_id, principal)
            if lease is None or not _may_upload(s, lease, utcnow()):
                raise LeaseLost("lease expired, finished or unknown: no checkpoint accepted")
            number = s.scalar(select(Trial.number).where(Trial.id == lease.trial_id))
            study_id, trial_id, attempt = lease.study_id, lease.trial_id, lease.attempt
        folder = self._trial_dir(study_id, int(number)) / f"attempt-{attempt}"  # type: ignore[arg-type]
        return Upload(self, lease_id, trial_id, attempt, folder, step)

    def for_lease(self, lease_id: str, principal: Principal | None = None) -> StoredCheckpoint:
        """The last checkpoint of the trial's earlier attempts, for a retry to resume from."""
        with self.sched.db.scope() as s:
            lease = s.get(Lease, lease_id)
            _holder_only(lease, lease_id, principal)
            if lease is None or lease.state != LeaseState.ACTIVE or aware(lease.expires_at) <= utcnow():  # type: ignore[operator]
                raise LeaseLost("lease expired, finished or unknown")
            trial = s.get(Trial, lease.trial_id)
            assert trial is not None
            folder = self._trial_dir(lease.study_id, trial.number)
            attempt = lease.attempt
        found = self._latest(folder, below=attempt)
        if found is None:
            raise NotFound("no checkpoint from an earlier attempt of this trial")
        return StoredCheckpoint(found, _read_step(found), found.stat().st_size)

    def for_trial(self, principal: Principal, study_id: int, number: int) -> StoredCheckpoint:
        """The trial's last checkpoint (the final one of a complete trial); owner or admin only."""
        from service.studies import visible_study

        with self.sched.db.scope() as s:
            visible_study(s, principal, study_id)
            trial = s.scalars(select(Trial).where(Trial.study_id == study_id, Trial.number == number)).first()
            if trial is None:
                raise NotFound(f"study {study_id} has no trial number {number}", field="number")
            recorded, step = trial.checkpoint_path, trial.checkpoint_step
        if recorded is None or not (self.root / recorded).is_file():
            raise NotFound(f"trial {number} has no checkpoint")
        path = self.root / recorded
        return StoredCheckpoint(path, _read_step(path) if step is None else step, path.stat().st_size)

    @staticmethod
    def _latest(folder: Path, *, below: int) -> Path | None:
        best: tuple[int, Path] | None = None
        if not folder.is_dir():
            return None
        for child in folder.iterdir():
            match = _ATTEMPT_DIR.match(child.name)
            archive = child / ARCHIVE_NAME
            if match and int(match.group(1)) < below and archive.is_file():
                n = int(match.group(1))
                if best is None or n > best[0]:
                    best = (n, archive)
        return None if best is None else best[1]


def _step_file(archive: Path) -> Path:
    # Beside the archive, so an earlier attempt's checkpoint keeps its step after the
    # trial row moved on to a newer attempt's.
    return archive.with_name(archive.name + ".step")


def _read_step(archive: Path) -> int | None:
    try:
        return int(_step_file(archive).read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None
