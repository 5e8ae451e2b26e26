"""Conditioning kernels on a CUDA GPU (`pixal3d-rt bench --section conditioning`): correctness at
full size, time and peak memory, all ratios from one run.

(a) back-projection at R=64, N=17,489 and R=96, N=39,000 (a voxelised sphere shell), DINOv3 map
    64×64×1024 and a NAF map T×T×1024 (T = 512 and 1024, channels-last as NAF returns it):
    the Triton kernel against our torch reference (sparse grid_sample) and against upstream's dense
    approach (project the whole R³ grid, grid_sample every map into [1, R³, 2048], then gather);
(b) na2d over the full NAF map (kernel 9, dilation 8 at T=512 / 16 at T=1024, 4 heads, qk 64,
    v 256, K/V read through the nearest-exact maps): Triton kernel against the torch reference,
    plus a small tile sweep at T=512;
(c) the texture stage's NAF (full-size NAF with random weights, guide 1024², T=1024) sampled at
    N=17,489 voxels: the lazy map (banded encoder + sparse attention at the tapped texels) against
    our full map (T×T output, no upsampled K/V) and upstream's full map (upsampled K and V
    materialised, as natten is fed).

    pixal3d-rt bench --section conditioning [--out DIR]        (writes DIR/conditioning_<gpu>.json)
"""
from __future__ import annotations

import argparse
import time
import traceback

import torch
import torch.nn.functional as F

from pixal3d_rt.conditioning import Camera, ImageConditioner, NAFSampler, dense_coords, project_voxels, sample_features
from pixal3d_rt.kernels import backproject_triton as bp
from pixal3d_rt.kernels import na2d_triton as nt
from pixal3d_rt.kernels.na2d import na2d_at_reference
from pixal3d_rt.models.naf import NAF, nearest_exact_index

from .common import cuda_time, environment, format_table, gb, gpu_slug, peak_memory, set_output, write_result
from .eager_baseline import shell_coords

DEV = "cuda"
FOV = 0.8575560450553894  # inference.py's default camera_angle_x
S = 1024  # the HR stages' encoder image size
P = 64  # DINOv3 patch grid at 1024 px
BP_TS = (512, 1024)  # NAF map sizes sampled by the back-projection
BP_CASES = ((64, 17_489), (96, 39_000))  # (R, N)
NA2D_TS = (512, 1024)
TEX_CASE = (1024, 64, 17_489)  # (T, R, N) of the texture stage
SWEEP_T = 512
SWEEP_CONFIGS = ((32, 128, 4), (32, 256, 4), (64, 128, 4), (64, 128, 8), (16, 256, 4), (64, 256, 8), (128, 64, 4))
RESULT: dict = {"sections": {}, "errors": {}}
TABLE: list[list] = []


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def errors(got: torch.Tensor, want: torch.Tensor) -> dict:
    got, want = got.float(), want.float()
    return {
        "max_abs": float((got - want).abs().max()) if want.numel() else 0.0,
        "rel_l2": float((got - want).norm() / want.norm().clamp_min(1e-30)) if want.numel() else 0.0,
        "finite": bool(torch.isfinite(got).all()),
    }


def save():
    write_result(f"conditioning_{gpu_slug()}", RESULT)


def channels_last_map(C, h, w, gen):
    """A random [1, C, h, w] map stored channels-last (DINOv3's patch map and NAF's output are)."""
    return torch.randn(1, h, w, C, device=DEV, generator=gen).permute(0, 3, 1, 2)


def upstream_dense(coords, R, cam, maps):
    """Upstream: ProjGrid over the whole corner-aligned R³ grid, every map grid-sampled into
    [1, R³, C], concatenated into [1, R³, ΣC], reshaped to the grid and gathered at the coords."""
    g = project_voxels(dense_coords(R, DEV), R, cam.fov, cam.distance, S, cam.mesh_scale)
    parts = [
        F.grid_sample(m, g.view(1, -1, 1, 2), mode="bilinear", align_corners=False, padding_mode="border").squeeze(-1).permute(0, 2, 1)
        for m in maps
    ]
    z = torch.cat(parts, dim=-1).reshape(1, R, R, R, -1)
    c = coords.long()
    return z[c[:, 0], c[:, 1], c[:, 2], c[:, 3]]


