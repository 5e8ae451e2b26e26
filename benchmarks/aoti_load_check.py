"""Does loading an AOTInductor package work on this machine's torch, and which way? (issue 4, item 3)

A two-layer MLP, compiled and loaded in separate child processes (a segfault kills only the child;
faulthandler prints where), several ways:

  package_cpu / package_cuda   aoti_compile_and_package, then aoti_load_package in a fresh process
  same_process_cuda            compile and load in one process
  loader_direct_cuda           torch._C._aoti.AOTIModelPackageLoader on the package (what
                               aoti_load_package wraps), single-threaded runner
  no_weights_cuda              the package compiled with weights left out of the .so
                               (aot_inductor.package_constants_in_so=False), loaded with load_constants

    python benchmarks/aoti_load_check.py [--name aoti_load_check_h200]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_result  # noqa: E402

VARIANTS = ["package_cpu", "package_cuda", "same_process_cuda", "loader_direct_cuda", "no_weights_cuda"]


def _model(device):
    import torch

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32)).to(device).eval()
    x = torch.randn(7, 64, device=device)
    return m, x


def compile_step(variant: str, path: Path) -> None:
    import torch

    device = "cpu" if variant.endswith("_cpu") else "cuda"
    m, x = _model(device)
    ep = torch.export.export(m, (x,))
    opts = {"aot_inductor.package_constants_in_so": False} if variant == "no_weights_cuda" else {}
    torch._inductor.aoti_compile_and_package(ep, package_path=str(path), inductor_configs=opts)
    torch.save({"x": x.cpu(), "y": m(x).detach().cpu()}, str(path) + ".io")


def load_step(variant: str, path: Path) -> dict:
    import torch

    device = "cpu" if variant.endswith("_cpu") else "cuda"
    io = torch.load(str(path) + ".io")
    x = io["x"].to(device)
    if variant == "loader_direct_cuda":
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", True, 1, -1)
        flat = loader.run([x])
        y = flat[0]
    elif variant == "no_weights_cuda":
        runner = torch._inductor.aoti_load_package(str(path))
        m, _ = _model(device)
        runner.load_constants({k: v for k, v in m.state_dict().items()}, check_full_update=True, user_managed=False)
        y = runner(x)
    else:
        runner = torch._inductor.aoti_load_package(str(path))
        y = runner(x)
    err = float((y.cpu() - io["y"]).norm() / io["y"].norm())
    return {"rel_err": err}


def child(variant: str, step: str, path: Path, out: Path) -> None:
    import faulthandler

    faulthandler.enable()
    if step == "compile":
        compile_step(variant, path)
        out.write_text(json.dumps({"ok": True}))
    elif step == "load":
        out.write_text(json.dumps({"ok": True, **load_step(variant, path)}))
    else:  # both in one process
        compile_step(variant, path)
        out.write_text(json.dumps({"ok": True, **load_step(variant.replace("same_process", "package"), path)}))


def run_child(variant, step, path, tmp) -> dict:
    out = Path(tmp) / f"{variant}_{step}.json"
    r = subprocess.run([sys.executable, __file__, "--child", variant, "--step", step, "--path", str(path), "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    res = json.loads(out.read_text()) if out.exists() else {"ok": False}
    res["returncode"] = r.returncode
    if r.returncode != 0:
        res["stderr_tail"] = r.stderr[-1500:]
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="aoti_load_check_h200")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)
    p.add_argument("--path", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.step, args.path, args.out)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in VARIANTS:
            path = Path(tmp) / f"{v}.pt2"
            if v == "same_process_cuda":
                results[v] = {"compile_and_load": run_child(v, "both", path, tmp)}
            else:
                results[v] = {"compile": run_child(v, "compile", path, tmp)}
                if results[v]["compile"].get("ok"):
                    results[v]["load"] = run_child(v, "load", path, tmp)
            print(v, json.dumps(results[v])[:600], flush=True)
    write_result(args.name, {"benchmark": "aoti_load_check", "environment": environment(), "variants": results})
    for v, r in results.items():
        last = r.get("load") or r.get("compile_and_load") or r.get("compile")
        print(f"{v:20s} rc={last.get('returncode')} ok={last.get('ok')} err={last.get('rel_err')}")


if __name__ == "__main__":
    main()
