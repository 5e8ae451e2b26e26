"""GLB export (pixal3d_rt.mesh.glb / bake / uv) on synthetic inputs, CPU only.

The synthetic input mimics the FlexiDualGrid extraction: one vertex per active voxel, one quad per
sign-changing grid edge, quads oriented by axis only (about half of the faces point inward), plus a
sparse voxel attribute field that is a known function of position. Checks are made against that
function, against brute-force reference implementations, against the raw glTF file (parsed here,
independently of trimesh), and with the Khronos glTF-Validator.
"""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from pixal3d_rt import files
from pixal3d_rt.mesh import bake, glb, uv

TESTS = Path(__file__).resolve().parent
VALIDATOR_JS = TESTS / "gltf_validate.mjs"


# --------------------------------------------------------------------------------------------------
# synthetic inputs


def torus_sdf(p, R=0.27, r=0.11):
    q = np.stack([np.sqrt(p[..., 0] ** 2 + p[..., 2] ** 2) - R, p[..., 1]], -1)
    return np.linalg.norm(q, axis=-1) - r


def sphere_sdf(p, r=0.3, c=(0.0, 0.0, 0.0)):
    return np.linalg.norm(p - np.asarray(c), axis=-1) - r


def dual_grid_mesh(sdf, G):
    """(vertices [V,3] f32, faces [F,3] i32, active voxel coords [V,3] i32) of a dual-grid surface."""
    c = np.arange(G + 1) / G - 0.5
    inside = sdf(np.stack(np.meshgrid(c, c, c, indexing="ij"), -1)) < 0
    quads = []
    for a in range(3):
        s0 = [slice(None)] * 3
        s1 = [slice(None)] * 3
        s0[a], s1[a] = slice(0, G), slice(1, G + 1)
        edge = np.argwhere(inside[tuple(s0)] != inside[tuple(s1)])
        b, d = [x for x in range(3) if x != a]
        cells = []
        for db, dd in [(-1, -1), (0, -1), (0, 0), (-1, 0)]:
            cc = edge.copy()
            cc[:, b] += db
            cc[:, d] += dd
            cells.append(cc)
        cells = np.stack(cells, 1)
        quads.append(cells[np.all((cells >= 0) & (cells < G), axis=(1, 2))])
    quads = np.concatenate(quads)
    flat = (quads[..., 0] * G + quads[..., 1]) * G + quads[..., 2]
    uniq, inv = np.unique(flat, return_inverse=True)
    inv = inv.reshape(-1, 4)
    coords = np.stack([uniq // (G * G), (uniq // G) % G, uniq % G], -1)
    centre = (coords + 0.5) / G - 0.5
    h = 1e-4
    grad = np.stack([(sdf(centre + h * e) - sdf(centre - h * e)) / (2 * h) for e in np.eye(3)], -1)
    grad /= np.linalg.norm(grad, axis=-1, keepdims=True)
    verts = centre - sdf(centre)[:, None] * grad
    faces = np.concatenate([inv[:, [0, 1, 2]], inv[:, [0, 2, 3]]])
    return verts.astype(np.float32), faces.astype(np.int32), coords.astype(np.int32)


def field(p):
    """attribute field of grid-frame position; asymmetric in x, y, z so an axis or v flip shows"""
    p = np.asarray(p, dtype=np.float64)
    r = 0.5 + 0.8 * p[..., 0]
    g = 0.5 + 0.8 * p[..., 1]
    b = 0.5 - 0.8 * p[..., 2]
    metal = 0.5 + 0.6 * p[..., 2] + 0.3 * p[..., 0]
    rough = 0.5 - 0.6 * p[..., 1] + 0.3 * p[..., 2]
    alpha = 0.75 + 0.3 * p[..., 1]
    return np.clip(np.stack([r, g, b, metal, rough, alpha], -1), 0, 1).astype(np.float32)


G_TEST = 40


@pytest.fixture(scope="module")
def torus():
    v, f, c = dual_grid_mesh(torus_sdf, G_TEST)
    # an isolated unreferenced vertex and a duplicated face, as the extraction may leave
    v = np.concatenate([v, np.array([[0.4, 0.4, 0.4]], np.float32)])
    f = np.concatenate([f, f[:3]])
    attrs = field((c + 0.5) / G_TEST - 0.5)
    return v, f, c, attrs


@pytest.fixture(scope="module")
def exported(torus, tmp_path_factory):
    v, f, c, attrs = torus
    path = tmp_path_factory.mktemp("glb") / "torus.glb"
    stats = glb.export_glb(path, torch.from_numpy(v), torch.from_numpy(f), torch.from_numpy(c),
                           torch.from_numpy(attrs), G_TEST, decimation_target=2500, texture_size=256)
    return path, stats


# --------------------------------------------------------------------------------------------------
# a minimal glTF binary reader (independent of trimesh)

_COMPONENTS = {5120: np.int8, 5121: np.uint8, 5122: np.int16, 5123: np.uint16, 5125: np.uint32, 5126: np.float32}
_WIDTH = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}


def read_glb(path):
    data = Path(path).read_bytes()
    magic, version, length = struct.unpack_from("<III", data, 0)
    assert magic == 0x46546C67 and version == 2 and length == len(data)
    jlen, jtype = struct.unpack_from("<II", data, 12)
    assert jtype == 0x4E4F534A
    doc = json.loads(data[20:20 + jlen])
    off = 20 + jlen
    blen, btype = struct.unpack_from("<II", data, off)
    assert btype == 0x004E4942
    binary = data[off + 8: off + 8 + blen]

    def view(i):
        bv = doc["bufferViews"][i]
        start = bv.get("byteOffset", 0)
        return binary[start:start + bv["byteLength"]]

    def accessor(i):
        acc = doc["accessors"][i]
        raw = view(acc["bufferView"])
        dt = np.dtype(_COMPONENTS[acc["componentType"]])
        n = acc["count"] * _WIDTH[acc["type"]]
        arr = np.frombuffer(raw, dtype=dt, count=n, offset=acc.get("byteOffset", 0))
        return arr.reshape(acc["count"], -1)

    def image(i):
        from io import BytesIO

        from PIL import Image

        return np.asarray(Image.open(BytesIO(view(doc["images"][i]["bufferView"]))))

    return doc, accessor, image


def bilinear(img, uv):
    """sample an [H,W,C] image at glTF uv (u right, v down from the first row), texel centres at +0.5"""
    h, w = img.shape[:2]
    x = uv[:, 0] * w - 0.5
    y = uv[:, 1] * h - 0.5
    x0 = np.clip(np.floor(x).astype(int), 0, w - 1)
    y0 = np.clip(np.floor(y).astype(int), 0, h - 1)
    x1, y1 = np.clip(x0 + 1, 0, w - 1), np.clip(y0 + 1, 0, h - 1)
    fx, fy = np.clip(x - x0, 0, 1)[:, None], np.clip(y - y0, 0, 1)[:, None]
    im = img.astype(np.float64)
    top = im[y0, x0] * (1 - fx) + im[y0, x1] * fx
    bot = im[y1, x0] * (1 - fx) + im[y1, x1] * fx
    return top * (1 - fy) + bot * fy


# --------------------------------------------------------------------------------------------------
# end to end


def test_export_loads_as_pbr_in_trimesh(exported):
    import trimesh

    path, stats = exported
    scene = trimesh.load(path, force="scene")
    meshes = list(scene.geometry.values())
    assert len(meshes) == 1
    m = meshes[0]
    assert len(m.faces) > 0 and np.isfinite(m.vertices).all()
    assert 1000 <= len(m.faces) <= 2600  # simplified to about the 2500-face target
    mat = m.visual.material
    assert isinstance(mat, trimesh.visual.material.PBRMaterial)
    assert mat.baseColorTexture is not None and mat.metallicRoughnessTexture is not None
    assert mat.baseColorTexture.size == (256, 256) and mat.baseColorTexture.mode == "RGBA"
    assert mat.metallicRoughnessTexture.size == (256, 256)
    assert mat.alphaMode == "OPAQUE"
    assert stats["closed"] and stats["double_sided"] is False and mat.doubleSided is False
    assert stats["faces"] == len(m.faces) and stats["texture_size"] == 256
    assert not Path(str(path) + ".tmp").exists()
    assert [p.name for p in Path(path).parent.iterdir()] == [Path(path).name]


def test_textures_are_written_with_zlibs_fastest_level(exported):
    """PNG is lossless at any level: the textures are deflated at level 1 (zlib header FLEVEL 0),
    several times faster to write than the default."""
    data = Path(exported[0]).read_bytes()
    starts = [i for i in range(len(data)) if data.startswith(b"\x89PNG\r\n\x1a\n", i)]
    assert len(starts) == 2  # base colour and metallic-roughness
    for s in starts:
        idat = data.index(b"IDAT", s)
        cmf, flg = data[idat + 4], data[idat + 5]
        assert cmf & 0x0F == 8 and (cmf * 256 + flg) % 31 == 0 and flg >> 6 == 0


@pytest.mark.parametrize("image_format", ["png", "webp"])
def test_textures_encoded_in_parallel_give_trimeshs_own_bytes(image_format):
    """encode_glb encodes the two textures on threads first; the file is byte for byte the one
    trimesh writes when it encodes them itself, one after another."""
    import trimesh

    rng = np.random.default_rng(3)
    maps = rng.random((97, 97, 6)).astype(np.float32)  # odd size, not flat: the encoders do real work
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32) * 0.3
    f = np.array([[0, 1, 2]])
    uvs = np.array([[0.1, 0.1], [0.9, 0.1], [0.1, 0.9]], np.float32)
    mesh_ours = glb.build_textured_mesh(v, f, glb.vertex_normals(v, f), uvs, maps, double_sided=False)
    mesh_plain = glb.build_textured_mesh(v, f, glb.vertex_normals(v, f), uvs, maps, double_sided=False)
    ours = glb.encode_glb(mesh_ours, image_format=image_format)
    if image_format == "webp":  # trimesh left to encode them itself, with the same options
        import io

        for img in glb._texture_images(mesh_ours):  # the bytes of Pillow's effort-0 encoder, not its default's
            direct, default = io.BytesIO(), io.BytesIO()
            img.copy().save(direct, format="WEBP", **glb.WEBP_OPTIONS)
            img.copy().save(default, format="WEBP")
            assert img.pre_encoded[1] == direct.getvalue() != default.getvalue()
        for img in glb._texture_images(mesh_plain):
            img.encoderinfo = dict(glb.WEBP_OPTIONS)
    plain = trimesh.exchange.gltf.export_glb(trimesh.Scene(mesh_plain), include_normals=True,
                                             extension_webp=image_format == "webp")
    images = glb._texture_images(mesh_ours)
    assert len(images) == 2 and all(img.pre_encoded[0] == image_format.upper() for img in images)
    assert ours == plain
    assert glb.encode_glb(mesh_ours, image_format=image_format) == plain  # encoding again: the same file


