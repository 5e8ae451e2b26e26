"""Test session setup. Triton kernels run on the CPU through Triton's interpreter; it must be chosen
before triton is first imported, so it is set here rather than in the kernel tests."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
