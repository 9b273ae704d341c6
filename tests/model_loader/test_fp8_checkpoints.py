"""FP8 checkpoints end to end on CPU: the test writes a tiny synthetic checkpoint in each format (and its
dequantized fp32 twin), loads it, and compares greedy tokens.

Weight-only runs (activations unquantized) must equal the twin token for token: that checks the format's
names, scales, fused parts and tp/pp/ep sharding exactly. W8A8 runs (activations quantized too, what a GPU
serves) must agree with the twin on most tokens: a tiny random model has small logit margins; with static
activation scales a pipeline split keeps every layer whole, so W8A8 at pp = 2 equals W8A8 on one rank exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from contextlib import contextmanager
from typing import NamedTuple

import pytest
import torch
from safetensors.torch import load_file, save_file

from shardllm import LLM, SamplingParams
from shardllm.config import EngineConfig
from shardllm.engine.llm_engine import LLMEngine
from shardllm.layers.quantization.fp8_utils import (
    FP8_DTYPE,
    dequantize,
    quantize_per_block,
    quantize_per_row,
    quantize_per_tensor,
)

PROMPTS = [[1, 17, 33, 5, 9, 101, 7], [3, 4], [250, 14, 88, 19, 201, 6, 6, 6, 42, 71, 300, 12, 9]]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", ".w1.", ".w2.", ".w3.")
W8A8_MIN_AGREEMENT = 0.2
BLOCK = (16, 16)  # tiny layers: parts of 16 rows per rank at tp = 2


def _ct_config(strategy: str, static: bool, ignore: tuple[str, ...] = ("lm_head",)) -> dict:
    weights = {"type": "float", "num_bits": 8, "strategy": strategy, "symmetric": True, "dynamic": False}
    if strategy == "block":
        weights["block_structure"] = list(BLOCK)
    acts = {"type": "float", "num_bits": 8, "strategy": "tensor" if static else "token", "dynamic": not static}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": list(ignore),
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}}}


class Format(NamedTuple):
    config: dict | None  # config.json's quantization_config
    hf_quant: dict | None  # ModelOpt's hf_quant_config.json
    strategy: str  # weight scales: tensor | channel | block
    static: bool  # per-tensor input_scale tensors (static activations)
    left_float: tuple[str, ...] = ()  # linears (name substrings) the writer leaves unquantized: the ignore list's


_MODELOPT_FP8 = {"quant_algo": "FP8", "kv_cache_quant_algo": None,
                 "exclude_modules": ["lm_head", "*.block_sparse_moe.gate"]}
_MODELOPT_PRODUCER = {"name": "modelopt", "version": "0.19"}

FORMATS = {
    "hf_block": Format({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                        "weight_block_size": list(BLOCK)}, None, "block", False),
    "hf_tensor_static": Format({"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]},
                               None, "tensor", True),
    "hf_tensor_dynamic": Format({"quant_method": "fp8", "activation_scheme": "dynamic"}, None, "tensor", False),
    "ct_channel": Format(_ct_config("channel", False), None, "channel", False),
    "ct_tensor_static": Format(_ct_config("tensor", True), None, "tensor", True),
    "ct_block": Format(_ct_config("block", False), None, "block", False),
    "modelopt": Format(None, {"producer": _MODELOPT_PRODUCER, "quantization": _MODELOPT_FP8}, "tensor", True),
    # ModelOpt's description in config.json instead of hf_quant_config.json: nested as in that file, and flat
    "modelopt_config_nested": Format({"quant_method": "modelopt", "producer": _MODELOPT_PRODUCER,
                                      "quantization": _MODELOPT_FP8}, None, "tensor", True),
    "modelopt_config_flat": Format({"quant_method": "modelopt", **_MODELOPT_FP8}, None, "tensor", True),
    # ignore lists that name a linear the checkpoint really leaves unquantized: a regex, a glob
    "ct_ignore_down": Format(_ct_config("channel", False, ("lm_head", "re:.*mlp\\.down_proj")), None, "channel",
                             False, ("mlp.down_proj",)),
    "modelopt_exclude_down": Format(None, {"producer": _MODELOPT_PRODUCER, "quantization": {
        **_MODELOPT_FP8, "exclude_modules": ["lm_head", "*.mlp.down_proj"]}}, "tensor", True, ("mlp.down_proj",)),
}
# the formats proper, each checked at tp = 2 and pp = 2; the others differ from one of these only in their
# description (config.json or hf_quant_config.json, an ignore list) and are checked on one rank
SHARDED_FORMATS = ["hf_block", "hf_tensor_static", "hf_tensor_dynamic", "ct_channel", "ct_tensor_static", "ct_block",
                   "modelopt"]
STATIC_FORMATS = [f for f in SHARDED_FORMATS if FORMATS[f].static]

# Static input scales differ per layer, part and expert, so that one put on the wrong layer or part shows: the
# largest of a fused layer's parts is q, k or v (gate or up) depending on the layer. 5/448 .. 7.5/448.
_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w3", "w2")


def input_scale_of(name: str) -> float:
    """The input_scale the writer gives the linear `name` (checkpoint spelling, ".weight" or not)."""
    layer = int(re.search(r"layers\.(\d+)\.", name).group(1))
    expert = re.search(r"experts\.(\d+)\.", name)
    part = _PARTS.index(name.removesuffix(".weight").rsplit(".", 1)[-1])
    return (5 + ((7 * layer + 3 * part + 5 * (int(expert.group(1)) if expert else 0)) % 11) / 4) / 448


def write_fp8_checkpoint(src: str, dst: str, twin: str, fmt: str) -> None:
    """Quantize every linear weight of the checkpoint at `src` into `dst` in format `fmt`; write the
    dequantized weights (what the FP8 model computes with) as an fp32 checkpoint at `twin`."""
    qc, hf_quant, strategy, static, left_float = FORMATS[fmt]
    modelopt = fmt.startswith("modelopt")
    tensors = load_file(os.path.join(src, "model.safetensors"))
    out, deq = {}, {}
    for name, w in tensors.items():
        if not (name.endswith(".weight") and any(p in name for p in LINEAR)) or any(p in name for p in left_float):
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
            out[base + ".weight_scale"] = s if modelopt else s.reshape(1)  # () and [1] both occur
            deq[name] = dequantize(q, s)
        if static:
            x = torch.tensor(input_scale_of(name), dtype=torch.float32)
            out[base + ".input_scale"] = x if modelopt else x.reshape(1)
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


@contextmanager
def open_llm(path: str, weight_only: bool = False, **kwargs):
    """An LLM on CPU over `path` (weight_only: FP8 weights dequantized in each matmul), shut down on exit."""
    cfg = EngineConfig.create(path, device="cpu", num_kv_blocks=100, block_size=4, **kwargs)
    if weight_only:
        qc = dataclasses.replace(cfg.model_config.quantization, weight_only=True)
        cfg = dataclasses.replace(cfg, model_config=dataclasses.replace(cfg.model_config, quantization=qc))
    llm = LLM.__new__(LLM)  # an LLM over a config edited in place (weight_only is not an LLM argument)
    llm.config, llm.engine, llm._next_id = cfg, LLMEngine(cfg), 0
    try:
        yield llm
    finally:
        llm.shutdown()


def generate(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def greedy(path: str, weight_only: bool = False, **kwargs) -> list[list[int]]:
    with open_llm(path, weight_only, **kwargs) as llm:
        return generate(llm)


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
            # formats that round the weights alike have the same twin: one directory, so `tokens` runs it once
            f = FORMATS[fmt]
            dst, twin = str(root / f"{arch}_{fmt}"), str(root / "_".join(("twin", arch, f.strategy, *f.left_float)))
            write_fp8_checkpoint(tiny_checkpoints[arch], dst, twin, fmt)
            made[(arch, fmt)] = (dst, twin)
        return made[(arch, fmt)]

    return get


@pytest.fixture(scope="module")
def tokens():
    """greedy(), remembered for this module: a twin's (or one rank's) tokens are computed once for every test that
    compares with them (runs are deterministic; a sharded run costs seconds, mostly starting its workers)."""
    memo = {}

    def get(path: str, weight_only: bool = False, **kwargs) -> list[list[int]]:
        key = (path, weight_only, tuple(sorted(kwargs.items())))
        if key not in memo:
            memo[key] = greedy(path, weight_only, **kwargs)
        return memo[key]

    return get


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_equals_its_dequantized_twin(checkpoints, tokens, fmt):
    dst, twin = checkpoints("llama", fmt)
    expected = tokens(twin)
    assert tokens(dst, weight_only=True) == expected
    # W8A8 (activations quantized too) on a tiny random model with small logit margins: 0.33-0.83 measured on
    # these prompts (0.33: the static formats); a wrong scale or a misplaced part gives unrelated tokens from the
    # first one (about 0)
    assert agreement(tokens(dst), expected) >= W8A8_MIN_AGREEMENT


@pytest.mark.parametrize("fmt", SHARDED_FORMATS)
def test_tp2_equals_the_twin(checkpoints, tokens, fmt):
    """Each rank's slice of every layer: per-channel scales narrowed with their rows (column-parallel) or kept
    whole (row-parallel), per-tensor scales kept per fused part (q, k, v; gate, up), block scales cut at whole
    blocks. ModelOpt in config.json and the ignore-list formats load through the same layers as `modelopt` and
    `ct_channel` (only their description differs): checked on one rank above, not sharded again."""
    dst, twin = checkpoints("llama", fmt)
    assert tokens(dst, weight_only=True, tensor_parallel_size=2) == tokens(twin)


@pytest.mark.parametrize("fmt", [f for f in SHARDED_FORMATS if f not in STATIC_FORMATS])
def test_pp2_equals_the_twin(checkpoints, tokens, fmt):
    """Two stages of one layer each: each stage loads only its layers' weights and scales. (The static formats'
    pipeline split is the next test's: W8A8 at pp = 2 equal to one rank, which the wrong layer's weight or input
    scale on a stage would break; one pp engine per format keeps the suite's time.)"""
    dst, twin = checkpoints("llama", fmt)
    assert tokens(dst, weight_only=True, pipeline_parallel_size=2) == tokens(twin)


