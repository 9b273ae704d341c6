"""The container image's HEALTHCHECK (deploy/docker/Dockerfile): exit 0 when the running server's /health answers 200.

It asks on the address that server serves: the server's own command line (read from /proc) gives --port and --host,
or its --config file does, so a container started with `--port 9000` is checked on 9000. The server is PID 1 (the
image's exec-form ENTRYPOINT), or below it when an init process runs first (`docker run --init`). On failure the
reason goes to stderr (Docker keeps the last outputs in `docker inspect`).

Standard library only, and run by path (`runpy.run_path`), never as `shardllm....`: importing the package imports
torch, seconds that a 5 s health-check timeout cannot spare. Hence its own small reading of serve's three flags,
which tests/deploy/test_healthcheck.py holds equal to `shardllm serve`'s parser.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.request

DEFAULT_PORT = 8000
_WILDCARDS = {"", "0.0.0.0", "::", "localhost"}  # bound on every address (or loopback): ask loopback


def _seconds(v: str) -> float:
    """argparse type: a finite number of seconds > 0 (arg_types.positive_float's rule; this file imports
    nothing of the package)."""
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {v!r}") from None
    if not 0 < x < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {v}")
    return x


def serve_args(argv: list[str]) -> list[str] | None:
    """The arguments after `serve` when `argv` runs the server (`shardllm-serve ...`, `shardllm serve ...`,
    `python -m shardllm.entrypoints.cli serve ...`), else None."""
    for i, a in enumerate(argv):
        name = os.path.basename(a)
        if name == "shardllm-serve":
            return argv[i + 1:]
        if name in ("shardllm", "shardllm.entrypoints.cli") and argv[i + 1:i + 2] == ["serve"]:
            return argv[i + 2:]
    return None


def _read_argv(proc: str, pid: str) -> list[str]:
    try:
        with open(os.path.join(proc, pid, "cmdline"), "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _parent(proc: str, pid: str) -> str | None:
    try:
        with open(os.path.join(proc, pid, "stat")) as f:
            return f.read().rsplit(")", 1)[1].split()[1]  # the field after the state
    except (OSError, IndexError):
        return None


def find_server(root_pid: int = 1, proc: str = "/proc") -> tuple[str, list[str]] | None:
    """(pid, serve arguments) of the server: `root_pid` itself, else a process below it; None if none runs."""
    root = str(root_pid)
    args = serve_args(_read_argv(proc, root))
    if args is not None:
        return root, args
    try:
        pids = sorted((p for p in os.listdir(proc) if p.isdigit()), key=int)
    except OSError:
        return None
    for pid in pids:
        args = serve_args(_read_argv(proc, pid))
        if args is None:
            continue
        seen, p = set(), pid
        while p is not None and p not in seen and p != "0":  # walk up to the root
            if p == root:
                return pid, args
            seen.add(p)
            p = _parent(proc, p)
    return None


def _flag(args: list[str], name: str) -> str | None:
    """The value of `--name V` / `--name=V` in `args` (the last one wins, as with argparse), else None."""
    value = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a[len(name) + 1:]
    return value


def served_address(args: list[str], cwd: str = ".", environ: dict[str, str] | None = None) -> tuple[str, int]:
    """(host to ask, port) for a server started with `serve` `args`: the flags, else its --config file, else
    $SHARDLLM_HOST and the defaults (as `shardllm serve` resolves them, cli.resolve_settings)."""
    environ = os.environ if environ is None else environ
    settings: dict = {}
    config = _flag(args, "--config")
    if config:
        try:
            import yaml

            with open(os.path.join(cwd, config)) as f:
                data = yaml.safe_load(f)
            settings = data if isinstance(data, dict) else {}
        except Exception:  # no yaml, or the file is gone since the server read it: the defaults
            settings = {}
    port = _flag(args, "--port") or settings.get("port") or DEFAULT_PORT
    host = _flag(args, "--host") or settings.get("host") or environ.get("SHARDLLM_HOST") or "localhost"
    host = "127.0.0.1" if host in _WILDCARDS else host
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="healthcheck.py",
                                description="Exit 0 when the running shardllm server's /health answers 200.")
    p.add_argument("--pid", type=int, default=1, help="the server's process, or one above it (default 1)")
    p.add_argument("--timeout", type=_seconds, default=4.0, help="seconds to wait for /health")
    a = p.parse_args(argv)
    found = find_server(a.pid)
    if found is None:
        print(f"healthcheck: no `shardllm serve` process at or below pid {a.pid}", file=sys.stderr)
        return 1
    pid, args = found
    try:
        host, port = served_address(args, cwd=os.path.realpath(f"/proc/{pid}/cwd"))
    except ValueError as e:  # a port that is not a number: the server would have refused it too
        print(f"healthcheck: the command line of pid {pid}: {e}", file=sys.stderr)
        return 1
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=a.timeout) as r:
            ok = r.status == 200
    except Exception as e:  # refused, timed out, 503 (HTTPError): not healthy
        print(f"healthcheck: {url}: {e}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
