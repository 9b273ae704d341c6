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
    --kl   also the mean KL divergence (nats per scored token) of each dtype's next-token distributions from the
        first dtype's, and how often their top tokens agree: a lower-noise measure of fidelity than perplexity
    --weight_redraws N   (first dtype unquantized, then online fp8) also score with the FP8 weights re-quantized from
        the first model's weights with per-channel scales amax * 2^u / 448, u ~ U[0, 1) per channel, seeds 1..N:
        the same expected rounding error, other roundings, so their spread is how much the figure owes to one draw
    --weight_scale_search N   (same condition) also score with each channel's scale the one of amax * 2^(i/N) / 448,
        i < N, whose round trip has the least squared error (an MSE observer over the scale's offset on e4m3's grid)

Every line after the first also gives "ppl_vs_first_se": the standard error of that ratio from the per-token
log-likelihood differences (the same tokens in both runs; neighbouring tokens are treated as independent).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.metadata
import json
import math
from typing import Any

import torch

from shardllm import LLM, SamplingParams
from shardllm.layers.quantization.fp8 import Fp8LinearMethod
from shardllm.layers.quantization.fp8_utils import FP8_MAX, MIN_SCALE, dequantize, quantize_with_scale


def reference_text() -> str:
    """Apache-2.0 LICENSE text from transformers' installed metadata."""
    dist = importlib.metadata.distribution("transformers")
    for f in dist.files or []:
        if f.name.upper().startswith("LICENSE"):
            return f.read_text()
    raise RuntimeError("transformers' LICENSE is not in its installed metadata")


def token_nlls(llm: LLM, token_ids: list[int], window: int) -> list[float]:
    """Negative log-likelihood (nats) of every token of `token_ids` after the first of each `window`-token prompt."""
    prompts = [token_ids[i:i + window] for i in range(0, len(token_ids), window)]
    prompts = [p for p in prompts if len(p) > 1]
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0), use_tqdm=False)
    return [-lp[tok].logprob for prompt, out in zip(prompts, outs)
            for tok, lp in zip(prompt[1:], out.prompt_logprobs[1:])]


def perplexity(llm: LLM, token_ids: list[int], window: int) -> tuple[float, int]:
    """(mean negative log-likelihood per token, tokens scored) of `token_ids` cut into `window`-token prompts."""
    nlls = token_nlls(llm, token_ids, window)
    return sum(nlls) / len(nlls), len(nlls)


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
    ap.add_argument("--kl", action="store_true", help="also KL divergence and top-1 agreement with the first dtype")
    ap.add_argument("--weight_redraws", type=int, default=0, help="extra runs with FP8 weights re-rounded (seeds 1..N)")
    ap.add_argument("--weight_scale_search", type=int, default=0, metavar="N",
                    help="an extra run with per-channel scales of least squared error among N offsets")
    a = ap.parse_args()
    requant = a.weight_redraws or a.weight_scale_search
    first = None  # the first dtype's Score
    for dtype in a.dtypes:
        llm = LLM(a.model, dtype=dtype, tensor_parallel_size=a.tp_size, kv_cache_dtype=a.kv_cache_dtype,
                  device=a.device, max_seq_len=max(a.window, 2) + 1)
        try:
            ids = llm.get_tokenizer().encode(reference_text(), add_special_tokens=False)[: a.max_tokens]
            if a.weight_only:
                set_weight_only(llm, a.weight_only)
            sc = score(llm, ids, a.window, a.kl)
            res = {"model": a.model or "default", "dtype": dtype, "kv_cache_dtype": a.kv_cache_dtype,
                   "tokens": len(sc.nlls), "nll": round(sc.nll, 5), "ppl": round(math.exp(sc.nll), 4)}
            if a.weight_only:
                res["weight_only"] = a.weight_only
            if first is not None:
                res.update(compare(first, sc))
            if a.perturb_seeds:
                res["ppl_perturbed"] = [round(math.exp(score(llm, ids, a.window, False).nll), 4)
                                        for _ in perturbed_embeddings(llm, a.perturb_seeds)]
                if first is not None:
                    res["perturbed_vs_first"] = [round(p / math.exp(first.nll), 4) for p in res["ppl_perturbed"]]
            if requant and first is None:
                sc.weights = float_weights(llm)
            elif requant and online_fp8_linears(llm):  # dtypes without online FP8 weights: nothing to re-draw
                runs = {f"redraw_{i}": functools.partial(redrawn_scales, generator=torch.Generator().manual_seed(i))
                        for i in range(1, a.weight_redraws + 1)}  # one generator per draw: layers draw apart
                if a.weight_scale_search:
                    runs["mse_scales"] = lambda w: mse_scales(w, a.weight_scale_search)
                for name, scale_fn in runs.items():
                    res[name] = {"weight_rms_rel_err": round(requantize(llm, first.weights, scale_fn), 5),
                                 **compare(first, score(llm, ids, a.window, a.kl))}
        finally:
            llm.shutdown()
        if first is None:
            first = sc
        print(json.dumps(res), flush=True)


@dataclasses.dataclass
class Score:
    nlls: list[float]  # per scored token, nats
    logprobs: Any = None  # (tokens, V) fp32 CPU tensor of the next-token log-probabilities (--kl), else None
    weights: dict | None = None  # name -> fp32 CPU weight of every linear (--weight_redraws, first dtype only)

    @property
    def nll(self) -> float:
        return sum(self.nlls) / len(self.nlls)