def reference_sparse(coords, R, cam, maps):
    """Our torch reference: project the active voxels only, grid_sample each map, concatenate."""
    g = project_voxels(coords[:, 1:], R, cam.fov, cam.distance, S, cam.mesh_scale)
    return torch.cat([sample_features(m, g) for m in maps], dim=-1)


def section_backprojection():
    gen = torch.Generator(device=DEV).manual_seed(0)
    cam = Camera.from_fov(FOV)
    lr = channels_last_map(1024, P, P, gen)
    out = []
    for T in BP_TS:
        hr = channels_last_map(1024, T, T, gen)
        for R, N in BP_CASES:
            coords = shell_coords(R, N, DEV)
            maps = [lr, hr]
            fns = {
                "triton": lambda: bp.backproject(coords, R, cam.fov, cam.distance, cam.mesh_scale, S, maps),
                "torch_sparse": lambda: reference_sparse(coords, R, cam, maps),
                "upstream_dense": lambda: upstream_dense(coords, R, cam, maps),
            }
            want = fns["torch_sparse"]()
            row = {"R": R, "N": N, "T": T, "check": {
                "triton_vs_torch_sparse": errors(fns["triton"](), want),
                "upstream_dense_vs_torch_sparse": errors(fns["upstream_dense"](), want),
                # the wiring: ImageConditioner.project on CUDA runs the kernel
                "conditioner_project_vs_triton": errors(ImageConditioner(None).project(coords, R, cam, S, maps), fns["triton"]()),
            }}
            del want
            for name, fn in fns.items():
                row[name] = {"time": cuda_time(fn, warmup=2, reps=10), "memory": peak_memory(fn)}
            ut, tt = row["upstream_dense"], row["triton"]
            row["ratios"] = {
                "dense_over_triton_call_peak": ut["memory"]["call_peak_bytes"] / max(1, tt["memory"]["call_peak_bytes"]),
                "dense_over_triton_time": ut["time"]["median_ms"] / tt["time"]["median_ms"],
                "torch_sparse_over_triton_time": row["torch_sparse"]["time"]["median_ms"] / tt["time"]["median_ms"],
            }
            out.append(row)
            TABLE.append([f"backproj R={R} N={N} T={T}", "triton / torch-sparse / dense ms",
                          f"{tt['time']['median_ms']:.3f} / {row['torch_sparse']['time']['median_ms']:.3f} / {ut['time']['median_ms']:.2f}",
                          f"peak GB {gb(tt['memory']['call_peak_bytes'])} / {gb(row['torch_sparse']['memory']['call_peak_bytes'])} / {gb(ut['memory']['call_peak_bytes'])}",
                          f"rel {row['check']['triton_vs_torch_sparse']['rel_l2']:.1e}"])
            log(TABLE[-1])
        del hr
        torch.cuda.empty_cache()
    return out


def section_na2d():
    gen = torch.Generator(device=DEV).manual_seed(1)
    out = []
    H, Dqk, Dv = 4, 64, 256
    for T in NA2D_TS:
        d = T // P
        q_map = torch.randn(1, H * Dqk, T, T, device=DEV, generator=gen)
        q = q_map.reshape(1, H, Dqk, T * T).permute(0, 3, 1, 2)  # how NAF passes its query map
        k = torch.randn(1, P, P, H, Dqk, device=DEV, generator=gen)
        v = torch.randn(1, P, P, H, Dv, device=DEV, generator=gen)
        kv = (nearest_exact_index(P, T, DEV), nearest_exact_index(P, T, DEV))
        tri = lambda: nt.na2d_at_triton(q, k, v, None, None, 9, d, kv_index=kv)  # noqa: E731
        ref = lambda: na2d_at_reference(q, k, v, None, None, 9, d, kv_index=kv)  # noqa: E731
        got = tri()
        want = ref()
        row = {"T": T, "dilation": d, "check": errors(got, want)}
        del got, want
        torch.cuda.empty_cache()
        row["triton"] = {"time": cuda_time(tri, warmup=2, reps=8), "memory": peak_memory(tri)}
        # the reference takes about a second per call at T = 1024: few repeats, no memory probe
        row["torch_reference"] = {"time": cuda_time(ref, warmup=0 if T >= 1024 else 1, reps=2)}
        flop = T * T * H * 81 * (Dqk + Dv) * 2
        row["useful_tflops_triton"] = flop / (row["triton"]["time"]["median_ms"] * 1e-3) / 1e12
        row["ratio_reference_over_triton_time"] = row["torch_reference"]["time"]["median_ms"] / row["triton"]["time"]["median_ms"]
        out.append(row)
        TABLE.append([f"na2d full map T={T} d={d}", "triton / torch-ref ms",
                      f"{row['triton']['time']['median_ms']:.2f} / {row['torch_reference']['time']['median_ms']:.1f}",
                      f"{row['ratio_reference_over_triton_time']:.1f}x, {row['useful_tflops_triton']:.1f} TFLOP/s",
                      f"rel {row['check']['rel_l2']:.1e}"])
        log(TABLE[-1])
        del q_map, q, k, v
        torch.cuda.empty_cache()
    return out


