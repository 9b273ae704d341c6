"""Small helpers shared by the driver and the worker processes."""

from __future__ import annotations

import atexit
import gc


def freeze_startup_objects() -> None:
    """Exclude what start-up built (modules, the model, the tokenizer) from the cyclic garbage collector: a
    full collection would walk them all, a pause of milliseconds between two steps."""
    global _unfreeze_registered
    gc.collect()
    gc.freeze()
    if not _unfreeze_registered:  # at exit, let the last collection free them (extension types check for leaks)
        atexit.register(gc.unfreeze)
        _unfreeze_registered = True


_unfreeze_registered = False


def release_memory() -> None:
    """After an in-process engine shuts down: collect what the start-up freeze kept out of the collector (the
    model, the KV cache, the CUDA graphs hold cycles) and hand CUDA's cached blocks back to the device, so a next
    engine in the same process sizes its KV cache from the whole GPU."""
    gc.unfreeze()
    gc.collect()
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
