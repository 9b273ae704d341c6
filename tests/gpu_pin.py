"""GPU_SUITE_PIN=N (benchmarks/device_gpu_suite.sh in parallel mode): pytest-xdist worker gwK sees one GPU, the
(K mod N)-th of those visible, through CUDA_VISIBLE_DEVICES set before CUDA starts (tests/conftest.py calls this
before anything touches torch.cuda), so that two workers' single-GPU tests run on two GPUs at once instead of both
on GPU 0. Tests that need two GPUs carry the `multi_gpu` marker and run in the suite's serial pass. Imports nothing
heavy: it runs before torch initializes CUDA."""

from __future__ import annotations

from collections.abc import MutableMapping


def pin_worker_gpu(environ: MutableMapping[str, str]) -> str | None:
    """Sets environ["CUDA_VISIBLE_DEVICES"] to this xdist worker's GPU and returns it; None (environ unchanged)
    outside an xdist worker or without GPU_SUITE_PIN.

    Raises:
        ValueError: GPU_SUITE_PIN is not a positive integer, or names more GPUs than CUDA_VISIBLE_DEVICES lists (an
            empty CUDA_VISIBLE_DEVICES lists none).
    """
    worker, pin = environ.get("PYTEST_XDIST_WORKER", ""), environ.get("GPU_SUITE_PIN", "")
    if not pin or not worker.startswith("gw"):
        return None
    if not pin.isdigit() or int(pin) < 1:
        raise ValueError(f"GPU_SUITE_PIN={pin!r}: give the number of GPUs to spread the workers over, e.g. 2")
    n = int(pin)
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None and not listed.strip():
        raise ValueError("GPU_SUITE_PIN is set but CUDA_VISIBLE_DEVICES is empty (no GPU visible): unset one of them")
    visible = [d for d in listed.split(",") if d.strip()] if listed is not None else [str(i) for i in range(n)]
    if n > len(visible):
        raise ValueError(f"GPU_SUITE_PIN={n} but CUDA_VISIBLE_DEVICES lists {len(visible)} GPUs ({visible})")
    gpu = visible[int(worker[2:]) % n].strip()
    environ["CUDA_VISIBLE_DEVICES"] = gpu
    return gpu
