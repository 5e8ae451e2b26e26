"""Sparse submanifold 3x3x3 conv on the GPU (`pixal3d-rt bench --section sparse_conv`): CUDA hash
neighbour maps + the Triton implicit GEMM, against the pure-torch reference, in one run.

Voxels: a bumpy sphere shell on the 64^3 grid grown by the C2S child rule (each level keeps the
children closest to the surface) to the reference object's counts 17,489 -> 71,262 -> 288,168 ->
1,158,925 -> 4,649,809, with the shape decoder's widths 1024, 512, 256, 128, 64.

1. ceilings measured here: device-to-device copy bandwidth, fp16 matmul rate;
2. a whole shape-decoder decode (full-size random fp16 weights, subdivisions following the same
   shell, so the levels have exactly the counts above), each in a fresh process: with an empty Triton
   cache (first use on a machine: includes JIT compiles) and with the cache the first one left (every
   later process): first-decode wall time, warm time, peak memory; the first one also runs the torch
   reference decode for time, peak and output error;
3. per level: neighbour map (CUDA hash vs torch reference, equality), and each conv shape of the level
   (block conv C->C, C2S conv C->8C'): the Triton kernel (table tile; unsorted rows; alternative tiles)
   vs the torch reference in fp16, rel L2 against the reference in fp32, achieved bandwidth against
   the measured copy bandwidth and TFLOP/s;
4. the NVRTC fallback: compile time and equality with the fatbin's maps.

FlexGEMM / spconv are not run: the device machine has no network, and neither is installed there.

    pixal3d-rt bench --section sparse_conv [--out DIR]                          # GPU: DIR/sparse_conv_<gpu>.json
    pixal3d-rt bench --section sparse_conv --section-arg=--smoke [--out DIR]    # tiny sizes on the CPU (Triton
                                                  interpreter): checks the code, measures nothing (..._smoke.json)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:  # before triton is imported: it reads this once
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from pixal3d_rt.kernels import cuda_loader, subm_conv  # noqa: E402
from pixal3d_rt.kernels.subm_conv import build_neighbor_map_reference, subm_conv3d_reference  # noqa: E402

from .common import cuda_time, environment, format_table, gb, gpu_slug, module_bytes, set_output, summarize_ms, write_result  # noqa: E402

MODULE = "pixal3d_rt.bench_sections.sparse_conv"  # the decode children run it again
FULL = {
    "base_res": 64,
    "counts": [17_489, 71_262, 288_168, 1_158_925, 4_649_809],
    "decoder": {
        "resolution": 256,
        "model_channels": [1024, 512, 256, 128, 64],
        "latent_channels": 32,
        "num_blocks": [4, 16, 8, 4, 0],
        "block_type": ["SparseConvNeXtBlock3d"] * 5,
        "up_block_type": ["SparseResBlockC2S3d"] * 4,
        "block_args": [{"use_checkpoint": False}] * 3 + [{"use_checkpoint": True}] * 2,
        "use_fp16": True,
    },
}
SMOKE = {
    "base_res": 8,
    "counts": [60, 230, 880],
    "decoder": {
        "resolution": 32,
        "model_channels": [32, 16, 16],
        "latent_channels": 8,
        "num_blocks": [1, 1, 0],
        "block_type": ["SparseConvNeXtBlock3d"] * 3,
        "up_block_type": ["SparseResBlockC2S3d"] * 2,
        "block_args": [{"use_checkpoint": False}] * 3,
        "use_fp16": True,
    },
}


# ------------------------------------------------------------------------------------------------
# voxel shell


def surface_distance(voxels: torch.Tensor, res: int) -> torch.Tensor:
    """Distance (in voxels of this level) from voxel centres to a bumpy sphere in the unit cube."""
    q = (voxels.float() + 0.5) / res - 0.5
    rho = q.norm(dim=1).clamp_min(1e-9)
    d = q / rho[:, None]
    r = 0.40 * (1 + 0.08 * torch.sin(5 * d[:, 0]) * torch.cos(4 * d[:, 1]) + 0.05 * torch.sin(7 * d[:, 2]))
    return (rho - r).abs() * res


def _jitter(n: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(n, generator=g, device=device) * 1e-3  # breaks ties between equal distances


def child_keep(coords: torch.Tensor, res: int, count: int, seed: int) -> torch.Tensor:
    """bool [N, 8]: the `count` children (C2S rule: child j at 2c + (j&1, j>>1&1, j>>2&1)) closest to the surface."""
    j = torch.arange(8, device=coords.device)
    bits = torch.stack([j & 1, (j >> 1) & 1, (j >> 2) & 1], dim=1)
    child = coords[:, None, 1:].long() * 2 + bits  # [N, 8, 3]
    dist = surface_distance(child.reshape(-1, 3), 2 * res) + _jitter(child.shape[0] * 8, seed, coords.device)
    keep = torch.zeros(dist.shape[0], dtype=torch.bool, device=coords.device)
    keep[torch.topk(dist, count, largest=False).indices] = True
    return keep.view(-1, 8)


def shell_levels(base_res: int, counts: list[int], device) -> list[torch.Tensor]:
    """Coordinates int32 [N_i, 4] per level: base = the counts[0] voxels nearest the surface (sorted),
    then C2S children in the decoder's order (parent-major, ascending j)."""
    from pixal3d_rt.models.sc_vae import channel_to_spatial_index

    r = base_res
    g = torch.arange(r, device=device)
    xyz = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), dim=-1).reshape(-1, 3)
    dist = surface_distance(xyz, r) + _jitter(xyz.shape[0], 0, device)
    idx = torch.sort(torch.topk(dist, counts[0], largest=False).indices).values
    levels = [torch.cat([torch.zeros(counts[0], 1, dtype=torch.long, device=device), xyz[idx]], 1).int()]
    for i, count in enumerate(counts[1:], start=1):
        keep = child_keep(levels[-1], r, count, seed=i)
        child, *_ = channel_to_spatial_index(levels[-1], keep)
        levels.append(child.int())
        r *= 2
    return levels


