"""FP8 checkpoints end to end on CPU: the test writes a tiny synthetic checkpoint in each format (and its
dequantized fp32 twin), loads it, and compares greedy tokens.

Weight-only runs (activations unquantized) must equal the twin token for token: that checks the format's
names, scales, fused parts and tp/pp/ep sharding exactly. W8A8 runs (activations quantized too, what a GPU
serves) must agree with the twin on most tokens: a tiny random model has small logit margins.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from shardllm import LLM, SamplingParams
from shardllm.config import EngineConfig
from shardllm.engine.llm_engine import LLMEngine
from shardllm.layers.quantization.fp8_utils import dequantize, quantize_per_block, quantize_per_row, quantize_per_tensor

PROMPTS = [[1, 17, 33, 5, 9, 101, 7], [3, 4], [250, 14, 88, 19, 201, 6, 6, 6, 42, 71, 300, 12, 9]]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", ".w1.", ".w2.", ".w3.")
W8A8_MIN_AGREEMENT = 0.2
BLOCK = (16, 16)  # tiny layers: parts of 16 rows per rank at tp = 2

FORMATS = {  # name -> (config.json quantization_config or None, hf_quant_config.json or None, strategy, static)
    "hf_block": ({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                  "weight_block_size": list(BLOCK)}, None, "block", False),
    "hf_tensor_static": ({"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]},
                         None, "tensor", True),
    "ct_channel": ("ct", None, "channel", False),
    "ct_tensor_static": ("ct", None, "tensor", True),
    "ct_block": ("ct", None, "block", False),
    "modelopt": (None, {"producer": {"name": "modelopt", "version": "0.19"},
                        "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None,
                                         "exclude_modules": ["lm_head", "*.block_sparse_moe.gate"]}},
                 "tensor", True),
}


def _ct_config(strategy: str, static: bool) -> dict:
    weights = {"type": "float", "num_bits": 8, "strategy": strategy, "symmetric": True, "dynamic": False}
    if strategy == "block":
        weights["block_structure"] = list(BLOCK)
    acts = {"type": "float", "num_bits": 8, "strategy": "tensor" if static else "token", "dynamic": not static}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}}}


def write_fp8_checkpoint(src: str, dst: str, twin: str, fmt: str) -> None:
    """Quantize every linear weight of the checkpoint at `src` into `dst` in format `fmt`; write the
    dequantized weights (what the FP8 model computes with) as an fp32 checkpoint at `twin`."""
    qc, hf_quant, strategy, static = FORMATS[fmt]
    if qc == "ct":
        qc = _ct_config(strategy, static)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    out, deq = {}, {}
    for name, w in tensors.items():
        if not (name.endswith(".weight") and any(p in name for p in LINEAR)):
            out[name] = deq[name] = w
            continue
        base = name[: -len(".weight")]
        if strategy == "block":
            q, s = quantize_per_block(w, BLOCK)
            out[base + (".weight_scale_inv" if fmt == "hf_block" else ".weight_scale")] = s
            deq[name] = dequantize(q, s, BLOCK)
        elif strategy == "channel":
            q, s = quantize_per_row(w)
            out[base + ".weight_scale"] = s  # (N, 1)
            deq[name] = dequantize(q, s)
        else:
            q, s = quantize_per_tensor(w)
            out[base + ".weight_scale"] = s if fmt == "modelopt" else s.reshape(1)  # () and [1] both occur
            deq[name] = dequantize(q, s)
        if static:
            out[base + ".input_scale"] = torch.tensor(6.0 / 448) if fmt == "modelopt" else torch.tensor([6.0 / 448])
        out[name] = q
    for path, ts in ((dst, out), (twin, deq)):
        os.makedirs(path, exist_ok=True)
        save_file({k: v.contiguous() for k, v in ts.items()}, os.path.join(path, "model.safetensors"))
        with open(os.path.join(src, "config.json")) as f:
            cfg = json.load(f)
        if path == dst and qc is not None:
            cfg["quantization_config"] = qc
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfg, f)
    if hf_quant is not None:
        with open(os.path.join(dst, "hf_quant_config.json"), "w") as f:
            json.dump(hf_quant, f)


def greedy(path: str, weight_only: bool = False, **kwargs) -> list[list[int]]:
    cfg = EngineConfig.create(path, device="cpu", num_kv_blocks=100, block_size=4, **kwargs)
    if weight_only:
        qc = dataclasses.replace(cfg.model_config.quantization, weight_only=True)
        cfg = dataclasses.replace(cfg, model_config=dataclasses.replace(cfg.model_config, quantization=qc))
    llm = LLM.__new__(LLM)  # an LLM over a config edited in place (weight_only is not an LLM argument)
    llm.config, llm.engine, llm._next_id = cfg, LLMEngine(cfg), 0
    try:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    finally:
        llm.shutdown()


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions on the common prefix of each prompt's tokens, over all tokens."""
    same = 0
    for x, y in zip(a, b):
        for s, t in zip(x, y):
            if s != t:
                break
            same += 1
    return same / sum(len(x) for x in a)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_checkpoints):
    root = tmp_path_factory.mktemp("fp8")
    made = {}

    def get(arch: str, fmt: str) -> tuple[str, str]:
        if (arch, fmt) not in made:
            dst, twin = str(root / f"{arch}_{fmt}"), str(root / f"{arch}_{fmt}_twin")
            write_fp8_checkpoint(tiny_checkpoints[arch], dst, twin, fmt)
            made[(arch, fmt)] = (dst, twin)
        return made[(arch, fmt)]

    return get


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_equals_its_dequantized_twin(checkpoints, fmt):
    dst, twin = checkpoints("llama", fmt)
    expected = greedy(twin)
    assert greedy(dst, weight_only=True) == expected
    # W8A8 (activations quantized too) on a tiny random model with small logit margins: 0.46-0.67 measured on
    # these prompts; a wrong scale or a misplaced part gives unrelated tokens from the first one (about 0)
    assert agreement(greedy(dst), expected) >= W8A8_MIN_AGREEMENT


