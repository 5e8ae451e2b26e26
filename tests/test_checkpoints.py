"""The official weights layout: real files written at tiny dimensions, loaded back strictly,
and every way such a directory can be broken gives one clear line naming the file and the key."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pixal3d_rt.checkpoints import CKPT_NAMES, load_network, load_weights, resolve_model_ref, write_weights
from pixal3d_rt.errors import CheckpointError
from pixal3d_rt.presets import build_preset


@pytest.fixture(scope="module")
def tiny():
    w, _ = build_preset("tiny")
    return w


@pytest.fixture(scope="module")
def written(tiny, tmp_path_factory):
    return write_weights(tiny, tmp_path_factory.mktemp("weights"))


@pytest.fixture
def weights_dir(written, tmp_path):
    d = tmp_path / "w"
    shutil.copytree(written, d)
    return d


def _one_line(e):
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


def test_layout_is_official(written):
    pj = json.loads((written / "pipeline.json").read_text())
    assert pj["name"] == "Pixal3DImageTo3DPipeline"
    for key, ref in pj["args"]["models"].items():
        base = resolve_model_ref(written, ref)
        assert (base.parent / (base.name + ".json")).is_file() and (base.parent / (base.name + ".safetensors")).is_file(), key
        cfg = json.loads((base.parent / (base.name + ".json")).read_text())
        assert set(cfg) == {"name", "args"}
    # the SS decoder is named by its Hugging Face path, as upstream's pipeline.json does
    assert pj["args"]["models"]["sparse_structure_decoder"].startswith("microsoft/TRELLIS-image-large/")
    # stored fp32, like the official files
    sd = load_file(str(written / "ckpts/slat_flow_img2shape_dit_1_3B_512_bf16.safetensors"))
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert (written / "dinov3-vitl16-pretrain-lvd1689m/config.json").is_file()
    assert (written / "naf_release.pth").is_file()
    torch.load(str(written / "naf_release.pth"), weights_only=True)


def test_round_trip_is_exact(tiny, written):
    back = load_weights(written)
    for key, m in tiny.models.items():
        a, b = m.state_dict(), back.models[key].state_dict()
        assert a.keys() == b.keys(), key
        for k in a:
            assert torch.equal(a[k].float() if a[k].is_floating_point() else a[k], b[k].float() if b[k].is_floating_point() else b[k]), (key, k)
    for k, v in tiny.dinov3.state_dict().items():
        assert torch.equal(v, back.dinov3.state_dict()[k]), k
    for k, v in tiny.naf.state_dict().items():
        assert torch.equal(v, back.naf.state_dict()[k]), k
    assert back.pipeline_args["shape_slat_normalization"] == tiny.pipeline_args["shape_slat_normalization"]
    # and the loaded network computes the same function
    dec_a, dec_b = tiny.models["sparse_structure_decoder"], back.models["sparse_structure_decoder"]
    z = torch.randn(1, 8, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(dec_a(z), dec_b(z))


def test_missing_weights_dir(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_weights(tmp_path / "nope")
    assert "nope" in _one_line(e)


def test_missing_pipeline_json(weights_dir):
    (weights_dir / "pipeline.json").unlink()
    with pytest.raises(CheckpointError) as e:
        load_weights(weights_dir)
    assert "pipeline.json" in _one_line(e) and "not found" in str(e.value)


def test_missing_safetensors(weights_dir):
    (weights_dir / "ckpts/tex_dec_next_dc_f16c32_fp16.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        load_weights(weights_dir)
    assert "tex_dec_next_dc_f16c32_fp16.safetensors" in _one_line(e)


def test_wrong_class(weights_dir):
    p = weights_dir / "ckpts/shape_dec_next_dc_f16c32_fp16.json"
    cfg = json.loads(p.read_text())
    cfg["name"] = "SparseUnetVaeDecoder"
    p.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_weights(weights_dir)
    msg = _one_line(e)
    assert "shape_dec_next_dc_f16c32_fp16.json" in msg and "FlexiDualGridVaeDecoder" in msg


def _edit_tensors(path, edit):
    sd = load_file(str(path))
    edit(sd)
    save_file(sd, str(path))


def test_wrong_shape(weights_dir):
    p = weights_dir / "ckpts/slat_flow_img2shape_dit_1_3B_512_bf16.safetensors"
    _edit_tensors(p, lambda sd: sd.__setitem__("input_layer.weight", torch.zeros(3, 3)))
    with pytest.raises(CheckpointError) as e:
        load_weights(weights_dir)
    msg = _one_line(e)
    assert "slat_flow_img2shape_dit_1_3B_512_bf16.safetensors" in msg and "input_layer.weight" in msg and "[3, 3]" in msg


def test_missing_key(weights_dir):
    p = weights_dir / "ckpts/ss_flow_img_dit_1_3B_64_bf16.safetensors"
    _edit_tensors(p, lambda sd: sd.pop("blocks.1.cross_attn.proj_linear.weight"))
    with pytest.raises(CheckpointError) as e:
        load_weights(weights_dir)
    msg = _one_line(e)
    assert "ss_flow_img_dit_1_3B_64_bf16.safetensors" in msg and "missing key 'blocks.1.cross_attn.proj_linear.weight'" in msg


def test_extra_key(weights_dir):
    p = weights_dir / "ckpts/slat_flow_imgshape2tex_dit_1_3B_1024_bf16.safetensors"
    _edit_tensors(p, lambda sd: sd.__setitem__("blocks.99.bogus", torch.ones(2)))
    with pytest.raises(CheckpointError) as e:
        load_weights(weights_dir)
    assert "unexpected key 'blocks.99.bogus'" in _one_line(e)


def test_truncated_safetensors(weights_dir):
    p = weights_dir / "ckpts/slat_flow_img2shape_dit_1_3B_1024_bf16.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_weights(weights_dir)
    assert "slat_flow_img2shape_dit_1_3B_1024_bf16.safetensors" in _one_line(e)


def test_corrupt_json(weights_dir):
    p = weights_dir / "ckpts/tex_dec_next_dc_f16c32_fp16.json"
    p.write_text("{not json")
    with pytest.raises(CheckpointError) as e:
        load_weights(weights_dir)
    assert "tex_dec_next_dc_f16c32_fp16.json" in _one_line(e) and "JSON" in str(e.value)


def test_dinov3_mismatch(weights_dir):
    p = weights_dir / "dinov3-vitl16-pretrain-lvd1689m/model.safetensors"
    _edit_tensors(p, lambda sd: sd.pop(sorted(sd)[0]))
    with pytest.raises(CheckpointError) as e:
        load_weights(weights_dir)
    assert "model.safetensors" in _one_line(e) and "missing key" in str(e.value)


def test_naf_not_a_state_dict(weights_dir):
    (weights_dir / "naf_release.pth").write_bytes(b"garbage")
    with pytest.raises(CheckpointError) as e:
        load_weights(weights_dir)
    assert "naf_release.pth" in _one_line(e)


def test_load_network_checks_class_before_reading(written):
    base = written / CKPT_NAMES["shape_slat_decoder"]
    with pytest.raises(CheckpointError) as e:
        load_network(base, expect={"SparseStructureDecoder"})
    assert "expected SparseStructureDecoder" in _one_line(e)
