"""The catalogue of bad input: every row runs the `pixal3d-rt` console script in a fresh process, as a
user (or an attacker) would, and must end in one `error: ...` line naming the file or option, with the
expected exit status, no traceback, and nothing written: no output, no temporary file.

Rows share one tiny weights directory and one exported engine directory; a row that damages one
works on its own copy. Most rows fail in the preflight, before a network is built."""
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from engine_dirs import edit_manifest
from test_first_contact import CLI, _fake_rembg

SETPRIV = shutil.which("setpriv")


# ---------------------------------------------------------------------------------------------
# building blocks of the rows


def _rgba(size=64, box=(16, 16, 48, 48), alpha=255) -> np.ndarray:
    a = np.zeros((size, size, 4), np.uint8)
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = (200, 120, 60, alpha)
    return a


def _png16(path: Path, rgba16: np.ndarray) -> Path:
    """A 16-bit-per-channel RGBA PNG (PIL cannot write one)."""
    h, w, _ = rgba16.shape
    raw = b"".join(b"\0" + rgba16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 6, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def _bomb(path: Path) -> Path:
    Image.new("1", (30000, 30000)).save(path, optimize=True)  # 0.1 MB on disk, 900 megapixels decoded
    return path


def _animated_gif(path: Path) -> Path:
    frames = [Image.fromarray(_rgba(box=(8 + i, 8, 40 + i, 40))).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
              for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:], transparency=0, duration=50, loop=0)
    return path


def _header(path: Path) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    data = path.read_bytes()
    return json.loads(data[8:8 + n]), data[8 + n:]


def _write_header(path: Path, header: dict, body: bytes) -> None:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + body)


