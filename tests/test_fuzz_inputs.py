"""Fuzzing the readers of untrusted files with Hypothesis: the image loader, the safetensors header
reader, pipeline.json and checkpoint JSON validation, and the engine manifest reader get random bytes
and random mutations of valid files. The only allowed outcomes are success or the project's own
error (`Pixal3DError`); anything else is a traceback a user would see.

CI runs a fixed, derandomized budget (well under a minute). A longer local run:

    PIXAL3D_FUZZ=long python -m pytest -q tests/test_fuzz_inputs.py   # PIXAL3D_FUZZ_EXAMPLES=N per reader (default 5000)
"""
import copy
import hashlib
import io
import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pixal3d_rt.errors import Pixal3DError

settings.register_profile("pixal3d-ci", max_examples=60, derandomize=True, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("pixal3d-long", max_examples=int(os.environ.get("PIXAL3D_FUZZ_EXAMPLES", "5000")), deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FUZZ = settings.get_profile("pixal3d-long" if os.environ.get("PIXAL3D_FUZZ") == "long" else "pixal3d-ci")


def _only_our_errors(fn, *args):
    """Run a reader; success and Pixal3DError are the allowed outcomes (anything else fails the test)."""
    try:
        return fn(*args)
    except Pixal3DError as e:
        assert str(e).strip() and "\n" not in str(e).strip(), str(e)  # the one line the CLI prints
        return None


@st.composite
def _mutated(draw, seeds: list[bytes]):
    """A valid file with random bytes flipped, a random cut, or random bytes inserted."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 8))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()) and data:
        data = data[: draw(st.integers(0, len(data)))]
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(max_size=64))
    return bytes(data)


def _bytes_of(seeds):
    return st.one_of(st.binary(max_size=1024), _mutated(seeds))


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2, 70) | st.floats(allow_nan=True) | st.text(max_size=8),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
                    max_leaves=12)


@st.composite
def _json_mutation(draw, doc):
    """`doc` with a few values (at any depth) replaced by random JSON, or keys removed."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        node, path = doc, []
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else list(range(len(node)))))
            path.append((node, key))
            node = node[key]
        if not path:
            continue
        parent, key = path[-1]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[key]
        else:
            parent[key] = draw(JSON)
    return doc


def _json_bytes(doc):
    return st.one_of(_json_mutation(doc).map(lambda d: json.dumps(d).encode()), JSON.map(lambda d: json.dumps(d).encode()),
                     _mutated([json.dumps(doc).encode()]))


# ---------------------------------------------------------------------------------------------
# the image loader


def _image_seeds() -> list[bytes]:
    import numpy as np

    a = np.zeros((12, 12, 4), np.uint8)
    a[3:9, 3:9] = (200, 120, 60, 255)
    rgba = Image.fromarray(a)
    out = []
    for fmt, img in [("PNG", rgba), ("PNG", rgba.convert("P")), ("PNG", rgba.convert("LA")), ("GIF", rgba.convert("P")),
                     ("JPEG", rgba.convert("RGB")), ("JPEG", rgba.convert("CMYK")), ("BMP", rgba), ("TIFF", rgba),
                     ("WEBP", rgba), ("PNG", Image.fromarray(np.full((8, 8), 40000, np.uint16)))]:
        buf = io.BytesIO()
        img.save(buf, fmt)
        out.append(buf.getvalue())
    return out


IMAGE_SEEDS = _image_seeds()


def _read_image(path):
    from pixal3d_rt.preprocess import load_image, preprocess_image

    img = load_image(path, max_pixels=1 << 20)
    assert img.mode in ("RGB", "RGBA")
    if img.mode == "RGBA":  # the crop of an image with alpha (RGB ones need a background remover)
        preprocess_image(img)


@FUZZ
@given(data=_bytes_of(IMAGE_SEEDS))
def test_image_loader(tmp_path, data):
    p = tmp_path / "image"
    p.write_bytes(data)
    _only_our_errors(_read_image, p)


# ---------------------------------------------------------------------------------------------
# the safetensors header reader


