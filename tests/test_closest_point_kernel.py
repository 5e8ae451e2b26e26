"""Triton nearest-triangle kernel (kernels/closest_point_triton.py) under TRITON_INTERPRET=1 against
the torch path of `closest_points` and the all-pairs oracle: awkward point counts (not multiples of
the block), points beyond reach, triangles in many cells, collinear (degenerate) triangles."""
import pytest
import torch

from pixal3d_rt.mesh.project import TriangleGrid, closest_points, closest_points_brute

from kernel_inputs import interpreted, interpreted_module


@pytest.fixture(scope="module")
def cpt():
    return interpreted_module("pixal3d_rt.kernels.closest_point_triton", "_closest_kernel")


def _surface(n=9, seed=0):
    """a bumpy sheet of 2 n^2 triangles on [0,1]^2 plus a few collinear ones"""
    g = torch.Generator().manual_seed(seed)
    r = torch.linspace(0, 1, n + 1)
    x, y = torch.meshgrid(r, r, indexing="ij")
    z = 0.05 * torch.sin(7 * x) * torch.cos(5 * y) + 0.01 * torch.rand(x.shape, generator=g)
    v = torch.stack([x, y, z], -1).reshape(-1, 3)
    i = torch.arange(n)[:, None] * (n + 1) + torch.arange(n)[None, :]
    i = i.reshape(-1)
    f = torch.cat([torch.stack([i, i + n + 1, i + 1], 1), torch.stack([i + 1, i + n + 1, i + n + 2], 1)])
    line = torch.tensor([[0.2, 0.3, 0.2], [0.5, 0.3, 0.2], [0.8, 0.3, 0.2]])  # collinear, above the sheet
    v = torch.cat([v, line])
    k = v.shape[0] - 3
    f = torch.cat([f, torch.tensor([[k, k + 1, k + 2], [k, k, k + 1]])])
    return v.float(), f


@interpreted
@pytest.mark.parametrize("n_points,cell", [(1, 0.2), (301, 0.15), (133, 0.07)])
def test_kernel_matches_the_torch_path(cpt, n_points, cell):
    v, f = _surface()
    g = torch.Generator().manual_seed(n_points)
    pts = torch.rand(n_points, 3, generator=g) * torch.tensor([1.2, 1.2, 0.6]) - torch.tensor([0.1, 0.1, 0.3])
    grid = TriangleGrid(v, f, cell)
    d_ref, f_ref, b_ref = closest_points(pts, v, f, cell, grid=grid, kernel=False)
    d, fc, b = closest_points(pts, v, f, cell, grid=grid, kernel=True)
    found = torch.isfinite(d_ref)
    assert torch.equal(torch.isfinite(d), found) and torch.equal(fc < 0, ~found)
    assert 0 < int(found.sum()) and (n_points == 1 or int((~found).sum()) > 0)  # both kinds present
    torch.testing.assert_close(d[found], d_ref[found], atol=1e-6, rtol=1e-5)
    # the same nearest point (the face may differ only where two are equally near: a shared edge)
    q = (b[found][:, :, None] * v[f[fc[found]]]).sum(1)
    q_ref = (b_ref[found][:, :, None] * v[f[f_ref[found]]]).sum(1)
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=0)
    assert (fc[found] == f_ref[found]).float().mean() > 0.95
    assert (b[~found] == 0).all() and torch.isinf(d[~found]).all()
    # the exact answer where the nearest triangle is within reach
    d_all, _, _ = closest_points_brute(pts, v, f)
    near = d_all < cell
    torch.testing.assert_close(d[near], d_all[near], atol=1e-5, rtol=1e-5)


@interpreted
def test_kernel_finds_the_collinear_triangles_nearest_edge(cpt):
    v, f = _surface()
    pts = torch.tensor([[0.35, 0.31, 0.21], [0.9, 0.3, 0.2], [0.5, 0.29, 0.25]])  # nearest: the collinear ones
    d, fc, b = closest_points(pts, v, f, 0.2, kernel=True)
    d_ref, fc_ref, b_ref = closest_points_brute(pts, v, f)
    torch.testing.assert_close(d, d_ref, atol=1e-6, rtol=1e-5)
    assert (fc >= f.shape[0] - 2).all()
    torch.testing.assert_close((b[:, :, None] * v[f[fc]]).sum(1), (b_ref[:, :, None] * v[f[fc_ref]]).sum(1), atol=1e-6, rtol=0)


def test_kernel_is_the_default_on_cuda_only(monkeypatch):
    from pixal3d_rt.mesh import project

    assert project._kernel_module(torch.zeros(1, 3), None) is None
    assert project._kernel_module(torch.zeros(1, 3), False) is None
    if torch.cuda.is_available():
        pts = torch.zeros(1, 3, device="cuda")
        assert project._kernel_module(pts, None) is not None
        monkeypatch.setenv("PIXAL3D_DISABLE_TRITON_CLOSEST", "1")
        assert project._kernel_module(pts, None) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernel_on_the_gpu_matches_the_torch_path():
    v, f = _surface(n=97, seed=3)
    g = torch.Generator().manual_seed(5)
    pts = torch.rand(200_003, 3, generator=g) * torch.tensor([1.2, 1.2, 0.4]) - torch.tensor([0.1, 0.1, 0.2])
    v, f, pts = v.cuda(), f.cuda(), pts.cuda()
    d_ref, f_ref, b_ref = closest_points(pts, v, f, 0.03, kernel=False)
    d, fc, b = closest_points(pts, v, f, 0.03)  # the default on CUDA: the kernel
    found = torch.isfinite(d_ref)
    assert torch.equal(torch.isfinite(d), found) and 0 < int(found.sum()) < len(pts)
    # fp32 both, with the GPU's fused multiply-adds in the kernel: as close to the float64 truth as
    # the torch path is, on points within reach
    sub = torch.nonzero(found)[:1500, 0]
    d_true, _, _ = closest_points_brute(pts[sub].cpu(), v.cpu(), f.cpu())
    err_kernel = (d[sub].cpu() - d_true).abs().max().item()
    err_torch = (d_ref[sub].cpu() - d_true).abs().max().item()
    assert err_kernel <= max(2 * err_torch, 1e-6), (err_kernel, err_torch)
    # its face and weights give a point at the distance it reports
    q = (b[found][:, :, None] * v[f[fc[found]]]).sum(1)
    assert ((q - pts[found]).norm(dim=1) - d[found]).abs().max().item() < 1e-5
