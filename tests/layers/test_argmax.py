"""layers/argmax.greedy_argmax equals torch.argmax(dim=-1): the first index of the largest value, NaN largest, for
ties inside and across chunks, +inf / -inf rows, vocabularies that are and are not multiples of the chunk, strided
rows and out=; under the interpreter on CPU, and on a GPU (eagerly and replayed from a CUDA graph)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from shardllm.layers import argmax  # noqa: E402
from tests.layers.test_triton_attention import cpu, gpu  # noqa: E402

CHUNK = argmax.CHUNK


def cases(device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = []
    for rows, vocab in ((1, 128256), (3, 5000), (2, CHUNK), (4, 37), (16, 2 * CHUNK + 1)):
        out.append((torch.randn(rows, vocab, generator=g) * 4).to(dtype))
    x = torch.zeros(6, 3 * CHUNK + 5)
    x[0, [7, CHUNK + 3, 2 * CHUNK]] = 5.0  # a tie across chunks: the first wins
    x[1, [CHUNK + 9, CHUNK + 2]] = 5.0  # a tie inside one chunk
    x[2, :] = float("-inf")  # every value -inf: index 0
    x[3, [CHUNK + 1, 2 * CHUNK + 4]] = float("inf")  # +inf above every number, first wins
    x[3, 0] = 1e30
    x[4, [2 * CHUNK + 1, CHUNK + 8]] = float("nan")  # NaN above +inf, first NaN wins
    x[4, 3] = float("inf")
    x[5, -1] = 1.0  # the last value of a short last chunk
    out.append(x.to(dtype))
    wide = torch.randn(3, 9000, generator=g).to(dtype)
    out.append(wide[:, :7000])  # rows 9,000 apart: stride(0) != vocab
    return [t.to(device) for t in out]


def check(device: str, dtype: torch.dtype) -> None:
    for x in cases(device, dtype):
        want = torch.argmax(x.float(), dim=-1)
        got = argmax.greedy_argmax(x, force=True)
        assert got.dtype == torch.long and torch.equal(got, want), (x.shape, got, want)
        into = torch.full((x.shape[0],), -1, dtype=torch.long, device=device)
        assert argmax.greedy_argmax(x, out=into, force=True) is into and torch.equal(into, want)


@cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_equals_torch_argmax_on_cpu(dtype):
    check("cpu", dtype)


@cpu
def test_strided_out_float64_and_empty_rows():
    """A strided out= gets the answer; float64 (not exact in the kernels' fp32) and an empty row take torch's
    path, whose answer or error is the reference's."""
    x = torch.randn(3, 5000)
    strided = torch.full((6,), -1, dtype=torch.long)[::2]
    assert argmax.greedy_argmax(x, out=strided, force=True) is strided
    assert torch.equal(strided, torch.argmax(x, dim=-1))
    y = torch.zeros(1, 9, dtype=torch.float64)
    y[0, 2], y[0, 7] = 1.0, 1.0 + 1e-12  # equal in fp32
    assert int(argmax.greedy_argmax(y, force=True)) == 7
    with pytest.raises((IndexError, RuntimeError)):
        argmax.greedy_argmax(torch.empty(2, 0), force=True)


def test_applies_only_to_small_batches_of_cuda_logits(monkeypatch):
    """CPU tensors and batches past MAX_ROWS keep torch.argmax (the same answer either way)."""
    x = torch.randn(2, 100)
    assert not argmax.applies(x)
    assert torch.equal(argmax.greedy_argmax(x), torch.argmax(x, dim=-1))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # the device is the boundary
    if argmax.HAS_TRITON and argmax.ENABLED:
        assert argmax.applies(torch.randn(argmax.MAX_ROWS, 100))
    assert not argmax.applies(torch.randn(argmax.MAX_ROWS + 1, 100))
    assert not argmax.applies(torch.randn(100))
    assert not argmax.applies(torch.randn(2, 100, dtype=torch.float64))
    monkeypatch.setattr(argmax, "ENABLED", False)
    assert not argmax.applies(torch.randn(2, 100))


@gpu
@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_torch_argmax_on_gpu_and_in_a_cuda_graph(dtype):
    check("cuda", dtype)
    x = torch.randn(1, 128256, device="cuda", dtype=dtype)
    out = torch.empty(1, dtype=torch.long, device="cuda")
    argmax.greedy_argmax(x, out=out)  # compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        argmax.greedy_argmax(x, out=out)
    for seed in range(3):
        x.copy_(torch.randn(1, 128256, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)))
        graph.replay()
        assert torch.equal(out, torch.argmax(x, dim=-1))
