"""One max_seq_len rule for serve, `plan` and `deploy` (config.check_max_seq_len): an integer >= 2 within the model's
context, which a sliding window caps; the planner's default is that capped context; the seconds flags of `doctor`
and of the image's health check refuse nan, inf and 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig, MistralConfig

from shardllm.config import check_max_seq_len
from shardllm.entrypoints import doctor

LLAMA = LlamaConfig(max_position_embeddings=8192)
WINDOWED = MistralConfig(max_position_embeddings=32768, sliding_window=4096)


def test_the_rule():
    assert check_max_seq_len(None, LLAMA) == 8192 and check_max_seq_len(1000, LLAMA) == 1000
    assert check_max_seq_len(None, WINDOWED) == 4096  # capped at the window, as serve runs it
    assert check_max_seq_len(None) is None and check_max_seq_len(5) == 5  # no model: the type and minimum only
    for bad in (1, 0, -3, 2.5, "100", True):
        with pytest.raises(ValueError, match="--max_seq_len must be an integer >= 2"):
            check_max_seq_len(bad, LLAMA, "--max_seq_len")
    with pytest.raises(ValueError, match="exceeds the model's context of 4096 tokens: lower max_seq_len to at most"):
        check_max_seq_len(8192, WINDOWED)


def test_the_planner_defaults_to_the_capped_context():
    from shardllm.planner import estimate

    small = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000)
    windowed = MistralConfig(**small, max_position_embeddings=32768, sliding_window=4096)
    assert estimate(windowed).max_seq_len == 4096  # what serve would run, not the 32768 positions
    assert estimate(LlamaConfig(**small, max_position_embeddings=8192)).max_seq_len == 8192


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1"])
def test_seconds_flags_of_doctor_and_the_health_check(value, capsys):
    with pytest.raises(SystemExit) as e:
        doctor.main(["--interval", value])
    assert e.value.code == 2 and "--interval" in capsys.readouterr().err
    script = Path(__file__).resolve().parents[1] / "shardllm" / "entrypoints" / "healthcheck.py"
    r = subprocess.run([sys.executable, str(script), "--timeout", value], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--timeout" in r.stderr, r.stderr
