"""Golden parity checker: run every fixture of a directory through this project's networks.

    python -m pixal3d_rt.tools.parity DIR [--only NAME ...] [-v]

A fixture is `<name>.json` + `<name>.safetensors` in the format of ../shared/golden/README.md
(`w.*` weights, `in.*` inputs, `out.*` expected outputs, `mid.*` intermediates). The runner for a
fixture is chosen by its config class name; dimensions come from the fixture's own JSON, so any
directory in that format works, not only the published one. One line per fixture; exit status 1 on
any failure or on a fixture kind this checker cannot run.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

DEFAULT_ATOL, DEFAULT_RTOL = 1e-5, 1e-4


@dataclass
class Fixture:
    name: str
    meta: dict  # the whole JSON
    w: dict  # upstream state_dict (prefix `w.` stripped)
    inp: dict  # `in.*`, prefix stripped
    out: dict  # `out.*`, prefix stripped
    mid: dict  # `mid.*`, prefix stripped

    @property
    def config(self) -> dict:
        return self.meta["config"]


Runner = Callable[[Fixture], dict]  # returns {"out.<key>": tensor, optionally "mid.<key>": tensor}
RUNNERS: dict[str, Runner] = {}
# modules that register runners; imported lazily so the checker itself stays light
RUNNER_MODULES = (
    "pixal3d_rt.tools.parity_flows",
    "pixal3d_rt.tools.parity_decoders",
    "pixal3d_rt.tools.parity_cond",
)


def register(*config_names: str):
    def deco(fn: Runner) -> Runner:
        for n in config_names:
            RUNNERS[n] = fn
        return fn

    return deco


def _load_runners() -> list[str]:
    errors = []
    for m in RUNNER_MODULES:
        try:
            importlib.import_module(m)
        except ModuleNotFoundError as e:  # a runner module not written yet is reported, not fatal
            if e.name == m:
                errors.append(f"{m}: missing")
            else:
                raise
    return errors


def load_fixture(json_path: Path) -> Fixture:
    meta = json.loads(json_path.read_text())
    tensors = load_file(str(json_path.with_suffix(".safetensors")))
    groups = {"w.": {}, "in.": {}, "out.": {}, "mid.": {}}
    for k, v in tensors.items():
        for p, g in groups.items():
            if k.startswith(p):
                g[k[len(p):]] = v
                break
    return Fixture(json_path.stem, meta, groups["w."], groups["in."], groups["out."], groups["mid."])


def _tolerance(meta: dict, key: str) -> tuple[float, float]:
    tol = meta.get("tolerance") or {}
    atol, rtol = DEFAULT_ATOL, DEFAULT_RTOL
    if isinstance(tol.get("atol"), (int, float)):
        atol = float(tol["atol"])
    if isinstance(tol.get("rtol"), (int, float)):
        rtol = float(tol["rtol"])
    leaf = key.split(".")[-1]
    if isinstance(tol.get(leaf), dict):  # per-output override, e.g. fdg_to_mesh "vertices"
        atol = float(tol[leaf].get("atol", atol))
        rtol = float(tol[leaf].get("rtol", rtol))
    return atol, rtol


@dataclass
class Comparison:
    key: str
    ok: bool
    max_abs: float
    max_rel: float
    note: str = ""


def compare(key: str, got: torch.Tensor, want: torch.Tensor, meta: dict) -> Comparison:
    if not isinstance(got, torch.Tensor):
        got = torch.as_tensor(got)
    got = got.detach().cpu()
    if tuple(got.shape) != tuple(want.shape):
        return Comparison(key, False, float("inf"), float("inf"), f"shape {tuple(got.shape)} != {tuple(want.shape)}")
    exact = not want.is_floating_point() and not want.is_complex()
    if exact:
        if got.dtype == torch.bool or want.dtype == torch.bool:
            same = got.to(torch.bool) == want.to(torch.bool)
        else:
            same = got.to(torch.int64) == want.to(torch.int64)
        n_bad = int((~same).sum())
        return Comparison(key, n_bad == 0, float(n_bad), float(n_bad), "exact" + (f", {n_bad} differ" if n_bad else ""))
    g = got.to(torch.float64)
    w = want.to(torch.float64)
    if not torch.isfinite(g).all():
        return Comparison(key, False, float("nan"), float("nan"), "non-finite output")
    diff = (g - w).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    max_rel = float((diff / w.abs().clamp_min(1e-12)).max()) if diff.numel() else 0.0
    atol, rtol = _tolerance(meta, key)
    ok = bool((diff <= atol + rtol * w.abs()).all())
    return Comparison(key, ok, max_abs, max_rel)


def check_fixture(fx: Fixture) -> tuple[bool, list[Comparison], str]:
    name = fx.config.get("name")
    runner = RUNNERS.get(name)
    if runner is None:
        return False, [], f"no runner for fixture kind {name!r}"
    got = runner(fx)
    comps = []
    for k, want in fx.out.items():
        if "out." + k not in got:
            comps.append(Comparison("out." + k, False, float("inf"), float("inf"), "not produced"))
            continue
        comps.append(compare("out." + k, got["out." + k], want, fx.meta))
    for k, v in got.items():  # intermediates a runner chose to check (e.g. the sampler's CFG decisions)
        if k.startswith("mid.") and k[4:] in fx.mid:
            comps.append(compare(k, v, fx.mid[k[4:]], fx.meta))
    ok = bool(comps) and all(c.ok for c in comps)
    return ok, comps, ""


def run_dir(directory: Path, only: list[str] | None = None, verbose: bool = False, stream=sys.stdout) -> int:
    missing = _load_runners()
    for m in missing:
        print(f"warning: runner module {m}", file=sys.stderr)
    paths = sorted(p for p in Path(directory).glob("*.json") if p.with_suffix(".safetensors").exists())
    if only:
        paths = [p for p in paths if p.stem in only]
    if not paths:
        print(f"no fixtures (<name>.json + <name>.safetensors) in {directory}", file=stream)
        return 1
    failures = 0
    torch.set_grad_enabled(False)
    for p in paths:
        try:
            fx = load_fixture(p)
            ok, comps, err = check_fixture(fx)
        except Exception as e:  # one broken fixture must not hide the others
            ok, comps, err = False, [], f"error: {type(e).__name__}: {e}"
        failures += not ok
        max_abs = max((c.max_abs for c in comps), default=float("nan"))
        max_rel = max((c.max_rel for c in comps if not c.note.startswith("exact")), default=0.0)
        line = f"{p.stem:<24} max_abs={max_abs:.3e} max_rel={max_rel:.3e} {'PASS' if ok else 'FAIL'}"
        if err:
            line += f"  ({err})"
        print(line, file=stream)
        for c in comps:
            if verbose or not c.ok:
                print(f"    {c.key:<40} abs={c.max_abs:.3e} rel={c.max_rel:.3e} {'ok' if c.ok else 'FAIL'} {c.note}", file=stream)
    print(f"{len(paths) - failures}/{len(paths)} fixtures pass", file=stream)
    return 1 if failures else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pixal3d_rt.tools.parity", description=__doc__.split("\n\n")[0])
    ap.add_argument("directory", type=Path)
    ap.add_argument("--only", nargs="*", help="fixture names to run")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every compared tensor")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    return run_dir(a.directory, a.only, a.verbose)


if __name__ == "__main__":
    # run the imported module, not this `__main__` copy: runner modules register into its RUNNERS
    from pixal3d_rt.tools import parity as _parity

    sys.exit(_parity.main())
