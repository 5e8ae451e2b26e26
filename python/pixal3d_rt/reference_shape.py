"""A reference object's structure for benchmarks: a procedural mug, voxelised at any grid.

Random weights decide structure at random (occupancy, subdivisions, surface crossings), so token and
voxel counts of a random-weight run say nothing about a real object. `ReferenceStructure` replaces
those decisions after the networks have computed them, with the structure of a closed, non-convex
solid: a mug (walls, an open cavity, a bottom) with a handle, given as a 1-Lipschitz signed
distance bound f (negative inside) over the grid frame [-0.5, 0.5]³.

At a grid G a voxel is active when |f(centre)| ≤ k_G times the voxel's half-diagonal (√3/2 · 1/G),
k_G ≥ 1 (SHELL_THICKNESS). Because f is 1-Lipschitz, a child that passes has a parent that passes
when k_parent ≥ (k_child + 1)/2 (the child's centre is √3/4 · 1/G from the parent's), so those
levels nest as the decoders' subdivisions do; and the four voxels around every grid edge the surface
crosses are active, so the dual-grid mesh is closed.
"""
from __future__ import annotations

import math

import torch

from .models.sparse import SparseTensor

# mug proportions in the grid frame (y up); sized so that the token counts match a typical object:
# about 4.4 k tokens at 32³, 17.5 k at 64³, 40-49 k at 96³ and 4-5 M voxels at 1024³
OUTER_RADIUS = 0.254
WALL = 0.065
HALF_HEIGHT = 0.335
BOTTOM = 0.065
HANDLE_RADIUS = 0.151  # torus in the x-y plane, centred on the outer wall
HANDLE_THICKNESS = 0.038
# shell thickness per grid, in half-diagonals (1 elsewhere), for decodes whose output grid is at most
# THICK_UP_TO (the LR decode whose 512³ voxels become the HR tokens, and 512 runs): that set is thicker
# than one voxel, as the trained decoder's is. From 64³ on, each level's radius is at least half of
# (its child level's + 1), so those levels nest; the 32³ set (the sparse structure) is the thinnest
# shell, and the upsampling keeps the children of it that are active. Decodes to finer grids keep
# one-voxel shells at every level: a level then has about 4x its parent's voxels, as a trained
# decoder's levels grow (a thick 512³ level under a 1024³ output would hold ~4x too many voxels)
SHELL_THICKNESS = {64: 1.375, 128: 1.75, 256: 2.5, 512: 4.0}
THICK_UP_TO = 512
CHUNK = 1 << 22  # points per evaluation chunk
FIELD_CHUNK = 1 << 18  # voxels per chunk of mesh_fields (~0.2 KB of temporaries each, inside the extraction's peak)


def mug_sdf(p: torch.Tensor) -> torch.Tensor:
    """Signed distance bound (1-Lipschitz, < 0 inside) of the mug at points p [..., 3] (x, y, z)."""
    x, y, z = p.unbind(-1)
    rho = torch.sqrt(x * x + z * z)

    def cylinder(radius, y0, y1):
        d_r, d_y = rho - radius, torch.maximum(y0 - y, y - y1)
        outside = torch.sqrt(d_r.clamp_min(0) ** 2 + d_y.clamp_min(0) ** 2)
        return outside + torch.minimum(torch.maximum(d_r, d_y), torch.zeros_like(d_r))

    body = cylinder(OUTER_RADIUS, -HALF_HEIGHT, HALF_HEIGHT)
    cavity = cylinder(OUTER_RADIUS - WALL, -HALF_HEIGHT + BOTTOM, HALF_HEIGHT + 1.0)  # open at the top
    cup = torch.maximum(body, -cavity)
    # handle: a torus around the z axis through (OUTER_RADIUS, 0, 0), cut off inside the body
    hx = x - OUTER_RADIUS
    ring = torch.sqrt(hx * hx + y * y) - HANDLE_RADIUS
    handle = torch.maximum(torch.sqrt(ring * ring + z * z) - HANDLE_THICKNESS, OUTER_RADIUS - WALL / 2 - rho)
    return torch.minimum(cup, handle)


def _centres(coords: torch.Tensor, grid: int) -> torch.Tensor:
    """Voxel centres in the grid frame of int coords [N, 3] at `grid`."""
    return (coords.float() + 0.5) / grid - 0.5


def _sdf_chunked(sdf, points: torch.Tensor) -> torch.Tensor:
    return torch.cat([sdf(points[s : s + CHUNK]) for s in range(0, points.shape[0], CHUNK)]) if points.shape[0] else points[:, 0]


def shell_radius(grid: int, out_grid: int | None = None) -> float:
    """The |f| up to which a voxel is active at `grid` in a decode to `out_grid` (None: `grid`): its
    half-diagonal times the level's thickness."""
    thick = (out_grid or grid) <= THICK_UP_TO
    return (SHELL_THICKNESS.get(grid, 1.0) if thick else 1.0) * math.sqrt(3) / 2 / grid


