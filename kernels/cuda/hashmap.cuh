// GPU hash table of voxel coordinates and the 3x3x3 neighbour-map lookup (DESIGN.md §6).
//
// Same function as kernels/subm_conv.py:build_neighbor_map_reference: every voxel (b, x, y, z) gets
// the 64-bit key ((b*ex + x')*ey + y')*ez + z' with x' = x - x0 + 1 (and so on) inside a box padded by
// one cell per side, so the key of a neighbour one step away is key + a constant shift and never
// aliases another voxel. Keys go into an open-addressing table (linear probing, power-of-two
// capacity, load factor <= 1/2); the lookup writes nmap[i, v] = row of neighbour v = 9a + 3b + c at
// offset (a-1, b-1, c-1), or -1.
//
// Pointers arrive as 64-bit integers (the loader passes torch data pointers), and no header is
// included, so the same source builds with nvcc (CMake fatbin) and NVRTC (first-use fallback).

#define PIXAL3D_HASH_EMPTY 0xFFFFFFFFFFFFFFFFULL  // keys are >= 0 as signed values

__device__ __forceinline__ unsigned long long pixal3d_mix64(unsigned long long k) {
    // murmur3's 64-bit finaliser: neighbouring keys land in unrelated slots
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return k;
}

__device__ __forceinline__ long long pixal3d_voxel_key(const int* coords, long long i, long long x0, long long y0,
                                                       long long z0, long long ex, long long ey, long long ez) {
    const int* c = coords + 4 * i;
    long long b = c[0], x = c[1] - x0 + 1, y = c[2] - y0 + 1, z = c[3] - z0 + 1;
    return ((b * ex + x) * ey + y) * ez + z;
}

// One thread per voxel: claim a slot for its key (or find it, for a repeated voxel) and store the row.
extern "C" __global__ void pixal3d_hash_insert(unsigned long long coords_ptr, long long n, unsigned long long keys_ptr,
                                               unsigned long long vals_ptr, long long capacity_mask, long long x0,
                                               long long y0, long long z0, long long ex, long long ey, long long ez) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int* coords = (const int*)coords_ptr;
    unsigned long long* keys = (unsigned long long*)keys_ptr;
    int* vals = (int*)vals_ptr;
    unsigned long long key = (unsigned long long)pixal3d_voxel_key(coords, i, x0, y0, z0, ex, ey, ez);
    unsigned long long slot = pixal3d_mix64(key) & (unsigned long long)capacity_mask;
    while (true) {
        unsigned long long prev = atomicCAS(keys + slot, PIXAL3D_HASH_EMPTY, key);
        if (prev == PIXAL3D_HASH_EMPTY || prev == key) {
            vals[slot] = (int)i;
            return;
        }
        slot = (slot + 1) & (unsigned long long)capacity_mask;
    }
}

// One thread per (voxel, tap): consecutive threads write consecutive nmap entries.
extern "C" __global__ void pixal3d_hash_neighbors(unsigned long long coords_ptr, long long n, unsigned long long keys_ptr,
                                                  unsigned long long vals_ptr, long long capacity_mask, long long x0,
                                                  long long y0, long long z0, long long ex, long long ey, long long ez,
                                                  unsigned long long nmap_ptr) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= 27 * n) return;
    const int* coords = (const int*)coords_ptr;
    const unsigned long long* keys = (const unsigned long long*)keys_ptr;
    const int* vals = (const int*)vals_ptr;
    int* nmap = (int*)nmap_ptr;
    long long i = t / 27;
    int v = (int)(t - 27 * i);
    long long shift = ((long long)(v / 9 - 1) * ey + (long long)((v / 3) % 3 - 1)) * ez + (long long)(v % 3 - 1);
    unsigned long long key = (unsigned long long)(pixal3d_voxel_key(coords, i, x0, y0, z0, ex, ey, ez) + shift);
    unsigned long long slot = pixal3d_mix64(key) & (unsigned long long)capacity_mask;
    int found = -1;
    while (true) {
        unsigned long long k = keys[slot];
        if (k == key) {
            found = vals[slot];
            break;
        }
        if (k == PIXAL3D_HASH_EMPTY) break;
        slot = (slot + 1) & (unsigned long long)capacity_mask;
    }
    nmap[t] = found;
}
