"""The engine through the LLM API: continuous batching, preemption and prefix hits leave results unchanged;
sampling options; bad input raises ValueError naming the fix."""

import json
import os

import pytest
import torch

from shardllm import LLM, SamplingParams

PROMPTS = [[5, 9, 13, 200, 17, 4, 4, 81], [7, 3], [250, 14, 88, 19, 201, 6, 6, 6, 42, 71, 300, 12, 9],
           [11] * 5, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [99, 98]]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def path(tiny_checkpoints):
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="module")
def alone(path):
    llm = LLM(path, device="cpu", num_kv_blocks=200, block_size=4, enable_prefix_caching=False)
    return [llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]


def test_batched_generation_equals_each_prompt_alone(path, alone):
    llm = LLM(path, device="cpu", num_kv_blocks=200, block_size=4)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert [o.prompt_token_ids for o in outs] == PROMPTS


def test_requests_joining_at_different_steps(path, alone):
    llm = LLM(path, device="cpu", num_kv_blocks=200, block_size=4, max_num_tokens=8)  # forces chunked prefill
    engine = llm.engine
    results = {}
    pending = list(enumerate(PROMPTS))
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 2 == 0:
            i, p = pending.pop(0)
            engine.add_request(str(i), p, GREEDY)
        for out in engine.step():
            if out.finished:
                results[int(out.request_id)] = out.outputs[0].token_ids
        step += 1
    assert [results[i] for i in range(len(PROMPTS))] == alone


def test_preemption_and_recompute_keep_tokens(path, alone):
    # 24 usable blocks of 4 tokens: not enough for all six requests at once, so some are preempted
    llm = LLM(path, device="cpu", num_kv_blocks=25, block_size=4, max_seq_len=64)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert llm.engine.stats.preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert llm.engine.kv_cache_manager.usage == 0.0


def test_prefix_cache_hits_keep_tokens(path):
    shared = [(7 * i) % 300 + 3 for i in range(24)]
    prompts = [shared + [5, 6], shared + [9], shared[:13]]
    ref_llm = LLM(path, device="cpu", num_kv_blocks=200, block_size=4, enable_prefix_caching=False)
    ref = [ref_llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    llm = LLM(path, device="cpu", num_kv_blocks=200, block_size=4)
    first = llm.generate(prompts[:1], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    later = llm.generate(prompts[1:], GREEDY, use_tqdm=False)
    assert [o.num_cached_tokens for o in later] == [24, 12]
    assert [first.outputs[0].token_ids] + [o.outputs[0].token_ids for o in later] == ref


def test_max_tokens_eos_and_stop_token_ids(path, alone):
    llm = LLM(path, device="cpu", num_kv_blocks=200, block_size=4)
    p = PROMPTS[0]
    stop_tok = alone[0][3]
    out = llm.generate([p], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_tok]),
                       use_tqdm=False)[0].outputs[0]
    k = alone[0].index(stop_tok)
    assert out.token_ids == alone[0][:k + 1] and out.finish_reason == "stop" and out.stop_reason == stop_tok
    out = llm.generate([p], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"
    out = llm.generate([p], SamplingParams(max_tokens=10, min_tokens=8, temperature=0,
                                           stop_token_ids=[stop_tok]), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 8 and stop_tok not in out.token_ids[:8]


def test_sampling_seeds_n_and_logprobs(path):
    llm = LLM(path, device="cpu", num_kv_blocks=200, block_size=4)
    sp = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    a = llm.generate([PROMPTS[0]], sp, use_tqdm=False)[0].outputs[0].token_ids
    b = llm.generate([PROMPTS[0], PROMPTS[1]], sp, use_tqdm=False)[0].outputs[0].token_ids
    assert a == b  # a seeded request does not depend on its batch
    outs = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=1.0, n=3, seed=7, ignore_eos=True),
                        use_tqdm=False)[0].outputs
    assert [o.index for o in outs] == [0, 1, 2] and all(len(o.token_ids) == 8 for o in outs)
    assert len({tuple(o.token_ids) for o in outs}) > 1
    out = llm.generate([PROMPTS[2]], SamplingParams(max_tokens=4, temperature=0, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 4
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert tok in lp
        best = max(lp.values(), key=lambda x: x.logprob)
        assert lp[tok].logprob == pytest.approx(best.logprob)  # greedy picks the most likely
        assert all(x.logprob <= 0 for x in lp.values()) and len(lp) == 3
    # the logprobs are the model's: compare one against a direct forward
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([PROMPTS[2]])).logits[0, -1], -1)
    assert out.logprobs[0][out.token_ids[0]].logprob == pytest.approx(ref[out.token_ids[0]].item(), abs=1e-4)


