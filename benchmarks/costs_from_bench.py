"""Stage costs measured by a `pixal3d-rt bench` run beside the planner's (runtime/stage_costs.py):
per stage of the warm unbudgeted run, the torch bytes it allocated above what was live at its start
and its seconds, per unit of the count it scales with, against the cost table's prediction.

    python benchmarks/costs_from_bench.py BENCH.json [--resolution 1024] [--json OUT.json]
"""
import argparse
import json
from pathlib import Path

from pixal3d_rt.runtime.stage_costs import H200_COSTS
from pixal3d_rt.runtime.stages import BY_NAME


def measured_costs(part: dict) -> list[dict]:
    warm = [r for r in part["runs"] if r.get("kind") == "warm"] or part["runs"]
    run = warm[-1]
    tokens = run["tokens"]
    rows = []
    for r in run["stages"]:
        st = BY_NAME.get(r["stage"])
        if st is None or r.get("torch_start_allocated_bytes") is None:
            continue
        n = tokens.get(st.tokens) if st.tokens else None
        own = r["torch_peak_allocated_bytes"] - r["torch_start_allocated_bytes"]
        c = H200_COSTS.get(st.name)
        predicted = None
        if c is not None and n:
            predicted = c.transient_fixed + c.transient_per_unit * n
        rows.append({"stage": st.name, "units": n, "transient_bytes": own, "seconds": r["wall_s"],
                     "bytes_per_unit": own / n if n else None, "predicted_transient_bytes": predicted,
                     "predicted_s": None if c is None or not n else
                     c.seconds_fixed + c.seconds_per_unit * n + c.seconds_per_unit2 * n * n})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("bench", type=Path)
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    report = json.loads(a.bench.read_text())
    out = {}
    for part in report["resolutions"]:
        if a.resolution and part["resolution"] != a.resolution:
            continue
        rows = measured_costs(part)
        out[part["resolution"]] = rows
        print(f"resolution {part['resolution']}")
        print(f"{'stage':18s} {'units':>10s} {'own GB':>8s} {'pred GB':>8s} {'B/unit':>9s} {'s':>7s} {'pred s':>7s}")
        for r in rows:
            pred = "" if r["predicted_transient_bytes"] is None else f"{r['predicted_transient_bytes'] / 1e9:8.2f}"
            per = "" if r["bytes_per_unit"] is None else f"{r['bytes_per_unit']:9.0f}"
            ps = "" if r["predicted_s"] is None else f"{r['predicted_s']:7.3f}"
            print(f"{r['stage']:18s} {r['units'] or '':>10} {r['transient_bytes'] / 1e9:8.2f} {pred:>8s} {per:>9s} "
                  f"{r['seconds']:7.3f} {ps:>7s}")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
