"""The peer: Hugging Face transformers `generate` on the same dummy config, same card, same run.

    python benchmarks/peer_transformers.py --model llama-3-8b --batch_sizes 1 64 --input_len 128 --output_len 128
    ... --compile      # also the static cache, which generate compiles itself (slow to compile)

Prints one JSON line per setting: output tok/s of greedy generation with exactly output_len new tokens.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--input_len", type=int, default=128)
    ap.add_argument("--output_len", type=int, default=128)
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()
    import transformers

    from shardllm.model_loader.resolve import load_shipped_config, shipped_config_name

    config = load_shipped_config(shipped_config_name(a.model))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    modes = [("eager", {})]
    if a.compile:  # transformers' own recipe: a static cache makes generate compile the decode forward itself
        # (CompileConfig's defaults: inductor, mode reduce-overhead, i.e. CUDA graphs); no manual torch.compile
        modes.append(("static+compile", {"cache_implementation": "static",
                                         "compile_config": transformers.CompileConfig()}))
    for mode, extra in modes:
        for bs in a.batch_sizes:
            ids = torch.randint(100, config.vocab_size - 100, (bs, a.input_len), device="cuda")
            kw = dict(max_new_tokens=a.output_len, min_new_tokens=a.output_len, do_sample=False, pad_token_id=0,
                      **extra)
            with torch.no_grad():
                model.generate(ids, **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up / compile
                if mode != "eager":
                    model.generate(ids, **kw)
                torch.cuda.synchronize()
                t = time.perf_counter()
                out = model.generate(ids, **kw)
                torch.cuda.synchronize()
                dt = time.perf_counter() - t
            new = (out.shape[1] - a.input_len) * bs
            print(json.dumps({"peer": f"transformers {transformers.__version__} {mode}", "model": a.model,
                              "batch_size": bs, "input_len": a.input_len, "output_len": a.output_len,
                              "output_tok_s": round(new / dt, 1), "ms_per_step": round(dt / a.output_len * 1e3, 2),
                              "compiled": hasattr(model, "_compiled_call")}),
                  flush=True)


if __name__ == "__main__":
    main()
