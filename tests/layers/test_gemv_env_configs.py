"""SHARDLLM_GEMV_CONFIGS (layers/gemv.py env_table_overrides / merged_table): a sweep's configs over the decode GEMV's
tuned tables, entry by entry, in a fresh process as the engine reads it at import; bad values refused with errors
that name the format."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from shardllm.layers import gemv
from shardllm.layers.gemv import GemvConfig, env_table_overrides, merged_table


def test_unset_or_empty_changes_nothing():
    assert env_table_overrides(None) == {} and env_table_overrides("") == {}


@pytest.mark.parametrize("text, match", [
    ("{fp8: 1}", "not JSON"),
    ('{"fp4": {}}', "keys must be among"),
    ("[1, 2]", "keys must be among"),
    ('{"fp8": {"4096x4096": {"1": [0, 4]}}}', r"SHARDLLM_GEMV_CONFIGS\['fp8'\]"),
    ('{"fp8": {"4096by4096": {"1": [0, 4, 512, 1, 4, 3]}}}', r"SHARDLLM_GEMV_CONFIGS\['fp8'\]"),
    ('{"fp8": {"4096x4096": {"3": [0, 4, 512, 1, 4, 3]}}}', "M must be one of"),  # never looked up
    ('{"bf16": {"4096x4096": {"1": [0, 4, 512, 1, 4]}}}', "6 to 8 ints"),
    ('{"fp8_silu": {"4096x4096": {"1": [0, 4, 512, 1, 4, 3, 0, 0, 1]}}}', "6 to 8 ints"),
    ('{"bf16_silu": {"4096x4096": {"1": [0, 4, 512.5, 1, 4, 3]}}}', "6 to 8 ints"),
    ('{"fp8": {"4096": {"1": [0, 4, 512, 1, 4, 3]}}}', "keys are \"NxK\""),
    ('{"fp8": {"4096x4096": [0, 4, 512, 1, 4, 3]}}', "keys are \"NxK\""),
    ('{"fp8": [1]}', "an object of shapes"),
    ('{"fp8": {"4096x4096": {"1": [1, -64, 128, 1, 4, 3]}}}', "must be positive"),
])
def test_bad_values_are_refused_naming_the_format(text, match):
    with pytest.raises(ValueError, match=match):
        env_table_overrides(text)


def test_entries_replace_only_their_shape_and_m(monkeypatch):
    base = {"4096x4096": {"1": [0, 4, 512, 1, 4, 3, 1], "2": [0, 16, 512, 1, 8, 3, 1]},
            "6144x4096": {"1": [0, 4, 512, 1, 4, 3, 1]}}
    monkeypatch.setattr(gemv, "_ENV_OVERRIDES", env_table_overrides(json.dumps(
        {"fp8": {"4096x4096": {"1": [0, 1, 2048, 1, 2, 3, 0]}, "28672x4096": {"1": [0, 1, 2048, 1, 2, 3]}}})))
    t = merged_table(base, "fp8")
    assert t[(4096, 4096)][1] == GemvConfig(False, 1, 2048, 1, 2, 3, False)
    assert t[(4096, 4096)][2] == GemvConfig(False, 16, 512, 1, 8, 3, True)  # the other M kept
    assert t[(6144, 4096)] == gemv.load_table(base)[(6144, 4096)]  # the other shape kept
    assert t[(28672, 4096)][1].block_n == 1  # a shape the base lacks is added
    assert merged_table(base, "bf16") == gemv.load_table(base)  # another kind's entries do not apply


def test_the_engine_reads_it_at_import():
    env = {**os.environ, "SHARDLLM_GEMV_CONFIGS": json.dumps(
        {"fp8": {"4096x4096": {"1": [0, 1, 2048, 1, 2, 3, 0]}},
         "fp8_silu": {"4096x14336": {"1": [0, 8, 2048, 1, 8, 3]}}})}
    code = ("import json\nfrom shardllm.layers import gemv, gemv_silu\n"
            "print(json.dumps([list(gemv.FP8_GEMV_TABLE[(4096, 4096)][1]), "
            "list(gemv_silu.FUSED_SILU_TABLES['fp8'][(4096, 14336)][1]), list(gemv.FP8_GEMV_TABLE[(6144, 4096)][1])]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    o, silu, qkv = json.loads(out.stdout.strip().splitlines()[-1])
    assert o == [False, 1, 2048, 1, 2, 3, False, False]
    assert silu == [False, 8, 2048, 1, 8, 3, False, False]
    assert qkv == list(gemv.FP8_GEMV_TABLE[(6144, 4096)][1])  # untouched: the shipped table's


def test_a_bad_value_stops_the_import_with_the_error():
    env = {**os.environ, "SHARDLLM_GEMV_CONFIGS": '{"fp4": {}}'}
    out = subprocess.run([sys.executable, "-c", "import shardllm.layers.gemv"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and "keys must be among" in out.stderr
