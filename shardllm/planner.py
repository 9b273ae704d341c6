"""The guide's parallelism decision tree made quantitative: memory per rank, KV tokens, a decode roofline.

`estimate` sizes one layout (tp x pp) the way our engine sizes it at start-up; `plan` enumerates the layouts
of a GPU count and ranks the ones that fit. Everything is arithmetic on the model's config: no GPU needed.
Sources of each formula are named where it is used; "[ours]" marks our own estimate or choice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from shardllm.config import (
    KV_CACHE_DTYPES,
    _model_max_len,
    check_tp_size,
    default_block_size,
    moe_intermediate_size,
    num_experts,
    valid_tp_sizes,
)
from shardllm.distributed.parallel_state import pp_layer_split
from shardllm.model_loader.size import active_linears, layer_shapes

GiB = 1 << 30
KV_DTYPES = KV_CACHE_DTYPES  # the engine's (serve's) names exactly: auto is the activation dtype
WEIGHT_DTYPES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "auto": 2, "fp32": 4, "float32": 4, "fp8": 1}


@dataclass(frozen=True)
class GPUSpec:
    """Figures from NVIDIA's datasheets (SXM parts): memory in bytes, HBM and per-direction NVLink bandwidth in
    bytes/s; `fp8`: FP8 tensor cores (compute capability >= 8.9), without which serve refuses dtype fp8;
    dense (not sparse) tensor-core peaks in FLOP/s, bf16 and fp8."""

    name: str
    memory_bytes: int
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float
    fp8: bool = True
    bf16_flops: float = 989.4e12
    fp8_flops: float = 1978.9e12


GPU_SPECS = {
    "A100": GPUSpec("A100", 80 * GiB, 2.039e12, 300e9, fp8=False, bf16_flops=312e12, fp8_flops=0.0),  # sm_80
    "H100": GPUSpec("H100", 80 * GiB, 3.35e12, 450e9),
    "H200": GPUSpec("H200", 141 * 10**9, 4.8e12, 450e9),
}
PCIE_BYTES_PER_S = 64e9  # PCIe 5.0 x16, one direction (the note's AIConfigurator h100_sxm figure)
INTER_NODE_BYTES_PER_S = 50e9  # 400 Gb/s InfiniBand NDR per GPU [ours: a typical HGX fabric]
# Decode reaches ~70% of HBM peak: the README's 4.32 ms/token for Llama-3-8B bf16 on one H200 reads the weights but
# the input embedding, 15.0 GB / 4.32 ms = 3.5 TB/s of 4.8 TB/s (72%).
HBM_EFFICIENCY = 0.7
# Large-batch GEMMs reach ~75% of the dense tensor-core peak: on one H200, Llama-3-8B fp8 at batch 1024 ran its FP8
# GEMMs (1024 tokens x 15.0 GFLOP) in 10.45 ms of a 20.66 ms decode step, 74% of 1,979 TFLOP/s, and Llama-3-70B fp8
# its in 92.8 ms, 78% (docs/benchmarks.md, batch-1024 decode-step profiles).
MATMUL_EFFICIENCY = 0.75
ALL_REDUCE_LATENCY_S = {"nvlink": 10e-6, "pcie": 30e-6}  # per small all-reduce [ours: NCCL ring, few GPUs]
P2P_LATENCY_S = 10e-6
# Non-torch memory the engine does not see as free: CUDA context and cuBLAS workspace [ours, ~0.6 GiB on
# Hopper], NCCL buffers (AIConfigurator systems/h100_sxm.yaml: 342 MB at tp 2, 392 MB at tp >= 4).
CONTEXT_BYTES = int(0.6 * GiB)
NCCL_BYTES = {1: 0, 2: 342 * 10**6}
NCCL_BYTES_LARGE = 392 * 10**6
PP_BUFFER_BYTES = 64 * 2**20  # send/recv buffers of a pipeline stage [ours]
# A layout "fits" when the KV cache gets at least this share of each GPU. [ours] The guide's decision tree
# (20 GB -> 1 GPU, 80 GB -> tp 2-4, 320 GB -> tp 4-8, else tp 8 + pp 2; 80 GB GPUs) keeps the weights at
# no more than about half of each GPU; 0.4 reproduces every branch of it with the engine's 0.9 fraction.
MIN_KV_SHARE = 0.4


def gpu_spec(name: str | None = None, memory_bytes: int | None = None) -> GPUSpec:
    """The spec for a GPU model name (as NVML reports it, e.g. "NVIDIA H200"), else the closest by memory.

    A name none of GPU_SPECS' keys is in (a local GPU NVML names) gets the H100's or H200's bandwidth figures by
    memory; `check_gpu_name` refuses such a name where a user typed it."""
    for key, spec in GPU_SPECS.items():
        if name and key in name.upper():
            return spec if memory_bytes is None else replace(spec, memory_bytes=memory_bytes)
    if memory_bytes is None:
        return GPU_SPECS["H100"]
    base = GPU_SPECS["H200"] if memory_bytes > 100 * GiB else GPU_SPECS["H100"]
    return replace(base, name=name or base.name, memory_bytes=memory_bytes)


def check_gpu_name(name: str) -> str:
    """`name` if it names a GPU of GPU_SPECS (case-insensitive, as a part: "h200", "NVIDIA H200"); else ValueError
    listing the known ones (an unknown GPU would be planned with another's bandwidth figures)."""
    if not any(key in name.upper() for key in GPU_SPECS):
        raise ValueError(f"unknown GPU {name!r}: the planner knows {', '.join(GPU_SPECS)}; for another GPU leave "
                         "--gpu out and pass --gpu_memory_gib (bandwidth figures then follow the memory size)")
    return name


def weight_dtype_of(model_config) -> str:
    """The weight dtype of an engine's ModelConfig in the planner's words: fp8 when quantized, else bf16/fp16/fp32."""
    if getattr(model_config, "quantization", None) is not None:
        return "fp8"
    name = str(model_config.dtype).removeprefix("torch.")
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(name, name)


def kv_bytes_per_element(kv_cache_dtype: str, activation_bytes: int) -> int:
    if kv_cache_dtype not in KV_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {list(KV_DTYPES)}, got {kv_cache_dtype!r}")
    return 1 if kv_cache_dtype.startswith("fp8") else activation_bytes


@dataclass
class StageEstimate:
    """One pipeline stage; its tp ranks are alike. Bytes per GPU unless named otherwise."""

    pp_rank: int
    num_layers: int
    weights: int
    kv_bytes_per_token: int
    activations: int  # peak of the profile forward (min(max_num_batched_tokens, max_seq_len) tokens)
    overhead: int  # CUDA context, NCCL and pipeline buffers: memory torch does not report as free
    kv_budget: int
    kv_tokens: int  # capacity in tokens, whole blocks, less the one block the engine keeps aside
    decode_weights: int  # `weights` less the input embedding (a token reads one row): what a decode step reads,
    # every expert of an MoE layer included (a batch's tokens route to most of them; batch 1 reads fewer)
    decode_flops_per_token: int = 0  # 2 x the multiply-adds of its Linears for one token (MoE: top_k experts)


@dataclass
class LayoutEstimate:
    tensor_parallel_size: int
    pipeline_parallel_size: int
    stages: list[StageEstimate]
    gpu_memory_bytes: int
    max_seq_len: int
    weight_dtype: str = "bf16"

    @property
    def kv_tokens(self) -> int:
        """The engine takes the smallest stage: every stage holds every running request's KV."""
        return min(s.kv_tokens for s in self.stages)

    @property
    def max_concurrency(self) -> float:
        """Requests of max_seq_len tokens that fit in the KV cache at once (vLLM's start-up figure)."""
        return self.kv_tokens / self.max_seq_len

    @property
    def kv_share(self) -> float:
        return min(s.kv_budget for s in self.stages) / self.gpu_memory_bytes


def _linear_bytes(n: int, k: int, weight_bytes: int) -> int:
    """An (n, k) Linear: fp8 stores 1 byte per weight plus one fp32 scale per output row (the row-wise scheme,
    an upper bound for per-tensor scales)."""
    return n * k * weight_bytes + (4 * n if weight_bytes == 1 else 0)


def _layer_weight_bytes(c, i: int, tp: int, weight_bytes: int) -> int:
    """Decoder layer i's weights on one tp rank: its Linears at `weight_bytes`, the rest (norms, biases, routers)
    in the activation dtype (2 bytes)."""
    linears, other = layer_shapes(c, i, tp)
    return sum(_linear_bytes(n, k, weight_bytes) for n, k in linears) + 2 * other


def _layer_flops(c, i: int, tp: int) -> int:
    """2 x the multiply-adds of decoder layer i's Linears for one token on one tp rank (MoE: its top_k experts)."""
    return int(sum(2 * n * k * share for n, k, share in active_linears(c, i, tp)))


def _activation_bytes(c, tp: int, num_tokens: int, max_num_seqs: int, act_bytes: int) -> int:
    """Peak of the profile forward [ours]: hidden, residual, normed input and the MLP's gate_up and activated
    halves for every token (n x (3h + 3I/tp)), plus the fp32 logits of the last max_num_seqs tokens."""
    inter = moe_intermediate_size(c) if num_experts(c) else c.intermediate_size
    vocab = -(-c.vocab_size // tp) * tp
    return num_tokens * (3 * c.hidden_size + 3 * inter // tp) * act_bytes + min(max_num_seqs, num_tokens) * vocab * 4


def estimate(hf_config, tp: int = 1, pp: int = 1, *, weight_dtype: str = "bf16", kv_cache_dtype: str = "auto",
             max_seq_len: int | None = None, max_num_batched_tokens: int = 8192, max_num_seqs: int = 256,
             gpu_memory_bytes: int = 80 * GiB, kv_cache_free_gpu_memory_fraction: float = 0.9,
             block_size: int | None = None, pp_partition: list[int] | None = None) -> LayoutEstimate:
    """Memory per GPU of a tp x pp layout, sized as the engine does at start-up (worker/model_runner.py):
    KV budget = (GPU memory - weights - overhead) x kv_cache_free_gpu_memory_fraction - profile activations.

    Args:
        hf_config: the model's transformers config (dense or MoE; ep does not change the bytes per rank).
        weight_dtype: bf16 | fp16 | fp32 | fp8 (fp8: every decoder Linear 1 byte + fp32 row scales;
            embeddings, LM head, norms and routers stay 2 bytes).
        kv_cache_dtype: auto (the activation dtype) | fp8 | fp8_e4m3 | fp8_e5m2 (1 byte) | bf16 | fp16.
        gpu_memory_bytes: total memory of one GPU, bytes.
        block_size: tokens per KV block (capacity is whole blocks); None: the engine's GPU default
            (config.default_block_size: 64 with an FP8 cache, else 16).
    Raises:
        ValueError: a tp that does not split the heads, a pp beyond the layers, a bad dtype; each names the rule.
    Example (Llama-3-70B, tp 4, bf16): KV per token per GPU = 2 (K and V) x 80 layers x 8/4 kv heads x 128 x
    2 bytes = 80 KiB; weights per GPU = 70.55e9 params x 2 bytes / 4 = 35.3 GB (norms replicated aside).
    """
    c = hf_config
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight dtype must be one of {sorted(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    check_tp_size(tp, c)
    wbytes, abytes = WEIGHT_DTYPES[weight_dtype], (4 if weight_dtype in ("fp32", "float32") else 2)
    kv_elem = kv_bytes_per_element(kv_cache_dtype, abytes)
    if block_size is None:
        block_size = default_block_size(kv_cache_dtype, "cuda")
    max_seq_len = max_seq_len or _model_max_len(c)  # serve's default: the context, capped at a sliding window
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    vocab_rank = -(-c.vocab_size // tp)  # vocabulary padded to a multiple of tp
    split = pp_layer_split(c.num_hidden_layers, pp, pp_partition)
    nccl = NCCL_BYTES.get(tp, NCCL_BYTES_LARGE)
    activations = _activation_bytes(c, tp, min(max_num_batched_tokens, max_seq_len), max_num_seqs, abytes)
    stages, start = [], 0
    for s, n in enumerate(split):
        weights = sum(_layer_weight_bytes(c, i, tp, wbytes) for i in range(start, start + n))
        unread = 0
        if s == 0:
            weights += vocab_rank * c.hidden_size * abytes  # embedding, first stage only
            tied_head = pp == 1 and getattr(c, "tie_word_embeddings", False)  # the table is also the LM head
            unread = 0 if tied_head else vocab_rank * c.hidden_size * abytes
        if s == pp - 1:
            weights += c.hidden_size * abytes  # final norm
            if s > 0 or not getattr(c, "tie_word_embeddings", False):
                weights += vocab_rank * c.hidden_size * abytes  # LM head (a copy of a tied embedding if pp > 1)
        start += n
        kv_per_token = 2 * n * max(1, kv_heads // tp) * head_dim * kv_elem
        overhead = CONTEXT_BYTES + nccl + (PP_BUFFER_BYTES if pp > 1 else 0)
        budget = int((gpu_memory_bytes - weights - overhead) * kv_cache_free_gpu_memory_fraction - activations)
        blocks = max(budget, 0) // (kv_per_token * block_size)
        flops = sum(_layer_flops(c, i, tp) for i in range(start - n, start))
        if s == pp - 1:
            flops += 2 * vocab_rank * c.hidden_size  # LM head
        stages.append(StageEstimate(s, n, weights, kv_per_token, activations, overhead, budget,
                                    max(blocks - 1, 0) * block_size, weights - unread, flops))
    return LayoutEstimate(tp, pp, stages, gpu_memory_bytes, max_seq_len, weight_dtype)


def decode_tokens_per_s(est: LayoutEstimate, c, spec: GPUSpec, topology: str, batch: int, context_len: int,
                        cross_node_pp: bool = False) -> float:
    """Output tokens/s of one replica at `batch` sequences of average context `context_len` [ours: a roofline].

    A decode step reads each stage's weights once (all but the input embedding, of which a token reads one row) and
    every sequence's KV; with pp micro-batches in flight the stages overlap, so one round of `batch` tokens costs
    max(pp x (weights read), the GEMMs' FLOPs) + batch x (KV read): reads at HBM_EFFICIENCY of the HBM peak, the
    Linears' 2 x multiply-adds of `batch` tokens at MATMUL_EFFICIENCY of the dense tensor-core peak of the weights'
    dtype (the GEMMs are bound by one or the other; attention reads the KV after them). TP adds two all-reduces per
    layer of batch x hidden x 2 bytes (ring: 2(tp-1)/tp of the bytes over the link), PP one send per stage
    boundary. No prefill: a workload's prompts take more (1000 x 128/128: the 8B figure below is ~2.5x the measured
    end-to-end 28,500-29,900 tok/s, where this formula without its compute term gave 164,000).
    """
    bw = spec.hbm_bytes_per_s * HBM_EFFICIENCY
    w = max(s.decode_weights for s in est.stages)
    kv = max(s.kv_bytes_per_token for s in est.stages)
    flops = max(s.decode_flops_per_token for s in est.stages)
    peak = spec.fp8_flops if est.weight_dtype == "fp8" and spec.fp8_flops else spec.bf16_flops
    tp, pp = est.tensor_parallel_size, est.pipeline_parallel_size
    t = max(pp * w / bw, batch * flops / (peak * MATMUL_EFFICIENCY)) + batch * context_len * kv / bw
    msg = batch * c.hidden_size * 2
    if tp > 1:
        link = spec.nvlink_bytes_per_s if topology == "nvlink" else PCIE_BYTES_PER_S
        per = ALL_REDUCE_LATENCY_S[topology] + 2 * (tp - 1) / tp * msg / link
        t += 2 * c.num_hidden_layers * per
    if pp > 1:
        link = INTER_NODE_BYTES_PER_S if cross_node_pp else (
            spec.nvlink_bytes_per_s if topology == "nvlink" else PCIE_BYTES_PER_S)
        t += (pp - 1) * (P2P_LATENCY_S + 2 * msg / link)
    return batch / t


@dataclass
class Candidate:
    """One layout of the plan; the field names mirror AIConfigurator's `generate` output (tp, pp, replicas,
    gpus_used) under vLLM's argument names."""

    tensor_parallel_size: int
    pipeline_parallel_size: int
    replicas: int
    gpus_used: int
    fits: bool
    reason: str
    weights_bytes_per_gpu: int = 0
    kv_bytes_per_token_per_gpu: int = 0
    kv_budget_bytes_per_gpu: int = 0
    kv_tokens: int = 0
    max_concurrency: float = 0.0
    decode_tok_s_batch1: float = 0.0  # one request's output tokens/s
    throughput_tok_s: float = 0.0  # all replicas, at the concurrency the KV cache allows (<= max_num_seqs)
    stages: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Plan:
    model: str
    num_gpus: int
    gpus_per_node: int
    nodes: int
    gpu: str
    gpu_memory_bytes: int
    topology: str
    weight_dtype: str
    kv_cache_dtype: str
    max_seq_len: int
    candidates: list[Candidate]
    max_batch_size: int = 256  # the max_num_seqs (sequences a step) the throughput column assumed
    num_experts: int = 0  # routed experts of a MoE model (0: dense)
    context_len: int = 0  # the average context (tokens) the throughput columns assumed
    gpu_named: bool = True  # False: no GPU name was given, `gpu` is the default assumed for gpu_memory_bytes
    gpu_fp8: bool = True  # the GPUs have FP8 tensor cores: --dtype fp8 is a fix the plan may offer

    @property
    def recommended(self) -> Candidate | None:
        return self.candidates[0] if self.candidates and self.candidates[0].fits else None

    def to_dict(self) -> dict:
        best = self.recommended
        d = {k: v for k, v in asdict(self).items() if k != "candidates"}
        d.update(tensor_parallel_size=best.tensor_parallel_size if best else None,
                 pipeline_parallel_size=best.pipeline_parallel_size if best else None,
                 replicas=best.replicas if best else None, gpus_used=best.gpus_used if best else None,
                 candidates=[cand.to_dict() for cand in self.candidates])
        return d


def plan(hf_config, *, model: str = "", gpus_per_node: int, nodes: int = 1, gpu_memory_bytes: int = 80 * GiB,
         gpu_name: str | None = None, topology: str = "nvlink", weight_dtype: str = "bf16",
         kv_cache_dtype: str = "auto", max_seq_len: int | None = None, input_len: int | None = None,
         output_len: int | None = None, max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
         kv_cache_free_gpu_memory_fraction: float = 0.9, min_kv_share: float = MIN_KV_SHARE,
         pipeline_parallel_size: int | None = None, block_size: int | None = None,
         gpu_fp8: bool | None = None) -> Plan:
    """Every tp x pp x replicas layout of nodes x gpus_per_node GPUs, those that fit first.

    Rules (the guide's best practices, TensorRT-LLM's and vLLM's sharding advice): tp stays inside a node;
    a layout fits when its weights, overhead and activations fit and the KV cache gets at least `min_kv_share`
    of each GPU and one max_seq_len request; among those that fit, the fewest GPUs per replica (whose replica
    count uses every GPU) wins, then more tp and less pp with NVLink, more pp and less tp over PCIe.
    `pipeline_parallel_size` fixes pp (for tensor_parallel_size="auto"); `block_size`: tokens per KV block (None: the
    engine's GPU default, see estimate); `gpu_fp8`: whether the GPUs have FP8 tensor cores (None: as GPU_SPECS says
    of `gpu_name`).

    Raises:
        ValueError: a bad topology or GPU count; weight_dtype fp8 on GPUs without FP8 tensor cores, as serve refuses.
    """
    if topology not in ("nvlink", "pcie"):
        raise ValueError(f"topology must be 'nvlink' or 'pcie', got {topology!r}")
    if gpus_per_node < 1 or nodes < 1:
        raise ValueError(f"need at least one GPU: gpus_per_node={gpus_per_node}, nodes={nodes}")
    c = hf_config
    total = gpus_per_node * nodes
    spec = gpu_spec(gpu_name, gpu_memory_bytes)
    gpu_fp8 = spec.fp8 if gpu_fp8 is None else gpu_fp8
    if weight_dtype == "fp8" and not gpu_fp8:  # serve's refusal (layers/quantization/formats.py check_fp8_device)
        raise ValueError(f"--dtype fp8 needs GPUs with FP8 tensor cores (compute capability >= 8.9: Ada, Hopper or "
                         f"later) and the {spec.name} has none: serve refuses it there; plan with --dtype bf16")
    max_seq_len = max_seq_len or _model_max_len(c)
    seq = (input_len or 0) + (output_len or 0) or max_seq_len
    context = (input_len or 0) + (output_len or 0) // 2 or max_seq_len // 2
    cands = []
    for tp in valid_tp_sizes(c):
        if tp > total:
            break
        # pp beyond the layers is no layout: the bound keeps a huge GPU count from looping for minutes
        pps = [pipeline_parallel_size] if pipeline_parallel_size else range(1, min(total // tp,
                                                                                   c.num_hidden_layers) + 1)
        for pp in pps:
            size = tp * pp
            if size > total or pp > c.num_hidden_layers:
                continue
            replicas = total // size
            cand = Candidate(tp, pp, replicas, replicas * size, False, "")
            if tp > gpus_per_node:
                cand.reason = f"tp {tp} would cross nodes of {gpus_per_node} GPUs: keep tp inside a node"
                cands.append(cand)
                continue
            est = estimate(c, tp, pp, weight_dtype=weight_dtype, kv_cache_dtype=kv_cache_dtype,
                           max_seq_len=max_seq_len, max_num_batched_tokens=max_num_batched_tokens,
                           max_num_seqs=max_num_seqs, gpu_memory_bytes=spec.memory_bytes,
                           kv_cache_free_gpu_memory_fraction=kv_cache_free_gpu_memory_fraction, block_size=block_size)
            _fill(cand, est, c, spec, topology, seq, context, max_num_seqs, size > gpus_per_node, min_kv_share)
            cands.append(cand)

    def rank(cand: Candidate):
        size = cand.tensor_parallel_size * cand.pipeline_parallel_size
        prefer = cand.pipeline_parallel_size if topology == "nvlink" else -cand.pipeline_parallel_size
        return (not cand.fits, total % size != 0, size, prefer)

    cands.sort(key=rank)
    return Plan(model, total, gpus_per_node, nodes, spec.name, spec.memory_bytes, topology, weight_dtype,
                kv_cache_dtype, max_seq_len, cands, max_batch_size=max_num_seqs, context_len=context,
                num_experts=num_experts(c) or 0, gpu_named=gpu_name is not None, gpu_fp8=gpu_fp8)


def _fill(cand: Candidate, est: LayoutEstimate, c, spec: GPUSpec, topology: str, seq: int, context: int,
          max_num_seqs: int, cross_node: bool, min_kv_share: float) -> None:
    worst = max(est.stages, key=lambda s: s.weights)
    cand.weights_bytes_per_gpu = worst.weights
    cand.kv_bytes_per_token_per_gpu = max(s.kv_bytes_per_token for s in est.stages)
    cand.kv_budget_bytes_per_gpu = min(s.kv_budget for s in est.stages)
    cand.kv_tokens = est.kv_tokens
    cand.max_concurrency = round(est.max_concurrency, 1)  # as the verdict prints it
    cand.stages = [asdict(s) for s in est.stages]
    gib = est.gpu_memory_bytes / GiB
    if worst.weights + worst.overhead + worst.activations >= est.gpu_memory_bytes:
        cand.reason = (f"weights {worst.weights / GiB:.1f} GiB + overhead and activations do not fit in "
                       f"{gib:.0f} GiB per GPU")
        return
    if est.kv_tokens < est.max_seq_len:
        cand.reason = f"KV cache holds {est.kv_tokens} tokens, less than one max_seq_len ({est.max_seq_len}) request"
        return
    batch = max(1, min(max_num_seqs, est.kv_tokens // seq))
    cand.decode_tok_s_batch1 = round(decode_tokens_per_s(est, c, spec, topology, 1, context, cross_node), 1)
    cand.throughput_tok_s = round(cand.replicas * decode_tokens_per_s(est, c, spec, topology, batch, context,
                                                                       cross_node), 1)
    if est.kv_share < min_kv_share:
        cand.reason = (f"too little KV cache: the weights load, but it gets {est.kv_share:.0%} of each GPU "
                       f"(< {min_kv_share:.0%}): "
                       f"{est.max_concurrency:.1f} requests of {est.max_seq_len} tokens")
        return
    cand.fits = True
    cand.reason = (f"fits: {worst.weights / GiB:.1f} GiB weights per GPU, KV cache {est.kv_share:.0%} of each GPU "
                   f"= {est.kv_tokens} tokens ({est.max_concurrency:.1f} requests of {est.max_seq_len} tokens)")


def auto_tensor_parallel_size(hf_config, num_gpus: int, gpu_memory_bytes: int, *, pipeline_parallel_size: int = 1,
                              weight_dtype: str = "bf16", kv_cache_dtype: str = "auto", max_seq_len: int | None = None,
                              kv_cache_free_gpu_memory_fraction: float = 0.9, block_size: int | None = None) -> int:
    """`tensor_parallel_size="auto"`: the smallest tp the planner says fits with the given pp on these GPUs.

    Raises:
        ValueError: no tp fits; the message names the largest layout tried and the fixes.
    """
    p = plan(hf_config, gpus_per_node=num_gpus, gpu_memory_bytes=gpu_memory_bytes, weight_dtype=weight_dtype,
             kv_cache_dtype=kv_cache_dtype, max_seq_len=max_seq_len, pipeline_parallel_size=pipeline_parallel_size,
             kv_cache_free_gpu_memory_fraction=kv_cache_free_gpu_memory_fraction, block_size=block_size)
    fitting = [cand for cand in p.candidates if cand.fits]
    if not fitting:  # nothing leaves the KV share: take the smallest tp whose KV holds one request
        fitting = sorted((cand for cand in p.candidates if cand.kv_tokens >= p.max_seq_len),
                         key=lambda cand: cand.tensor_parallel_size)
    if not fitting:
        raise ValueError(f"tensor_parallel_size='auto': no tp up to {num_gpus} GPUs of "
                         f"{gpu_memory_bytes / GiB:.0f} GiB fits this model with pp_size={pipeline_parallel_size}: "
                         "use dtype='fp8', lower max_seq_len, raise pp_size, or add GPUs")
    return min(cand.tensor_parallel_size for cand in fitting)


def resolve_auto_tp(model_config, pipeline_parallel_size: int, device: str, kv_cache_dtype: str = "auto",
                    kv_cache_free_gpu_memory_fraction: float = 0.9, block_size: int | None = None) -> int:
    """`LLM(..., tensor_parallel_size="auto")`: 1 on CPU; on GPUs the planner's smallest tp for the visible GPUs
    (their count and memory from NVML, else torch), with `pipeline_parallel_size` stages."""
    import logging

    if device != "cuda":
        return 1
    from shardllm.metrics.gpu_monitor import inspect_host

    host = inspect_host()
    if host.get("available") and host["gpus"]:
        count, memory = len(host["gpus"]), min(g["memory_total"] or 0 for g in host["gpus"])
    else:
        import torch

        if not torch.cuda.is_available():  # e.g. a GPU-less driver of Ray workers
            raise ValueError(f"tensor_parallel_size='auto' sizes tp from this host's GPUs, and it sees none "
                             f"({host.get('reason') or 'NVML lists none'}): give tensor_parallel_size=N "
                             "(`shardllm plan MODEL --gpus G` suggests one)")
        count, memory = torch.cuda.device_count(), torch.cuda.get_device_properties(0).total_memory
    weight = weight_dtype_of(model_config)
    tp = auto_tensor_parallel_size(model_config.hf_config, count, memory, pipeline_parallel_size=pipeline_parallel_size,
                                   weight_dtype=weight, kv_cache_dtype=kv_cache_dtype,
                                   max_seq_len=model_config.max_model_len,
                                   kv_cache_free_gpu_memory_fraction=kv_cache_free_gpu_memory_fraction,
                                   block_size=block_size)
    logging.getLogger(__name__).info("tensor_parallel_size='auto': tp %d on %d GPUs of %.0f GiB (pp %d, weights %s)",
                                     tp, count, memory / GiB, pipeline_parallel_size, weight)
    return tp
