"""Pixel-aligned image conditioning: camera, voxel -> image projection, feature sampling
(golden README §2.4, pixal3d.md §1.2–1.5).

Upstream (`ProjGrid`) projects the whole corner-aligned R³ grid and the pipeline then gathers the
active voxels. Here only the requested voxels are projected; every step is elementwise per point,
so a voxel gets exactly the value it has in the dense grid:

    p     = linspace(-1, 1, R)[(i, j, l)] @ Rbᵀ / mesh_scale / 2        Rb = [[1,0,0],[0,0,-1],[0,1,0]]
    W2C   = inv(F) (fp32),  F = [[1,0,0,0],[0,0,-1,-dist],[0,1,0,0],[0,0,0,1]]
    (xc, yc, zc) = ([p, 1] @ W2Cᵀ)[:3]
    f_px  = (16 / tan(fov/2)) · S / 32
    u = f_px·xc/(−zc + 1e-8) + S/2,   v = −f_px·yc/(−zc + 1e-8) + S/2
    g = (uv + 0.5)/S·2 − 1                                              (S: the encoder's image size)
    feat = grid_sample(fmap, g, bilinear, align_corners=False, padding_mode="border")

The grid value of index idx is taken from torch.linspace itself: the closed form −1 + 2·idx/(R−1)
differs from linspace by up to 1 ulp in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixal3d_rt.kernels.na2d import DEFAULT_MAX_ELEMENTS

# Blender world is Z-up: grid (x, y, z) -> world (x, -z, y)
BLENDER_ROTATION = ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0))
SENSOR_WIDTH_MM = 32.0


@dataclass(frozen=True)
class Camera:
    """The fixed front-view camera of a single image: horizontal FOV (rad), distance, mesh scale."""

    fov: float
    distance: float
    mesh_scale: float = 1.0

    @classmethod
    def from_fov(cls, fov: float, mesh_scale: float = 1.0, image_resolution: int = 512, extend_pixel: int = 0) -> "Camera":
        return cls(float(fov), distance_from_fov(fov, image_resolution, extend_pixel, mesh_scale), float(mesh_scale))


def distance_from_fov(fov: float, image_resolution: int = 512, extend_pixel: int = 0, mesh_scale: float = 1.0) -> float:
    """Camera distance that puts grid point (−1, 0, 0) on pixel column −extend_pixel.

    With extend_pixel = 0 this is 0.5/tan(fov/2) (the cube's mid-depth section spans the image
    width). Evaluated as upstream inference.py does (focal length in fp32 tensors, then Python
    floats), so the value matches its rounding.
    """
    focal_mm = 16.0 / torch.tan(torch.tensor(fov / 2.0))
    f_px = float((focal_mm * image_resolution / SENSOR_WIDTH_MM).item())
    gp = torch.tensor([-1.0, 0.0, 0.0]) @ torch.tensor(BLENDER_ROTATION).T
    gp = gp / mesh_scale / 2
    xw, yw = gp[0].item(), gp[1].item()
    x_ndc = (0 - extend_pixel) - image_resolution / 2.0
    return float(f_px * xw / x_ndc - yw)


def _f32(x, device) -> torch.Tensor:
    """A camera scalar as upstream holds it: a float32 tensor of shape [1]."""
    return torch.as_tensor(x, dtype=torch.float32, device=device).reshape(1)


def dense_coords(R: int, device=None) -> torch.Tensor:
    """All voxel indices of an R³ grid in token order k = (i·R + j)·R + l: int64 [R³, 3]."""
    a = torch.arange(R, device=device)
    return torch.stack(torch.meshgrid(a, a, a, indexing="ij"), dim=-1).reshape(-1, 3)


def world_points(coords_xyz: torch.Tensor, R: int, mesh_scale=1.0) -> torch.Tensor:
    """Blender-world position of the corner-aligned grid point of each voxel index: fp32 [N, 3]."""
    dev = coords_xyz.device
    lin = torch.linspace(-1, 1, R, device=dev)
    p = lin[coords_xyz.long()]  # [N, 3]
    p = p @ torch.tensor(BLENDER_ROTATION, device=dev).T
    return p / _f32(mesh_scale, dev) / 2


def voxel_to_image(coords_xyz: torch.Tensor, R: int, fov, distance, image_size: int, mesh_scale=1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Image pixel coordinates (u = column, v = row) [N, 2] and camera depth [N] of voxel indices."""
    dev = coords_xyz.device
    p = world_points(coords_xyz, R, mesh_scale)
    cam_to_world = torch.tensor(
        [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]], device=dev
    )
    cam_to_world[1, 3] = -_f32(distance, dev)[0]
    world_to_cam = torch.linalg.inv(cam_to_world)
    ph = torch.cat([p, torch.ones_like(p[:, :1])], dim=-1)
    pc = (ph @ world_to_cam.T)[:, :3]
    xc, yc, zc = pc.unbind(-1)
    focal_mm = 16.0 / torch.tan(_f32(fov, dev) / 2.0)
    f_px = focal_mm * image_size / SENSOR_WIDTH_MM
    u = f_px * xc / (-zc + 1e-8) + image_size / 2.0
    v = -(f_px * yc / (-zc + 1e-8)) + image_size / 2.0
    return torch.stack([u, v], dim=-1), -zc


