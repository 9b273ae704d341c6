"""Perplexity of a model at a dtype on a fixed English text that ships with an installed package.

The text is the Apache License 2.0 as shipped in transformers' dist-info (about 11 kB, ~2,400 tokens with
Llama-3's tokenizer): every install of shardllm has it, and it does not change between versions. The text is
cut into windows of `--window` tokens; each window is one prompt whose prompt-token log-probabilities
(`SamplingParams(prompt_logprobs=0)`) give the log-likelihood of every token after the first.

    python benchmarks/accuracy.py --model MODEL --dtypes bf16 fp8 [--kv_cache_dtype fp8] [--tp_size 2]

prints one JSON line per dtype: {"dtype", "tokens", "nll", "ppl"} and, for each dtype after the first, its
perplexity relative to the first one's.

Diagnostics of where FP8's loss comes from (one rank, in-process engine only):
    --weight_only all | qkv_proj o_proj gate_up_proj down_proj ...   those FP8 linears run weight-only (W8A16:
        activations unquantized), naming the loss of activation quantization layer by layer
    --perturb_seeds N   also score with the embedding table x (1 + 1e-6 N(0, 1)), seeds 1..N: a change far below
        any rounding step that re-draws which values round up or down, so the spread of these perplexities is the
        noise floor of an FP8 measurement on this text
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math

from shardllm import LLM, SamplingParams


def reference_text() -> str:
    """Apache-2.0 LICENSE text from transformers' installed metadata."""
    dist = importlib.metadata.distribution("transformers")
    for f in dist.files or []:
        if f.name.upper().startswith("LICENSE"):
            return f.read_text()
    raise RuntimeError("transformers' LICENSE is not in its installed metadata")


def perplexity(llm: LLM, token_ids: list[int], window: int) -> tuple[float, int]:
    """(mean negative log-likelihood per token, tokens scored) of `token_ids` cut into `window`-token prompts."""
    prompts = [token_ids[i:i + window] for i in range(0, len(token_ids), window)]
    prompts = [p for p in prompts if len(p) > 1]
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0), use_tqdm=False)
    nll, n = 0.0, 0
    for prompt, out in zip(prompts, outs):
        for tok, lp in zip(prompt[1:], out.prompt_logprobs[1:]):
            nll -= lp[tok].logprob
            n += 1
    return nll / n, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint / repo id (default: the embedded model)")
    ap.add_argument("--dtypes", nargs="+", default=["auto", "fp8"])
    ap.add_argument("--kv_cache_dtype", default="auto")
    ap.add_argument("--tp_size", type=int, default=1)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--max_tokens", type=int, default=None, help="score only the first N tokens of the text")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--weight_only", nargs="*", default=[], metavar="LAYER",
                    help="FP8 linears whose name ends so (or 'all') run weight-only: activations unquantized")
    ap.add_argument("--perturb_seeds", type=int, default=0, help="extra runs with perturbed embeddings (noise floor)")
    a = ap.parse_args()
    base = None
    for dtype in a.dtypes:
        llm = LLM(a.model, dtype=dtype, tensor_parallel_size=a.tp_size, kv_cache_dtype=a.kv_cache_dtype,
                  device=a.device, max_seq_len=max(a.window, 2) + 1)
        try:
            ids = llm.get_tokenizer().encode(reference_text(), add_special_tokens=False)[: a.max_tokens]
            if a.weight_only:
                set_weight_only(llm, a.weight_only)
            nll, n = perplexity(llm, ids, a.window)
            extra = {"weight_only": a.weight_only} if a.weight_only else {}
            if a.perturb_seeds:
                extra["ppl_perturbed"] = [round(math.exp(perplexity(llm, ids, a.window)[0]), 4)
                                          for _ in perturbed_embeddings(llm, a.perturb_seeds)]
        finally:
            llm.shutdown()
        res = {"model": a.model or "default", "dtype": dtype, "kv_cache_dtype": a.kv_cache_dtype, "tokens": n,
               "nll": round(nll, 5), "ppl": round(math.exp(nll), 4), **extra}
        if base is None:
            base = math.exp(nll)
        else:
            res["ppl_vs_first"] = round(math.exp(nll) / base, 4)
        if "ppl_perturbed" in res:
            res["perturbed_vs_first"] = [round(p / base, 4) for p in res["ppl_perturbed"]]
        print(json.dumps(res), flush=True)


def _model(llm: LLM):
    worker = getattr(llm.engine.executor, "worker", None)
    if worker is None:
        raise SystemExit("--weight_only / --perturb_seeds need the in-process engine (one rank)")
    return worker.model_runner.model


def set_weight_only(llm: LLM, layers: list[str]) -> None:
    """Run the FP8 linears named (suffix match, or 'all') weight-only: W8A16, activations unquantized."""
    for name, m in _model(llm).named_modules():
        method = getattr(m, "quant_method", None)
        if method is not None and hasattr(method, "weight_only"):
            method.weight_only = "all" in layers or name.endswith(tuple(layers))


def perturbed_embeddings(llm: LLM, seeds: int):
    """Yield once per seed 1..seeds with the embedding table x (1 + 1e-6 N(0, 1)); restores it afterwards."""
    import torch

    emb = _model(llm).model.embed_tokens.weight
    original = emb.data.clone()
    try:
        for seed in range(1, seeds + 1):
            g = torch.Generator().manual_seed(seed)
            noise = torch.randn(original.shape, generator=g).to(original.device)
            emb.data.copy_((original.float() * (1 + 1e-6 * noise)).to(original.dtype))
            yield seed
    finally:
        emb.data.copy_(original)


if __name__ == "__main__":
    main()