def score(llm: LLM, ids: list[int], window: int, with_logprobs: bool) -> Score:
    """Per-token NLLs of `ids` in `window`-token prompts, with the full next-token log-probabilities if asked."""
    if not with_logprobs:
        return Score(token_nlls(llm, ids, window))
    with prompt_distributions(llm) as rows:
        nlls = token_nlls(llm, ids, window)
    lp = torch.cat(rows)  # (tokens, V)
    # the captured rows are the scored tokens in order: their targets' log-probabilities are the engine's
    tgt = torch.tensor([t for i in range(0, len(ids), window) for t in ids[i + 1:i + window]])
    if lp.shape[0] != len(nlls) or (lp.gather(1, tgt[:, None])[:, 0] + torch.tensor(nlls)).abs().max() > 1e-3:
        raise RuntimeError("captured next-token distributions do not line up with the scored tokens")
    return Score(nlls, lp)


def compare(first: Score, other: Score) -> dict:
    """Perplexity ratio with its standard error, and (both with log-probs) KL(first || other) and top-1 agreement."""
    d = [b - a for a, b in zip(first.nlls, other.nlls)]
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    ratio = math.exp(mean)
    out = {"ppl_vs_first": round(ratio, 4), "ppl_vs_first_se": round(ratio * sd / math.sqrt(len(d)), 4)}
    if first.logprobs is not None and other.logprobs is not None:
        p, q = first.logprobs, other.logprobs
        out["kl_vs_first"] = round(float((p.exp() * (p - q)).sum(-1).mean()), 5)  # nats per token
        out["top1_vs_first"] = round(float((p.argmax(-1) == q.argmax(-1)).float().mean()), 4)
    return out


@contextlib.contextmanager
def prompt_distributions(llm: LLM):
    """Collects the full (rows, V) log-softmax of every logits call made for prompt logprobs while inside (one rank,
    in-process engine): the runner's prompt-logprob function is wrapped to mark its calls of compute_logits."""
    import shardllm.worker.model_runner as mr

    model, rows, inside = _model(llm), [], [False]
    orig_prompt, orig_logits = mr.compute_prompt_logprobs, model.compute_logits

    def prompt_fn(*args, **kwargs):
        inside[0] = True
        try:
            return orig_prompt(*args, **kwargs)
        finally:
            inside[0] = False

    def logits_fn(hidden):
        out = orig_logits(hidden)
        if inside[0]:
            rows.append(torch.log_softmax(out.float(), dim=-1).cpu())
        return out

    mr.compute_prompt_logprobs, model.compute_logits = prompt_fn, logits_fn
    try:
        yield rows
    finally:
        mr.compute_prompt_logprobs = orig_prompt
        del model.compute_logits  # the instance attribute; the class's method shows again


def float_weights(llm: LLM) -> dict:
    """name -> fp32 CPU copy of every unquantized linear weight (the source that --weight_redraws re-quantizes)."""
    out = {n: m.weight.detach().float().cpu() for n, m in _model(llm).named_modules()
           if getattr(m, "quant_method", None) is not None and m.weight.dtype.is_floating_point
           and m.weight.element_size() > 1}
    if not out:
        raise SystemExit("--weight_redraws / --weight_scale_search need an unquantized first dtype (float32, bf16)")
    return out


def redrawn_scales(w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(N, 1) scales amax * 2^u / 448, u ~ U[0, 1) per row (a CPU `generator`): no clipping, e4m3's grid at a random
    offset, so the same expected rounding error as amax / 448 with other roundings."""
    u = torch.rand(w.shape[0], 1, generator=generator).to(w.device)
    return _offset_scales(w, u)


def mse_scales(w, n: int):
    """(N, 1) scales: per row the one of amax * 2^(i/n) / 448, i < n, with the least squared round-trip error."""
    best_err = best = None
    for i in range(n):
        s = _offset_scales(w, i / n)
        err = ((dequantize(quantize_with_scale(w, s), s) - w) ** 2).sum(-1, keepdim=True)
        if best is None:
            best_err, best = err, s
        else:
            better = err < best_err
            best_err, best = best_err.where(~better, err), best.where(~better, s)
    return best


def _offset_scales(w, u):
    return (w.abs().amax(-1, keepdim=True).float() * 2 ** u / FP8_MAX).clamp(min=MIN_SCALE)


def requantize(llm: LLM, weights: dict, scale_fn) -> float:
    """Re-quantize every online FP8 linear from `weights` with scales `scale_fn(w)` (N, 1); returns the relative RMS
    round-trip error over all of them."""
    num = den = 0.0
    for name, m in online_fp8_linears(llm):
        w = weights[name].to(m.weight.device)
        s = scale_fn(w)
        q = quantize_with_scale(w, s)
        m.weight.data.copy_(q)
        m.weight_scale.data.copy_(s.view(-1))
        m.__dict__.pop("_fp8_w_f32", None)  # the CPU path's fp32 copy of the old weight
        num += float(((dequantize(q, s) - w) ** 2).sum())
        den += float((w ** 2).sum())
    return math.sqrt(num / den)


def online_fp8_linears(llm: LLM) -> list:
    """(name, module) of the linears quantized to FP8 as they loaded (not those of an FP8 checkpoint)."""
    return [(n, m) for n, m in _model(llm).named_modules()
            if isinstance(getattr(m, "quant_method", None), Fp8LinearMethod)
            and not m.quant_method.cfg.is_checkpoint_fp8]


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
