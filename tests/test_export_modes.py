"""Export modes (mesh/modes.py, Result.save_glb(export=...)), the re-projected bake (bake_texture with
the decoded surface) against an all-pairs projection, and the upstream mode's GLB: closed,
single-sided, webp, validator-clean."""
import json
import struct

import numpy as np
import pytest
import torch

from pixal3d_rt.mesh import glb
from pixal3d_rt.mesh.bake import bake_texture, rasterize_uv, sample_sparse_voxels
from pixal3d_rt.mesh.modes import EXPORT_MODES, export_settings
from pixal3d_rt.mesh.project import closest_points_brute
from pixal3d_rt.pipeline import Result
from test_glb import _run_validator, dual_grid_mesh, sphere_sdf

G = 24


def _asset(grid=G):
    v, f, coords = dual_grid_mesh(lambda p: sphere_sdf(p, 0.3), grid)
    centre = (coords + 0.5) / grid - 0.5
    attrs = np.concatenate([0.5 + 0.5 * np.sin(6 * centre), np.full((len(coords), 1), 0.2),
                            np.full((len(coords), 1), 0.7), np.ones((len(coords), 1))], 1)
    return v, f, coords, attrs.astype(np.float32)


def test_export_settings_layering():
    d = {"texture_size": 256, "decimation_target": 20_000, "device": None}
    fast = export_settings(None, d)
    assert fast["texture_size"] == 256 and fast["decimation_target"] == 20_000 and not fast["remesh"]
    assert not fast["project_texels"] and fast["image_format"] == "png"
    up = export_settings("upstream", d)
    assert (up["texture_size"], up["decimation_target"], up["image_format"]) == (4096, 1_000_000, "webp")
    assert up["remesh"] and up["remesh_band"] == 1 and up["remesh_project"] == 0 and up["double_sided"] is False
    mixed = export_settings("upstream", d, texture_size=512, decimation_target=None, texture_format="png")
    assert (mixed["texture_size"], mixed["decimation_target"], mixed["image_format"]) == (512, 1_000_000, "png")
    with pytest.raises(ValueError, match="unknown export mode"):
        export_settings("best", d)
    assert set(EXPORT_MODES) == {"fast", "upstream"}


def _glb_json(path):
    data = open(path, "rb").read()
    n = struct.unpack_from("<I", data, 12)[0]
    return json.loads(data[20:20 + n])


@pytest.mark.parametrize("mode", ["fast", "upstream"])
def test_save_glb_modes_write_valid_files(mode, tmp_path):
    v, f, coords, attrs = _asset()
    r = Result(torch.from_numpy(v), torch.from_numpy(f), torch.from_numpy(coords), torch.from_numpy(attrs), G)
    path = tmp_path / f"{mode}.glb"
    stats = r.save_glb(path, texture_size=128, export=mode)
    doc = _glb_json(path)
    mat = doc["materials"][0]
    if mode == "upstream":
        assert stats["closed"] and stats["double_sided"] is False and not mat.get("doubleSided", False)
        assert "EXT_texture_webp" in doc.get("extensionsUsed", [])
        assert stats["remesh"]["faces"] > 0 and stats["faces"] <= 1_000_000
        assert stats["projected"] > 0.99  # every texel found the decoded surface within reach
    else:
        assert "EXT_texture_webp" not in doc.get("extensionsUsed", []) and "projected" not in stats
    rc, report = _run_validator(path)
    assert report["numErrors"] == 0, report["errors"]
    assert rc == 0


def test_remeshed_export_is_closed_after_simplification(tmp_path):
    v, f, coords, attrs = _asset()
    _, stats = glb.build_asset(v, f, coords, attrs, G, remesh=True, decimation_target=3000, texture_size=64,
                               double_sided=False)
    assert stats["remesh"]["faces"] > 3000 and stats["faces"] <= 3000 * 1.1 and stats["closed"]


@pytest.mark.parametrize("remesh", [False, True])
def test_export_with_parallel_simplification_is_closed_and_valid(tmp_path, monkeypatch, remesh):
    """Both decimation passes of the fast mode (and the remesh's one) in two worker processes: the
    GLB stays closed and single-sided and passes the validator."""
    from pixal3d_rt.mesh import simplify

    monkeypatch.setattr(simplify, "PARALLEL_MIN_FACES", 0)
    monkeypatch.setattr(simplify, "usable_cores", lambda: 2)
    monkeypatch.setattr(simplify, "PARALLEL_MIN_CORES", 2)
    monkeypatch.delenv(simplify.DISABLE_PARALLEL_ENV, raising=False)
    stitched = []
    real_stitch = simplify._stitch
    monkeypatch.setattr(simplify, "_stitch", lambda *a, **k: stitched.append(1) or real_stitch(*a, **k))
    grid = 40
    v, f, coords, attrs = _asset(grid)
    path = tmp_path / "parallel.glb"
    try:
        stats = glb.export_glb(path, v, f, coords, attrs, grid, decimation_target=len(f) // 8, texture_size=128,
                               remesh=remesh)
    finally:
        simplify.shutdown_workers()
    assert len(stitched) == (1 if remesh else 2)
    assert stats["closed"] and stats["double_sided"] is False
    assert stats["faces"] <= len(f) // 8
    rc, report = _run_validator(path)
    assert report["numErrors"] == 0, report["errors"]
    assert rc == 0