def section_na2d_sweep():
    gen = torch.Generator(device=DEV).manual_seed(2)
    T, H = SWEEP_T, 4
    d = T // P
    q = torch.randn(1, H * 64, T, T, device=DEV, generator=gen).reshape(1, H, 64, T * T).permute(0, 3, 1, 2)
    k = torch.randn(1, P, P, H, 64, device=DEV, generator=gen)
    v = torch.randn(1, P, P, H, 256, device=DEV, generator=gen)
    kv = (nearest_exact_index(P, T, DEV), nearest_exact_index(P, T, DEV))
    base = nt.na2d_at_triton(q, k, v, None, None, 9, d, kv_index=kv)
    out = []
    for bm, bdv, nw in SWEEP_CONFIGS:
        fn = lambda: nt.na2d_at_triton(q, k, v, None, None, 9, d, kv_index=kv, block_m=bm, block_dv=bdv, num_warps=nw)  # noqa: E731
        out.append({"block_m": bm, "block_dv": bdv, "num_warps": nw, "check_vs_default": errors(fn(), base),
                    "time": cuda_time(fn, warmup=2, reps=6)})
        log("sweep", bm, bdv, nw, f"{out[-1]['time']['median_ms']:.2f} ms")
    return out


def random_naf(seed=0) -> NAF:
    torch.manual_seed(seed)
    m = NAF().to(DEV).eval()  # hubconf: dim 256, 4 heads, kernel 9
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m


