"""llama.cpp's GGUF files mapped onto our models: read and dequantized by llama.cpp's own `gguf` package.

Whose code does what:
- `gguf`: parsing (`GGUFReader`, a memory map) and dequantization of every type it knows
  (`gguf.quants.dequantize`: F16, BF16, Q4_0..Q8_0, the K-quants, the IQ and ternary types, MXFP4).
- transformers: the table of llama.cpp metadata keys -> HF config keys (`GGUF_CONFIG_MAPPING`), and the
  tokenizer of vocabularies that are not byte-level BPE (SentencePiece "llama", "t5", ...), through its
  public `AutoTokenizer.from_pretrained(..., gguf_file=...)`.
- ours: GGUF -> HF tensor names; undoing llama.cpp's q/k row permutation; lazy per-rank slices (a rank
  dequantizes only the blocks holding its rows and columns); the config keys transformers' table lacks
  (rope scaling, head_dim from attention.key_length, architectures, attention bias, tied embeddings);
  and the byte-level BPE tokenizer (GPT-2, Llama 3, Qwen, SmolLM vocabularies). Two reasons for that one:
  its byte-level tokenizer drops the digit split of llama.cpp's "smollm"/"starcoder"/"refact"
  pre-tokenizers, so the default model's " ½" comes out as ["ĠÂ", "½"] where SmolLM2's own
  tokenizer.json gives ["Ġ", "Â½"] (transformers 5.24); and transformers' GGUF entry points
  (`AutoConfig`/`AutoTokenizer` with `gguf_file=`) parse the file again, twice each: 6-10 s apiece on the
  default model on a 2-core machine, where our one parse (`open_gguf`, 0.7 s) serves config, tokenizer
  and weights alike. Two small speed-ups sit on the library's calls: a plain-array view of the reader's
  memory map (`_reader_class`) and long rows for whole-tensor dequantization (`_long_rows`).
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

# ---- reading


def _import_gguf():
    try:
        import gguf
    except ImportError as e:  # imported here, so that this module (and its callers) load without it
        raise ImportError("reading GGUF files needs llama.cpp's `gguf` package: pip install gguf") from e
    return gguf


@functools.cache
def _reader_class() -> type:
    gguf = _import_gguf()

    class _Reader(gguf.GGUFReader):
        """`gguf.GGUFReader` over a plain-ndarray view of its memory map (same pages, same mapping). The
        reader slices its map once per metadata string, about a million slices for a 49k-token vocabulary,
        and numpy's memmap subclass runs Python code on each: the plain view parses the default model 3x faster."""

        @property
        def data(self) -> np.ndarray:
            return self._array

        @data.setter
        def data(self, mapped: np.ndarray) -> None:
            self._array = mapped.view(np.ndarray)

    return _Reader


class GGUFFile:
    """A GGUF file: `.metadata` ({key: value}), `.tensor_names` (file order), tensors dequantized on demand.

    Raises ValueError naming the file when it is not a readable GGUF file (bad magic, version, truncation).
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        reader_class = _reader_class()
        try:
            reader = reader_class(self.path)
            self.metadata: dict[str, Any] = {
                key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")
            }
        except Exception as e:  # gguf raises ValueError, KeyError, IndexError ... for a bad or truncated file
            raise ValueError(f"{self.path} is not a readable GGUF file ({type(e).__name__}: {e})") from e
        self._tensors = {t.name: t for t in reader.tensors}

    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """Torch order (GGUF lists the fastest dimension first)."""
        return tuple(int(n) for n in reversed(self._info(name).shape))

    def tensor_type(self, name: str) -> str:
        """The ggml storage type's name, e.g. "Q4_K"."""
        return self._info(name).tensor_type.name

    def weight(self, name: str, unpermute_heads: int | None = None) -> GGUFWeight:
        """The tensor as a lazy slice: indexing it dequantizes only the blocks it needs."""
        return GGUFWeight(self, self._info(name), unpermute_heads)

    def load_tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole tensor `name`, dequantized, in torch order and `dtype` (as stored: no q/k un-permutation)."""
        return self.weight(name)[:].to(dtype)

    def _info(self, name: str):
        if name not in self._tensors:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        return self._tensors[name]


@functools.lru_cache(maxsize=1)
def _open_cached(path: str, mtime_ns: int, size: int) -> GGUFFile:
    return GGUFFile(path)


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """`GGUFFile(path)`, parsed once per process while the file is unchanged: resolving the config, building
    the tokenizer and loading the weights share one parse. `open_gguf.cache_clear()` unmaps it."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise ValueError(f"cannot open GGUF file {path!r}: {e}") from e
    return _open_cached(path, st.st_mtime_ns, st.st_size)


open_gguf.cache_clear = _open_cached.cache_clear  # type: ignore[attr-defined]