def test_texture_matches_voxel_field_at_surface_points(exported):
    """Read the raw GLB: interpolate TEXCOORD_0 at face centroids, sample both textures, and compare with
    the attribute field at the same points mapped back to the grid frame ((X,Y,Z) -> (-X, Y, -Z))."""
    path, _ = exported
    doc, accessor, image = read_glb(path)
    prim = doc["meshes"][0]["primitives"][0]
    pos = accessor(prim["attributes"]["POSITION"]).astype(np.float64)
    tex = accessor(prim["attributes"]["TEXCOORD_0"]).astype(np.float64)
    idx = accessor(prim["indices"]).reshape(-1, 3).astype(np.int64)
    mat = doc["materials"][prim["material"]]["pbrMetallicRoughness"]
    base = image(doc["textures"][mat["baseColorTexture"]["index"]]["source"])
    mr = image(doc["textures"][mat["metallicRoughnessTexture"]["index"]]["source"])
    assert base.shape == (256, 256, 4) and mr.shape == (256, 256, 3)

    rng = np.random.default_rng(0)
    pick = rng.choice(len(idx), size=400, replace=False)
    w = rng.dirichlet([4.0, 4.0, 4.0], size=len(pick))  # interior points, away from chart seams
    p_glb = np.einsum("nk,nkc->nc", w, pos[idx[pick]])
    t = np.einsum("nk,nkc->nc", w, tex[idx[pick]])
    p_grid = p_glb * np.array([-1.0, 1.0, -1.0])
    want = field(p_grid)
    got_base = bilinear(base, t) / 255.0
    got_mr = bilinear(mr, t) / 255.0
    got = np.concatenate([got_base[:, :3], got_mr[:, 2:3], got_mr[:, 1:2], got_base[:, 3:4]], axis=1)
    err = np.abs(got - want)
    # trilinear over a 1/40 voxel grid with missing neighbours dropped: |grad| * h ~ 0.02, + 8-bit
    assert np.median(err) < 0.012, np.median(err, axis=0)
    assert np.quantile(err, 0.98) < 0.05, np.quantile(err, 0.98, axis=0)
    assert np.all(np.abs(got_mr[:, 0]) < 1e-6)  # R of metallicRoughness is unused (0), as upstream


