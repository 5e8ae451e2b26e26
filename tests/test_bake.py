"""bake.py's banded passes give what one pass over the whole texture gives: bake_texture band by band,
the seam fill in place a band at a time (against the whole-image formulation), and the rasteriser's
owner of texel centres on shared edges."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pixal3d_rt.mesh import bake, glb
from pixal3d_rt.mesh.uv import uv_unwrap
from test_glb import dual_grid_mesh, sphere_sdf

G = 24


@pytest.fixture(scope="module")
def asset():
    """A coarse UV-mapped stand-in of a decoded sphere, a voxel off it, with the sphere as the surface."""
    v, f, coords = dual_grid_mesh(lambda p: sphere_sdf(p, 0.3), G)
    centre = (coords + 0.5) / G - 0.5
    attrs = np.concatenate([0.5 + 0.5 * np.sin(6 * centre), np.full((len(coords), 1), 0.2)], 1).astype(np.float32)
    sv, sf = glb.simplify_mesh(*glb.clean_mesh(v, f), 400)
    vmap, f_uv, uvs = uv_unwrap(sv * 1.03, sf, texture_size=61)
    return {"vertices": torch.from_numpy(sv[vmap] * 1.03).float(), "faces": torch.from_numpy(f_uv),
            "uvs": torch.from_numpy(uvs), "coords": torch.from_numpy(coords).long(),
            "attrs": torch.from_numpy(attrs), "surface": (torch.from_numpy(v).float(), torch.from_numpy(f).long())}


@pytest.mark.parametrize("project", [False, True])
def test_bake_bands_match_one_pass(asset, monkeypatch, project):
    S = 61  # odd, and no multiple of the band's rows
    a = asset
    kw = {"surface": a["surface"] if project else None, "surface_cell": 3.0 / G}

    def run(**more):
        info = {}
        maps, mask = bake.bake_texture(a["vertices"], a["faces"], a["uvs"], a["coords"], a["attrs"], G, S,
                                       info=info, **kw, **more)
        return maps, mask, info

    monkeypatch.setattr(bake, "BAND_TEXELS", S * S)
    one, one_mask, one_info = run(fill=False)
    one_filled, _, _ = run()
    monkeypatch.setattr(bake, "BAND_TEXELS", 3 * S + 5)  # rows of 3, a short last band
    monkeypatch.setattr(bake, "PROJECT_PAIRS", 64)
    banded, mask, info = run(fill=False)
    assert 0.05 < mask.float().mean() < 0.9
    assert torch.equal(mask, one_mask) and torch.equal(banded, one)
    assert info == one_info and (not project or info["projected"] > 0.9)
    # the in-place fill of the bake is fill_uncovered's
    filled, _, _ = run()
    assert torch.equal(filled, bake.fill_uncovered(banded, mask))
    assert torch.equal(filled[mask], one[mask])
    torch.testing.assert_close(filled, one_filled, atol=1e-6, rtol=0)


def test_rasterize_uv_shared_edges_take_the_higher_face():
    """Vertices on texel centres put centres exactly on shared edges: each goes to the highest-numbered
    face containing it, with that face's barycentrics, whatever the chunking."""
    S, step = 64, 6  # a power of two: the UVs are exact in float32
    g = (np.arange(2, S - 2, step) + 0.5) / S
    k = len(g)
    X, Y = np.meshgrid(g, g)
    uvs = np.stack([X.ravel(), Y.ravel()], 1)
    i = (np.arange(k - 1)[:, None] * k + np.arange(k - 1)[None]).ravel()
    faces = np.concatenate([np.stack([i, i + 1, i + k + 1], 1), np.stack([i, i + k + 1, i + k], 1)])
    faces = faces[np.random.default_rng(0).permutation(len(faces))]
    # every face containing each centre, in float64
    cx, cy = np.meshgrid((np.arange(S) + 0.5) / S, (np.arange(S) + 0.5) / S)
    expect = np.full((S, S), -1)
    for n, (a, b, c) in enumerate(uvs[faces]):
        det = (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
        l1 = ((cx - a[0]) * (c[1] - a[1]) - (cy - a[1]) * (c[0] - a[0])) / det
        l2 = ((b[0] - a[0]) * (cy - a[1]) - (b[1] - a[1]) * (cx - a[0])) / det
        inside = (l1 >= -1e-9) & (l2 >= -1e-9) & (1 - l1 - l2 >= -1e-9)
        expect[inside] = np.maximum(expect[inside], n)
    U, Fc = torch.from_numpy(uvs).float(), torch.from_numpy(faces)
    fid, bary = bake.rasterize_uv(U, Fc, S)
    np.testing.assert_array_equal(fid.numpy(), expect)
    ys, xs = np.nonzero(expect >= 0)
    recon = np.einsum("nk,nkc->nc", bary.numpy()[ys, xs], uvs[faces[expect[ys, xs]]])
    np.testing.assert_allclose(recon, np.stack([(xs + 0.5) / S, (ys + 0.5) / S], 1), atol=1e-6)
    for chunk in (1, 97):
        f2, b2 = bake.rasterize_uv(U, Fc, S, chunk=chunk)
        assert torch.equal(f2, fid) and torch.equal(b2, bary)


def _fill_whole_image(image, mask, dilate=3, radius=3.0):
    """The seam fill on whole images: each front one depthwise convolution over all channels, then
    recursive push-pull (the formulation the banded fill must reproduce)."""
    C = image.shape[2]
    filled = mask.clone()
    chw = torch.where(filled[..., None], image.float(), torch.zeros(())).permute(2, 0, 1)
    arrival = torch.where(filled, 0.0, math.inf)
    r = int(math.ceil(radius))
    yy, xx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
    d2 = (yy * yy + xx * xx).float()
    kernel = torch.where((d2 > 0) & (d2 <= radius * radius), 1.0 / d2.clamp_min(1), torch.zeros_like(d2))
    kernel = kernel.expand(C + 1, 1, 2 * r + 1, 2 * r + 1).contiguous()
    for k in range(1, dilate + 1):
        ring = (F.max_pool2d(filled[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0) & ~filled
        if not ring.any():
            break
        w = torch.where(filled, 1.0 / (1.0 + (k - arrival).abs()), torch.zeros_like(arrival))
        acc = F.conv2d(torch.cat([chw * w, w[None]])[None], kernel, padding=r, groups=C + 1)[0]
        chw = torch.where(ring, acc[:C] / acc[C:].clamp_min(1e-12), chw)
        filled = filled | ring
        arrival = torch.where(ring, float(k), arrival)

    def push_pull(img, wgt):
        h, w = img.shape[-2:]
        if wgt.sum() == 0:
            return img
        if min(h, w) <= 1:
            return torch.where(wgt > 0, img, (img.sum(dim=(2, 3), keepdim=True) / wgt.sum()).expand_as(img))
        ph, pw = h % 2, w % 2
        s = F.avg_pool2d(F.pad(img, (0, pw, 0, ph)), 2) * 4
        n = F.avg_pool2d(F.pad(wgt, (0, pw, 0, ph)), 2) * 4
        coarse = push_pull(torch.where(n > 0, s / n.clamp_min(1e-12), torch.zeros_like(s)), (n > 0).float())
        up = F.interpolate(coarse, size=(h + ph, w + pw), mode="bilinear", align_corners=False)[..., :h, :w]
        return torch.where(wgt > 0, img, up)

    if not filled.all():
        chw = push_pull(chw[None] * filled[None, None], filled[None, None].float())[0]
    return chw.permute(1, 2, 0).contiguous()


@pytest.mark.parametrize("shape", [(1, 1, 2), (1, 17, 3), (17, 1, 3), (6, 9, 1), (45, 70, 3), (129, 67, 6)])
@pytest.mark.parametrize("density", [0.0, 0.003, 0.05, 0.5, 1.0])
def test_fill_uncovered_bands_match_whole_image(monkeypatch, shape, density):
    rng = np.random.default_rng(sum(shape))
    H, W, C = shape
    image = torch.from_numpy(rng.random(shape).astype(np.float32))
    mask = torch.from_numpy(rng.random((H, W)) < density)
    expect = _fill_whole_image(image, mask)
    for band in (5 * W + 1, 2 * W, 7, 1 << 21):  # one-row to whole-image bands, odd and even row counts
        monkeypatch.setattr(bake, "BAND_TEXELS", band)
        got = bake.fill_uncovered(image, mask)
        assert got.shape == (H, W, C) and got.is_contiguous()
        assert torch.equal(got[mask], image[mask])
        # the same arithmetic; on the CPU a convolution's or pooling's summation order may differ
        torch.testing.assert_close(got, expect, atol=1e-6, rtol=0)
