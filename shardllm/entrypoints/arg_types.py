"""argparse types and hints shared by the CLI's commands (`shardllm serve | generate | plan | bench | deploy`): float
flags refuse nan and inf with the flag's name, and values out of range (argparse's usage error, exit status 2);
vLLM flag names that shardllm does not take get a usage error naming the setting to use."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

# vLLM's settings that shardllm does not take: (what it is, the setting to use, what that is); LLM() gives the same
# hint for its keyword (llm.py).
VLLM_HINTS = {
    "gpu_memory_utilization": ("vLLM's share of the whole GPU, which shardllm does not take",
                               "kv_cache_free_gpu_memory_fraction", "the share of the memory left after the model and "
                               "activations that goes to the KV cache (default 0.9)"),
}


def _names(*names: str) -> list[str]:
    """Each --snake_case flag also answers to --kebab-case."""
    out = []
    for n in names:
        out.append(n)
        if n.startswith("--") and "_" in n and n.replace("_", "-") not in names:
            out.append(n.replace("_", "-"))
    return out


def _number(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {v!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {v!r}")
    return x


def finite_float(v: str) -> float:
    """A finite number."""
    return _number(v)


def positive_float(v: str) -> float:
    """A finite number > 0."""
    x = _number(v)
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {v}")
    return x


def non_negative_float(v: str) -> float:
    """A finite number >= 0."""
    x = _number(v)
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {v}")
    return x


def fraction(v: str) -> float:
    """A share in (0, 1]."""
    x = _number(v)
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {v}")
    return x


def int_at_least(least: int) -> Callable[[str], int]:
    """argparse type: an integer >= `least`."""
    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {v!r}") from None
        if n < least:
            raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {n}")
        return n
    return parse


def _layer_counts(v: str) -> list[int]:
    try:
        return [int(x) for x in v.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer counts separated by commas, e.g. 40,40, got {v!r}") \
            from None


def vllm_hint(name: str, prefix: str = "--") -> str:
    """What to use instead of vLLM's setting `name` (a key of VLLM_HINTS), as flags (prefix "--") or keys ("")."""
    what, use, why = VLLM_HINTS[name]
    return f"{prefix}{name} is {what}: use {prefix}{use}, {why}"


class _VllmHint(argparse.Action):
    """A vLLM flag that shardllm does not take: a usage error naming the flag to use instead (VLLM_HINTS)."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(vllm_hint(self.dest))


def add_vllm_hints(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Hidden flags for vLLM's names that have no shardllm flag: each is a usage error with the fix, not argparse's
    bare "unrecognized arguments"."""
    for name in VLLM_HINTS:
        p.add_argument(*_names(f"--{name}"), dest=name, nargs="?", action=_VllmHint, default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)