def test_geometry_in_glb_frame_and_outward(exported, torus):
    """Vertices lie on the torus after (X,Y,Z) -> (-X,Y,-Z); normals and winding point outward."""
    path, _ = exported
    doc, accessor, _ = read_glb(path)
    prim = doc["meshes"][0]["primitives"][0]
    pos = accessor(prim["attributes"]["POSITION"]).astype(np.float64)
    nrm = accessor(prim["attributes"]["NORMAL"]).astype(np.float64)
    idx = accessor(prim["indices"]).reshape(-1, 3).astype(np.int64)
    grid = pos * np.array([-1.0, 1.0, -1.0])
    assert np.abs(torus_sdf(grid)).max() < 1.5 / G_TEST
    h = 1e-4
    grad = np.stack([(torus_sdf(grid + h * e) - torus_sdf(grid - h * e)) / (2 * h) for e in np.eye(3)], -1)
    grad_glb = grad * np.array([-1.0, 1.0, -1.0])
    assert np.mean(np.einsum("ij,ij->i", nrm, grad_glb) > 0.5) > 0.99
    tri = pos[idx]
    fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    cen_grid = tri.mean(1) * np.array([-1.0, 1.0, -1.0])
    g = np.stack([(torus_sdf(cen_grid + h * e) - torus_sdf(cen_grid - h * e)) / (2 * h) for e in np.eye(3)], -1)
    assert np.mean(np.einsum("ij,ij->i", fn, g * np.array([-1.0, 1.0, -1.0])) > 0) > 0.99


def _run_validator(path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the glTF-Validator check needs node >= 18")
    if not (TESTS / "node_modules" / "gltf-validator").is_dir():
        pytest.skip("npm package gltf-validator is missing: run `npm install --prefix tests` (uses tests/package.json)")
    res = subprocess.run([node, str(VALIDATOR_JS), str(path)], capture_output=True, text=True, timeout=120)
    if res.returncode == 2:
        pytest.skip(f"glTF-Validator unavailable: {res.stderr.strip()}")
    report = json.loads(res.stdout.strip().splitlines()[-1])
    return res.returncode, report


def test_khronos_validator_reports_no_errors(exported):
    path, _ = exported
    rc, report = _run_validator(path)
    assert report["numErrors"] == 0, report["errors"]
    assert report["numWarnings"] == 0, report["warnings"]
    assert rc == 0


def test_validator_catches_a_broken_file(exported, tmp_path):
    """the validator wiring itself can fail: a GLB whose index accessor points past the vertices"""
    path, _ = exported
    data = bytearray(Path(path).read_bytes())
    jlen = struct.unpack_from("<I", data, 12)[0]
    doc = json.loads(data[20:20 + jlen])
    doc["accessors"][doc["meshes"][0]["primitives"][0]["attributes"]["POSITION"]]["count"] = 3
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (jlen - len(text)) if len(text) <= jlen else b""
    if len(text) != jlen:
        pytest.skip("could not rewrite the JSON chunk in place")
    data[20:20 + jlen] = text
    bad = tmp_path / "bad.glb"
    bad.write_bytes(bytes(data))
    rc, report = _run_validator(bad)
    assert report["numErrors"] > 0 and rc == 1


def test_untextured_and_empty_exports_are_valid(tmp_path):
    v, f, _ = dual_grid_mesh(lambda p: sphere_sdf(p, 0.3), 16)
    p1 = tmp_path / "plain.glb"
    s1 = glb.export_glb(p1, v, f, None, None, 16, texture_size=64)
    assert s1["texture_size"] == 0 and s1["faces"] > 0
    doc, _, _ = read_glb(p1)
    assert "images" not in doc or not doc["images"]
    p2 = tmp_path / "empty.glb"
    s2 = glb.export_glb(p2, np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32),
                        np.zeros((0, 3), np.int32), np.zeros((0, 6), np.float32), 16)
    assert s2["faces"] == 0 and p2.exists()
    for p in (p1, p2):
        _, report = _run_validator(p)
        assert report["numErrors"] == 0, report["errors"]


# --------------------------------------------------------------------------------------------------
# atomic writing


def _small_inputs():
    v, f, c = dual_grid_mesh(lambda p: sphere_sdf(p, 0.3), 12)
    return v, f, c, field((c + 0.5) / 12 - 0.5)


@pytest.mark.parametrize("where", ["encode", "replace", "fsync"])
def test_failure_mid_export_leaves_no_file(tmp_path, monkeypatch, where):
    v, f, c, a = _small_inputs()
    target = tmp_path / "out.glb"
    old = tmp_path / "old.glb"
    old.write_bytes(b"previous asset")

    def boom(*args, **kwargs):
        raise OSError(f"injected failure in {where}")

    if where == "encode":
        monkeypatch.setattr(glb, "encode_glb", boom)
    elif where == "replace":
        monkeypatch.setattr(files.os, "replace", boom)
    else:
        monkeypatch.setattr(files.os, "fsync", boom)
    for path in (target, old):
        with pytest.raises(OSError, match="injected"):
            glb.export_glb(path, v, f, c, a, 12, decimation_target=500, texture_size=64)
    assert not target.exists()
    assert old.read_bytes() == b"previous asset"  # an existing file is left as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.glb"]  # no temporary left behind


# --------------------------------------------------------------------------------------------------
# pieces against independent references


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_texture_quantisation_of_a_tensor_matches_numpys(device):
    """The bake's maps are quantised where they live; values outside [0, 1] and on the rounding
    boundaries come out as numpy's clip-and-truncate gives them."""
    g = torch.Generator().manual_seed(5)
    x = torch.rand(67, 45, 6, generator=g) * 1.4 - 0.2
    x[0, :7, 0] = torch.tensor([0.0, 1.0, 1 / 255, 254.5 / 255, 128 / 255, -0.0, 1.0 + 1e-7])
    got = glb.quantize_unorm8(x.to(device))
    want = glb.quantize_unorm8(x.numpy())
    assert got.dtype == np.uint8 and np.array_equal(got, want) and want.min() == 0 and want.max() == 255


