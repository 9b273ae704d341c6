"""Research probe for issue 13's batch-1 floor: what would a persistent whole-step decode kernel reach? Not part
of the engine.

The engine's batch-1 FP8 step is ~270 launches, 127 of them GEMVs that reach 0.80 of the copy bandwidth together
(eighteenth session's profile); prefetch before the PDL wait, inside Triton or in CUDA, did not lift them
(fourteenth and nineteenth sessions). The design left is one persistent kernel a step whose weight stream never
stops: benchmarks/csrc/weight_stream_chain.cu. This probe times its core, a chain of Llama-3-8B's FP8 GEMVs
(qkv, a barrier-only attention stage, o, gate_up, SiLU-and-mul + down, per layer) with a grid-wide barrier before
every stage, against the same chain through the engine's Triton GEMVs in one CUDA graph, and against the copy
bandwidth (bench/throughput.py's roofline basis). If the chain runs at >= ~0.92 of the copy bandwidth with its
barriers, a megakernel can reach the 0.85 floor with its other stages (norms, rotary, attention: ~0.5 MB a layer);
if not, the floor needs more than launch removal. Measured in the twentieth session (docs/benchmarks.md): the best
chain 0.64-0.69 against the engine's 0.73, the bulk-copy stream alone at most 0.81; the design was not built.

Compiled at run time by NVRTC (no nvcc), launched through the driver API in torch's current stream.

    python benchmarks/megakernel_probe.py                    # 32 layers, correctness, then the timing rows
    python benchmarks/megakernel_probe.py --check_only       # compile for sm_90a, print registers (CPU: no GPU)

One JSON line a row: us a chain, GB read, TB/s, fraction of the copy bandwidth.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import glob
import json
import os
import sys

import torch

SRC = os.path.join(os.path.dirname(__file__), "csrc", "weight_stream_chain.cu")
KERNEL = "shardllm_weight_stream_chain"
LAYER = [("qkv", 6144, 4096, 0), ("attn", 0, 0, 0), ("o", 4096, 4096, 0), ("gate_up", 28672, 4096, 0),
         ("down", 4096, 14336, 1)]  # (name, N, K, silu input); N 0: a barrier-only stage


# --- NVRTC and the driver API (as the nineteenth session's layers/cuda_gemv.py, commit 86ce489) -------------------

def _nvrtc() -> ctypes.CDLL:
    major = (torch.version.cuda or "12").split(".")[0]
    for root in sys.path:
        for path in sorted(glob.glob(os.path.join(root, "nvidia/*/lib/libnvrtc-builtins.so*"))):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                pass
    for name in [f"libnvrtc.so.{major}", "libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]:
        try:
            return ctypes.CDLL(name)
        except OSError:
            pass
    for root in sys.path:
        for path in sorted(glob.glob(os.path.join(root, "nvidia/*/lib/libnvrtc.so*"))):
            try:
                return ctypes.CDLL(path)
            except OSError:
                pass
    raise RuntimeError("NVRTC not found")


def compile_cubin(arch: str, defines: dict[str, int]) -> tuple[bytes, str]:
    lib = _nvrtc()
    src = open(SRC, "rb").read()
    opts = [f"--gpu-architecture={arch}", "-default-device", "-std=c++17", "--ptxas-options=-v"]
    opts += [f"-D{k}={v}" for k, v in sorted(defines.items())]
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"weight_stream_chain.cu", 0, None, None) == 0
    arr = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
    res = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, buf)
    text = buf.value.decode(errors="replace")
    if res != 0:
        raise RuntimeError(f"NVRTC: {defines}\n{text}")
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
    cubin = ctypes.create_string_buffer(size.value)
    assert lib.nvrtcGetCUBIN(prog, cubin) == 0
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return cubin.raw, text


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.c_void_p), ("numAttrs", ctypes.c_uint)]


def _cuda() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                     ctypes.c_void_p]
    return lib


def _drv(res: int, what: str) -> None:
    if res != 0:
        raise RuntimeError(f"{what}: CUDA driver error {res}")


class Chain:
    """One compiled configuration of the kernel: STAGES slots of SLOT bytes, CWARPS consumer warps."""

    def __init__(self, stages: int, slot: int, cwarps: int, pieces: int = 1, l2ahead: int = 0, kmax: int = 14336):
        self.defines = {"STAGES": stages, "SLOT": slot, "CWARPS": cwarps, "PIECES": pieces, "L2AHEAD": l2ahead,
                        "KMAX": kmax}
        self.threads = (cwarps + 1) * 32
        # ring, mbarriers, part (YMAX x PMAX), ssc (YMAX), wmax (padded to 4), xs
        self.smem = stages * slot + 16 * stages + 4 * (256 * 4 + 256) + 4 * (-(-cwarps // 4) * 4) + 2 * kmax
        major, minor = torch.cuda.get_device_capability()
        cubin, self.log = compile_cubin(f"sm_{major}{minor}a", self.defines)
        self.lib = _cuda()
        torch.cuda.current_stream()  # the primary context is current
        module, fn = ctypes.c_void_p(), ctypes.c_void_p()
        _drv(self.lib.cuModuleLoadData(ctypes.byref(module), ctypes.c_char_p(cubin)), "cuModuleLoadData")
        _drv(self.lib.cuModuleGetFunction(ctypes.byref(fn), module, KERNEL.encode()), "cuModuleGetFunction")
        _drv(self.lib.cuFuncSetAttribute(fn, 8, self.smem), "cuFuncSetAttribute")  # MAX_DYNAMIC_SHARED_SIZE_BYTES
        self.fn = fn

    def launch(self, desc: torch.Tensor, counters: torch.Tensor, grid: int, wait: int) -> None:
        cfg = _LaunchConfig(grid, 1, 1, self.threads, 1, 1, self.smem, torch.cuda.current_stream().cuda_stream,
                            None, 0)
        args = [ctypes.c_void_p(desc.data_ptr()), ctypes.c_int(desc.shape[0]), ctypes.c_void_p(counters.data_ptr()),
                ctypes.c_int(int(wait))]
        ptrs = (ctypes.c_void_p * len(args))(*(ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args))
        _drv(self.lib.cuLaunchKernelEx(ctypes.byref(cfg), self.fn, ptrs, None), "cuLaunchKernelEx")


def build_chain(layers: int, device: torch.device, seed: int = 0) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
    """Stages of `layers` Llama-3-8B layers: dicts of w (N, K) e4m3, scale (N,) fp32, x / y bf16 views; the
    (G, 8) int64 descriptor table; the (K,) bf16 chain input. Each GEMV's input is the previous GEMV's output
    (its first K values; down reads gate_up's 2 x 14336 as gate | up)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x0 = torch.randn(4096, generator=g, device=device).to(torch.bfloat16)
    stages, rows, prev_y = [], [], x0
    for _ in range(layers):
        for name, n, k, silu in LAYER:
            if n == 0:
                stages.append(dict(name=name, kind=1))
                rows.append([0, 0, 0, 0, 0, 0, 0, 1])
                continue
            w = torch.randn(n, k, generator=g, device=device).clamp_(-8, 8).to(torch.float8_e4m3fn)
            scale = torch.full((n,), (2.0 if silu else 1.0) / k ** 0.5, device=device)
            x = prev_y[: 2 * k if silu else k]
            y = torch.empty(n, dtype=torch.bfloat16, device=device)
            stages.append(dict(name=name, kind=0, w=w, scale=scale, x=x, y=y, silu=silu))
            rows.append([w.data_ptr(), scale.data_ptr(), x.data_ptr(), y.data_ptr(), n, k, silu, 0])
            prev_y = y
    return stages, torch.tensor(rows, dtype=torch.int64, device=device), x0


def reference_errors(stages: list[dict]) -> list[float]:
    """Each GEMV's largest error against the fp32 reference computed from the input the kernel read, relative to
    the reference's largest value."""
    errs = []
    for s in stages:
        if s["kind"]:
            continue
        x = s["x"].float()
        if s["silu"]:
            k = x.numel() // 2
            gate, up = x[:k], x[k:]
            x = (torch.nn.functional.silu(gate).to(torch.bfloat16).float() * up).to(torch.bfloat16).float()
        ref = (s["w"].float() @ x) * s["scale"]
        errs.append(float((s["y"].float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
    return errs


def time_us(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        fn()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1e3 / reps


def engine_chain(stages: list[dict]):
    """The same chain through the engine's Triton GEMVs (its FP8 table's configs; down as the fused SiLU GEMV),
    captured in one CUDA graph (PDL as the engine's default)."""
    from shardllm.layers.gemv import FP8_GEMV_TABLE, gemv, nearest_config, table_config
    from shardllm.layers.gemv_silu import FUSED_SILU_TABLES

    calls = []
    for s in stages:
        if s["kind"]:
            continue
        n, k = s["w"].shape
        table = FUSED_SILU_TABLES["fp8"] if s["silu"] else FP8_GEMV_TABLE
        cfg = table_config(table, n, k, 1) or nearest_config(table, n, k, 1)
        calls.append((s, cfg))

    def run():
        for s, cfg in calls:
            s["y"].view(1, -1).copy_(gemv(s["x"].view(1, -1), s["w"], s["scale"], cfg, silu_input=bool(s["silu"])))

    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--configs", default="12x16384x16x4x0,12x16384x16x4x12,12x16384x16x4x24,12x16384x24x4x0,"
                    "12x16384x24x4x16,5x32768x24x4x8",
                    help="STAGESxSLOTxCWARPSxPIECES[xL2AHEAD], comma-separated")
    ap.add_argument("--check_only", action="store_true", help="compile for sm_90a and print ptxas' report")
    a = ap.parse_args()
    configs = [tuple(int(v) for v in c.split("x")) for c in a.configs.split(",")]
    if any(c[1] < max(k for _, _, k, _ in LAYER) for c in configs):
        ap.error("SLOT must hold a whole row: >= 14336 (down's K)")
    if a.check_only:
        for c in configs:
            st, slot, cw, pc, ahead = (*c, 0)[:5]
            _, log = compile_cubin("sm_90a", {"STAGES": st, "SLOT": slot, "CWARPS": cw, "PIECES": pc, "L2AHEAD": ahead,
                                              "KMAX": 14336})
            print(json.dumps({"config": "x".join(map(str, c)), "ptxas": " ".join(log.split())[-200:]}))
        return
    dev = torch.device("cuda")
    from shardllm.bench.throughput import measure_copy_bandwidth

    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    stages, desc, _ = build_chain(a.layers, dev)
    nbytes = sum(s["w"].numel() + s["scale"].numel() * 4 for s in stages if not s["kind"])
    counters = torch.zeros(desc.shape[0], dtype=torch.int32, device=dev)
    bw = measure_copy_bandwidth(dev, 2 << 30)
    print(json.dumps({"row": "copy", "tb_s": round(bw / 1e12, 3), "chain_gb": round(nbytes / 1e9, 3),
                      "stages": desc.shape[0], "sms": sms}), flush=True)

    def row(name: str, us: float, **extra) -> None:
        print(json.dumps({"row": name, "us": round(us, 1), "tb_s": round(nbytes / us / 1e6, 3),
                          "of_copy": round(nbytes / us / 1e6 / (bw / 1e12), 3), **extra}), flush=True)

    big = torch.empty(2 << 30, dtype=torch.uint8, device=dev).view(torch.int32)  # the read-only bound
    big.random_()
    t = time_us(functools.partial(torch.amax, big), a.reps)
    print(json.dumps({"row": "read (torch.amax, 2 GiB)", "us": round(t, 1), "tb_s": round((2 << 30) / t / 1e6, 3),
                      "of_copy": round((2 << 30) / t / 1e6 / (bw / 1e12), 3)}), flush=True)
    del big
    replay = engine_chain(stages)
    row("engine_triton_graph", time_us(replay, a.reps))
    engine_err = max(reference_errors(stages))
    for c in configs:
        st, slot, cw, pc, ahead = (*c, 0, 0)[:5]
        name = "x".join(map(str, c))
        try:
            chain = Chain(st, slot, cw, pc, ahead)
        except Exception as e:  # a compile or load failure: the row says so
            print(json.dumps({"row": f"chain {name}", "error": str(e)[:400]}), flush=True)
            continue
        regs = " ".join(chain.log.split())[-160:]
        for s in stages:
            if not s["kind"]:
                s["y"].zero_()
        counters.zero_()
        chain.launch(desc, counters, sms, 1)
        torch.cuda.synchronize()
        errs = reference_errors(stages)
        for wait in (1, 0, 2):
            def go(wait=wait, chain=chain):
                counters.zero_()
                chain.launch(desc, counters, sms, wait)
            row(f"chain {name} wait={wait}", time_us(go, a.reps), max_rel_err=round(max(errs), 5),
                engine_err=round(engine_err, 5), smem=chain.smem, ptxas=regs)
        replay()  # the engine again, to see the card's drift within the call
        torch.cuda.synchronize()
    row("engine_triton_graph (again)", time_us(replay, a.reps))


if __name__ == "__main__":
    main()
