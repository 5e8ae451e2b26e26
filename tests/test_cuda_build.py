"""The CUDA build (CMakeLists.txt -> one fatbin) and the run-time loader (kernels/cuda_loader.py).

Where cmake and nvcc exist, the fatbin is built in a temporary folder on every run (DESIGN.md §8:
CI compiles it) and checked for every target architecture and for the source hash the loader
expects; elsewhere those tests skip. The loader's CPU-side pieces are checked everywhere."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from pixal3d_rt.kernels import cuda_loader

REPO = Path(__file__).resolve().parents[1]
ARCHS = ["sm_80", "sm_86", "sm_89", "sm_90", "sm_120"]


def _nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None and Path("/usr/local/cuda/bin/nvcc").exists():
        nvcc = "/usr/local/cuda/bin/nvcc"
    return nvcc


def _cuobjdump(nvcc: str):
    found = shutil.which("cuobjdump") or str(Path(nvcc).parent / "cuobjdump")
    if Path(found).exists():
        return found
    try:  # Triton's wheel ships one
        import triton

        p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return str(p) if p.exists() else None
    except ImportError:
        return None


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    nvcc, cmake = _nvcc(), shutil.which("cmake")
    if nvcc is None or cmake is None:
        pytest.skip("nvcc or cmake not installed: the fatbin build is checked where they are")
    build = tmp_path_factory.mktemp("cuda_build")
    configure = subprocess.run(
        [cmake, "-S", str(REPO), "-B", str(build), f"-DCUDAToolkit_ROOT={Path(nvcc).resolve().parents[1]}"],
        capture_output=True, text=True,
    )
    assert configure.returncode == 0, configure.stdout + configure.stderr
    make = subprocess.run([cmake, "--build", str(build)], capture_output=True, text=True)
    assert make.returncode == 0, make.stdout + make.stderr
    return nvcc, build


def test_fatbin_holds_every_architecture(built):
    nvcc, build = built
    fatbin = build / cuda_loader.FATBIN_NAME
    assert fatbin.is_file() and fatbin.stat().st_size > 0
    tool = _cuobjdump(nvcc)
    if tool is None:
        pytest.skip("no cuobjdump to list the fatbin")
    listing = subprocess.run([tool, "--list-elf", "--list-ptx", str(fatbin)], capture_output=True, text=True, check=True).stdout
    elf = set(re.findall(r"\.(sm_\d+)\.cubin", listing))
    assert elf == set(ARCHS), listing
    assert re.search(r"sm_120\.ptx", listing), listing  # PTX for GPUs newer than the list


def test_cmake_hash_is_the_loaders(built):
    _, build = built
    assert (build / "pixal3d_kernels.src_hash").read_text().strip() == cuda_loader.source_hash()


def test_source_hash_follows_every_source(tmp_path, monkeypatch):
    # copying the sources elsewhere gives the same hash; changing any header changes it
    for p in cuda_loader.source_files():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    before = cuda_loader.source_hash()
    monkeypatch.setattr(cuda_loader, "CUDA_DIR", tmp_path)
    assert cuda_loader.source_hash() == before
    header = next(p for p in tmp_path.iterdir() if p.suffix == ".cuh")
    header.write_text(header.read_text() + "\n// changed\n")
    assert cuda_loader.source_hash() != before


def test_nvrtc_source_is_self_contained():
    src = cuda_loader.expanded_source()
    assert '#include "' not in src and "#include <" not in src  # NVRTC gets one string, no system headers
    for kernel in ("pixal3d_hash_insert", "pixal3d_hash_neighbors"):
        assert re.search(rf'extern "C" __global__ void {kernel}\(', src), kernel
    assert cuda_loader.HASH_SYMBOL in src


def test_fatbin_search_order(monkeypatch, tmp_path):
    monkeypatch.setenv("PIXAL3D_CUDA_FATBIN", str(tmp_path / "x.fatbin"))
    paths = cuda_loader.fatbin_candidates()
    assert paths[0] == tmp_path / "x.fatbin"
    assert paths[1:] == [cuda_loader.CUDA_DIR / cuda_loader.FATBIN_NAME, REPO / "build" / cuda_loader.FATBIN_NAME]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a usable GPU")
def test_loader_error_is_clear_without_gpu():
    with pytest.raises(cuda_loader.CudaKernelsUnavailable, match=r"CuPy|cupy|device|NVRTC"):
        cuda_loader._load(0)
