"""The first call at a token count never seen before in the process: what each new image costs.

Every image brings new token counts to the shape and texture stages. Whatever a library builds per
shape (cuDNN attention plans: keyed on the exact batch, sequence lengths and strides; Triton kernels
specialise integer arguments on divisibility by 16) is built again at the first call of each count.
The flows section measures sampling at the reference counts after they were seen; this one measures the
per-image cost a pipeline pays, in child processes, one per variant (TORCH_CUDNN_SDPA_AVOID_RECOMPILE
is read once per process):

  default        the backend as shipped (V read in place from the QKV rows)
  v_copy         the prologue writes a contiguous V (cuDNN sees q, k, v all BSHD-contiguous)
  ragged         TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 + v_copy: cuDNN's ragged path, whose plan key
                 rounds the sequence lengths up to powers of two (plans reused across images)

Per variant, shape_flow_1024 with random full-size weights:
  1. cuDNN SDPA alone: first-call and steady ms at new token counts, batch 1 and 2;
  2. the backend: after warming at the reference counts, the first single and pair call at new counts,
     their steady ms, and the relative error against the eager model;
  3. the shape stage's 12-step sampling with a fresh backend at a new token count and at a count
     already seen (median of 2 each).

    pixal3d-rt bench --section first_call [--out DIR]        (writes DIR/first_call_<gpu>.json)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .common import cuda_time, environment, gpu_slug, set_output, write_result

MODULE = "pixal3d_rt.bench_sections.first_call"  # each variant runs it again in a child process

VARIANTS = {"default": ({}, False), "v_copy": ({}, True), "ragged": ({"TORCH_CUDNN_SDPA_AVOID_RECOMPILE": "1"}, True)}
WARM_NS = [4377, 17489]  # counts the process has seen (the reference object's)
NEW_NS = [4421, 17533]  # first calls at these
SAMPLE_NEW_NS = [17501, 17547]  # one fresh count per cold sampling run
SAMPLE_SEEN_N = 17489


def child(variant: str, schema_dir: Path | None, seed: int) -> dict:
    import torch
    import torch.nn.functional as F

    from . import flows as bf
    from pixal3d_rt import config as C
    from pixal3d_rt.runtime import cuda_backend
    from pixal3d_rt.sampler import FlowEulerGuidanceIntervalSampler

    torch.set_grad_enabled(False)
    torch.backends.cuda.matmul.allow_tf32 = False
    v_copy = VARIANTS[variant][1]
    out = {"variant": variant, "v_copy": v_copy, "env": VARIANTS[variant][0]}
    cfg, model = bf.build("shape_flow_1024", schema_dir or bf.default_schema_dir(), seed)
    H = cfg["args"]["num_heads"]
    D = cfg["args"]["model_channels"] // H

    # 1. SDPA alone, q/k/v contiguous [B, N, H, D] viewed as [B, H, N, D] (what the v_copy path hands cuDNN)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa_case(n, b):
        g = torch.Generator(device="cuda").manual_seed(n + b)
        q, k, v = (torch.randn(b, n, H, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2) for _ in range(3))

        def fn():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v)
        return fn, (q, k, v)

    sd = []
    fn, _ = sdpa_case(4096, 1)
    fn()  # library initialisation outside the numbers
    torch.cuda.synchronize()
    for n in WARM_NS + NEW_NS:
        for b in (1, 2):
            fn, (q, k, v) = sdpa_case(n, b)
            _, first = bf.timed_call(fn)
            steady = cuda_time(fn, warmup=1, reps=5)["median_ms"]
            with sdpa_kernel([SDPBackend.MATH]):
                ref = F.scaled_dot_product_attention(q[:, :, :512].float(), k.float(), v.float())
            err = bf.rel_err(fn()[:, :, :512], ref)
            sd.append({"tokens": n, "batch": b, "first_ms": first, "steady_ms": steady, "rel_err_rows512": err})
            print(f"[{variant}] sdpa N={n} B={b}: first {first:.1f} ms steady {steady:.2f} ms err {err:.1e}", flush=True)
    out["sdpa"] = sd

    # 2. the backend: warm at the reference counts, then first calls at new counts
    be = cuda_backend.wrap_flow(model, {"name": "shape_hr", "v_copy": v_copy})
    fw = []
    for n in WARM_NS + NEW_NS:
        case = bf.make_case(cfg, n, seed + n)
        x, t, cond, neg, kw = case["x"], case["t"], case["cond"], case["neg"], case["kwargs"]
        single, first_single = bf.timed_call(lambda: be(x, t, cond, **kw))
        pair, first_pair = bf.timed_call(lambda: be.cfg_pair(x, t, cond, neg, **kw))
        ts = cuda_time(lambda: be(x, t, cond, **kw), warmup=1, reps=3)["median_ms"]
        tp = cuda_time(lambda: be.cfg_pair(x, t, cond, neg, **kw), warmup=1, reps=3)["median_ms"]
        eager = bf.feats(model(x, t, cond, **kw))
        eager_neg = bf.feats(model(x, t, neg, **kw))
        err = max(bf.rel_err(bf.feats(single), eager), bf.rel_err(bf.feats(pair[0]), eager),
                  bf.rel_err(bf.feats(pair[1]), eager_neg))
        row = {"tokens": n, "first_single_ms": first_single,
               "first_pair_ms": first_pair, "single_ms": ts, "pair_ms": tp,
               "first_call_overhead_ms": first_single + first_pair - ts - tp, "rel_err_vs_eager": err,
               "finite": bool(torch.isfinite(bf.feats(pair[0])).all() and torch.isfinite(bf.feats(pair[1])).all())}
        row["phase"] = "warm-up (first counts of the process)" if n in WARM_NS else "new count"
        fw.append(row)
        print(f"[{variant}] backend N={n}: first single {first_single:.1f} / pair {first_pair:.1f} ms, "
              f"steady {ts:.1f} / {tp:.1f} ms, err {err:.1e}", flush=True)
    out["forward"] = fw
    be = None

    # 3. shape-stage sampling, fresh backend each run: at new counts and at a count seen before
    sampler = FlowEulerGuidanceIntervalSampler(sigma_min=C.SIGMA_MIN)
    params = C.sampler_params("shape_slat")

    def cold_run(n):
        case = bf.make_case(cfg, n, seed + 100 + n)
        backend = cuda_backend.wrap_flow(model, {"name": "shape_hr", "v_copy": v_copy})
        res, ms = bf.timed_call(lambda: sampler.sample(backend, case["x"], case["cond"], case["neg"], **params))
        return ms / 1e3, bool(torch.isfinite(bf.feats(res)).all())

    cold_run(SAMPLE_SEEN_N)  # the seen count: first visit outside the numbers
    new = [cold_run(n) for n in SAMPLE_NEW_NS]
    seen = [cold_run(SAMPLE_SEEN_N) for _ in range(2)]
    out["sampling"] = {"stage": "shape_hr", "params": params, "new_counts": SAMPLE_NEW_NS,
                       "cold_new_count_runs_s": [a for a, _ in new], "cold_seen_count_runs_s": [a for a, _ in seen],
                       "cold_new_count_s": statistics.median(a for a, _ in new),
                       "cold_seen_count_s": statistics.median(a for a, _ in seen),
                       "finite": all(f for _, f in new + seen)}
    s = out["sampling"]
    print(f"[{variant}] sampling shape_hr: new count {s['cold_new_count_s']:.3f} s, seen {s['cold_seen_count_s']:.3f} s", flush=True)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="pixal3d-rt bench --section first_call", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schema-dir", type=Path, default=None)
    p.add_argument("--out", default="bench-out", help="folder of the result file")
    p.add_argument("--name", default=None, help="result file name (default first_call_<gpu>)")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        res = child(args.child, args.schema_dir, args.seed)
        args.child_out.write_text(json.dumps(res))
        return
    import tempfile

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("the first_call section needs a CUDA GPU")
    set_output(args.out)
    args.name = args.name or f"first_call_{gpu_slug()}"
    data = {"benchmark": "first_call", "environment": environment(), "args": {k: str(v) for k, v in vars(args).items()},
            "variants": {}, "errors": {}}
    for name in args.variants.split(","):
        env = {**os.environ, **VARIANTS[name][0]}
        with tempfile.TemporaryDirectory() as tmp:
            dst = Path(tmp) / "child.json"
            cmd = [sys.executable, "-m", MODULE, "--child", name, "--child-out", str(dst), "--seed", str(args.seed)]
            if args.schema_dir:
                cmd += ["--schema-dir", str(args.schema_dir)]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, env=env)
            if r.returncode == 0 and dst.exists():
                data["variants"][name] = json.loads(dst.read_text())
                data["variants"][name]["wall_s"] = time.perf_counter() - t0
            else:
                data["errors"][name] = f"child exited with {r.returncode}"
    write_result(args.name, data)
    print("variant   first-call overhead ms (new N: single+pair)      sampling shape_hr cold s (new / seen)")
    for name, v in data["variants"].items():
        over = ", ".join(f"{r['tokens']}: {r['first_call_overhead_ms']:.0f}" for r in v["forward"])
        s = v["sampling"]
        print(f"{name:9s} {over:48s} {s['cold_new_count_s']:.3f} / {s['cold_seen_count_s']:.3f}")
    for name, e in data["errors"].items():
        print(f"{name}: {e}")


if __name__ == "__main__":
    main()
