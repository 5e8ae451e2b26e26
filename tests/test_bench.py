"""`pixal3d-rt bench`: run the way a user runs it (a fresh process, the tiny preset on the CPU) and
check its files; the per-stage probes (host RSS peak per stage, FLOP and byte counts) on their own."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pixal3d_rt.bench import MemorySampler, NvmlProbe, OpCounter, StageRecorder, roofline

CLI = [shutil.which("pixal3d-rt", path=str(Path(sys.executable).parent)) or shutil.which("pixal3d-rt") or "pixal3d-rt"]
STAGES_1024 = ["preprocess", "dinov3", "ss_flow", "ss_decoder", "shape_lr_cond", "shape_lr_flow", "upsample", "shape_hr_cond",
               "shape_hr_flow", "tex_cond", "tex_flow", "shape_decoder", "mesh_extraction", "tex_decoder", "glb_export"]
GLB_STEPS = {"glb_clean", "glb_simplify", "glb_uv", "glb_bake", "glb_write"}


def _check_type(value, kind, where):
    assert isinstance(value, kind) and not isinstance(value, bool) or kind is bool and isinstance(value, bool), f"{where}: {value!r}"


def _positive(value, where):
    assert isinstance(value, (int, float)) and value > 0, f"{where}: {value!r}"


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(CLI + ["bench", "--preset", "tiny", "--resolution", "1024", "--runs", "2", "--device", "cpu",
                                "--steps", "3", "--out", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


def test_bench_json_has_every_stage_with_positive_times_and_memory(tiny_bench):
    out, _ = tiny_bench
    report = json.loads((out / "bench.json").read_text())
    for key, kind in (("kind", str), ("environment", dict), ("settings", dict), ("resolutions", list)):
        _check_type(report[key], kind, key)
    env = report["environment"]
    for key in ("date_utc", "python", "torch", "device", "commit"):
        assert env.get(key), key
    assert report["settings"]["preset"] == "tiny" and report["settings"]["runs"] == 2
    (part,) = report["resolutions"]
    assert part["resolution"] == 1024 and "error" not in part
    _positive(part["load"]["wall_s"], "load wall_s")
    _positive(part["load"]["host_rss_peak_bytes"], "load host RSS")
    assert [r["kind"] for r in part["runs"]] == ["cold", "warm"]
    for run in part["runs"]:
        names = [r["stage"] for r in run["stages"]]
        assert names == STAGES_1024
        assert GLB_STEPS <= {s["stage"] for s in run["glb_steps"]}
        for r in run["stages"]:
            where = f"run {run['index']} {r['stage']}"
            _positive(r["wall_s"], where + " wall_s")
            _positive(r["host_rss_peak_bytes"], where + " host_rss_peak_bytes")
            for key in ("gpu_s", "torch_peak_allocated_bytes", "nvml_peak_bytes"):  # no GPU in this run
                assert r[key] is None, where + " " + key
        for s in run["glb_steps"]:
            assert s["wall_s"] >= 0 and s["part_of"] == "glb_export"
        _positive(run["total_wall_s"], "total_wall_s")
        assert run["total_wall_s"] >= sum(r["wall_s"] for r in run["stages"][1:])  # stages lie within the run
        for key in ("ss", "shape_lr", "shape_hr", "voxels"):
            _positive(run["tokens"][key], key)
        _positive(run["mesh_faces"], "mesh_faces")
        _positive(run["glb_faces"], "glb_faces")
        assert run["finite"] is True
    assert part["runs"][0]["tokens"] == part["runs"][1]["tokens"]  # same image and seed


def test_bench_markdown_and_charts(tiny_bench):
    out, res = tiny_bench
    md = (out / "bench.md").read_text()
    for stage in STAGES_1024:
        assert f"| {stage} |" in md
    assert "run 0 (cold)" in md and "run 1 (warm)" in md
    for name in ("waterfall.png", "memory.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, name
    assert "bench.json" in res.stdout


def test_bench_refuses_budgets_on_the_cpu(tmp_path):
    res = subprocess.run(CLI + ["bench", "--preset", "tiny", "--device", "cpu", "--vram-budget", "8", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "need a CUDA device" in res.stderr
    assert not (tmp_path / "bench.json").exists()


def test_recorder_takes_the_host_peak_of_each_stage():
    sampler = _sampler()
    rec = StageRecorder("cpu", sampler)
    try:
        rec.stage("big")
        block = bytearray(400 << 20)  # touched pages count in RSS
        block[:: 4096] = b"\x01" * len(block[:: 4096])
        seen = sampler.samples
        while sampler.samples < seen + 3:  # the sampler thread sees RSS only while it holds the GIL
            time.sleep(0.005)
        del block
        rec.stage_done("big", 0.1)
        rec.stage("small")
        rec.stage_done("small", 0.1)
    finally:
        sampler.stop()
    big, small = rec.rows
    assert big["host_rss_peak_bytes"] - small["host_rss_peak_bytes"] > 300 << 20
    assert sampler.samples >= 3


def test_op_counter_counts_matmul_flops_and_bytes():
    a, b = torch.randn(64, 128), torch.randn(128, 32)
    counter = OpCounter([])
    rec = StageRecorder("cpu", _sampler(), counter=counter)
    with counter:
        rec.stage("mm")
        (a @ b).t().contiguous()
        rec.stage_done("mm", 0.01)
    rec.sampler.stop()
    (row,) = rec.rows
    assert row["flops"] == 2 * 64 * 128 * 32
    assert row["bytes_moved"] >= (64 * 128 + 128 * 32 + 2 * 64 * 32) * 4  # inputs, product, its contiguous copy


def _sampler():
    return MemorySampler(NvmlProbe(None))


def test_roofline_takes_the_slower_of_compute_and_memory():
    assert roofline(2e12, 1e9, tflops=100, gbs=1000) == pytest.approx(0.02)
    assert roofline(1e9, 4e9, tflops=100, gbs=1000) == pytest.approx(0.004)
