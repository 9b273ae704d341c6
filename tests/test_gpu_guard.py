"""The guards around GPU tests (tests/gpu_guard.py, wired in by tests/conftest.py), on CPU: processes a GPU test
leaves running are ended after it, a timeout that the test's signal can interrupt fails that test alone and the
run goes on, and a test stuck where the signal cannot reach ends the run (exit code 3) with its processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from tests.gpu_guard import descendants, end_processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gone(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if all(p != pid for p, _ in descendants(1)):  # not alive anywhere (zombies are not listed)
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_end_processes_ends_what_a_test_left_running():
    before = descendants()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        left = descendants() - before
        assert child.pid in {p for p, _ in left}
        end_processes("this test", left, grace_s=2.0)
        assert child.wait(5) is not None
        assert not descendants() - before
    finally:
        if child.poll() is None:
            child.kill()


SESSION = textwrap.dedent('''
    import os, signal, subprocess, sys, time
    import pytest

    PIDS = os.environ["GUARD_PIDS"]

    def sleeper(name):
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        with open(os.path.join(PIDS, name), "w") as f:
            f.write(str(p.pid))
        return p

    @pytest.mark.gpu
    def test_leaves_a_process():
        sleeper("left")

    @pytest.mark.gpu
    @pytest.mark.timeout(1)
    def test_waits_past_its_timeout():
        sleeper("waited").wait()  # interruptible: the timeout fails this test, the run goes on

    @pytest.mark.gpu
    @pytest.mark.timeout(1)
    def test_stuck_where_the_signal_cannot_reach():
        sleeper("stuck")
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # as inside a blocking CUDA call
        time.sleep(60)

    @pytest.mark.gpu
    def test_never_reached():
        pass
''')


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_gpu_tests_end_their_processes_and_a_stuck_test_ends_the_run(tmp_path):
    (tmp_path / "test_session.py").write_text(SESSION)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: gpu\n")
    pids = tmp_path / "pids"
    pids.mkdir()
    env = {**os.environ, "GUARD_PIDS": str(pids), "GPU_TEST_HARD_TIMEOUT_GRACE_S": "1", "PYTHONPATH": ROOT}
    t = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-v",
                          "-m", "gpu", str(tmp_path / "test_session.py")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    out = run.stdout + run.stderr
    assert run.returncode == 3, out[-3000:]
    assert time.monotonic() - t < 30  # the stuck test's own 60 s sleep did not run out
    assert "test_leaves_a_process PASSED" in out and "test_waits_past_its_timeout FAILED" in out, out[-3000:]
    assert "HARD TIMEOUT: " in out and "test_stuck_where_the_signal_cannot_reach" in out, out[-3000:]
    assert "test_never_reached" not in out.split("HARD TIMEOUT")[1]
    for name in ("left", "waited", "stuck"):
        assert gone(int((pids / name).read_text())), name


DEADLINE_SESSION = textwrap.dedent('''
    import pytest

    @pytest.mark.gpu
    def test_gpu_one():
        pass

    def test_cpu_one():
        pass
''')


def test_gpu_tests_after_the_suite_deadline_are_skipped_not_started(tmp_path):
    """GPU_SUITE_DEADLINE (benchmarks/device_gpu_suite.sh): GPU tests due after it are skipped with the reason, so a
    slow run still ends with pytest's counts; other tests, and a deadline still ahead, change nothing."""
    (tmp_path / "test_deadline.py").write_text(DEADLINE_SESSION)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: gpu\n")

    def run(deadline: float) -> str:
        env = {**os.environ, "GPU_SUITE_DEADLINE": str(deadline), "PYTHONPATH": ROOT}
        done = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
                               "-v", "-rs", str(tmp_path / "test_deadline.py")], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
        return done.stdout + done.stderr

    late = run(time.time() - 1)
    assert "test_gpu_one SKIPPED" in late and "GPU_SUITE_DEADLINE passed" in late, late[-2000:]
    assert "test_cpu_one PASSED" in late
    ahead = run(time.time() + 600)
    assert "test_gpu_one PASSED" in ahead and "test_cpu_one PASSED" in ahead, ahead[-2000:]