# ------------------------------------------------------------------------------------------------
# timing helpers


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup: int = 2, reps: int = 10) -> dict:
    if device.type == "cuda":
        return cuda_time(fn, warmup=warmup, reps=reps)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return summarize_ms(times)


def wall_s(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))


def ceilings(device) -> dict:
    """Copy bandwidth (bytes read + written) and fp16 matmul rate, on random data."""
    n = 1 << 29  # 1 GiB of fp16
    src = torch.randn(n, device=device, dtype=torch.float16)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), device, warmup=3, reps=20)
    out = {"copy_bytes": 2 * n * 2, "copy_ms": t["median_ms"], "copy_TBps": 2 * n * 2 / t["median_ms"] / 1e9}
    del src, dst
    m = 8192
    a = torch.randn(m, m, device=device, dtype=torch.float16)
    b = torch.randn(m, m, device=device, dtype=torch.float16)
    t = timed(lambda: a @ b, device, warmup=3, reps=10)
    out.update({"matmul_ms": t["median_ms"], "matmul_fp16_TFLOPs": 2 * m**3 / t["median_ms"] / 1e9})
    return out


# ------------------------------------------------------------------------------------------------
# whole decoder (run in a child process, so the first decode is a real first one)


def build_shape_decoder(cfg: dict, device):
    from pixal3d_rt.models.sc_vae import FlexiDualGridVaeDecoder

    with torch.device(device):
        model = FlexiDualGridVaeDecoder(**cfg["decoder"])
    return model.eval()


def follow_shell(model, base_res: int, counts: list[int], seen: list):
    """Replace each up-block's predicted subdivision by the shell's (random weights would subdivide at
    random): logits > 0 exactly for the children `shell_levels` keeps, so the levels match it. The
    masks are found once (a top-k over all candidate children) and reused by later decodes; the
    block's own `to_subdiv` Linear still runs, so its cost stays in the timings."""
    ups = [level[-1] for level in model.blocks[:-1]]
    masks: dict[int, torch.Tensor] = {}
    for i, block in enumerate(ups):

        def subdivision(x, subdiv, i=i, block=block):
            predicted = block.to_subdiv(x.feats)
            if i not in masks or masks[i].shape[0] != x.coords.shape[0]:
                masks[i] = child_keep(x.coords, base_res * 2**i, counts[i + 1], seed=i + 1)
            seen.append(int(masks[i].sum()))
            return masks[i].to(predicted.dtype) * 2 - 1

        block.subdivision = subdivision


