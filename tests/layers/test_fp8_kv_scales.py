"""FP8 KV cache without checkpoint scales: per-layer k/v scales computed on the first step (powers of two, the amax
over the tp group), so a model whose k and v exceed e4m3's +-448 still gives the unquantized cache's tokens."""

from __future__ import annotations

import json
import os

import pytest
import torch

from shardllm import LLM, SamplingParams
from shardllm.layers.quantization.kv_cache import calibrated_scale

PROMPTS = [[1, 17, 33, 5, 9, 101, 7], [3, 4], [250, 14, 88, 19, 201, 6, 6, 6, 42, 71, 300, 12, 9]]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
KV_GAIN = 256.0  # k_proj, v_proj x 256 and q_proj, o_proj / 256: exactly the same function, |k|, |v| past 448


@pytest.mark.parametrize("amax,fp8,scale", [
    (20.0, torch.float8_e4m3fn, 2.0**-2),  # 20 / 0.25 = 80, in (56, 112]
    (112.0, torch.float8_e4m3fn, 1.0),
    (112.5, torch.float8_e4m3fn, 2.0),
    (3000.0, torch.float8_e4m3fn, 32.0),
    (0.0, torch.float8_e4m3fn, 1.0),  # an all-zero step: a finite scale
    (3000.0, torch.float8_e5m2, 2.0**-2),  # e5m2's quarter range is 14336
])
def test_calibrated_scale_is_the_power_of_two_leaving_4x_headroom(amax, fp8, scale):
    s = calibrated_scale(torch.tensor(amax), fp8)
    assert float(s) == scale
    if amax:
        assert float(torch.finfo(fp8).max) / 8 < amax / float(s) <= float(torch.finfo(fp8).max) / 4


