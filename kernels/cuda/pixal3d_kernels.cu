// The one CUDA module of pixal3d-rt: CMakeLists.txt builds this file into pixal3d_kernels.fatbin
// (sm_80/86/89/90/120), and kernels/cuda_loader.py compiles it with NVRTC where no matching fatbin
// is found. Kernels live in the headers included here; every exported kernel is extern "C".

#ifndef PIXAL3D_SRC_HASH
#define PIXAL3D_SRC_HASH 0ULL
#endif

// sha256 prefix of kernels/cuda/*.cu + *.cuh (see cuda_loader.source_hash): a fatbin whose value
// differs from the sources beside it is stale and is not used.
__device__ unsigned long long pixal3d_kernels_src_hash = PIXAL3D_SRC_HASH;

#include "hashmap.cuh"