def test_projected_bake_matches_all_pairs_projection():
    """Bake a coarse, offset stand-in surface with the decoded sphere as the projection target; every
    texel must get the voxels' value at its brute-force nearest point on the sphere."""
    v, f, coords, attrs = _asset()
    sv, sf = glb.simplify_mesh(*glb.clean_mesh(v, f), 400)
    sv = sv * 1.03  # off the decoded surface by about a voxel
    vmap, f_uv, uvs = __import__("pixal3d_rt.mesh.uv", fromlist=["uv_unwrap"]).uv_unwrap(sv, sf, texture_size=64)
    V = torch.from_numpy(sv[vmap]).float()
    Fu = torch.from_numpy(f_uv)
    U = torch.from_numpy(uvs)
    C, A = torch.from_numpy(coords).long(), torch.from_numpy(attrs)
    surf = (torch.from_numpy(v), torch.from_numpy(f).long())
    info = {}
    maps, mask = bake_texture(V, Fu, U, C, A, G, 64, fill=False, surface=surf, surface_cell=3.0 / G, info=info)
    assert info["projected"] == 1.0
    fid, bary = rasterize_uv(U, Fu, 64)
    pts = (bary[mask][:, :, None] * V[Fu[fid[mask]]]).sum(1)
    _, face, bc = closest_points_brute(pts, surf[0], surf[1])
    q = (bc[:, :, None] * surf[0][surf[1][face]]).sum(1)
    expect = sample_sparse_voxels(q, C, A, G)
    assert torch.allclose(maps[mask], expect, atol=1e-4)
    plain, _ = bake_texture(V, Fu, U, C, A, G, 64, fill=False)
    assert (plain[mask] - expect).abs().max() > 1e-2  # the projection changes what is sampled


def test_count_charts_matches_a_graph_walk():
    rng = np.random.default_rng(0)
    for _ in range(5):
        n = 200
        f = rng.integers(0, n, (120, 3))
        got = glb.count_charts(f, n)
        # plain BFS over the face-vertex graph
        adj = {}
        for i, tri in enumerate(f):
            for x in tri:
                adj.setdefault(int(x), []).append(i)
        seen, charts = np.zeros(len(f), bool), 0
        for s in range(len(f)):
            if seen[s]:
                continue
            charts += 1
            stack = [s]
            seen[s] = True
            while stack:
                t = stack.pop()
                for x in f[t]:
                    for u in adj[int(x)]:
                        if not seen[u]:
                            seen[u] = True
                            stack.append(u)
        assert got == charts


def test_quality_stats_are_reported():
    v, f, coords, attrs = _asset()
    _, stats = glb.build_asset(v, f, coords, attrs, G, texture_size=128, decimation_target=2000)
    assert stats["charts"] >= 1 and 0 < stats["coverage"] < 1
    # 128² texels over a sphere of radius 0.3 (area 1.13): at most sqrt(128² / 1.13) per unit length
    assert 0 < stats["texel_density"] <= np.sqrt(128 ** 2 / (4 * np.pi * 0.29 ** 2))
    assert stats["texels_per_voxel"] == pytest.approx(stats["texel_density"] / G)


def test_infer_has_the_export_options_and_refuses_bad_ones(tmp_path):
    from click.testing import CliRunner

    from pixal3d_rt.cli import main

    help_text = CliRunner().invoke(main, ["infer", "--help"]).output
    for opt in ("--export", "--decimate", "--decimation-target", "--texture-size", "--texture-format"):
        assert opt in help_text
    out = tmp_path / "x.glb"
    for bad in (["--texture-format", "jpg"], ["--export", "best"], ["--decimate", "5"]):
        r = CliRunner().invoke(main, ["infer", "--preset", "tiny", "--image", "examples/mug.png", "--output", str(out), *bad])
        assert r.exit_code == 2 and not out.exists(), (bad, r.output)


def test_preview_shows_the_photo_side_in_front(tmp_path):
    """Red where the grid frame faces the camera (+z), blue behind: the first view (the photo's side)
    is red in the middle, the third (the back) blue; the corners are background."""
    from PIL import Image

    v, f, coords, _ = _asset(16)
    centre = (coords + 0.5) / 16 - 0.5
    red = (centre[:, 2] > 0)[:, None]
    rgb = np.where(red, [[0.9, 0.1, 0.1]], [[0.1, 0.1, 0.9]])
    attrs = np.concatenate([rgb, np.zeros((len(coords), 1)), np.ones((len(coords), 2))], 1).astype(np.float32)
    r = Result(torch.from_numpy(v), torch.from_numpy(f), torch.from_numpy(coords), torch.from_numpy(attrs), 16)
    png = tmp_path / "p.preview.png"
    stats = r.save_glb(tmp_path / "p.glb", texture_size=128, preview=png)
    assert stats["preview"] == str(png)
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    size = img.shape[0]
    views = [img[:, k * size:(k + 1) * size] for k in range(img.shape[1] // size)]
    assert len(views) == 4
    mid = slice(size // 2 - 4, size // 2 + 4)
    front, back = views[0][mid, mid].mean((0, 1)), views[2][mid, mid].mean((0, 1))
    assert front[0] > 2 * front[2] and back[2] > 2 * back[0], (front, back)
    for view in views:
        assert (view[:3, :3] == 255).all()
