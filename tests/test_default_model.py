"""The embedded default model (SmolLM2-135M-Instruct, GGUF) against transformers on the same weights."""

import pytest
import torch
import transformers

from shardllm import LLM, SamplingParams
from shardllm.model_loader.gguf import GGUFFile, iter_hf_weights

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name three colors of the rainbow."}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Write a haiku about autumn."}],
]


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu")


def hf_from_same_weights(llm):
    mc = llm.config.model_config
    model = transformers.LlamaForCausalLM(mc.hf_config).float().eval()
    missing, unexpected = model.load_state_dict(dict(iter_hf_weights(GGUFFile(mc.path))), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model


def test_greedy_chat_equals_transformers(llm):
    outs = llm.chat(CHATS, SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)
    hf = hf_from_same_weights(llm)
    eos = list(llm.engine.eos_token_ids)
    for out in outs:
        with torch.no_grad():
            ref = hf.generate(torch.tensor([out.prompt_token_ids]), max_new_tokens=24, do_sample=False,
                              eos_token_id=eos, pad_token_id=eos[0])[0, len(out.prompt_token_ids):].tolist()
        got = out.outputs[0].token_ids
        assert got == ref[: len(got)] and (len(got) == len(ref) or ref[len(got)] in eos)


def test_chat_refuses_a_role_the_server_refuses(llm):
    with pytest.raises(ValueError, match="'role' is one of"):
        llm.chat([{"role": "wizard", "content": "hi"}], use_tqdm=False)
    with pytest.raises(ValueError, match="'role' is one of"):
        llm.chat([[{"role": "user", "content": "hi"}], [{"content": "no role"}]], use_tqdm=False)


def test_capital_of_france_is_paris(llm):
    out = llm.chat(CHATS[0], SamplingParams(max_tokens=32, temperature=0), use_tqdm=False)[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # ended by <|im_end|>, not by the length limit


def test_stop_strings_are_cut_and_text_matches_tokens(llm):
    sp = SamplingParams(max_tokens=32, temperature=0)
    full = llm.chat(CHATS[0], sp, use_tqdm=False)[0].outputs[0]
    tok = llm.get_tokenizer()
    assert full.text == tok.decode(full.token_ids, skip_special_tokens=True)
    word = "France"
    assert word in full.text
    cut = llm.chat(CHATS[0], sp.clone(stop=[word]), use_tqdm=False)[0].outputs[0]
    assert cut.text == full.text[: full.text.index(word)]
    assert cut.finish_reason == "stop" and cut.stop_reason == word


def test_string_prompt_and_token_prompt_agree(llm):
    tok = llm.get_tokenizer()
    text = "The quick brown fox"
    sp = SamplingParams(max_tokens=8, temperature=0)
    a = llm.generate(text, sp, use_tqdm=False)[0]
    b = llm.generate([tok.encode(text)], sp, use_tqdm=False)[0]
    assert a.prompt == text and a.prompt_token_ids == b.prompt_token_ids
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
