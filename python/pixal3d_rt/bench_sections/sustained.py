"""Per-call time of the 17,489-token attention and GEMMs when run for seconds, with the SM clock
and board power logged alongside (nvidia-smi every 100 ms): when the in-situ attention of a forward
is slower than the isolated one, is it because the GPU slows down under a sustained load, or for
another reason? (`pixal3d-rt bench --section sustained`)

Phases, each ~2 s of back-to-back calls, timed per call with CUDA events:
  attention   cuDNN SDPA, B=1, 17,489 tokens, 12 heads x 128 (the backend's layout)
  gemm        the MLP's fc1 (17,489 x 1536 -> 8192, bf16)
  mixed       attention, then fc1 and fc2, alternating (the forward's mix)
  forward     the backend's batch-1 forward of shape_flow_1024 (random full-size weights, graph replay)
  idle        1 s of nothing between phases (clock recovers?)

    pixal3d-rt bench --section sustained [--section-arg=--schema-dir=DIR] [--out DIR]   (DIR/sustained_<gpu>.json;
                                                   the forward phase runs with --schema-dir)
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .common import cuda_call_times, environment, gpu_slug, set_output, write_result

N, H, D, C = 17489, 12, 128, 1536


def per_call(fn, seconds: float) -> list[float]:
    """ms of each call over about `seconds` of back-to-back calls."""
    fn()
    torch.cuda.synchronize()
    one = cuda_call_times(fn, 1)[0]
    return cuda_call_times(fn, max(5, int(seconds * 1e3 / max(one, 1e-3))))


def summary(ms: list[float]) -> dict:
    k = max(1, len(ms) // 10)
    return {"calls": len(ms), "first_tenth_median_ms": statistics.median(ms[:k]),
            "last_tenth_median_ms": statistics.median(ms[-k:]), "median_ms": statistics.median(ms)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="pixal3d-rt bench --section sustained", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schema-dir", type=Path, default=None)
    p.add_argument("--out", default="bench-out", help="folder of the result file")
    p.add_argument("--name", default=None, help="result file name (default sustained_<gpu>)")
    p.add_argument("--seconds", type=float, default=2.0)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the sustained section needs a CUDA GPU")
    set_output(args.out)
    args.name = args.name or f"sustained_{gpu_slug()}"
    torch.set_grad_enabled(False)
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2) for _ in range(3))
    x = torch.randn(N, C, device="cuda", dtype=torch.bfloat16, generator=g)
    w1 = torch.randn(8192, C, device="cuda", dtype=torch.bfloat16, generator=g) / C ** 0.5
    w2 = torch.randn(C, 8192, device="cuda", dtype=torch.bfloat16, generator=g) / 8192 ** 0.5

    def attention():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v)

    def gemm():
        return F.linear(x, w1)

    def mixed():
        attention()
        F.linear(F.linear(x, w1), w2)

    phases = [("attention", attention), ("gemm", gemm), ("mixed", mixed)]
    if args.schema_dir is not None:
        from . import flows as bf
        from pixal3d_rt.runtime import cuda_backend

        cfg, model = bf.build("shape_flow_1024", args.schema_dir, 1)
        case = bf.make_case(cfg, N, 5)
        be = cuda_backend.wrap_flow(model, {"name": "shape_hr"})
        phases.append(("forward", lambda: be(case["x"], case["t"], case["cond"], **case["kwargs"])))
    log = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,clocks_event_reasons.active",
                            "--format=csv,noheader,nounits", "-lms", "100"], stdout=subprocess.PIPE, text=True)
    marks, res = [], {}
    try:
        for name, fn in phases:
            time.sleep(1.0)
            marks.append((name, time.time()))
            ms = per_call(fn, args.seconds)
            marks.append((name + "_end", time.time()))
            res[name] = summary(ms)
            res[name]["all_ms"] = ms[:: max(1, len(ms) // 200)]
            print(f"{name:10s} {res[name]['calls']:5d} calls: first tenth {res[name]['first_tenth_median_ms']:.3f} ms, "
                  f"last tenth {res[name]['last_tenth_median_ms']:.3f} ms", flush=True)
        time.sleep(0.5)
    finally:
        log.terminate()
        out, _ = log.communicate(timeout=10)
    samples = []
    for line in out.splitlines():
        parts = [s.strip() for s in line.split(",")]
        if len(parts) == 4:
            try:
                ts = time.mktime(time.strptime(parts[0].split(".")[0], "%Y/%m/%d %H:%M:%S")) + float("0." + parts[0].split(".")[1])
                samples.append({"t": ts, "sm_mhz": float(parts[1]), "power_w": float(parts[2]), "reasons": parts[3]})
            except (ValueError, IndexError):
                continue
    # clocks and power inside each phase (nvidia-smi timestamps are local time, like time.time() here)
    for (name, t0), (_, t1) in zip(marks[::2], marks[1::2]):
        inside = [s for s in samples if t0 <= s["t"] <= t1]
        if inside:
            res[name]["sm_mhz_median"] = statistics.median(s["sm_mhz"] for s in inside)
            res[name]["power_w_median"] = statistics.median(s["power_w"] for s in inside)
            res[name]["clock_event_reasons"] = sorted({s["reasons"] for s in inside})
    write_result(args.name, {"benchmark": "sustained", "environment": environment(), "tokens": N, "phases": res,
                             "nvidia_smi_samples": samples})
    print("phase       calls  first ms  last ms   SM MHz  power W  reasons")
    for name, r in res.items():
        print(f"{name:10s} {r['calls']:6d} {r['first_tenth_median_ms']:8.3f} {r['last_tenth_median_ms']:8.3f} "
              f"{r.get('sm_mhz_median', float('nan')):8.0f} {r.get('power_w_median', float('nan')):8.0f}  {r.get('clock_event_reasons')}")


if __name__ == "__main__":
    main()