def _unpermute_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation. Per head, its rows (d/2, 2) hold rotary pairs side by side;
    HF keeps them as (2, d/2): first halves, then second halves."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GGUFWeight:
    """One tensor of a GGUF file, dequantized when indexed, to float32 in torch order.

    The lazy-slice interface of safetensors (`get_shape()`, `w[rows, cols]` with unit-step slices), so weight
    loaders narrow it the same way (`weight_utils.narrow`). ggml blocks run along a row (the last dim), so
    any rows can be read alone, and columns are read as the whole blocks that hold them, then trimmed.
    With `unpermute_heads`, llama.cpp's q/k row permutation is undone (on whole heads, then trimmed).
    """

    def __init__(self, file: GGUFFile, tensor: Any, unpermute_heads: int | None = None):
        self.file, self.tensor, self.unpermute_heads = file, tensor, unpermute_heads
        self.shape = file.tensor_shape(tensor.name)

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index: Any) -> torch.Tensor:
        bounds = self._bounds(index)
        if self.unpermute_heads is None:
            return torch.from_numpy(self._read(bounds))
        head_rows = self.shape[0] // self.unpermute_heads
        r0, r1 = bounds[0]
        h0, h1 = r0 // head_rows, -(-r1 // head_rows)  # the whole heads holding rows [r0, r1)
        w = torch.from_numpy(self._read([(h0 * head_rows, h1 * head_rows), *bounds[1:]]))
        return _unpermute_rows(w, h1 - h0)[r0 - h0 * head_rows : r1 - h0 * head_rows]

    def _bounds(self, index: Any) -> list[tuple[int, int]]:
        index = index if isinstance(index, tuple) else (index,)
        if index and index[-1] is Ellipsis:
            index = index[:-1]
        if len(index) > len(self.shape) or not all(isinstance(s, slice) for s in index):
            raise ValueError(f"GGUF tensor {self.tensor.name!r} {self.shape} takes unit-step slices, got {index!r}")
        bounds = []
        for dim, size in enumerate(self.shape):
            start, stop, step = index[dim].indices(size) if dim < len(index) else (0, size, 1)
            if step != 1:
                raise ValueError(f"GGUF tensor {self.tensor.name!r}: slices need step 1, got {index!r}")
            bounds.append((start, max(start, stop)))
        return bounds

    def _read(self, bounds: list[tuple[int, int]]) -> np.ndarray:
        """Dequantize the elements inside `bounds` ([start, stop) per dim, torch order) to a writable float32 array."""
        gguf = _import_gguf()
        t = self.tensor
        data = t.data  # values in torch shape (F32, F16, F64, I8..I64), or bytes (..., bytes per row)
        lead = tuple(slice(a, b) for a, b in bounds[:-1])
        c0, c1 = bounds[-1]
        if data.dtype != np.uint8:
            raw, trim = data[(*lead, slice(c0, c1))], slice(None)
        else:
            block_size, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
            b0, b1 = c0 // block_size, -(-c1 // block_size)  # the blocks holding columns [c0, c1)
            raw = data[(*lead, slice(b0 * type_size, b1 * type_size))]
            trim = slice(c0 - b0 * block_size, c1 - b0 * block_size)
        if raw.size == 0:
            return np.zeros([b - a for a, b in bounds], np.float32)
        try:
            values = gguf.quants.dequantize(_long_rows(raw, t.tensor_type), t.tensor_type).reshape(*raw.shape[:-1], -1)
        except NotImplementedError as e:
            if data.dtype == np.uint8:  # blocks of a type this gguf cannot dequantize (Q8_1, Q8_K, ...)
                raise ValueError(
                    f"{self.file.path}: tensor {t.name!r} is stored as {t.tensor_type.name}, which the gguf package "
                    f"cannot dequantize ({e}); requantize the file to another type, e.g. Q8_0 or Q4_K"
                ) from e
            values = raw  # plain numbers (F64, I8..I64): only a cast
        values = values[..., trim]
        return values.astype(np.float32) if values.dtype != np.float32 or not values.flags.writeable else values