def _safetensors_seed() -> bytes:
    from safetensors.torch import save

    return save({"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(4, dtype=torch.float16)})


SAFETENSORS = _safetensors_seed()
_HEADER_LEN = struct.unpack("<Q", SAFETENSORS[:8])[0]
SAFETENSORS_HEADER = json.loads(SAFETENSORS[8:8 + _HEADER_LEN])


def _with_header(header_bytes: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(header_bytes)) + header_bytes + body


@FUZZ
@given(data=st.one_of(_bytes_of([SAFETENSORS]),
                      st.tuples(_json_bytes(SAFETENSORS_HEADER), st.sampled_from([SAFETENSORS[8 + _HEADER_LEN:], b"", b"\0" * 64]))
                      .map(lambda hb: _with_header(*hb)),
                      st.tuples(st.integers(0, 2 ** 64 - 1), st.binary(max_size=64)).map(lambda nb: struct.pack("<Q", nb[0]) + nb[1])))
def test_safetensors_header_reader(tmp_path, data):
    from pixal3d_rt.checkpoints import _safetensors_header

    p = tmp_path / "x.safetensors"
    p.write_bytes(data)
    header = _only_our_errors(_safetensors_header, p)
    if header is not None:
        assert all(isinstance(k, str) and all(isinstance(n, int) for n in s) for k, s in header.items())


# ---------------------------------------------------------------------------------------------
# pipeline.json and checkpoint JSON


@pytest.fixture(scope="module")
def tiny_weights():
    from pixal3d_rt.presets import build_preset

    return build_preset("tiny")[0]


def _pipeline_json(w) -> dict:
    from pixal3d_rt.checkpoints import CKPT_NAMES

    return {"name": "Pixal3DImageTo3DPipeline", "args": {**w.pipeline_args, "models": dict(CKPT_NAMES)}}


def _validated_pipeline(path):
    """pipeline.json as the loader reads it; what passes must work in the sampler and the normalisation."""
    from pixal3d_rt import config as C
    from pixal3d_rt.checkpoints import _pipeline_args
    from pixal3d_rt.sampler import FlowEulerGuidanceIntervalSampler

    args = _pipeline_args(path)
    for stage in ("sparse_structure", "shape_slat", "tex_slat"):
        noise = torch.randn(1, 2, 3, generator=torch.Generator().manual_seed(0))
        x = FlowEulerGuidanceIntervalSampler().sample(lambda x, t, c: -x, noise, {}, {}, **C.sampler_params(stage, args, steps=2))
        assert torch.isfinite(x).all()
    for key in ("shape_slat_normalization", "tex_slat_normalization"):
        std = torch.tensor(args[key]["std"], dtype=torch.float32)
        assert torch.isfinite(torch.tensor(args[key]["mean"])).all() and (std > 0).all()


def test_pipeline_json(tiny_weights, tmp_path):
    @FUZZ
    @given(data=_json_bytes(_pipeline_json(tiny_weights)))
    def run(data):
        p = tmp_path / "pipeline.json"
        p.write_bytes(data)
        _only_our_errors(_validated_pipeline, p)

    run()


def _network_from_config(base):
    from pixal3d_rt.checkpoints import PIPELINE_MODELS, _meta_network, _network_config

    config = _network_config(base, set().union(*PIPELINE_MODELS.values()))
    _meta_network(config, base.with_suffix(".json"))


def test_checkpoint_json(tiny_weights, tmp_path):
    small = {k: v for k, v in tiny_weights.configs.items() if k in ("sparse_structure_flow_model", "sparse_structure_decoder",
                                                                     "shape_slat_decoder")}

    @FUZZ
    @given(data=st.sampled_from(sorted(small)).flatmap(lambda k: _json_bytes(small[k])))
    def run(data):
        (tmp_path / "net.json").write_bytes(data)
        _only_our_errors(_network_from_config, tmp_path / "net")

    run()


# ---------------------------------------------------------------------------------------------
# the engine manifest reader


def _manifest(engine: bytes) -> dict:
    from pixal3d_rt.runtime.specs import build_specs
    from pixal3d_rt.presets import build_preset

    w, geometry = build_preset("tiny")
    spec = build_specs(w.configs, w.dinov3_config, geometry, only=["ss_decoder"])[0]
    entry = {"file": "ss_decoder.engine", "bytes": len(engine), "sha256": hashlib.sha256(engine).hexdigest(),
             "spec": spec.to_json(), "target": "tensorrt-rtx", "precision": "bf16", "tensorrt_module": "tensorrt_rtx",
             "tensorrt_version": "1.7.1.116", "compute_capabilities": ["8.6"]}
    return {"format": 1, "target": "tensorrt-rtx", "tensorrt_module": "tensorrt_rtx", "tensorrt_version": "1.7.1.116",
            "precision": "bf16", "rebuild_command": "pixal3d-rt export --preset tiny --target tensorrt-rtx --out E",
            "networks": {"ss_decoder": entry, "tex_flow": {**entry, "target": "aoti", "file": "ss_decoder.engine"}}}


def test_engine_manifest_reader(tmp_path):
    from pixal3d_rt.runtime.tensorrt_engine import check_engines

    engine = os.urandom(256)
    (tmp_path / "ss_decoder.engine").write_bytes(engine)

    @FUZZ
    @given(data=_json_bytes(_manifest(engine)))
    def run(data):
        (tmp_path / "manifest.json").write_bytes(data)
        _only_our_errors(check_engines, tmp_path)

    run()
