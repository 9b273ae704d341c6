"""Expert parallelism on CPU with gloo: every (tp, ep) layout gives the single rank's greedy tokens; layouts
that cannot work fail at start with the fix in the message."""

import pytest
import transformers

from shardllm import LLM, SamplingParams
from shardllm.config import EngineConfig

PROMPTS = [[1, 17, 33, 5, 9, 101, 7], [3, 4], [250, 14, 88, 19, 201, 6, 6, 6, 42, 71, 300, 12, 9]]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def greedy_tokens(path, **parallel):
    llm = LLM(path, device="cpu", num_kv_blocks=100, block_size=4, **parallel)
    try:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def single_rank_tokens(tiny_checkpoints):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = greedy_tokens(tiny_checkpoints[arch])
        return cache[arch]

    return get


@pytest.mark.parametrize("arch,tp,ep", [
    ("mixtral", 2, 1),  # every expert split over both ranks
    ("mixtral", 2, 2),  # 4 whole experts per rank
    ("mixtral", 4, 2),  # 2 groups of 4 experts, each expert split over 2 ranks
    ("mixtral", 4, 4),  # 2 whole experts per rank
])  # Qwen2-MoE's shared expert under these layouts: tests/models/test_moe.py, one process per simulated rank
def test_greedy_tokens_equal_a_single_rank(tiny_checkpoints, single_rank_tokens, arch, tp, ep):
    tokens = greedy_tokens(tiny_checkpoints[arch], tensor_parallel_size=tp, expert_parallel_size=ep)
    assert tokens == single_rank_tokens(arch)


def test_expert_and_pipeline_parallel_greedy_tokens_equal_a_single_rank(tiny_checkpoints, single_rank_tokens):
    tokens = greedy_tokens(tiny_checkpoints["mixtral"], tensor_parallel_size=2, expert_parallel_size=2,
                           pipeline_parallel_size=2)
    assert tokens == single_rank_tokens("mixtral")


def create(model, **kw):
    return EngineConfig.create(model, device="cpu", **kw)


def tiny_mixtral_config(**kw):
    return transformers.MixtralConfig(architectures=["MixtralForCausalLM"], hidden_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=320, **kw)


def test_ep_must_divide_tp():
    with pytest.raises(ValueError, match=r"expert_parallel_size=4 does not divide tensor_parallel_size=2.*\[1, 2\]"):
        create("mixtral-8x7b", load_format="dummy", tensor_parallel_size=2, expert_parallel_size=4)


def test_ep_must_divide_the_experts(tmp_path):
    tiny_mixtral_config(num_local_experts=6, intermediate_size=32).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"expert_parallel_size=4 does not divide the model's 6 experts.*\[1, 2\]"):
        create(str(tmp_path), load_format="dummy", tensor_parallel_size=4, expert_parallel_size=4)


def test_expert_width_must_split_over_tp_over_ep(tmp_path):
    tiny_mixtral_config(num_local_experts=8, intermediate_size=34).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="raise expert_parallel_size"):
        create(str(tmp_path), load_format="dummy", tensor_parallel_size=4, expert_parallel_size=1)
    assert create(str(tmp_path), load_format="dummy", tensor_parallel_size=4,
                  expert_parallel_size=4).parallel_config.expert_parallel_size == 4


def test_ep_is_refused_for_a_dense_model():
    with pytest.raises(ValueError, match="mixture-of-experts models only.*use expert_parallel_size=1"):
        create("llama-3-8b", load_format="dummy", tensor_parallel_size=2, expert_parallel_size=2)


def test_valid_layouts_and_the_moe_alias():
    pc = create("mixtral-8x7b", load_format="dummy", tensor_parallel_size=4, moe_expert_parallel_size=2).parallel_config
    assert (pc.tensor_parallel_size, pc.expert_parallel_size, pc.world_size) == (4, 2, 4)
