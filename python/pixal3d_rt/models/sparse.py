"""A minimal sparse tensor: features per active voxel plus their integer coordinates.

Upstream's `SparseTensor` carries a spatial cache and many helpers; the networks here only need
features, coordinates and per-batch row ranges, so that is all this holds.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SparseTensor:
    feats: torch.Tensor  # [N, C]
    coords: torch.Tensor  # [N, 4] int32, columns (batch, x, y, z); rows of one batch item contiguous
    cache: dict = field(default_factory=dict)  # per-coordinate-set data (neighbour maps, RoPE phases)

    def __post_init__(self):
        if self.feats.shape[0] != self.coords.shape[0]:
            raise ValueError(f"SparseTensor: {self.feats.shape[0]} feature rows but {self.coords.shape[0]} coordinates")

    @property
    def shape(self):
        return (self.batch_size, *self.feats.shape[1:])

    @property
    def device(self):
        return self.feats.device

    @property
    def dtype(self):
        return self.feats.dtype

    @property
    def batch_size(self) -> int:
        return int(self.coords[:, 0].max().item()) + 1 if self.coords.shape[0] else 0

    def batch_counts(self) -> list[int]:
        """Number of rows of each batch item (items are contiguous and in order)."""
        key = "batch_counts"
        if key not in self.cache:
            b = self.coords[:, 0].long()
            n = self.batch_size
            self.cache[key] = torch.bincount(b, minlength=n).tolist() if n else []
        return self.cache[key]

    def replace(self, feats: torch.Tensor) -> "SparseTensor":
        """Same coordinates (and coordinate cache), new features."""
        return SparseTensor(feats, self.coords, self.cache)

    def to(self, *args, **kwargs) -> "SparseTensor":
        feats = self.feats.to(*args, **kwargs)
        device = feats.device
        coords = self.coords.to(device)
        cache = self.cache if coords is self.coords else {}
        return SparseTensor(feats, coords, cache)