def test_axes_compose_upstream_transforms():
    to_glb = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=float)  # (x,y,z) -> (x, z, -y)
    rot = np.array([[-1, 0, 0], [0, 0, -1], [0, -1, 0]], dtype=float)  # Pixal3D inference.py
    np.testing.assert_array_equal(rot @ to_glb, glb.GRID_TO_GLB)
    p = np.random.default_rng(1).normal(size=(5, 3))
    np.testing.assert_allclose(glb.to_glb_axes(p), p @ (rot @ to_glb).T, atol=1e-6)


def test_axis_change_gives_the_matrix_products_bits():
    """to_glb_axes flips signs instead of multiplying by GRID_TO_GLB: the same float32 bits as the
    float64 product, signed zeros included (a flipped +0.0 is stored as the product's +0.0)."""
    rng = np.random.default_rng(2)
    p = rng.normal(size=(4000, 3))
    p[rng.random(p.shape) < 0.3] = 0.0
    p[rng.random(p.shape) < 0.3] = -0.0
    for points in (p, p.astype(np.float32)):
        want = (np.asarray(points, dtype=np.float64) @ glb.GRID_TO_GLB.T).astype(np.float32)
        got = glb.to_glb_axes(points)
        assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.view(np.uint32))


def _normals_reference(vertices, faces):
    """area-weighted vertex normals as numpy's cross product and one bincount per corner and axis give them"""
    tri = np.asarray(vertices, dtype=np.float64)[faces]
    fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    vn = np.zeros((len(vertices), 3))
    for k in range(3):
        for c in range(3):
            vn[:, c] += np.bincount(faces[:, k], fn[:, c], minlength=len(vertices))
    norm = np.linalg.norm(vn, axis=1, keepdims=True)
    vn = np.where(norm > 1e-20, vn / np.maximum(norm, 1e-20), np.array([0.0, 0.0, 1.0]))
    return vn.astype(np.float32), 0.5 * float(np.linalg.norm(fn, axis=1).sum())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))])
def test_vertex_normals_in_torch_match_numpys(device):
    """numpy and torch (where the export's GPU computes them): the reference's bits, its area, +Z where
    a vertex has no area around it, and one result per run."""
    v, f, _ = dual_grid_mesh(torus_sdf, 24)
    v = np.concatenate([v, [[0.4, 0.4, 0.4]]]).astype(np.float32)  # isolated: +Z
    f = np.concatenate([f, [[0, 0, 1]]]).astype(np.int64)  # degenerate: no area, no direction
    want, want_area = _normals_reference(v, f)
    got, area = glb.normals_and_area(v, f)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)) and area == pytest.approx(want_area, rel=1e-12)
    assert np.array_equal(glb.vertex_normals(v, f), got)
    vt, ft = torch.from_numpy(v).to(device), torch.from_numpy(f).to(device)
    t_normals, t_area = glb.normals_and_area(vt, ft)
    assert t_normals.device.type == device and t_normals.dtype == torch.float32
    assert np.array_equal(t_normals.cpu().numpy().view(np.uint32), want.view(np.uint32))
    assert t_area == pytest.approx(want_area, rel=1e-12)
    np.testing.assert_array_equal(t_normals[-1].cpu().numpy(), [0.0, 0.0, 1.0])
    assert torch.equal(glb.vertex_normals(vt, ft), t_normals)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))])
def test_packed_textures_match_the_host_packing(device):
    """pack_textures (on the maps' device, or in row blocks on the host) gives the bytes of quantising
    all six maps and packing base RGBA and (0, roughness, metallic) on the host; the mesh built from
    the packed pair writes the same file as from the maps."""
    g = torch.Generator().manual_seed(7)
    maps = torch.rand(131, 97, 6, generator=g) * 1.4 - 0.2  # rows across several blocks, out-of-range values
    q = glb.quantize_unorm8(maps.numpy())
    want = (np.concatenate([q[..., 0:3], q[..., 5:6]], axis=-1),
            np.stack([np.zeros_like(q[..., 3]), q[..., 4], q[..., 3]], axis=-1))
    for source in (maps.to(device), maps.numpy(), maps.numpy().astype(np.float64), q, torch.from_numpy(q).to(device)):
        got = glb.pack_textures(source)
        assert all(g.dtype == np.uint8 and g.flags["C_CONTIGUOUS"] and np.array_equal(g, w) for g, w in zip(got, want))
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32) * 0.3
    f = np.array([[0, 1, 2]])
    uvs = np.array([[0.1, 0.1], [0.9, 0.1], [0.1, 0.9]], np.float32)
    files = [glb.encode_glb(glb.build_textured_mesh(v, f, glb.vertex_normals(v, f), uvs, m, double_sided=False))
             for m in (maps.numpy(), glb.pack_textures(maps.to(device)))]
    assert files[0] == files[1]


def test_export_leaves_the_material_as_trimesh_made_it():
    """encode_glb hashes the material by identity during the export only: the mesh keeps trimesh's
    PBRMaterial (hashed by content) and a second export gives the same file."""
    import trimesh

    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32) * 0.3
    f = np.array([[0, 1, 2]])
    uvs = np.array([[0.1, 0.1], [0.9, 0.1], [0.1, 0.9]], np.float32)
    maps = np.random.default_rng(4).random((16, 16, 6)).astype(np.float32)
    mesh = glb.build_textured_mesh(v, f, glb.vertex_normals(v, f), uvs, maps, double_sided=True)
    first = glb.encode_glb(mesh)
    assert type(mesh.visual.material) is trimesh.visual.material.PBRMaterial
    assert glb.encode_glb(mesh) == first


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))])
def test_chart_count_union_find_matches_label_propagation(device):
    """count_charts on the CPU (a numpy union-find) and on a GPU (label propagation) count the
    components that uv.vertex_components labels, on meshes with many small and a few long components."""
    rng = np.random.default_rng(5)
    for n_v, n_f in [(50, 10), (3000, 2500), (20_000, 12_000)]:
        f = rng.integers(0, n_v, (n_f, 3))
        f[: n_f // 2] = rng.integers(0, n_v - 2, (n_f // 2, 1)) + np.arange(3)  # strips of consecutive vertices
        lab = uv.vertex_components(torch.from_numpy(f), n_v)
        want = len(np.unique(lab.numpy()[f.reshape(-1)]))
        assert glb.count_charts(f, n_v) == want
        assert glb.count_charts(torch.from_numpy(f).to(device), n_v) == want
        assert glb.count_charts(f, n_v, device=device) == want
    assert glb.count_charts(np.zeros((0, 3), np.int64), 5) == 0


def test_clean_mesh_removes_junk():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 0, 0], [5, 5, 5], [0, 0, 1], [np.nan, 0, 0]], np.float32)
    f = np.array([[0, 1, 2],  # kept
                  [0, 3, 2],  # duplicate of the first once vertex 3 merges into 1
                  [2, 1, 0],  # same triangle, other winding: duplicate
                  [0, 0, 5],  # degenerate
                  [0, 1, 5],  # kept
                  [0, 1, 9],  # out of range
                  [0, 1, 6]])  # touches a non-finite vertex
    cv, cf = glb.clean_mesh(v, f)
    assert cf.shape == (2, 3) and cv.shape == (4, 3)
    tris = {tuple(sorted(map(tuple, cv[t].tolist()))) for t in cf}
    assert tris == {((0, 0, 0), (0, 1, 0), (1, 0, 0)), ((0, 0, 0), (0, 0, 1), (1, 0, 0))}


