"""Every SHARDLLM_* environment variable in one registry: type, default, parser, when the code reads it, and why.

    from shardllm import envs
    envs.SHARDLLM_INIT_TIMEOUT  # 1800.0 unless set: os.environ is parsed at this moment, on every access

A module that reads its switch at import keeps the value in a constant of its own (`ENABLED = envs.SHARDLLM_...`),
so the switch is read when it always was; the others read the accessor where they need it (tests monkeypatch the
environment). Hot per-call paths use `envs.get(NAME)`, a dict lookup: the attribute goes through the module's
`__getattr__`, about 0.6 us more per read on this project's CPU box. `shardllm envs` or `python -m shardllm.envs` prints
the table with the current values. A new variable is a new `EnvVar` in `_VARS` (tests/test_envs.py fails on an
unregistered SHARDLLM_ name). A package, not envs.py, only so that `python -m` runs its `__main__` without runpy's
warning. Standard library only.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# When a variable is read: at import of the module that uses it, when the engine / a worker / the server starts,
# on every call of the function that uses it, or by a script `shardllm deploy` writes into a pod.
READ_AT = ("import", "start-up", "per call", "in the pod")


@dataclass(frozen=True)
class EnvVar:
    """One variable. `default` is the raw text an unset variable reads as (None: unset stays None to the parser),
    `parse(raw)` turns the raw text (or None) into the value the code uses."""

    name: str
    type: str  # for the table: bool, int, float, str, list
    default: str | None
    parse: Callable[[str | None], Any]
    read_at: str
    doc: str  # one line: what it does, which measurement or issue it serves
    secret: bool = False  # the table shows whether it is set, never its value
    # A value that does not parse reads as the default (logged once) instead of raising: an A/B switch never stops
    # the engine. The table (strict) still shows it as invalid.
    lenient: bool = False

    def value(self, environ: Mapping[str, str] | None = None, strict: bool = False) -> Any:
        """The parsed value in `environ` (default os.environ, read now). ValueError naming the variable if the text
        does not parse, unless the variable is lenient and not `strict`: then the default, with a warning once."""
        raw = (os.environ if environ is None else environ).get(self.name, self.default)
        try:
            return self.parse(raw)
        except ValueError as e:
            message = f"{self.name}={raw!r} is not a valid {self.type} ({e}): fix or unset it"
            if strict or not self.lenient:
                raise ValueError(message) from None
            if (self.name, raw) not in _WARNED:
                _WARNED.add((self.name, raw))
                logging.getLogger("shardllm.envs").warning("%s; using the default", message)
            return self.parse(self.default)


_WARNED: set[tuple[str, str | None]] = set()  # (name, raw text) already warned about


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _bool_or_none(raw: str | None) -> bool | None:
    """1 / true / yes / on and 0 / false / no / off, any case; None for unset or empty; ValueError otherwise."""
    text = (raw or "").strip().lower()
    if not text:
        return None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(f"expected one of {', '.join(_TRUE)} or {', '.join(_FALSE)}")


def _on_unless_false(raw: str | None) -> bool:  # "0" off, "1" on, as the old `os.environ.get(NAME, "1") != "0"`
    value = _bool_or_none(raw)
    return True if value is None else value


def _off_unless_true(raw: str | None) -> bool:  # "1" on, "0" off, as the old `os.environ.get(NAME) == "1"`
    return bool(_bool_or_none(raw))


def _text(raw: str | None) -> str | None:
    return raw


def _text_or_none(raw: str | None) -> str | None:  # an empty value counts as unset
    return raw or None


def _names(raw: str | None) -> tuple[str, ...]:  # "A, B,," -> ("A", "B")
    return tuple(n.strip() for n in (raw or "").split(",") if n.strip())


def _number(kind: Callable[[str], Any], least: float, most: float | None = None, above: bool = False,
            optional: bool = False, infinite: bool = False) -> Callable[[str | None], Any]:
    """A parser for an int or float (`kind`) of at least `least` (more than it with `above`) and at most `most`; a
    float must be finite unless `infinite` (inf: no limit); ValueError naming the range otherwise (a timeout of 0 s
    or a size of -1 fails where it is used, later and less clearly). `optional`: unset stays None."""
    bound = (f"{'a finite number' if kind is float and not infinite else 'a number' if kind is float else 'an integer'}"
             f" {'>' if above else '>='} {least}" + ("" if most is None else f" and <= {most}")
             + (" (inf: no limit)" if infinite else ""))

    def parse(raw: str | None) -> Any:
        if raw is None and optional:
            return None
        n = kind(raw)
        if (math.isnan(n) or (math.isinf(n) and not (infinite and n > 0)) or not (n > least if above else n >= least)
                or (most is not None and n > most)):
            raise ValueError(f"must be {bound}")
        return n
    return parse


_seconds = _number(float, 0, above=True, infinite=True)  # a timeout: > 0, inf for none


def _bound(default: int) -> Callable[[str | None], int]:
    """A parser for a non-negative int bound whose 0 turns a feature off: unset, empty, or on / true / yes give
    `default`; off / false / no give 0; other text must be an int >= 0 (ValueError otherwise; "1" is 1)."""
    def parse(raw: str | None) -> int:
        text = (raw or "").strip().lower()
        if not text or text in ("true", "yes", "on"):
            return default
        if text in ("false", "no", "off"):
            return 0
        n = int(text)
        if n < 0:
            raise ValueError("must be an int >= 0")
        return n
    return parse


def _bound_at_most(default: int, most: int) -> Callable[[str | None], int]:
    """_bound(default) whose value must also be <= `most` (ValueError naming it otherwise)."""
    parse = _bound(default)

    def parse_capped(raw: str | None) -> int:
        n = parse(raw)
        if n > most:
            raise ValueError(f"out of range: 0..{most}")
        return n
    return parse_capped


def _switch(name: str, on_by_default: bool, read_at: str, doc: str) -> EnvVar:
    """An A/B switch: 1 / true / yes / on or 0 / false / no / off (any case); unset or empty keeps the default, and
    any other text too (lenient: the engine runs on, `shardllm envs` shows it as invalid)."""
    if on_by_default:
        return EnvVar(name, "bool", "1", _on_unless_false, read_at, doc, lenient=True)
    return EnvVar(name, "bool", None, _off_unless_true, read_at, doc, lenient=True)


_VARS = [
    # Operation
    EnvVar("SHARDLLM_HOST", "str", None, _text_or_none, "start-up",
           "address `shardllm serve` binds without --host; the image sets 0.0.0.0 (deploy/docker; healthcheck.py, "
           "stdlib only, reads it itself; never copied to Ray workers)"),
    EnvVar("SHARDLLM_API_KEY", "str", None, _text_or_none, "start-up",
           "the key /v1/* requires when neither --api_key nor --api_key_file is given (docs/openai_api.md)",
           secret=True),
    EnvVar("SHARDLLM_INIT_TIMEOUT", "float", "1800", _seconds, "import",
           "seconds the executor waits for the workers to start, load and size the KV cache before failing the engine"),
    EnvVar("SHARDLLM_STEP_TIMEOUT", "float", "60", _seconds, "import",
           "seconds a worker may take on one call (a step) before the executor fails the engine (docs/parallelism.md)"),
    EnvVar("SHARDLLM_RAY_PG_TIMEOUT", "float", "120", _seconds, "import",
           "seconds Ray may take to reserve the workers' GPUs (placement group) before start-up fails "
           "(docs/deployment.md)"),
    EnvVar("SHARDLLM_RAY_ENV_VARS", "list", None, _names, "start-up",
           "more variable names (comma-separated) the Ray workers get from the driver, beside SHARDLLM_*, NCCL_*, "
           "... (docs/deployment.md)"),
    EnvVar("SHARDLLM_NUM_NODES", "int", None, _number(int, 1, optional=True), "in the pod",
           "set by `shardllm deploy --ray_operator kuberay` in the head pod: its script waits for this many Ray "
           "nodes before serving (deploy/multinode.py)"),
    # Profiling
    EnvVar("SHARDLLM_PROFILE_DIR", "str", None, _text_or_none, "start-up",
           "turns the per-rank step profiler on: each rank writes DIR/rank<R>.json (worker/step_profiler.py, "
           "benchmarks/profile_decode.py)"),
    EnvVar("SHARDLLM_PROFILE_STEPS", "str", "8:16", _text, "start-up",
           "the profiled window: '<first>:<count>' execute_model calls, or 'manual' (armed through the executor)"),
    EnvVar("SHARDLLM_PROFILE_TOP", "int", "15", _number(int, 1), "start-up",
           "kernels listed per step-profile summary"),
    EnvVar("SHARDLLM_SYMM_MEM_MAX_MB", "float", "8", _number(float, 1), "start-up",
           "with all_reduce='symm_mem': MiB of the symmetric buffer, the largest bf16 tensor the P2P all-reduce "
           "takes (larger ones go to NCCL; a batch-1024 decode all-reduce of Llama-3-70B is 16 MiB; issue 13, "
           "not yet measured above 8)"),
    _switch("SHARDLLM_PROFILE_SKIP_ALL_REDUCE", False, "import",
            "1: skip the tp all-reduce, WRONG TOKENS, profiling only: its share of a step is 1 - t(skipped) / t "
            "(benchmarks/device_x4.sh, docs/benchmarks.md)"),
    # A/B switches: each restores an earlier code path (or opts into a new one) for a measurement
    _switch("SHARDLLM_WORKER_WAIT_FOR_PLANS", True, "import",
            "0: the output rank blocks in the step instead of taking the next plan while it runs (the earlier "
            "worker loop; issue 15, benchmarks/device_ab.sh)"),
    _switch("SHARDLLM_PP_EXTRA_MICROBATCH", True, "start-up",
            "0: a synchronous pipeline keeps pp batches in flight, not pp + 1 (issue 15, benchmarks/device_ab.sh)"),
    _switch("SHARDLLM_PP_SHARED_MAX_SEQS", False, "start-up",
            "1: max_num_seqs caps all pipeline batches together, not each (the earlier behaviour; issue 15, "
            "benchmarks/device_ab.sh)"),
    _switch("SHARDLLM_TP_OVERLAP", False, "import",
            "1: big tp decode batches run as two micro-batches, one's all-reduce beside the other's compute "
            "(issue 15; 20,845 against 20,759 tok/s: no gain, off)"),
    _switch("SHARDLLM_TP_OVERLAP_AT_TP1", False, "import",
            "1: with SHARDLLM_TP_OVERLAP=1, the two micro-batches also at tp 1: one half's decode attention "
            "(memory-bound) beside the other half's GEMMs (compute-bound; issue 13, 500 x 1000/1000; measured slower "
            "on an H200 with and without an SM carveout: layers/microbatch_overlap.py)"),
    _switch("SHARDLLM_TP_OVERLAP_PREFILL", False, "import",
            "1: with SHARDLLM_TP_OVERLAP=1, steps with prompt chunks run as two micro-batches too, split at the "
            "sequence boundary nearest half the tokens (issue 13: 70B tp 2, 256 MiB all-reduces in each prefill step)"),
    EnvVar("SHARDLLM_TP_OVERLAP_PREFILL_MIN_TOKENS", "int", "2048", _number(int, 2), "import",
           "with SHARDLLM_TP_OVERLAP_PREFILL=1: the fewest tokens a step needs to be split (each half gets at least "
           "a quarter of them)"),
    EnvVar("SHARDLLM_TP_OVERLAP_MIN_TOKENS", "int", "64", _number(int, 2), "import",
           "with SHARDLLM_TP_OVERLAP=1: the fewest decode rows that are split (below: latency-bound)"),
    EnvVar("SHARDLLM_TP_OVERLAP_SM_CARVEOUT", "int", "0", _number(int, 0), "import",
           "with SHARDLLM_TP_OVERLAP=1: SMs that the cuBLAS GEMMs of the two micro-batches leave free, so the other "
           "half's kernels (the decode attention, memory-bound) run beside them instead of after them (cuBLAS's SM "
           "count target, torch._C._set_sm_carveout_experimental); 0: none (issue 13; one H200, 8B fp8 1000/1000 "
           "at tp 1, fourteenth session: carveouts 16 / 32 / 48 17,412 / 17,391 / 17,444, the default 17,719)"),
    _switch("SHARDLLM_GEMV_TABLES", True, "import",
            "0: the decode GEMV kernels' tuned tables empty (FP8: fp8_triton's configs, bf16: cuBLAS), A/B "
            "against the H200 sweep (benchmarks/device_gemv.sh, device_ab.sh)"),
    _switch("SHARDLLM_DECODE_STREAM", True, "import",
            "0: output text is decoded in Python (two tokenizer decodes a token) even for a fast tokenizer, not by "
            "tokenizers' DecodeStream (engine/detokenizer.py; the server's A/B, benchmarks/device_s27_a.sh)"),
    _switch("SHARDLLM_ENGINE_PROCESS", True, "start-up",
            "0: `shardllm serve` steps the engine in a thread of the server's process, not in a process of its own "
            "(engine/core_proc.py; on one GIL the server had 9,425 out tok/s, 20,099 with the engine process: 8B "
            "fp8, one H200, 1000 x 128/128; docs/benchmarks.md, 2026-12-02)"),
    EnvVar("SHARDLLM_FRONTEND_DETOKENIZE", "bool", None, _bool_or_none, "start-up",
           "1: a request without stop strings is detokenized in the API server process that streams it, not in the "
           "engine process (engine/async_mp.py, detokenize_here); 0: the engine makes every text; unset: 1 with "
           "--api_server_count > 1 (8B fp8, one H200, 1000 x 128/128: one API server 21,472 out tok/s with the "
           "engine detokenizing, 16,181 detokenizing itself; two API servers detokenizing 24,628; "
           "docs/benchmarks.md, twenty-fourth session)"),
    _switch("SHARDLLM_PDL", True, "import",
            "0: the decode path's Triton kernels launch without programmatic dependent launch (on by default on "
            "sm90+, layers/pdl.py; issues 13 and 15: batch-1 8B bf16 4.268 -> 4.210 ms, fp8 2.852 -> 2.814 ms on "
            "one H200, sixth session)"),
    EnvVar("SHARDLLM_GEMV_W_EARLY", "int", "2", _number(int, 0, 2), "import",
           "2 (default): each program of a batch-1 GEMV loads its first weight tile before its PDL wait, while "
           "the kernel before (a norm, the attention) still runs; 1: not the fused SiLU down GEMV; 0: none "
           "(layers/gemv.py; issue 13; 8B fp8 batch 1 on one H200, thirteenth session: 0 / 1 / 2 2.791 / 2.760 / "
           "2.757 ms, then 2.790 / 2.764 / 2.760)"),
    EnvVar("SHARDLLM_GEMV_CONFIGS", "str", None, _text, "import",
           "JSON {\"fp8\" | \"bf16\" | \"fp8_silu\" | \"bf16_silu\": {\"NxK\": {\"M\": [use_dot, block_n, block_k, "
           "split_k, num_warps, num_stages(, late_reduce, w_ahead)]}}} (M: 1, 2, 4, 8 or 16) merged over the batch-1 "
           "decode GEMV's tuned tables "
           "(gemv_tables.py; _silu: gemv_silu.FUSED_SILU_TABLES), entry by entry: a sweep's configs tried end to "
           "end without an edit (benchmarks/cuda_gemv_probe.py, the device scripts)"),
    EnvVar("SHARDLLM_DECODE_FUSED_ROTARY", "int", "128", _bound(128), "import",
           "the largest decode-only step (rows; with CUDA graphs, the bucket; with SHARDLLM_TP_OVERLAP, each half) "
           "whose layers rotate q, k and write k, v into the paged cache inside the TMA decode attention kernel "
           "(TensorRT-LLM's masked-attention design; triton_paged.NewKV), one launch a layer fewer; 0 / off: never. "
           "Only where that kernel runs (sm90+ GPUs: always over an FP8 cache, over bf16 at decode_configs' TMA "
           "launches), no effect elsewhere (issue 13; 8B fp8 + fp8 KV on one H200, sixteenth session, 1000-token "
           "prompts: decode TPOT -2.8 / -2.2 / -3.3 / -4.5 / -3.1 / -3.5 / -1.0 / +0.7% at 1 / 4 / 8 / 16 / 32 / 64 "
           "/ 128 / 256 rows; on every step, 500 x 1000/1000 out tok/s 0.5% lower)",
           lenient=True),
    _switch("SHARDLLM_GEMV_NEAREST_SHAPE", True, "per call",
            "0: an FP8 GEMV shape without a tuned entry, and the fused SiLU down GEMV's, take the generic tl.dot "
            "config, not the nearest tuned shape's (gemv.nearest_config; A/B only: Llama-3-70B batch 1 was "
            "2.5x slower with it off)"),
    _switch("SHARDLLM_GEMV_FUSED_SILU", True, "import",
            "0: SiLU-and-mul in a kernel of its own before the down projection's GEMV at batch 1, not inside it "
            "(layers/gemv_silu.py, issue 15; fused: batch-1 bf16 TPOT -2.5% on an H200)"),
    _switch("SHARDLLM_DECODE_ATTN_TUNED", True, "per call",
            "0: decode attention ignores decode_configs.DECODE_CONFIGS (the original launch; benchmarks/device_ab.sh)"),
    EnvVar("SHARDLLM_DECODE_CONFIGS", "str", None, _text, "import",
           "a JSON table in DECODE_CONFIGS' format merged over it: a sweep's output tried end to end "
           "(benchmarks/device_session3_*.sh)"),
    EnvVar("SHARDLLM_PREFILL_CONFIG", "str", None, _text, "import",
           "JSON of the prefill attention kernel's PrefillConfig fields (rows, block_n, num_warps, num_stages, "
           "split_causal), e.g. '{\"rows\": 256}': one launch for every step in place of the per-layout defaults "
           "(triton_prefill.prefill_config), a sweep's pick tried end to end (benchmarks/prefill_sweep.py)"),
    _switch("SHARDLLM_GRAPH_LM_HEAD", False, "start-up",
            "1: the decode CUDA graphs hold the LM head (issue 15; no gain measured at tp = 2 batch 1)"),
    _switch("SHARDLLM_KERNEL_WARM_UP", True, "start-up",
            "0: skip the start-up runs that compile the attention kernels' variants a run would otherwise compile "
            "mid-run (mixed-step decode batch sizes, short-chunk prefill tiles; issue 13)"),
    _switch("SHARDLLM_MIXED_STEP_DECODE_KERNEL", True, "import",
            "0: a step mixing decodes with prefill chunks runs all its rows in the prefill attention kernel instead "
            "of its leading decodes in the decode kernel (issue 13, the 1000/1000 prefill phase)"),
    _switch("SHARDLLM_FLASH_PREFILL", False, "import",
            "1: prompt chunks without cached context attend through torch's FlashAttention-2 varlen kernel over "
            "the step's own k, v instead of the Triton prefill kernel over the cache (layers/attention/"
            "flash_prefill.py; issue 13, the 1000/1000 prefill phase; CUDA sm80+, bf16 / fp16)"),
    _switch("SHARDLLM_KV_SCALES_IN_KERNELS", True, "import",
            "0: FP8 k/v scales applied by four torch ops around the Triton attention instead of inside it "
            "(issue 13, benchmarks/device_kv_scales.sh)"),
    _switch("SHARDLLM_FP8_ATTN_F16_DOT", True, "per call",
            "0: the pointer attention kernels widen an FP8 cache to bf16 for their dots instead of fp16 (issue 13; "
            "fp16 is 8-11% faster on an H200; the TMA kernel always takes fp16)"),
    EnvVar("SHARDLLM_FP8_FAST_ACCUM_MAX_K", "int", "8192", _bound(8192), "import",
           "row-wise FP8 GEMMs whose K is at most this accumulate in the tensor cores' fast mode (torch._scaled_mm "
           "use_fast_accum; 0 / off: none), whose error grows with K; larger K keeps fp32 accumulation (issue 13, "
           "fp8_gemm.py --recipes)",
           lenient=True),
    EnvVar("SHARDLLM_FP8_TENSORWISE_MAX_OUTPUT", "int", "1048576", _bound(1 << 20), "import",
           "row-wise scaled FP8 GEMMs (a scale per token or per tensor, per output channel) with at most this many "
           "output elements (M x N) run as cuBLAS's per-tensor kernel with unit scales plus one Triton launch "
           "applying both scales (fp8_utils.scaled_mm_rowwise_by_tensorwise; where the FP8 Triton kernels pass "
           "their start-up probe); 0 / off: none (issue 13; H200, seventeenth session, Llama-3-8B shapes, us: o "
           "4096x4096 M 64 13.0 -> 8.5, down 4096x14336 M 64 36.7 -> 21.1, M 256 37.4 -> 31.5, qkv M 64 13.3 -> "
           "9.4, gate_up 28672x4096 M 16 36.2 -> 34.2; losing past ~2^20 elements; fp8_utils.py has the table)",
           lenient=True),
    EnvVar("SHARDLLM_FP8_GEMV_MAX_M", "int", "1", _bound_at_most(1, 16), "import",
           "rows up to which an FP8 linear (per-channel weights, dynamic activations) streams its weights through "
           "the small-M GEMV with unquantized activations (layers/gemv.py); more rows quantize per token and take "
           "the FP8 GEMM (fp8_utils.scaled_mm_rowwise); 0: the GEMM from 1 row; at most 16 (issue 13; H200, "
           "seventeenth session, Llama-3-8B fp8 decode TPOT at 1 / 4 / 8 / 16 rows, GEMV -> GEMM: 2.824 -> 3.231, "
           "4.433 -> 3.327, 4.416 -> 3.525, 4.593 -> 3.736 ms)",
           lenient=True),
    _switch("SHARDLLM_FP8_TENSORWISE_FP32", False, "import",
            "1: SHARDLLM_FP8_TENSORWISE_MAX_OUTPUT's route writes its unscaled product in fp32 and scales it into "
            "the output dtype, instead of writing it in bf16 and scaling it in place (bf16 models; fp16 ones always "
            "take fp32): twice the intermediate's bytes, one rounding fewer (at most 1 ulp of the output; issue 13, "
            "H200, seventeenth session: bf16 in place about 1% faster decode at 8-64 rows, within noise on the "
            "throughput runs)"),
    _switch("SHARDLLM_FP8_DEFER_SCALE", True, "import",
            "0: an FP8 linear whose output feeds a fused RMSNorm / SiLU-and-mul quantizer (o, gate_up, down at tp 1; "
            "gate_up at any tp) scales its per-tensor route's product in a launch of its own, instead of leaving "
            "the token and channel scales to the quantizer, which applies them as it loads the product "
            "(fp8_fused.link_deferred_scale; bit-identical values, one launch a linear fewer; issue 13)"),
    _switch("SHARDLLM_KV_V_TRANSPOSED", True, "start-up",
            "0: an FP8 KV cache on an sm90+ GPU stores V (num_blocks, block_size, nkv, D) like K instead of "
            "(num_blocks, nkv, D, block_size), the layout the TMA decode kernel reads without a shared-memory copy "
            "per page (issue 13: 8B fp8 500 x 1000/1000 17,000 -> 17,841 out tok/s on an H200, docs/benchmarks.md)"),
    _switch("SHARDLLM_KV_V_T_TILED_WRITE", False, "import",
            "1: with a transposed V cache, steps with prompt chunks store V in (head_dim, 32-token) tiles, runs of "
            "consecutive bytes, not one token a row (kv_write.write_v_transposed; issue 13: the row store took the "
            "16k-token step's KV write from 3.4 to 7.6 ms; not yet measured on a GPU)"),
    _switch("SHARDLLM_TRITON_ARGMAX", True, "import",
            "0: the greedy arg-max of decode batches up to 16 rows on a GPU is torch.argmax instead of two Triton "
            "kernels (layers/argmax.py; torch's took 35 us of a 2.87 ms batch-1 step on an H200)"),
    _switch("SHARDLLM_FP8_FUSED_ACT_QUANT", True, "import",
            "0: RMSNorm / SiLU-and-mul write 16-bit rows that the FP8 linear quantizes in a pass of its own "
            "(issue 13, benchmarks/device_fused_actquant.sh)"),
    _switch("SHARDLLM_MOE_FUSED_GLUE", True, "import",
            "0: the MoE layer's glue (SiLU-and-mul, per-token quantization, the weighted combine) as torch's chain "
            "of kernels instead of layers/moe_kernels.py's (issue 13: Mixtral fp8, benchmarks/device_s5_c.sh)"),
    _switch("SHARDLLM_FP8_BLOCK_MOE_TRITON", False, "import",
            "1: block-FP8 MoE experts through the grouped Triton kernel, not the dequantized path (issue 13; opt-in "
            "until test_fp8_moe_gpu.py passes on a GPU)"),
]
ENV_VARS: dict[str, EnvVar] = {v.name: v for v in _VARS}
assert len(ENV_VARS) == len(_VARS) and all(v.read_at in READ_AT for v in _VARS)


def get(name: str, environ: Mapping[str, str] | None = None) -> Any:
    """The parsed value of registered variable `name` in `environ` (default os.environ, read now)."""
    if name not in ENV_VARS:
        raise KeyError(f"{name} is not a registered variable: add an EnvVar to shardllm/envs/__init__.py")
    return ENV_VARS[name].value(environ)


def is_set(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether registered variable `name` is present in `environ` (default os.environ)."""
    if name not in ENV_VARS:
        raise KeyError(f"{name} is not a registered variable: add an EnvVar to shardllm/envs/__init__.py")
    return name in (os.environ if environ is None else environ)


