"""Test session setup. Without a GPU, Triton kernels run on the CPU through Triton's interpreter;
it must be chosen before triton is first imported, so it is set here, not in the kernel tests."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def tiny():
    """The embedded tiny preset as an export source (export, aoti and fp8 tests)."""
    from pixal3d_rt.export.trt_build import Source

    return Source.from_preset("tiny")


@pytest.fixture(scope="session")
def tiny_weights_dir(tmp_path_factory):
    """The tiny preset written once in the official layout, for tests that read it (or copy it to damage it)."""
    from pixal3d_rt.checkpoints import write_weights
    from pixal3d_rt.presets import build_preset

    return write_weights(build_preset("tiny")[0], tmp_path_factory.mktemp("tiny-weights"))


@pytest.fixture(scope="session")
def tiny_engines_dir(tmp_path_factory):
    """One exported engine directory (the tiny SS decoder, TensorRT-RTX bf16), for tests that read or copy it."""
    from engine_dirs import HAVE_RTX, export_tiny
    from pixal3d_rt.export.trt_build import Source

    if not HAVE_RTX:
        pytest.skip("tensorrt-rtx is not installed (pip install tensorrt-rtx)")
    return export_tiny(Source.from_preset("tiny"), tmp_path_factory, "tiny-engines", "tensorrt-rtx", "bf16", ["ss_decoder"])[0]
