"""Eager baseline of the three flow-stage networks on a CUDA GPU (`pixal3d-rt bench --section eager_baseline`).

Every later speed-up is measured against this: the `models/` definitions at full size with random
weights, bf16 torso as upstream (block Linears bf16, norms fp32, RoPE fp32, SDPA attention), batch 1,
one forward at the stage's token count:

* SS flow         dense, 16^3 = 4,096 tokens
* shape flow 512  sparse, 4,377 tokens (a voxelised sphere shell on the 32^3 grid)
* shape flow 1024 sparse, 17,489 tokens (the same on the 64^3 grid)

It records ms per forward (CUDA events, warm, median of several), the forward's peak memory and the
weight memory, and achieved TFLOP/s (pixal3d.md §9.3 FLOP counts). With `--upstream DIR` (a folder
holding upstream's `pixal3d` package, which is never part of this repository) upstream's own modules
run in the same process on the same weights and inputs, so the comparison and the output difference
come from one run.

    pixal3d-rt bench --section eager_baseline [--upstream DIR] [--section-arg=--profile] [--section-arg=--diagnostics]
        [--out DIR]        (writes DIR/eager_baseline_<gpu>.json)
"""
from __future__ import annotations

import argparse
import gc
import math
from pathlib import Path

import torch
import torch.nn as nn

from pixal3d_rt.bench_upstream import Upstream
from pixal3d_rt.models.registry import build_model
from pixal3d_rt.models.sparse import SparseTensor

from .common import (cuda_time, default_schema_dir, environment, format_table, gb, gpu_slug, load_config, module_bytes,
                     peak_memory, rel_err, set_output, summarize_ms, write_result)

# pixal3d.md §9.3: linear GFLOP per token per forward, and self-attention FLOP = 184,320 * N^2
ATTN_FLOP_PER_N2 = 184_320
DEVICE = "cuda"  # module-level so a CPU smoke test can swap it
GLOBAL_COND_TOKENS = 5  # Pixal3D's global condition: 5 tokens of DINOv3 features

NETWORKS = [
    {"name": "ss_flow", "schema": "ss_flow_img_dit_1_3B_64_bf16", "tokens": 4096, "linear_gflop_per_token": 2.454, "reps": 15},
    {"name": "shape_flow_512", "schema": "slat_flow_img2shape_dit_1_3B_512_bf16", "tokens": 4377,
     "linear_gflop_per_token": 2.548, "reps": 15},
    {"name": "shape_flow_1024", "schema": "slat_flow_img2shape_dit_1_3B_1024_bf16", "tokens": 17489,
     "linear_gflop_per_token": 2.548, "reps": 10},
]


def shell_coords(resolution: int, n: int, device) -> torch.Tensor:
    """The n voxels of the `resolution`^3 grid nearest to a sphere surface, as `[n, 4]` int32
    (batch 0, x, y, z) in lexicographic order: a stand-in for a real object's surface voxels."""
    r = torch.arange(resolution, device=device)
    grid = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)  # lexicographic
    centre = (resolution - 1) / 2
    dist = ((grid.float() - centre).norm(dim=-1) - 0.4 * resolution).abs()
    keep = torch.sort(torch.argsort(dist, stable=True)[:n]).values
    coords = torch.cat([torch.zeros(n, 1, dtype=grid.dtype, device=device), grid[keep]], dim=1)
    return coords.int()


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> None:
    """Random full-size weights (never zeros): Linear weights N(0, 1/fan_in), biases N(0, 0.02^2),
    norm scales 1 + N(0, 0.02^2), the shared-adaLN `modulation` N(0, 1/C), as upstream's init."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def draw(p: torch.Tensor, std: float, mean: float = 0.0) -> None:
        p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32) * std + mean)

    done = set()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            draw(m.weight, 1.0 / math.sqrt(m.in_features))
            if m.bias is not None:
                draw(m.bias, 0.02)
            done.update({id(m.weight), id(m.bias)})
    for name, p in model.named_parameters():
        if id(p) in done:
            continue
        if name.endswith("modulation"):
            draw(p, 1.0 / math.sqrt(p.numel() // 6))
        elif name.endswith("bias"):
            draw(p, 0.02)
        else:  # LayerNorm weight, QK-RMSNorm gamma
            draw(p, 0.02, mean=1.0)


def make_inputs(cfg: dict, n_tokens: int, seed: int) -> dict:
    """Random inputs of one forward (batch 1, t = 500), shared by ours and upstream's modules."""
    a = cfg["args"]
    g = torch.Generator(device=DEVICE).manual_seed(seed + 1)
    randn = lambda *s: torch.randn(*s, generator=g, device=DEVICE)  # noqa: E731
    proj_channels = a.get("proj_in_channels") or a["cond_channels"]
    inp = {"t": torch.tensor([500.0], device=DEVICE), "global": randn(1, GLOBAL_COND_TOKENS, a["cond_channels"])}
    if cfg["name"] == "SparseStructureFlowModel":
        R = a["resolution"]
        assert R**3 == n_tokens, f"SS token count is {R}^3, not {n_tokens}"
        inp["x"] = randn(1, a["in_channels"], R, R, R)
        inp["proj"] = randn(1, R**3, proj_channels)
    else:
        inp["coords"] = shell_coords(a["resolution"], n_tokens, DEVICE)
        inp["feats"] = randn(n_tokens, a["in_channels"])
        inp["proj"] = randn(n_tokens, proj_channels)
    return inp


