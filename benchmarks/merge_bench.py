"""Merge `pixal3d-rt bench` reports of one GPU (one resolution per device call) into the results
files: benchmarks/results/bench_<preset>_<gpu>.{json,md} and its two charts.

    python benchmarks/merge_bench.py OUT_PREFIX bench_512/bench.json bench_1024/bench.json ...

Each resolution keeps the commit and environment of the run that measured it. Paths inside the
checkout that ran it (the example image) are written relative to it, so no machine's path is kept.
"""
import json
import shutil
import sys
import tempfile
from pathlib import Path

from pixal3d_rt.bench import write_report


REPO = Path(__file__).resolve().parents[1]


def _relative(x, root: str):
    """Strings under `root` made relative to it, through dicts and lists."""
    if isinstance(x, dict):
        return {k: _relative(v, root) for k, v in x.items()}
    if isinstance(x, list):
        return [_relative(v, root) for v in x]
    return x[len(root):] if isinstance(x, str) and x.startswith(root) else x


def merge(reports: list, root: Path = REPO) -> dict:
    merged = json.loads(json.dumps(reports[0]))
    merged["resolutions"] = []
    budgets, profiles = set(), []
    for r in reports:
        for part in r["resolutions"]:
            part["run_environment"] = {k: r["environment"].get(k) for k in ("commit", "date_utc", "torch", "gpu", "driver")}
            merged["resolutions"].append(part)
        budgets.update(r["settings"].get("budgets_gib") or [])
        profiles += [p for p in r["settings"].get("gpu_profiles") or [] if p not in profiles]
    merged["resolutions"].sort(key=lambda p: p["resolution"])
    merged["settings"]["resolutions"] = [p["resolution"] for p in merged["resolutions"]]
    merged["settings"]["budgets_gib"] = sorted(budgets, reverse=True)
    merged["settings"]["gpu_profiles"] = profiles
    merged["environment"]["commit"] = "(below)"  # each resolution: resolutions[].run_environment
    return _relative(merged, str(root) + "/")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    prefix, paths = Path(argv[0]), argv[1:]
    report = merge([json.loads(Path(p).read_text()) for p in paths])
    with tempfile.TemporaryDirectory() as tmp:
        write_report(report, Path(tmp))
        for name in ("bench.json", "bench.md", "waterfall.png", "memory.png"):
            src = Path(tmp) / name
            if src.is_file():
                stem, ext = name.split(".")
                dst = prefix.with_name(prefix.name + ("" if stem == "bench" else "_" + stem) + "." + ext)
                shutil.copyfile(src, dst)
                print(dst)


if __name__ == "__main__":
    main()
