"""The reference preset: the official full-size configs in the package, and the reference shape's
structure (counts, nesting, a closed non-convex surface) replacing what random networks decide."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pixal3d_rt.pipeline import Pipeline
from pixal3d_rt.reference_preset import REFERENCE_CONFIGS, REFERENCE_DINO, build_reference
from pixal3d_rt.reference_shape import ReferenceStructure, _children

SCHEMA = Path(__file__).resolve().parent / "golden" / "schema"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mug.png"


def _schema(name):
    return json.loads((SCHEMA / f"{name}.json").read_text())


def test_reference_configs_are_the_official_ones_and_build_at_full_size():
    w, geometry = build_reference("meta")
    by_key = {d["pipeline_key"]: d for d in map(_schema, [p.stem for p in SCHEMA.glob("*.json") if p.stem != "_summary"])
              if d["pipeline_key"] in REFERENCE_CONFIGS}
    assert set(by_key) == set(REFERENCE_CONFIGS)
    for key, d in by_key.items():
        assert REFERENCE_CONFIGS[key] == d["config"], key
        assert sum(p.numel() for p in w.models[key].parameters()) == d["num_parameters"], key
    dino = _schema("dinov3_vitl16")
    assert REFERENCE_DINO == dino["config"]["args"]
    assert sum(p.numel() for p in w.dinov3.parameters()) == dino["num_parameters"]
    assert sum(p.numel() for p in w.naf.parameters()) == _schema("naf")["num_parameters"]
    assert geometry.lr_image == 512 and geometry.hr_image == 1024


def test_reference_weights_follow_the_preset_laws_on_the_device():
    from pixal3d_rt.reference_preset import randomize_on_device_

    lin = torch.nn.Linear(512, 256)
    randomize_on_device_(lin, torch.Generator().manual_seed(0))
    assert abs(lin.weight.std().item() - 512 ** -0.5) < 0.05 * 512 ** -0.5
    assert abs(lin.bias.std().item() - 0.2) < 0.05


def test_sparse_structure_count_is_a_typical_objects():
    lr = ReferenceStructure().occupancy(32)
    assert lr.shape[1] == 4 and (lr[:, 0] == 0).all()
    assert 4_000 <= lr.shape[0] <= 4_800  # a typical object: about 4,400 tokens at 32³


def test_levels_nest_from_64_on():
    s = ReferenceStructure()
    parents = s.voxels(64)
    children = s.voxels(128)
    have = set(map(tuple, parents.tolist()))
    assert all(tuple(c) in have for c in (children // 2).tolist())
    # subdivision keeps exactly the active children
    par = torch.cat([torch.zeros_like(parents[:, :1]), parents], 1)
    keep = s.subdivision(par, 64, torch.zeros(len(par), 8)) > 0
    kept = _children(parents.long())[keep.reshape(-1)]
    assert sorted(map(tuple, kept.tolist())) == sorted(map(tuple, children.tolist()))


def test_levels_of_a_decode_past_512_grow_about_4x_as_a_trained_decoders():
    s = ReferenceStructure()
    top = s.occupancy(64)

    def counts(out_grid):
        coords, grid, n = top, 64, [top.shape[0]]
        for _ in range(2):
            keep = s.subdivision(coords, grid, torch.zeros(len(coords), 8), out_grid) > 0
            c = _children(coords[:, 1:].long())[keep.reshape(-1)]
            coords, grid = torch.cat([torch.zeros_like(c[:, :1]), c], 1).int(), grid * 2
            n.append(c.shape[0])
        return n

    fine, lr = counts(1024), counts(512)
    assert all(3.0 < b / a < 5.0 for a, b in zip(fine[1:], fine[2:]))  # 128 -> 256: area scaling
    assert lr[2] > 2 * fine[2]  # the LR decode's shells are thicker (its 512³ set makes the HR tokens)


def test_reference_surface_is_closed_non_convex_and_has_a_handle():
    v, f = ReferenceStructure().surface_mesh(64)
    f = f.long()
    edges = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]).sort(dim=1).values
    _, counts = edges.unique(dim=0, return_counts=True)
    assert (counts == 2).all()  # every edge has two faces: closed
    used = f.unique().numel()
    assert used - counts.numel() + f.shape[0] == 0  # Euler characteristic 0: genus 1 (the handle), not a sphere
    # enclosed volume (divergence theorem) well below its bounding box's: an open cavity, not convex
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    volume = abs(float((a * torch.linalg.cross(b, c)).sum() / 6))
    box = float((v.max(0).values - v.min(0).values).prod())
    assert 0.05 * box < volume < 0.5 * box


def _descend(structure, coords, grid, levels):
    for _ in range(levels):
        keep = structure.subdivision(coords, grid, torch.zeros(len(coords), 8)) > 0
        c = _children(coords[:, 1:].long())[keep.reshape(-1)]
        coords, grid = torch.cat([torch.zeros_like(c[:, :1]), c], 1).int(), grid * 2
    return coords


@pytest.mark.parametrize("resolution", [512, 1024])
def test_structure_replaces_the_networks_decisions_on_the_tiny_preset(resolution):
    from pixal3d_rt.models.sc_vae import quantize_hr_coords

    pipe = Pipeline.from_preset("tiny", device="cpu")
    plain = pipe.run(EXAMPLE, resolution=resolution, seed=3, steps=2)
    s = pipe.structure = ReferenceStructure()
    r = pipe.run(EXAMPLE, resolution=resolution, seed=3, steps=2)
    lr_grid = r.resolution // 16 * 512 // resolution  # tiny: 16
    lr = s.occupancy(lr_grid)
    assert r.tokens["shape_lr_flow"] == lr.shape[0] != plain.tokens["shape_lr_flow"]
    if resolution == 512:
        base, grid = lr, lr_grid
    else:
        base, grid = quantize_hr_coords(_descend(s, lr, lr_grid, 4), lr_grid * 16, r.resolution // 16), r.resolution // 16
        assert r.tokens["shape_hr_flow"] == base.shape[0]
    final = _descend(s, base, grid, 4)
    assert r.tokens["voxels"] == final.shape[0]
    if resolution == 512:  # the whole chain is the reference's own: its surface, face for face
        assert r.faces.shape[0] == s.surface_mesh(r.resolution)[1].shape[0]
    else:
        assert r.voxel_coords.shape[0] == final.shape[0]  # the texture decoder follows the same subdivisions
    pipe.structure = None
    again = pipe.run(EXAMPLE, resolution=resolution, seed=3, steps=2)  # the normal path is untouched
    assert again.tokens == plain.tokens and torch.equal(again.faces, plain.faces)


def test_reference_preset_builds_through_from_preset(monkeypatch):
    """The reference build path (networks made on the device, drawn there, the structure attached),
    run with the tiny networks in place of the full-size configs so it fits a CPU test."""
    from pixal3d_rt import config as C
    from pixal3d_rt import presets, reference_preset

    monkeypatch.setattr(reference_preset, "REFERENCE_CONFIGS", presets.TINY_CONFIGS)
    monkeypatch.setattr(reference_preset, "REFERENCE_DINO", presets.TINY_DINO)
    monkeypatch.setattr(reference_preset, "REFERENCE_NAF", presets.TINY_NAF)
    monkeypatch.setattr(reference_preset, "LATENT", presets.LATENT)
    monkeypatch.setattr(C, "FULL", presets.TINY_GEOMETRY)
    pipe = Pipeline.from_preset("reference", device="cpu")
    assert isinstance(pipe.structure, ReferenceStructure) and pipe.load_seconds > 0
    assert all(torch.isfinite(p).all() for p in pipe.models["shape_slat_flow_model_512"].parameters())
    r = pipe.run(EXAMPLE, resolution=512, seed=1, steps=1)
    assert r.tokens["shape_lr_flow"] == ReferenceStructure().occupancy(r.resolution // 16).shape[0]
    assert r.faces.shape[0] == ReferenceStructure().surface_mesh(r.resolution)[1].shape[0]
