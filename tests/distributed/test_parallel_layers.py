"""Parallel layers on 2 real gloo processes against nn.Linear / nn.Embedding holding the full weights.

A process start costs seconds here, so both ranks run every check in one spawn and each test reads its
check's outcome on every rank. The weights live in a safetensors file; each layer is loaded twice, from
the whole tensor and from a lazy `get_slice`, and the slice records what it read: only this rank's shard.
"""

from __future__ import annotations

import doctest
import multiprocessing as mp
import queue
import socket
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shardllm.distributed import parallel_state
from shardllm.distributed.parallel_state import rank_layout

TP = 2
HIDDEN = 16
HEAD_SIZE = 4
NUM_HEADS = 4
VOCAB = 11  # not a multiple of TP: padded to 12, and rank 1 holds rows 6..10 plus one padding row
EMBED_DIM = 8
GATE, UP = 8, 12  # unequal parts, so the offset of `up` inside gate_up_proj matters
NUM_TOKENS = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    t = {
        "x": rand(NUM_TOKENS, HIDDEN),
        "x_row": rand(NUM_TOKENS, 12),
        "ids": torch.tensor([0, 5, 6, 10, 3, 10, 7]),  # both ranks' rows, the first and last of the vocab
        "col.weight": rand(12, HIDDEN), "col.bias": rand(12),
        "gate.weight": rand(GATE, HIDDEN), "gate.bias": rand(GATE),
        "up.weight": rand(UP, HIDDEN), "up.bias": rand(UP),
        "row.weight": rand(HIDDEN, 12), "row.bias": rand(HIDDEN),
        "embed.weight": rand(VOCAB, EMBED_DIM),
        "lm_head.weight": rand(VOCAB, EMBED_DIM),
        "h": rand(NUM_TOKENS, EMBED_DIM),
    }
    for kv in (1, 2):
        t[f"q{kv}.weight"], t[f"q{kv}.bias"] = rand(NUM_HEADS * HEAD_SIZE, HIDDEN), rand(NUM_HEADS * HEAD_SIZE)
        for p in "kv":
            t[f"{p}{kv}.weight"], t[f"{p}{kv}.bias"] = rand(kv * HEAD_SIZE, HIDDEN), rand(kv * HEAD_SIZE)
    return t


class RecordingSlice:
    """A safetensors slice that counts the elements each read returns."""

    def __init__(self, sl):
        self.sl = sl
        self.numel_read = 0

    def get_shape(self):
        return self.sl.get_shape()

    def __getitem__(self, index):
        out = self.sl[index]
        self.numel_read += out.numel()
        return out


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    ref = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        ref.weight.copy_(weight)
        if bias is not None:
            ref.bias.copy_(bias)
    return ref


def _load_both(make, t: dict, f, loads: list[tuple[str, str, object, int]]):
    """Build two layers; fill one from tensors and one from recording slices.

    loads: (parameter name, checkpoint name, shard id, elements this rank must read).
    """
    a, b = make(), make()
    for param_name, ckpt_name, shard_id, numel in loads:
        args = () if shard_id is None else (shard_id,)
        pa, pb = getattr(a, param_name), getattr(b, param_name)
        pa.weight_loader(pa, t[ckpt_name], *args)
        sl = RecordingSlice(f.get_slice(ckpt_name))
        pb.weight_loader(pb, sl, *args)
        assert sl.numel_read == numel, (ckpt_name, sl.numel_read, numel)
    for name, p in a.named_parameters():
        torch.testing.assert_close(p, dict(b.named_parameters())[name], rtol=0, atol=0)
    return a, b


def _shard(y: torch.Tensor, rank: int, n: int) -> torch.Tensor:
    return y[..., rank * n:(rank + 1) * n]


# ---- checks, run on every rank ---------------------------------------------------------------------------------


def check_context(rank, t, f):
    ctx = parallel_state.get_parallel_context()
    assert (ctx.rank, ctx.world_size, ctx.tp_rank, ctx.tp_size, ctx.pp_rank, ctx.pp_size) == (rank, TP, rank, TP, 0, 1)
    assert ctx.tp_group is not None and ctx.is_output_rank == (rank == 0) and ctx.is_last_stage