def test_penalties_change_repeated_tokens(path):
    llm = LLM(path, device="cpu", num_kv_blocks=200, block_size=4)
    p = [11] * 5
    plain = llm.generate([p], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), use_tqdm=False)
    pen = llm.generate([p], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, frequency_penalty=2.0,
                                           presence_penalty=2.0), use_tqdm=False)
    a, b = plain[0].outputs[0].token_ids, pen[0].outputs[0].token_ids
    assert len(set(b)) >= len(set(a))
    assert a != b


@pytest.mark.parametrize("kwargs, words", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=-3), "max_tokens"), (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(n=0), "n must"), (dict(logprobs=50), "logprobs"),
])
def test_bad_sampling_params(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SamplingParams(**kwargs)


def test_bad_prompts(path):
    llm = LLM(path, device="cpu", num_kv_blocks=200, block_size=4, max_seq_len=32)
    with pytest.raises(ValueError, match="max_seq_len is 32"):
        llm.generate([list(range(1, 40))], use_tqdm=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 100000]], use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], use_tqdm=False)
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("hello", use_tqdm=False)
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate([[1], [2]], [GREEDY] * 3, use_tqdm=False)
    # max_tokens that no prompt leaves room for (10**9 "for no limit"): refused, naming the most this prompt can get
    with pytest.raises(ValueError, match="max_tokens=32 is not below max_seq_len=32: ask for at most 22 tokens"):
        llm.generate([list(range(1, 11))], SamplingParams(max_tokens=32), use_tqdm=False)
    with pytest.raises(ValueError, match="max_tokens=1000000000 is not below"):
        llm.generate([[1, 2]], SamplingParams(max_tokens=10**9), use_tqdm=False)
    # past the context but below it in size: the request ends at the context, as vLLM's offline LLM ends it
    out = llm.generate([list(range(1, 11))], SamplingParams(max_tokens=31, temperature=0, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 22 and out.finish_reason == "length"
    # the engine is still usable and holds nothing after the rejected requests
    assert llm.generate([[1, 2]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert not llm.engine.has_unfinished_requests()


def test_bad_checkpoints(tmp_path, path):
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "nope" / "model"), device="cpu")
    for relative in ("./my-model", "../my-model", "~/my-model"):  # never looked up as a Hugging Face repo id
        with pytest.raises(ValueError, match="does not exist"):
            LLM(relative, device="cpu")
    bad_arch = tmp_path / "arch"
    bad_arch.mkdir()
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg["model_type"] = "gpt2"
    (bad_arch / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="supported: .*LlamaForCausalLM"):
        LLM(str(bad_arch), device="cpu", load_format="dummy")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        LLM(str(empty), device="cpu")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage")
    with pytest.raises(ValueError, match="cannot read checkpoint file"):
        LLM(str(corrupt), device="cpu")


def test_missing_and_unexpected_tensors_are_named(tmp_path, path):
    from safetensors.torch import load_file, save_file

    sd = load_file(os.path.join(path, "model.safetensors"))
    cfg = open(os.path.join(path, "config.json")).read()
    for name, change in [("missing", lambda d: d.pop("model.layers.1.mlp.down_proj.weight")),
                         ("extra", lambda d: d.update({"model.layers.0.mlp.bogus.weight": torch.zeros(2)}))]:
        d = dict(sd)
        change(d)
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(cfg)
        save_file(d, str(tmp_path / name / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.down_proj.weight'\]"):
        LLM(str(tmp_path / "missing"), device="cpu", num_kv_blocks=100)
    with pytest.raises(ValueError, match=r"unexpected tensors \['model.layers.0.mlp.bogus.weight'\]"):
        LLM(str(tmp_path / "extra"), device="cpu", num_kv_blocks=100)


def test_sharded_checkpoint_with_index_loads(tmp_path, path, alone):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    llm = LLM(str(tmp_path), device="cpu", num_kv_blocks=200, block_size=4)
    assert llm.generate([PROMPTS[0]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == alone[0]


def test_dummy_weights_and_shipped_configs(path):
    from shardllm.config import EngineConfig

    llm = LLM(path, device="cpu", load_format="dummy", num_kv_blocks=100)
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4
    for name, layers, heads in [("llama-3-70b", 80, 64), ("meta-llama/Meta-Llama-3-70B", 80, 64),
                                ("llama-3-8b", 32, 32), ("llama-3-405b", 126, 128), ("mixtral-8x7b", 32, 32)]:
        from shardllm.model_loader.resolve import resolve_model

        cfg = resolve_model(name, "dummy").hf_config
        assert (cfg.num_hidden_layers, cfg.num_attention_heads) == (layers, heads)
    with pytest.raises(ValueError, match="shipped configs"):
        EngineConfig.create("llama-9-1b", load_format="dummy", device="cpu")


def test_dtype_names_are_case_insensitive(path):
    from shardllm.config import EngineConfig

    a = EngineConfig.create(path, dtype="FP8", kv_cache_dtype="FP8_E5M2", device="cpu")
    b = EngineConfig.create(path, dtype="fp8", kv_cache_dtype="fp8_e5m2", device="cpu")
    assert a.model_config.dtype == b.model_config.dtype and a.cache_config.kv_cache_dtype == "fp8_e5m2"
    assert EngineConfig.create(path, dtype="Float32", device="cpu").model_config.dtype == torch.float32


def test_an_fp8_cache_on_a_small_model_warns(path, caplog):
    from shardllm.config import EngineConfig

    with caplog.at_level("WARNING", logger="shardllm"):
        EngineConfig.create(path, device="cpu", kv_cache_dtype="fp8")
    assert any("FP8 rounding of the KV cache" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="shardllm"):
        EngineConfig.create(path, device="cpu")
    assert not any("FP8 rounding" in r.getMessage() for r in caplog.records)


def test_vllm_argument_names_mean_the_same(path):
    llm = LLM(path, device="cpu", num_kv_blocks=64, max_model_len=64, max_num_seqs=3, max_num_batched_tokens=96)
    try:
        sc = llm.config.scheduler_config
        assert (sc.max_model_len, sc.max_num_seqs, sc.max_num_batched_tokens) == (64, 3, 96)
    finally:
        llm.shutdown()
    with pytest.raises(TypeError, match="both max_model_len= and max_seq_len="):
        LLM(path, device="cpu", max_model_len=64, max_seq_len=64)
    with pytest.raises(TypeError, match="kv_cache_free_gpu_memory_fraction"):
        LLM(path, device="cpu", gpu_memory_utilization=0.9)


def test_unknown_llm_argument_names_llm():
    with pytest.raises(TypeError, match=r"LLM\(\) got unexpected keyword arguments \['bogus_arg'\]"):
        LLM(bogus_arg=1)


def test_kv_block_size_default_is_64_for_an_fp8_cache_on_a_gpu_else_16(path):
    from shardllm.config import EngineConfig, default_block_size
    from shardllm.planner import estimate

    hopper = not torch.cuda.is_available() or torch.cuda.get_device_capability(0) >= (9, 0)
    assert default_block_size("fp8", "cuda") == default_block_size("FP8_E4M3", "cuda") == (64 if hopper else 16)
    assert default_block_size("fp8_e4m3", "cpu") == default_block_size("auto", "cuda") == 16
    assert default_block_size("fp8_e5m2", "cuda") == 16  # not measured: the usual 16
    assert EngineConfig.create(path, kv_cache_dtype="fp8", device="cpu").cache_config.block_size == 16
    # a GPU-less driver of Ray workers (which are GPUs) takes the GPU default
    if not torch.cuda.is_available():
        ray = EngineConfig.create(path, device="cuda", distributed_executor_backend="ray", kv_cache_dtype="FP8")
        assert ray.cache_config.block_size == 64
    assert EngineConfig.create(path, kv_cache_dtype="fp8", device="cpu", block_size=32).cache_config.block_size == 32
    with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
        EngineConfig.create(path, device="cpu", block_size=0)
    # the planner sizes capacity in the engine's GPU blocks
    cfg = EngineConfig.create(path, device="cpu").model_config.hf_config
    fp8 = estimate(cfg, kv_cache_dtype="fp8", gpu_memory_bytes=1 << 30)
    assert fp8.stages[0].kv_tokens == estimate(cfg, kv_cache_dtype="fp8", gpu_memory_bytes=1 << 30,
                                               block_size=64).stages[0].kv_tokens
    assert fp8.stages[0].kv_tokens % 64 == 0 and fp8.stages[0].kv_tokens > 64
    assert estimate(cfg, gpu_memory_bytes=1 << 30).stages[0].kv_tokens % 16 == 0
