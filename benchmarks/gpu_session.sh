#!/usr/bin/env bash
# The GPU measurements the memory planner and the benchmark suite still need, one part per device call
# (each well inside 10 minutes). Run from the repository root on the GPU machine, with wheels for
# what it lacks carried in .whl/ (trimesh, xatlas, fast-simplification, nvidia-ml-py, matplotlib):
#   bash benchmarks/gpu_session.sh PART [PART ...]   (PART: tests, budget-tests, 1024, 1024-expandable, 1536, 512, host, export, quality;
#   results under $OUT; PIXAL3D_COMMIT=<sha> names the commit of a tree copied without its history;
#   MODES=a,b picks the export variants)
set -uo pipefail
[ $# -gt 0 ] || { echo "parts: tests, budget-tests, 1024, 1024-expandable, 1536, 512, host, export or quality" >&2; exit 2; }
out=${OUT:-bench-out}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
PIP_NO_BUILD_ISOLATION=0 PIP_NO_INDEX=1 python3 -m pip install -q --no-deps --no-build-isolation --use-pep517 -e . >/dev/null || exit 1
export PYTHONUNBUFFERED=1
# each resolution's budgets reach down to its target (512: 3 GB, 1024: 4 GB, 1536: 8 GB); BUDGETS=a,b,... overrides
declare -A budgets=([512]=${BUDGETS:-3,4,6,8} [1024]=${BUDGETS:-4,6,8,12} [1536]=${BUDGETS:-6,8,12})
# UPSTREAM=DIR (upstream's source, never in this repository) adds the per-stage ratios against its modules
upstream=${UPSTREAM:+--upstream $UPSTREAM}
status=0
for part in "$@"; do
case "$part" in
  budget-tests)  # the budget paths' GPU tests: host stores under the cuda backend, fresh budget workers
    python3 -m pytest -q --tb=long tests/test_planner.py tests/test_bench.py -k "host_store or fresh_worker or caps_the_allocator or host_budget or expandable_segments or cache_is_emptied" 2>&1 \
      | tee "$out/gpu_budget_tests.log" ;;
  tests)  # the CUDA paths the CPU never ran: residency streams and events, the backend's unload, the planner's runs
    python3 -m pytest -q tests/test_residency.py tests/test_cuda_backend.py tests/test_planner.py 2>&1 | tee "$out/gpu_tests.log" ;;
  1024|1536|512)  # 1536 exports no GLB here: a call with its export never came back (the cause was not seen)
    glb_runs=1; [ "$part" = 1536 ] && glb_runs=0
    pixal3d-rt bench --preset reference --resolution "$part" --runs 2 --glb-runs $glb_runs --vram-budget "${budgets[$part]}" \
      $upstream --out "$out/bench_$part" 2>&1 | tee "$out/bench_$part.log" ;;
  1024-expandable)  # the 1024 budgets with expandable segments under the cap (compare with part 1024 of the same call)
    PIXAL3D_EXPANDABLE_SEGMENTS=1 pixal3d-rt bench --preset reference --resolution 1024 --runs 2 --glb-runs 0 \
      --vram-budget "${budgets[1024]}" --out "$out/bench_1024_expandable" 2>&1 | tee "$out/bench_1024_expandable.log" ;;
  host)  # host RSS of the 1024 cascade with the weights read per stage into a host store (6 GiB device budget)
    pixal3d-rt bench --preset reference --resolution 1024 --runs 1 --glb-runs 0 --vram-budget 6 --budget-runs 2 \
      --host-budget 8 --out "$out/host_1024" 2>&1 | tee "$out/host_1024.log" ;;
  export)  # the export modes at grid 1024 on the GPU, and the variants (xatlas, C++ simplifier, torch nearest-triangle queries), twice (the first pays the GPU's warm-up;
    # results: $out/export_<gpu>.json)
    pixal3d-rt bench --section export_modes --section-arg=--grid=1024 --section-arg=--device=cuda --section-arg=--repeat=2 \
      --section-arg=--modes=${MODES:-fast,upstream,upstream_torch_closest,fast_xatlas,upstream_xatlas,fast_cpp_simplify} --out "$out" 2>&1 | tee "$out/export.log" ;;
  quality)
    pixal3d-rt bench --preset reference --resolution 512 --runs 1 --glb-runs 0 --quality --out "$out/quality_512" 2>&1 \
      | tee "$out/quality_512.log" ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
rc=$?; [ "$rc" = 0 ] || status=$rc
done
exit $status
