"""What the Triton kernel tests share: the interpreter marker, the interpreted kernel module, and
random voxel coordinates."""
import importlib
import os

import pytest
import torch

# These tests check the kernels as Triton's CPU interpreter runs them; tests/conftest.py selects the
# interpreter before triton is first imported on machines without CUDA.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="Triton interpreter not selected (tests/conftest.py selects it without CUDA)")


def interpreted_module(name: str, kernel: str):
    """The kernel module, checking that its kernel `kernel` is built by Triton's CPU interpreter."""
    mod = importlib.import_module(name)
    assert type(getattr(mod, kernel)).__name__ == "InterpretedFunction"
    return mod


def random_coords(R: int, n: int, batches: int, seed: int) -> torch.Tensor:
    """n distinct voxels [batch, x, y, z] (int32) on `batches` grids of R^3, sorted."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(batches * R**3, generator=g)[:n].sort().values
    b, k = flat // R**3, flat % R**3
    xyz = torch.stack([k // (R * R), (k // R) % R, k % R], dim=-1)
    return torch.cat([b[:, None], xyz], dim=1).int()
