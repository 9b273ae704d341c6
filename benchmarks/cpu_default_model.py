"""Offline generation of the embedded default model on CPU: shardllm beside transformers `generate`,
same weights (the GGUF file, dequantized), same prompts, same run.

    python benchmarks/cpu_default_model.py --batch 32 --output_len 64
"""

from __future__ import annotations

import argparse
import json
import time

import torch

TOPICS = ["the ocean", "prime numbers", "a lighthouse keeper", "bread baking", "the moon landing", "volcanoes",
          "chess openings", "honeybees", "the printing press", "black holes", "a rainy city", "origami",
          "jazz music", "desert plants", "the Roman roads", "glaciers"]


def prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        msg = [{"role": "user", "content": f"Write a short paragraph about {TOPICS[i % len(TOPICS)]}."}]
        ids = tokenizer.apply_chat_template(msg, add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--output_len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from shardllm import LLM, SamplingParams

    llm = LLM(device="cpu", dtype="float32")
    ids = prompts(llm.get_tokenizer(), args.batch)
    sp = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    llm.generate(ids[:2], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)  # warm-up
    t = time.perf_counter()
    outs = llm.generate(ids, sp, use_tqdm=False)
    ours_s = time.perf_counter() - t
    ours_tokens = sum(len(o.outputs[0].token_ids) for o in outs)

    hf, pad = transformers_model(llm)
    width = max(len(p) for p in ids)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in ids])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    with torch.no_grad():
        hf.generate(input_ids[:2], attention_mask=mask[:2], max_new_tokens=4, do_sample=False, pad_token_id=pad)
        t = time.perf_counter()
        gen = hf.generate(input_ids, attention_mask=mask, max_new_tokens=args.output_len,
                          min_new_tokens=args.output_len, do_sample=False, pad_token_id=pad)
        hf_s = time.perf_counter() - t
    hf_tokens = (gen.shape[1] - width) * len(ids)
    same = sum(o.outputs[0].token_ids == gen[i, width:].tolist() for i, o in enumerate(outs))
    res = {"batch": args.batch, "output_len": args.output_len, "threads": torch.get_num_threads(),
           "shardllm_tok_s": ours_tokens / ours_s, "transformers_tok_s": hf_tokens / hf_s,
           "ratio": (ours_tokens / ours_s) / (hf_tokens / hf_s), "identical_greedy_outputs": f"{same}/{len(ids)}"}
    print(json.dumps(res) if args.json else "\n".join(f"{k:>26}: {v:.2f}" if isinstance(v, float)
                                                        else f"{k:>26}: {v}" for k, v in res.items()))


def transformers_model(llm):
    """A transformers LlamaForCausalLM holding the same dequantized weights as our engine."""
    import transformers

    from shardllm.model_loader.gguf import GGUFFile, iter_hf_weights

    mc = llm.config.model_config
    model = transformers.LlamaForCausalLM(mc.hf_config).float().eval()
    state = dict(iter_hf_weights(GGUFFile(mc.path)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    model.tie_weights()
    pad = llm.get_tokenizer().pad_token_id
    return model, pad if pad is not None else 0


if __name__ == "__main__":
    main()