def check_column(rank, t, f):
    from shardllm.layers.linear import ColumnParallelLinear

    n = 12 // TP
    a, b = _load_both(lambda: ColumnParallelLinear(HIDDEN, 12, bias=True), t, f,
                      [("weight", "col.weight", None, n * HIDDEN), ("bias", "col.bias", None, n)])
    assert a.weight.shape == (n, HIDDEN)
    ref = _linear(t["col.weight"], t["col.bias"])(t["x"])  # (T, 12)
    torch.testing.assert_close(a(t["x"]), _shard(ref, rank, n))
    torch.testing.assert_close(b(t["x"]), _shard(ref, rank, n))


def check_merged_column(rank, t, f):
    from shardllm.layers.linear import MergedColumnParallelLinear

    g, u = GATE // TP, UP // TP
    a, b = _load_both(lambda: MergedColumnParallelLinear(HIDDEN, [GATE, UP], bias=True), t, f,
                      [("weight", "gate.weight", 0, g * HIDDEN), ("bias", "gate.bias", 0, g),
                       ("weight", "up.weight", 1, u * HIDDEN), ("bias", "up.bias", 1, u)])
    gate = _linear(t["gate.weight"], t["gate.bias"])(t["x"])
    up = _linear(t["up.weight"], t["up.bias"])(t["x"])
    expected = torch.cat([_shard(gate, rank, g), _shard(up, rank, u)], dim=-1)  # (T, g + u): [gate; up]
    torch.testing.assert_close(a(t["x"]), expected)
    torch.testing.assert_close(b(t["x"]), expected)


def check_merged_column_fused(rank, t, f):
    """A checkpoint holding gate_up_proj fused as [gate; up] (shard_id None) must still give [gate_r; up_r]."""
    from shardllm.layers.linear import MergedColumnParallelLinear

    layer = MergedColumnParallelLinear(HIDDEN, [GATE, GATE], bias=False)
    fused = torch.cat([t["gate.weight"], t["up.weight"][:GATE]])  # (2 * GATE, H)
    layer.weight.weight_loader(layer.weight, fused)
    g = GATE // TP
    expected = torch.cat([fused[rank * g:(rank + 1) * g], fused[GATE + rank * g:GATE + (rank + 1) * g]])
    torch.testing.assert_close(layer.weight, expected)