@pytest.mark.parametrize("fmt", STATIC_FORMATS)
def test_static_w8a8_pipeline_split_equals_one_rank(checkpoints, tokens, fmt):
    """W8A8 with the checkpoint's static input scales: a pipeline split keeps every layer whole, so pp = 2 gives one
    rank's tokens exactly; each stage must take its own layers' weight and input scales (they differ per layer)."""
    dst, twin = checkpoints("llama", fmt)
    one_rank = tokens(dst)
    assert agreement(one_rank, tokens(twin)) >= W8A8_MIN_AGREEMENT  # one rank is right (also checked above)
    assert tokens(dst, pipeline_parallel_size=2) == one_rank


@pytest.mark.parametrize("fmt", STATIC_FORMATS)
def test_static_input_scales_land_on_their_layer_and_part(checkpoints, fmt):
    """Every layer and part has its own input scale in the checkpoint; a fused layer keeps the largest of its parts'
    (fp8.py process_weights_after_loading), which is q, k or v (gate or up) depending on the layer."""
    dst, _ = checkpoints("llama", fmt)
    with open_llm(dst) as llm:
        layers = list(llm.engine.executor.worker.model_runner.model.model.layers)
        assert len(layers) == 2
        for i, layer in enumerate(layers):
            expected = {fused: max(input_scale_of(f"model.layers.{i}.{p}") for p in parts) for fused, parts in (
                ("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                ("self_attn.o_proj", ("self_attn.o_proj",)),
                ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
                ("mlp.down_proj", ("mlp.down_proj",)))}
            got = {name: layer.get_submodule(name).input_scale for name in expected}
            for name, value in expected.items():
                assert got[name].shape == (), (i, name)
                assert got[name].item() == torch.tensor(value, dtype=torch.float32).item(), (i, name, got[name], value)
    # the check would pass with one scale for all: the scales of one module differ per layer, those of one layer
    # per module, and neither the first nor the last fused part holds the largest scale in every layer
    assert len({input_scale_of(f"model.layers.{i}.self_attn.{p}_proj") for i in (0, 1) for p in "qkvo"}) == 8
    assert {max(range(3), key=lambda j: input_scale_of(f"model.layers.{i}.self_attn.{'qkv'[j]}_proj"))
            for i in (0, 1)} == {1, 2}


@pytest.mark.parametrize("fmt", ["ct_ignore_down", "modelopt_exclude_down"])
def test_ignore_list_leaves_a_real_linear_unquantized(checkpoints, tokens, fmt):
    """compressed-tensors `re:.*mlp\\.down_proj` and ModelOpt `*.mlp.down_proj` name the down projections the
    checkpoint keeps in full precision: those load unquantized, every other linear in FP8; tokens equal the twin."""
    dst, twin = checkpoints("llama", fmt)
    with open_llm(dst, weight_only=True) as llm:
        model = llm.engine.executor.worker.model_runner.model
        for i, layer in enumerate(model.model.layers):
            assert layer.mlp.down_proj.weight.dtype == torch.float32, i
            assert not hasattr(layer.mlp.down_proj, "weight_scale"), i
            for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj"):
                assert layer.get_submodule(name).weight.dtype == FP8_DTYPE, (i, name)
        assert generate(llm) == tokens(twin)


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