@pytest.mark.parametrize("fmt,parallel", [
    ("hf_block", dict(tensor_parallel_size=2)),  # block scales cut at whole blocks
    ("ct_channel", dict(pipeline_parallel_size=2)),
])  # per-tensor scales of fused parts at tp = 2: the Mixtral test below
def test_sharded_layouts_equal_the_twin(checkpoints, fmt, parallel):
    dst, twin = checkpoints("llama", fmt)
    assert greedy(dst, weight_only=True, **parallel) == greedy(twin)


def test_mixtral_experts_at_tp2_ep2_equal_the_twin(checkpoints):
    """ModelOpt per-tensor static scales: per expert and per fused part (q, k, v; gate, up), at tp = 2, ep = 2."""
    dst, twin = checkpoints("mixtral", "modelopt")
    expected = greedy(twin)
    assert greedy(dst, weight_only=True) == expected
    assert greedy(dst, weight_only=True, tensor_parallel_size=2, expert_parallel_size=2) == expected
    block, block_twin = checkpoints("mixtral", "hf_block")  # block-scaled experts, one rank
    assert greedy(block, weight_only=True) == greedy(block_twin)


def test_online_fp8_of_a_bf16_checkpoint(checkpoints):
    """dtype="fp8" on an unquantized checkpoint: weight-only equals the per-channel-rounded twin exactly."""
    dst, twin = checkpoints("qwen3", "ct_channel")  # twin = weights already on the per-channel FP8 grid
    expected = greedy(twin)
    assert greedy(twin, weight_only=True, dtype="fp8") == expected  # re-quantizing grid values is exact
    assert agreement(greedy(twin, quantization="fp8"), expected) >= W8A8_MIN_AGREEMENT  # 0.25 measured


def test_block_checkpoint_refuses_a_tp_that_cuts_blocks(checkpoints, tmp_path):
    dst, _ = checkpoints("llama", "hf_block")
    cfg_path = os.path.join(dst, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["quantization_config"]["weight_block_size"] = [48, 48]  # q has 64 rows: not whole 48-row blocks
    bad = tmp_path / "bad"
    bad.mkdir()
    os.symlink(os.path.join(dst, "model.safetensors"), bad / "model.safetensors")
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.qkv_proj.*tensor_parallel_size"):
        greedy(str(bad))


def test_online_fp8_pipeline_split_equals_one_rank(tiny_checkpoints):
    """Online W8A8: a pipeline split keeps every layer whole, so pp = 2 gives one rank's tokens exactly. (At tp > 1
    each rank quantizes its own slice of a row-parallel weight, per row, as vLLM's online methods do: checked
    per layer in tests/layers/test_fp8.py; tokens of a tiny random model then follow one rank only loosely.)"""
    one_rank = greedy(tiny_checkpoints["llama"], quantization="fp8")
    assert greedy(tiny_checkpoints["llama"], quantization="fp8", pipeline_parallel_size=2) == one_rank