def _edit_json(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


class _Payload:
    """A pickle that creates `marker` when unpickled: torch.load must refuse it without running it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


SS_FLOW = "ckpts/ss_flow_img_dit_1_3B_64_bf16"


@dataclass
class Case:
    """What a row runs in its folder `tmp`: the CLI arguments, and the environment it needs."""

    tmp: Path
    weights_dir: Path
    request: object  # pytest's, for the shared engine directory (exported on first use)
    env: dict = field(default_factory=dict)
    as_unprivileged: bool = False
    removed: list = field(default_factory=list)  # leftovers the run must remove

    @property
    def out(self) -> Path:
        return self.tmp / "out.glb"

    def image(self, arr=None, name="ok.png") -> Path:
        p = self.tmp / name
        Image.fromarray(_rgba() if arr is None else arr).save(p)
        return p

    def weights(self) -> Path:
        """A private copy of the weights (rows damage it)."""
        d = self.tmp / "w"
        shutil.copytree(self.weights_dir, d)
        return d

    def engines(self) -> Path:
        """A private copy of the shared engine directory (rows damage it)."""
        d = self.tmp / "engines"
        shutil.copytree(self.request.getfixturevalue("tiny_engines_dir"), d)
        return d

    def without_rembg(self) -> None:
        self.env["PYTHONPATH"] = os.pathsep.join([str(_fake_rembg(self.tmp.parent, "missing")), os.environ.get("PYTHONPATH", "")])

    def infer(self, *args, image=None, source=("--preset", "tiny")) -> list:
        return ["infer", "--image", image or self.image(), "--output", self.out, *source, *args]

    def infer_weights(self, weights=None, *args, image=None) -> list:
        return self.infer(*args, image=image, source=("--weights", weights or self.weights_dir))

    def infer_engines(self, engines, image=None) -> list:
        return self.infer("--engines", engines, image=image)


@dataclass
class Row:
    """One entry of the catalogue: `setup(case)` makes the input and returns the CLI arguments; the
    run must exit with `status` and print one `error:` line holding every `needles` string (status 0:
    the needles are looked for in the whole output). `absent`: strings the output must not hold."""

    id: str
    setup: Callable
    needles: tuple
    status: int = 2
    absent: tuple = ()
    after: Callable | None = None  # more checks on the case after the run


def _damaged_weights(fn):
    def setup(c):
        w = c.weights()
        fn(w, c)
        return c.infer_weights(w)
    return setup


def _truncate(p: Path, keep: float):
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * keep)])


def _lying_offsets(w, c):
    p = w / (SS_FLOW + ".safetensors")
    h, body = _header(p)
    key = next(k for k in h if k != "__metadata__")
    h[key]["data_offsets"][1] += 1 << 40
    _write_header(p, h, body)


def _lying_shape(w, c):
    p = w / (SS_FLOW + ".safetensors")
    h, body = _header(p)
    key = next(k for k in h if k != "__metadata__")
    h[key]["shape"] = [1 << 31, 1 << 31]
    _write_header(p, h, body)


def _oversized_header(w, c):
    p = w / (SS_FLOW + ".safetensors")
    data = p.read_bytes()
    p.write_bytes(struct.pack("<Q", 1 << 62) + data[8:])


def _wrong_shape(w, c):
    from safetensors.torch import load_file, save_file

    p = w / (SS_FLOW + ".safetensors")
    sd = load_file(str(p))
    key = sorted(sd)[0]
    sd[key] = torch.zeros(*[s + 1 for s in sd[key].shape])
    save_file(sd, str(p))


def _malicious_naf(w, c):
    torch.save({"x": _Payload(c.tmp / "PWNED")}, str(w / "naf_release.pth"))


def _pwned_absent(c):
    assert not (c.tmp / "PWNED").exists(), "the pickle's payload ran"


def _huge_network(w, c):
    _edit_json(w / (SS_FLOW + ".json"), lambda d: d["args"].update(model_channels=16384, num_blocks=200))
    c.env["PIXAL3D_TEST_RLIMIT_AS"] = str(6 << 30)  # a 16384-wide, 200-block network would need ~1 TB


def _engine_file(d: Path) -> Path:
    return d / "ss_decoder.engine"


def _flip(p: Path):
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def _engines_row(fn):
    def setup(c):
        d = c.engines()
        fn(d)
        return c.infer_engines(d)
    return setup


def _stale_build_folder(c):
    """An engine directory with a killed export's build folder in it (its writer is gone)."""
    d = c.engines()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    left = d / f".build-ss_decoder-pid{dead}-x1y2z3"
    left.mkdir()
    (left / "ss_decoder.onnx").write_bytes(b"partial onnx")
    c.removed.append(left)
    return ["export", "--preset", "tiny", "--out", d, "--only", "ss_decoder"]


def _stale_gone(c):
    assert not any(p.exists() for p in c.removed), "the killed export's build folder was not removed"


ROWS = [
    # -- images --------------------------------------------------------------------------------
    Row("image-decompression-bomb", lambda c: c.infer(image=_bomb(c.tmp / "bomb.png")),
        ("bomb.png", "30000×30000", "64,000,000", "--max-image-pixels")),
    Row("image-over-a-lowered-pixel-limit", lambda c: c.infer("--max-image-pixels", "1000"), ("ok.png", "64×64", "1,000")),
    Row("image-truncated", lambda c: (lambda p: (_truncate(p, 0.5), c.infer(image=p))[1])(c.image(_rgba(256))),
        ("ok.png", "not a readable image")),
    Row("image-zero-bytes", lambda c: ((c.tmp / "empty.png").write_bytes(b""), c.infer(image=c.tmp / "empty.png"))[1],
        ("empty.png", "not a readable image")),
    Row("image-svg", lambda c: ((c.tmp / "a.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>'),
                                c.infer(image=c.tmp / "a.svg"))[1], ("a.svg", "not a readable image")),
    Row("image-missing", lambda c: c.infer(image=c.tmp / "nope.png"), ("nope.png", "image file not found")),
    Row("image-folder-without-images", lambda c: ((c.tmp / "imgs").mkdir(), c.infer(image=c.tmp / "imgs"))[1],
        ("imgs", "holds no image")),
    Row("image-fully-transparent", lambda c: c.infer(image=c.image(_rgba(alpha=0))), ("ok.png", "fully transparent")),
    Row("image-too-small", lambda c: c.infer(image=c.image(_rgba(box=(10, 10, 11, 11)))), ("too small",)),
    Row("image-cmyk-without-remover",
        lambda c: (c.without_rembg(), Image.fromarray(_rgba()[:, :, :3]).convert("CMYK").save(c.tmp / "c.jpg"),
                   c.infer(image=c.tmp / "c.jpg"))[-1], ("c.jpg", "no transparency", "pixal3d-rt[rembg]")),
    Row("image-16bit-grey-without-remover",
        lambda c: (c.without_rembg(), Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(c.tmp / "g.png"),
                   c.infer(image=c.tmp / "g.png"))[-1], ("g.png", "no transparency")),
    Row("image-rgb-without-remover-with-weights",
        lambda c: (c.without_rembg(), c.infer_weights(None, image=c.image(_rgba()[:, :, :3], "rgb.png")))[-1],
        ("rgb.png", "no transparency"), absent=("[load]",)),
    Row("image-transparent-with-weights", lambda c: c.infer_weights(None, image=c.image(_rgba(alpha=0))),
        ("fully transparent",), absent=("[load]",)),
    # unusual but valid images: `check` reads them as usable
    Row("image-16bit-rgba", lambda c: ["check", "--preset", "tiny", "--image",
                                       _png16(c.tmp / "a16.png", _rgba().astype(np.uint16) * 257)], ("a16.png", "usable"), 0),
    Row("image-la", lambda c: ["check", "--preset", "tiny", "--image", (Image.fromarray(_rgba()).convert("LA").save(c.tmp / "la.png"),
                                                                      c.tmp / "la.png")[1]], ("la.png", "usable"), 0),
    Row("image-palette-transparency", lambda c: ["check", "--preset", "tiny", "--image",
                                                 (Image.fromarray(_rgba()).convert("P").save(c.tmp / "p.png", transparency=0),
                                                  c.tmp / "p.png")[1]], ("p.png", "usable"), 0),
    Row("image-animated-gif", lambda c: ["check", "--preset", "tiny", "--image", _animated_gif(c.tmp / "anim.gif")],
        ("anim.gif", "usable"), 0),
    # -- outputs ---------------------------------------------------------------------------------
    Row("output-read-only-folder", lambda c: (c.tmp.joinpath("ro").mkdir(mode=0o555), setattr(c, "as_unprivileged", True),
                                              ["infer", "--image", c.image(), "--output", c.tmp / "ro" / "x.glb",
                                               "--preset", "tiny"])[-1], ("ro", "cannot write here")),
    Row("output-parent-is-a-file", lambda c: ((c.tmp / "taken.glb").write_bytes(b"keep"),
                                              ["infer", "--image", c.image(), "--output", c.tmp / "taken.glb" / "x.glb",
                                               "--preset", "tiny"])[-1], ("taken.glb", "is a file, not a folder")),
    Row("output-is-a-folder", lambda c: (c.out.mkdir(), c.infer())[-1], ("out.glb", "is a directory")),
    Row("output-not-glb", lambda c: ["infer", "--image", c.image(), "--output", c.tmp / "x.obj", "--preset", "tiny"],
        ("x.obj", ".glb")),
    Row("output-folder-missing", lambda c: ["infer", "--image", c.image(), "--output", c.tmp / "no" / "x.glb", "--preset", "tiny"],
        ("no", "does not exist")),
    Row("export-out-read-only", lambda c: (c.tmp.joinpath("ro").mkdir(mode=0o555), setattr(c, "as_unprivileged", True),
                                           ["export", "--preset", "tiny", "--out", c.tmp / "ro" / "e"])[-1],
        ("ro", "cannot write here")),
    # -- weights ---------------------------------------------------------------------------------
    Row("weights-missing-folder", lambda c: c.infer_weights(c.tmp / "nowhere"), ("nowhere", "weights directory not found")),
    Row("weights-empty-folder", lambda c: ((c.tmp / "w").mkdir(), c.infer_weights(c.tmp / "w"))[-1],
        ("pipeline.json", "file not found")),
    Row("pipeline-json-normalization-oops",
        _damaged_weights(lambda w, c: _edit_json(w / "pipeline.json", lambda d: d["args"].update(shape_slat_normalization="oops"))),
        ("pipeline.json", "shape_slat_normalization")),
    Row("pipeline-json-a-list", _damaged_weights(lambda w, c: (w / "pipeline.json").write_text("[1, 2]")),
        ("pipeline.json", "no 'models' table")),
    Row("pipeline-json-garbage", _damaged_weights(lambda w, c: (w / "pipeline.json").write_bytes(os.urandom(64))),
        ("pipeline.json", "not valid JSON")),
    Row("pipeline-json-model-missing",
        _damaged_weights(lambda w, c: _edit_json(w / "pipeline.json", lambda d: d["args"]["models"].pop("shape_slat_decoder"))),
        ("pipeline.json", "shape_slat_decoder")),
    Row("pipeline-json-sampler-garbage",
        _damaged_weights(lambda w, c: _edit_json(w / "pipeline.json", lambda d: d["args"].update(
            shape_slat_sampler={"params": {"guidance_interval": "wide"}}))),
        ("pipeline.json", "shape_slat_sampler")),
    Row("checkpoint-json-huge-network", _damaged_weights(_huge_network), ("ss_flow_img_dit_1_3B_64_bf16", "missing key")),
    Row("checkpoint-json-unknown-class",
        _damaged_weights(lambda w, c: _edit_json(w / (SS_FLOW + ".json"), lambda d: d.update(name="os.system"))),
        ("ss_flow_img_dit_1_3B_64_bf16.json", "unknown network class")),
    Row("checkpoint-json-bad-arguments",
        _damaged_weights(lambda w, c: _edit_json(w / (SS_FLOW + ".json"), lambda d: d["args"].update(num_heads="many"))),
        ("ss_flow_img_dit_1_3B_64_bf16.json", "do not fit")),
    Row("checkpoint-json-a-list", _damaged_weights(lambda w, c: (w / (SS_FLOW + ".json")).write_text("[]")),
        ("ss_flow_img_dit_1_3B_64_bf16.json", "expected")),
    Row("safetensors-missing", _damaged_weights(lambda w, c: (w / (SS_FLOW + ".safetensors")).unlink()),
        ("ss_flow_img_dit_1_3B_64_bf16.safetensors", "file not found")),
    Row("safetensors-empty", _damaged_weights(lambda w, c: (w / (SS_FLOW + ".safetensors")).write_bytes(b"")),
        ("ss_flow_img_dit_1_3B_64_bf16.safetensors", "not a readable safetensors file")),
    Row("safetensors-garbage", _damaged_weights(lambda w, c: (w / (SS_FLOW + ".safetensors")).write_bytes(os.urandom(4096))),
        ("ss_flow_img_dit_1_3B_64_bf16.safetensors", "not a readable safetensors file")),
    Row("safetensors-truncated", _damaged_weights(lambda w, c: _truncate(w / (SS_FLOW + ".safetensors"), 0.6)),
        ("ss_flow_img_dit_1_3B_64_bf16.safetensors", "not a readable safetensors file")),
    Row("safetensors-oversized-header", _damaged_weights(_oversized_header),
        ("ss_flow_img_dit_1_3B_64_bf16.safetensors", "not a readable safetensors file")),
    Row("safetensors-header-lies-about-offsets", _damaged_weights(_lying_offsets),
        ("ss_flow_img_dit_1_3B_64_bf16.safetensors", "not a readable safetensors file")),
    Row("safetensors-header-lies-about-a-shape", _damaged_weights(_lying_shape),
        ("ss_flow_img_dit_1_3B_64_bf16.safetensors", "not a readable safetensors file")),
    Row("safetensors-wrong-shape", _damaged_weights(_wrong_shape), ("ss_flow_img_dit_1_3B_64_bf16.safetensors", "expects")),
    Row("naf-missing", _damaged_weights(lambda w, c: (w / "naf_release.pth").unlink()), ("naf_release.pth", "not found")),
    Row("naf-malicious-pickle", _damaged_weights(_malicious_naf), ("naf_release.pth", "refused without executing it"),
        absent=("weights_only=False", "Re-running"), after=_pwned_absent),
    Row("naf-garbage", _damaged_weights(lambda w, c: (w / "naf_release.pth").write_bytes(os.urandom(2048))),
        ("naf_release.pth", "refused without executing it")),
    Row("dinov3-config-a-list",
        _damaged_weights(lambda w, c: (w / "dinov3-vitl16-pretrain-lvd1689m" / "config.json").write_text("[]")),
        ("config.json", "not a DINOv3 ViT config")),
    # -- options ---------------------------------------------------------------------------------
    Row("fov-nan", lambda c: c.infer("--fov", "nan"), ("--fov", "nan")),
    Row("fov-inf", lambda c: c.infer("--fov", "inf"), ("--fov", "inf")),
    Row("fov-out-of-range", lambda c: c.infer("--fov", "500"), ("--fov", "500")),
    Row("seed-over-64-bits", lambda c: c.infer("--seed", str(2 ** 64)), ("--seed", "18446744073709551616")),
    Row("seed-negative", lambda c: c.infer("--seed", "-1"), ("--seed",)),
    Row("steps-zero", lambda c: c.infer("--steps", "0"), ("--steps",)),
    Row("resolution-unknown", lambda c: c.infer("--resolution", "777"), ("--resolution", "777")),
    Row("texture-size-too-small", lambda c: c.infer("--texture-size", "8"), ("--texture-size",)),
    Row("max-image-pixels-zero", lambda c: c.infer("--max-image-pixels", "0"), ("--max-image-pixels",)),
    Row("device-unknown", lambda c: c.infer("--device", "tpu"), ("--device", "tpu")),
    Row("option-unknown", lambda c: c.infer("--colour", "red"), ("--colour",)),
    Row("weights-and-preset", lambda c: c.infer("--weights", c.weights_dir), ("--weights", "--preset")),
    Row("device-cuda-without-gpu", lambda c: c.infer("--device", "cuda"), ("--device cuda", "no CUDA GPU")),
    # -- engines -----------------------------------------------------------------------------------
    Row("engines-missing-folder", lambda c: c.infer_engines(c.tmp / "nowhere"), ("nowhere", "engine directory not found")),
    Row("engines-manifest-missing", _engines_row(lambda d: (d / "manifest.json").unlink()),
        ("manifest.json", "not an engine directory")),
    Row("engines-manifest-garbage", _engines_row(lambda d: (d / "manifest.json").write_bytes(os.urandom(100))),
        ("manifest.json", "not valid JSON")),
    Row("engines-manifest-a-list", _engines_row(lambda d: (d / "manifest.json").write_text("[]")),
        ("manifest.json", "manifest format")),
    Row("engines-manifest-wrong-format", _engines_row(lambda d: edit_manifest(d, lambda m: m.update(format=99))),
        ("manifest.json", "manifest format 99")),
    Row("engines-manifest-entry-garbage",
        _engines_row(lambda d: edit_manifest(d, lambda m: m["networks"]["ss_decoder"].update(sha256=7))),
        ("manifest.json", "'sha256'")),
    Row("engines-manifest-networks-a-list", _engines_row(lambda d: edit_manifest(d, lambda m: m.update(networks=[1]))),
        ("manifest.json", "'networks'")),
    Row("engines-manifest-file-outside",
        _engines_row(lambda d: edit_manifest(d, lambda m: m["networks"]["ss_decoder"].update(file="../../etc/passwd"))),
        ("manifest.json", "not a file name")),
    Row("engines-file-missing", _engines_row(lambda d: _engine_file(d).unlink()), ("ss_decoder.engine", "engine file not found")),
    Row("engines-file-tampered", _engines_row(lambda d: _flip(_engine_file(d))), ("ss_decoder.engine", "corrupt or was modified")),
    Row("engines-file-truncated", _engines_row(lambda d: _truncate(_engine_file(d), 0.3)),
        ("ss_decoder.engine", "corrupt or was modified")),
    Row("engines-wrong-tensorrt-version",
        _engines_row(lambda d: edit_manifest(d, lambda m: m["networks"]["ss_decoder"].update(tensorrt_version="0.0.1"))),
        ("ss_decoder.engine", "built with tensorrt_rtx 0.0.1")),
    Row("engines-copied-folder-rebuild-command", _engines_row(lambda d: _flip(_engine_file(d))),
        ("rebuild with: pixal3d-rt export --preset tiny",), after=None),
    Row("engines-tensorrt-on-the-cpu", _engines_row(lambda d: None), ("ss_decoder", "NVIDIA GPU")),
    # -- interrupted export ------------------------------------------------------------------------------
    Row("export-after-a-killed-export", _stale_build_folder, ("ss_decoder: up to date",), 0, after=_stale_gone),
    Row("export-aoti-fp8", lambda c: ["export", "--preset", "tiny", "--out", c.tmp / "e", "--target", "aoti", "--precision", "fp8"],
        ("--target aoti --precision fp8",)),
]


def _files(root: Path) -> set:
    return {p.relative_to(root) for p in root.rglob("*")}


def _limit_memory():
    import resource

    limit = int(os.environ.get("PIXAL3D_TEST_RLIMIT_AS", "0"))
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row, tiny_weights_dir, request, tmp_path):
    if row.id in ("device-cuda-without-gpu", "engines-tensorrt-on-the-cpu") and torch.cuda.is_available():
        pytest.skip("checks the message on a machine without a GPU")
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    c = Case(case_dir, tiny_weights_dir, request)
    args = [str(a) for a in row.setup(c)]
    cmd = [*CLI, *args]
    if c.as_unprivileged and os.geteuid() == 0:  # root writes anywhere: drop that privilege
        if SETPRIV is None:
            pytest.skip("running as root without setpriv: a read-only folder cannot be made")
        cmd = [SETPRIV, "--bounding-set", "-dac_override,-dac_read_search", *cmd]
    before = _files(case_dir)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **c.env}, cwd=case_dir,
                         preexec_fn=_limit_memory)
    text = res.stdout + res.stderr
    assert res.returncode == row.status, text
    assert "Traceback" not in text, text
    if row.status == 2:
        lines = [l for l in res.stderr.splitlines() if l.startswith("error:")]
        assert len(lines) == 1, res.stderr
        where = lines[0]
    else:
        where = text
    for needle in row.needles:
        assert needle in where, (needle, where)
    for bad in row.absent:
        assert bad not in text, (bad, text)
    if row.id == "engines-copied-folder-rebuild-command":
        assert f"--out {c.tmp / 'engines'} " in where, where  # the copy, not the folder it was exported to
    after = _files(case_dir)
    gone = {q for q in before for r in c.removed if r.relative_to(case_dir) in (q, *q.parents)}
    assert after == before - gone, f"written: {sorted(map(str, after - before))}, removed: {sorted(map(str, before - after))}"
    assert not c.out.is_file()
    if row.after is not None:
        row.after(c)


