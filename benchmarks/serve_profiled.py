"""`shardllm serve` with a stack sampler and / or another GIL switch interval: where the server's threads spend a
serving benchmark (benchmarks/device_s27_b.sh).

The sampler is a thread that reads every thread's Python stack (`sys._current_frames`) every `--sample_ms` and
counts, per thread name, the innermost function (self) and every function on the stack (inclusive). A thread
blocked in C (a CUDA synchronize, `select`, a lock) is counted where it blocks; a thread waiting for the GIL is
counted where it will resume. It writes the table to `--sample_out` every 5 s and at exit.

Usage: python benchmarks/serve_profiled.py [--sample_out FILE] [--sample_ms 2] [--switch_interval_ms X] -- ARGS
(ARGS: `shardllm serve`'s).
"""

from __future__ import annotations

import argparse
import atexit
import collections
import sys
import threading
import time


class StackSampler:
    def __init__(self, path: str, interval_s: float, depth: int = 40):
        self.path, self.interval_s, self.depth = path, interval_s, depth
        self.samples: collections.Counter = collections.Counter()
        self.self_counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.incl_counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self._me = None

    def start(self) -> None:
        t = threading.Thread(target=self._run, name="stack-sampler", daemon=True)
        t.start()
        self._me = t.ident
        atexit.register(self.write)

    def _run(self) -> None:
        last_write = time.monotonic()
        while True:
            time.sleep(self.interval_s)
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == self._me:
                    continue
                name = names.get(ident, str(ident))
                self.samples[name] += 1
                seen = set()
                f, level = frame, 0
                while f is not None and level < self.depth:
                    code = f.f_code
                    key = f"{code.co_filename.rsplit('/', 2)[-1]}:{code.co_name}"
                    if level == 0:
                        self.self_counts[name][f"{key}:{f.f_lineno}"] += 1
                    if key not in seen:
                        self.incl_counts[name][key] += 1
                        seen.add(key)
                    f, level = f.f_back, level + 1
            if time.monotonic() - last_write > 5:
                self.write()
                last_write = time.monotonic()

    def write(self) -> None:
        try:
            self._write()
        except RuntimeError:  # the sampler thread changed a table meanwhile (at exit): the last periodic copy stays
            pass

    def _write(self) -> None:
        lines = []
        for name, n in self.samples.most_common():
            lines.append(f"== thread {name}: {n} samples")
            lines.append("-- self (innermost frame)")
            lines += [f"{c / n:6.1%}  {k}" for k, c in self.self_counts[name].most_common(30)]
            lines.append("-- inclusive")
            lines += [f"{c / n:6.1%}  {k}" for k, c in self.incl_counts[name].most_common(45)]
        with open(self.path, "w") as f:
            f.write("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sample_out", default=None)
    ap.add_argument("--sample_ms", type=float, default=2.0)
    ap.add_argument("--switch_interval_ms", type=float, default=None, help="sys.setswitchinterval (default 5 ms)")
    ap.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    if a.switch_interval_ms is not None:
        sys.setswitchinterval(a.switch_interval_ms / 1e3)
    if a.sample_out:
        StackSampler(a.sample_out, a.sample_ms / 1e3).start()
    from shardllm.entrypoints.cli import main as cli_main

    return cli_main(["serve", *args])


if __name__ == "__main__":
    sys.exit(main())
