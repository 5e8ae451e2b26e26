"""Which cuDNN attention engine is fastest for the flow transformers' self-attention
(`pixal3d-rt bench --section attention_engines`).

torch's cuDNN SDPA builds one plan per shape with heuristics mode A and runs the first plan it gets.
This script asks the cuDNN frontend (pip `nvidia-cudnn-frontend`, when installed) for every plan of
the same bf16 attention (heuristics A, B and fallback), times each one, checks each against torch's
cuDNN output, and compares: torch SDPA cuDNN with BSHD inputs (the backend's layout) and with BHSD
inputs, flash, and every frontend plan. All in one process, medians of CUDA-event timings.

    pixal3d-rt bench --section attention_engines [--out DIR]        (writes DIR/attention_engines_<gpu>.json)
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .common import cuda_time, environment, gpu_slug, rel_err, set_output, write_result

CASES = [(4377, 1), (4377, 2), (17489, 1), (17489, 2)]
H, D = 12, 128  # the 1.3B flows: 1536 channels, 12 heads


def tflops(n: int, b: int, ms: float) -> float:
    return 4 * b * H * n * n * D / (ms * 1e-3) / 1e12


def frontend_plans(q, k, v, reps: int) -> list[dict]:
    import cudnn

    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    o = torch.empty_like(q)
    graph = cudnn.pygraph(io_data_type=cudnn.data_type.BFLOAT16, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=handle)
    tq, tk, tv = (graph.tensor_like(t) for t in (q, k, v))
    try:
        to, _ = graph.sdpa(name="sdpa", q=tq, k=tk, v=tv, generate_stats=False, attn_scale=D ** -0.5)
    except TypeError:  # older frontends name the flag is_inference
        to, _ = graph.sdpa(name="sdpa", q=tq, k=tk, v=tv, is_inference=True, attn_scale=D ** -0.5)
    to.set_output(True).set_dim(list(o.shape)).set_stride(list(o.stride()))
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans(cudnn.build_plan_policy.ALL)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        ref = F.scaled_dot_product_attention(q, k, v)
    out = []
    for i in range(graph.get_execution_plan_count()):
        row = {"index": i}
        try:
            row["name"] = graph.get_plan_name_at_index(i)
        except Exception:
            row["name"] = f"plan {i}"
        try:
            ws = torch.empty(max(int(graph.get_workspace_size_plan_at_index(i)), 1), device="cuda", dtype=torch.uint8)
            pack = {tq: q, tk: k, tv: v, to: o}
            o.fill_(float("nan"))

            def fn(i=i, ws=ws, pack=pack):
                graph.execute_plan_at_index(pack, ws, index=i, handle=handle)
            fn()
            torch.cuda.synchronize()
            row["rel_err_vs_torch_cudnn"] = rel_err(o, ref)
            row["ms"] = cuda_time(fn, warmup=2, reps=reps)["median_ms"]
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        out.append(row)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="pixal3d-rt bench --section attention_engines", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-out", help="folder of the result file")
    p.add_argument("--name", default=None, help="result file name (default attention_engines_<gpu>)")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the attention_engines section needs a CUDA GPU")
    set_output(args.out)
    args.name = args.name or f"attention_engines_{gpu_slug()}"
    torch.set_grad_enabled(False)
    data = {"benchmark": "attention_engines", "environment": environment(), "heads": H, "head_dim": D, "cases": []}
    try:
        import cudnn

        data["cudnn_frontend"] = getattr(cudnn, "__version__", "?")
        data["cudnn_backend"] = cudnn.backend_version() if hasattr(cudnn, "backend_version") else None
    except Exception as e:
        data["cudnn_frontend"] = f"not available: {type(e).__name__}: {e}"
    data["torch_cudnn"] = torch.backends.cudnn.version()
    lines = []
    for n, b in CASES:
        g = torch.Generator(device="cuda").manual_seed(n + b)
        bshd = [torch.randn(b, n, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]
        q, k, v = (t.transpose(1, 2) for t in bshd)  # [B, H, N, D] views of BSHD storage
        qh, kh, vh = (t.contiguous() for t in (q, k, v))  # BHSD storage
        case = {"tokens": n, "batch": b, "variants": {}}

        def sdpa(backend, args_):
            def fn():
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(*args_)
            return fn
        for name, fn in (("torch_cudnn_bshd", sdpa(SDPBackend.CUDNN_ATTENTION, (q, k, v))),
                         ("torch_cudnn_bhsd", sdpa(SDPBackend.CUDNN_ATTENTION, (qh, kh, vh))),
                         ("torch_flash_bshd", sdpa(SDPBackend.FLASH_ATTENTION, (q, k, v)))):
            try:
                ms = cuda_time(fn, warmup=2, reps=args.reps)["median_ms"]
                case["variants"][name] = {"ms": ms, "tflops": tflops(n, b, ms)}
            except Exception as e:
                case["variants"][name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        for layout, args_ in (("bshd", (q, k, v)), ("bhsd", (qh, kh, vh))):
            try:
                plans = frontend_plans(*args_, reps=args.reps)
            except Exception as e:
                plans = [{"error": f"{type(e).__name__}: {str(e)[:300]}"}]
            for r in plans:
                if "ms" in r:
                    r["tflops"] = tflops(n, b, r["ms"])
            case[f"frontend_plans_{layout}"] = plans
        data["cases"].append(case)
        base = case["variants"]["torch_cudnn_bshd"].get("ms", float("nan"))
        best = min((r for lay in ("bshd", "bhsd") for r in case[f"frontend_plans_{lay}"] if "ms" in r and r.get("rel_err_vs_torch_cudnn", 1) < 1e-2),
                   key=lambda r: r["ms"], default=None)
        lines.append(f"N={n:6d} B={b}: torch cudnn bshd {base:.3f} ms ({tflops(n, b, base):.0f} TF/s), "
                     f"bhsd {case['variants']['torch_cudnn_bhsd'].get('ms', float('nan')):.3f}, "
                     f"flash {case['variants']['torch_flash_bshd'].get('ms', float('nan')):.3f}; "
                     + (f"best frontend plan {best['name']} {best['ms']:.3f} ms ({best['tflops']:.0f} TF/s, "
                        f"{base / best['ms']:.3f}x)" if best else "no frontend plan"))
        print(lines[-1], flush=True)
        for lay in ("bshd", "bhsd"):
            for r in case[f"frontend_plans_{lay}"]:
                print(f"   {lay} {r}", flush=True)
    write_result(args.name, data)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