# a stage's network that fails as CUDA does when the GPU is full, put in through the pipeline's networks
OOM_RUN = """
import torch
from pixal3d_rt import pipeline

class OutOfMemory(torch.nn.Module):
    def forward(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                          "of 139.80 GiB of which 1.06 GiB is free.\\nSee documentation for Memory Management")

build = pipeline.Pipeline.from_preset.__func__

def from_preset(cls, *args, **kwargs):
    pipe = build(cls, *args, **kwargs)
    pipe.models["sparse_structure_decoder"] = OutOfMemory()
    return pipe

pipeline.Pipeline.from_preset = classmethod(from_preset)
from pixal3d_rt.cli import main
main()
"""


def test_out_of_gpu_memory_in_a_stage_is_one_line(tmp_path):
    c = Case(tmp_path, tmp_path, None)
    args = c.infer("--resolution", "512")
    before = _files(tmp_path)
    res = subprocess.run([sys.executable, "-c", OOM_RUN, *map(str, args)], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    lines = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, res.stderr
    assert "ss_decoder: out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB" in lines[0], lines[0]
    assert "--resolution" in lines[0]
    assert _files(tmp_path) == before and not c.out.exists()


def test_written_files_get_the_usual_mode(tiny_weights_dir, tmp_path):
    """Weights, GLBs and manifests are written through one atomic writer: 0666 less the umask, like any new file."""
    from pixal3d_rt.files import atomic_write

    umask = os.umask(0)
    os.umask(umask)
    want = 0o666 & ~umask
    files = [p for p in tiny_weights_dir.rglob("*") if p.is_file()]
    assert len(files) >= 16 and {p.stat().st_mode & 0o777 for p in files} == {want}
    atomic_write(tmp_path / "a.glb", b"glTF")
    atomic_write(tmp_path / "b.json", lambda p: Path(p).write_text("{}"))
    assert {p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {want}
