"""What a slot process pays for once, before its first trial, so later trials start at once."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("tuneforge.worker.slot")


def prepare(*, gpu: bool, threads: int | None = None, quiet: bool = False) -> None:
    """Import the training stack and create the CUDA context now rather than in the first trial."""
    # Nothing is fetched from a model hub at run time (DESIGN.md); set before transformers loads.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    import transformers

    # transformers imports its model classes lazily, on first use: seconds inside the
    # first trial otherwise. The auto classes and BERT (MiniLM's family) cover the common case.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401
    from transformers.models.bert import modeling_bert  # noqa: F401

    import trainer.boundary  # noqa: F401
    import trainer.loop  # noqa: F401
    from trainer.modeling.build import keep_tokenizers_warm

    # Trials on a slot mostly share a model: its tokenizer is loaded and hashed once.
    keep_tokenizers_warm()

    # Progress bars from every slot would interleave in the agent's log.
    transformers.utils.logging.disable_progress_bar()
    if quiet:
        # A quiet slot (under `tuneforge up`'s live view) keeps transformers to errors:
        # its per-load report (a fresh classifier head is "MISSING") is expected when fine-tuning.
        transformers.utils.logging.set_verbosity_error()
    if threads is not None:
        # CPU slots share the machine's cores; without this each one starts a thread per
        # core and they thrash each other.
        torch.set_num_threads(threads)
    if gpu and torch.cuda.is_available():
        # The first CUDA call creates the context (hundreds of MB, about a second); do it
        # while no trial waits for it.
        torch.zeros(1, device="cuda")
        log.info("CUDA ready on %s", torch.cuda.get_device_name(0))
