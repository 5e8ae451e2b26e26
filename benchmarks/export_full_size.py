"""Full-size ONNX export (and TensorRT-RTX engine build) of every export spec, on the CPU.

Random weights at the real sizes (configs from ../shared/golden/schema), built on the meta device
and materialised on the CPU one network at a time, in the export precision (bf16 by default), so a
1.4 B-parameter flow holds 2.8 GB. Each network runs in its own subprocess: its peak host memory
is measured alone and everything is freed before the next one. Records per network: parameters,
ONNX size, export time, onnx.checker, engine size and build time, peak RSS.

    python benchmarks/export_full_size.py [--precision bf16] [--only ss_flow,...] [--no-engine] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, default_schema_dir, ensure_package, environment, load_config, write_result  # noqa: E402

SCHEMA = default_schema_dir()
SCHEMA_FILES = {  # pipeline key -> schema file
    "sparse_structure_flow_model": "ss_flow_img_dit_1_3B_64_bf16",
    "sparse_structure_decoder": "ss_dec_conv3d_16l8_fp16",
    "shape_slat_flow_model_512": "slat_flow_img2shape_dit_1_3B_512_bf16",
    "shape_slat_flow_model_1024": "slat_flow_img2shape_dit_1_3B_1024_bf16",
    "tex_slat_flow_model_1024": "slat_flow_imgshape2tex_dit_1_3B_1024_bf16",
}


def full_size_configs() -> tuple[dict, dict]:
    configs = {k: load_config(SCHEMA, f) for k, f in SCHEMA_FILES.items()}
    dino = load_config(SCHEMA, "dinov3_vitl16")["args"]
    return configs, dino


def random_network(spec, configs: dict, dino_config: dict, precision: str):
    """The spec's network at full size with random weights, in the export precision."""
    import torch

    from pixal3d_rt.checkpoints import compute_config
    from pixal3d_rt.export.trt_build import FLOW_DTYPE, set_precision
    from pixal3d_rt.models.flow_layers import rope_phases
    from pixal3d_rt.models.registry import build_model

    gen = torch.Generator().manual_seed(0)
    if spec.kind == "dinov3":
        from pixal3d_rt.models.dinov3 import build_dinov3

        return set_precision(spec, build_dinov3(dino_config), precision)
    cfg = configs[spec.model_key]
    dtype = FLOW_DTYPE[precision] if spec.kind != "ss_decoder" else ("float32" if precision == "fp32" else "float16")
    with torch.device("meta"):
        net = build_model(compute_config(cfg, dtype))
    net = net.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=gen)
            elif "norm" in name or name.endswith("gamma"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        if hasattr(net, "rope_phases"):  # a checkpoint buffer: recompute what the checkpoint holds
            R = net.resolution
            r = torch.arange(R)
            grid = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)
            net.rope_phases.copy_(rope_phases(grid, net.head_dim, net.rope_freq))
    return net.eval()


def one(name: str, precision: str, build_engine_too: bool, keep: str | None, max_tokens: int | None) -> dict:
    ensure_package()
    import torch

    from pixal3d_rt import config as C
    from pixal3d_rt.export.onnx_export import export_onnx, param_bytes
    from pixal3d_rt.runtime.specs import build_specs
    from pixal3d_rt.export.trt_build import RTX_COMPUTE_CAPABILITIES, build_engine, trt_module

    torch.set_num_threads(os.cpu_count() or 1)
    configs, dino = full_size_configs()
    spec = build_specs(configs, dino, C.FULL, max_tokens=max_tokens, only=[name])[0]
    rec = {"network": name, "model_key": spec.model_key, "precision": precision,
           "profiles": [{"name": p.name, "axes": p.axes} for p in spec.profiles]}
    t0 = time.perf_counter()
    net = random_network(spec, configs, dino, precision)
    rec["materialise_seconds"] = round(time.perf_counter() - t0, 1)
    rec["parameters"] = sum(p.numel() for p in net.parameters())
    rec["weight_bytes"] = param_bytes(net)
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix=f"export-{name}-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        path = work / f"{name}.onnx"
        info = export_onnx(spec, net, path, external_data=True)
        rec.update({"onnx_bytes": info["bytes"], "onnx_export_seconds": info["seconds"], "onnx_checker": "pass"})
        del net
        import gc

        gc.collect()
        rec["peak_rss_bytes_after_export"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if build_engine_too:
            trt = trt_module("tensorrt-rtx")
            t0 = time.perf_counter()
            plan = build_engine(trt, path, spec, "tensorrt-rtx", RTX_COMPUTE_CAPABILITIES)
            rec["engine_build_seconds"] = round(time.perf_counter() - t0, 1)
            rec["engine_bytes"] = plan.nbytes
            rec["tensorrt_rtx_version"] = trt.__version__
            rec["compute_capabilities"] = list(RTX_COMPUTE_CAPABILITIES)
            if keep:
                (work / f"{name}.engine").write_bytes(memoryview(plan))
            del plan
        rec["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--only", default=None, help="comma-separated spec names")
    ap.add_argument("--no-engine", action="store_true")
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--keep", default=None, help="keep ONNX/engines under this folder")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--name", default="export_full_size")
    ap.add_argument("--merge", action="store_true", help="keep the records of other networks already in the results file")
    a = ap.parse_args()
    if a.one:
        rec = one(a.one, a.precision, not a.no_engine, a.keep and str(Path(a.keep) / a.one), a.max_tokens)
        print("RESULT " + json.dumps(rec))
        return
    from pixal3d_rt.runtime.specs import SPEC_NAMES

    names = a.only.split(",") if a.only else list(SPEC_NAMES)
    records = []
    for n in names:
        cmd = [sys.executable, __file__, "--one", n, "--precision", a.precision]
        if a.no_engine:
            cmd.append("--no-engine")
        if a.keep:
            cmd += ["--keep", a.keep]
        if a.max_tokens:
            cmd += ["--max-tokens", str(a.max_tokens)]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if p.returncode or not line:
            rec = {"network": n, "error": (p.stderr.strip().splitlines() or ["?"])[-1], "returncode": p.returncode}
        else:
            rec = json.loads(line[-1][7:])
        rec["wall_seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(rec), flush=True)
        records.append(rec)
    ensure_package()
    old_file = REPO / "benchmarks" / "results" / f"{a.name}.json"
    if a.merge and old_file.is_file():  # networks measured in an earlier run (each run holds its own environment)
        done = {r["network"] for r in records}
        earlier = json.loads(old_file.read_text())
        for r in earlier.get("networks", []):
            if r["network"] not in done:
                records.append(r | {"environment_of_run": "earlier run: " + earlier["environment"].get("date_utc", "?")})
        order = {n: i for i, n in enumerate(SPEC_NAMES)}
        records.sort(key=lambda r: order.get(r["network"], 99))
    data = {"benchmark": "export_full_size", "description": __doc__.strip().splitlines()[0],
            "environment": environment(), "precision": a.precision, "networks": records}
    for p in write_result(a.name, data):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