def _long_rows(raw: np.ndarray, ggml_type: Any, target: int = 16384) -> np.ndarray:
    """Contiguous blocks regrouped into rows of up to `target` values. Blocks do not depend on where a row
    ends, and gguf dequantizes 16 rows per numpy pass, so longer rows cut its per-pass overhead (2.5x less
    CPU time on the default model)."""
    if raw.dtype != np.uint8 or not raw.flags.c_contiguous:
        return raw
    block_size, type_size = _import_gguf().GGML_QUANT_SIZES[ggml_type]
    num_blocks = raw.size // type_size
    per_row = math.gcd(num_blocks, max(1, target // block_size))
    return raw.reshape(-1, per_row * type_size) if per_row * type_size > raw.shape[-1] else raw


# ---- Hugging Face bridges

# GGUF architecture -> (HF model_type, HF architecture)
# (llama.cpp writes Mistral models as "llama")
_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}
# llama.cpp permutes the q/k rows of these (rotary pairs interleaved instead of in two halves)
_PERMUTED_QK_ARCHITECTURES = ("llama",)
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings", "rms_norm_eps")  # fmt: skip


def _f32_to_decimal(x: float) -> float:
    return float(str(np.float32(x)))  # 9.999999747378752e-06 -> 1e-05, as the HF config wrote it


def gguf_to_hf_config(gguf_file: GGUFFile) -> dict:
    """A transformers config dict (e.g. for `LlamaConfig(**d)`) from the file's metadata and tensor list.

    Keys transformers maps (its `GGUF_CONFIG_MAPPING`), then ours on top. Raises ValueError for an
    architecture we do not run or metadata missing a required key.
    """
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    meta, names = gguf_file.metadata, set(gguf_file.tensor_names)
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"{gguf_file.path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(_ARCHITECTURES)}"
        )
    if "rope_freqs.weight" in names:
        raise ValueError(f"{gguf_file.path}: Llama 3.1-style rope scaling (rope_freqs tensor) is not supported yet")
    model_type, hf_architecture = _ARCHITECTURES[arch]

    config: dict[str, Any] = {}
    for prefix, table in ((arch, GGUF_CONFIG_MAPPING.get(arch, {})), ("tokenizer", GGUF_CONFIG_MAPPING["tokenizer"])):
        for gguf_key, hf_key in table.items():
            if hf_key is not None and f"{prefix}.{gguf_key}" in meta:
                config[hf_key] = meta[f"{prefix}.{gguf_key}"]
    missing = [k for k in _REQUIRED if k not in config]
    if missing:
        raise ValueError(f"{gguf_file.path}: GGUF metadata lacks the {arch}.* keys for {missing}")

    # ours: what transformers' table leaves out or gets only for some architectures
    num_heads = config["num_attention_heads"]
    config.setdefault("num_key_value_heads", meta.get(f"{arch}.attention.head_count_kv", num_heads))
    head_dim = meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
    config["head_dim"] = head_dim or config["hidden_size"] // num_heads
    config["rms_norm_eps"] = _f32_to_decimal(config["rms_norm_eps"])
    rope_theta = _f32_to_decimal(config.get("rope_theta", 10000.0))
    rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling in ("linear", "yarn"):
        factor = meta.get(f"{arch}.rope.scaling.factor")
        if factor is None:
            raise ValueError(f"{gguf_file.path}: GGUF metadata lacks {arch}.rope.scaling.factor")
        rope_parameters.update(rope_type=scaling, factor=_f32_to_decimal(factor))
        if scaling == "yarn":
            original = meta.get(f"{arch}.rope.scaling.original_context_length")
            if original is None:
                raise ValueError(f"{gguf_file.path}: GGUF metadata lacks {arch}.rope.scaling.original_context_length")
            rope_parameters["original_max_position_embeddings"] = original
    elif scaling != "none":
        raise ValueError(f"{gguf_file.path}: rope scaling {scaling!r} is not supported; supported: linear, yarn")
    if not config.get("vocab_size"):
        tokens = meta.get("tokenizer.ggml.tokens")
        config["vocab_size"] = len(tokens) if tokens else gguf_file.tensor_shape("token_embd.weight")[0]
    config.update(
        architectures=[hf_architecture],
        model_type=model_type,
        rope_theta=rope_theta,
        rope_parameters=rope_parameters,
        tie_word_embeddings="output.weight" not in names,
    )
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        config.setdefault(key, None)
    if model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in names
    return config


_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}  # fmt: skip
_TENSOR_NAME = re.compile(r"^(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)$")


def _hf_name(gguf_name: str) -> str | None:
    match = _TENSOR_NAME.match(gguf_name)
    if match is None:
        return None
    layer, base, suffix = match.groups()
    if layer is None:
        return f"{_GLOBAL_NAMES[base]}.{suffix}" if base in _GLOBAL_NAMES else None
    return f"model.layers.{layer}.{_LAYER_NAMES[base]}.{suffix}" if base in _LAYER_NAMES else None


def iter_hf_weights(gguf_file: GGUFFile, lazy: bool = False) -> Iterator[tuple[str, Any]]:
    """Yield `(hf_parameter_name, weight)` for every tensor, in file order: float32 tensors, or with `lazy`
    `GGUFWeight` slices that dequantize only what a weight loader narrows them to. q/k rows come in HF's
    order. Without an `output.weight` there is no `lm_head.weight`: the embedding is tied."""
    config = gguf_to_hf_config(gguf_file)
    permuted = gguf_file.metadata["general.architecture"] in _PERMUTED_QK_ARCHITECTURES
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    for name in gguf_file.tensor_names:
        hf_name = _hf_name(name)
        if hf_name is None:
            raise ValueError(f"{gguf_file.path}: unexpected tensor {name!r} for a {config['model_type']} model")
        proj = hf_name.split(".")[-2]
        w = gguf_file.weight(name, heads[proj] if permuted and proj in heads else None)
        yield hf_name, w if lazy else w[:]