def ours_forward(model, cfg: dict, inp: dict):
    """A no-grad forward closure of our model; sparse inputs get a fresh SparseTensor (own cache)."""
    if cfg["name"] == "SparseStructureFlowModel":
        args = (inp["x"], inp["t"], {"global": inp["global"], "proj": inp["proj"]})
    else:
        x = SparseTensor(inp["feats"], inp["coords"])
        args = (x, inp["t"], {"global": inp["global"], "proj": SparseTensor(inp["proj"], inp["coords"])})

    def fwd():
        with torch.no_grad():
            out = model(*args)
        return out if isinstance(out, torch.Tensor) else out.feats

    return fwd


def upstream_forward(upstream: Upstream, model, cfg: dict, inp: dict):
    """A no-grad forward closure of upstream's module on the same inputs (its own SparseTensors)."""
    if cfg["name"] == "SparseStructureFlowModel":
        args = (inp["x"], inp["t"], {"global": inp["global"], "proj": inp["proj"]})
    else:
        x = upstream.sp.SparseTensor(inp["feats"], inp["coords"])
        args = (x, inp["t"], {"global": inp["global"], "proj": upstream.sp.SparseTensor(inp["proj"], inp["coords"])})

    def fwd():
        with torch.no_grad():
            out = model(*args)
        return out if isinstance(out, torch.Tensor) else out.feats

    return fwd


