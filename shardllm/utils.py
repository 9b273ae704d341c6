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