class ReferenceStructure:
    """The structure a Pipeline takes from a reference shape instead of its networks (its `structure`).

    occupancy(grid): the sparse-structure voxels [N, 4] (batch 0) at the LR grid;
    subdivision(coords, grid, logits, out_grid): for parents [N, 4] at `grid` in a decode to `out_grid`,
      logits [N, 8] whose sign keeps exactly the active children at 2·grid (child j at 2c + (j&1,
      j>>1&1, j>>2&1));
    mesh_fields(h, grid): the shape decoder's output with its seven mesh channels (dual vertex,
      edge crossings, split weight) replaced by the reference surface's at `grid`.
    """

    name = "mug"

    def __init__(self, sdf=mug_sdf):
        self.sdf = sdf

    def active(self, coords: torch.Tensor, grid: int, out_grid: int | None = None) -> torch.Tensor:
        """bool [N]: which voxels (int [N, 3]) are active at `grid` in a decode to `out_grid`."""
        return _sdf_chunked(self.sdf, _centres(coords, grid)).abs() <= shell_radius(grid, out_grid)

    def voxels(self, grid: int, device="cpu") -> torch.Tensor:
        """All active voxels at `grid` as int32 [N, 3], found level by level from 8³ down."""
        level, coords = 8, torch.stack(torch.meshgrid(*[torch.arange(8, device=device)] * 3, indexing="ij"), -1).reshape(-1, 3)
        coords = coords[self.active(coords, level, grid)]
        while level < grid:
            if grid % (level * 2):
                break
            coords = _children(coords)
            level *= 2
            coords = coords[self.active(coords, level, grid)]
        if level != grid:  # grids that are not 8·2^k: test every child of the covering coarser level
            scale = grid / level
            lo = (coords.float() * scale).floor().long()
            span = math.ceil(scale) + 1
            offs = torch.stack(torch.meshgrid(*[torch.arange(span, device=device)] * 3, indexing="ij"), -1).reshape(-1, 3)
            cand = (lo[:, None, :] + offs[None]).reshape(-1, 3).clamp(0, grid - 1).unique(dim=0)
            coords = cand[self.active(cand, grid)]
        return coords.int()

    def occupancy(self, grid: int, device="cpu") -> torch.Tensor:
        c = self.voxels(grid, device)
        return torch.cat([torch.zeros_like(c[:, :1]), c], 1)

    def subdivision(self, coords: torch.Tensor, grid: int, logits: torch.Tensor, out_grid: int | None = None) -> torch.Tensor:
        child = _children(coords[:, 1:].long())  # [N*8, 3], child j of parent p at row 8p + j
        keep = self.active(child, 2 * grid, out_grid).reshape(-1, 8)
        return torch.where(keep, 1.0, -1.0).to(logits.dtype)

    def mesh_fields(self, h: SparseTensor, grid: int, voxel_margin: float = 0.5) -> SparseTensor:
        """Channels 0:3 make (1+2m)·sigmoid − m the centre moved onto the surface (clamped to the
        voxel), 3:6 flag the crossed edges at the voxel's upper corner, 6 gives split weight 1."""
        # written chunk by chunk into one tensor of the decoder's width and dtype: a benchmark's
        # stand-in should not add to the extraction's peak what real decoder outputs never hold
        feats = torch.empty_like(h.feats)
        feats[:, 7:] = h.feats[:, 7:]
        for s in range(0, feats.shape[0], FIELD_CHUNK):
            feats[s : s + FIELD_CHUNK, :7] = _mesh_rows(self.sdf, h.coords[s : s + FIELD_CHUNK, 1:].long(), grid, voxel_margin)
        return h.replace(feats)

    def surface_mesh(self, grid: int, device="cpu"):
        """(vertices, faces) of the reference surface at `grid`: the mesh its structure gives."""
        from .mesh.fdg import flexible_dual_grid_to_mesh

        c = self.voxels(grid, device)
        f = _mesh_rows(self.sdf, c.long(), grid, 0.5).float()
        m = 0.5
        verts = (1 + 2 * m) * torch.sigmoid(f[:, 0:3]) - m
        return flexible_dual_grid_to_mesh(c, verts, f[:, 3:6] > 0, torch.nn.functional.softplus(f[:, 6:7]),
                                          aabb=[[-0.5] * 3, [0.5] * 3], grid_size=grid)


CHILD_OFFSETS = torch.tensor([[j & 1, (j >> 1) & 1, (j >> 2) & 1] for j in range(8)], device="cpu")


def _children(coords: torch.Tensor) -> torch.Tensor:
    return (coords[:, None, :] * 2 + CHILD_OFFSETS.to(coords.device)).reshape(-1, 3)


def _mesh_rows(sdf, c: torch.Tensor, grid: int, margin: float) -> torch.Tensor:
    centre = _centres(c, grid)
    # gradient by central differences; the centre moved along it by −f lands on the surface
    eps = 0.25 / grid
    eye = torch.eye(3, device=c.device) * eps
    grad = torch.stack([(sdf(centre + eye[a]) - sdf(centre - eye[a])) / (2 * eps) for a in range(3)], -1)
    f0 = sdf(centre)
    grad = grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    dual = (0.5 - (f0[:, None] * grad) * grid).clamp(0.0, 1.0)  # voxel units from the lower corner
    t = ((dual + margin) / (1 + 2 * margin)).clamp(1e-4, 1 - 1e-4)
    upper = sdf((c.float() + 1) / grid - 0.5)
    crossed = torch.stack([(upper > 0) != (sdf((c.float() + 1 - torch.eye(3, device=c.device)[a]) / grid - 0.5) > 0)
                           for a in range(3)], -1)
    split = torch.full_like(f0[:, None], math.log(math.e - 1))  # softplus⁻¹(1)
    return torch.cat([torch.log(t / (1 - t)), torch.where(crossed, 1.0, -1.0), split], 1)