@pytest.fixture(scope="module")
def big_kv_checkpoint(tiny_checkpoints, tmp_path_factory):
    """The tiny llama with k and v x KV_GAIN (q and o divided back, exactly: a power of two): |k|, |v| ~1,000."""
    from safetensors.torch import load_file, save_file

    src = tiny_checkpoints["llama"]
    dst = tmp_path_factory.mktemp("big_kv")
    t = load_file(os.path.join(src, "model.safetensors"))
    for name in list(t):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            t[name] = t[name] * KV_GAIN
        elif name.endswith(("q_proj.weight", "o_proj.weight")):
            t[name] = t[name] / KV_GAIN
    save_file(t, str(dst / "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        (dst / "config.json").write_text(json.dumps(json.load(f)))
    return str(dst)


def _generate(path, kv, calibrate=True, **kw) -> dict:
    llm = LLM(path, device="cpu", num_kv_blocks=100, block_size=4, kv_cache_dtype=kv, **kw)
    try:
        worker = getattr(llm.engine.executor, "worker", None)  # one rank: look inside; tp: only the tokens
        runner = worker.model_runner if worker is not None else None
        if runner is not None and not calibrate:
            runner._calibrate_kv = False  # what the cache did before: every scale 1.0
        if runner is None:
            return {"tokens": [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]}
        scales = lambda: [(float(a.k_scale), float(a.v_scale)) for a in runner.attn_layers]  # noqa: E731
        run = {"before": scales(), "ptrs": [a.k_scale.data_ptr() for a in runner.attn_layers],
               "calibrate_first_step": runner._calibrate_kv}
        run["tokens"] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        run["scales"], run["cache_amax"] = scales(), [float(c.float().abs().max()) for c in runner.kv_caches]
        llm.generate([[p * 3 % 300 for p in PROMPTS[2]]], GREEDY, use_tqdm=False)  # a later step, other values
        run["scales_later"] = scales()
        run["ptrs_later"] = [a.k_scale.data_ptr() for a in runner.attn_layers]
        run["flags_later"] = [a.calibrate_kv_scales for a in runner.attn_layers]
        return run
    finally:
        llm.shutdown()


def _same(a, b):
    return sum(x == y for s, t in zip(a, b) for x, y in zip(s, t))


@pytest.fixture(scope="module")
def runs(big_kv_checkpoint):
    return {"auto": _generate(big_kv_checkpoint, "auto"), "fp8": _generate(big_kv_checkpoint, "fp8"),
            "fp8@1.0": _generate(big_kv_checkpoint, "fp8", calibrate=False)}


def test_k_and_v_beyond_448_keep_the_unquantized_cache_tokens(runs):
    ref, got = runs["auto"]["tokens"], runs["fp8"]["tokens"]
    assert _same(ref, got) >= 0.75 * 3 * 8  # no saturation: most tokens unchanged (24 of 24 measured; 5 at 1.0)
    for (k_scale, v_scale), amax in zip(runs["fp8"]["scales"], runs["fp8"]["cache_amax"]):
        assert k_scale >= 2.0 and v_scale >= 2.0  # |k|, |v| > 448 at scale 1.0
        assert amax < 448  # nothing saturated
    # scale 1.0 (the old behaviour) saturates k and v at 448: its tokens part from the unquantized ones
    assert all(amax == 448 for amax in runs["fp8@1.0"]["cache_amax"])
    assert _same(ref, runs["fp8@1.0"]["tokens"]) < _same(ref, got)


def test_scales_are_computed_once_and_updated_in_place(runs):
    """CUDA graphs read the scale tensors: computed on the first step, never replaced, never recomputed."""
    run = runs["fp8"]
    assert run["before"] == [(1.0, 1.0)] * 2 and run["scales"] != run["before"]
    assert run["scales_later"] == run["scales"] and run["ptrs_later"] == run["ptrs"]
    assert not any(run["flags_later"])


def test_tp2_scales_equal_one_ranks_tokens(big_kv_checkpoint, runs):
    """The amax is taken over the tp group: both ranks hold tp = 1's scales, so tp = 2 gives tp = 1's tokens."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokens = _generate(big_kv_checkpoint, "fp8", tensor_parallel_size=2)["tokens"]
    finally:
        torch.set_num_threads(threads)
    assert tokens == runs["fp8"]["tokens"]


@pytest.mark.gpu
@pytest.mark.timeout(150)  # three engines
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernels_and_graphs_read_the_computed_scales(big_kv_checkpoint):
    """On the GPU: the Triton write / attention kernels and the decode CUDA graphs (captured before the first step
    computes the scales, reading the tensors in place) give the eager run's tokens, close to the bf16 cache's. A
    70-token prompt spans two of the FP8 cache's 64-token GPU pages (its default block size)."""
    from shardllm.config import default_block_size

    out = {}
    prompts = PROMPTS + [[20 + i for i in range(70)]]
    for kv, eager in (("auto", True), ("fp8", True), ("fp8", False)):
        llm = LLM(big_kv_checkpoint, dtype="bfloat16", kv_cache_dtype=kv, enforce_eager=eager, num_kv_blocks=256,
                  max_batch_size=8)
        try:
            assert llm.config.cache_config.block_size == default_block_size(kv, "cuda")  # 64 for fp8 on sm90+
            out[kv, eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        finally:
            llm.shutdown()
    assert out["fp8", False] == out["fp8", True]
    assert _same(out["auto", True][:3], out["fp8", True][:3]) >= 0.75 * 3 * 8


# ---- checkpoint k/v scales ---------------------------------------------------------------------------------------
ATTN = "model.layers.3.self_attn"


@pytest.mark.parametrize("name,target", [
    (f"{ATTN}.k_proj.output_scale", (ATTN, ("k",))),  # older compressed-tensors
    (f"{ATTN}.v_proj.output_scale", (ATTN, ("v",))),
    (f"{ATTN}.attn.k_scale", (ATTN, ("k",))),  # our own module path
    (f"{ATTN}.attn.kv_scale", (ATTN, ("k", "v"))),
    (f"{ATTN}.attn.k_proj.k_scale", (ATTN, ("k",))),
    (f"{ATTN}.o_proj.output_scale", None),  # an output scale of another projection is no KV-cache scale
    (f"{ATTN}.q_proj.output_scale", None),
    (f"{ATTN}.k_proj.output_scale.weight", None),
])
def test_more_kv_scale_names(name, target):
    """The names test_fp8_kv_cache.py's test_kv_scale_names does not list (kv_cache.py's docstring lists all)."""
    from shardllm.layers.quantization.kv_cache import kv_scale_target

    assert kv_scale_target(name) == target


# Per layer, none a power of two: first-step calibration (calibrated_scale) only ever gives powers of two.
CKPT_SCALES = [(3.0, 6.0), (5.0, 2.5)]
SCALE_NAMES = {  # producer -> (k name, v name) under a layer's attention prefix
    "compressed-tensors": ("k_scale", "v_scale"),  # also vLLM's
    "compressed-tensors-old": ("k_proj.output_scale", "v_proj.output_scale"),
    "shardllm": ("attn.k_scale", "attn.v_scale"),
}


def _with_kv_scales(src: str, dst, names: tuple[str, str], scales=CKPT_SCALES, shape=()) -> str:
    """`src`'s checkpoint with a k and a v scale for every layer under `names`, written to `dst`."""
    from safetensors.torch import load_file, save_file

    t = load_file(os.path.join(src, "model.safetensors"))
    assert not any(n.endswith("_scale") for n in t)  # the source has none of its own
    for i, (k, v) in enumerate(scales):
        t[f"model.layers.{i}.self_attn.{names[0]}"] = torch.full(shape, k)
        t[f"model.layers.{i}.self_attn.{names[1]}"] = torch.full(shape, v)
    save_file(t, os.path.join(str(dst), "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["num_hidden_layers"] == len(scales)
    with open(os.path.join(str(dst), "config.json"), "w") as f:
        json.dump(cfg, f)
    return str(dst)


@pytest.mark.parametrize("shape", [(), (1,)])  # a 0-dim scale, and compressed-tensors' (1,)
@pytest.mark.parametrize("producer", list(SCALE_NAMES))
def test_checkpoint_kv_scales_load_into_every_layer(tiny_checkpoints, tmp_path, producer, shape):
    path = _with_kv_scales(tiny_checkpoints["llama"], tmp_path, SCALE_NAMES[producer], shape=shape)
    llm = LLM(path, device="cpu", num_kv_blocks=100, block_size=4, kv_cache_dtype="fp8")
    try:
        runner = llm.engine.executor.worker.model_runner
        assert [(float(a.k_scale), float(a.v_scale)) for a in runner.attn_layers] == CKPT_SCALES
        assert runner.model.num_kv_scales_loaded == len(CKPT_SCALES)
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def big_kv_with_scales(big_kv_checkpoint, tmp_path_factory):
    return _with_kv_scales(big_kv_checkpoint, tmp_path_factory.mktemp("big_kv_scaled"),
                           SCALE_NAMES["compressed-tensors"])


def _pow2(x: float) -> bool:
    return x > 0 and float(torch.tensor(x).log2()).is_integer()


def test_checkpoint_kv_scales_survive_the_first_step(big_kv_with_scales, runs):
    """Checkpoint scales turn the first step's computation off: after generating (the first step and later ones)
    every layer still holds the checkpoint's values, in the same tensors. The same weights without scales
    (runs["fp8"]) get computed ones, powers of two, on their first step."""
    run = _generate(big_kv_with_scales, "fp8")
    assert not run["calibrate_first_step"]
    assert run["before"] == CKPT_SCALES
    assert run["scales"] == CKPT_SCALES and run["scales_later"] == CKPT_SCALES
    assert run["ptrs_later"] == run["ptrs"] and not any(run["flags_later"])
    assert all(len(t) == GREEDY.max_tokens for t in run["tokens"])
    # the contrast: no checkpoint scales -> computed on the first step, unlike the checkpoint's
    plain = runs["fp8"]
    assert plain["calibrate_first_step"] and plain["before"] == [(1.0, 1.0)] * len(CKPT_SCALES)
    assert all(_pow2(s) and s >= 2.0 for pair in plain["scales"] for s in pair)
    assert all(a != b for p, q in zip(plain["scales"], CKPT_SCALES) for a, b in zip(p, q))


def _partial_scales(big_kv_checkpoint: str, dst, given: str) -> str:
    """The big-k/v checkpoint with both scales for layer 0 (3, 6) and only `given` ("k" or "v": 5.0) for layer 1."""
    from safetensors.torch import load_file, save_file

    t = load_file(os.path.join(big_kv_checkpoint, "model.safetensors"))
    t["model.layers.0.self_attn.k_scale"], t["model.layers.0.self_attn.v_scale"] = torch.tensor(3.0), torch.tensor(6.0)
    t[f"model.layers.1.self_attn.{given}_scale"] = torch.tensor(5.0)
    save_file(t, os.path.join(str(dst), "model.safetensors"))
    with open(os.path.join(big_kv_checkpoint, "config.json")) as f:
        (dst / "config.json").write_text(f.read())
    return str(dst)


@pytest.mark.parametrize("given", ["k", "v"])
def test_scales_the_checkpoint_lacks_are_computed_and_the_others_kept(big_kv_checkpoint, tmp_path, caplog, given):
    """Both scales for layer 0, one of layer 1's: the first step computes layer 1's other scale (a power of two,
    |k|, |v| ~1,000 here) and keeps the three the checkpoint gave; one warning says how many layers lack one.
    (Before, any loaded scale turned the computation off everywhere, leaving the missing one at 1.0.)"""
    path = _partial_scales(big_kv_checkpoint, tmp_path, given)
    with caplog.at_level("WARNING", logger="shardllm.worker.model_runner"):
        run = _generate(path, "fp8")
    assert run["calibrate_first_step"]
    assert run["before"] == [(3.0, 6.0), (5.0, 1.0) if given == "k" else (1.0, 5.0)]
    (k0, v0), (k1, v1) = run["scales"]
    kept, computed = (k1, v1) if given == "k" else (v1, k1)
    assert (k0, v0, kept) == (3.0, 6.0, 5.0)
    assert _pow2(computed) and computed >= 2.0
    assert run["scales_later"] == run["scales"] and not any(run["flags_later"])
    assert sum("not k and v of 1 of these 2" in r.getMessage() for r in caplog.records) == 1


def test_partial_scales_at_tp2_give_one_ranks_tokens(big_kv_checkpoint, tmp_path):
    """Every tp rank computes the same layers' missing scales (the amax all-reduced over the group): no rank waits
    on a collective the other skips, and tp = 2 gives tp = 1's tokens."""
    path = _partial_scales(big_kv_checkpoint, tmp_path, "k")
    one = _generate(path, "fp8")["tokens"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _generate(path, "fp8", tensor_parallel_size=2)["tokens"] == one
    finally:
        torch.set_num_threads(threads)


def test_scales_under_no_attention_layer_are_reported(tiny_checkpoints, tmp_path, caplog):
    """Names the scale pattern accepts but whose module is no attention layer's (a projection's v_scale, an MLP's
    kv_scale) have no reader: one warning names them; the layers keep their own scales."""
    from safetensors.torch import load_file, save_file

    src = tiny_checkpoints["llama"]
    t = load_file(os.path.join(src, "model.safetensors"))
    t["model.layers.0.self_attn.k_scale"], t["model.layers.0.self_attn.v_scale"] = torch.tensor(3.0), torch.tensor(6.0)
    t["model.layers.1.self_attn.k_proj.v_scale"] = torch.tensor(7.0)
    t["model.layers.1.mlp.kv_scale"] = torch.tensor(9.0)
    save_file(t, str(tmp_path / "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    with caplog.at_level("WARNING", logger="shardllm.layers.quantization.kv_cache"):
        llm = LLM(str(tmp_path), device="cpu", num_kv_blocks=100, block_size=4, kv_cache_dtype="fp8")
    try:
        runner = llm.engine.executor.worker.model_runner
        assert [(float(a.k_scale), float(a.v_scale)) for a in runner.attn_layers] == [(3.0, 6.0), (1.0, 1.0)]
    finally:
        llm.shutdown()
    msgs = [r.getMessage() for r in caplog.records if "match no attention layer" in r.getMessage()]
    assert len(msgs) == 1
    assert "model.layers.1.mlp" in msgs[0] and "model.layers.1.self_attn.k_proj" in msgs[0]
    assert "layers.0" not in msgs[0]
