"""Shared helpers of the benchmark scripts: package import, environment record, CUDA-event timing,
peak-memory probes, result JSON and a plain-text table.

Every benchmark writes `benchmarks/results/<name>.json` (DESIGN.md §8) and, when `$OUT` is set (the
lent GPU machine), a copy under `$OUT` so that it comes back from the run.
"""
from __future__ import annotations

import datetime
import importlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# setup.py maps these folders into the one package `pixal3d_rt` (DESIGN.md §2)
_PACKAGE_ROOTS = {
    "pixal3d_rt": REPO / "python" / "pixal3d_rt",
    "pixal3d_rt.runtime": REPO / "runtime",
    "pixal3d_rt.kernels": REPO / "kernels",
    "pixal3d_rt.export": REPO / "export",
}


def ensure_package() -> None:
    """Make `import pixal3d_rt` work from this checkout even where it is not pip-installed.

    An installed package is used as is; otherwise the folders are mapped into the package the way
    setup.py maps them, by loading each root's `__init__.py` under its package name.
    """
    try:
        importlib.import_module("pixal3d_rt")
        return
    except ImportError:
        pass
    for name, root in _PACKAGE_ROOTS.items():
        init = root / "__init__.py"
        if name in sys.modules or not init.exists():
            continue
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        if "." in name:
            parent, child = name.rsplit(".", 1)
            setattr(sys.modules[parent], child, module)


def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> dict:
    """Commit of the checkout. `PIXAL3D_COMMIT`, when set, wins: the GPU machine's copy carries the
    working tree of the current commit but a .git of the session's first commit."""
    if os.environ.get("PIXAL3D_COMMIT"):
        return {"commit": os.environ["PIXAL3D_COMMIT"], "source": "PIXAL3D_COMMIT"}
    sha = _run(["git", "rev-parse", "HEAD"])
    if sha:
        status = _run(["git", "status", "--porcelain", "--untracked-files=no"]) or ""
        return {"commit": sha, "tracked_files_modified": len(status.splitlines()), "source": "git"}
    return {"commit": None, "source": "unknown"}


def environment() -> dict:
    """GPU, driver and library versions of this process."""
    import torch

    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        **git_commit(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update({
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "sm_count": props.multi_processor_count,
            "compute_capability": f"{props.major}.{props.minor}",
        })
        smi = _run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"])
        if smi:
            driver, max_sm, power = (s.strip() for s in smi.splitlines()[0].split(","))
            env.update({"driver": driver, "max_sm_clock": max_sm, "power_limit": power})
        env["sdpa_backends_enabled"] = {
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
            "math": torch.backends.cuda.math_sdp_enabled(),
        }
        env["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return env


def cuda_call_times(fn: Callable[[], object], reps: int) -> list[float]:
    """Milliseconds of each of `reps` back-to-back calls of `fn`, from CUDA events around each call."""
    import torch

    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events]


def cuda_time(fn: Callable[[], object], warmup: int = 3, reps: int = 10) -> dict:
    """Milliseconds per call of `fn`, from CUDA events around each call after `warmup` calls."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return summarize_ms(cuda_call_times(fn, reps))


def summarize_ms(times: list[float]) -> dict:
    times = sorted(times)
    median = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {
        "median_ms": median,
        "min_ms": times[0],
        "max_ms": times[-1],
        "iqr_ms": q[2] - q[0],
        "spread_pct": 100.0 * (times[-1] - times[0]) / median,  # (max - min) / median
        "reps": len(times),
        "all_ms": times,
    }


def peak_memory(fn: Callable[[], object]) -> dict:
    """Peak CUDA memory allocated by PyTorch during one call of `fn` (bytes).

    `total_peak` counts everything resident (weights, inputs, caches) plus the call's transients;
    `call_peak` is the part above what was allocated just before the call.
    """
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"total_peak_bytes": peak, "resident_before_bytes": before, "call_peak_bytes": peak - before}


def module_bytes(module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def gb(n_bytes: float) -> float:
    return round(n_bytes / 1e9, 3)


def write_result(name: str, data: dict) -> list[Path]:
    """Write `benchmarks/results/<name>.json` (and `$OUT/<name>.json` when `$OUT` is set)."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    paths = [RESULTS / f"{name}.json"]
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]) / f"{name}.json")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return paths


def format_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
