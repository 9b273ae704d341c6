"""The model runner: owns the model and its KV cache on one device, turns a step's plan into tensors,
runs the forward and samples. The only part of the engine that touches a device."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from shardllm import envs
from shardllm.config import EngineConfig
from shardllm.distributed.communication import pp_recv, pp_send
from shardllm.distributed.parallel_state import get_parallel_context
from shardllm.layers import microbatch_overlap
from shardllm.layers.attention import Attention, AttentionMetadata
from shardllm.layers.quantization.kv_cache import kv_cache_torch_dtype, layers_to_calibrate, set_kv_scale_calibration
from shardllm.model_loader.loader import load_model
from shardllm.sampling_params import SamplingParams
from shardllm.step_io import PLACEHOLDER, ModelRunnerOutput, SchedulerOutput
from shardllm.worker.block_table import BlockTables
from shardllm.worker.cuda_graph import CudaGraphRunner, graph_lm_head_enabled, sampled_rows
from shardllm.worker.kernel_warm_up import KernelWarmUp
from shardllm.worker.prompt_logprobs import compute_prompt_logprobs
from shardllm.worker.sampler import Sampler, SamplerOutput, SamplingBatch, is_plain_greedy

logger = logging.getLogger(__name__)


@dataclass
class CachedRequestState:
    num_prompt_tokens: int
    sampling_params: SamplingParams
    generator: torch.Generator | None
    token_ids: list[int] = field(default_factory=list)  # every token fed so far, in order
    prompt_token_ids: list[int] | None = None  # only with prompt_logprobs


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # (N,)
    positions: torch.Tensor  # (N,)
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # (S,) rows of the hidden states that sample
    sample_req_ids: list[str]


@dataclass
class PendingOutput:
    """A launched step's sampled tokens on their way to the host; `get` waits for them (the step's one sync)."""

    req_ids: list[str]
    tokens: torch.Tensor  # (S,) on the device, or the host copy
    logprobs: list | None
    event: torch.cuda.Event | None = None
    errors: dict[str, str] | None = None
    prompt_logprobs: dict | None = None

    @staticmethod
    def launch(req_ids: list[str], tokens: torch.Tensor, logprobs, pin: bool,
               errors: dict[str, str] | None = None) -> PendingOutput:
        if not pin:
            return PendingOutput(req_ids, tokens, logprobs, errors=errors)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return PendingOutput(req_ids, host, logprobs, event, errors)

    def ready(self) -> bool:
        """Whether `get` would return without waiting for the device."""
        return self.event is None or self.event.query()

    def get(self) -> ModelRunnerOutput:
        if self.event is not None:
            self.event.synchronize()
        return ModelRunnerOutput(self.req_ids, self.tokens.tolist(), self.logprobs, self.errors,
                                 prompt_logprobs=self.prompt_logprobs)


def _fresh_from(starts: np.ndarray) -> int:
    """AttentionMetadata.fresh_from of a step whose sequences start at context positions `starts`: the first
    sequence after the last one with cached context (a decode, a later chunk), whose attention reads the cache."""
    with_context = np.flatnonzero(starts > 0)
    return int(with_context[-1]) + 1 if len(with_context) else 0


def is_ready(out: PendingOutput | ModelRunnerOutput | None) -> bool:
    return not isinstance(out, PendingOutput) or out.ready()


def resolve(out: PendingOutput | ModelRunnerOutput | None) -> ModelRunnerOutput | None:
    return out.get() if isinstance(out, PendingOutput) else out


class ModelRunner(KernelWarmUp):
    def __init__(self, config: EngineConfig, device: torch.device):
        self.config = config
        self.device = device
        self.model_config = config.model_config
        self.block_size = config.cache_config.block_size
        self.model = load_model(self.model_config, device, show_progress=get_parallel_context().is_driver)
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.kv_cache_dtype = kv_cache_torch_dtype(config.cache_config.kv_cache_dtype, self.model_config.dtype)
        # an FP8 cache computes the k/v scales the checkpoint lacks on the first step (quantization/kv_cache.py)
        self._calibrate_layers = layers_to_calibrate(self.attn_layers) if self.kv_cache_dtype.itemsize == 1 else []
        self._calibrate_kv = bool(self._calibrate_layers)
        ctx = get_parallel_context()
        if self._calibrate_kv and ctx.tp_rank == 0:  # each pipeline stage says it of its own layers
            stage = f" (pipeline stage {ctx.pp_rank})" if ctx.pp_size > 1 else ""
            if len(self._calibrate_layers) == len(self.attn_layers):
                logger.info("kv_cache_dtype=%s without k/v scales in the checkpoint%s: each layer's scales are "
                            "computed from the first step's k and v", config.cache_config.kv_cache_dtype, stage)
            else:
                logger.warning("kv_cache_dtype=%s: the checkpoint gives k/v scales for some attention layers but not "
                               "k and v of %d of these %d%s: the missing ones are computed from the first step's k "
                               "and v", config.cache_config.kv_cache_dtype, len(self._calibrate_layers),
                               len(self.attn_layers), stage)
        for a in self.attn_layers:
            a.use_triton = config.attention_backend != "torch"
        from shardllm.layers import triton_ops

        # the all-torch reference path has no fused kernels either (a process-wide switch: set it both ways)
        triton_ops.USE_TRITON = False if config.attention_backend == "torch" else None
        self.kv_caches: list[torch.Tensor] = []
        self.requests: dict[str, CachedRequestState] = {}
        self.sampler = Sampler()
        self.vocab_size = self.model_config.hf_config.vocab_size
        self._pin = device.type == "cuda"  # host buffers of the step's copies are pinned on a GPU
        # Async scheduling: a placeholder of step m is the token request r sampled at an earlier step j.
        self._step = 0  # steps run so far (every rank runs every step, so the count agrees across ranks)
        self._sampled_at: dict[str, tuple[int, int]] = {}  # first stage: request -> (step, row) of its last sample
        self._step_tokens: dict[int, list] = {}  # first stage: step -> [tokens (S,) on the device, pending recv]
        self._sends: list = []  # last stage of a pipeline: token sends in flight (kept until done)
        self._tables = BlockTables()  # every request's block table (plans carry the changes only)
        self._failed: dict[str, str | None] = {}  # request -> why its sampling failed (None: already reported)
        self._with_prompt_logprobs: set[str] = set()  # requests that asked for prompt logprobs

    # ---- KV cache --------------------------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        a = self.attn_layers[0] if self.attn_layers else None
        if a is None:
            return 1
        elem = torch.empty((), dtype=self.kv_cache_dtype).element_size()
        return 2 * self.block_size * a.num_kv_heads * a.head_dim * elem * len(self.attn_layers)

    @torch.inference_mode()
    def determine_num_blocks(self) -> int:
        cc = self.config.cache_config
        if cc.num_blocks is not None:
            return cc.num_blocks
        per_block = self.kv_bytes_per_block()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            self.profile_run()
            torch.cuda.synchronize(self.device)
            activation = torch.cuda.max_memory_allocated(self.device) - before
            torch.cuda.empty_cache()
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * cc.kv_cache_free_gpu_memory_fraction - activation
        else:
            budget = cc.cpu_kv_cache_gb * (1 << 30)
        return max(int(budget // per_block), 0)

    def profile_run(self) -> None:
        """A forward of a full token budget (one long prompt) to measure peak activation memory."""
        sc = self.config.scheduler_config
        self._bind_kv_caches(1)
        self._dummy_forward(min(sc.max_num_batched_tokens, sc.max_model_len), logits=True)
        self.kv_caches = []
        for a in self.attn_layers:
            a.kv_cache = None

    def _bind_kv_caches(self, num_blocks: int) -> None:
        """Zero-filled caches (slots past a sequence's end then hold zeros or stale finite values, which the
        transposed-V decode reads unmasked), V stored transposed where _v_transposed says."""
        self.kv_caches = []
        v_t = self._v_transposed()
        for a in self.attn_layers:
            cache = torch.zeros(2, num_blocks, self.block_size, a.num_kv_heads, a.head_dim,
                                dtype=self.kv_cache_dtype, device=self.device)
            a.kv_cache = cache
            a.v_transposed = v_t
            self.kv_caches.append(cache)

    def _v_transposed(self) -> bool:
        """V stored transposed (SHARDLLM_KV_V_TRANSPOSED, on by default) where every decode reads that layout by TMA:
        the Triton attention kernels, an FP8 cache and triton_decode_tma.vt_layout_eligible for every attention
        layer (an NVIDIA sm90+ GPU, power-of-two head_dim and pages in [16, 256]). Elsewhere the standard layout,
        with a warning (once) only if the variable was set."""
        if not envs.SHARDLLM_KV_V_TRANSPOSED:
            return False
        from shardllm.layers.attention.triton_decode_tma import vt_layout_eligible

        itemsize = self.kv_cache_dtype.itemsize
        ok = (self._uses_triton_attention() and itemsize == 1
              and all(vt_layout_eligible(self.device, a.head_dim, self.block_size, itemsize)
                      for a in self.attn_layers))
        if not ok and envs.is_given("SHARDLLM_KV_V_TRANSPOSED") and not getattr(self, "_v_transposed_warned", False):
            self._v_transposed_warned = True
            logger.warning("SHARDLLM_KV_V_TRANSPOSED=1 ignored: it needs the Triton attention kernels, an FP8 KV "
                           "cache, an NVIDIA sm90+ GPU, a power-of-two head_dim of at least 16 and a block_size "
                           "that is a power of two in [16, 256]")
        return ok

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._bind_kv_caches(num_blocks)
        self.graph_runner = None
        if self._use_cuda_graphs():
            sc = self.config.scheduler_config
            runner = CudaGraphRunner(self.model, self.device, sc.max_num_seqs, sc.max_model_len, self.block_size,
                                     self.model_config.dtype, lm_head=graph_lm_head_enabled())
            try:
                runner.capture(log=get_parallel_context().is_driver)
                self.graph_runner = runner
            except Exception as e:  # a layer that cannot be captured: serve eagerly rather than not at all
                logger.warning("CUDA graph capture failed (%s: %s); running eagerly", type(e).__name__, e)
                torch.cuda.synchronize(self.device)
        if self._uses_triton_attention() and envs.SHARDLLM_KERNEL_WARM_UP:  # every rank alike: their collectives
            self.warm_up_kernels(log=get_parallel_context().is_driver)

    def _uses_triton_attention(self) -> bool:
        from shardllm.layers.attention import triton_paged

        return self.device.type == "cuda" and triton_paged.HAS_TRITON and self.config.attention_backend != "torch"

    def _use_cuda_graphs(self) -> bool:
        return self._uses_triton_attention() and not self.config.enforce_eager

    # ---- one step --------------------------------------------------------------------------------------------
    def _update_states(self, so: SchedulerOutput) -> None:
        for rid in so.finished_req_ids:
            self.requests.pop(rid, None)
            self._failed.pop(rid, None)
            self._with_prompt_logprobs.discard(rid)
            self._sampled_at.pop(rid, None)
            self._tables.drop(rid)
        for new in so.new_requests:
            p = new.sampling_params
            gen = None
            if p.seed is not None and not p.is_greedy:
                gen = torch.Generator(device=self.device)
                try:
                    gen.manual_seed(p.seed)
                except Exception as e:  # a seed out of range fails this request only
                    self._failed[new.req_id] = f"cannot seed the sampler with {p.seed!r}: {e}"
                    gen = None
            self.requests[new.req_id] = CachedRequestState(new.num_prompt_tokens, p, gen,
                                                           prompt_token_ids=new.prompt_token_ids)
            if new.prompt_token_ids is not None:
                self._with_prompt_logprobs.add(new.req_id)
        for s in so.scheduled:
            st = self.requests[s.req_id]
            if len(st.token_ids) != s.num_computed_tokens:
                del st.token_ids[s.num_computed_tokens:]  # recompute after preemption
            st.token_ids.extend(s.token_ids)

    def prepare_inputs(self, so: SchedulerOutput) -> StepInputs:
        """The step's tensors, built with numpy and sent in two host-to-device copies from pinned memory.

        No host sync: a placeholder token (async scheduling) is filled on the device from the tokens an
        earlier step sampled (with a pipeline, the last stage sends them to the first).
        """
        bs = self.block_size
        n_seqs = len(so.scheduled)
        q_lens = np.fromiter((len(s.token_ids) for s in so.scheduled), dtype=np.int64, count=n_seqs)
        starts = np.fromiter((s.num_computed_tokens for s in so.scheduled), dtype=np.int64, count=n_seqs)
        seq_lens = starts + q_lens
        qsl = np.zeros(n_seqs + 1, dtype=np.int64)
        np.cumsum(q_lens, out=qsl[1:])
        num_tokens = int(qsl[-1])
        input_ids = np.fromiter((t for s in so.scheduled for t in s.token_ids), dtype=np.int64, count=num_tokens)
        # position of each token: its sequence's start plus its offset inside the chunk
        seq_of_token = np.repeat(np.arange(n_seqs), q_lens)
        positions = starts[seq_of_token] + (np.arange(num_tokens) - qsl[:-1][seq_of_token])
        # block tables: apply the plan's changes, then copy the step's rows out in one go
        tables = self._tables
        rows = np.fromiter((tables.update(s.req_id, s.block_start, s.block_ids) for s in so.scheduled),
                           dtype=np.int64, count=n_seqs)
        max_blocks = int(-(-seq_lens.max() // bs))
        block_tables = tables.gather(rows, max_blocks)
        slot_mapping = block_tables[seq_of_token, positions // bs] * bs + positions % bs
        sample_rows = [i for i, s in enumerate(so.scheduled) if s.do_sample]
        logits_indices = qsl[1:][sample_rows] - 1
        # placeholders (async scheduling): only the first stage reads token ids; later stages leave them be
        holes = np.flatnonzero(input_ids == PLACEHOLDER) if self.model.is_first_stage else np.zeros(0, np.int64)
        where = [self._sampled_at[so.scheduled[j].req_id] for j in seq_of_token[holes]]  # (step, row) each
        hole_steps = np.fromiter((w[0] for w in where), dtype=np.int64, count=len(holes))
        order = np.argsort(hole_steps, kind="stable")  # one gather per source step
        holes, hole_steps = holes[order], hole_steps[order]
        hole_rows = np.fromiter((where[i][1] for i in order), dtype=np.int64, count=len(holes))
        i64 = self._to_device([input_ids, positions, slot_mapping, logits_indices, holes, hole_rows], torch.long)
        i32 = self._to_device([qsl, seq_lens, block_tables.reshape(-1)], torch.int32)
        ids, pos, slots, logits_idx, holes_t, rows_t = i64
        if len(holes):
            cuts = np.flatnonzero(np.diff(hole_steps)) + 1
            for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), len(holes)]):
                ids[holes_t[a:b]] = self._tokens_of_step(int(hole_steps[a]))[rows_t[a:b]]
        if self.model.is_first_stage and self.config.scheduler_config.async_scheduling:
            for k, i in enumerate(sample_rows):  # row k of this step's sampled tokens
                self._sampled_at[so.scheduled[i].req_id] = (self._step, k)
        max_query_len = int(q_lens.max())
        meta = AttentionMetadata(
            slot_mapping=slots, query_start_loc=i32[0], seq_lens=i32[1],
            block_tables=i32[2].view(n_seqs, max_blocks), max_query_len=max_query_len,
            max_seq_len=int(seq_lens.max()), block_size=bs,
            num_decodes=int(np.argmax(q_lens != 1)) if max_query_len > 1 else 0,  # the leading one-token rows
            host_query_start_loc=qsl,
            fresh_from=_fresh_from(starts) if max_query_len > 1 else None)
        return StepInputs(ids, pos, meta, logits_idx, [so.scheduled[i].req_id for i in sample_rows])

    def _tokens_of_step(self, step: int) -> torch.Tensor:
        """The tokens step `step` sampled, on this device (a pipeline's first stage waits for their arrival:
        on a GPU that is a wait of the stream, not of the host)."""
        entry = self._step_tokens[step]
        if entry[1] is not None:
            entry[1].wait()
            entry[1] = None
        return entry[0]

    def _keep_step_tokens(self, step: int, tokens: torch.Tensor | None, num_sampled: int) -> None:
        """First stage, async scheduling: keep this step's sampled tokens (or post their receive from the last
        stage) for the placeholders of later steps; forget steps too old to be referenced."""
        if tokens is not None:
            self._step_tokens[step] = [tokens, None]
        else:
            from shardllm.distributed.communication import recv_tokens_from_last_stage

            buf = torch.empty(num_sampled, dtype=torch.long, device=self.device)
            self._step_tokens[step] = [buf, recv_tokens_from_last_stage(buf)]
        # a placeholder refers to its request's previous step, which is still in flight: at most pp + 1 back
        horizon = step - self.config.parallel_config.pipeline_parallel_size - 2
        for old in [j for j in self._step_tokens if j < horizon]:
            self._tokens_of_step(old)  # a receive completes before its buffer goes
            del self._step_tokens[old]

    def _to_device(self, arrays: list[np.ndarray], dtype: torch.dtype) -> list[torch.Tensor]:
        """Concatenate into one pinned host buffer, copy once without blocking, split on the device.

        Each array starts at a multiple of 16 bytes of the buffer (padding between them), so every tensor returned
        is 16-byte aligned: Triton specializes its kernels on their pointers' alignment, and tensors at arbitrary
        offsets made the attention, rotary and KV-write kernels compile a variant per alignment in the middle of a
        run (measured on an H200, ninth session: ~2-4 s of first-run compiles at 1000 x 128/128; docs/benchmarks.md).
        A fresh buffer per step: the caching host allocator keeps it until its copy has run.
        """
        align = max(16 // dtype.itemsize, 1)  # elements per 16 bytes
        sizes = [a.size for a in arrays]
        starts = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum([-(-n // align) * align for n in sizes], out=starts[1:])
        host = torch.empty(int(starts[-1]), dtype=dtype, pin_memory=self._pin)
        flat = host.numpy()
        for a, start in zip(arrays, starts.tolist()):
            flat[start:start + a.size] = a.reshape(-1)
        dev = host.to(self.device, non_blocking=True)
        return [dev[start:start + n] for start, n in zip(starts.tolist(), sizes)]

    def _sampling_batch(self, req_ids: list[str]) -> SamplingBatch:
        states = [self.requests[r] for r in req_ids]
        params = [s.sampling_params for s in states]
        batch = SamplingBatch(all_greedy=all(p.is_greedy for p in params),
                              generators={i: s.generator for i, s in enumerate(states) if s.generator is not None})
        if not batch.all_greedy:  # greedy rows need none of these: no copy at all for an all-greedy batch
            cols = [[p.temperature for p in params], [p.top_p for p in params], [p.min_p for p in params],
                    [min(max(p.top_k, 0), self.vocab_size) for p in params]]
            batch.temperature, batch.top_p, batch.min_p, top_k = self._to_device(
                [np.asarray(c, dtype=np.float32) for c in cols], torch.float32)
            batch.top_k = top_k.long()
            batch.any_top_k_top_p = any(p.top_k > 0 or p.top_p < 1.0 for p in params)
            batch.any_min_p = any(p.min_p > 0 for p in params)
        if any(p.needs_penalties for p in params):
            dev = self.device
            batch.presence = torch.tensor([p.presence_penalty for p in params], device=dev)
            batch.frequency = torch.tensor([p.frequency_penalty for p in params], device=dev)
            batch.repetition = torch.tensor([p.repetition_penalty for p in params], device=dev)
            # only rows with penalties read their tokens (the others' penalties are neutral); those rows are
            # never scheduled ahead of their tokens, so their lists hold no placeholder
            batch.prompt_token_ids = [s.token_ids[: s.num_prompt_tokens] if p.needs_penalties else []
                                      for s, p in zip(states, params)]
            batch.output_token_ids = [s.token_ids[s.num_prompt_tokens:] if p.needs_penalties else []
                                      for s, p in zip(states, params)]
        for i, (s, p) in enumerate(zip(states, params)):
            if p.min_tokens and len(s.token_ids) - s.num_prompt_tokens < p.min_tokens:
                banned = [t for t in (*p.stop_token_ids, *(() if p.ignore_eos else p.eos_token_ids))
                          if t < self.vocab_size]
                if banned:
                    batch.banned_tokens[i] = banned
            if p.logits_processors:  # like penalties, never scheduled ahead of its tokens: no placeholder here
                batch.logits_processors[i] = (p.logits_processors, s.token_ids[s.num_prompt_tokens:])
        asked = [p.logprobs for p in params if p.logprobs is not None]
        batch.max_num_logprobs = max(asked) if asked else None
        if any(p.logit_bias for p in params):
            rows, ids, bias = zip(*((i, t, b) for i, p in enumerate(params) for t, b in (p.logit_bias or {}).items()))
            batch.logit_bias = (torch.tensor(rows, device=self.device), torch.tensor(ids, device=self.device),
                                torch.tensor(bias, dtype=torch.float32, device=self.device))
        return batch

    def _sample(self, logits: torch.Tensor, req_ids: list[str], greedy: torch.Tensor | None = None):
        """Sample every row; a row whose settings fail (a raising logits processor, a value out of range) fails its
        request alone: it gets a filler token (0) and an entry in the returned errors. `greedy` (S,): the argmax
        of `logits` computed in the decode graph, the tokens of a batch that only takes the argmax.

        Returns (SamplerOutput, errors: request id -> message, or None).
        """
        if not (self._failed and any(r in self._failed for r in req_ids)):  # no request of the batch failed yet
            try:
                batch = self._sampling_batch(req_ids)
                if greedy is not None and is_plain_greedy(batch):  # a copy: the next replay overwrites the graph's
                    return SamplerOutput(greedy.clone()), None
                return self.sampler(logits, batch, self._num_logprobs(req_ids)), None
            except Exception:
                pass
        # something in the batch fails: sample row by row to find the rows at fault (a rare, slow path)
        tokens = torch.zeros(len(req_ids), dtype=torch.long, device=self.device)
        logprobs: list | None = None
        errors: dict[str, str] = {}
        for i, rid in enumerate(req_ids):
            if rid in self._failed:
                reason = self._failed[rid]
                if reason is not None:  # report once; later rows of the request are fillers until it is dropped
                    errors[rid], self._failed[rid] = reason, None
                continue
            try:
                out = self.sampler(logits[i:i + 1], self._sampling_batch([rid]), self._num_logprobs([rid]))
            except Exception as e:
                logger.warning("sampling failed for request %s: %s: %s", rid, type(e).__name__, e)
                errors[rid] = f"sampling failed: {type(e).__name__}: {e}"
                self._failed[rid] = None
                continue
            tokens[i] = out.token_ids[0]
            if out.logprobs is not None:
                logprobs = logprobs or [None] * len(req_ids)
                logprobs[i] = out.logprobs[0]
        return SamplerOutput(tokens, logprobs), errors or None

    def _num_logprobs(self, req_ids: list[str]) -> list[int | None]:
        return [self.requests[r].sampling_params.logprobs for r in req_ids]

    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput) -> PendingOutput | ModelRunnerOutput | None:
        """Launch one step; the output rank returns its tokens (`PendingOutput.get` waits), the others None."""
        self._update_states(so)
        if not so.scheduled:
            return ModelRunnerOutput([], [])
        inputs = self.prepare_inputs(so)  # this step is number self._step
        step, self._step = self._step, self._step + 1
        intermediate = None
        if not self.model.is_first_stage:  # activations of the stage before, (N, H) each
            n, h = inputs.positions.shape[0], self.model_config.hf_config.hidden_size
            intermediate = pp_recv(["hidden_states", "residual"], (n, h), self.model_config.dtype, self.device)
        meta = inputs.meta
        g = getattr(self, "graph_runner", None)
        calibrate, self._calibrate_kv = self._calibrate_kv, False  # first step: eager, sets the k/v scales
        graph_out = None
        if g is not None and not calibrate and g.can_run(len(so.scheduled), meta.max_query_len, meta.max_seq_len):
            graph_out = g.run(inputs.input_ids, inputs.positions, meta, intermediate)  # a replayed decode graph
            hidden = graph_out.hidden
        else:
            if calibrate:
                set_kv_scale_calibration(self._calibrate_layers, True)
                try:
                    with microbatch_overlap.suspended():  # scales from the whole batch, not from each half
                        hidden = self.model(inputs.input_ids, inputs.positions, meta, intermediate)  # (N, H)
                finally:  # a failed first step must not leave every later eager step recalibrating
                    set_kv_scale_calibration(self._calibrate_layers, False)
            else:
                hidden = self.model(inputs.input_ids, inputs.positions, meta, intermediate)  # (N, H)
        overlap = self.config.scheduler_config.async_scheduling
        if not self.model.is_last_stage:
            pp_send(hidden)
            if overlap and self.model.is_first_stage and inputs.sample_req_ids:
                self._keep_step_tokens(step, None, len(inputs.sample_req_ids))  # from the last stage, later
            return None
        prompt_logprobs = None  # (no per-step walk over the batch unless a request asked)
        if self._with_prompt_logprobs:
            prompt_logprobs = compute_prompt_logprobs(self.model, hidden, so, self.requests)  # every tp rank
        if not inputs.sample_req_ids:
            return ModelRunnerOutput([], [], prompt_logprobs=prompt_logprobs)
        greedy = None
        if graph_out is not None and graph_out.logits is not None:  # the graph ran the LM head (on every tp rank)
            logits = sampled_rows(graph_out.logits, inputs.logits_indices, len(so.scheduled))  # (S, V)
            greedy = sampled_rows(graph_out.greedy, inputs.logits_indices, len(so.scheduled))  # (S,)
        else:
            logits = self.model.compute_logits(hidden[inputs.logits_indices])  # (S, V), on every tp rank
        is_output = get_parallel_context().is_output_rank
        if not is_output and not self.config.scheduler_config.async_scheduling:
            return None
        # With async scheduling every tp rank samples (the same logits, the same seeds: the same tokens), so
        # that each can fill the next step's placeholders on its own device; the output rank returns them.
        out, errors = self._sample(logits, inputs.sample_req_ids, greedy)
        if overlap:  # later steps' placeholders read these on the device
            if self.model.is_first_stage:
                self._keep_step_tokens(step, out.token_ids, len(inputs.sample_req_ids))
            else:
                from shardllm.distributed.communication import send_tokens_to_first_stage

                self._sends = [(w, t) for w, t in self._sends if not w.is_completed()]
                self._sends.append((send_tokens_to_first_stage(out.token_ids), out.token_ids))  # alive until sent
        if not is_output:
            return None
        pending = PendingOutput.launch(inputs.sample_req_ids, out.token_ids, out.logprobs, self._pin, errors)
        pending.prompt_logprobs = prompt_logprobs
        return pending