# ---- tokenizer

_CONTROL, _USER_DEFINED = 3, 4
_SPECIAL_TOKEN_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                      "pad_token": "padding_token_id"}  # fmt: skip
# tokenizer.ggml.pre -> how text is split before byte-level BPE
_GPT2_PRE = ("default", "gpt2", None)
_DIGITS_PRE = ("smollm", "starcoder", "refact")  # each digit on its own, then GPT-2's split
_SPLIT_PATTERNS = {  # the original HF tokenizers' split regexes
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: printable Latin-1 bytes stand for themselves, the rest map to chr(256 + i)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _pre_tokenizer(pre: str | None):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in _SPLIT_PATTERNS)
    if pre in _GPT2_PRE:
        return byte_level
    if pre in _DIGITS_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _SPLIT_PATTERNS:
        split = pre_tokenizers.Split(Regex(_SPLIT_PATTERNS[pre]), behavior="isolated")
        return pre_tokenizers.Sequence([split, byte_level])
    known = [p for p in (*_GPT2_PRE, *_DIGITS_PRE, *_SPLIT_PATTERNS) if p]
    raise NotImplementedError(
        f"GGUF pre-tokenizer {pre!r} is not supported yet (supported: {', '.join(known)}); "
        "load the model's tokenizer from its Hugging Face repo instead"
    )


def build_tokenizer(gguf_file: GGUFFile):
    """A fast tokenizer (with the file's chat template) from the vocabulary in the file: ours for byte-level
    BPE ("gpt2"), transformers' GGUF tokenizer for the others (SentencePiece "llama", ...)."""
    meta = gguf_file.metadata
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        return _transformers_tokenizer(gguf_file)
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    if "tokenizer.ggml.merges" not in meta:
        raise ValueError(f"{gguf_file.path}: GGUF byte-level BPE vocabulary without tokenizer.ggml.merges")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    token_types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    pre = meta.get("tokenizer.ggml.pre")

    # Vocabularies are written in GPT-2's byte alphabet; re-spell any plain token that is not.
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for token_id, (token, token_type) in enumerate(zip(tokens, token_types)):
        if token_type not in (_CONTROL, _USER_DEFINED) and not set(token) <= alphabet:
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, token_id)
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]

    try:
        tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    except Exception as e:  # tokenizers raises a bare Exception for a merge of unknown tokens
        raise ValueError(f"{gguf_file.path}: corrupt GGUF vocabulary ({e})") from e
    if pre in ("qwen2",):
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = _pre_tokenizer(pre)
    tokenizer.decoder = decoders.ByteLevel()
    by_type = lambda wanted: [t for t, tt in zip(tokens, token_types) if tt == wanted]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in by_type(_CONTROL)])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in by_type(_USER_DEFINED)])

    def token(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        **{attr: token(key) for attr, key in _SPECIAL_TOKEN_IDS.items()},
        # llama.cpp's flags; byte-level vocabularies add no BOS unless the file says so
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
    )


def _transformers_tokenizer(gguf_file: GGUFFile):
    from transformers import AutoTokenizer

    meta, path = gguf_file.metadata, os.path.abspath(gguf_file.path)
    kind = meta.get("tokenizer.ggml.model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    except Exception as e:
        raise ValueError(
            f"{gguf_file.path}: transformers cannot build the GGUF tokenizer {kind!r} ({type(e).__name__}: {e}); "
            "load the model's tokenizer from its Hugging Face repo instead"
        ) from e
    # The file's special tokens and flags, and llama.cpp's default for SentencePiece (a BOS): transformers
    # 5.17 names the BOS as EOS too and adds no BOS.
    tokens = meta.get("tokenizer.ggml.tokens") or []
    for attr, key in _SPECIAL_TOKEN_IDS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= token_id < len(tokens) and getattr(tokenizer, attr, None) != tokens[token_id]:
            setattr(tokenizer, attr, tokens[token_id])
    flags = {"add_bos_token": meta.get("tokenizer.ggml.add_bos_token", True if kind == "llama" else None),
             "add_eos_token": meta.get("tokenizer.ggml.add_eos_token")}  # fmt: skip
    for attr, value in flags.items():
        if value is not None and getattr(tokenizer, attr, None) != bool(value):
            setattr(tokenizer, attr, bool(value))
    return tokenizer
