"""FP8 configurations the engine does not run are refused with a ValueError that says what is wrong and what to do:
checkpoint formats through `detect_quantization` (what EngineConfig.create calls on the checkpoint's config), and
unknown dtype / quantization / kv_cache_dtype names through EngineConfig.create and LLM, before any model resolves."""

from __future__ import annotations

import copy
import re

import pytest

from shardllm import LLM
from shardllm.config import EngineConfig
from shardllm.layers.quantization import QuantizationConfig
from shardllm.layers.quantization.formats import detect_quantization


class _HFConfig:
    """The part of a transformers config that detect_quantization reads."""

    def __init__(self, qc: dict):
        self.quantization_config = qc


# Accepted as they stand; each refusal below changes one field of one of them.
HF_FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "static"}  # AutoFP8, per tensor
CT_FP8 = {
    "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"type": "float", "num_bits": 8, "strategy": "channel", "dynamic": False},
        "input_activations": {"type": "float", "num_bits": 8, "strategy": "tensor", "dynamic": False}}},
}


def _with(base: dict, *path_and_value) -> dict:
    """A deep copy of `base` with d[path[0]]...[path[-1]] = value (value None: the key removed)."""
    *path, value = path_and_value
    d = copy.deepcopy(base)
    node = d
    for key in path[:-1]:
        node = node[key]
    if value is None:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    return d


def test_the_base_configs_are_accepted():
    """The refusals below differ from these in one field only, so that field is what each one refuses."""
    hf = detect_quantization(_HFConfig(HF_FP8), None, None)
    assert (hf.source, hf.weight_strategy, hf.activation_scheme) == ("fp8", "tensor", "static")
    ct = detect_quantization(_HFConfig(CT_FP8), None, None)
    assert (ct.source, ct.weight_strategy, ct.activation_scheme) == ("compressed-tensors", "channel", "static")


_GROUP = ("config_groups", "group_0")
REFUSALS = {
    # HF "fp8": weights stored as e5m2
    "hf-fmt-e5m2": (_with(HF_FP8, "fmt", "e5m2"), r"FP8 checkpoint format 'e5m2' is not supported: e4m3 weights only"),
    # HF "fp8" per tensor: an activation scheme other than static / dynamic
    "hf-activation-scheme": (_with(HF_FP8, "activation_scheme", "per_token"),
                             r"activation_scheme 'per_token' is not supported: set quantization_config's "
                             r"activation_scheme to 'static' \(with input_scale tensors\) or 'dynamic'"),
    # HF "fp8" with 128x128 weight blocks: activations are quantized per step, so a static scheme (input_scale
    # tensors that would go unused) and an unknown scheme are refused, as on the per-tensor path
    "hf-block-static": (_with(HF_FP8, "weight_block_size", [128, 128]),
                        r"block-scaled FP8 checkpoint \(weight_block_size\) with activation_scheme 'static' is not "
                        r"supported: .*set activation_scheme to 'dynamic'"),
    "hf-block-activation-scheme": (_with(_with(HF_FP8, "weight_block_size", [128, 128]), "activation_scheme", "x"),
                                   r"activation_scheme 'x' is not supported"),
    # compressed-tensors without any scheme
    "ct-no-config-groups": (_with(CT_FP8, "config_groups", None),
                            r"has no config_groups, .*: add a config_groups entry \(weights: float, 8 bits\)"),
    "ct-empty-config-groups": (_with(CT_FP8, "config_groups", {}),
                               r"has no config_groups, .*: add a config_groups entry \(weights: float, 8 bits\)"),
    # two groups with different schemes (a mixed-precision checkpoint)
    "ct-several-groups": (_with(CT_FP8, "config_groups", "group_1", {
        "targets": ["re:.*down_proj"], "weights": {"type": "float", "num_bits": 8, "strategy": "tensor"},
        "input_activations": None}),
        r"several different config_groups \(mixed schemes\) are not supported: .*re-export with a single scheme"),
    # int8 weights (W8A8 INT) and 4-bit float weights
    "ct-int-weights": (_with(CT_FP8, *_GROUP, "weights", "type", "int"),
                       r"compressed-tensors weights int/8 bits are not supported: float 8-bit \(FP8\) only"),
    "ct-4bit-weights": (_with(CT_FP8, *_GROUP, "weights", "num_bits", 4),
                        r"compressed-tensors weights float/4 bits are not supported: float 8-bit \(FP8\) only"),
    # per-group weight scales
    "ct-group-strategy": (_with(CT_FP8, *_GROUP, "weights", "strategy", "group"),
                          r"weight strategy 'group' is not supported: tensor, channel or block"),
    # static activation scales per token / per channel
    "ct-static-token-activations": (_with(CT_FP8, *_GROUP, "input_activations", "strategy", "token"),
                                    r"static compressed-tensors activation scales must be per tensor"),
    "ct-static-channel-activations": (_with(CT_FP8, *_GROUP, "input_activations", "strategy", "channel"),
                                      r"static compressed-tensors activation scales must be per tensor"),
}


