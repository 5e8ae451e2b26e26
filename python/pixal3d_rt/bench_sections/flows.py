"""The `cuda` backend of the flow transformers against this project's eager bf16 path
(`pixal3d-rt bench --section flows`).

One GPU run, everything measured in the same process:

1. the bf16 matmul rate of this GPU (8192^3, random data): the ceiling the targets refer to;
2. every Triton kernel of the fast path against its pure-torch reference on fresh random inputs of
   awkward sizes (bf16, on the GPU);
3. the attention table: QK-RMSNorm + RoPE + attention with each SDPA backend (cuDNN, flash,
   efficient; prologue kernel first) and the Triton kernel with the query prologue fused, at every
   token count, batch 1 and 2; the fastest at the reference counts becomes the backend's attention;
4. per stage network and token count (4,096 SS; 4,377; 17,489; 39,000; 49,152): ms per forward of the
   eager model (batch 1, as upstream), of the backend (batch 1, CUDA graph) and of the backend's CFG
   pair (batch 2), achieved TFLOP/s (nominal FLOPs of pixal3d.md §9.3) against the matmul rate, the
   first-call cost at a new token count, and the relative L2 error of each output against eager;
5. the four sampling stages at the reference token counts with the real sampler settings (12 steps
   each; SS 10 guided + 2, shape 9 + 3, texture 12 unguided): eager (sequential CFG) against the
   backend (batched CFG), wall time and the relative error of each stage's sample.

With `--upstream DIR` (a folder holding upstream's `pixal3d` package, never part of this repository)
the sampling section also runs upstream's own modules, with the same weights, inputs and sampler.

    pixal3d-rt bench --section flows [--upstream DIR] [--section-arg=--quick] [--section-arg=--sections=...] [--out DIR]

Writes DIR/flows_<gpu>.json and DIR/flows_<gpu>.md (benchmarks/flows.md is the recorded H200 run).
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from pixal3d_rt import config as C
from pixal3d_rt.bench_upstream import Upstream, UpstreamFlow
from pixal3d_rt.kernels import flow_kernels as fk
from pixal3d_rt.models.flow_layers import rope_phases
from pixal3d_rt.models.registry import build_model
from pixal3d_rt.models.sparse import SparseTensor
from pixal3d_rt.runtime import cuda_backend
from pixal3d_rt.sampler import FlowEulerGuidanceIntervalSampler

from .common import cuda_time, default_schema_dir, environment, gpu_slug, load_config, peak_memory, rel_err, set_output, write_result
from .eager_baseline import ATTN_FLOP_PER_N2, kernel_profile, randomize_, shell_coords

DEV = "cuda"
GLOBAL_TOKENS = 5
NETWORKS = {  # name -> schema, linear GFLOP per token (pixal3d.md §9.3)
    "ss_flow": ("ss_flow_img_dit_1_3B_64_bf16", 2.454),
    "shape_flow_512": ("slat_flow_img2shape_dit_1_3B_512_bf16", 2.548),
    "shape_flow_1024": ("slat_flow_img2shape_dit_1_3B_1024_bf16", 2.548),
    "tex_flow_1024": ("slat_flow_imgshape2tex_dit_1_3B_1024_bf16", 2.548),
}
FORWARD_CASES = [("ss_flow", 4096), ("shape_flow_512", 4377), ("shape_flow_1024", 17489), ("tex_flow_1024", 17489),
                 ("shape_flow_1024", 39000), ("shape_flow_1024", 49152)]
SAMPLING_STAGES = [("ss", "ss_flow", 4096, "sparse_structure"), ("shape_lr", "shape_flow_512", 4377, "shape_slat"),
                   ("shape_hr", "shape_flow_1024", 17489, "shape_slat"), ("tex", "tex_flow_1024", 17489, "tex_slat")]
ATTN_NS = [4096, 4377, 17489, 39000, 49152]
SAMPLING_REPS = 3  # eager and warm runs per stage (medians reported; every run kept in the JSON)
PROFILE_CASES = [("ss_flow", 4096), ("shape_flow_1024", 17489)]
TRITON_CONFIGS = {"triton_m128n64": {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3},
                  "triton_m128n128": {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 2}}
TARGETS = {"large_n_fraction": 0.70, "small_n_fraction": 0.55, "sampling_s": 7.0, "sampling_speedup": 1.7,
           "rel_err": 3e-2}


def finite(t) -> bool:
    return bool(torch.isfinite(t.float()).all())


class Run:
    """Result dict written after every section, so a run cut short still reports what it measured."""

    def __init__(self, name: str, args):
        self.name = name
        self.data = {"benchmark": "bench_flows", "environment": environment(), "args": vars(args) | {"schema_dir": str(args.schema_dir)},
                     "errors": {}, "targets": TARGETS}

    @contextmanager
    def section(self, key: str):
        t0 = time.perf_counter()
        print(f"--- {key}", flush=True)
        try:
            yield
        except Exception:
            tb = traceback.format_exc()
            print(tb, flush=True)
            self.data["errors"][key] = tb[-4000:]
        finally:
            self.data.setdefault("section_seconds", {})[key] = round(time.perf_counter() - t0, 2)
            self.save()
            gc.collect()
            torch.cuda.empty_cache()

    def save(self):
        write_result(self.name, self.data)


# ---------------------------------------------------------------------------------------------
# 1. matmul rate


def matmul_rate(reps: int) -> dict:
    g = torch.Generator(device=DEV).manual_seed(1)
    n = 8192
    a = torch.randn(n, n, device=DEV, generator=g, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, generator=g, dtype=torch.bfloat16)
    t = cuda_time(lambda: a @ b, warmup=3, reps=reps)
    return {"m=n=k": n, "median_ms": t["median_ms"], "tflops": 2 * n ** 3 / (t["median_ms"] * 1e-3) / 1e12,
            "best_tflops": 2 * n ** 3 / (t["min_ms"] * 1e-3) / 1e12}


# ---------------------------------------------------------------------------------------------
# 2. kernel checks


def kernel_checks() -> dict:
    from pixal3d_rt.kernels import attention_triton as at

    g = torch.Generator(device=DEV).manual_seed(2)
    rnd = lambda *s, dt=torch.bfloat16: torch.randn(*s, device=DEV, generator=g).to(dt)  # noqa: E731
    out = {}
    R, Cc = 1237, 1536
    x, y, gate = rnd(R, Cc), rnd(R, Cc), rnd(Cc)
    sp, sh = (1 + 0.3 * rnd(Cc, dt=torch.float32)).bfloat16(), rnd(Cc)
    w, bb = 1 + 0.1 * rnd(Cc, dt=torch.float32), 0.1 * rnd(Cc, dt=torch.float32)
    for name, kw in {"mod_gate": dict(y=y, gate=gate, norm=fk.NORM_MOD, na=sp, nb=sh),
                     "affine_gate": dict(y=y, gate=gate, norm=fk.NORM_AFFINE, na=w, nb=bb),
                     "vec_mod": dict(vec=gate, norm=fk.NORM_MOD, na=sp, nb=sh),
                     "norm_only": dict(norm=fk.NORM_MOD, na=sp, nb=sh), "gate_only": dict(y=y, gate=gate)}.items():
        xr, hr = fk.residual_norm(x.clone(), use_triton=False, **kw)
        xo = torch.full_like(x, float("nan"))
        ho = torch.full_like(x, float("nan"))
        xt, ht = fk.residual_norm(x.clone(), out_x=xo, h_out=ho if hr is not None else None, use_triton=True, **kw)
        out[f"residual_norm_{name}"] = {"x_rel": rel_err(xt, xr), "x_max_abs": float((xt.float() - xr.float()).abs().max()),
                                        "h_rel": rel_err(ht, hr) if hr is not None else None,
                                        "finite": finite(xt) and (ht is None or finite(ht))}
    xo = torch.full((2 * R, Cc), float("nan"), device=DEV, dtype=torch.bfloat16)
    fk.residual_norm(x, y=y, gate=gate, out_x=xo[:R], out_dup=xo[R:], use_triton=True)
    out["residual_norm_dup"] = {"copies_equal": bool(torch.equal(xo[:R], xo[R:])), "finite": finite(xo)}
    H, D, npos = 12, 128, 613
    qkv = rnd(2 * npos, 3 * Cc)
    ph = rope_phases(shell_coords(16, npos, DEV)[:, 1:], D)
    cos, sin = ph.real.contiguous(), ph.imag.contiguous()
    gq, gk = 1 + 0.1 * rnd(H, D, dt=torch.float32), 1 + 0.1 * rnd(H, D, dt=torch.float32)
    ref = fk.qk_prologue(qkv, cos, sin, gq, gk, H, npos, use_triton=False)
    got = fk.qk_prologue(qkv, cos, sin, gq, gk, H, npos, use_triton=True)
    out["qk_prologue"] = {k: rel_err(a, b) for k, a, b in zip("qkv", got, ref)}
    qc, kc = rnd(R, Cc), rnd(H, GLOBAL_TOKENS, D)
    pr = fk.cross_probs(qc, kc, gq, H, GLOBAL_TOKENS, 64, use_triton=False)
    pt = fk.cross_probs(qc, kc, gq, H, GLOBAL_TOKENS, 64, use_triton=True)
    out["cross_probs"] = {"rel": rel_err(pt, pr), "pad_zero": bool((pt[:, H * GLOBAL_TOKENS:] == 0).all())}
    # attention: Triton (prologue fused) vs the fp32 reference of the same prologue
    q3 = qkv.view(2, npos, 3, H, D)
    _, kn, _ = fk.qk_prologue(qkv, cos, sin, gq, gk, H, npos, do_q=False, do_v=False, use_triton=True)
    kv = kn.view(2, npos, H, D)
    for name, cfg in TRITON_CONFIGS.items():
        o = at.attention(q3[:, :, 0], kv, q3[:, :, 2], prologue=(cos, sin, gq, npos), config=cfg)
        r = at.attention_ref(q3[:, :, 0].float(), kv.float(), q3[:, :, 2].float(), prologue=(cos, sin, gq, npos))
        out[f"attention_{name}"] = {"rel_vs_fp32": rel_err(o, r), "finite": finite(o)}
    qn = ref[0].view(2, npos, H, D).transpose(1, 2)
    r = F.scaled_dot_product_attention(qn.float(), kv.transpose(1, 2).float(), q3[:, :, 2].transpose(1, 2).float())
    out["attention_sdpa_default_rel_vs_fp32"] = rel_err(F.scaled_dot_product_attention(qn, kv.transpose(1, 2), q3[:, :, 2].transpose(1, 2)), r)
    return out


def row_kernel_times(reps: int) -> dict:
    """Each fused row kernel of one block at the 17,489-token count (batch 1 and the CFG pair) against
    its memory floor: the bytes it must move (inputs read once, outputs written once) over the
    device-to-device copy bandwidth measured here."""
    g = torch.Generator(device=DEV).manual_seed(5)
    rnd = lambda *s, dt=torch.bfloat16: torch.randn(*s, device=DEV, generator=g).to(dt)  # noqa: E731
    big = rnd(1 << 28, dt=torch.float32).view(torch.uint8)  # 1 GiB
    dst = torch.empty_like(big)
    t = cuda_time(lambda: dst.copy_(big), warmup=3, reps=reps)
    copy_bw = 2 * big.numel() / (t["median_ms"] * 1e-3)  # bytes read + written per second
    del big, dst
    out = {"copy_bandwidth_gbs": copy_bw / 1e9, "kernels": []}
    Cc, H, D, M = 1536, 12, 128, GLOBAL_TOKENS
    n = 17489
    ph = rope_phases(shell_coords(64, n, DEV)[:, 1:], D)
    cos, sin = ph.real.contiguous(), ph.imag.contiguous()
    gq, gk = 1 + 0.1 * rnd(H, D, dt=torch.float32), 1 + 0.1 * rnd(H, D, dt=torch.float32)
    kc = rnd(H, M, D)
    sp, sh, gate = (1 + 0.3 * rnd(Cc, dt=torch.float32)).bfloat16(), rnd(Cc), rnd(Cc)
    for rows in (n, 2 * n):
        qkv, x, y = rnd(rows, 3 * Cc), rnd(rows, Cc), rnd(rows, Cc)
        q_o, k_o, h_o = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
        p = torch.zeros(rows, 64, device=DEV, dtype=torch.bfloat16)
        cases = {
            "qk_prologue": (lambda: fk.qk_prologue(qkv, cos, sin, gq, gk, H, n, do_v=False, out=(q_o, k_o, None)),
                            rows * 2 * Cc * 2 * 2 + n * D * 4),
            "cross_probs": (lambda: fk.cross_probs(x, kc, gq, H, M, 64, out=p), rows * Cc * 2 + rows * H * M * 2),
            "residual_norm_mod_gate": (lambda: fk.residual_norm(x, y=y, gate=gate, norm=fk.NORM_MOD, na=sp, nb=sh,
                                                                out_x=x, h_out=h_o), rows * Cc * 2 * 4),
        }
        for name, (fn, nbytes) in cases.items():
            t = cuda_time(fn, warmup=3, reps=reps)
            floor_ms = nbytes / copy_bw * 1e3
            out["kernels"].append({"kernel": name, "rows": rows, "median_ms": t["median_ms"], "bytes": nbytes,
                                   "floor_ms": floor_ms, "times_floor": t["median_ms"] / floor_ms})
            print(f"{name} rows {rows}: {t['median_ms']:.3f} ms, floor {floor_ms:.3f} ms "
                  f"({t['median_ms'] / floor_ms:.1f}x)", flush=True)
    return out


def layout_experiments(model_cfg: dict, model, attention: str, reps: int) -> dict:
    """Same-run A/B of layouts at 17,489 tokens: each GEMM of a block through F.linear (weight
    [out, in]) against addmm on a pre-transposed [in, out] weight; cuDNN attention with V read in
    place (row stride 3C) against a contiguous V; and the whole forward with each V layout
    (alternated, so drift between the two shows as spread)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device=DEV).manual_seed(6)
    rnd = lambda *s: torch.randn(*s, device=DEV, generator=g).bfloat16()  # noqa: E731
    M = 17489
    out = {"gemm": [], "attention": [], "forward": []}
    for K, N, gelu in [(1536, 4608, False), (1536, 1536, False), (1536, 8192, True), (8192, 1536, False)]:
        h, w, b = rnd(M, K), rnd(N, K), rnd(N)
        wt = w.t().contiguous()
        fns = {"linear_tn": (lambda: torch._addmm_activation(b, h, w.t(), use_gelu=True)) if gelu else (lambda: F.linear(h, w, b)),
               "addmm_nn": (lambda: torch._addmm_activation(b, h, wt, use_gelu=True)) if gelu else (lambda: torch.addmm(b, h, wt))}
        err = rel_err(fns["addmm_nn"](), fns["linear_tn"]())
        for name, fn in fns.items():
            t = cuda_time(fn, warmup=3, reps=reps)
            out["gemm"].append({"m": M, "k": K, "n": N, "gelu": gelu, "variant": name, "median_ms": t["median_ms"],
                                "tflops": 2 * M * K * N / (t["median_ms"] * 1e-3) / 1e12, "rel_vs_linear": err})
            print(f"gemm {M}x{K}x{N}{' gelu' if gelu else ''} {name}: {t['median_ms']:.3f} ms "
                  f"{out['gemm'][-1]['tflops']:.0f} TF/s", flush=True)
    H, D = 12, 128
    for B in (1, 2):
        qkv = rnd(B * M, 3 * H * D)
        q, k = (qkv[:, i * H * D:(i + 1) * H * D].contiguous().view(B, M, H, D).transpose(1, 2) for i in range(2))
        v_in = qkv[:, 2 * H * D:].view(B, M, H, D).transpose(1, 2)
        v_c = v_in.transpose(1, 2).contiguous().transpose(1, 2)
        for name, v in (("v_in_place", v_in), ("v_contiguous", v_c)):
            def fn(v=v):
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    return F.scaled_dot_product_attention(q, k, v)
            t = cuda_time(fn, warmup=2, reps=reps)
            out["attention"].append({"n": M, "batch": B, "variant": name, "median_ms": t["median_ms"],
                                     "tflops": B * 4 * M * M * H * D / (t["median_ms"] * 1e-3) / 1e12})
            print(f"cudnn n={M} B={B} {name}: {t['median_ms']:.3f} ms", flush=True)
    cfg = make_case(model_cfg, M, 11)
    x, t_in, cond, neg, kw = cfg["x"], cfg["t"], cfg["cond"], cfg["neg"], cfg["kwargs"]
    backs = {v: cuda_backend.wrap_flow(model, {"name": "shape_flow_1024", "attention": attention, "v_copy": v})
             for v in (False, True)}
    ref = feats(backs[False](x, t_in, cond, **kw))
    times = {(v, call): [] for v in backs for call in ("single", "pair")}
    for v, be in backs.items():
        out["forward"].append({"v_copy": v, "rel_vs_v_in_place": rel_err(feats(be(x, t_in, cond, **kw)), ref)})
        be.cfg_pair(x, t_in, cond, neg, **kw)
    for _ in range(2):
        for v, be in backs.items():
            times[(v, "single")].append(cuda_time(lambda: be(x, t_in, cond, **kw), warmup=1, reps=reps)["median_ms"])
            times[(v, "pair")].append(cuda_time(lambda: be.cfg_pair(x, t_in, cond, neg, **kw), warmup=1, reps=reps)["median_ms"])
    for (v, call), ts in times.items():
        out["forward"].append({"v_copy": v, "call": call, "median_ms_runs": ts})
        print(f"forward v_copy={v} {call}: {ts}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# 3. attention table


def attention_table(reps: int, slow_variants_lose: bool = True) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pixal3d_rt.kernels import attention_triton as at

    H, D = 12, 128
    Cc = H * D
    g = torch.Generator(device=DEV).manual_seed(3)
    gq, gk = 1 + 0.1 * torch.randn(H, D, device=DEV, generator=g), 1 + 0.1 * torch.randn(H, D, device=DEV, generator=g)
    rows = []
    for n in ATTN_NS:
        ph = rope_phases(shell_coords(64, n, DEV)[:, 1:], D)
        cos, sin = ph.real.contiguous(), ph.imag.contiguous()
        for B in (1, 2):
            qkv = torch.randn(B * n, 3 * Cc, device=DEV, generator=g).bfloat16()

            def sdpa(backend):
                def fn():
                    q, k, v = fk.qk_prologue(qkv, cos, sin, gq, gk, H, n, use_triton=True)
                    q, k, v = (z.view(B, n, H, D).transpose(1, 2) for z in (q, k, v))
                    with sdpa_kernel(backend):
                        o = F.scaled_dot_product_attention(q, k, v)
                    return o.transpose(1, 2).reshape(B * n, Cc)
                return fn

            def triton(cfg):
                def fn():
                    _, k, _ = fk.qk_prologue(qkv, cos, sin, gq, gk, H, n, do_q=False, do_v=False, use_triton=True)
                    v3 = qkv.view(B, n, 3, H, D)
                    return at.attention(v3[:, :, 0], k.view(B, n, H, D), v3[:, :, 2], prologue=(cos, sin, gq, n),
                                        config=cfg).view(B * n, Cc)
                return fn

            variants = {"cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}
            if n <= 17489 or not slow_variants_lose:
                variants.update({"flash": sdpa(SDPBackend.FLASH_ATTENTION), "efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION)})
            variants.update({k: triton(v) for k, v in TRITON_CONFIGS.items()})
            flop = B * 4 * n * n * Cc
            ref = None
            for name, fn in variants.items():
                row = {"n": n, "batch": B, "variant": name}
                try:
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    o = fn()
                    torch.cuda.synchronize()
                    row["first_call_ms"] = (time.perf_counter() - t0) * 1e3
                    if ref is None:
                        ref = o.float()
                    row["rel_vs_cudnn"] = rel_err(o, ref)
                    row["finite"] = finite(o)
                    del o
                    t = cuda_time(fn, warmup=2, reps=reps)
                    row["median_ms"] = t["median_ms"]
                    row["tflops"] = flop / (t["median_ms"] * 1e-3) / 1e12
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                rows.append(row)
                print(f"attn n={n} B={B} {name}: {row.get('median_ms', float('nan')):.2f} ms "
                      f"{row.get('tflops', 0):.0f} TF/s err {row.get('rel_vs_cudnn', float('nan')):.1e}", flush=True)
            qkv = ref = None  # free before the next size
    # the backend's choice: least time over the reference sampling counts at batch 2
    names = ["cudnn", "flash", "efficient", *TRITON_CONFIGS]
    score = {}
    for name in names:
        ts = [r.get("median_ms") for r in rows if r["variant"] == name and r["batch"] == 2 and r["n"] in (4096, 4377, 17489)]
        ok = all(r.get("finite", False) and r.get("rel_vs_cudnn", 1) < 2e-2 for r in rows if r["variant"] == name)
        if ts and all(t is not None for t in ts) and ok:
            score[name] = sum(ts)
    best = min(score, key=score.get) if score else "cudnn"
    return {"rows": rows, "score_ms_b2_reference_counts": score, "chosen": best}


# ---------------------------------------------------------------------------------------------
# models and inputs


def build(name: str, schema_dir: Path, seed: int):
    cfg = load_config(schema_dir, NETWORKS[name][0])
    with torch.device(DEV):
        model = build_model(cfg)
    model.eval().requires_grad_(False)
    randomize_(model, seed)
    return cfg, model


def nominal_flop(name: str, n: int) -> float:
    return NETWORKS[name][1] * 1e9 * n + ATTN_FLOP_PER_N2 * n * n


def executed_flop(cfg: dict, n: int, pair: bool, width: int = 64) -> float:
    """FLOPs the backend actually runs (exact savings: neg cross-attention and proj products skipped,
    first block's self-attention once per pair, cross to_out folded into [N, 64] x [64, C])."""
    a = cfg["args"]
    c, nb = a["model_channels"], a["num_blocks"]
    hidden = int(c * a["mlp_ratio"])
    selfl, mlp, cross = 8 * c * c, 4 * c * hidden, 2 * c * c + 2 * width * c
    attn = 4 * n * n * c
    if pair:
        return n * ((2 * nb - 1) * selfl + nb * cross + 2 * nb * mlp) + (2 * nb - 1) * attn
    return n * nb * (selfl + cross + mlp) + nb * attn


def make_case(cfg: dict, n: int, seed: int) -> dict:
    """Random inputs (never zeros) of one forward or one sampling stage; neg = the all-zero condition."""
    a = cfg["args"]
    g = torch.Generator(device=DEV).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, device=DEV, generator=g)  # noqa: E731
    cp = a.get("proj_in_channels") or a["cond_channels"]
    glob = rnd(1, GLOBAL_TOKENS, a["cond_channels"])
    case = {"t": torch.tensor([500.0], device=DEV)}
    if cfg["name"] == "SparseStructureFlowModel":
        R = a["resolution"]
        proj = rnd(1, R ** 3, cp)
        case["x"] = rnd(1, a["in_channels"], R, R, R)
        case["cond"] = {"global": glob, "proj": proj}
        case["neg"] = {"global": torch.zeros_like(glob), "proj": torch.zeros_like(proj)}
        case["kwargs"] = {}
    else:
        coords = shell_coords(a["resolution"], n, DEV)
        proj = rnd(n, cp)
        concat = 32 if a["in_channels"] == 64 else 0  # texture flow: noise 32 + shape latent 32
        case["x"] = SparseTensor(rnd(n, a["in_channels"] - concat), coords)
        case["cond"] = {"global": glob, "proj": SparseTensor(proj, coords)}
        case["neg"] = {"global": torch.zeros_like(glob), "proj": SparseTensor(torch.zeros_like(proj), coords)}
        case["kwargs"] = {"concat_cond": SparseTensor(rnd(n, concat), coords)} if concat else {}
    return case


def feats(v):
    return v.feats if isinstance(v, SparseTensor) else v


def host_syncs(fn) -> dict:
    """Run fn once with torch's sync debug mode on: how often (and from which lines) the host waited
    for the GPU. Untimed (warnings cost host time)."""
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(prev)
    where = [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    return {"count": len(where), "where": sorted(set(where))}


def timed_call(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, (time.perf_counter() - t0) * 1e3


# ---------------------------------------------------------------------------------------------
# 4. per-forward


def bench_forward(name: str, cfg, model, n: int, attention: str, rate: float, seed: int, quick: bool,
                  profile: bool = False, lifecycle: bool = False) -> dict:
    reps = 3 if n > 20000 else (5 if n > 5000 else 10)
    if quick:
        reps = 2
    case = make_case(cfg, n, seed)
    x, t, cond, neg, kw = case["x"], case["t"], case["cond"], case["neg"], case["kwargs"]
    flop = nominal_flop(name, n)
    res = {"network": name, "tokens": n, "reps": reps, "flop_nominal": flop, "attention": attention}
    eager_pos = feats(model(x, t, cond, **kw))
    eager_neg = feats(model(x, t, neg, **kw))
    te = cuda_time(lambda: model(x, t, cond, **kw), warmup=1, reps=reps)
    res["eager_ms"] = te["median_ms"]

    backend = cuda_backend.wrap_flow(model, {"name": name, "attention": attention})
    single, res["fast_single_first_call_ms"] = timed_call(lambda: backend(x, t, cond, **kw))
    single2 = backend(x, t, cond, **kw)
    ts = cuda_time(lambda: backend(x, t, cond, **kw), warmup=1, reps=reps)
    res["fast_single_ms"] = ts["median_ms"]
    (pp, pn), res["fast_pair_first_call_ms"] = timed_call(lambda: backend.cfg_pair(x, t, cond, neg, **kw))
    pp2, pn2 = backend.cfg_pair(x, t, cond, neg, **kw)
    tp = cuda_time(lambda: backend.cfg_pair(x, t, cond, neg, **kw), warmup=1, reps=reps)
    res["fast_pair_ms"] = tp["median_ms"]
    mem = peak_memory(lambda: backend.cfg_pair(x, t, cond, neg, **kw))
    res["fast_pair_peak_gb"] = mem["total_peak_bytes"] / 1e9
    res["errors"] = {
        "single_vs_eager": rel_err(feats(single), eager_pos),
        "pair_pos_vs_eager": rel_err(feats(pp), eager_pos),
        "pair_neg_vs_eager": rel_err(feats(pn), eager_neg),
        "graph_replay_vs_first_single": rel_err(feats(single2), feats(single)),
        "graph_replay_vs_first_pair": max(rel_err(feats(pp2), feats(pp)), rel_err(feats(pn2), feats(pn))),
        "finite": all(finite(feats(v)) for v in (single, single2, pp, pn, pp2, pn2)),
    }
    res["backend_stats"] = dict(backend.stats)
    res["gelu_epilogue"] = backend.gelu_epilogue
    if profile:  # kernel time by kind of one forward (no graph, so the profiler names every kernel)
        prof_be = cuda_backend.wrap_flow(model, {"attention": attention, "graphs": False})
        try:
            res["profile_single"] = kernel_profile(lambda: prof_be(x, t, cond, **kw), top=16)
            res["profile_pair"] = kernel_profile(lambda: prof_be.cfg_pair(x, t, cond, neg, **kw), top=16)
        except Exception as e:  # a diagnostic: the timings stand without it
            res["profile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        del prof_be
    if lifecycle:  # a new token count on the same backend: new token state, graphs captured again
        other = make_case(cfg, n - 1376, seed + 1)
        xo, co, no = other["x"], other["cond"], other["neg"]
        s1 = backend(xo, t, co, **other["kwargs"])
        p1, n1 = backend.cfg_pair(xo, t, co, no, **other["kwargs"])
        p2, n2 = backend.cfg_pair(xo, t, co, no, **other["kwargs"])
        res["lifecycle"] = {"tokens": n - 1376, "stats": dict(backend.stats),
                            "single_vs_eager": rel_err(feats(s1), feats(model(xo, t, co, **other["kwargs"]))),
                            "pair_neg_vs_eager": rel_err(feats(n1), feats(model(xo, t, no, **other["kwargs"]))),
                            "replay_vs_first": max(rel_err(feats(p2), feats(p1)), rel_err(feats(n2), feats(n1)))}
    res["eager_tflops"] = flop / (res["eager_ms"] * 1e-3) / 1e12
    res["fast_single_tflops"] = flop / (res["fast_single_ms"] * 1e-3) / 1e12
    res["fast_pair_tflops_per_sample"] = 2 * flop / (res["fast_pair_ms"] * 1e-3) / 1e12
    res["fast_pair_executed_tflops"] = executed_flop(cfg, n, True) / (res["fast_pair_ms"] * 1e-3) / 1e12
    res["fast_single_executed_tflops"] = executed_flop(cfg, n, False) / (res["fast_single_ms"] * 1e-3) / 1e12
    res["fraction_of_matmul"] = {k: res[k] / rate for k in ("eager_tflops", "fast_single_tflops", "fast_pair_tflops_per_sample")}
    res["speedup_single"] = res["eager_ms"] / res["fast_single_ms"]
    res["speedup_pair_vs_two_eager"] = 2 * res["eager_ms"] / res["fast_pair_ms"]
    backend = None  # releases its graphs and buffers
    return res


# ---------------------------------------------------------------------------------------------
# 5. sampling


def bench_sampling(models: dict, attention: str, seed: int, upstream: Upstream | None = None) -> dict:
    sampler = FlowEulerGuidanceIntervalSampler(sigma_min=C.SIGMA_MIN)
    stages = []
    for stage, name, n, key in SAMPLING_STAGES:
        cfg, model = models[name]
        case = make_case(cfg, n, seed + 100)
        params = C.sampler_params(key)
        noise, cond, neg, kw = case["x"], case["cond"], case["neg"], case["kwargs"]
        # repeated (METHOD: medians): eager 3x; cold = 2 fresh backends; warm = the last one 3x more
        eager_ms = []
        for _ in range(SAMPLING_REPS):
            ref, t = timed_call(lambda: sampler.sample(model, noise, cond, neg, **params, **kw))
            eager_ms.append(t)
        up_ms, up_err = [], None
        if upstream is not None:  # upstream's own modules, same weights, inputs and sampler
            up_model = UpstreamFlow(upstream, upstream.build(cfg, model.state_dict(), DEV), dense=cfg["name"] == "SparseStructureFlowModel")
            for _ in range(SAMPLING_REPS):
                up_out, t = timed_call(lambda: sampler.sample(up_model, noise, cond, neg, **params, **kw))
                up_ms.append(t)
            up_err = rel_err(feats(up_out), feats(ref))
            up_model = up_out = None
            gc.collect()
            torch.cuda.empty_cache()
        cold_ms = []
        for _ in range(2):
            backend = None
            gc.collect()
            backend = cuda_backend.wrap_flow(model, {"name": stage, "attention": attention})
            fast, t = timed_call(lambda: sampler.sample(backend, noise, cond, neg, **params, **kw))
            cold_ms.append(t)
        stats_cold = dict(backend.stats)
        # a token count this process has never run (what each new image brings to the sparse stages:
        # attention plans and the like are built again); the SS grid is always 16^3, so it has none
        new_ms = []
        for delta in ((7, 19) if name != "ss_flow" else ()):
            other = make_case(cfg, n + delta, seed + 200 + delta)
            backend = None
            gc.collect()
            backend = cuda_backend.wrap_flow(model, {"name": stage, "attention": attention})
            _, t = timed_call(lambda: sampler.sample(backend, other["x"], other["cond"], other["neg"], **params,
                                                     **other["kwargs"]))
            new_ms.append(t)
            other = None
        backend = None
        gc.collect()
        backend = cuda_backend.wrap_flow(model, {"name": stage, "attention": attention})
        fast, _ = timed_call(lambda: sampler.sample(backend, noise, cond, neg, **params, **kw))  # the warm backend
        warm_ms = []
        for _ in range(SAMPLING_REPS):
            fast2, t = timed_call(lambda: sampler.sample(backend, noise, cond, neg, **params, **kw))
            warm_ms.append(t)
        syncs_warm = host_syncs(lambda: sampler.sample(backend, noise, cond, neg, **params, **kw))
        fresh = cuda_backend.wrap_flow(model, {"name": stage, "attention": attention})
        syncs_cold = host_syncs(lambda: sampler.sample(fresh, noise, cond, neg, **params, **kw))
        fresh = None
        t_e, t_f, t_w = (statistics.median(v) for v in (eager_ms, cold_ms, warm_ms))
        t_new = statistics.median(new_ms) if new_ms else t_f
        row = {"stage": stage, "network": name, "tokens": n, "params": params,
               "eager_s": t_e / 1e3, "fast_s": t_f / 1e3, "fast_warm_s": t_w / 1e3, "fast_new_count_s": t_new / 1e3,
               "fast_new_count_runs_s": [v / 1e3 for v in new_ms],
               "eager_runs_s": [v / 1e3 for v in eager_ms], "fast_cold_runs_s": [v / 1e3 for v in cold_ms],
               "fast_warm_runs_s": [v / 1e3 for v in warm_ms],
               "speedup": t_e / t_f, "rel_err_sample": rel_err(feats(fast), feats(ref)),
               "rel_err_warm_vs_cold": rel_err(feats(fast2), feats(fast)),
               "finite": finite(feats(fast)) and finite(feats(fast2)), "backend_stats_cold": stats_cold,
               "host_syncs": {"cold": syncs_cold, "warm": syncs_warm}}
        if up_ms:
            row.update({"upstream_s": statistics.median(up_ms) / 1e3, "upstream_runs_s": [v / 1e3 for v in up_ms],
                        "rel_err_upstream_vs_eager": up_err, "speedup_vs_upstream": statistics.median(up_ms) / t_f})
        print(f"sampling {stage}: eager {row['eager_s']:.3f} s fast {row['fast_s']:.3f} s (warm {row['fast_warm_s']:.3f}) "
              f"err {row['rel_err_sample']:.2e}", flush=True)
        stages.append(row)
        backend = ref = fast = fast2 = None
        gc.collect()
        torch.cuda.empty_cache()
    tot = {k: sum(r[k] for r in stages) for k in ("eager_s", "fast_s", "fast_warm_s", "fast_new_count_s")}
    tot["speedup"] = tot["eager_s"] / tot["fast_s"]
    if all("upstream_s" in r for r in stages):
        tot["upstream_s"] = sum(r["upstream_s"] for r in stages)
        tot["speedup_vs_upstream"] = tot["upstream_s"] / tot["fast_s"]
    return {"stages": stages, "total": tot, "upstream_in_same_run": upstream is not None}


# ---------------------------------------------------------------------------------------------
# report


def render_markdown(d: dict) -> str:
    env = d["environment"]
    rate = d.get("matmul", {}).get("tflops")
    L = ["# Flow transformers: `cuda` backend vs eager bf16 (`pixal3d-rt bench --section flows`)", "",
         f"{env.get('gpu')} · driver {env.get('driver')} · torch {env.get('torch')} · CUDA {env.get('torch_cuda')} · "
         f"triton {env.get('triton')} · commit {str(env.get('commit'))[:10]} · {env.get('date_utc')}", "",
         "Full-size random weights (bf16 torso, fp32 norms), random inputs, the all-zero unconditional "
         "condition of the pipeline. TFLOP/s use the nominal FLOPs of pixal3d.md §9.3 per sample "
         "(what the eager model computes); the backend executes fewer (exact savings), shown as 'exec'. "
         "All numbers come from one run; ratios compare variants measured in that run.", ""]
    if rate:
        L += [f"Measured bf16 matmul rate (8192³, random data): **{rate:.0f} TFLOP/s**.", ""]
    rk = d.get("row_kernels")
    if rk:
        L += ["## Fused row kernels at 17,489 tokens (one block call) against their memory floor", "",
              f"Floor = bytes moved (inputs once, outputs once) / measured copy bandwidth "
              f"({rk['copy_bandwidth_gbs']:.0f} GB/s, read + write).", "",
              "| kernel | rows | ms | floor ms | × floor |", "|---|---|---|---|---|"]
        for r in rk["kernels"]:
            L.append(f"| {r['kernel']} | {r['rows']:,} | {r['median_ms']:.3f} | {r['floor_ms']:.3f} | {r['times_floor']:.1f} |")
        L.append("")
    at = d.get("attention")
    if at:
        L += ["## Attention (QK-RMSNorm + RoPE prologue + attention, one block call)", "",
              "| N | B | " + " | ".join(v for v in ["cudnn", "flash", "efficient", *TRITON_CONFIGS]) + " |",
              "|---|---|" + "---|" * (3 + len(TRITON_CONFIGS))]
        for n in ATTN_NS:
            for B in (1, 2):
                cells = []
                for v in ["cudnn", "flash", "efficient", *TRITON_CONFIGS]:
                    r = next((r for r in at["rows"] if r["n"] == n and r["batch"] == B and r["variant"] == v), None)
                    if r is None or "median_ms" not in r:
                        cells.append("err" if r else "-")
                    else:
                        cells.append(f"{r['median_ms']:.2f} ms · {r['tflops']:.0f} TF/s")
                L.append(f"| {n:,} | {B} | " + " | ".join(cells) + " |")
        L += ["", f"Chosen for the backend (least batch-2 time summed over 4,096 / 4,377 / 17,489): **{at['chosen']}**.", ""]
    fw = d.get("forward")
    if fw:
        L += ["## One forward", "",
              "| network | N | eager ms | fast B=1 ms | fast pair ms | eager TF/s | fast B=1 TF/s | pair TF/s/sample (exec) | "
              "% matmul (pair) | speed-up B=1 | pair vs 2× eager | first call ms (B=1 / pair) | rel err pos / neg |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in fw:
            if "fast_pair_ms" not in r:
                continue
            e = r["errors"]
            L.append(f"| {r['network']} | {r['tokens']:,} | {r['eager_ms']:.1f} | {r['fast_single_ms']:.1f} | {r['fast_pair_ms']:.1f} | "
                     f"{r['eager_tflops']:.0f} | {r['fast_single_tflops']:.0f} | {r['fast_pair_tflops_per_sample']:.0f} "
                     f"({r['fast_pair_executed_tflops']:.0f}) | {100 * r['fraction_of_matmul']['fast_pair_tflops_per_sample']:.0f}% | "
                     f"{r['speedup_single']:.2f}× | {r['speedup_pair_vs_two_eager']:.2f}× | "
                     f"{r['fast_single_first_call_ms']:.0f} / {r['fast_pair_first_call_ms']:.0f} | "
                     f"{e['pair_pos_vs_eager']:.1e} / {e['pair_neg_vs_eager']:.1e} |")
        L.append("")
    profs = [r for r in (fw or []) if "profile_single" in r]
    if profs:
        L += ["## Where the time goes (kernel time of one forward without a graph, by kind)", "",
              "| network | N | call | total ms | GEMM ms | attention ms | other ms | kernels |", "|---|---|---|---|---|---|---|---|"]
        for r in profs:
            for call in ("single", "pair"):
                pr = r[f"profile_{call}"]
                k = pr["by_kind_ms"]
                L.append(f"| {r['network']} | {r['tokens']:,} | {call} | {pr['kernel_ms_total']:.1f} | {k.get('gemm', 0):.1f} | "
                         f"{k.get('attention', 0):.1f} | {k.get('other', 0):.1f} | {pr['kernel_launches']} |")
        L.append("")
    sm = d.get("sampling")
    if sm:
        L += ["## Sampling at the reference token counts (12 steps per stage, real sampler settings)", "",
              "| stage | N | eager s | fast s (cold) | fast s (warm) | fast s (cold, new N) | speed-up | rel err of the sample "
              "| host syncs cold / warm |", "|---|---|---|---|---|---|---|---|---|"]
        for r in sm["stages"]:
            sy = r.get("host_syncs", {})
            syncs = f"{sy['cold']['count']} / {sy['warm']['count']}" if sy else "-"
            L.append(f"| {r['stage']} | {r['tokens']:,} | {r['eager_s']:.3f} | {r['fast_s']:.3f} | {r['fast_warm_s']:.3f} | "
                     f"{r.get('fast_new_count_s', float('nan')):.3f} | {r['speedup']:.2f}× | {r['rel_err_sample']:.1e} | {syncs} |")
        t = sm["total"]
        L += [f"| **total** | | **{t['eager_s']:.2f}** | **{t['fast_s']:.2f}** | {t['fast_warm_s']:.2f} | "
              f"{t.get('fast_new_count_s', float('nan')):.2f} | **{t['speedup']:.2f}×** | | |", ""]
        if "upstream_s" in t:
            L += ["Upstream's own modules (its `pixal3d` package, same weights, inputs and sampler, sequential CFG), "
                  "in the same run:", "", "| stage | upstream s | our eager s | fast s (cold) | fast vs upstream | "
                  "rel err upstream vs eager |", "|---|---|---|---|---|---|"]
            for r in sm["stages"]:
                L.append(f"| {r['stage']} | {r['upstream_s']:.3f} | {r['eager_s']:.3f} | {r['fast_s']:.3f} | "
                         f"{r['speedup_vs_upstream']:.2f}× | {r['rel_err_upstream_vs_eager']:.1e} |")
            L += [f"| **total** | **{t['upstream_s']:.2f}** | {t['eager_s']:.2f} | {t['fast_s']:.2f} | "
                  f"**{t['speedup_vs_upstream']:.2f}×** | |", ""]
        L += ["'cold' = a fresh backend (condition constants, first forward without a graph, capture); "
              "'warm' = the same backend again (graphs reused, as the SS stage is for every image); "
              "'cold, new N' = a fresh backend at a token count (N+7, N+19) this process never ran, what each new "
              "image costs (the SS grid is always 16³). "
              f"Medians: eager of {SAMPLING_REPS} runs, cold of 2 fresh backends, warm of {SAMPLING_REPS} runs "
              "(every run is in the JSON). Host syncs: how often one sampling run made the host wait for the GPU "
              "(torch's sync debug mode, an extra untimed run).", ""]
    chk = d.get("targets_check")
    if chk:
        L += ["## Targets", ""] + [f"- {k}: {v}" for k, v in chk.items()] + [""]
    if d.get("errors"):
        L += ["## Sections that failed", ""] + [f"- {k}" for k in d["errors"]] + [""]
    return "\n".join(L)


def check_targets(d: dict) -> dict:
    out = {}
    rate = d.get("matmul", {}).get("tflops")
    for r in d.get("forward", []):
        if "fast_pair_ms" not in r or not rate:
            continue
        want = TARGETS["large_n_fraction"] if r["tokens"] >= 17489 else TARGETS["small_n_fraction"]
        got = r["fraction_of_matmul"]["fast_pair_tflops_per_sample"]
        got1 = r["fraction_of_matmul"]["fast_single_tflops"]
        err = max(r["errors"]["single_vs_eager"], r["errors"]["pair_pos_vs_eager"], r["errors"]["pair_neg_vs_eager"])
        out[f"{r['network']}@{r['tokens']}"] = (f"pair {100 * got:.0f}% / B=1 {100 * got1:.0f}% of matmul (target {100 * want:.0f}%): "
                                               f"{'PASS' if got >= want else 'MISS'}; max rel err {err:.1e} "
                                               f"{'PASS' if err <= TARGETS['rel_err'] and r['errors']['finite'] else 'MISS'}")
    sm = d.get("sampling")
    if sm:
        t = sm["total"]
        new_n = t.get("fast_new_count_s")
        out["sampling_time"] = (f"{t['fast_s']:.2f} s cold / {t['fast_warm_s']:.2f} s warm"
                                + (f" / {new_n:.2f} s cold at new token counts" if new_n else "")
                                + f" (target ≤ {TARGETS['sampling_s']} s): "
                                + ("PASS" if max(t["fast_s"], new_n or 0) <= TARGETS["sampling_s"] else "MISS"))
        out["sampling_speedup"] = (f"{t['speedup']:.3f}× cold"
                                   + (f", {t['eager_s'] / new_n:.3f}× cold at new token counts" if new_n else "")
                                   + f" vs eager in the same run (target ≥ {TARGETS['sampling_speedup']}×): "
                                   + ("PASS" if t["speedup"] >= TARGETS["sampling_speedup"] else "MISS"))
        if "upstream_s" in t:
            out["sampling_speedup_vs_upstream"] = (f"{t['speedup_vs_upstream']:.3f}× cold vs upstream's own modules in the "
                                                   f"same run ({t['upstream_s']:.2f} s; not the target's reference, "
                                                   "which is this project's eager path)")
        worst = max(r["rel_err_sample"] for r in sm["stages"])
        out["sampling_error"] = f"max rel err of a stage sample {worst:.1e}; finite: {all(r['finite'] for r in sm['stages'])}"
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="pixal3d-rt bench --section flows", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schema-dir", type=Path, default=default_schema_dir())
    p.add_argument("--out", default="bench-out", help="folder of the result files")
    p.add_argument("--name", default=None, help="result file name (default flows_<gpu>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    p.add_argument("--attention", default=None, help="force the backend's attention instead of the measured choice")
    p.add_argument("--upstream", type=Path, default=None,
                   help="folder holding upstream's `pixal3d` package (never part of this repository): its own "
                        "modules are also timed in the sampling section")
    p.add_argument("--sections", default="matmul,kernels,rowkernels,attention,forward,sampling")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the flows section needs a CUDA GPU")
    set_output(args.out)
    args.name = args.name or f"flows_{gpu_slug()}"
    torch.backends.cuda.matmul.allow_tf32 = False
    want = set(args.sections.split(","))
    run = Run(args.name, args)
    d = run.data
    torch.set_grad_enabled(False)

    if "matmul" in want:
        with run.section("matmul"):
            d["matmul"] = matmul_rate(5 if args.quick else 10)
            print(f"matmul {d['matmul']['tflops']:.0f} TFLOP/s", flush=True)
    rate = d.get("matmul", {}).get("tflops", 754.0)
    if "kernels" in want:
        with run.section("kernels"):
            d["kernel_checks"] = kernel_checks()
            print(d["kernel_checks"], flush=True)
    if "rowkernels" in want:
        with run.section("rowkernels"):
            d["row_kernels"] = row_kernel_times(20)
    attention = args.attention or "cudnn"
    if "attention" in want:
        with run.section("attention"):
            d["attention"] = attention_table(3 if args.quick else 5)
            attention = args.attention or d["attention"]["chosen"]
    d["backend_attention"] = attention

    models = {}
    with run.section("build"):
        for i, name in enumerate(NETWORKS):
            models[name] = build(name, args.schema_dir, args.seed + i)
    def forward_cases(cases):
        for name, n in cases:
            if name not in models:
                continue
            with run.section(f"forward_{name}_{n}"):
                r = bench_forward(name, *models[name], n, attention, rate, args.seed + 7, args.quick,
                                  profile=(name, n) in PROFILE_CASES,
                                  lifecycle=(name, n) == ("shape_flow_512", 4377))
                d["forward"].append(r)
                print(f"{name}@{n}: eager {r['eager_ms']:.1f} fast {r['fast_single_ms']:.1f} pair {r['fast_pair_ms']:.1f} ms "
                      f"({100 * r['fraction_of_matmul']['fast_pair_tflops_per_sample']:.0f}% matmul) err {r['errors']}", flush=True)

    # the reference token counts and the sampling first, the 1536-cascade counts last
    d["forward"] = []
    if "forward" in want:
        forward_cases([c for c in FORWARD_CASES if c[1] <= 17489])
    if "sampling" in want and len(models) == len(NETWORKS):
        with run.section("sampling"):
            d["sampling"] = bench_sampling(models, attention, args.seed,
                                           Upstream(args.upstream) if args.upstream else None)
            d["targets_check"] = check_targets(d)
    if "forward" in want:
        forward_cases([c for c in FORWARD_CASES if c[1] > 17489])
    if "layouts" in want and "shape_flow_1024" in models:
        with run.section("layouts"):
            d["layout_experiments"] = layout_experiments(*models["shape_flow_1024"], attention, 10)
    d["targets_check"] = check_targets(d)
    run.save()
    md = render_markdown(d)
    (Path(args.out) / f"{args.name}.md").write_text(md + "\n")
    print(md, flush=True)


if __name__ == "__main__":
    main()
