"""`python -m pixal3d_rt.tools.parity DIR` on the golden fixtures, and on directories it must fail."""
import json
import shutil
import subprocess
import sys

from safetensors.torch import load_file, save_file

from golden_fixtures import GOLDEN


def _parity(*args):
    return subprocess.run([sys.executable, "-m", "pixal3d_rt.tools.parity", *map(str, args)], capture_output=True, text=True, timeout=900)


def test_every_golden_fixture_passes():
    res = _parity(GOLDEN)
    assert res.returncode == 0, res.stdout + res.stderr
    names = sorted(p.stem for p in GOLDEN.glob("*.json") if p.with_suffix(".safetensors").exists())
    lines = [l for l in res.stdout.splitlines() if l.split() and l.split()[0] in names]
    assert len(lines) == len(names) and all(l.rstrip().endswith("PASS") for l in lines), res.stdout


def test_a_perturbed_output_fails(tmp_path):
    for ext in (".json", ".safetensors"):
        shutil.copy(GOLDEN / ("ss_decoder" + ext), tmp_path / ("ss_decoder" + ext))
    t = load_file(str(tmp_path / "ss_decoder.safetensors"))
    t["out.logits"] = t["out.logits"] * (1 + 1e-3)
    save_file(t, str(tmp_path / "ss_decoder.safetensors"))
    res = _parity(tmp_path)
    assert res.returncode == 1
    assert "ss_decoder" in res.stdout and "FAIL" in res.stdout and "out.logits" in res.stdout


def test_an_unknown_fixture_kind_fails(tmp_path):
    for ext in (".json", ".safetensors"):
        shutil.copy(GOLDEN / ("na2d" + ext), tmp_path / ("mystery" + ext))
    meta = json.loads((tmp_path / "mystery.json").read_text())
    meta["config"]["name"] = "SomethingNew"
    (tmp_path / "mystery.json").write_text(json.dumps(meta))
    res = _parity(tmp_path)
    assert res.returncode == 1 and "no runner for fixture kind 'SomethingNew'" in res.stdout


def test_an_empty_directory_fails(tmp_path):
    assert _parity(tmp_path).returncode == 1