def upstream_full_naf(naf, image, lr, T):
    """NAF as upstream runs it: K and V nearest-exact upsampled to T×T and materialised heads-last,
    then full-map attention (our kernel standing in for natten's), output [1, C, T, T]."""
    q, keys = naf.queries_keys(image, lr.shape[-2:], (T, T))
    n = naf.heads_attn

    def heads_last(x):
        return x.reshape(1, n, -1, T, T).permute(0, 3, 4, 1, 2).contiguous()

    k_up = heads_last(F.interpolate(keys, size=(T, T), mode="nearest-exact"))
    v_up = heads_last(F.interpolate(lr, size=(T, T), mode="nearest-exact"))
    qh = heads_last(q)
    del q
    o = nt.na2d_at_triton(qh.flatten(1, 2), k_up, v_up, None, None, naf.kernel_size, T // lr.shape[-1])
    return o.view(1, T, T, -1).permute(0, 3, 1, 2)


def section_texture_naf():
    gen = torch.Generator(device=DEV).manual_seed(3)
    T, R, N = TEX_CASE
    naf = random_naf()
    image = torch.rand(1, 3, S, S, device=DEV, generator=gen)
    lr = channels_last_map(1024, P, P, gen)
    cam = Camera.from_fov(FOV)
    coords = shell_coords(R, N, DEV)

    def project(naf_map):
        return bp.backproject(coords, R, cam.fov, cam.distance, cam.mesh_scale, S, [lr, naf_map])

    def lazy(band_rows=None):
        m = NAFSampler(naf, image, lr, T)
        m.band_rows = band_rows or m.band_rows
        return m

    with torch.no_grad():
        # the lazy map's encoder bands differ from the full map's only by rounding: with TF32 off
        # (cuDNN convolutions use it by default) the two must agree to fp32 precision
        tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            g = torch.Generator(device=DEV).manual_seed(4)
            rows, cols = torch.randint(0, T, (5000,), device=DEV, generator=g), torch.randint(0, T, (5000,), device=DEV, generator=g)
            q_full, k_full = naf.queries_keys(image, lr.shape[-2:], (T, T))
            q_sel, k_band = naf.queries_keys_at(image, lr.shape[-2:], (T, T), rows, cols, band_rows=16)
            fp32_check = {
                "banded_queries_vs_full": errors(q_sel, q_full[:, :, rows, cols].permute(0, 2, 1)),
                "banded_keys_vs_full": errors(k_band, k_full),
            }
            del q_full, k_full, q_sel, k_band
            fp32_check["sparse_vs_our_full"] = errors(project(lazy()), project(naf(image, lr, (T, T))))
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.cuda.empty_cache()
        fns = {
            "sparse_lazy_map": lambda: project(lazy()),
            "sparse_lazy_map_band32": lambda: project(lazy(32)),
            "our_full_map": lambda: project(naf(image, lr, (T, T))),
            "upstream_full_map": lambda: project(upstream_full_naf(naf, image, lr, T)),
        }
        want = fns["our_full_map"]()
        row = {"T": T, "R": R, "N": N, "check_fp32_convs": fp32_check, "check": {
            "sparse_vs_our_full": errors(fns["sparse_lazy_map"](), want),
            "upstream_full_vs_our_full": errors(fns["upstream_full_map"](), want),
        }}
        del want
        torch.cuda.empty_cache()
        for name, fn in fns.items():
            row[name] = {"memory": peak_memory(fn), "time": cuda_time(fn, warmup=1, reps=3)}
            torch.cuda.empty_cache()
    sp = row["sparse_lazy_map"]["memory"]["call_peak_bytes"]
    row["ratios"] = {
        "our_full_over_sparse_call_peak": row["our_full_map"]["memory"]["call_peak_bytes"] / sp,
        "upstream_full_over_sparse_call_peak": row["upstream_full_map"]["memory"]["call_peak_bytes"] / sp,
        "our_full_over_sparse_time": row["our_full_map"]["time"]["median_ms"] / row["sparse_lazy_map"]["time"]["median_ms"],
    }
    row["texels_sampled_note"] = "4 taps per voxel, unique texels evaluated once"
    TABLE.append([f"tex NAF T={T} N={N}", "sparse / ours-full / upstream-full",
                  f"peak GB {gb(sp)} (band 32: {gb(row['sparse_lazy_map_band32']['memory']['call_peak_bytes'])}) / "
                  f"{gb(row['our_full_map']['memory']['call_peak_bytes'])} / {gb(row['upstream_full_map']['memory']['call_peak_bytes'])}",
                  f"ms {row['sparse_lazy_map']['time']['median_ms']:.0f} / {row['our_full_map']['time']['median_ms']:.0f} / {row['upstream_full_map']['time']['median_ms']:.0f}",
                  f"rel {row['check']['sparse_vs_our_full']['rel_l2']:.1e} (fp32 convs {fp32_check['sparse_vs_our_full']['rel_l2']:.1e})"])
    log(TABLE[-1])
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(prog="pixal3d-rt bench --section conditioning", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-out", help="folder of the result file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the conditioning section needs a CUDA GPU")
    set_output(args.out)
    RESULT["env"] = environment()
    RESULT["settings"] = {"fov": FOV, "image_size": S, "patch_grid": P, "shell": "eager_baseline.shell_coords",
                          "timing": "CUDA events, warm, median", "memory": "torch.cuda.max_memory_allocated above resident"}
    for name, fn in (("backprojection", section_backprojection), ("texture_naf", section_texture_naf),
                     ("na2d_full_map", section_na2d), ("na2d_tile_sweep", section_na2d_sweep)):
        t0 = time.time()
        try:
            RESULT["sections"][name] = fn()
        except Exception:  # keep the other sections' numbers
            RESULT["errors"][name] = traceback.format_exc()
            log(f"{name} FAILED\n{RESULT['errors'][name]}")
        log(f"{name} done in {time.time() - t0:.1f} s")
        torch.cuda.empty_cache()
        save()
    print(format_table(["case", "variants", "time / memory", "ratio", "error"], TABLE))


if __name__ == "__main__":
    main()