def kernel_profile(fn, top: int = 12) -> dict:
    """GPU kernel time of one call of `fn` by kernel and by kind (GEMM / attention / other)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0)
        if us > 0:
            rows.append((e.key, us / 1000.0, e.count))
    rows.sort(key=lambda r: -r[1])

    def kind(name: str) -> str:
        low = name.lower()
        if any(s in low for s in ("flash", "fmha", "attention", "sdpa", "cudnn")):
            return "attention"
        if any(s in low for s in ("gemm", "nvjet", "cutlass", "sm90_xmma", "matmul")):
            return "gemm"
        return "other"

    by_kind: dict[str, float] = {}
    for name, ms, _ in rows:
        by_kind[kind(name)] = by_kind.get(kind(name), 0.0) + ms
    return {
        "kernel_ms_total": sum(r[1] for r in rows),
        "by_kind_ms": by_kind,
        "kernel_launches": sum(r[2] for r in rows),
        "top": [{"kernel": k[:160], "ms": ms, "count": c} for k, ms, c in rows[:top]],
    }


def sdpa_layout_probe(n_tokens: int, heads: int, head_dim: int, reps: int = 20) -> dict:
    """ms of one bf16 self-attention SDPA call over `n_tokens`, for the three ways its q/k/v can be laid
    out in memory: packed `[T, 3, H, D]` (upstream's sparse path), q/k contiguous `[T, H, D]` with v a
    slice of the qkv projection, and each head-major contiguous `[1, H, T, D]`."""
    import torch.nn.functional as F

    g = torch.Generator(device=DEVICE).manual_seed(7)
    qkv = torch.randn(n_tokens, 3, heads, head_dim, generator=g, device=DEVICE).to(torch.bfloat16)
    head_major = lambda z: z.transpose(0, 1).unsqueeze(0)  # noqa: E731  [T, H, D] -> [1, H, T, D]
    packed = [head_major(z) for z in qkv.unbind(dim=1)]
    split = [head_major(qkv[:, 0].contiguous()), head_major(qkv[:, 1].contiguous()), head_major(qkv[:, 2])]
    contiguous = [z.contiguous() for z in packed]
    out = {}
    for name, (q, k, v) in (("packed_T3HD", packed), ("qk_contiguous_v_slice", split), ("head_major_contiguous", contiguous)):
        out[name] = cuda_time(lambda: F.scaled_dot_product_attention(q, k, v), warmup=3, reps=reps)["median_ms"]
    return out


@torch.no_grad()
def precision_diagnostics(ours, up_model, cfg: dict, inp: dict, upstream: "Upstream") -> dict:
    """Where a bf16 ours-vs-upstream difference comes from: the fp32 time embedding of both, and the
    whole forward of both with the torso converted to fp32 (same function => rounding-level error)."""
    t = inp["t"]
    te_ours = ours.t_embedder(t)
    te_up = up_model.t_embedder(t)
    half = ours.t_embedder.frequency_embedding_size // 2
    freqs_cpu = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    freqs_dev = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=DEVICE) / half)
    res = {
        "t_embedding_max_abs_diff": float((te_ours - te_up).abs().max()),
        "timestep_freqs_elements_differing_cpu_vs_gpu": int((freqs_cpu.to(DEVICE) != freqs_dev).sum()),
    }
    ours.convert_to(torch.float32)
    up_model.convert_to(torch.float32)
    res["fp32_rel_err_ours_vs_upstream"] = rel_err(ours_forward(ours, cfg, inp)(), upstream_forward(upstream, up_model, cfg, inp)())
    ours.convert_to(torch.bfloat16)
    up_model.convert_to(torch.bfloat16)
    return res


def combine(rounds: list[dict]) -> dict:
    times = [t for r in rounds for t in r["all_ms"]]
    out = summarize_ms(times)
    out["round_medians_ms"] = [r["median_ms"] for r in rounds]
    return out


def bench_network(net: dict, cfg: dict, args, upstream: Upstream | None) -> dict:
    n = net["tokens"]
    flop = net["linear_gflop_per_token"] * 1e9 * n + ATTN_FLOP_PER_N2 * n * n
    res = {"network": net["name"], "config_name": cfg["name"], "schema": net["schema"], "tokens": n,
           "batch": 1, "t": 500.0, "flop_per_forward": flop, "config_args": cfg["args"]}

    # ours alone on the GPU: weights, then the peak of a warm forward
    gc.collect(); torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    with torch.device(DEVICE):
        ours = build_model(cfg)
    ours.eval().requires_grad_(False)
    randomize_(ours, args.seed)
    torch.cuda.synchronize()
    res["weights"] = {
        "bytes": module_bytes(ours), "gb": gb(module_bytes(ours)),
        "allocated_delta_bytes": torch.cuda.memory_allocated() - base,
        "bytes_by_dtype": {str(dt): sum(p.numel() * p.element_size() for p in ours.parameters() if p.dtype == dt)
                           for dt in {p.dtype for p in ours.parameters()}},
    }
    inp = make_inputs(cfg, n, args.seed)
    fwd = ours_forward(ours, cfg, inp)
    out_ours = fwd().float()  # warm (caches, library handles) and the output for the comparison
    mem = peak_memory(fwd)
    res["ours_memory"] = {**mem, "total_peak_gb": gb(mem["total_peak_bytes"]), "call_peak_gb": gb(mem["call_peak_bytes"])}
    res["output_finite"] = bool(torch.isfinite(out_ours).all())
    res["output_rms"] = float(out_ours.pow(2).mean().sqrt())

    up_model = up_fwd = None
    if upstream is not None:
        # upstream alone on the GPU (ours parked on the CPU), same weights and inputs
        ours.cpu(); del fwd
        gc.collect(); torch.cuda.empty_cache()
        up_model = upstream.build(cfg, ours.state_dict(), DEVICE)
        up_fwd = upstream_forward(upstream, up_model, cfg, inp)
        out_up = up_fwd().float()
        mem = peak_memory(up_fwd)
        res["upstream_memory"] = {**mem, "total_peak_gb": gb(mem["total_peak_bytes"]), "call_peak_gb": gb(mem["call_peak_bytes"]),
                                  "weights_gb": gb(module_bytes(up_model))}
        res["rel_err_ours_vs_upstream"] = rel_err(out_ours, out_up)
        del out_up
        ours.to(DEVICE)
        fwd = ours_forward(ours, cfg, inp)

    # timing: rounds alternate ours / upstream so drift in clocks shows up in both
    ours_rounds, up_rounds = [], []
    for _ in range(args.rounds):
        ours_rounds.append(cuda_time(fwd, warmup=args.warmup, reps=net["reps"]))
        if up_fwd is not None:
            up_rounds.append(cuda_time(up_fwd, warmup=args.warmup, reps=net["reps"]))
    res["ours_time"] = combine(ours_rounds)
    res["ours_tflops"] = flop / (res["ours_time"]["median_ms"] * 1e-3) / 1e12
    if up_rounds:
        res["upstream_time"] = combine(up_rounds)
        res["upstream_tflops"] = flop / (res["upstream_time"]["median_ms"] * 1e-3) / 1e12
        res["ratio_ours_over_upstream_same_run"] = res["ours_time"]["median_ms"] / res["upstream_time"]["median_ms"]
    if args.profile:
        for key, f in (("ours_profile", fwd), ("upstream_profile", up_fwd)):
            if f is not None:
                try:
                    res[key] = kernel_profile(f)
                except Exception as e:  # the profiler is a diagnostic; the timings stand without it
                    res[key] = {"error": repr(e)}

    if args.diagnostics:
        a = cfg["args"]
        heads = a.get("num_heads") or a["model_channels"] // a.get("num_head_channels", 64)
        res["sdpa_layout_probe_ms"] = sdpa_layout_probe(n, heads, a["model_channels"] // heads)
        if up_model is not None and cfg["name"] == "SparseStructureFlowModel":
            res["precision_diagnostics"] = precision_diagnostics(ours, up_model, cfg, inp, upstream)

    del ours, fwd, up_model, up_fwd, inp, out_ours
    gc.collect(); torch.cuda.empty_cache()
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="pixal3d-rt bench --section eager_baseline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schema-dir", type=Path, default=default_schema_dir(), help="folder of golden/schema/*.json")
    p.add_argument("--upstream", type=Path, default=None, help="folder holding upstream's `pixal3d` package")
    p.add_argument("--networks", default=",".join(n["name"] for n in NETWORKS))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="also record a per-kernel profile of one forward")
    p.add_argument("--diagnostics", action="store_true",
                   help="also probe SDPA q/k/v layouts and the fp32 ours-vs-upstream difference (SS)")
    p.add_argument("--out", default="bench-out", help="folder of the result file")
    p.add_argument("--name", default=None, help="result file name (default eager_baseline_<gpu>)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("eager_baseline needs a CUDA GPU")
    set_output(args.out)
    args.name = args.name or f"eager_baseline_{gpu_slug()}"

    upstream = Upstream(args.upstream) if args.upstream else None
    wanted = args.networks.split(",")
    results = []
    for net in NETWORKS:
        if net["name"] in wanted:
            r = bench_network(net, load_config(args.schema_dir, net["schema"]), args, upstream)
            print(f"{net['name']}: ours {r['ours_time']['median_ms']:.1f} ms"
                  + (f", upstream {r['upstream_time']['median_ms']:.1f} ms" if "upstream_time" in r else ""), flush=True)
            results.append(r)

    data = {
        "benchmark": "eager_baseline",
        "description": "eager models/ definitions, full size, random weights, bf16 torso (block Linears bf16, "
                       "norms/RoPE fp32), SDPA, batch 1, one forward per stage network, torch.no_grad",
        "environment": environment(),
        "seed": args.seed,
        "timing": {"method": "CUDA events around each forward, after warm-up", "warmup": args.warmup,
                   "rounds": args.rounds, "rounds_alternate": "ours, upstream" if upstream else "ours"},
        "memory": {"method": "torch.cuda.max_memory_allocated after reset_peak_memory_stats, one warm forward, "
                             "only that network on the GPU; total = weights + inputs + caches + transients"},
        "flops": {"source": "pixal3d.md §9.3", "attention_flop_per_n2": ATTN_FLOP_PER_N2},
        "upstream_in_same_run": upstream is not None,
        "networks": results,
    }
    for path in write_result(args.name, data):
        print(f"wrote {path}")

    headers = ["network", "N", "ms", "min", "spr%", "TFLOP/s", "peak GB", "wts GB", "up ms", "up peak", "ours/up", "relerr"]
    rows = []
    for r in results:
        t = r["ours_time"]
        up = r.get("upstream_time")
        rows.append([
            r["network"], r["tokens"], f"{t['median_ms']:.1f}", f"{t['min_ms']:.1f}", f"{t['spread_pct']:.1f}",
            f"{r['ours_tflops']:.0f}", f"{r['ours_memory']['total_peak_bytes'] / 1e9:.2f}", f"{r['weights']['gb']:.2f}",
            f"{up['median_ms']:.1f}" if up else "-",
            f"{r['upstream_memory']['total_peak_bytes'] / 1e9:.2f}" if up else "-",
            f"{r['ratio_ours_over_upstream_same_run']:.2f}" if up else "-",
            f"{r['rel_err_ours_vs_upstream']:.1e}" if up else "-",
        ])
    for r in results:
        for key in ("sdpa_layout_probe_ms", "precision_diagnostics"):
            if key in r:
                print(f"{r['network']} {key}: " + ", ".join(f"{k}={v:.4g}" for k, v in r[key].items()))
        for key in ("ours_profile", "upstream_profile"):
            if "by_kind_ms" in r.get(key, {}):
                print(f"{r['network']} {key}: kernels {r[key]['kernel_ms_total']:.1f} ms, "
                      + ", ".join(f"{k} {v:.1f}" for k, v in sorted(r[key]["by_kind_ms"].items())))
    env = data["environment"]
    print(f"\n{env.get('gpu')} driver {env.get('driver')} torch {env['torch']} cuda {env['torch_cuda']} "
          f"triton {env['triton']} commit {str(env.get('commit'))[:10]}")
    print(format_table(headers, rows))


if __name__ == "__main__":
    main()
