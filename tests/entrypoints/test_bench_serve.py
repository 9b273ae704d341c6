"""`shardllm bench serve` against a real local server (the embedded default model on CPU): N requests complete at
a finite rate and at inf, token counts agree with the server's own counters, rejected requests are counted as
failed (not a crash), and bad input is a clear error."""

import json
import math

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from shardllm.bench.serve import arrival_times  # noqa: E402
from shardllm.entrypoints import cli  # noqa: E402
from tests.entrypoints.conftest import MAX_SEQ_LEN, free_port, wait_idle  # noqa: E402

PROMPT = ("shardllm_prompt_tokens_total", ())
GENERATED = ("shardllm_generation_tokens_total", ())


def bench_serve(capsys, *args) -> tuple[int, dict]:
    rc = cli.main(["bench", "serve", *args, "--json", "--disable_tqdm"])
    out = capsys.readouterr().out
    return rc, json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("rate,clients", [("20", 1), ("inf", 1), ("20", 2)])
def test_completes_n_requests_and_counts_match_the_server(server, capsys, rate, clients):
    before = wait_idle(server)
    rc, res = bench_serve(capsys, "--url", server.base_url, "--num_prompts", "6", "--input_len", "12",
                          "--output_len", "5", "--request_rate", rate, "--num_clients", str(clients))
    after = wait_idle(server)
    assert rc == 0 and res["completed"] == 6 and res["failed"] == 0 and res["errors"] == {}
    assert res["num_clients"] == clients
    assert res["model"] == "SmolLM2-135M-Instruct" and res["request_rate"] == (float(rate) if rate != "inf" else "inf")
    # exact lengths (token-id prompts, ignore_eos), as the server counted them
    assert res["token_counts_from"] == "usage"
    assert res["total_input_tokens"] == 6 * 12 == after[PROMPT] - before[PROMPT]
    assert res["total_output_tokens"] == 6 * 5 == after[GENERATED] - before[GENERATED]
    assert 0 < res["request_throughput"] < math.inf and res["output_throughput"] > 0
    assert res["output_throughput"] == pytest.approx(30 / res["duration_s"], rel=1e-3)
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < res[f"median_{name}_ms"] <= res[f"p90_{name}_ms"] <= res[f"p99_{name}_ms"], name
    assert res["mean_ttft_ms"] <= res["mean_e2el_ms"]  # each request's first token comes before its end


def test_client_processes_results_come_back_in_request_order(server):
    """--num_clients: request i goes to client i mod N; each client's results land back at their requests' places
    (requests of different lengths, so that a result at another request's place shows)."""
    from shardllm.bench.datasets import RequestSpec
    from shardllm.bench.serve import run_clients

    specs = [RequestSpec(list(range(100, 104 + i)), 4 + i, 2 + i % 4) for i in range(7)]
    results, duration = run_clients(3, specs, float("inf"), base_url=server.base_url, model="SmolLM2-135M-Instruct")
    assert duration > 0 and all(r.ok for r in results)
    assert [(r.prompt_tokens, r.output_tokens) for r in results] == [(s.prompt_len, s.output_len) for s in specs]


def test_rejected_requests_are_failed_not_a_crash(server, tmp_path, capsys):
    conversations = [{"conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "ok"}]}
                     for text in ("What is 2 + 2?", "word " * (MAX_SEQ_LEN + 50), "Name a color.")]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(conversations))
    rc, res = bench_serve(capsys, "--url", server.base_url, "--dataset", str(path), "--num_prompts", "3",
                          "--output_len", "4")
    assert rc == 0 and res["completed"] == 2 and res["failed"] == 1
    assert res["total_output_tokens"] == 2 * 4
    [(message, count)] = res["errors"].items()
    assert count == 1 and message.startswith("HTTP 400") and "maximum context length" in message
    # a model the server does not serve: named with what it serves (not as a tokenizer not found)
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "serve", "--url", server.base_url, "--model", "no-such-model", "--num_prompts", "1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--model 'no-such-model': the server at" in err and "serves [" in err, err
    # every request rejected: still a report, exit code 1
    rc, res = bench_serve(capsys, "--url", server.base_url, "--num_prompts", "3", "--input_len", str(MAX_SEQ_LEN),
                          "--output_len", "4")
    assert rc == 1 and res["completed"] == 0 and res["failed"] == 3 and res["median_ttft_ms"] is None


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "sharegpt"}')
    cases = [(["--url", url], f"cannot reach {url}/v1/models"),
             (["--url", "127.0.0.1:8000"], "give a base URL such as http://127.0.0.1:8000"),
             (["--request_rate", "0"], "--request_rate: must be > 0 or inf"),
             (["--num_prompts", "0"], "--num_prompts must be at least 1"),
             (["--num_clients", "0"], "--num_clients must be at least 1"),
             (["--num_clients", "3", "--num_prompts", "2"], "--num_clients 3 is more than --num_prompts 2"),
             (["--num_clients", "3", "--max_concurrency", "2"], "--num_clients 3 is more than --max_concurrency 2"),
             (["--url", url, "--model", "m", "--dataset", str(tmp_path / "missing.json")], "No such file"),
             (["--url", url, "--model", "m", "--dataset", str(bad), "--output_len", "4"],
              "no conversation with two turns found")]
    for args, message in cases:
        with pytest.raises(SystemExit) as exc:
            cli.main(["bench", "serve", *args])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err, (args, err)


def test_poisson_arrivals():
    assert arrival_times(4, math.inf, 0) == [0.0] * 4
    times = arrival_times(2000, 10.0, seed=1)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0 and min(gaps) >= 0 and times == arrival_times(2000, 10.0, seed=1)
    assert sum(gaps) / len(gaps) == pytest.approx(0.1, rel=0.1)  # mean gap 1 / rate


def test_datasets_exact_lengths_and_sharegpt_replies(tmp_path):
    from shardllm.bench.datasets import load_bench_tokenizer, load_sharegpt, random_requests

    tok, vocab = load_bench_tokenizer("SmolLM2-135M-Instruct")
    specs = random_requests(5, 33, 7, "SmolLM2-135M-Instruct", seed=3)
    assert [(len(s.prompt), s.prompt_len, s.output_len) for s in specs] == [(33, 33, 7)] * 5
    ids = {t for s in specs for t in s.prompt}
    assert max(ids) < vocab and not ids & set(tok.all_special_ids)
    assert specs == random_requests(5, 33, 7, "SmolLM2-135M-Instruct", seed=3) != random_requests(
        5, 33, 7, "SmolLM2-135M-Instruct", seed=4)
    assert load_bench_tokenizer("llama-3-8b") == (None, 128256)  # a dummy server: the shipped config's vocabulary
    replies = ["Paris is the capital of France.", "Blue."]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"Question {i}?"},
                                                   {"from": "gpt", "value": r}]} for i, r in enumerate(replies)]
                               + [{"conversations": [{"from": "human", "value": "one turn only"}]}]))
    specs = load_sharegpt(str(path), 4, None, "SmolLM2-135M-Instruct", seed=0)
    by_prompt = {s.prompt: s.output_len for s in specs}
    assert by_prompt == {f"Question {i}?": len(tok.encode(r, add_special_tokens=False)) for i, r in enumerate(replies)}
    assert len(specs) == 4 and all(s.prompt_len == len(tok.encode(s.prompt)) for s in specs)
