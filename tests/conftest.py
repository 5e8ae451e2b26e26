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
