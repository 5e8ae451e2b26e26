"""Sections of `pixal3d-rt bench --section NAME`: kernels and networks measured alone, each in its own
process, each writing `<out>/<kind>_<gpu>.json` (one results file per kind of measurement and GPU,
the layout of benchmarks/results/).

    pixal3d-rt bench --section flows --out DIR [--upstream DIR] [--section-arg=--quick]

`--section-arg ARG` passes ARG to every section named (their own options: `pixal3d-rt bench
--section NAME --section-arg=--help` lists them).
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Section:
    name: str
    kind: str  # the result file's prefix: <kind>_<gpu>.json
    about: str
    cuda: bool = True  # needs a CUDA GPU
    cpu_with: str | None = None  # the section option that lets it run on a CPU (checks code, measures nothing)
    upstream: bool = False  # takes --upstream DIR


SECTIONS = {s.name: s for s in (
    Section("flows", "flows", "flow transformers: bf16 matmul rate, Triton kernel checks, attention variants, one forward "
            "per network and token count, the four sampling stages; cuda backend against eager (and upstream's modules "
            "with --upstream)", upstream=True),
    Section("eager_baseline", "eager_baseline", "the eager flow networks, one forward each at the reference token counts "
            "(against upstream's modules with --upstream)", upstream=True),
    Section("sparse_conv", "sparse_conv", "sparse submanifold conv: neighbour maps, Triton implicit GEMM per level and tile, "
            "whole shape decodes in fresh processes, NVRTC fallback", cpu_with="--smoke"),
    Section("conditioning", "conditioning", "conditioning kernels: sparse back-projection, neighbourhood attention, the "
            "texture stage's NAF at sampled texels"),
    Section("first_call", "first_call", "the first call at a token count a process has not seen (cuDNN attention plans), "
            "per backend variant"),
    Section("sustained", "sustained", "attention and GEMMs under seconds of sustained load, with SM clock and power"),
    Section("attention_engines", "attention_engines", "every cuDNN attention plan of the flows' self-attention"),
    Section("export_modes", "export", "the GLB export modes on the reference mug's surface, step by step", cuda=False),
)}


def refusal(section: Section, section_args, cuda_available: bool) -> str | None:
    """Why this section cannot run here (one line), or None."""
    if not section.cuda or cuda_available or "--help" in section_args:
        return None
    if section.cpu_with and section.cpu_with in section_args:
        return None
    how = f" (on a CPU: --section-arg={section.cpu_with} checks its code)" if section.cpu_with else ""
    return f"section {section.name} needs a CUDA GPU{how}"


def run_section(section: Section, out_dir: Path, section_args=(), upstream=None) -> dict:
    """Run one section in a fresh process; returns {section, status, files}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    before = {p: p.stat().st_mtime_ns for p in out_dir.glob(f"{section.kind}_*")}
    cmd = [sys.executable, "-m", f"{__name__}.{section.name}", "--out", str(out_dir), *section_args]
    if upstream is not None and section.upstream:
        cmd += ["--upstream", str(upstream)]
    status = subprocess.run(cmd).returncode
    files = sorted(str(p) for p in out_dir.glob(f"{section.kind}_*") if before.get(p) != p.stat().st_mtime_ns)
    return {"section": section.name, "status": status, "files": files}
