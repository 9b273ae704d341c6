"""Launch choices of the paged decode-attention kernel (triton_paged.py) and the table of tuned ones, looked up by
what the host knows before a CUDA graph is captured (batch-size bucket, head_dim, cache dtype, page size), never
seq_lens."""

from __future__ import annotations

import dataclasses
import functools
import json

import torch

from shardllm import envs

MAX_NUM_SPLITS = 32  # decode partitions per sequence; the grid is (B, nkv, num_splits) whatever the lengths


def _pow2(n: int, at_least: int = 1) -> int:
    return max(1 << (n - 1).bit_length(), at_least)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Launch choices of the decode kernel; every field's default is the kernel's original choice.

    block_n: tokens per K/V tile (a power of two; >= 16 with use_dot); None: 64, or 32 past head_dim 128.
    num_warps, num_stages: Triton's (num_stages None: Triton's default).
    num_splits: partitions per sequence (a power of two <= MAX_NUM_SPLITS); None: default_num_splits.
    use_dot: tl.dot with the GROUP query rows padded to 16; False: fp32 broadcast products, GROUP rows only.
    prefetch_pages: load the next tile's page ids before this tile's K/V. k_rowmajor: K loaded as (N, D).
    early_v: V's load issued with K's, before the scores.
    tma: pages loaded by TMA, one page a tile, or two when block_n is twice the cache's block size
        (triton_decode_tma.py; k_rowmajor and early_v do not apply; prefetch_pages: each page id loaded an
        iteration ahead, so Triton's pipeliner keeps num_stages - 1 pages in flight; not with page_chunk); calls it
        cannot serve (no TMA, another cache layout) take the pointer kernel.
    page_chunk: with tma, page ids read page_chunk at a time into registers (a power of two in [2, 64]; one page a
        tile): no load in the page loop feeds a TMA coordinate, so Triton's pipeliner multi-buffers the pages
        (num_stages - 1 in flight) where the page-id load in the loop left it one page deep; 0: that loop.
    """

    block_n: int | None = None
    num_warps: int = 4
    num_stages: int | None = None
    num_splits: int | None = None
    use_dot: bool = True
    prefetch_pages: bool = False
    k_rowmajor: bool = False
    early_v: bool = False
    tma: bool = False
    page_chunk: int = 0

    def validate(self) -> None:
        bn = self.block_n
        if bn is not None and (bn != _pow2(bn) or bn > 256 or (self.use_dot and bn < 16)):
            raise ValueError(f"DecodeConfig.block_n={bn}: use a power of two in [16, 256] "
                             "([1, 256] with use_dot=False)")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"DecodeConfig.num_warps={self.num_warps}: use 1, 2, 4, 8 or 16")
        if self.num_stages is not None and not 1 <= self.num_stages <= 8:
            raise ValueError(f"DecodeConfig.num_stages={self.num_stages}: use 1..8 or None (Triton's default)")
        if self.tma and not self.use_dot:
            raise ValueError("DecodeConfig.tma=True needs use_dot=True")
        pc = self.page_chunk
        if pc and (not self.tma or pc != _pow2(pc) or not 2 <= pc <= 64):
            raise ValueError(f"DecodeConfig.page_chunk={pc}: use 0, or a power of two in [2, 64] with tma=True")
        ns = self.num_splits
        if ns is not None and (ns < 1 or ns != _pow2(ns) or ns > MAX_NUM_SPLITS):
            raise ValueError(f"DecodeConfig.num_splits={ns}: use a power of two <= {MAX_NUM_SPLITS}, or None")


# Tuned choices pasted from benchmarks/attention_sweep.py (JSON): "cache dtype/head_dim/batch bucket" (16-token
# pages) or ".../block size" (`attention_sweep.py --block_size B`) -> DecodeConfig fields. A batch uses the smallest
# bucket >= its size (else the largest) of its dtype, head_dim and page size (see decode_config);
# keys hold only what the host knows before a CUDA graph is captured, never seq_lens. Empty: the original choice.
# Change it at run time through set_decode_configs (lookups are cached). Measured on an H200, 2026-11-30
# (`bash benchmarks/device_attention.sh`, docs/benchmarks.md): batch 512 x ~170 tokens, bf16 cache 113 -> 98 us per
# layer, fp8 127 -> 107 us. The TMA entries: fourth session, `bash benchmarks/device_next.sh` (its sweep): fp8 cache,
# batch 512 x 170 tokens 127 -> 89 us, batch 256 69 -> 52 us; end to end 1000 x 128/128 fp8 + fp8 KV 20,516 -> 21,426
# out tok/s, 500 x 1000/1000 12,605 -> 13,041 (docs/benchmarks.md). page_chunk and the deeper fp8 entries: fifth
# session, `bash benchmarks/device_s5_b.sh` (its sweep): fp8 512 x 170 114 -> 79 us, fp8 256 62 -> 48, bf16 256 62 ->
# 53, fp8 64 x 1000 91 -> 68; end to end (8B fp8 + fp8 KV) 1000 x 128/128 26,246 -> 26,478, 500 x 1000/1000 13,022 ->
# 13,721 out tok/s.
DECODE_CONFIGS: dict[str, dict] = {
    "bf16/128/1": {"tma": True},
    "bf16/128/256": {"num_stages": 3, "num_warps": 2, "page_chunk": 16, "tma": True},
    "bf16/128/512": {"block_n": 32, "early_v": True, "prefetch_pages": True},
    "bf16/128/64": {"block_n": 32, "early_v": True, "prefetch_pages": True},
    "fp8_e4m3/128/1": {"block_n": 32},
    "fp8_e4m3/128/256": {"num_stages": 6, "num_warps": 2, "page_chunk": 32, "tma": True},
    "fp8_e4m3/128/512": {"num_stages": 4, "num_warps": 2, "page_chunk": 32, "tma": True},
    "fp8_e4m3/128/64": {"block_n": 32, "early_v": True, "num_stages": 4, "prefetch_pages": True},
    # 64-token pages (the FP8 cache's GPU default): sixth session, `bash benchmarks/device_s6_e.sh` (its sweep at
    # --block_size 64), us per layer: 512 x 1500 464.6 (3.41 TB/s; the pointer kernel 706.0), 512 x 170 74.5, 256 x
    # 170 41.1, 64 x 1000 54.5 (the 16-token entry's pointer config 66.9), 1 x 200 5.8; the sweep's own picks (2 stages
    # at 256 / 512) were within 1.5% per layer and 2.5% slower end to end (15,451 vs 15,839 at 1000/1000, same call).
    # Then page ids an iteration ahead (prefetch_pages; the pipeliner keeps two pages in flight at 3 stages, one
    # without: benchmarks/kernel_ir.py): tenth session, `bash benchmarks/device_s10_c.sh`, us per layer, the entry
    # above -> this one: 512 x 1500 463.0 -> 438.3, 1024 x 192 152.9 -> 150.4, 64 x 1000 55.5 -> 42.8; end to end 8B
    # fp8 + fp8 KV 500 x 1000/1000 16,498 -> 16,873 out tok/s (same call). The 1-row entry: thirteenth session,
    # `bash benchmarks/device_s13_b.sh` (its sweep) 1 x 200 6.7 -> 5.4 us a layer; `bash benchmarks/device_s13_f.sh`,
    # 8B fp8 + fp8 KV batch 1 TPOT 2.827 / 2.828 -> 2.794 / 2.794 ms (same call).
    "fp8_e4m3/128/1/64": {"num_splits": 8, "num_stages": 3, "num_warps": 2, "prefetch_pages": True, "tma": True},
    "fp8_e4m3/128/64/64": {"num_stages": 3, "num_warps": 2, "prefetch_pages": True, "tma": True},
    "fp8_e4m3/128/256/64": {"num_stages": 3, "num_warps": 2, "prefetch_pages": True, "tma": True},
    "fp8_e4m3/128/512/64": {"num_stages": 3, "num_warps": 2, "prefetch_pages": True, "tma": True},
}
_config_cache: dict[tuple, DecodeConfig] = {}
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                torch.float8_e4m3fn: "fp8_e4m3", torch.float8_e5m2: "fp8_e5m2"}


_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _f16_dot(q_dtype: torch.dtype, cache_dtype: torch.dtype, tma: bool = False) -> bool:
    """Whether the kernels' dots run in fp16: an FP8 cache under 16-bit queries (see _decode_kernel's F16_DOT).

    On by default (SHARDLLM_FP8_ATTN_F16_DOT=0 widens to bf16 instead, the earlier form). Measured on an H200
    (fourth session, benchmarks/fp8_attention_kernel.py, us per layer, bf16 widening -> fp16): batch 512 x 170 tokens
    106.7 -> 97.8, 1024 x 192 219.7 -> 203.6, 500 x 1500 699.1 -> 626.9; its GPU tests passed there.
    The TMA kernel (tma=True) always takes fp16 dots over an FP8 cache: the form it was measured in.
    """
    return (cache_dtype in _FP8_DTYPES and q_dtype in (torch.bfloat16, torch.float16)
            and (tma or envs.get("SHARDLLM_FP8_ATTN_F16_DOT")))  # get: cheaper per launch than the attribute


# The table's entries were swept on caches of TABLE_BLOCK_SIZE-token pages. On larger pages a TMA entry runs one
# page a tile with page_chunk 0 and at most LARGE_PAGE_MAX_STAGES stages: measured on an H200 (sixth session,
# `benchmarks/fp8_attention_kernel.py --block_sizes 16 32 64`, us per layer, FP8 cache), at 64-token pages page_chunk
# 0 / 16 / 32 took 74.6 / 83.6 / 106.1 (512 x 170 tokens) and 153.2 / 173.2 / 218.5 (1024 x 192); at 32-token pages
# 71.6 / 75.2 / 81.4 and 150.0 / 156.0 / 167.8 (500 x 1500: 504.8 / 500.2 / 511.3), the chunked rows at 4 and 6 stages.
TABLE_BLOCK_SIZE, LARGE_PAGE_MAX_STAGES = 16, 4


def decode_config(num_seqs: int, head_dim: int, cache_dtype: torch.dtype, block_size: int = TABLE_BLOCK_SIZE
                  ) -> DecodeConfig:
    """The DECODE_CONFIGS entry for this batch size, head_dim, cache dtype and `block_size` (tokens a page), else
    DecodeConfig(). Keys "dtype/head_dim/bucket" hold TABLE_BLOCK_SIZE-token pages, "dtype/head_dim/bucket/B" B-token
    pages. The bucket is the smallest >= num_seqs (else the largest) among both kinds' buckets of this dtype and
    head_dim; where that bucket has no entry of this page size, a larger page takes the TABLE_BLOCK_SIZE entry, a TMA
    one without page_chunk and with at most LARGE_PAGE_MAX_STAGES stages (measured above).

    SHARDLLM_DECODE_ATTN_TUNED=0 in the environment ignores the table (the original launch, for A/B runs).
    """
    if not envs.get("SHARDLLM_DECODE_ATTN_TUNED"):  # get: cheaper per call than the attribute
        return DecodeConfig()
    key = (num_seqs, head_dim, cache_dtype, block_size)
    if key not in _config_cache:  # a few us of parsing per layer otherwise, in eager decode
        _config_cache[key] = _lookup_config(num_seqs, head_dim, cache_dtype, block_size)
    return _config_cache[key]


def set_decode_configs(table: dict[str, dict]) -> None:
    """Replaces DECODE_CONFIGS (same key and field format) and drops the cached lookups.

    Raises ValueError naming the entry for a key that is not "cache dtype/head_dim/batch bucket[/block size]" (a
    lookup would fail at the first decode step otherwise), an unknown field or an invalid config."""
    if not isinstance(table, dict):
        raise ValueError(f"decode configs: expected a table {{'bf16/128/512': {{'block_n': 32}}, ...}}, got {table!r}")
    fields_known = {f.name for f in dataclasses.fields(DecodeConfig)}
    for key, fields in table.items():
        parts = str(key).split("/")
        if len(parts) not in (3, 4):
            raise ValueError(f"decode configs: key {key!r} is not 'dtype/head_dim/bucket' or "
                             "'dtype/head_dim/bucket/block_size' (e.g. 'bf16/128/512', 'fp8_e4m3/128/512/64')")
        if parts[0] not in _DTYPE_NAMES.values():
            raise ValueError(f"decode configs: key {key!r}: cache dtype {parts[0]!r} is none of "
                             f"{sorted(_DTYPE_NAMES.values())}")
        if not all(p.isdigit() and int(p) > 0 for p in parts[1:]):
            raise ValueError(f"decode configs: key {key!r}: head_dim, batch bucket and block size must be positive "
                             "integers")
        if len(parts) == 4 and int(parts[3]) == TABLE_BLOCK_SIZE:
            raise ValueError(f"decode configs: key {key!r}: {TABLE_BLOCK_SIZE}-token pages take the three-part key "
                             f"{'/'.join(parts[:3])!r}")
        if not isinstance(fields, dict) or set(fields) - fields_known:
            raise ValueError(f"decode configs: entry {key!r}: {fields!r} is not a dict of DecodeConfig fields "
                             f"({sorted(fields_known)})")
        DecodeConfig(**fields).validate()
    DECODE_CONFIGS.clear()
    DECODE_CONFIGS.update(table)
    _config_cache.clear()


def _lookup_config(num_seqs: int, head_dim: int, cache_dtype: torch.dtype, block_size: int) -> DecodeConfig:
    want = (_DTYPE_NAMES.get(cache_dtype, str(cache_dtype)), str(head_dim))
    own: dict[int, str] = {}  # bucket -> key, this page size
    base: dict[int, str] = {}  # bucket -> key, TABLE_BLOCK_SIZE-token pages
    for k in DECODE_CONFIGS:
        parts = k.split("/")
        if tuple(parts[:2]) != want:
            continue
        if len(parts) == 3:
            base[int(parts[2])] = k
        elif int(parts[3]) == block_size:
            own[int(parts[2])] = k
    if block_size == TABLE_BLOCK_SIZE:
        own = base
    buckets = sorted(set(own) | set(base))
    if not buckets:
        return DecodeConfig()
    bucket = next((x for x in buckets if x >= num_seqs), buckets[-1])
    if bucket in own:
        cfg = DecodeConfig(**DECODE_CONFIGS[own[bucket]])
    else:  # a larger page without its own entry here: the 16-token one, adapted
        cfg = DecodeConfig(**DECODE_CONFIGS[base[bucket]])
        if block_size > TABLE_BLOCK_SIZE and cfg.tma:
            stages = cfg.num_stages and min(cfg.num_stages, LARGE_PAGE_MAX_STAGES)
            cfg = dataclasses.replace(cfg, page_chunk=0, num_stages=stages)
    cfg.validate()
    return cfg


def _env_table() -> None:
    """SHARDLLM_DECODE_CONFIGS: a JSON table in DECODE_CONFIGS' format whose entries replace those keys at import
    (a sweep's output tried end to end without an edit; the benchmarks' device scripts use it)."""
    text = envs.SHARDLLM_DECODE_CONFIGS
    if text:
        try:
            table = json.loads(text)
        except ValueError as e:
            raise ValueError(f"SHARDLLM_DECODE_CONFIGS is not JSON ({e}): give a table such as "
                             '{"bf16/128/512": {"block_n": 32}}') from e
        set_decode_configs({**DECODE_CONFIGS, **table} if isinstance(table, dict) else table)  # (else refused)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few partitions, so that CPU tests go through the reduce


def default_num_splits(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Partitions per sequence so that (B x nkv x splits) programs fill the GPU about twice; a power of two.

    Depends only on the batch size, heads and device, never on seq_lens, so a captured graph stays valid.
    """
    want = -(-2 * _num_sms(device) // (num_seqs * num_kv_heads))
    return min(_pow2(want), MAX_NUM_SPLITS)


def decode_variant(num_seqs: int, num_kv_heads: int, head_dim: int, cache_dtype: torch.dtype, block_size: int,
                   device: torch.device) -> tuple[DecodeConfig, int]:
    """(config, num_splits) of paged_decode_attention's default launch for a batch of `num_seqs`: each distinct pair
    is a kernel Triton compiles (the runner's start-up warm-up compiles those no CUDA-graph bucket did)."""
    cfg = decode_config(num_seqs, head_dim, cache_dtype, block_size)
    return cfg, cfg.num_splits or default_num_splits(num_seqs, num_kv_heads, device)


_env_table()
