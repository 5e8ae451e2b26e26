"""Image conditioning: DINOv3 tokens, camera/projection, sparse vs dense sampling, golden parity."""
import json
import math

import pytest
import torch

from pixal3d_rt.conditioning import (
    Camera,
    ImageConditioner,
    NAFSampler,
    dense_coords,
    distance_from_fov,
    project_voxels,
    sample_features,
    world_points,
)
from pixal3d_rt.models.dinov3 import build_dinov3, extract_tokens
from pixal3d_rt.models.naf import NAF

from golden_fixtures import golden
from kernel_inputs import random_coords

TINY_DINO = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=16,
    num_register_tokens=4, rope_theta=100.0, key_bias=False, layerscale_value=1.0,
)


def perturbed(module, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return module


@pytest.mark.parametrize("name", ["proj_cond_ss", "proj_cond_naf"])
def test_golden_proj_cond(name):
    import pixal3d_rt.tools.parity_cond  # noqa: F401  (registers the runners)
    from pixal3d_rt.tools.parity import check_fixture, load_fixture

    fx = load_fixture(golden(f"{name}.json"))
    ok, comps, err = check_fixture(fx)
    assert ok, (err, [c for c in comps if not c.ok])
    keys = {c.key for c in comps}
    assert {"out.z_global", "out.z_proj"} <= keys
    if name == "proj_cond_naf":
        assert {"out.sparse.proj.feats", "mid.naf_hr", "mid.project100.grid_ndc"} <= keys


def test_grid_points_match_upstream_buffer():
    from safetensors.torch import load_file

    path = golden("proj_cond_ss.safetensors")
    t = load_file(str(path))
    R = json.loads(path.with_suffix(".json").read_text())["config"]["args"]["grid_resolution"]
    # upstream's buffer is the rotated grid before the /mesh_scale/2 scaling
    torch.testing.assert_close(world_points(dense_coords(R), R) * 2, t["w.proj_grid.grid_points"], rtol=0, atol=0)


def test_dinov3_schema_meta_device():
    schema = json.loads(golden("schema", "dinov3_vitl16.json").read_text())
    with torch.device("meta"):
        m = build_dinov3(schema["config"])
    sd = m.state_dict()
    want = {e["key"]: tuple(e["shape"]) for e in schema["state_dict"]}
    assert {k: tuple(v.shape) for k, v in sd.items()} == want


def test_extract_tokens_is_forward_with_plain_final_norm():
    """transformers' forward with its final norm made the identity-affine eps-1e-5 norm must give
    the same tokens as extract_tokens applied to the un-normalised image."""
    m = perturbed(build_dinov3(TINY_DINO, attn_implementation="eager"))
    image = torch.rand(1, 3, 48, 64)  # non-square: 3 x 4 patches
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        got = extract_tokens(m, image)
        m.norm.weight.fill_(1.0)
        m.norm.bias.zero_()
        m.norm.eps = 1e-5
        want = m(pixel_values=(image - mean) / std).last_hidden_state
    assert got.shape == (1, 1 + 4 + 12, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_encode_splits_global_and_patch_map():
    cond = ImageConditioner(perturbed(build_dinov3(TINY_DINO)))
    image = torch.rand(1, 3, 64, 64)
    z_global, pmap = cond.encode(image)
    tokens = extract_tokens(cond.dino, image)
    assert z_global.shape == (1, 5, 32) and pmap.shape == (1, 32, 4, 4)
    # patch token index 1+4 + r*P + c is map row r (image y), column c (image x)
    assert torch.equal(pmap[0, :, 2, 3], tokens[0, 5 + 2 * 4 + 3])
    assert torch.equal(z_global, tokens[:, :5])


@pytest.mark.parametrize("fov", [0.2, 0.7, 1.2])
def test_distance_from_fov(fov):
    d = distance_from_fov(fov)
    assert abs(d - 0.5 / math.tan(fov / 2)) < 1e-6 * d
    # its defining property: grid point (-1, 0, 0) lands on the left image edge (u = 0)
    R, S = 9, 512
    g = project_voxels(torch.tensor([[0, (R - 1) // 2, (R - 1) // 2]]), R, fov, d, S)
    u = (g[0, 0] + 1) / 2 * S - 0.5
    assert abs(float(u)) < 1e-3


@pytest.mark.parametrize("R,S,fov,mesh_scale", [(7, 96, 0.55, 1.0), (13, 160, 0.9, 0.85), (2, 64, 0.3, 1.3)])
def test_project_voxels_closed_form(R, S, fov, mesh_scale):
    """Against the closed form of pixal3d.md §1.2 in float64: x_c = x/2s, y_c = y/2s, z_c = z/2s − d."""
    d = distance_from_fov(fov)
    idx = dense_coords(R)
    g = project_voxels(idx, R, fov, d, S, mesh_scale)
    p = -1 + 2 * idx.double() / (R - 1)
    x, y, z = (p / mesh_scale / 2).unbind(-1)
    f = S / (2 * math.tan(fov / 2))
    u = f * x / (d - z) + S / 2
    v = -f * y / (d - z) + S / 2
    want = (torch.stack([u, v], -1) + 0.5) / S * 2 - 1
    torch.testing.assert_close(g.double(), want, atol=2e-6, rtol=0)


@pytest.mark.parametrize("R,S,n", [(11, 160, 300), (5, 48, 40), (17, 96, 900)])
def test_sparse_project_equals_dense_gather(R, S, n):
    cond = ImageConditioner(perturbed(build_dinov3(TINY_DINO)))
    cam = Camera.from_fov(0.63, mesh_scale=0.95)
    g = torch.Generator().manual_seed(R)
    lr = torch.randn(2, 32, S // 16, S // 16, generator=g)
    hr = torch.randn(2, 32, 37, 37, generator=g)
    coords = random_coords(R, n, 2, seed=R)
    sparse = cond.project(coords, R, cam, S, [lr, hr])
    dense = cond.project_dense([lr, hr], R, cam, S).reshape(2, R, R, R, 64)
    c = coords.long()
    want = dense[c[:, 0], c[:, 1], c[:, 2], c[:, 3]]
    assert sparse.shape == (n, 64)
    torch.testing.assert_close(sparse, want, atol=1e-6, rtol=1e-6)


def test_naf_sampler_equals_full_map_sampling():
    torch.manual_seed(0)
    naf = perturbed(NAF(dim=32, heads_attn=2, heads_rope=2, kernel_size=5).eval())
    g = torch.Generator().manual_seed(5)
    image = torch.rand(1, 3, 64, 64, generator=g)
    lr = torch.randn(1, 24, 6, 6, generator=g)
    T = 33  # not a multiple of P = 6: dilation 5 with groups of unequal length
    pts = torch.rand(500, 2, generator=g) * 2.4 - 1.2  # includes points outside [-1, 1]: border clamp
    pts[:4] = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [1 - 1 / T, -1 + 1 / T], [0.0, 0.0]])  # exact texel corners/centres
    with torch.no_grad():
        full = naf(image, lr, (T, T))
        want = sample_features(full, pts)
        got = NAFSampler(naf, image, lr, T, max_elements=4000).sample(pts)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_project_with_naf_sampler_equals_full_map():
    naf = perturbed(NAF(dim=32, heads_attn=2, heads_rope=2, kernel_size=3).eval())
    cond = ImageConditioner(perturbed(build_dinov3(TINY_DINO)), naf)
    image = torch.rand(1, 3, 80, 80)
    cam = Camera.from_fov(0.8)
    z_global, pmap = cond.encode(image)
    T = 35  # dilation 7, groups of 5
    coords = random_coords(9, 120, 1, seed=9)
    enc = cond.encode(image)
    full = cond.project(coords, 9, cam, 80, [pmap, cond.naf_map(image, pmap, T)])
    lazy = cond.project(coords, 9, cam, 80, [enc, cond.naf_sampler(image, enc, T)])
    assert full.shape == (120, 64)
    torch.testing.assert_close(lazy, full, atol=1e-5, rtol=1e-5)
    # inference.py's camera_params dict is accepted as the camera
    as_dict = {"camera_angle_x": cam.fov, "distance": cam.distance, "mesh_scale": cam.mesh_scale}
    assert torch.equal(cond.project(coords, 9, as_dict, 80, enc), full[:, :32])
