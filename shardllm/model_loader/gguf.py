"""Read llama.cpp's GGUF files without the `gguf` package: metadata, tensors dequantized to torch,
and the bridges to Hugging Face (a config dict, HF parameter names, a fast tokenizer).

Format: magic "GGUF", version, tensor count, metadata count, metadata key/values, tensor infos,
then tensor data from the next `general.alignment` boundary (all little-endian).
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# Metadata value type -> (struct format, numpy dtype). 8 is a string, 9 an array.
_SCALAR_TYPES = {
    0: ("B", "u1"), 1: ("b", "i1"), 2: ("H", "<u2"), 3: ("h", "<i2"), 4: ("I", "<u4"), 5: ("i", "<i4"),
    6: ("f", "<f4"), 7: ("?", "?"), 10: ("Q", "<u8"), 11: ("q", "<i8"), 12: ("d", "<f8"),
}  # fmt: skip
_STRING, _ARRAY = 8, 9

GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
    11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
    19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
    27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip


# ---- dequantization: each takes blocks (n, block_bytes) uint8 and returns (n, block_elements) float32


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[:, at : at + 2].view("<f2").astype(np.float32)  # (n, 1)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (n, 16) -> (n, 32): low nibbles, then high


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    return np.unpackbits(qh, axis=-1, bitorder="little") << 4  # (n, 4) = one u32 -> (n, 32) of 0 or 16


def _dequant_bf16(b: np.ndarray) -> np.ndarray:
    return (b.view("<u2").astype(np.uint32) << 16).view(np.float32)


def _dequant_q8_0(b: np.ndarray) -> np.ndarray:  # d | int8 q[32]
    return _f16(b, 0) * b[:, 2:].view(np.int8).astype(np.float32)


def _dequant_q4_0(b: np.ndarray) -> np.ndarray:  # d | q[32] in nibbles; y = d * (q - 8)
    return _f16(b, 0) * (_nibbles(b[:, 2:]).astype(np.float32) - 8)


def _dequant_q4_1(b: np.ndarray) -> np.ndarray:  # d | m | q[32] in nibbles; y = d * q + m
    return _f16(b, 0) * _nibbles(b[:, 4:]).astype(np.float32) + _f16(b, 2)


def _dequant_q5_0(b: np.ndarray) -> np.ndarray:  # d | high bits (u32) | low nibbles; y = d * (q - 16)
    return _f16(b, 0) * ((_nibbles(b[:, 6:]) | _fifth_bits(b[:, 2:6])).astype(np.float32) - 16)


def _dequant_q5_1(b: np.ndarray) -> np.ndarray:  # d | m | high bits (u32) | low nibbles; y = d * q + m
    return _f16(b, 0) * (_nibbles(b[:, 8:]) | _fifth_bits(b[:, 4:8])).astype(np.float32) + _f16(b, 2)


def _dequant_q4_k(b: np.ndarray) -> np.ndarray:
    # d | dmin | 12 bytes of 6-bit (scale, min) for 8 sub-blocks of 32 | 128 bytes of nibbles
    n = b.shape[0]
    s = b[:, 4:16]
    scales = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)  # (n, 8)
    mins = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)  # (n, 8)
    qs = b[:, 16:].reshape(n, 4, 32)  # each 32 bytes hold sub-block 2c (low nibbles) and 2c+1 (high)
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32).astype(np.float32)
    d, dmin = _f16(b, 0), _f16(b, 2)
    return ((d * scales)[:, :, None] * q - (dmin * mins)[:, :, None]).reshape(n, 256)


def _dequant_q6_k(b: np.ndarray) -> np.ndarray:
    # 128 bytes low nibbles | 64 bytes of 2-bit highs | 16 int8 scales | d. Two halves of 128 values;
    # in a half, value 32*k + l (k = 0..3) takes nibble k // 2 of low byte 32*(k % 2) + l and bits 2k of high byte l.
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 2, 32)  # (n, half, k % 2, l)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)  # (n, half, 1, l)
    low = np.stack([ql & 0x0F, ql >> 4], axis=2).reshape(n, 2, 4, 32)  # (n, half, k, l)
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3  # (n, half, k, l)
    q = ((low | (high << 4)).astype(np.float32) - 32).reshape(n, 2, 4, 2, 16)  # one scale per 16 values
    scales = b[:, 192:208].view(np.int8).astype(np.float32).reshape(n, 2, 4, 2, 1)
    d = _f16(b, 208).reshape(n, 1, 1, 1, 1)
    return ((d * scales) * q).reshape(n, 256)


# ggml type -> (elements per block, bytes per block, dequantize)
_DEQUANTIZERS = {
    0: (1, 4, lambda b: b.view("<f4")), 1: (1, 2, lambda b: b.view("<f2").astype(np.float32)),
    30: (1, 2, _dequant_bf16), 28: (1, 8, lambda b: b.view("<f8").astype(np.float32)),
    8: (32, 34, _dequant_q8_0), 2: (32, 18, _dequant_q4_0), 3: (32, 20, _dequant_q4_1),
    6: (32, 22, _dequant_q5_0), 7: (32, 24, _dequant_q5_1),
    12: (256, 144, _dequant_q4_k), 14: (256, 210, _dequant_q6_k),
}  # fmt: skip


def _type_name(ggml_type: int) -> str:
    return GGML_TYPE_NAMES.get(ggml_type, f"unknown type {ggml_type}")


class _Cursor:
    """Sequential little-endian reads over the file; running past its end is a ValueError."""

    def __init__(self, buf: memoryview, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, num_bytes: int) -> int:
        start = self.pos
        if start + num_bytes > len(self.buf):
            raise ValueError(
                f"{self.path}: truncated or corrupt GGUF file (needs {num_bytes} bytes at offset {start}, "
                f"the file has {len(self.buf)})"
            )
        self.pos += num_bytes
        return start

    def scalar(self, fmt: str) -> Any:
        return struct.unpack_from("<" + fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        length = self.scalar("Q")
        start = self.take(length)
        try:
            return str(self.buf[start : start + length], "utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: corrupt GGUF file (the string at offset {start} is not UTF-8)") from e

    def value(self, value_type: int) -> Any:
        if value_type in _SCALAR_TYPES:
            return self.scalar(_SCALAR_TYPES[value_type][0])
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.scalar("I"), self.scalar("Q")
            if item_type in _SCALAR_TYPES:  # numbers: one vectorised read
                dtype = np.dtype(_SCALAR_TYPES[item_type][1])
                start = self.take(count * dtype.itemsize)
                return np.frombuffer(self.buf, dtype, count, start).tolist()
            if count > len(self.buf) - self.pos:  # every item takes at least one byte
                self.take(count)
            return [self.value(item_type) for _ in range(count)]
        raise ValueError(f"{self.path}: corrupt GGUF file (unknown metadata value type {value_type})")


class TensorInfo(NamedTuple):
    name: str
    shape: tuple[int, ...]  # torch order: GGUF lists ne[0], the fastest dim, first
    ggml_type: int
    start: int  # absolute byte offset in the file


class GGUFFile:
    """A GGUF file: `.metadata`, `.tensor_names`, and tensors read from a memory map on demand."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        try:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        except ValueError as e:  # numpy refuses to map an empty file
            raise ValueError(f"{self.path}: not a GGUF file ({e})") from e
        buf = memoryview(self._data)
        cur = _Cursor(buf, self.path)
        if bytes(buf[:4]) != GGUF_MAGIC:
            raise ValueError(f"{self.path} is not a GGUF file: it starts with {bytes(buf[:4])!r}, not b'GGUF'")
        cur.take(4)
        version = cur.scalar("I")
        if version not in SUPPORTED_VERSIONS:
            hint = " (a big-endian file)" if struct.unpack("<I", struct.pack(">I", version))[0] <= 3 else ""
            raise ValueError(f"{self.path}: GGUF version {version}{hint} is not supported; supported: 2, 3")
        num_tensors, num_kv = cur.scalar("Q"), cur.scalar("Q")
        if num_tensors + num_kv > len(buf):
            raise ValueError(f"{self.path}: corrupt GGUF header ({num_tensors} tensors, {num_kv} metadata keys)")
        self.version = version
        self.metadata: dict[str, Any] = {}
        for _ in range(num_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar("I"))
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0:
            raise ValueError(f"{self.path}: corrupt GGUF file (general.alignment = {alignment!r})")

        entries = []
        for _ in range(num_tensors):
            name = cur.string()
            num_dims = cur.scalar("I")
            if num_dims > 8:
                raise ValueError(f"{self.path}: corrupt GGUF file (tensor {name!r} has {num_dims} dims)")
            ne = [cur.scalar("Q") for _ in range(num_dims)]
            ggml_type, offset = cur.scalar("I"), cur.scalar("Q")
            entries.append((name, tuple(reversed(ne)), ggml_type, offset))
        data_start = -(-cur.pos // alignment) * alignment

        self._tensors: dict[str, TensorInfo] = {}
        for name, shape, ggml_type, offset in entries:
            info = TensorInfo(name, shape, ggml_type, data_start + offset)
            if ggml_type in _DEQUANTIZERS and info.start + self._num_bytes(info) > len(buf):
                raise ValueError(
                    f"{self.path}: truncated GGUF file (tensor {name!r} ends past the file's {len(buf)} bytes)"
                )
            self._tensors[name] = info

    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def tensor_type(self, name: str) -> str:
        """The ggml storage type's name, e.g. "Q4_1"."""
        return _type_name(self._info(name).ggml_type)

    def load_tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor `name`, dequantized, in torch order and `dtype`."""
        info = self._info(name)
        if info.ggml_type not in _DEQUANTIZERS:
            supported = ", ".join(_type_name(t) for t in _DEQUANTIZERS)
            raise ValueError(
                f"{self.path}: tensor {name!r} is stored as {_type_name(info.ggml_type)}, which shardllm "
                f"cannot dequantize yet; supported types: {supported}"
            )
        block_elements, block_bytes, dequantize = _DEQUANTIZERS[info.ggml_type]
        num_bytes = self._num_bytes(info)
        raw = np.frombuffer(self._data, np.uint8, num_bytes, info.start)  # read-only view of the map
        values = dequantize(raw.reshape(-1, block_bytes))  # (num_blocks, block_elements)
        if not values.flags.writeable:
            values = values.copy()
        return torch.from_numpy(values.reshape(info.shape)).to(dtype)

    def _info(self, name: str) -> TensorInfo:
        if name not in self._tensors:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        return self._tensors[name]

    def _num_bytes(self, info: TensorInfo) -> int:
        block_elements, block_bytes, _ = _DEQUANTIZERS[info.ggml_type]
        row = info.shape[-1] if info.shape else 1
        if row % block_elements:
            raise ValueError(
                f"{self.path}: corrupt GGUF file (tensor {info.name!r} has rows of {row} values, "
                f"not a multiple of the {_type_name(info.ggml_type)} block of {block_elements})"
            )
        return int(np.prod(info.shape, dtype=np.int64)) // block_elements * block_bytes


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


def _f32_to_decimal(x: float) -> float:
    return float(str(np.float32(x)))  # 9.999999747378752e-06 -> 1e-05, as the HF config wrote it


def gguf_to_hf_config(gguf_file: GGUFFile) -> dict:
    """A transformers config dict (e.g. for `LlamaConfig(**d)`) from the file's metadata and tensor list."""
    meta, names = gguf_file.metadata, set(gguf_file.tensor_names)
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"{gguf_file.path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(_ARCHITECTURES)}"
        )
    if "rope_freqs.weight" in names:
        raise ValueError(f"{gguf_file.path}: Llama 3.1-style rope scaling (rope_freqs tensor) is not supported yet")

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"{gguf_file.path}: GGUF metadata lacks {arch}.{name}")
        return value

    model_type, hf_architecture = _ARCHITECTURES[arch]
    hidden_size, num_heads = key("embedding_length"), key("attention.head_count")
    head_dim = meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
    rope_theta = _f32_to_decimal(key("rope.freq_base", 10000.0))
    rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling in ("linear", "yarn"):
        rope_parameters.update(rope_type=scaling, factor=_f32_to_decimal(key("rope.scaling.factor")))
        if scaling == "yarn":
            rope_parameters["original_max_position_embeddings"] = key("rope.scaling.original_context_length")
    elif scaling != "none":
        raise ValueError(f"{gguf_file.path}: rope scaling {scaling!r} is not supported; supported: linear, yarn")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab_size = meta.get(f"{arch}.vocab_size") or (len(tokens) if tokens else None)
    config = {
        "architectures": [hf_architecture],
        "model_type": model_type,
        "hidden_size": hidden_size,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": key("attention.head_count_kv", num_heads),
        "head_dim": head_dim or hidden_size // num_heads,
        "rms_norm_eps": _f32_to_decimal(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "rope_parameters": rope_parameters,
        "max_position_embeddings": key("context_length"),
        "vocab_size": vocab_size or gguf_file.tensor_shape("token_embd.weight")[0],
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "tie_word_embeddings": "output.weight" not in names,
    }
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


def _unpermute_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation. Per head, its rows (d/2, 2) hold rotary pairs side by side;
    HF keeps them as (2, d/2): first halves, then second halves."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def iter_hf_weights(gguf_file: GGUFFile) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_parameter_name, fp32 tensor)` for every tensor, in file order. Without an
    `output.weight` there is no `lm_head.weight`: the embedding is tied."""
    config = gguf_to_hf_config(gguf_file)
    permuted = gguf_file.metadata["general.architecture"] in _PERMUTED_QK_ARCHITECTURES
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    for name in gguf_file.tensor_names:
        hf_name = _hf_name(name)
        if hf_name is None:
            raise ValueError(f"{gguf_file.path}: unexpected tensor {name!r} for a {config['model_type']} model")
        tensor = gguf_file.load_tensor(name, torch.float32)
        proj = hf_name.split(".")[-2]
        if permuted and proj in heads:
            tensor = _unpermute_rows(tensor, heads[proj])
        yield hf_name, tensor


# ---- tokenizer

_CONTROL, _USER_DEFINED = 3, 4
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
    """A `transformers.PreTrainedTokenizerFast` from the vocabulary in the file (byte-level BPE only)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    meta = gguf_file.metadata
    kind = meta.get("tokenizer.ggml.model")
    if kind == "llama":
        raise NotImplementedError(
            f"{gguf_file.path}: SentencePiece ('llama') GGUF vocabularies are not supported yet; "
            "load the model's tokenizer from its Hugging Face repo instead"
        )
    if kind != "gpt2" or "tokenizer.ggml.merges" not in meta:
        raise ValueError(f"{gguf_file.path}: GGUF tokenizer {kind!r} without merges; supported: gpt2 (byte-level BPE)")
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
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        # llama.cpp's flags; byte-level vocabularies add no BOS unless the file says so
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
    )