def is_given(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether registered variable `name` is set to a value that is not blank (a blank one keeps the default)."""
    return is_set(name, environ) and bool((os.environ if environ is None else environ)[name].strip())


def __getattr__(name: str) -> Any:  # envs.SHARDLLM_<NAME>: read and parsed at each access
    if name in ENV_VARS:
        return ENV_VARS[name].value()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *ENV_VARS])


def _shown(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, tuple):
        return ",".join(v) or "-"
    return "-" if v is None else str(v)


def table(environ: Mapping[str, str] | None = None, only_set: bool = False) -> str:
    """The registry as text: name, type, default, current value (`*`: set in `environ`), when read, and the doc;
    then any SHARDLLM_* name in `environ` that is not registered (a typo reads as the default). A secret's value
    shows as <set>; a value that does not parse shows as `invalid`, with the error under it."""
    environ = os.environ if environ is None else environ
    rows, notes = [("NAME", "TYPE", "DEFAULT", "VALUE", "READ")], [[]]
    for v in _VARS:
        here = v.name in environ
        if only_set and not here:
            continue
        note = [v.doc]
        try:
            value = "<set>" if v.secret and here else _shown(v.value(environ, strict=True))
        except ValueError as e:
            value, note = "invalid", [v.doc, f"! {e}"]
        rows.append((v.name, v.type, _shown(v.parse(v.default)), value + (" *" if here else ""), v.read_at))
        notes.append(note)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for r, note in zip(rows, notes, strict=True):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
        lines.extend("    " + n for n in note)
    if only_set and len(rows) == 1:
        lines.append("(none set: every variable has its default; `shardllm envs` lists them)")
    unknown = sorted(k for k in environ if k.startswith("SHARDLLM_") and k not in ENV_VARS)
    if unknown:
        lines.append(f"not shardllm variables (a typo? nothing reads them): {', '.join(unknown)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shardllm envs", description="The SHARDLLM_* environment variables: type, "
                                "default, current value (* = set here), when the code reads it (READ: 'import' / "
                                "'start-up': set it before the process starts; 'per call': may change at run time; "
                                "'in the pod': read by the Kubernetes manifests), what it is for.")
    p.add_argument("--set", dest="only_set", action="store_true", help="only the variables set in this environment")
    a = p.parse_args(argv)
    from shardllm.utils import print_output

    print_output(table(only_set=a.only_set))  # `shardllm envs | head`: no traceback
    bad = invalid_names()
    lenient = [n for n in bad if ENV_VARS[n].lenient]
    strict = [n for n in bad if not ENV_VARS[n].lenient]
    if lenient:  # exit status 1, so that a start script can check the environment before it starts the server
        print(f"invalid: {', '.join(lenient)} (the engine uses the default, with a warning; fix or unset)",
              file=sys.stderr)
    if strict:
        print(f"invalid: {', '.join(strict)} (an error where the engine reads it; fix or unset)", file=sys.stderr)
    return 1 if bad else 0


def invalid_names(environ: Mapping[str, str] | None = None) -> list[str]:
    """The registered variables set in `environ` (default os.environ) to a value that does not parse."""
    environ = os.environ if environ is None else environ
    bad = []
    for v in _VARS:
        if v.name in environ:
            try:
                v.value(environ, strict=True)
            except ValueError:
                bad.append(v.name)
    return bad
