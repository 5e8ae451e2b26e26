"""Helpers shared by the sections of `pixal3d-rt bench --section`: environment record, CUDA-event
timing, peak-memory probes, result files named by measurement kind and GPU, a plain-text table.

Each section writes `<out>/<kind>_<gpu>.json` (e.g. flows_h200.json): one results file per kind of
measurement and GPU, the layout of benchmarks/results/.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[3]
_OUT = {"dir": Path("bench-out")}


def set_output(out_dir) -> Path:
    """The folder write_result writes to (the section's --out)."""
    _OUT["dir"] = Path(out_dir)
    return _OUT["dir"]


def gpu_slug() -> str:
    """Short name of this process's GPU for file names ("h200", "h100", "rtx4090"), or "cpu"."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    words = [w for w in re.split(r"[\s_-]+", torch.cuda.get_device_name(0).lower()) if w not in ("nvidia", "geforce", "")]
    kept = []
    for w in words:  # the model, up to the memory size / form factor words
        if re.fullmatch(r"\d+gb|hbm\w*|sxm\w*|pcie|nvl|laptop|gpu|mig.*", w):
            break
        kept.append(w)
    return re.sub(r"[^a-z0-9]", "", "".join(kept)) or "gpu"


def default_schema_dir() -> Path:
    """The full-size network configs: $PIXAL3D_GOLDEN/schema, else ../shared/golden/schema."""
    golden = os.environ.get("PIXAL3D_GOLDEN")
    return Path(golden) / "schema" if golden else REPO.parent / "shared" / "golden" / "schema"


def load_config(schema_dir: Path, name: str) -> dict:
    return json.loads((Path(schema_dir) / f"{name}.json").read_text())["config"]


def rel_err(a, b) -> float:
    """‖a − b‖ / ‖b‖ in fp32 (the recorded results' definition)."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


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
    """Write `<out>/<name>.json` (the folder of set_output)."""
    path = _OUT["dir"] / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return [path]


def format_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