def _check_qkv(rank, t, f, num_kv):
    from shardllm.layers.linear import QKVParallelLinear

    q = NUM_HEADS // TP * HEAD_SIZE
    kv_per_rank = max(1, num_kv // TP)
    replicas = max(1, TP // num_kv)
    kv = kv_per_rank * HEAD_SIZE
    loads = [("weight", f"q{num_kv}.weight", "q", q * HIDDEN), ("bias", f"q{num_kv}.bias", "q", q)]
    for p in "kv":
        loads += [("weight", f"{p}{num_kv}.weight", p, kv * HIDDEN), ("bias", f"{p}{num_kv}.bias", p, kv)]
    a, b = _load_both(lambda: QKVParallelLinear(HIDDEN, HEAD_SIZE, NUM_HEADS, num_kv, bias=True), t, f, loads)
    assert (a.num_heads, a.num_kv_heads, a.num_kv_head_replicas) == (NUM_HEADS // TP, kv_per_rank, replicas)
    kv_head = rank // replicas  # the kv head (or first of them) this rank's query heads attend with
    expected = torch.cat([
        _shard(_linear(t[f"q{num_kv}.weight"], t[f"q{num_kv}.bias"])(t["x"]), rank, q),
        _shard(_linear(t[f"k{num_kv}.weight"], t[f"k{num_kv}.bias"])(t["x"]), kv_head, kv),
        _shard(_linear(t[f"v{num_kv}.weight"], t[f"v{num_kv}.bias"])(t["x"]), kv_head, kv),
    ], dim=-1)  # (T, q + 2 kv)
    torch.testing.assert_close(a(t["x"]), expected)
    torch.testing.assert_close(b(t["x"]), expected)


def check_qkv(rank, t, f):
    _check_qkv(rank, t, f, num_kv=2)


def check_qkv_replicated_kv(rank, t, f):
    _check_qkv(rank, t, f, num_kv=1)


def check_row(rank, t, f):
    from shardllm.layers.linear import RowParallelLinear

    n = 12 // TP
    a, b = _load_both(lambda: RowParallelLinear(12, HIDDEN, bias=True), t, f,
                      [("weight", "row.weight", None, HIDDEN * n), ("bias", "row.bias", None, HIDDEN)])
    assert a.weight.shape == (HIDDEN, n)
    ref = _linear(t["row.weight"], t["row.bias"])(t["x_row"])  # (T, H): bias added once
    x = _shard(t["x_row"], rank, n)  # this rank's input features, as a column-parallel layer leaves them
    torch.testing.assert_close(a(x), ref)
    torch.testing.assert_close(b(x), ref)


def _vocab_rows(rank: int) -> int:
    per_rank = -(-VOCAB // TP)
    return max(0, min(VOCAB, (rank + 1) * per_rank) - rank * per_rank)


def check_vocab_embedding(rank, t, f):
    from shardllm.layers.vocab_embedding import VocabParallelEmbedding

    a, b = _load_both(lambda: VocabParallelEmbedding(VOCAB, EMBED_DIM), t, f,
                      [("weight", "embed.weight", None, _vocab_rows(rank) * EMBED_DIM)])
    assert a.num_embeddings_padded == 12 and a.weight.shape == (6, EMBED_DIM)
    ref = nn.Embedding.from_pretrained(t["embed.weight"])(t["ids"])  # (T, E)
    torch.testing.assert_close(a(t["ids"]), ref)
    torch.testing.assert_close(b(t["ids"]), ref)


def check_lm_head(rank, t, f):
    from shardllm.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding

    a, b = _load_both(lambda: ParallelLMHead(VOCAB, EMBED_DIM), t, f,
                      [("weight", "lm_head.weight", None, _vocab_rows(rank) * EMBED_DIM)])
    ref = F.linear(t["h"], t["lm_head.weight"])  # (T, V), no padding column
    torch.testing.assert_close(a.compute_logits(t["h"]), ref)
    torch.testing.assert_close(b.compute_logits(t["h"]), ref)
    embed = VocabParallelEmbedding(VOCAB, EMBED_DIM)
    embed.weight.weight_loader(embed.weight, t["embed.weight"])
    tied = ParallelLMHead(VOCAB, EMBED_DIM)
    tied.tie_weights(embed)
    torch.testing.assert_close(tied.compute_logits(t["h"]), F.linear(t["h"], t["embed.weight"]))


def check_all_gather(rank, t, f):
    """tp_all_gather (one flat all-gather, then a cat along `dim`) against the gather written out: any dim,
    non-contiguous and integer input, the all-gather_single / all_gather_into_tensor path both."""
    import torch.distributed as dist

    from shardllm.distributed.communication import tp_all_gather

    def part(r, *shape, dtype=torch.float32):  # rank r's tensor, known on every rank
        g = torch.Generator().manual_seed(100 + r)
        return (torch.randn(*shape, generator=g) * 100).to(dtype)

    cases = [((5, 3), -1, torch.float32), ((5, 3), 0, torch.float32), ((2, 3, 4), 1, torch.float32),
             ((2, 3, 4), -1, torch.int64), ((0, 6), -1, torch.float32)]
    for shape, dim, dtype in cases:
        want = torch.cat([part(r, *shape, dtype=dtype) for r in range(TP)], dim=dim)
        assert torch.equal(tp_all_gather(part(rank, *shape, dtype=dtype), dim=dim), want), (shape, dim, dtype)
    x = part(rank, 4, 6).t()  # (6, 4), not contiguous
    assert torch.equal(tp_all_gather(x, dim=-1), torch.cat([part(r, 4, 6).t() for r in range(TP)], dim=-1))
    single = getattr(dist, "all_gather_single", None)
    if single is not None:  # torch 2.13: also the older call the code takes on torch 2.11
        dist.all_gather_single = None
        try:
            assert torch.equal(tp_all_gather(part(rank, 5, 3), dim=-1),
                               torch.cat([part(r, 5, 3) for r in range(TP)], dim=-1))
        finally:
            dist.all_gather_single = single


def check_divisibility_errors(rank, t, f):
    from shardllm.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear

    for make, words in [(lambda: ColumnParallelLinear(HIDDEN, 7), "output size 7"),
                        (lambda: RowParallelLinear(7, HIDDEN), "input size 7"),
                        (lambda: QKVParallelLinear(HIDDEN, HEAD_SIZE, 3, 3), "attention heads")]:
        with pytest.raises(ValueError, match=words):
            make()


CHECKS = {fn.__name__.removeprefix("check_"): fn for fn in [
    check_context, check_column, check_merged_column, check_merged_column_fused, check_qkv,
    check_qkv_replicated_kv, check_row, check_vocab_embedding, check_lm_head, check_all_gather,
    check_divisibility_errors]}


def _rank_main(rank: int, port: int, path: str, results) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    out = {}
    try:
        parallel_state.init_distributed(rank, TP, tp_size=TP, pp_size=1, ep_size=1, backend="gloo",
                                        init_method=f"tcp://127.0.0.1:{port}", timeout_s=60)
        t = load_file(path)
        with safe_open(path, framework="pt") as f, torch.no_grad():
            for name, check in CHECKS.items():
                try:
                    check(rank, t, f)
                    out[name] = "ok"
                except Exception:
                    out[name] = traceback.format_exc()
        parallel_state.destroy_distributed()
    except Exception:
        out["setup"] = traceback.format_exc()
    results.put((rank, out))


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict[str, str]]:
    """Every check's outcome per rank: "ok" or the traceback."""
    from safetensors.torch import save_file

    path = str(tmp_path_factory.mktemp("layers") / "weights.safetensors")
    save_file(_make_tensors(), path)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, path, results)) for r in range(TP)]
    for p in procs:
        p.start()
    outs: dict[int, dict] = {}
    try:
        for _ in range(TP):
            rank, out = results.get(timeout=180)
            outs[rank] = out
    except queue.Empty:
        pytest.fail(f"ranks {sorted(set(range(TP)) - set(outs))} gave no results within 180 s")
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    for rank, out in outs.items():
        assert "setup" not in out, f"rank {rank}:\n{out['setup']}"
    return [outs[r] for r in range(TP)]