def _junk_mesh(seed: int, n_v: int, n_f: int):
    """Random vertices with bit-identical copies, -0.0 beside 0.0 and a NaN; faces with duplicates in
    other windings, degenerate and out-of-range ones, unreferenced vertices."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n_v, 3)).astype(np.float32)
    v[3], v[4], v[5, 0] = -0.0, 0.0, np.nan
    v = np.concatenate([v, v[rng.integers(0, n_v, n_v // 3)]])
    f = rng.integers(0, len(v) + 3, size=(n_f, 3))  # some indices out of range
    f = np.concatenate([f, f[rng.integers(0, n_f, n_f // 5)][:, ::-1], f[:7] * [1, 1, 0] + [0, 0, 1]])
    f[rng.integers(0, len(f), 9), 2] = -1
    return v, f[rng.permutation(len(f))]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))])
@pytest.mark.parametrize("seed,n_v,n_f", [(0, 7, 2), (1, 11, 29), (2, 1001, 3007), (3, 20_011, 70_003)])
@pytest.mark.parametrize("merge", [True, False])
def test_clean_mesh_in_torch_keeps_the_same_faces_as_numpy(device, seed, n_v, n_f, merge):
    v, f = _junk_mesh(seed, n_v, n_f)
    rv, rf = glb.clean_mesh(v, f, merge_vertices=merge)
    tv, tf = glb.clean_mesh(torch.from_numpy(v), torch.from_numpy(f), merge_vertices=merge, device=device)
    assert tv.dtype == np.float32 and tf.dtype == np.int64 and len(tv) == len(rv) and len(tf) == len(rf)
    # the same faces in the same order, corner by corner, to the bit (vertex numbering may differ)
    assert np.array_equal(tv[tf].view(np.uint32), rv[rf].view(np.uint32))
    assert len(np.unique(tf)) == len(tv)  # no unreferenced vertex


def test_clean_mesh_torch_off_switch(monkeypatch):
    v, f = _junk_mesh(4, 101, 307)
    monkeypatch.setenv(glb.DISABLE_TORCH_CLEAN_ENV, "1")
    a, b = glb.clean_mesh(v, f, device="cpu"), glb.clean_mesh(v, f)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])  # numpy's own numbering: the reference ran


def _moebius(n: int = 40):
    t = np.arange(n) * 2 * np.pi / n
    ring = lambda s: np.stack([(1 + s * np.cos(t / 2)) * np.cos(t), (1 + s * np.cos(t / 2)) * np.sin(t), s * np.sin(t / 2)], -1)
    v = np.concatenate([ring(-0.2), ring(0.2)]).astype(np.float32)
    i = np.arange(n)
    j = (i + 1) % n
    a, b = i, n + i  # the strip's two rails; the last quad joins them crossed (the half twist)
    c = np.where(j == 0, n + j, j)
    d = np.where(j == 0, j, n + j)
    return v, np.concatenate([np.stack([a, c, b], 1), np.stack([b, c, d], 1)])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))])
@pytest.mark.parametrize("outward", [False, True])
def test_orient_faces_in_torch_gives_numpys_result(device, outward):
    """Several components (closed, open, one with a non-manifold edge, a non-orientable strip), faces
    flipped at random: the same components, closed flags and (orientable parts) windings."""
    rng = np.random.default_rng(5)
    tv, tf, _ = dual_grid_mesh(torus_sdf, 23)
    sv, sf, _ = dual_grid_mesh(lambda p: sphere_sdf(p, 0.12, (0.3, 0.3, 0.3)), 23)
    cut = sf[sv[sf].mean(1)[:, 1] < 0.3]  # an open bowl
    mv, mf = _moebius(41)
    parts, off = [], 0
    vs = []
    for v, f in ((tv, tf), (sv, sf), (sv, cut), (mv, mf)):
        vs.append(v)
        parts.append(f + off)
        off += len(v)
    v, f = np.concatenate(vs).astype(np.float32), np.concatenate(parts).astype(np.int64)
    f = np.concatenate([f, [[f[0, 0], f[0, 1], len(v) - 1]]])  # a third face on one torus edge
    flip = rng.random(len(f)) < 0.5
    f[flip] = f[flip][:, ::-1]
    a, ia = glb.orient_faces(v, f, outward=outward)
    b, ib = glb.orient_faces(v, f, outward=outward, device=device)
    assert np.array_equal(ia["components"], ib["components"]) and np.array_equal(ia["closed"], ib["closed"])
    strip = np.isin(ia["components"], ia["components"][len(f) - 1 - len(mf):len(f) - 1])
    assert not ia["closed"][strip].any() and ia["closed"].any()  # the strip is open; the closed sphere is not
    assert np.array_equal(a[~strip], b[~strip]) and ia["flipped"] - ib["flipped"] in range(-len(mf), len(mf) + 1)


def test_orient_faces_makes_closed_components_outward():
    import trimesh

    v1, f1, _ = dual_grid_mesh(torus_sdf, 24)
    v2, f2, _ = dual_grid_mesh(lambda p: sphere_sdf(p, 0.08, (0.0, 0.35, 0.0)), 24)
    v = np.concatenate([v1, v2])
    f = np.concatenate([f1, f2 + len(v1)]).astype(np.int64)
    rng = np.random.default_rng(3)
    flip = rng.random(len(f)) < 0.5
    f[flip] = f[flip][:, ::-1]
    assert not trimesh.Trimesh(v, f, process=False).is_winding_consistent
    out, info = glb.orient_faces(v, f)
    assert len(np.unique(info["components"])) == 2 and info["closed"].all()
    for part in trimesh.Trimesh(v, out, process=False).split(only_watertight=False):
        assert part.is_winding_consistent and part.is_watertight and part.volume > 0
    # same triangles, only the order within rows changed
    np.testing.assert_array_equal(np.sort(out, axis=1), np.sort(f, axis=1))


def test_fill_small_holes_closes_only_small_loops():
    v, f, _ = dual_grid_mesh(lambda p: sphere_sdf(p, 0.3), 32)
    v, f = glb.clean_mesh(v, f)
    f, _ = glb.orient_faces(v, f)
    top = int(np.argmax(v[:, 1]))
    small = np.any(f == top, axis=1)  # the 1-ring of the top vertex: perimeter ~ 6 edges of 1/32
    big = v[f].mean(1)[:, 1] < -0.25  # the bottom cap: a loop of perimeter ~ 2*pi*0.166
    assert small.sum() >= 3 and not (small & big).any()
    v2, f2 = glb._compact(v, f[~(small | big)])
    f2, info = glb.orient_faces(v2, f2, outward=False)
    assert not info["closed"].any()
    v3, f3, n = glb.fill_small_holes(v2, f2, 0.4)
    assert n == 1
    f3, info3 = glb.orient_faces(v3, f3, outward=False)
    assert not info3["closed"].all()  # the big hole is still open
    v4, f4, n4 = glb.fill_small_holes(v2, f2, 10.0)
    f4, info4 = glb.orient_faces(v4, f4)
    assert n4 == 2 and info4["closed"].all()
    # one centroid vertex per hole, one fan triangle per boundary edge, wound like the surface
    _, _, count, _ = glb._edge_table(f2, len(v2))
    assert len(v4) - len(v2) == 2 and len(f4) - len(f2) == int((count == 1).sum())
    assert info4["flipped"] == 0
    np.testing.assert_array_equal(glb.fill_small_holes(v2, f2, 1e-3)[1], f2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))])
def test_fill_small_holes_finds_the_boundary_in_torch_as_numpy_does(device):
    """The boundary found in torch on a device gives numpy's result exactly: several holes of
    awkward sizes in a shuffled surface, a closed surface, and no faces."""
    v, f, _ = dual_grid_mesh(torus_sdf, 37)
    v, f = glb.clean_mesh(v, f)
    f, _ = glb.orient_faces(v, f)
    rng = np.random.default_rng(3)
    holes = np.isin(f, rng.choice(len(v), 7, replace=False)).any(1)  # the 1-rings of seven vertices
    open_f = f[~holes][rng.permutation(int((~holes).sum()))]
    for ff in (open_f, f, f[:0]):
        ref = glb.fill_small_holes(v, ff, 0.5)
        got = glb.fill_small_holes(v, ff, 0.5, device=device)
        assert got[2] == ref[2] and np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])
    assert ref[2] == 0 and glb.fill_small_holes(v, open_f, 0.5)[2] >= 6  # two rings may merge into one hole


def test_remove_small_components():
    v1, f1, _ = dual_grid_mesh(torus_sdf, 20)
    v2, f2, _ = dual_grid_mesh(lambda p: sphere_sdf(p, 0.02, (0.0, 0.4, 0.0)), 64)
    v = np.concatenate([v1, v2])
    f = np.concatenate([f1, f2 + len(v1)]).astype(np.int64)
    f, info = glb.orient_faces(v, f)
    area_small = 4 * np.pi * 0.02 ** 2
    _, f_kept, keep = glb.remove_small_components(v, f, info["components"], area_small * 2)
    assert keep.sum() == len(f1) and len(f_kept) == len(f1)


def test_simplify_without_library_warns_and_keeps_mesh(monkeypatch):
    import builtins

    v, f, _ = dual_grid_mesh(lambda p: sphere_sdf(p, 0.3), 16)
    real_import = builtins.__import__

    def no_fast_simplification(name, *args, **kwargs):
        if name == "fast_simplification":
            raise ImportError("not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fast_simplification)
    with pytest.warns(RuntimeWarning, match="fast-simplification"):
        v2, f2 = glb.simplify_mesh(v, f, 100)
    assert v2 is v and f2 is f


def test_simplify_reaches_target_and_keeps_shape():
    pytest.importorskip("fast_simplification")
    v, f, _ = dual_grid_mesh(torus_sdf, 40)
    v, f = glb.clean_mesh(v, f)
    v2, f2 = glb.simplify_mesh(v, f, 3000)
    assert 2500 <= len(f2) <= 3000
    assert np.abs(torus_sdf(v2)).max() < 2.0 / 40


def _rasterize_reference(uvs, faces, S):
    """per triangle, test every texel centre of the image"""
    ys, xs = np.mgrid[0:S, 0:S]
    cx, cy = (xs + 0.5) / S, (ys + 0.5) / S
    cover = np.full((S, S), -1)
    for i, tri in enumerate(faces):
        a, b, c = uvs[tri].astype(np.float64)
        det = (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
        if abs(det) < 1e-14:
            continue
        l1 = ((cx - a[0]) * (c[1] - a[1]) - (cy - a[1]) * (c[0] - a[0])) / det
        l2 = ((b[0] - a[0]) * (cy - a[1]) - (b[1] - a[1]) * (cx - a[0])) / det
        inside = (l1 >= 0) & (l2 >= 0) & (1 - l1 - l2 >= 0)
        cover[inside] = i
    return cover


@pytest.mark.parametrize("S", [37, 64])
def test_rasterize_uv_matches_brute_force(S):
    rng = np.random.default_rng(S)
    n = 60
    centre = rng.random((n, 1, 2))
    uvs = (centre + rng.normal(scale=0.08, size=(n, 3, 2))).reshape(-1, 2)  # some leave [0,1]
    faces = np.arange(3 * n).reshape(n, 3)
    uvs[faces[5, 2]] = uvs[faces[5, 0]]  # a zero-area triangle covers nothing
    fid, bary = bake.rasterize_uv(torch.from_numpy(uvs).float(), torch.from_numpy(faces), S, chunk=97)
    fid, bary = fid.numpy(), bary.numpy()
    ref = _rasterize_reference(uvs, faces, S)
    # overlapping random triangles: compare coverage, and check each covered texel's owner contains it
    edge_slack = 0
    assert ((fid >= 0) != (ref >= 0)).sum() <= edge_slack + 2
    assert not (fid == 5).any()
    ys, xs = np.nonzero(fid >= 0)
    p = np.stack([(xs + 0.5) / S, (ys + 0.5) / S], 1)
    recon = np.einsum("nk,nkc->nc", bary[ys, xs], uvs[faces[fid[ys, xs]]])
    np.testing.assert_allclose(recon, p, atol=1e-4)
    assert (bary[ys, xs] >= 0).all() and np.allclose(bary[ys, xs].sum(1), 1, atol=1e-5)


def _grid_sample_reference(points, coords, attrs, G):
    """flex_gemm grid_sample_3d trilinear, one point at a time"""
    table = {tuple(c): i for i, c in enumerate(coords.tolist())}
    out = np.zeros((len(points), attrs.shape[1]))
    for n, p in enumerate(points):
        q = (p + 0.5) * G
        base = np.floor(q - 0.5).astype(int)
        acc, wsum = np.zeros(attrs.shape[1]), 0.0
        for i in range(8):
            x = base + np.array([i & 1, (i >> 1) & 1, (i >> 2) & 1])
            if np.all((x >= 0) & (x < G)) and tuple(x) in table:
                w = np.prod(1 - np.abs(q - x - 0.5))
                acc += w * attrs[table[tuple(x)]]
                wsum += w
        out[n] = acc / max(wsum, 1e-12)
    return out


def test_sample_sparse_voxels_matches_flex_gemm_semantics():
    rng = np.random.default_rng(7)
    G = 9  # odd
    allc = np.stack(np.meshgrid(*[np.arange(G)] * 3, indexing="ij"), -1).reshape(-1, 3)
    coords = allc[rng.random(len(allc)) < 0.45]  # sparse: many missing neighbours
    coords = coords[rng.permutation(len(coords))]
    attrs = rng.random((len(coords), 5)).astype(np.float32)
    pts = rng.uniform(-0.56, 0.56, size=(500, 3))  # includes points past the grid border
    pts[:20] = (coords[:20] + 0.5) / G - 0.5  # exactly at voxel centres
    ref = _grid_sample_reference(pts, coords, attrs, G)
    got = bake.sample_sparse_voxels(torch.from_numpy(pts).float(), torch.from_numpy(coords),
                                    torch.from_numpy(attrs), G, fallback_radius=0, chunk=128).numpy()
    np.testing.assert_allclose(got, ref, atol=2e-5)
    np.testing.assert_allclose(got[:20], attrs[:20], atol=1e-5)


def test_sample_fallback_takes_nearest_voxel():
    G = 16
    coords = np.array([[3, 3, 3], [12, 12, 12]])
    attrs = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    # 1.6 voxels from voxel (3,3,3) along x: none of its 8 neighbours exists
    p = np.array([[(3.5 + 1.6) / G - 0.5, (3.5) / G - 0.5, (3.5) / G - 0.5]])
    args = (torch.from_numpy(p).float(), torch.from_numpy(coords), torch.from_numpy(attrs), G)
    np.testing.assert_array_equal(bake.sample_sparse_voxels(*args, fallback_radius=0).numpy(), [[0.0, 0.0]])
    np.testing.assert_allclose(bake.sample_sparse_voxels(*args, fallback_radius=2).numpy(), [[1.0, 0.0]])


def test_fill_uncovered_extends_borders_and_keeps_baked_texels():
    H, W = 45, 70
    img = torch.zeros(H, W, 3)
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[10:20, 10:30] = True
    img[10:20, 10:30] = torch.tensor([0.2, 0.6, 0.9])
    mask[30:40, 50:65] = True
    img[30:40, 50:65] = torch.tensor([0.9, 0.1, 0.3])
    out = bake.fill_uncovered(img, mask)
    assert torch.equal(out[mask], img[mask])
    assert torch.isfinite(out).all()
    # rings next to a chart copy its colour; nothing is left black
    torch.testing.assert_close(out[9, 12], torch.tensor([0.2, 0.6, 0.9]))
    torch.testing.assert_close(out[20, 29], torch.tensor([0.2, 0.6, 0.9]))
    torch.testing.assert_close(out[40, 64], torch.tensor([0.9, 0.1, 0.3]))
    assert (out.sum(-1) > 0.5).all()


@pytest.mark.parametrize("method", ["planar", "xatlas"])
def test_uv_unwrap_covers_each_face_once(method):
    v, f, _ = dual_grid_mesh(torus_sdf, 24)
    v, f = glb.clean_mesh(v, f)
    f, _ = glb.orient_faces(v, f)
    vmap, fu, uvs = uv.uv_unwrap(v, f, texture_size=128, cluster_size=200, method=method)
    assert len(fu) == len(f) and uvs.min() >= 0 and uvs.max() <= 1
    # the same triangles (through vmapping), in some order
    assert np.array_equal(np.unique(np.sort(vmap[fu], axis=1), axis=0), np.unique(np.sort(f, axis=1), axis=0))
    # charts do not overlap: the UV area adds up to less than the atlas and matches the texels covered
    fid, _ = bake.rasterize_uv(torch.from_numpy(uvs), torch.from_numpy(fu), 128)
    tri = uvs[fu].astype(np.float64)
    area = 0.5 * np.abs((tri[:, 1, 0] - tri[:, 0, 0]) * (tri[:, 2, 1] - tri[:, 0, 1])
                        - (tri[:, 1, 1] - tri[:, 0, 1]) * (tri[:, 2, 0] - tri[:, 0, 0]))
    assert area.sum() < 1.0
    assert abs((fid >= 0).float().mean().item() - area.sum()) < 0.08


def _chart_labels(faces, n_vertices):
    """chart of every face: faces joined through shared (unwrapped) vertices; plain union-find"""
    parent = list(range(n_vertices))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b, c in faces.tolist():
        ra, rb, rc = find(a), find(b), find(c)
        parent[rb] = ra
        parent[find(rc)] = ra
    return np.array([find(a) for a in faces[:, 0].tolist()])


def _texels_in_two_charts(faces, uvs, chart, res):
    """texel centres of a res x res grid inside triangles of two different charts"""
    owner = {}
    clash = set()
    ys, xs = np.mgrid[0:res, 0:res]
    centres = np.stack([(xs + 0.5) / res, (ys + 0.5) / res], -1)
    for tri, c in zip(uvs[faces].astype(np.float64), chart.tolist()):
        lo = np.clip(np.floor(tri.min(0) * res - 0.5).astype(int), 0, res - 1)
        hi = np.clip(np.ceil(tri.max(0) * res - 0.5).astype(int), 0, res - 1)
        p = centres[lo[1]:hi[1] + 1, lo[0]:hi[0] + 1].reshape(-1, 2)
        d = [(tri[(k + 1) % 3, 0] - tri[k, 0]) * (p[:, 1] - tri[k, 1])
             - (tri[(k + 1) % 3, 1] - tri[k, 1]) * (p[:, 0] - tri[k, 0]) for k in range(3)]
        inside = ((d[0] > 0) & (d[1] > 0) & (d[2] > 0)) | ((d[0] < 0) & (d[1] < 0) & (d[2] < 0))
        for q in map(tuple, np.floor(p[inside] * res).astype(int).tolist()):
            if owner.setdefault(q, c) != c:
                clash.add(q)
    return len(clash)


@pytest.mark.parametrize("method", ["planar", "xatlas"])
def test_uv_unwrap_charts_per_cluster_do_not_overlap(method):
    # clusters of at most ~200 faces: every cluster becomes charts of its own, all packed into one atlas
    v, f, _ = dual_grid_mesh(torus_sdf, 24)
    v, f = glb.clean_mesh(v, f)
    f, _ = glb.orient_faces(v, f)
    n_clusters = int(uv.cluster_faces(v, f, 200).max()) + 1
    vmap, fu, uvs = uv.uv_unwrap(v, f, texture_size=128, cluster_size=200, method=method)
    tri = uvs[fu]
    assert tri.min() >= 0 and tri.max() <= 1  # every face's three corners inside the texture
    area = 0.5 * np.abs((tri[:, 1, 0] - tri[:, 0, 0]) * (tri[:, 2, 1] - tri[:, 0, 1])
                        - (tri[:, 1, 1] - tri[:, 0, 1]) * (tri[:, 2, 0] - tri[:, 0, 0]))
    assert (area > 0).all()
    chart = _chart_labels(fu, len(vmap))
    assert len(np.unique(chart)) >= n_clusters > 10
    # texel centres at four times the texture's resolution: none lies in two charts
    assert _texels_in_two_charts(fu, uvs, chart, 512) == 0
    # the check sees an overlap: move one chart onto the atlas's centre, over whatever is there
    moved = uvs.copy()
    first = np.unique(fu[chart == chart[0]])
    moved[first] += 0.5 - moved[first].mean(axis=0)
    assert _texels_in_two_charts(fu, moved, chart, 512) > 0


def _signed_uv_areas(uvs, faces):
    tri = uvs[faces].astype(np.float64)
    return 0.5 * ((tri[:, 1, 0] - tri[:, 0, 0]) * (tri[:, 2, 1] - tri[:, 0, 1])
                  - (tri[:, 1, 1] - tri[:, 0, 1]) * (tri[:, 2, 0] - tri[:, 0, 0]))


def test_planar_charts_keep_one_texel_density_and_one_winding():
    """Every chart is its cluster's projection at one scale: a face's UV area over its 3D area is the
    cosine of its tilt from the cluster's axis (at most 54.7° off), times one constant; no face flips."""
    v, f, _ = dual_grid_mesh(torus_sdf, 24)
    v, f = glb.clean_mesh(v, f)
    f, _ = glb.orient_faces(v, f)
    v = v * np.array([1.0, 0.6, 1.3], np.float32)  # not a cube's symmetry: charts of every aspect
    vmap, fu, uvs = uv.uv_unwrap(v, f, texture_size=256, cluster_size=150, method="planar")
    assert np.array_equal(vmap[fu], f)  # the input's faces, in its order
    tri = v[f].astype(np.float64)
    area3 = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    signed = _signed_uv_areas(uvs, fu)
    assert (signed > 0).all() or (signed < 0).all()
    ratio = np.abs(signed) / area3
    assert ratio.max() / ratio.min() <= np.sqrt(3) * 1.001 and ratio.max() / ratio.min() > 1.3
    assert glb.count_charts(fu, len(vmap)) < len(f) / 20  # charts are whole clusters, not faces


