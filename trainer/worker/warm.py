"""What a slot process pays for once, before its first trial, so later trials start at once."""

from __future__ import annotations

import logging

log = logging.getLogger("tuneforge.worker.slot")


def prepare(*, gpu: bool, threads: int | None = None) -> None:
    """Import the training stack and create the CUDA context now rather than in the first trial."""
    import torch
    import transformers  # noqa: F401  (the import itself is the point: seconds, paid once)

    import trainer.boundary  # noqa: F401
    import trainer.loop  # noqa: F401

    if threads is not None:
        # CPU slots share the machine's cores; without this each one starts a thread per
        # core and they thrash each other.
        torch.set_num_threads(threads)
    if gpu and torch.cuda.is_available():
        # The first CUDA call creates the context (hundreds of MB, about a second); do it
        # while no trial waits for it.
        torch.zeros(1, device="cuda")
        log.info("CUDA ready on %s", torch.cuda.get_device_name(0))
