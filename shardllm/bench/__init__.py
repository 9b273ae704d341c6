"""Benchmarks: `shardllm bench` (offline throughput of one layout, or a sweep of layouts with the scaling table
and plot: throughput.py, sweep.py, plot.py) and `shardllm bench serve` (a load generator against any
OpenAI-compatible server: serve.py)."""

from __future__ import annotations


def main(argv: list[str]) -> int:
    """`shardllm bench ARGS`: `serve ...` load-tests a server, anything else is the offline benchmark."""
    if argv[:1] == ["serve"]:
        from shardllm.bench.serve import main as serve_main

        return serve_main(argv[1:])
    from shardllm.bench.throughput import main as throughput_main

    return throughput_main(argv)
