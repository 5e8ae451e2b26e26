"""Interrupted and concurrent work: `pixal3d-rt infer` and `export` (tiny preset) stopped with SIGINT or
SIGKILL at several points leave the previous file intact or the complete new one; what a killed run
leaves behind (temporary files, `.build-*` folders) is removed by the next run; two runs writing one
output leave one complete file."""
import json
import os
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixal3d_rt.files import sha256_file
from test_first_contact import CLI

PREVIOUS = b"previous asset"


def _image(d: Path) -> Path:
    a = np.zeros((64, 64, 4), np.uint8)
    a[16:48, 16:48] = (200, 120, 60, 255)
    p = d / "in.png"
    Image.fromarray(a).save(p)
    return p


def _complete_glb(p: Path) -> bool:
    data = p.read_bytes()
    return len(data) >= 12 and data[:4] == b"glTF" and struct.unpack("<I", data[8:12])[0] == len(data)


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args, cwd):
    # SIGINT as a terminal's foreground process has it: a test run started in the background of a
    # non-interactive shell would otherwise hand it down ignored, and Ctrl-C would never arrive
    return subprocess.Popen([*CLI, *map(str, args)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=_default_sigint)


def _stop_at(proc, marker: str, sig, watch: Path | None = None) -> str:
    """Read the run's progress lines until one holds `marker`, then send `sig` (with `watch`: once a
    temporary file of that output appears, i.e. inside the write). Returns everything it printed."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            break
    else:  # a renamed stage must not turn the test into an uninterrupted run
        raise AssertionError(f"no progress line holds {marker}:\n{''.join(seen)}")
    if watch is not None:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and not _temps(watch.parent, watch.name):
            time.sleep(0.0005)
    if proc.poll() is None:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return "".join(seen) + err + out


def _temps(folder: Path, name: str) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


INFER_POINTS = [  # (signal, progress line to stop at, stop inside the GLB write)
    (signal.SIGINT, "[dinov3_lr]", False),
    (signal.SIGINT, "[glb_export]", False),
    (signal.SIGINT, "[glb_export]", True),
    (signal.SIGKILL, "[ss_flow]", False),
    (signal.SIGKILL, "[shape_decoder]", False),
    (signal.SIGKILL, "[glb_export]", True),
]


@pytest.mark.parametrize("sig,marker,in_write", INFER_POINTS,
                         ids=[f"{s.name}-{m.strip('[]')}{'-write' if w else ''}" for s, m, w in INFER_POINTS])
def test_interrupted_infer_keeps_the_previous_file(tmp_path, sig, marker, in_write):
    out = tmp_path / "out.glb"
    out.write_bytes(PREVIOUS)
    proc = _start(["infer", "--preset", "tiny", "--image", _image(tmp_path), "--output", out, "--resolution", "512",
                   "--steps", "2"],
                  tmp_path)
    text = _stop_at(proc, marker, sig, watch=out if in_write else None)
    assert out.read_bytes() == PREVIOUS or _complete_glb(out), text
    assert "Traceback" not in text, text
    if proc.returncode == 0:  # only a signal waiting for the write can come too late: then the new file, whole
        assert in_write and _complete_glb(out), text
    elif sig == signal.SIGINT:
        assert proc.returncode == 130 and "error: interrupted" in text, text
        assert out.read_bytes() == PREVIOUS
    else:
        assert proc.returncode == -signal.SIGKILL
    if sig == signal.SIGINT:
        assert _temps(tmp_path, out.name) == []  # an interrupt cleans up after itself


def test_next_run_removes_a_killed_writers_temporary_file_and_concurrent_runs_leave_one_file(tmp_path):
    out = tmp_path / "out.glb"
    out.write_bytes(PREVIOUS)
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = tmp_path / f".out.glb.pid{dead.pid}-abc123.tmp"  # what a writer killed mid-write leaves
    left.write_bytes(b"half a GLB")
    image = _image(tmp_path)
    args = ["infer", "--preset", "tiny", "--image", image, "--output", out, "--resolution", "512", "--steps", "2", "-q",
            "--seed"]
    runs = [_start([*args, seed], tmp_path) for seed in (1, 2)]  # two runs, one output
    results = [(p.wait(timeout=600), p.communicate()) for p in runs]
    assert all(rc == 0 for rc, _ in results), results
    assert _complete_glb(out)
    assert _temps(tmp_path, out.name) == []  # the killed writer's file is gone, and neither run left one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "out.glb"]


EXPORT_POINTS = [
    (signal.SIGINT, "exporting ONNX"),
    (signal.SIGKILL, "exporting ONNX"),
    (signal.SIGKILL, "building tensorrt-rtx engine"),
]


@pytest.mark.parametrize("sig,marker", EXPORT_POINTS, ids=[f"{s.name}-{m.split()[0]}" for s, m in EXPORT_POINTS])
def test_interrupted_export_keeps_the_previous_engine(tiny_engines_dir, tmp_path, sig, marker):
    d = tmp_path / "engines"
    shutil.copytree(tiny_engines_dir, d)
    engine = d / "ss_decoder.engine"
    before = engine.read_bytes()
    args = ["export", "--preset", "tiny", "--out", d, "--only", "ss_decoder"]
    text = _stop_at(_start([*args, "--force"], tmp_path), marker, sig)
    assert "Traceback" not in text, text
    recorded = json.loads((d / "manifest.json").read_text())["networks"]["ss_decoder"]
    assert engine.read_bytes() == before or sha256_file(engine) == recorded["sha256"], text  # old, or the whole new one
    assert sha256_file(engine) == recorded["sha256"]  # and the manifest describes what is there
    if sig == signal.SIGINT:
        assert "error: interrupted" in text, text
        assert not [p.name for p in d.iterdir() if p.name.startswith(".")]
    # the next run finds the engine up to date and removes what a killed run left
    res = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "ss_decoder: up to date" in res.stderr, res.stderr
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "ss_decoder.engine"]
