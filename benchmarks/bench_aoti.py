"""AOTInductor packages (`pixal3d-rt export --target aoti`) against the eager networks, one run.

Per network, in its own subprocess (a package that crashes torch on load is reported, not fatal):
build the network (the tiny preset, or full size with random weights from the golden schemas),
time the eager path at the spec's opt shape (or `--tokens N` for the sparse flows), compile the
package with the export command's own build step, load it, time it, and report its relative error
against eager. The cuda backend's numbers are the flows section's (`pixal3d-rt bench --section flows`); this script answers whether the
aoti target runs on this machine and what it costs there.

    python benchmarks/bench_aoti.py [--preset tiny] [--device cpu|cuda] [--only ss_flow,shape_hr_flow]
                                    [--precision bf16] [--tokens 17489] [--name aoti_h200]

Writes benchmarks/results/<name>.json (and $OUT/<name>.json).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import shutil
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_package, environment, write_result  # noqa: E402

DEFAULT_ONLY = "ss_flow,shape_hr_flow"


def _timed(fn, device: str, reps: int) -> tuple[object, float]:
    """(last output, median ms of `reps` calls after one warm-up), synchronising around each call."""
    import torch

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    out = fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return out, statistics.median(times)


def one(name: str, a) -> None:
    """Child: build, time eager, compile, then load and time the package; RESULT lines on stdout."""
    ensure_package()
    import torch

    from pixal3d_rt import config as C
    from pixal3d_rt.export.aoti_build import aoti_target
    from pixal3d_rt.export.modules import eager_outputs, example_inputs
    from pixal3d_rt.export.onnx_export import relative_errors
    from pixal3d_rt.runtime.specs import build_specs

    if a.preset:
        from pixal3d_rt.export.trt_build import Source

        src = Source.from_preset(a.preset)
        spec = build_specs(src.configs, src.dino_config, src.geometry, only=[name])[0]
        net = src.load(spec, a.precision)
    else:
        from export_full_size import full_size_configs, random_network

        configs, dino = full_size_configs()
        spec = build_specs(configs, dino, C.FULL, only=[name])[0]
        net = random_network(spec, configs, dino, a.precision)
    rec = {"network": name, "precision": a.precision, "device": a.device,
           "parameters": sum(p.numel() for p in net.parameters())}
    dims = dict(spec.profiles[0].dims("opt")) if spec.profiles else {}
    if a.tokens and "N" in dims:
        dims["N"] = a.tokens
    rec["dims"] = dims
    inputs, coords = example_inputs(spec, dims, torch.Generator().manual_seed(0))
    inputs = {k: v.to(a.device) for k, v in inputs.items()}
    coords = coords.to(a.device) if coords is not None else None
    net = net.to(a.device)
    with torch.no_grad():
        ref, rec["eager_ms"] = _timed(lambda: eager_outputs(spec, net, inputs, coords), a.device, a.reps)
    out_name = spec.outputs[0].name
    work = Path(tempfile.mkdtemp(prefix=f"aoti-{name}-"))
    try:  # a full-size package is ~2.6 GB: never left behind in /tmp (a crash in the loader still can)
        target = aoti_target(a.device)
        path, info = target.build(spec, lambda: net, work, lambda msg: print(f"[{name}] {msg}", flush=True))
        del net
        rec.update(info)
        rec["package_bytes"] = path.stat().st_size
        print("RESULT " + json.dumps(rec), flush=True)  # the build stands even if loading crashes
        t0 = time.perf_counter()
        runner = torch._inductor.aoti_load_package(str(path), device_index=0 if a.device == "cuda" else -1)
        rec["load_seconds"] = round(time.perf_counter() - t0, 2)
        args = [inputs[t.name].to(dtype=t.torch_dtype).contiguous() for t in spec.inputs]
        with torch.no_grad():
            got, rec["package_ms"] = _timed(lambda: runner(*args), a.device, a.reps)
        got = got[0] if isinstance(got, (list, tuple)) else got
        rec["errors_vs_eager"] = relative_errors(got.float(), ref[out_name])
        rec["finite"] = bool(torch.isfinite(got).all())
        rec["speedup_vs_eager"] = rec["eager_ms"] / rec["package_ms"]
        print("RESULT " + json.dumps(rec), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["tiny"], default=None, help="the tiny preset instead of full-size random weights")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    ap.add_argument("--only", default=DEFAULT_ONLY)
    ap.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--tokens", type=int, default=None, help="N of the sparse flows (default: the spec's opt)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--timeout", type=int, default=540, help="seconds per network")
    ap.add_argument("--name", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child mode
    a = ap.parse_args()
    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.one:
        one(a.one, a)
        return
    records = []
    for name in a.only.split(","):
        cmd = [sys.executable, __file__, "--one", name, "--device", a.device, "--precision", a.precision,
               "--reps", str(a.reps)] + (["--preset", a.preset] if a.preset else []) + (
               ["--tokens", str(a.tokens)] if a.tokens else [])
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
            stdout, rc, tail = p.stdout, p.returncode, p.stderr.strip().splitlines()[-3:]
        except subprocess.TimeoutExpired as e:
            stdout, rc, tail = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout", []
        results = [json.loads(ln[7:]) for ln in stdout.splitlines() if ln.startswith("RESULT ")]
        rec = results[-1] if results else {"network": name}
        if rc != 0:  # a crash after the build (a signal is a negative return code) keeps the build's record
            rec["failed"] = {"returncode": rc, "stage": "load/run" if results else "build", "stderr_tail": tail}
        rec["wall_seconds"] = round(time.perf_counter() - t0, 1)
        records.append(rec)
        print(json.dumps(rec), flush=True)
    ensure_package()
    import torch

    name = a.name or f"aoti_{a.preset or 'full'}_{a.device}"
    data = {"benchmark": "bench_aoti", "environment": environment(),
            "settings": {k: getattr(a, k) for k in ("preset", "device", "only", "precision", "tokens", "reps")},
            "torch": torch.__version__, "networks": records}
    for path in write_result(name, data):
        print(f"wrote {path}")
    print(f"\n{'network':<15} {'eager ms':>9} {'package ms':>11} {'rel_l2':>9} {'compile s':>10}  status")
    for r in records:
        err = r.get("errors_vs_eager", {}).get("rel_l2")
        status = "ok" if "failed" not in r else f"FAILED at {r['failed']['stage']} (rc {r['failed']['returncode']})"
        print(f"{r['network']:<15} {r.get('eager_ms', float('nan')):9.2f} {r.get('package_ms', float('nan')):11.2f} "
              f"{err if err is not None else float('nan'):9.2e} {r.get('build_seconds', float('nan')):10.1f}  {status}")


if __name__ == "__main__":
    main()
