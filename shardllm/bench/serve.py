"""`shardllm bench serve`: load-test any OpenAI-compatible server (ours or a peer's) at a request rate.

    shardllm bench serve --url http://127.0.0.1:8000 --request_rate 8 --num_prompts 200 \
        --input_len 128 --output_len 128          # random token-id prompts of exact length, ignore_eos
    shardllm bench serve --url ... --dataset ShareGPT_V3_unfiltered_cleaned_split.json --num_prompts 500

Requests go to /v1/completions, streamed, with Poisson arrivals at --request_rate (inf: all at once). Figures,
as vLLM's `vllm bench serve` defines them: TTFT is the time to the first streamed text, ITL the gaps between
streamed chunks, TPOT a request's (latency - TTFT) / (output tokens - 1), E2E its whole latency; token counts
are the server's `usage` fields (stream_options.include_usage).

One Python process parses some 10,000 streamed events a second (measured against our server on an H200 host: the
client, not the server, was the bound at ~9,000 output tok/s); `--num_clients N` spreads the requests over N
processes (request i to process i mod N, each keeping its Poisson send time), and the report merges them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from shardllm.bench.datasets import RequestSpec, load_sharegpt, random_requests


@dataclass
class RequestResult:
    ok: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # s
    latency: float = 0.0  # s, end to end
    itl: list[float] = field(default_factory=list)  # s, between streamed chunks
    usage_reported: bool = False
    error: str = ""


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Send times in seconds from the start: a Poisson process of `rate` requests/s (exponential gaps, the
    first request at 0), or all at 0 for rate = inf."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def _error_message(status: int, body: bytes) -> str:
    try:
        err = json.loads(body)["error"]
        return f"HTTP {status}: {err.get('message', err) if isinstance(err, dict) else err}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {body[:200].decode(errors='replace')}"


_EOL = re.compile(rb"\r\n|\r|\n")


async def _sse_lines(resp):
    """The lines of a streamed body as bytes (split here: httpx's text and line decoders cost more than the rest of
    an event's handling)."""
    tail = b""
    async for chunk in resp.aiter_bytes():  # SSE ends lines with CRLF, LF or CR (a CRLF split over two chunks
        *lines, tail = _EOL.split(tail + chunk)  # gives one more empty line: ignored, as blank lines are)
        for line in lines:
            yield line
    if tail:
        yield tail


async def send_request(client, url: str, model: str, spec: RequestSpec, ignore_eos: bool,
                       headers: dict[str, str]) -> RequestResult:
    """One streamed completion; never raises for the server's or the network's failures (they are the result)."""
    import httpx

    payload = {"model": model, "prompt": spec.prompt, "max_tokens": spec.output_len, "temperature": 0.0,
               "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        payload["ignore_eos"] = True  # vLLM's extension, accepted by shardllm, SGLang and TensorRT-LLM too
    res = RequestResult(prompt_tokens=spec.prompt_len or 0)
    chunks = 0
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as resp:
            if resp.status_code != 200:
                res.error = _error_message(resp.status_code, await resp.aread())
                return res
            async for line in _sse_lines(resp):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    err = msg["error"]
                    res.error = f"error in stream: {err.get('message', err) if isinstance(err, dict) else err}"
                    return res
                now = time.perf_counter()
                if any(c.get("text") for c in msg.get("choices") or ()):
                    if chunks == 0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    chunks += 1
                    last = now
                if msg.get("usage"):
                    res.prompt_tokens = msg["usage"].get("prompt_tokens", res.prompt_tokens)
                    res.output_tokens = msg["usage"].get("completion_tokens", 0)
                    res.usage_reported = True
    except (httpx.HTTPError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.latency = time.perf_counter() - start
    if not res.usage_reported:  # a server without include_usage: one token per streamed chunk
        res.output_tokens = chunks
    res.ok = chunks > 0 or res.output_tokens > 0
    if not res.ok:
        res.error = "the stream carried no text"
    return res


async def run_benchmark(base_url: str, model: str, specs: list[RequestSpec], request_rate: float,
                        max_concurrency: int | None = None, ignore_eos: bool = True, seed: int = 0,
                        api_key: str | None = None, timeout: float = 3600.0, progress: bool = False,
                        sends: list[float] | None = None) -> tuple[list[RequestResult], float]:
    """Send `specs` at their Poisson arrival times (`sends`: given ones, in s from the start); returns (results in
    spec order, duration in s from the start to the last answer)."""
    import httpx
    from tqdm import tqdm

    url = base_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sends = arrival_times(len(specs), request_rate, seed) if sends is None else sends
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(specs), disable=not progress, desc="requests", file=sys.stderr)
    limits = httpx.Limits(max_connections=max_concurrency or len(specs), max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        t0 = time.perf_counter()

        async def one(spec: RequestSpec, at: float) -> RequestResult:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            if limit is None:
                r = await send_request(client, url, model, spec, ignore_eos, headers)
            else:
                async with limit:
                    r = await send_request(client, url, model, spec, ignore_eos, headers)
            bar.update(1)
            return r

        results = await asyncio.gather(*(one(s, at) for s, at in zip(specs, sends)))
        duration = time.perf_counter() - t0
    bar.close()
    return list(results), duration


def _client_process(index: int, ready, results, kwargs: dict) -> None:
    """One client process of --num_clients: imports what a run needs, waits at `ready` (a Barrier of every client
    and the parent) so that all start together, runs its requests, and puts (index, results, time.time() at its
    start and at its last answer) or (index, error text) on `results`."""
    try:
        import httpx  # noqa: F401 - before the barrier: imports are start-up, not the run
        import tqdm  # noqa: F401

        ready.wait()
        part, duration = asyncio.run(run_benchmark(**kwargs))
        end = time.time()
        results.put((index, part, end - duration, end))  # its start: after its HTTP client was made, as with one
    except BaseException as e:  # noqa: BLE001 - the parent reports it
        results.put((index, f"{type(e).__name__}: {e}"))


def run_clients(num_clients: int, specs: list[RequestSpec], request_rate: float, seed: int = 0,
                max_concurrency: int | None = None, **kwargs) -> tuple[list[RequestResult], float]:
    """run_benchmark over `num_clients` spawned processes: request i goes to process i mod num_clients at its own
    Poisson send time, all processes starting together once each is ready; returns (results in spec order,
    duration in s from the first process's start to the last answer of any). max_concurrency is split into
    shares that add up to it. Raises RuntimeError when a client process fails."""
    if num_clients == 1:
        return asyncio.run(run_benchmark(specs=specs, request_rate=request_rate, seed=seed,
                                         max_concurrency=max_concurrency, **kwargs))
    import multiprocessing
    import queue

    ctx = multiprocessing.get_context("spawn")
    ready, out = ctx.Barrier(num_clients + 1), ctx.Queue()
    sends = arrival_times(len(specs), request_rate, seed)
    procs = []
    for i in range(num_clients):
        share = max_concurrency // num_clients + (i < max_concurrency % num_clients) if max_concurrency else None
        job = dict(kwargs, specs=specs[i::num_clients], sends=sends[i::num_clients], request_rate=request_rate,
                   seed=seed, max_concurrency=share, progress=False)
        procs.append(ctx.Process(target=_client_process, args=(i, ready, out, job), daemon=True))
        procs[-1].start()
    try:
        ready.wait(timeout=300)
        done: dict[int, tuple] = {}
        while len(done) < num_clients:
            try:
                item = out.get(timeout=5)
            except queue.Empty:
                if any(not p.is_alive() and p.exitcode not in (0, None) for p in procs):
                    raise RuntimeError("a client process died") from None
                continue
            if len(item) == 2:
                raise RuntimeError(f"client process {item[0]} failed: {item[1]}")
            done[item[0]] = item[1:]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    results: list[RequestResult] = [None] * len(specs)  # type: ignore[list-item]
    for i, (part, _, _) in done.items():
        results[i::num_clients] = part
    return results, max(end for _, _, end in done.values()) - min(start for _, start, _ in done.values())


def _stats(name: str, xs: list[float]) -> dict[str, float]:
    """mean, median (p50), p90, p99 in ms; percentiles interpolated linearly (numpy's default, as vLLM)."""
    import numpy as np

    if not xs:
        return {f"mean_{name}_ms": None, f"median_{name}_ms": None, f"p90_{name}_ms": None, f"p99_{name}_ms": None}
    a = np.asarray(xs) * 1e3
    return {f"mean_{name}_ms": round(float(a.mean()), 3), f"median_{name}_ms": round(float(np.median(a)), 3),
            f"p90_{name}_ms": round(float(np.percentile(a, 90)), 3),
            f"p99_{name}_ms": round(float(np.percentile(a, 99)), 3)}


def summarize(results: list[RequestResult], duration: float, request_rate: float) -> dict[str, Any]:
    """The report's figures (JSON-ready): counts, throughputs per second of `duration`, latency statistics."""
    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    summary: dict[str, Any] = {
        "num_prompts": len(results), "completed": len(done), "failed": len(results) - len(done),
        "request_rate": "inf" if math.isinf(request_rate) else request_rate, "duration_s": round(duration, 4),
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "token_counts_from": "usage" if all(r.usage_reported for r in done) else "streamed chunks",
        "request_throughput": round(len(done) / duration, 4) if duration > 0 else None,
        "output_throughput": round(out_tokens / duration, 2) if duration > 0 else None,
        "total_token_throughput": round((in_tokens + out_tokens) / duration, 2) if duration > 0 else None,
    }
    summary.update(_stats("ttft", [r.ttft for r in done]))
    summary.update(_stats("tpot", [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done
                                   if r.output_tokens > 1]))
    summary.update(_stats("itl", [x for r in done for x in r.itl]))
    summary.update(_stats("e2el", [r.latency for r in done]))
    summary["errors"] = dict(Counter(r.error for r in results if not r.ok).most_common(5))
    return summary


def format_report(s: dict[str, Any]) -> str:
    def fmt(v):
        return "-" if v is None else f"{v:,.2f}" if isinstance(v, float) else str(v)

    lines = ["=" * 21 + " Serving Benchmark Result " + "=" * 21]
    for label, key in [("Successful requests", "completed"), ("Failed requests", "failed"),
                       ("Request rate (req/s, target)", "request_rate"), ("Benchmark duration (s)", "duration_s"),
                       ("Total input tokens", "total_input_tokens"), ("Total output tokens", "total_output_tokens"),
                       ("Request throughput (req/s)", "request_throughput"),
                       ("Output token throughput (tok/s)", "output_throughput"),
                       ("Total token throughput (tok/s)", "total_token_throughput")]:
        lines.append(f"{label:<44}{fmt(s[key]):>24}")
    for title, name in [("Time to First Token", "ttft"), ("Time per Output Token (excl. 1st token)", "tpot"),
                        ("Inter-token Latency", "itl"), ("End-to-end Latency", "e2el")]:
        lines.append(f"{'-' * 4} {title} {'-' * max(0, 62 - len(title))}")
        for stat in ("mean", "median", "p90", "p99"):
            lines.append(f"{f'{stat.capitalize()} {name.upper()} (ms)':<44}{fmt(s[f'{stat}_{name}_ms']):>24}")
    for msg, n in s["errors"].items():
        lines.append(f"failed x{n}: {msg}")
    lines.append("=" * 68)
    return "\n".join(lines)


def _rate(v: str) -> float:
    r = float(v)
    if not r > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 or inf, got {v}")
    return r


def build_parser() -> argparse.ArgumentParser:
    from shardllm.entrypoints.arg_types import positive_float

    ap = argparse.ArgumentParser(prog="shardllm bench serve", description="Load-test an OpenAI-compatible "
                                 "server: request throughput, output tok/s, TTFT / TPOT / ITL / E2E percentiles.")
    ap.add_argument("--url", "--base_url", dest="url", default="http://127.0.0.1:8000",
                    help="the server's base URL (default http://127.0.0.1:8000)")
    ap.add_argument("--model", default=None, help="model name in the API (default: the first of /v1/models)")
    ap.add_argument("--api_key", default=None, help="sent as 'Authorization: Bearer KEY'")
    ap.add_argument("--dataset", default="random", help="random (token ids of exact lengths) or a ShareGPT JSON "
                    "file (first human turn as prompt, the reply's length as output length)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer for the dataset (default: the model's; a "
                    "shipped config's vocabulary is enough for random)")
    ap.add_argument("--num_prompts", type=int, default=200)
    ap.add_argument("--input_len", type=int, default=128, help="random: prompt tokens")
    ap.add_argument("--output_len", type=int, default=None,
                    help="max_tokens of each request (random: default 128; ShareGPT: default the reply's length)")
    ap.add_argument("--request_rate", type=_rate, default=float("inf"), help="requests/s, Poisson (default inf)")
    ap.add_argument("--max_concurrency", type=int, default=None, help="most requests in flight at once")
    ap.add_argument("--num_clients", type=int, default=1, help="client processes sharing the requests (one "
                    "parses ~10,000 streamed events a second: more for servers faster than that)")
    ap.add_argument("--ignore_eos", action=argparse.BooleanOptionalAction, default=True,
                    help="generate exactly the output length (default on)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--request_timeout", type=positive_float, default=3600.0, metavar="S",
                    help="seconds per request")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    ap.add_argument("--disable_tqdm", action="store_true", help="no progress bar")
    return ap


def fetch_model(base_url: str, api_key: str | None) -> str:
    """The first model of GET /v1/models; raises ValueError when the server cannot be reached or answers
    otherwise than an OpenAI server would."""
    return fetch_models(base_url, api_key)[0]


def fetch_models(base_url: str, api_key: str | None) -> list[str]:
    """The model ids of GET /v1/models (at least one); raises ValueError as `fetch_model`."""
    import httpx

    url = base_url.rstrip("/") + "/v1/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(url, headers=headers, timeout=30)
    except httpx.HTTPError as e:
        raise ValueError(f"cannot reach {url} ({type(e).__name__}: {e}): is the server running there?") from None
    if r.status_code == 401:
        raise ValueError(f"{url} answered 401: give the server's key with --api_key")
    try:
        ids = [m["id"] for m in r.json()["data"]]
    except (ValueError, KeyError, TypeError):
        ids = []
    if not ids:
        raise ValueError(f"{url} answered HTTP {r.status_code} without a model list: is --url an "
                         "OpenAI-compatible server? (or name the model with --model)")
    return ids


def _unserved_model(a: argparse.Namespace) -> str | None:
    """Where --model was given and the server answers a model list without it, that (a tokenizer not found for a
    wrong name is the symptom, not the cause); else None."""
    if not a.model:
        return None
    try:
        served = fetch_models(a.url, a.api_key)
    except ValueError:
        return None
    if a.model in served:
        return None
    return f"--model {a.model!r}: the server at {a.url} serves {served}"


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    for name in ("num_prompts", "input_len", "output_len", "max_concurrency", "num_clients"):
        v = getattr(a, name)
        if v is not None and v < 1:
            ap.error(f"--{name} must be at least 1, got {v}")
    try:
        import httpx  # noqa: F401
    except ImportError:
        ap.error("bench serve needs httpx: pip install 'shardllm[bench]'")
    if a.num_clients > a.num_prompts:
        ap.error(f"--num_clients {a.num_clients} is more than --num_prompts {a.num_prompts}")
    if a.max_concurrency is not None and a.num_clients > a.max_concurrency:
        ap.error(f"--num_clients {a.num_clients} is more than --max_concurrency {a.max_concurrency} (each client "
                 "process holds a share of it)")
    if not a.url.startswith(("http://", "https://")):
        ap.error(f"--url {a.url!r}: give a base URL such as http://127.0.0.1:8000")
    try:
        model = a.model or fetch_model(a.url, a.api_key)
        if a.dataset == "random":
            specs = random_requests(a.num_prompts, a.input_len, a.output_len or 128, a.tokenizer or model, a.seed)
        else:
            specs = load_sharegpt(a.dataset, a.num_prompts, a.output_len, a.tokenizer or model, a.seed)
    except ValueError as e:
        ap.error(_unserved_model(a) or str(e))
    cpu0 = time.process_time()
    results, duration = run_clients(
        a.num_clients, specs, a.request_rate, a.seed, a.max_concurrency, base_url=a.url, model=model,
        ignore_eos=a.ignore_eos, api_key=a.api_key, timeout=a.request_timeout,
        progress=not a.disable_tqdm and a.num_clients == 1)
    summary = {"model": model, "url": a.url, "dataset": a.dataset, "num_clients": a.num_clients,
               **summarize(results, duration, a.request_rate)}
    print(json.dumps(summary) if a.json else format_report(summary))
    busy = (time.process_time() - cpu0) / duration if duration > 0 else 0.0
    if a.num_clients == 1 and busy > 0.8:
        print(f"shardllm bench serve: note: the client was busy {busy:.0%} of the run, so it may have been the bound "
              "rather than the server: compare with --num_clients 4", file=sys.stderr)
    return 0 if summary["completed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
