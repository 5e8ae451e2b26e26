"""Test session setup. Without a GPU, Triton kernels run on the CPU through Triton's interpreter;
it must be chosen before triton is first imported, so it is set here, not in the kernel tests."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