@pytest.mark.parametrize("requested", [None, "fp8"])  # a checkpoint's own format decides, asked for fp8 or not
@pytest.mark.parametrize("case", list(REFUSALS))
def test_unsupported_fp8_checkpoint_configs_are_refused(case, requested):
    qc, message = REFUSALS[case]
    with pytest.raises(ValueError, match=message):
        detect_quantization(_HFConfig(qc), None, requested)


def test_several_config_groups_of_one_scheme_are_one_scheme():
    """The refusal is for different schemes: two groups with the same weights and activations (targets split in
    two) load as one."""
    qc = _with(CT_FP8, "config_groups", "group_1", {**copy.deepcopy(CT_FP8["config_groups"]["group_0"]),
                                                    "targets": ["re:.*down_proj"]})
    got = detect_quantization(_HFConfig(qc), None, None)
    assert (got.weight_strategy, got.activation_scheme) == ("channel", "static")


def test_dynamic_token_activations_are_not_the_static_refusal():
    """Per-token activation scales are refused only when static: dynamic ones are computed at run time."""
    qc = _with(CT_FP8, *_GROUP, "input_activations", {"type": "float", "num_bits": 8, "strategy": "token",
                                                      "dynamic": True})
    assert detect_quantization(_HFConfig(qc), None, None).activation_scheme == "dynamic"


# ---- unknown names through EngineConfig.create and LLM ----------------------------------------------------------
@pytest.fixture
def no_model_resolve(monkeypatch):
    """Resolving the model (a download, for a repo id) fails the test: the refusal must come first."""
    import shardllm.model_loader.resolve as resolve

    def fail(*a, **k):
        raise AssertionError("the model was resolved before the settings were checked")
    monkeypatch.setattr(resolve, "resolve_model", fail)


UNKNOWN = {
    "dtype": ("int8", r"unknown dtype 'int8': choose one of",
              ["'auto'", "'bfloat16'", "'bf16'", "'float16'", "'fp16'", "'float32'", "'fp32'", "'fp8'"]),
    "quantization": ("awq", r"unknown quantization 'awq': choose one of", ["'fp8'", "leave it unset"]),
    "kv_cache_dtype": ("int8", r"unknown kv_cache_dtype 'int8': choose one of",
                       ["'auto'", "'fp8'", "'fp8_e4m3'", "'fp8_e5m2'"]),
}


def _assert_lists_choices(err: pytest.ExceptionInfo, what: str, choices: list[str]):
    text = str(err.value)
    assert re.search(UNKNOWN[what][1], text), text
    listed = text.split("choose one of", 1)[1]
    for choice in choices:
        assert choice in listed, (choice, text)


@pytest.mark.parametrize("what", list(UNKNOWN))
def test_unknown_names_through_engine_config_list_the_choices(tiny_checkpoints, no_model_resolve, what):
    value, _, choices = UNKNOWN[what]
    with pytest.raises(ValueError) as err:
        EngineConfig.create(tiny_checkpoints["llama"], device="cpu", **{what: value})
    _assert_lists_choices(err, what, choices)


@pytest.mark.parametrize("what", list(UNKNOWN))
def test_unknown_names_through_llm_list_the_choices(no_model_resolve, what):
    value, _, choices = UNKNOWN[what]
    with pytest.raises(ValueError) as err:
        LLM(None, device="cpu", **{what: value})
    _assert_lists_choices(err, what, choices)


def test_unknown_quantization_is_refused_with_dtype_fp8_too(no_model_resolve):
    """dtype='fp8' means quantization='fp8' unless another method is named: a wrong one is still refused."""
    with pytest.raises(ValueError, match=r"unknown quantization 'int4'.*'fp8'"):
        EngineConfig.create(None, device="cpu", dtype="fp8", quantization="int4")


def test_known_names_in_any_case_reach_the_model(tiny_checkpoints):
    """The contrast: the same calls with valid names (any case, as vLLM takes them) pass the checks and load."""
    cfg = EngineConfig.create(tiny_checkpoints["llama"], device="cpu", dtype="FP8", quantization="Fp8",
                              kv_cache_dtype="FP8_E5M2")
    assert cfg.model_config.quantization == QuantizationConfig()
    assert cfg.cache_config.kv_cache_dtype == "fp8_e5m2"
