"""Small helpers shared by the driver and the worker processes."""

from __future__ import annotations

import atexit
import gc
import os
import sys


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


def print_output(text: str, end: str = "\n") -> None:
    """Write a command's output to stdout. A reader that stopped early (`shardllm plan --json | head -1`) ends it
    quietly instead of with a BrokenPipeError traceback: stdout then points at /dev/null, so that the interpreter's
    last flush at exit is quiet too."""
    try:
        sys.stdout.write(text + end)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def release_memory() -> None:
    """After an in-process engine shuts down: collect what the start-up freeze kept out of the collector (the
    model, the KV cache, the CUDA graphs hold cycles) and hand CUDA's cached blocks back to the device, so a next
    engine in the same process sizes its KV cache from the whole GPU."""
    gc.unfreeze()
    gc.collect()
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