def conv_shapes(model) -> set[tuple[int, int]]:
    from pixal3d_rt.models.sc_vae import SubMConv3d

    return {(m.in_channels, m.out_channels) for m in model.modules() if isinstance(m, SubMConv3d)}


class TritonCallCounter:
    """Counts calls of the Triton conv (the dispatcher imports it from its module at every call)."""

    def __init__(self):
        import pixal3d_rt.kernels.sparse_conv_triton as sct

        self.calls = 0
        real = sct.subm_conv3d_triton

        def counted(*a, **k):
            self.calls += 1
            return real(*a, **k)

        sct.subm_conv3d_triton = counted


def decode_child(args) -> None:
    cfg = SMOKE if args.smoke else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res: dict = {"tag": args.tag, "triton_cache_dir": os.environ.get("TRITON_CACHE_DIR")}
    t_start = time.perf_counter()
    torch.manual_seed(0)
    coords0 = shell_levels(cfg["base_res"], cfg["counts"][:1], device)[0]
    model = build_shape_decoder(cfg, device)
    seen: list[int] = []
    follow_shell(model, cfg["base_res"], cfg["counts"], seen)
    latent = torch.randn(coords0.shape[0], cfg["decoder"]["latent_channels"], device=device)
    res["weights_bytes"] = module_bytes(model)
    res["setup_s"] = time.perf_counter() - t_start
    counter = TritonCallCounter() if device.type == "cuda" else None
    if args.prepare and device.type == "cuda":
        # what a pipeline does while loading the decoder: load the CUDA module and the Triton tiles
        t0 = time.perf_counter()
        res["prepare_parts_s"] = subm_conv.warm_up_gpu_kernels(device, conv_shapes(model))
        res["prepare_s"] = time.perf_counter() - t0
        counter.calls = 0

    from pixal3d_rt.models.sparse import SparseTensor

    def decode():
        with torch.no_grad():
            return model(SparseTensor(latent, coords0))  # fresh caches: neighbour maps built per decode

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out, first = wall_s(decode, device)
    res["first_decode_s"] = first
    res["level_counts"] = [coords0.shape[0]] + seen[: len(cfg["counts"]) - 1]
    res["out_shape"] = list(out.feats.shape)
    res["out_finite"] = bool(torch.isfinite(out.feats).all())
    if device.type == "cuda":
        res["first_decode_peak_bytes"] = torch.cuda.max_memory_allocated()
        res["triton_conv_calls_per_decode"] = counter.calls
    out = out.feats  # drop the output's coordinate cache (the finest neighbour map) before measuring again
    res["warm"] = timed(decode, device, warmup=1, reps=5)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        decode()
        torch.cuda.synchronize()
        res["peak"] = {"total_peak_bytes": torch.cuda.max_memory_allocated(), "resident_before_bytes": before,
                       "reserved_bytes": torch.cuda.max_memory_reserved()}
        try:  # where the warm time goes: the conv kernel vs everything else (device time)
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                decode()
                torch.cuda.synchronize()
            conv_us = other_us = 0.0
            kernels = []
            for e in prof.key_averages():
                t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
                kernels.append((t / 1e3, e.count, e.key[:120]))
                if "_subm_conv_kernel" in e.key:
                    conv_us += t
                else:
                    other_us += t
            res["profile_device_ms"] = {"subm_conv_kernel": conv_us / 1e3, "everything_else": other_us / 1e3}
            res["profile_top_kernels_ms_count_name"] = sorted(kernels, reverse=True)[:15]
        except Exception as e:  # noqa: BLE001
            res["profile_error"] = repr(e)
    if args.with_reference:
        os.environ["PIXAL3D_DISABLE_TRITON_SPCONV"] = "1"
        os.environ["PIXAL3D_DISABLE_CUDA_HASH"] = "1"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        calls_before = counter.calls if counter else 0
        ref, t_ref = wall_s(decode, device)  # twice: the better of two (the torch path has no JIT)
        ref = None
        ref, t_ref2 = wall_s(decode, device)
        res["reference_decode_s"] = min(t_ref, t_ref2)
        if device.type == "cuda":
            res["reference_peak_bytes"] = torch.cuda.max_memory_allocated()
            res["reference_triton_conv_calls"] = counter.calls - calls_before  # must be 0: the torch path ran
        # fp16 both ways; equal bits are possible: both accumulate the same products in fp32 in one order
        res["rel_l2_vs_reference"] = rel_l2(out, ref.feats)
        res["max_abs_vs_reference"] = float((out.float() - ref.feats.float()).abs().max())
        res["fraction_bitwise_equal"] = float((out == ref.feats).float().mean())
        del os.environ["PIXAL3D_DISABLE_TRITON_SPCONV"], os.environ["PIXAL3D_DISABLE_CUDA_HASH"]
    Path(args.child_out).write_text(json.dumps(res, default=str))


