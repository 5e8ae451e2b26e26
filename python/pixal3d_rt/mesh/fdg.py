"""FlexiDualGrid mesh extraction (inference mode), as o_voxel.convert.flexible_dual_grid_to_mesh.

Golden README §3.4 pins it: one vertex per voxel (its dual vertex, in input order); for every voxel
row i and axis a (row-major over [N, 3]) with intersected[i, a], the four voxels sharing that edge
c + O[a][k] form a quad if all exist inside the grid; each quad becomes two triangles by the
split-weight rule (or, without weights, upstream's normal-alignment rule). Vectorised over chunks of
flagged edges; a sorted key table stands in for upstream's GPU hash map (VoxelTable).
"""
from __future__ import annotations

import torch

# O[a][k]: offsets of the four voxels around the a-directed edge at a voxel's upper corner.
# Module constants name their device: an import inside a `torch.device("meta")` context must not move them.
EDGE_NEIGHBOR_OFFSETS = torch.tensor(
    [
        [[0, 0, 0], [0, 0, 1], [0, 1, 1], [0, 1, 0]],  # x
        [[0, 0, 0], [1, 0, 0], [1, 0, 1], [0, 0, 1]],  # y
        [[0, 0, 0], [0, 1, 0], [1, 1, 0], [1, 0, 0]],  # z
    ],
    dtype=torch.int64,
    device="cpu",
)
SPLIT_02 = torch.tensor([0, 1, 2, 0, 2, 3], device="cpu")  # diagonal q0-q2
SPLIT_13 = torch.tensor([0, 1, 3, 3, 1, 2], device="cpu")  # diagonal q1-q3


def _grid_dims(grid_size) -> tuple[int, int, int]:
    if isinstance(grid_size, torch.Tensor):
        grid_size = grid_size.tolist()
    if isinstance(grid_size, (int, float)):
        return (int(grid_size),) * 3
    w, h, d = (int(g) for g in grid_size)
    return w, h, d


# flagged edges looked up per chunk: the [M, 4, 3] neighbour coordinates of every edge at once
# were the extraction's peak (hundreds of bytes per voxel)
EDGE_CHUNK = 1 << 20


class VoxelTable:
    """Row lookup in unique voxels [N, 3]: a sorted key table and searchsorted stand in for
    o_voxel's GPU hash map (same key -> row mapping), sorted once for any number of lookups."""

    def __init__(self, coords: torch.Tensor, dims: tuple[int, int, int]):
        self.dims = dims
        w, h, d = dims
        c = coords.to(torch.int64)
        self.sorted_keys, self.order = torch.sort((c[:, 0] * h + c[:, 1]) * d + c[:, 2])

    def lookup(self, queries: torch.Tensor) -> torch.Tensor:
        """Row of each query voxel, or -1: absent, or outside [0, W)x[0, H)x[0, D).

        The bounds check comes before the flat key x·H·D + y·D + z is formed, so (x, y, D) never
        aliases (x, y+1, 0), as in o_voxel's hashmap_lookup_3d.
        """
        w, h, d = self.dims
        q = queries.to(torch.int64)
        inside = (q >= 0).all(dim=-1) & (q[..., 0] < w) & (q[..., 1] < h) & (q[..., 2] < d)
        qk = (q[..., 0] * h + q[..., 1]) * d + q[..., 2]
        if self.sorted_keys.numel() == 0:
            return torch.full(qk.shape, -1, dtype=torch.int64, device=q.device)
        pos = torch.searchsorted(self.sorted_keys, qk).clamp_max_(self.sorted_keys.numel() - 1)
        found = inside & (self.sorted_keys[pos] == qk)
        return torch.where(found, self.order[pos], -1)


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # upstream calls torch.cross without dim: the first dimension of size 3, which for exactly
    # 3 quads is the quad dimension rather than xyz; keep that behaviour so faces match upstream
    dim = 0 if a.shape[0] == 3 else -1
    return torch.linalg.cross(a, b, dim=dim)


def _alignment(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """|n_a · n_b| with n_a = (P[t1]-P[t0]) x (P[t2]-P[t0]), n_b = (P[t2]-P[t1]) x (P[t3]-P[t1])."""
    n_a = _cross(p[t[:, 1]] - p[t[:, 0]], p[t[:, 2]] - p[t[:, 0]])
    n_b = _cross(p[t[:, 2]] - p[t[:, 1]], p[t[:, 3]] - p[t[:, 1]])
    return (n_a * n_b).sum(dim=1, keepdim=True).abs()


def flexible_dual_grid_to_mesh(
    coords: torch.Tensor,
    dual_vertices: torch.Tensor,
    intersected: torch.Tensor,
    split_weight: torch.Tensor | None,
    aabb,
    grid_size,
    return_quads: bool = False,
):
    """Mesh of a flexible dual grid (inference mode).

    coords int [N, 3] unique voxels (x, y, z) in [0, grid_size); dual_vertices float32 [N, 3] in voxel
    units from the voxel's lower corner; intersected bool [N, 3]; split_weight [N, 1] or None;
    aabb [[min xyz], [max xyz]]; grid_size int or (W, H, D).
    Returns vertices float32 [N, 3] and faces int32 [2L, 3] (triangles 2k, 2k+1 from quad k), plus
    the quads int32 [L, 4] in emission order with return_quads.
    """
    device = coords.device
    dims = _grid_dims(grid_size)
    aabb = torch.as_tensor(aabb, dtype=torch.float32, device=device)
    voxel_size = (aabb[1] - aabb[0]) / torch.tensor(dims, dtype=torch.int32, device=device)
    vertices = (coords.float() + dual_vertices) * voxel_size + aabb[0].reshape(1, 3)

    # every flagged (row, axis), row-major, looks up its four edge-neighbour voxels
    table, offsets = VoxelTable(coords, dims), EDGE_NEIGHBOR_OFFSETS.to(device)
    flagged = intersected.to(torch.bool).nonzero()  # [M, 2] (row, axis), row-major
    quads = []
    for s in range(0, flagged.shape[0], EDGE_CHUNK):
        row, axis = flagged[s : s + EDGE_CHUNK].unbind(1)
        rows = table.lookup(coords[row].to(torch.int64).unsqueeze(1) + offsets[axis])  # [m, 4]
        quads.append(rows[(rows >= 0).all(dim=1)])
    quads = torch.cat(quads) if quads else torch.zeros(0, 4, dtype=torch.int64, device=device)  # [L, 4]
    del table, flagged

    if split_weight is None:
        t02, t13 = quads[:, SPLIT_02.to(device)], quads[:, SPLIT_13.to(device)]
        choose_02 = _alignment(vertices, t02) > _alignment(vertices, t13)  # [L, 1]
    else:
        w = split_weight.reshape(-1)[quads]  # [L, 4]
        choose_02 = (w[:, 0] * w[:, 2] > w[:, 1] * w[:, 3]).unsqueeze(1)
        t02, t13 = quads[:, SPLIT_02.to(device)], quads[:, SPLIT_13.to(device)]
    faces = torch.where(choose_02, t02, t13).reshape(-1, 3).int()
    if return_quads:
        return vertices, faces, quads.int()
    return vertices, faces
