"""Load time of a GGUF model (default: the embedded SmolLM2-135M-Instruct Q4_1), by phase, in a fresh process.

    python benchmarks/gguf_load_time.py [--model PATH.gguf]

Prints wall and CPU seconds of: config (resolve_model), tokenizer, weights (load_model, CPU, fp32, one rank).
CPU seconds are the steadier figure on a shared machine. Uses only APIs that predate issue 18, so the same
file measures an older checkout too (PYTHONPATH=<checkout> python benchmarks/gguf_load_time.py).
"""

import argparse
import time

import torch

from shardllm.config import ModelConfig
from shardllm.engine.detokenizer import load_tokenizer
from shardllm.model_loader.loader import load_model
from shardllm.model_loader.resolve import resolve_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="a .gguf file (default: the embedded model)")
    args = ap.parse_args()

    marks = [(time.perf_counter(), time.process_time())]
    resolved = resolve_model(args.model)
    marks.append((time.perf_counter(), time.process_time()))
    load_tokenizer(resolved.tokenizer_path)
    marks.append((time.perf_counter(), time.process_time()))
    mc = ModelConfig(resolved.name, resolved.hf_config, torch.float32, resolved.load_format, resolved.path,
                     resolved.tokenizer_path, max_model_len=2048)
    load_model(mc, torch.device("cpu"), show_progress=False)
    marks.append((time.perf_counter(), time.process_time()))
    parts = [f"{name} {b[0] - a[0]:.2f} s (cpu {b[1] - a[1]:.2f} s)"
             for name, a, b in zip(["config", "tokenizer", "weights"], marks, marks[1:])]
    total = f"total {marks[-1][0] - marks[0][0]:.2f} s (cpu {marks[-1][1] - marks[0][1]:.2f} s)"
    print("  ".join([*parts, total]))


if __name__ == "__main__":
    main()