def run_decode(tag: str, cache_dir: str, with_reference: bool, prepare: bool, smoke: bool, timeout: int) -> dict:
    out = Path(cache_dir).parent / f"decode_{tag}.json"
    cmd = [sys.executable, "-m", MODULE, "--decode-child", "--tag", tag, "--child-out", str(out)]
    cmd += ["--with-reference"] if with_reference else []
    cmd += ["--prepare"] if prepare else []
    cmd += ["--smoke"] if smoke else []
    env = dict(os.environ, TRITON_CACHE_DIR=cache_dir, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        return {"error": f"rc {proc.returncode}", "stderr_tail": proc.stderr[-3000:]}
    res = json.loads(out.read_text())
    res["process_wall_s"] = time.perf_counter() - t0
    return res


# ------------------------------------------------------------------------------------------------
# per-level convs


def variants(ci: int, co: int, capability):
    """The table's tile, the same with unsorted rows, and neighbours of it (one more pipeline stage;
    the other row-block size; for Co >= 256 the 128x128 tile)."""
    from pixal3d_rt.kernels.sparse_conv_triton import TileConfig, tile_config

    base = tile_config(ci, co, capability)
    out = [("table", base, True), ("table_unsorted_rows", base, False)]
    out.append(("stages+1", TileConfig(base.block_m, base.block_n, base.block_k, base.num_warps, base.num_stages + 1), True))
    bm = 64 if base.block_m == 128 else 128
    out.append((f"bm{bm}", TileConfig(bm, base.block_n, base.block_k, base.num_warps, base.num_stages), True))
    if base.block_n == 256:
        out.append(("bn128_s4", TileConfig(128, 128, base.block_k, 8, 4), True))
    return out


def bench_level(li: int, coords: torch.Tensor, chans: list[int], device, ceil: dict, quick: bool) -> dict:
    from pixal3d_rt.kernels.sparse_conv_triton import conv_plan, subm_conv3d_triton

    n = coords.shape[0]
    rec: dict = {"level": li, "voxels": n, "channels": chans[li]}
    reps = 3 if quick else 10
    nm_ref_t = timed(lambda: build_neighbor_map_reference(coords), device, warmup=1, reps=3)
    nmap = build_neighbor_map_reference(coords)
    rec["nmap"] = {"reference_ms": nm_ref_t["median_ms"], "present_taps_per_row": float((nmap >= 0).sum()) / max(1, n)}
    if device.type == "cuda" and subm_conv.cuda_hash_applies(coords):
        got = subm_conv.build_neighbor_map_cuda(coords)
        rec["nmap"]["cuda_equal_reference"] = bool(torch.equal(got, nmap))
        t = timed(lambda: subm_conv.build_neighbor_map_cuda(coords), device, warmup=2, reps=reps)
        rec["nmap"]["cuda_ms"] = t["median_ms"]
        rec["nmap"]["speedup"] = nm_ref_t["median_ms"] / t["median_ms"]
        del got
    shapes = [("block", chans[li], chans[li])]
    if li + 1 < len(chans):
        shapes.append(("c2s_up", chans[li], 8 * chans[li + 1]))
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    rec["convs"] = []
    g = torch.Generator(device=device).manual_seed(100 + li)
    for kind, ci, co in shapes:
        c: dict = {"kind": kind, "ci": ci, "co": co}
        feats = torch.randn(n, ci, generator=g, device=device).half()
        weight = (torch.randn(co, 3, 3, 3, ci, generator=g, device=device) / math.sqrt(27 * ci)).half()
        bias = (0.1 * torch.randn(co, generator=g, device=device)).half()
        want = subm_conv3d_reference(feats.float(), nmap, weight.float(), bias.float())  # fp32 (tf32 off)
        pairs = int((nmap >= 0).sum())
        c["useful_gflop"] = 2 * pairs * ci * co / 1e9
        c["dense_gflop"] = 2 * n * 27 * ci * co / 1e9
        # fewest bytes: features read once, output written once, the map, the weight
        min_bytes = n * ci * 2 + n * co * 2 + n * 27 * 4 + 27 * ci * co * 2
        c["min_bytes"] = min_bytes
        c["variants"] = {}
        for name, config, sort_rows in variants(ci, co, capability):
            v: dict = {"tile": config.__dict__, "sorted_rows": sort_rows}
            try:
                plan, plan_s = wall_s(lambda: conv_plan(nmap, config.block_m, sort_rows), device)
                v["plan_ms"] = 1e3 * plan_s
                v["taps_per_row_executed"] = plan.taps_used() * config.block_m / max(1, n)
                out, first = wall_s(lambda: subm_conv3d_triton(feats, nmap, weight, bias, plan=plan, config=config), device)
                v["first_call_s"] = first
                v["rel_l2_vs_fp32"] = rel_l2(out, want)
                v["finite"] = bool(torch.isfinite(out).all())
                del out
                t = timed(lambda: subm_conv3d_triton(feats, nmap, weight, bias, plan=plan, config=config), device, warmup=2, reps=reps)
                v["ms"] = t["median_ms"]
                v["spread_pct"] = t["spread_pct"]
                v["GBps"] = min_bytes / t["median_ms"] / 1e6
                v["copy_bw_fraction"] = v["GBps"] / (1e3 * ceil["copy_TBps"]) if ceil.get("copy_TBps") else None
                v["useful_TFLOPs"] = c["useful_gflop"] / t["median_ms"]
                v["executed_TFLOPs"] = 2 * plan.taps_used() * config.block_m * ci * co / 1e12 / (t["median_ms"] / 1e3)
            except Exception as e:  # noqa: BLE001 - one tile failing must not lose the rest
                v["error"] = repr(e)[:500]
            c["variants"][name] = v
        t = timed(lambda: subm_conv3d_reference(feats, nmap, weight, bias), device, warmup=1, reps=3)
        c["reference_fp16_ms"] = t["median_ms"]
        c["reference_fp16_rel_l2_vs_fp32"] = rel_l2(subm_conv3d_reference(feats, nmap, weight, bias), want)
        table = c["variants"]["table"]
        if "ms" in table:
            c["speedup_vs_reference"] = c["reference_fp16_ms"] / table["ms"]
        rec["convs"].append(c)
        del feats, weight, bias, want
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rec


def bench_nvrtc(levels, device) -> dict:
    """Compile the module with NVRTC (fresh CuPy cache) and compare its maps with the fatbin's."""
    rec: dict = {}
    t0 = time.perf_counter()
    fat = cuda_loader.load_module(device.index or 0)
    rec["loaded_origin"] = fat.origin
    rec["first_load_s"] = time.perf_counter() - t0
    saved = cuda_loader.fatbin_candidates
    try:
        cuda_loader.fatbin_candidates = lambda: []
        t0 = time.perf_counter()
        nv = cuda_loader._load(device.index or 0)
        rec["nvrtc_compile_s"] = time.perf_counter() - t0
        rec["nvrtc_origin"] = nv.origin
    finally:
        cuda_loader.fatbin_candidates = saved
    cuda_loader._modules[device.index or 0] = nv
    try:
        rec["nvrtc_equal_fatbin"] = all(
            torch.equal(subm_conv.build_neighbor_map_cuda(c), build_neighbor_map_reference(c)) for c in levels[:3]
        )
    finally:
        cuda_loader._modules[device.index or 0] = fat
    return rec


# ------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="pixal3d-rt bench --section sparse_conv")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks the script, measures nothing")
    ap.add_argument("--decode-child", action="store_true")
    ap.add_argument("--with-reference", action="store_true")
    ap.add_argument("--prepare", action="store_true", help="decode child: warm_up_gpu_kernels before the first decode")
    ap.add_argument("--tag", default="")
    ap.add_argument("--child-out", default="")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--decode-only", action="store_true",
                    help="only the whole-decoder timing (prepared warm decode); skips per-level and NVRTC sections")
    ap.add_argument("--result-name", default="", help="write the JSON under this name instead of sparse_conv_<gpu>")
    ap.add_argument("--out", default="bench-out", help="folder of the result file")
    args = ap.parse_args(argv)
    if args.decode_child:
        decode_child(args)
        return

    cfg = SMOKE if args.smoke else FULL
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("the sparse_conv section needs a CUDA GPU (--smoke checks its code on the CPU)")
    set_output(args.out)
    name = (args.result_name or f"sparse_conv_{gpu_slug()}") + ("_smoke" if args.smoke else "")
    work = Path(os.environ.get("PIXAL3D_BENCH_TMP", f"/tmp/pixal3d_bench_{os.getpid()}"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("CUPY_CACHE_DIR", str(work / "cupy_cache"))  # NVRTC timing starts cold
    # one Triton cache for this run: the decode children fill it (the first starts empty), the
    # per-level section reuses it
    os.environ["TRITON_CACHE_DIR"] = str(work / "triton_cache")
    data: dict = {
        "name": name,
        "env": environment(),
        "settings": {"smoke": args.smoke, "base_res": cfg["base_res"], "counts": cfg["counts"],
                     "channels": cfg["decoder"]["model_channels"], "dtype": "float16"},
        "not_run": {"flexgemm_spconv": "upstream's FlexGEMM convolution is not run by this section; "
                    "`pixal3d-rt bench --upstream DIR` runs upstream's decoders where FlexGEMM is installed"},
        "errors": [],
    }

    def save():
        write_result(name, data)

    t_all = time.perf_counter()
    try:
        data["ceilings"] = ceilings(device) if device.type == "cuda" else {}
    except Exception as e:  # noqa: BLE001
        data["errors"].append(f"ceilings: {e!r}")
        data["ceilings"] = {}
    print("ceilings", data["ceilings"], flush=True)

    # decode first: its cold-cache child must be the first Triton user on this machine
    if not args.skip_decode:
        cache = os.environ["TRITON_CACHE_DIR"]
        runs = (("cold_cache", True, False), ("warm_cache", False, False), ("warm_cache_prepared", False, True))
        if args.decode_only:  # with reference so the decode is still checked against the unfused path
            runs = (("warm_cache_prepared", True, True),)
        for tag, with_ref, prepare in runs:
            try:
                data.setdefault("decode", {})[tag] = run_decode(tag, cache, with_ref, prepare, args.smoke, timeout=150 if with_ref else 100)
            except Exception as e:  # noqa: BLE001
                data.setdefault("decode", {})[tag] = {"error": repr(e)}
            print("decode", tag, {k: v for k, v in data["decode"][tag].items() if k != "warm"}, flush=True)
            save()

    if args.decode_only:
        data["total_s"] = time.perf_counter() - t_all
        save()
        print_tables(data)
        return
    levels = shell_levels(cfg["base_res"], cfg["counts"], device)
    data["levels"] = []
    for li, coords in enumerate(levels):
        try:
            rec = bench_level(li, coords, cfg["decoder"]["model_channels"], device, data["ceilings"], quick=args.smoke)
        except Exception as e:  # noqa: BLE001
            rec = {"level": li, "error": repr(e)[:1000]}
        data["levels"].append(rec)
        print("level", li, json.dumps(rec, default=str)[:600], flush=True)
        save()
    if device.type == "cuda":
        try:
            data["nvrtc"] = bench_nvrtc(levels, device)
        except Exception as e:  # noqa: BLE001
            data["nvrtc"] = {"error": repr(e)[:1000]}
    data["total_s"] = time.perf_counter() - t_all
    save()
    print_tables(data)


def print_tables(data: dict) -> None:
    ceil = data.get("ceilings", {})
    print(f"\ncopy {ceil.get('copy_TBps', 0):.2f} TB/s, fp16 matmul {ceil.get('matmul_fp16_TFLOPs', 0):.0f} TFLOP/s")
    rows = []
    for lv in data.get("levels", []):
        if "convs" not in lv:
            rows.append([lv.get("level"), "error", lv.get("error", "")[:60]] + [""] * 8)
            continue
        nm = lv["nmap"]
        for c in lv["convs"]:
            t = c["variants"].get("table", {})
            best = min((v for v in c["variants"].values() if "ms" in v), key=lambda v: v["ms"], default={})
            best_name = next((k for k, v in c["variants"].items() if v is best), "")
            rows.append([
                lv["level"], lv["voxels"], f"{c['ci']}->{c['co']}", t.get("ms", float("nan")), c["reference_fp16_ms"],
                c.get("speedup_vs_reference", float("nan")), 100 * (t.get("copy_bw_fraction") or 0), t.get("useful_TFLOPs", 0),
                t.get("taps_per_row_executed", 0), t.get("rel_l2_vs_fp32", float("nan")), f"{best_name} {best.get('ms', 0):.3g}",
            ])
        rows.append(["", "", "nmap", nm.get("cuda_ms", float("nan")), nm["reference_ms"], nm.get("speedup", float("nan")),
                     "", "", f"{nm['present_taps_per_row']:.1f}", "equal" if nm.get("cuda_equal_reference") else "-", ""])
    print(format_table(["lvl", "N", "conv", "ours ms", "torch ms", "x", "%copyBW", "TFLOP/s", "taps/row", "relL2", "best tile ms"], rows))
    for tag, d in data.get("decode", {}).items():
        if "error" in d:
            print(f"decode {tag}: ERROR {d['error']} {d.get('stderr_tail', '')[-800:]}")
            continue
        if "prepare_s" in d:
            print(f"decode {tag}: warm_up_gpu_kernels {d['prepare_s']:.3f} s {d.get('prepare_parts_s')}")
        print(f"decode {tag}: levels {d.get('level_counts')} first {d['first_decode_s']:.3f} s, warm {d['warm']['median_ms']:.1f} ms, "
              f"peak {gb(d.get('peak', {}).get('total_peak_bytes', 0))} GB (weights {gb(d['weights_bytes'])} GB), "
              f"first-decode peak {gb(d.get('first_decode_peak_bytes', 0))} GB, profile {d.get('profile_device_ms')}")
        if "reference_decode_s" in d:
            print(f"  torch reference decode {d['reference_decode_s']:.3f} s, peak {gb(d.get('reference_peak_bytes', 0))} GB, "
                  f"rel L2 ours vs reference {d['rel_l2_vs_reference']:.2e} (bitwise equal {d.get('fraction_bitwise_equal')}), "
                  f"finite {d['out_finite']}, triton calls ours/ref {d.get('triton_conv_calls_per_decode')}/{d.get('reference_triton_conv_calls')}")
        for k in d.get("profile_top_kernels_ms_count_name", [])[:8]:
            print(f"    {k[0]:8.2f} ms {k[1]:5d}x {k[2][:90]}")
    if "nvrtc" in data:
        print("nvrtc", data["nvrtc"])
    if data.get("errors"):
        print("errors", data["errors"])
    print(f"total {data.get('total_s', 0):.1f} s")


if __name__ == "__main__":
    main()
