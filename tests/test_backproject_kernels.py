"""Triton back-projection (kernels/backproject_triton.py) under TRITON_INTERPRET=1 against the
torch reference (`ImageConditioner.project`, i.e. upstream's dense-grid-then-gather values):
awkward grids, maps and channel counts, batches, points off the image (border clamp), bf16 maps,
a lazy NAF map evaluated at the sampled texels only, N = 0 and N = 1."""

import pytest
import torch

from pixal3d_rt.conditioning import Camera, ImageConditioner, NAFSampler, bilinear_taps, project_voxels
from pixal3d_rt.models.naf import NAF

from kernel_inputs import interpreted, interpreted_module, random_coords


@pytest.fixture(scope="module")
def bp():
    """kernels.backproject_triton with its kernels built by Triton's CPU interpreter."""
    return interpreted_module("pixal3d_rt.kernels.backproject_triton", "_gather_taps_kernel")


def reference(coords, R, cam, S, maps):
    return ImageConditioner(None).project(coords, R, cam, S, maps)  # CPU: the torch reference


@interpreted
@pytest.mark.parametrize(
    "R,S,n,fov,mesh_scale",
    [
        (13, 160, 301, 0.63, 0.95),  # N not a multiple of the blocks; many points off the image
        (6, 96, 217, 1.1, 1.0),
        (17, 48, 1, 0.4, 1.2),  # single voxel
    ],
)
def test_backproject_matches_reference(bp, R, S, n, fov, mesh_scale):
    cam = Camera.from_fov(fov, mesh_scale=mesh_scale)
    g = torch.Generator().manual_seed(R * 7 + n)
    lr = torch.randn(2, 130, 9, 11, generator=g)  # per-batch maps, C past one channel block, h != w
    hr = torch.randn(1, 33, 37, 31, generator=g).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last
    coords = random_coords(R, n, 2 if n > 1 else 1, seed=R)
    params = bp.camera_params(cam.fov, cam.distance, S, cam.mesh_scale, "cpu")
    # the taps themselves: same texels as the reference projection + grid_sample taps
    rows, cols, w_ref = bilinear_taps(project_voxels(coords[:, 1:], R, cam.fov, cam.distance, S, cam.mesh_scale), 37, 31)
    idx, wts = bp.voxel_taps(coords, R, params, S, 37, 31)
    assert torch.equal(idx.long(), rows * 31 + cols)
    torch.testing.assert_close(wts, w_ref, atol=1e-6, rtol=0)
    got = bp.backproject(coords, R, cam.fov, cam.distance, cam.mesh_scale, S, [lr, hr])
    want = reference(coords, R, cam, S, [lr, hr])
    assert got.shape == (n, 163) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@interpreted
def test_half_precision_map_and_empty_input(bp):
    cam = Camera.from_fov(0.8)
    g = torch.Generator().manual_seed(1)
    lr = torch.randn(1, 20, 5, 5, generator=g).to(torch.bfloat16)
    coords = random_coords(9, 50, 1, seed=3)
    got = bp.backproject(coords, 9, cam.fov, cam.distance, cam.mesh_scale, 80, [lr])
    torch.testing.assert_close(got, reference(coords, 9, cam, 80, [lr]), atol=1e-5, rtol=1e-5)
    empty = torch.empty(0, 4, dtype=torch.int32)
    assert bp.backproject(empty, 9, cam.fov, cam.distance, cam.mesh_scale, 80, [lr, lr]).shape == (0, 40)


@interpreted
def test_lazy_naf_map_matches_full_map(bp):
    torch.manual_seed(0)
    naf = NAF(dim=32, heads_attn=2, heads_rope=2, kernel_size=3).eval()
    with torch.no_grad():
        for p in naf.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    g = torch.Generator().manual_seed(5)
    image, pmap = torch.rand(1, 3, 80, 80, generator=g), torch.randn(1, 24, 5, 5, generator=g)
    T, R, S = 35, 11, 80  # dilation 7, groups of 5
    cam = Camera.from_fov(0.75)
    coords = random_coords(R, 140, 1, seed=2)
    with torch.no_grad():
        full = naf(image, pmap, (T, T))
        want = reference(coords, R, cam, S, [pmap, full])
        lazy = NAFSampler(naf, image, pmap, T)
        lazy.chunk_texels = 37  # several texel slices: the gather accumulates across launches
        got = bp.backproject(coords, R, cam.fov, cam.distance, cam.mesh_scale, S, [pmap, lazy])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@interpreted
def test_switch_and_guard(bp, monkeypatch):
    coords = torch.zeros(3, 4, dtype=torch.int32)
    assert not bp.supported(coords, [torch.zeros(1, 2, 3, 3)])  # CPU tensors: the reference runs
    monkeypatch.setenv(bp.DISABLE_ENV, "1")
    assert not bp.enabled()
    monkeypatch.setenv(bp.DISABLE_ENV, "")
    assert bp.enabled()


def random_naf(dim=32, kernel_size=3, seed=0):
    torch.manual_seed(seed)
    naf = NAF(dim=dim, heads_attn=2, heads_rope=2, kernel_size=kernel_size).eval()
    with torch.no_grad():  # GroupNorm defaults (1, 0) and zero biases would hide mistakes
        for p in naf.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return naf


@pytest.mark.parametrize(
    "S,T,P,band_rows",
    [
        (31, 20, 4, 3),  # guide rows not a multiple of T: overlapping pooling windows; many bands
        (30, 23, 7, 4),  # T not a multiple of P: overlapping key windows
        (40, 20, 5, 3),  # Pixal3D's aligned case (S = 2T, T = dP), bands not aligned to the halo
        (21, 21, 3, 100),  # one band
    ],
)
def test_banded_encoder_matches_full_map(S, T, P, band_rows):
    """The lazy NAF map's queries/keys (banded encoder, two-pass GroupNorm) against the full map."""
    naf = random_naf(dim=16, seed=S)
    g = torch.Generator().manual_seed(T)
    image = torch.rand(1, 3, S, S + 3, generator=g)  # non-square: the width is never banded
    size, lr = (T, T + 2), (P, P + 1)
    rows, cols = torch.randint(0, T, (60,), generator=g), torch.randint(0, T + 2, (60,), generator=g)
    rows[:2], cols[:2] = torch.tensor([0, T - 1]), torch.tensor([T + 1, 0])
    with torch.no_grad():
        q, k = naf.queries_keys(image, lr, size)
        q_sel, keys = naf.queries_keys_at(image, lr, size, rows, cols, band_rows=band_rows)
    torch.testing.assert_close(q_sel, q[:, :, rows, cols].permute(0, 2, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(keys, k, atol=1e-5, rtol=1e-5)
