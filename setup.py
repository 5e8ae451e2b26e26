"""pixal3d-rt: one package, `pixal3d_rt`, assembled from the project's top-level folders (DESIGN.md §2)."""
from setuptools import setup

# top-level folder -> package; subpackages are discovered below each root.
ROOTS = {
    "pixal3d_rt": "python/pixal3d_rt",
    "pixal3d_rt.runtime": "runtime",
    "pixal3d_rt.kernels": "kernels",
    "pixal3d_rt.export": "export",
}


def _packages():
    import os

    pkgs, dirs = [], {}
    for pkg, root in ROOTS.items():
        for here, subdirs, files in os.walk(root):
            subdirs[:] = [d for d in subdirs if not d.startswith((".", "__"))]
            if "__init__.py" not in files:
                continue
            rel = os.path.relpath(here, root)
            name = pkg if rel == "." else pkg + "." + rel.replace(os.sep, ".")
            pkgs.append(name)
            dirs[name] = here
    return pkgs, dirs


PACKAGES, PACKAGE_DIR = _packages()

# extras as module-level lists: `test` includes the others, and tests/test_readme_ci.py reads them
KERNELS = ["triton"]
# onnxscript: torch.onnx's exporter; tensorrt-rtx: engine builds (CPU-only machines too) and the runner
EXPORT = ["onnx", "onnxruntime", "onnxscript", "tensorrt-rtx==1.7.1.116"]
# the web page, `pixal3d-rt serve`; Gradio 6 needs huggingface_hub>=1, which transformers 4.x refuses
WEB = ["gradio>=5.50,<6"]
# `pixal3d-rt bench`: charts, and the device memory of the process as NVML reports it
BENCH = ["matplotlib", "nvidia-ml-py"]
# all the test suite needs on a CPU (only GPU tests skip); README command 1 installs it
# (playwright drives Debian's chromium in tests/test_serve.py; it downloads no browser)
TEST = ["pytest", "hypothesis", "huggingface_hub", *KERNELS, *EXPORT, *WEB, "playwright", *BENCH]

setup(
    name="pixal3d-rt",
    version="0.1.0",
    description="Compiled, memory-budgeted inference runtime for Pixal3D (image -> textured PBR GLB)",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"pixal3d_rt.kernels": ["cuda/*.cu", "cuda/*.cuh", "cuda/*.fatbin"]},
    install_requires=[
        "torch>=2.6",  # sdpa_kernel(set_priority=) in runtime/cuda_backend.py
        "numpy",
        "safetensors",
        "transformers>=4.56,<5",  # DINOv3ViTModel module/key names of 4.x (checkpoint and golden layout)
        "trimesh",
        "pillow",
        "click",
        "xatlas",
        "fast-simplification",  # QEM decimation with prebuilt wheels (no compiler)
        "tqdm",
        "huggingface_hub>=0.34",  # --weights TencentARC/Pixal3D, pixal3d-rt download (python/pixal3d_rt/hub.py)
    ],
    extras_require={
        "test": TEST,
        "kernels": KERNELS,
        "export": EXPORT,
        "bench": BENCH,
        "web": WEB,
        # background removal for RGB inputs; plain `rembg` exits at import without an onnxruntime flavour
        "rembg": ["rembg[cpu]"],
        "rembg-gpu": ["rembg[gpu]"],
    },
    entry_points={"console_scripts": ["pixal3d-rt=pixal3d_rt.cli:main"]},
)