def test_shelf_pack_places_rectangles_apart_inside_the_square():
    rng = np.random.default_rng(3)
    for n, size in ((1, 7), (37, 61), (300, 257)):
        h = np.sort(rng.integers(1, 12, n))[::-1].copy()
        w = rng.integers(1, 12, n)
        corners = uv._shelf_pack(w, h, size)
        if corners is None:  # only when they cannot fit at all, or nearly fill the square
            assert (w * h).sum() > size * size * 0.5 or (w > size).any() or (h > size).any()
            continue
        assert (corners >= 0).all() and (corners[:, 0] + w <= size).all() and (corners[:, 1] + h <= size).all()
        occupied = np.zeros((size, size), np.int32)
        for (x, y), ww, hh in zip(corners.tolist(), w.tolist(), h.tolist()):
            occupied[y:y + hh, x:x + ww] += 1
        assert occupied.max() == 1
    assert uv._shelf_pack(np.array([5, 5]), np.array([5, 5]), 9) is None  # side by side 10 > 9, stacked 10 > 9
    assert uv._shelf_pack(np.array([10]), np.array([1]), 9) is None


def test_planar_unwrap_refuses_a_texture_the_charts_cannot_fit():
    v, f, _ = dual_grid_mesh(torus_sdf, 24)
    with pytest.raises(ValueError, match="larger --texture-size"):
        uv.uv_unwrap(v, f, texture_size=8, cluster_size=20, method="planar")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_planar_unwrap_on_the_gpu_matches_the_cpu():
    v, f, _ = dual_grid_mesh(torus_sdf, 40)
    v, f = glb.clean_mesh(v, f)
    cpu = uv.uv_unwrap(v, f, texture_size=512, cluster_size=300, method="planar", device="cpu")
    gpu = uv.uv_unwrap(v, f, texture_size=512, cluster_size=300, method="planar", device="cuda")
    assert np.array_equal(cpu[0], gpu[0]) and np.array_equal(cpu[1], gpu[1])
    np.testing.assert_allclose(cpu[2], gpu[2], atol=1e-6)