def normalise_uv(uv: torch.Tensor, image_size: int) -> torch.Tensor:
    """Pixel coordinates -> grid_sample coordinates, with upstream's half-pixel shift."""
    return (uv + 0.5) / image_size * 2 - 1


def project_voxels(coords_xyz: torch.Tensor, R: int, fov, distance, image_size: int, mesh_scale=1.0) -> torch.Tensor:
    """Normalised sample coordinates g [N, 2] (x = image column, y = image row) of voxel indices
    coords_xyz (int [N, 3]) on the corner-aligned R³ grid."""
    uv, _ = voxel_to_image(coords_xyz, R, fov, distance, image_size, mesh_scale)
    return normalise_uv(uv, image_size)


def sample_features(fmap: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Bilinear sample of fmap [1, C, h, w] at g [N, 2] (align_corners=False, border): [N, C] fp32.

    Sampled in fp32: grid coordinates in bf16/fp16 would lose sub-texel precision."""
    if fmap.shape[0] != 1:
        raise ValueError(f"sample_features takes one map, got batch {fmap.shape[0]}")
    out = F.grid_sample(fmap.float(), g.float().view(1, -1, 1, 2), mode="bilinear", align_corners=False, padding_mode="border")
    return out[0, :, :, 0].T


def bilinear_taps(g: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grid_sample's bilinear taps (align_corners=False, border padding) of points g [N, 2] on an
    h×w map: rows [N, 4], cols [N, 4] (int64, clamped into the map) and weights [N, 4] (fp32).
    A tap past the last row/column only occurs with weight 0; clamping keeps it addressable."""
    g = g.float()
    ix = ((g[:, 0] + 1) * w - 1) / 2
    iy = ((g[:, 1] + 1) * h - 1) / 2
    ix = ix.clamp(0, w - 1)
    iy = iy.clamp(0, h - 1)
    x0, y0 = ix.floor(), iy.floor()
    tx, ty = ix - x0, iy - y0
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    rows = torch.stack([y0, y0, y1, y1], dim=-1)
    cols = torch.stack([x0, x1, x0, x1], dim=-1)
    weights = torch.stack([(1 - tx) * (1 - ty), tx * (1 - ty), (1 - tx) * ty, tx * ty], dim=-1)
    return rows, cols, weights


# texels per attention launch of the chunked path: [16384, 1024] fp32 = 64 MiB of output at a time
DEFAULT_CHUNK_TEXELS = 16384
# output rows per band of the lazy map's encoder (about 0.25 GB of band temporaries at 1024², dim 256)
DEFAULT_BAND_ROWS = 16


class NAFSampler:
    """The NAF high-resolution map [1, C, T, T] evaluated only where it is sampled.

    `sample(g)` finds the texels the bilinear taps of g touch and runs NAF's attention at those
    texels alone, so the T×T×C map (4 GiB at T = 1024, C = 1024) and its upsampled keys and values
    are never built. Equal to `sample_features(naf(image, lr, (T, T)), g)` up to fp32 rounding.
    """

    def __init__(self, naf: nn.Module, image: torch.Tensor, lr_features: torch.Tensor, T: int, max_elements: int = DEFAULT_MAX_ELEMENTS):
        if image.shape[0] != 1 or lr_features.shape[0] != 1:
            raise ValueError("NAFSampler holds one image")
        self.naf, self.image, self.lr_features = naf, image, lr_features
        self.size = (int(T), int(T))
        self.max_elements = max_elements
        self.chunk_texels = DEFAULT_CHUNK_TEXELS
        self.band_rows = DEFAULT_BAND_ROWS
        self._qk = None  # encoder queries and pooled keys, computed on first use

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (1, self.lr_features.shape[1], *self.size)

    def texel_features(self, texels: torch.Tensor) -> torch.Tensor:
        """The map's features at texel ids y·T + x (int64 [M]): [M, C] (what the GPU
        back-projection gathers from)."""
        w = self.size[1]
        if self._qk is None:
            self._qk = self.naf.queries_keys(self.image, self.lr_features.shape[-2:], self.size)
        q, k = self._qk
        return self.naf.attend_at(q, k, self.lr_features, texels // w, texels % w, self.max_elements)[0]

    def texel_feature_chunks(self, texels: torch.Tensor):
        """(first row, [m, C]) for consecutive slices of texel ids: the queries come from the banded
        encoder (`NAF.queries_keys_at`), so neither the T×T query map nor the T×T output is built
        (the GPU back-projection's path)."""
        w = self.size[1]
        rows, cols = texels // w, texels % w
        q_sel, keys = self.naf.queries_keys_at(self.image, self.lr_features.shape[-2:], self.size, rows, cols, self.band_rows)
        for m0 in range(0, texels.numel(), self.chunk_texels):
            m1 = min(texels.numel(), m0 + self.chunk_texels)
            yield m0, self.naf.attend_sel(q_sel[:, m0:m1], self.size, keys, self.lr_features, rows[m0:m1], cols[m0:m1],
                                          self.max_elements)[0]

    def sample(self, g: torch.Tensor) -> torch.Tensor:
        h, w = self.size
        rows, cols, weights = bilinear_taps(g, h, w)
        texels, inverse = torch.unique(rows * w + cols, return_inverse=True)
        feats = self.texel_features(texels).float()  # [M, C]
        out = weights[:, :1] * feats[inverse[:, 0]]
        for t in range(1, 4):  # tap by tap: no [N, 4, C] gather
            out += weights[:, t : t + 1] * feats[inverse[:, t]]
        return out


FeatureMap = Union[torch.Tensor, NAFSampler]


class Encoding(NamedTuple):
    """DINOv3 output for one image size: global tokens [B, 1+R, C] (CLS + registers) and the
    patch map [B, C, P, P] (rows = image y, columns = image x), both fp32."""

    global_tokens: torch.Tensor
    patch_map: torch.Tensor


def _as_camera(camera) -> Camera:
    if isinstance(camera, Camera):
        return camera
    if isinstance(camera, dict):  # inference.py's camera_params dict
        return Camera(float(camera["camera_angle_x"]), float(camera["distance"]), float(camera.get("mesh_scale", 1.0)))
    raise TypeError(f"camera must be a Camera or a camera_params dict, not {type(camera).__name__}")


def _as_maps(maps) -> list:
    if isinstance(maps, Encoding):
        return [maps.patch_map]
    if isinstance(maps, (torch.Tensor, NAFSampler)):
        return [maps]
    return [m.patch_map if isinstance(m, Encoding) else m for m in maps]


def _sample(fmap: FeatureMap, g: torch.Tensor) -> torch.Tensor:
    return fmap.sample(g) if isinstance(fmap, NAFSampler) else sample_features(fmap, g)


class ImageConditioner(nn.Module):
    """One DINOv3 model and an optional NAF: image -> global tokens and per-voxel features.

    DINOv3 runs once per image size (`encode`); its Encoding is shared by every stage that uses
    that size. Per stage: `naf_sampler` (or the full `naf_map`) for the high-resolution branch,
    then `project` (active voxels) or `project_dense` (the SS stage's full grid); output channels
    follow the order of `maps` (LR patch map, then HR NAF map).
    """

    def __init__(self, dino: nn.Module, naf: nn.Module | None = None):
        super().__init__()
        self.dino = dino
        self.naf = naf
        # image size -> callable(image [1,3,S,S] in [0,1]) -> tokens, replacing `extract_tokens` at that size
        self.token_encoders: dict = {}

    @property
    def num_register_tokens(self) -> int:
        return int(self.dino.config.num_register_tokens)

    @property
    def patch_size(self) -> int:
        return int(self.dino.config.patch_size)

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> Encoding:
        """image [B, 3, S, S] in [0, 1] (already at the stage's size) -> Encoding."""
        from pixal3d_rt.models.dinov3 import extract_tokens, split_tokens  # transformers, needed here only

        encoder = self.token_encoders.get(image.shape[-1])  # e.g. a DINOv3 engine built for this size
        tokens = encoder(image) if encoder is not None else extract_tokens(self.dino, image)
        ps = self.patch_size
        return Encoding(*split_tokens(tokens, self.num_register_tokens, (image.shape[-2] // ps, image.shape[-1] // ps)))

    def _naf_inputs(self, patch_map):
        if self.naf is None:
            raise RuntimeError("this conditioner has no NAF")
        return patch_map.patch_map if isinstance(patch_map, Encoding) else patch_map

    @torch.no_grad()
    def naf_map(self, image: torch.Tensor, patch_map, T: int) -> torch.Tensor:
        """The full NAF map [B, C, T, T] (guide = the [0,1] image, not ImageNet-normalised).
        patch_map: [B, C, P, P] or the image's Encoding."""
        return self.naf(image, self._naf_inputs(patch_map), (int(T), int(T)))

    def naf_sampler(self, image: torch.Tensor, patch_map, T: int) -> NAFSampler:
        """The NAF map of one image as a lazy map that `project` evaluates only at sampled texels
        (a drop-in replacement for `naf_map` in `maps`)."""
        return NAFSampler(self.naf, image, self._naf_inputs(patch_map), T)

    @torch.no_grad()
    def project(self, coords: torch.Tensor, R: int, camera, image_size: int, maps) -> torch.Tensor:
        """Features at active voxels: coords int [N, 4] (batch, x, y, z) on the R³ grid -> [N, ΣC]
        fp32, the channels of `maps` (tensors [B, C, h, w], NAFSamplers or an Encoding's patch map)
        concatenated in order. Batch b samples map b; a map of batch 1 serves every b.
        camera: Camera or {"camera_angle_x", "distance", "mesh_scale"}; image_size: the encoder's S.
        On CUDA the Triton back-projection runs (PIXAL3D_DISABLE_TRITON_BACKPROJ=1: this reference)."""
        cam = _as_camera(camera)
        maps = _as_maps(maps)
        if coords.is_cuda:
            try:
                from pixal3d_rt.kernels import backproject_triton as bp  # triton imported on CUDA only
            except ImportError:
                bp = None
            if bp is not None and bp.supported(coords, maps):
                return bp.backproject(coords, R, cam.fov, cam.distance, cam.mesh_scale, image_size, maps)
        g = project_voxels(coords[:, 1:], R, cam.fov, cam.distance, image_size, cam.mesh_scale)
        batch = coords[:, 0].long()
        parts = []
        for m in maps:
            if m.shape[0] == 1:
                parts.append(_sample(m, g).float())
                continue
            out = torch.empty(g.shape[0], m.shape[1], dtype=torch.float32, device=g.device)
            for b in batch.unique().tolist():
                sel = batch == b
                out[sel] = _sample(m[b : b + 1], g[sel]).float()
            parts.append(out)
        return torch.cat(parts, dim=-1)

    @torch.no_grad()
    def project_dense(self, maps, R: int, camera, image_size: int) -> torch.Tensor:
        """Features of the whole R³ grid in token order (i·R + j)·R + l: [B, R³, ΣC]."""
        maps = _as_maps(maps)
        B = max(m.shape[0] for m in maps)
        dev = maps[0].image.device if isinstance(maps[0], NAFSampler) else maps[0].device
        xyz = dense_coords(R, dev)
        out = []
        for b in range(B):
            coords = torch.cat([torch.full_like(xyz[:, :1], b), xyz], dim=1)
            out.append(self.project(coords, R, camera, image_size, [m if m.shape[0] == 1 else m[b : b + 1] for m in maps]))
        return torch.stack(out, dim=0)