def _assert_ok(rank_results, check: str) -> None:
    failed = {r: out[check] for r, out in enumerate(rank_results) if out[check] != "ok"}
    assert not failed, "\n".join(f"rank {r}:\n{tb}" for r, tb in failed.items())


def test_init_distributed_builds_the_tp_context(rank_results):
    _assert_ok(rank_results, "context")


def test_column_parallel_splits_the_output(rank_results):
    _assert_ok(rank_results, "column")


def test_merged_column_holds_gate_and_up_shards(rank_results):
    _assert_ok(rank_results, "merged_column")


def test_merged_column_loads_a_fused_checkpoint_tensor(rank_results):
    _assert_ok(rank_results, "merged_column_fused")


def test_qkv_splits_query_and_kv_heads(rank_results):
    _assert_ok(rank_results, "qkv")


def test_qkv_replicates_kv_heads_when_tp_exceeds_them(rank_results):
    _assert_ok(rank_results, "qkv_replicated_kv")


def test_row_parallel_all_reduces_and_adds_bias_once(rank_results):
    _assert_ok(rank_results, "row")


def test_vocab_embedding_with_padded_vocab(rank_results):
    _assert_ok(rank_results, "vocab_embedding")


def test_lm_head_gathers_full_logits_without_padding(rank_results):
    _assert_ok(rank_results, "lm_head")


def test_sizes_that_do_not_split_raise(rank_results):
    _assert_ok(rank_results, "divisibility_errors")


def test_rank_layout_docstring_example():
    tests = doctest.DocTestFinder().find(rank_layout)
    runner = doctest.DocTestRunner()
    for test in tests:
        runner.run(test)
    assert runner.tries >= 1 and runner.failures == 0


@pytest.mark.parametrize("tp, pp, tp_groups, pp_groups", [
    (3, 2, [[0, 1, 2], [3, 4, 5]], [[0, 3], [1, 4], [2, 5]]),
    (2, 3, [[0, 1], [2, 3], [4, 5]], [[0, 2, 4], [1, 3, 5]]),
    (1, 1, [[0]], [[0]]),
])
def test_rank_layout(tp, pp, tp_groups, pp_groups):
    assert rank_layout(tp, pp) == (tp_groups, pp_groups)


def test_tp_all_gather_concatenates_ranks_along_any_dim(rank_results):
    _assert_ok(rank_results, "all_gather")
