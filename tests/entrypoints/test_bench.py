"""`shardllm bench` on CPU: exact lengths, counts that add up, and the settings it ran with in the JSON."""

import json

from shardllm.entrypoints import cli


def bench_json(capsys, *args) -> dict:
    assert cli.main(["bench", *args, "--json"]) in (0, None)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bench_counts_and_fields(tiny_checkpoints, capsys):
    res = bench_json(capsys, "--model", tiny_checkpoints["llama"], "--device", "cpu", "--dtype", "float32",
                     "--num_requests", "6", "--input_len", "5", "--output_len", "7", "--max_batch_size", "4")
    assert res["num_requests"] == 6 and res["input_len"] == 5 and res["output_len"] == 7
    assert res["model"] == tiny_checkpoints["llama"]
    assert res["max_batch_size"] == res["batch_size"] == 4  # the resolved limit, under both keys
    # every request produced exactly output_len tokens (ignore_eos), and the rate is tokens / time (rounded fields)
    assert res["output_tokens"] == 6 * 7
    assert abs(res["output_tok_s"] * res["elapsed_s"] / (6 * 7) - 1) < 0.05
    assert res["output_tok_s_per_gpu"] == res["output_tok_s"] and res["gpus"] == 1
    assert res["steps"] >= 7 and res["ttft_ms_p50"] > 0 and res["tpot_ms_p50"] > 0
    assert res["ttft_ms_p99"] >= res["ttft_ms_p50"] and res["tpot_ms_p99"] >= res["tpot_ms_p50"]
    # 6 requests at batch 4: the last two are admitted when the first ones finish, past the median first token
    assert res["ttft_ms_max"] > res["ttft_ms_p50"] > 0
    assert res["decode_phase_tpot_ms"] > 0
    assert res["async_scheduling"] is True and res["cuda_graphs"] is False
    assert res["all_reduce"] == "gloo"  # a CPU run: gloo whatever the all_reduce setting says
    assert res["attention_backend"] == "torch"  # what ran (auto: torch off CUDA), not the setting
    assert res["peak_gib_per_rank"] == [None]  # no device peak on CPU (not 0.0)
    assert "roofline_ms_per_token" not in res  # the roofline is a GPU measure


def test_bench_passes_engine_flags(tiny_checkpoints, capsys):
    res = bench_json(capsys, "--model", tiny_checkpoints["llama"], "--device", "cpu", "--dtype", "float32",
                     "--num_requests", "2", "--input_len", "3", "--output_len", "4", "--batch_size", "1",
                     "--no-async_scheduling", "--attention_backend", "torch", "--block_size", "8")
    assert res["batch_size"] == res["max_batch_size"] == 1 and res["block_size"] == 8
    assert res["async_scheduling"] is False and res["attention_backend"] == "torch"
    assert res["output_tokens"] == 2 * 4
    assert abs(res["output_tok_s"] * res["elapsed_s"] / (2 * 4) - 1) < 0.05


def test_bench_runs_at_a_context_of_exactly_input_plus_output(tiny_checkpoints, capsys):
    """--max_seq_len input_len + output_len with output_len < 8: the warm-up requests fit the context too (the engine
    refuses a request whose prompt + max_tokens exceeds it)."""
    res = bench_json(capsys, "--model", tiny_checkpoints["llama"], "--device", "cpu", "--dtype", "float32",
                     "--num_requests", "2", "--input_len", "5", "--output_len", "2", "--max_seq_len", "7")
    assert res["output_tokens"] == 2 * 2


def test_decode_phase_tpot_is_the_last_admitted_requests():
    from types import SimpleNamespace as NS

    from shardllm.bench.throughput import decode_phase_tpot_ms

    def out(first, finished, n):
        return NS(metrics=NS(first_token_time=first, finished_time=finished), outputs=[NS(token_ids=[0] * n)])

    # first tokens at 1.0, 3.0 (last admitted: 4 more tokens in 2 s) and 2.0
    outs = [out(1.0, 9.0, 5), out(3.0, 5.0, 5), out(2.0, 3.0, 2)]
    assert decode_phase_tpot_ms(outs) == 500.0
    assert decode_phase_tpot_ms([out(3.0, 3.0, 1)]) is None and decode_phase_tpot_ms([]) is None
