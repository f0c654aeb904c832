// Block checksums of tierkv (TREE_CHECKSUM "xxh3-4k-sectors/xxh64-v1", see tierkv/integrity.py).
//
// A block of n bytes is cut into k = ceil(n / 4096) sectors, the last one zero-padded to 4096
// bytes; leaf_i = XXH3_64bits(sector_i) (default secret, seed 0) and the checksum is
// XXH64(leaf_0 .. leaf_{k-1} as little-endian u64, seed = n). The CPU side computes the same
// value with the `xxhash` package, bit for bit.
//
// Compiled at first use by NVRTC (tierkv/ops/cuda_build.py), so this file includes no headers.
// Pointers to pinned host memory work like device pointers here (UVA).
//
// Kernel 1 (leaves): four lanes per sector. XXH3's long-input loop keeps 8 u64 accumulators
// over 64-byte stripes, and accumulator i takes the product of input word i and the raw input
// word i^1: the accumulators work in pairs (2j, 2j+1) that never touch another pair until the
// final merge. So lane j of a group of four loads the 16 bytes of pair j of every stripe (one
// 16-byte load; the group reads the stripe's 64 bytes) and runs its pair alone: no shuffles in
// the loop. The merge is one 64x64->128 multiply per pair, summed over the group with two
// shuffles. A warp hashes 8 sectors at once; each lane has 16 loads of 16 bytes in flight.
// The secret words a lane needs (2j .. 2j+17) sit in registers, picked by compile-time index.
//
// Kernel 2 (roots): XXH64 over each block's leaves (in global memory, written by kernel 1 on
// the same stream): one thread per block, or for blocks of many sectors one warp per block.
//
// Kernels exist once per access width W (16, 8, 4, 2, 1 bytes): the Python side picks the
// widest W that divides the pool's address and the row length. A sector that ends past the
// block's last byte (the short last sector) takes the bounds-checked path, reading zeros there.

typedef unsigned long long u64;
typedef long long i64;
typedef unsigned int u32;

#define SECTOR 4096

#define P32_1 0x9E3779B1u
#define P32_2 0x85EBCA77u
#define P32_3 0xC2B2AE3Du
#define P64_1 0x9E3779B185EBCA87ull
#define P64_2 0xC2B2AE3D27D4EB4Full
#define P64_3 0x165667B19E3779F9ull
#define P64_4 0x85EBCA77C2B2AE63ull
#define P64_5 0x27D4EB2F165667C5ull

// XXH3_kSecret (192 bytes) as little-endian u64 words: stripe s, accumulator i reads word s + i.
__constant__ u64 kSecret[24] = {
    0xbe4ba423396cfeb8ull, 0x1cad21f72c81017cull, 0xdb979083e96dd4deull, 0x1f67b3b7a4a44072ull,
    0x78e5c0cc4ee679cbull, 0x2172ffcc7dd05a82ull, 0x8e2443f7744608b8ull, 0x4c263a81e69035e0ull,
    0xcb00c391bb52283cull, 0xa32e531b8b65d088ull, 0x4ef90da297486471ull, 0xd8acdea946ef1938ull,
    0x3f349ce33f76faa8ull, 0x1d4f0bc7c7bbdcf9ull, 0x3159b4cd4be0518aull, 0x647378d9c97e9fc8ull,
    0xc3ebd33483acc5eaull, 0xeb6313faffa081c5ull, 0x49daf0b751dd0d17ull, 0x9e68d429265516d3ull,
    0xfca1477d58be162bull, 0xce31d07ad1b8f88full, 0x280416958f3acb45ull, 0x7e404bbbcafbd7afull};
// Words at secret + 121 + 8i (XXH_SECRET_LASTACC_START = 7): the last stripe.
__constant__ u64 kLastStripe[8] = {
    0xea647378d9c97e9full, 0xc5c3ebd33483acc5ull, 0x17eb6313faffa081ull, 0xd349daf0b751dd0dull,
    0x2b9e68d429265516ull, 0x8ffca1477d58be16ull, 0x45ce31d07ad1b8f8ull, 0xaf280416958f3acbull};
// Words at secret + 11 + 8i (XXH_SECRET_MERGEACCS_START): the merge.
__constant__ u64 kMerge[8] = {
    0x6dd4de1cad21f72cull, 0xa44072db979083e9ull, 0xe679cb1f67b3b7a4ull, 0xd05a8278e5c0cc4eull,
    0x4608b82172ffcc7dull, 0x9035e08e2443f774ull, 0x52283c4c263a81e6ull, 0x65d088cb00c391bbull};
// XXH3_INIT_ACC.
__constant__ u64 kInitAcc[8] = {P32_3, P64_1, P64_2, P64_3, P64_4, P32_2, P64_5, P32_1};

// 16 bytes at p (aligned to W) as two little-endian u64 words, through W-byte loads.
template <int W>
__device__ __forceinline__ void load16(const unsigned char* p, u64& w0, u64& w1);

template <>
__device__ __forceinline__ void load16<16>(const unsigned char* p, u64& w0, u64& w1) {
  const uint4 v = *(const uint4*)p;
  w0 = ((u64)v.y << 32) | v.x;
  w1 = ((u64)v.w << 32) | v.z;
}

template <>
__device__ __forceinline__ void load16<8>(const unsigned char* p, u64& w0, u64& w1) {
  w0 = ((const u64*)p)[0];
  w1 = ((const u64*)p)[1];
}

template <>
__device__ __forceinline__ void load16<4>(const unsigned char* p, u64& w0, u64& w1) {
  const u32* q = (const u32*)p;
  w0 = ((u64)q[1] << 32) | q[0];
  w1 = ((u64)q[3] << 32) | q[2];
}

template <>
__device__ __forceinline__ void load16<2>(const unsigned char* p, u64& w0, u64& w1) {
  const unsigned short* q = (const unsigned short*)p;
  w0 = (u64)q[0] | ((u64)q[1] << 16) | ((u64)q[2] << 32) | ((u64)q[3] << 48);
  w1 = (u64)q[4] | ((u64)q[5] << 16) | ((u64)q[6] << 32) | ((u64)q[7] << 48);
}

template <>
__device__ __forceinline__ void load16<1>(const unsigned char* p, u64& w0, u64& w1) {
  w0 = 0;
  w1 = 0;
#pragma unroll
  for (int b = 0; b < 8; ++b) {
    w0 |= (u64)p[b] << (8 * b);
    w1 |= (u64)p[8 + b] << (8 * b);
  }
}

// The 16 bytes at offset `off` of a sector of which only `avail` bytes exist (zeros past them).
template <int W>
__device__ __forceinline__ void load16_checked(const unsigned char* sector, int off, int avail, u64& w0, u64& w1) {
  if (off + 16 <= avail) {
    load16<W>(sector + off, w0, w1);
    return;
  }
  w0 = 0;
  w1 = 0;
#pragma unroll 1
  for (int b = 0; off + b < avail; ++b) {
    if (b < 8) w0 |= (u64)sector[off + b] << (8 * b);
    else w1 |= (u64)sector[off + b] << (8 * (b - 8));
  }
}

// One stripe's step for the accumulator pair (a0, a1) = (acc[2j], acc[2j+1]):
// acc[i] += input[i ^ 1] + lo32(input[i] ^ key[i]) * hi32(input[i] ^ key[i]).
__device__ __forceinline__ void accumulate(u64& a0, u64& a1, u64 d0, u64 d1, u64 k0, u64 k1) {
  const u64 x0 = d0 ^ k0;
  const u64 x1 = d1 ^ k1;
  a0 += d1 + (u64)(u32)x0 * (u32)(x0 >> 32);
  a1 += d0 + (u64)(u32)x1 * (u32)(x1 >> 32);
}

__device__ __forceinline__ u64 scramble(u64 a, u64 key) {
  a ^= a >> 47;
  a ^= key;
  return a * P32_1;
}

__device__ __forceinline__ u64 merge_term(u64 a0, u64 a1, int j) {
  const u64 m0 = a0 ^ kMerge[2 * j];
  const u64 m1 = a1 ^ kMerge[2 * j + 1];
  return (m0 * m1) ^ __umul64hi(m0, m1);
}

// Lane j's part of XXH3_64bits(sector): its pair's term of the merge,
// mul128_fold64(acc[2j] ^ merge[2j], acc[2j+1] ^ merge[2j+1]). The leaf is
// avalanche(4096 * P64_1 + sum over the four lanes of this term). `sec` holds secret words
// 2j .. 2j+17, so stripe s reads sec[s] and sec[s + 1] by compile-time index.
template <int W>
__device__ __forceinline__ u64 leaf_term(const unsigned char* sector, int j, const u64* sec) {
  u64 a0 = kInitAcc[2 * j];
  u64 a1 = kInitAcc[2 * j + 1];
#pragma unroll 1
  for (int b = 0; b < 4; ++b) {
    u64 d0[16], d1[16];
    const unsigned char* p = sector + b * 1024 + 16 * j;
#pragma unroll
    for (int s = 0; s < 16; ++s) load16<W>(p + 64 * s, d0[s], d1[s]);
#pragma unroll
    for (int s = 0; s < 15; ++s) accumulate(a0, a1, d0[s], d1[s], sec[s], sec[s + 1]);
    if (b < 3) {
      // stripe 15 of a full 1024-byte block, then the scramble
      accumulate(a0, a1, d0[15], d1[15], sec[15], sec[16]);
      a0 = scramble(a0, sec[16]);
      a1 = scramble(a1, sec[17]);
    } else {
      // 4096 = 3 blocks + 15 stripes + the last stripe at 4032, which is stripe 15 of block 3
      accumulate(a0, a1, d0[15], d1[15], kLastStripe[2 * j], kLastStripe[2 * j + 1]);
    }
  }
  return merge_term(a0, a1, j);
}

// The same for the short last sector of a block: only `avail` (< 4096) bytes exist and the
// rest reads as zeros. One stripe at a time; it runs once per block at most.
template <int W>
__device__ __forceinline__ u64 leaf_term_checked(const unsigned char* sector, int avail, int j) {
  u64 a0 = kInitAcc[2 * j];
  u64 a1 = kInitAcc[2 * j + 1];
#pragma unroll 1
  for (int st = 0; st < 64; ++st) {
    const int s = st & 15;
    u64 d0, d1;
    load16_checked<W>(sector, 64 * st + 16 * j, avail, d0, d1);
    if (st == 63) {
      accumulate(a0, a1, d0, d1, kLastStripe[2 * j], kLastStripe[2 * j + 1]);
    } else {
      accumulate(a0, a1, d0, d1, kSecret[s + 2 * j], kSecret[s + 2 * j + 1]);
      if (s == 15) {
        a0 = scramble(a0, kSecret[16 + 2 * j]);
        a1 = scramble(a1, kSecret[17 + 2 * j]);
      }
    }
  }
  return merge_term(a0, a1, j);
}

__device__ __forceinline__ u64 xxh3_avalanche(u64 h) {
  h ^= h >> 37;
  h *= 0x165667919E3779F9ull;
  h ^= h >> 32;
  return h;
}

// leaves[g] for g = j * k + s: XXH3 of sector s of block j, block j being row rows[j] (or j
// when rows is null) of the [*, n] byte pool at `base`.
template <int W>
__device__ __forceinline__ void leaves_kernel(const unsigned char* base, const i64* __restrict__ rows, i64 n,
                                              int k, int m, u64* __restrict__ leaves) {
  const int j = threadIdx.x & 3;
  u64 sec[18];
#pragma unroll
  for (int t = 0; t < 18; ++t) sec[t] = kSecret[2 * j + t];
  const unsigned mask = 0xFu << (threadIdx.x & 28);
  const i64 total = (i64)m * k;
  const i64 groups = ((i64)gridDim.x * blockDim.x) >> 2;
  for (i64 g = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 2; g < total; g += groups) {
    const i64 b = g / k;
    const int s = (int)(g - b * k);
    const i64 row = rows ? rows[b] : b;
    const i64 off = (i64)s * SECTOR;
    const unsigned char* sector = base + row * n + off;
    const i64 left = n - off;
    u64 t;
    if (left >= SECTOR) t = leaf_term<W>(sector, j, sec);
    else t = leaf_term_checked<W>(sector, (int)left, j);
    t += __shfl_xor_sync(mask, t, 1);
    t += __shfl_xor_sync(mask, t, 2);
    if (j == 0) leaves[g] = xxh3_avalanche((u64)SECTOR * P64_1 + t);
  }
}

__device__ __forceinline__ u64 rotl64(u64 x, int r) { return (x << r) | (x >> (64 - r)); }

__device__ __forceinline__ u64 xxh64_round(u64 acc, u64 input) {
  acc += input * P64_2;
  acc = rotl64(acc, 31);
  return acc * P64_1;
}

__device__ __forceinline__ u64 xxh64_merge_round(u64 acc, u64 val) {
  acc ^= xxh64_round(0, val);
  return acc * P64_1 + P64_4;
}

__device__ __forceinline__ u64 xxh64_tail_round(u64 h, u64 word) {
  h ^= xxh64_round(0, word);
  return rotl64(h, 27) * P64_1 + P64_4;
}

__device__ __forceinline__ u64 xxh64_avalanche(u64 h) {
  h ^= h >> 33;
  h *= P64_2;
  h ^= h >> 29;
  h *= P64_3;
  h ^= h >> 32;
  return h;
}

__device__ __forceinline__ u64 xxh64_merge(u64 v1, u64 v2, u64 v3, u64 v4) {
  u64 h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
  h = xxh64_merge_round(h, v1);
  h = xxh64_merge_round(h, v2);
  h = xxh64_merge_round(h, v3);
  return xxh64_merge_round(h, v4);
}

// XXH64 of k little-endian u64 words, seed `seed` (the input length is 8k bytes).
__device__ __forceinline__ u64 xxh64_words(const u64* w, int k, u64 seed) {
  u64 h;
  int i = 0;
  if (k >= 4) {
    u64 v1 = seed + P64_1 + P64_2, v2 = seed + P64_2, v3 = seed, v4 = seed - P64_1;
#pragma unroll 4
    for (; i + 4 <= k; i += 4) {
      v1 = xxh64_round(v1, w[i]);
      v2 = xxh64_round(v2, w[i + 1]);
      v3 = xxh64_round(v3, w[i + 2]);
      v4 = xxh64_round(v4, w[i + 3]);
    }
    h = xxh64_merge(v1, v2, v3, v4);
  } else {
    h = seed + P64_5;
  }
  h += (u64)k * 8;
  for (; i < k; ++i) h = xxh64_tail_round(h, w[i]);
  return xxh64_avalanche(h);
}

// out[j] = XXH64(leaves[j*k .. j*k+k-1], seed = n): the block checksum. One thread per block,
// for blocks of few sectors.
extern "C" __global__ void tierkv_checksum_roots(const u64* __restrict__ leaves, i64 n, int k, int m,
                                                 u64* __restrict__ out) {
  for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < m; j += gridDim.x * blockDim.x)
    out[j] = xxh64_words(leaves + (i64)j * k, k, (u64)n);
}

// The same with one warp per block, for blocks of many sectors. XXH64 keeps four independent
// chains (v1..v4, one per word of each 32-byte stripe), so lanes 0-3 run one chain each, one
// round per stripe, and lane 0 merges them; the whole warp first loads the leaves into shared
// memory ROOT_CHUNK at a time (16 loads in flight per lane) so no chain waits on global memory.
// 4 warps per thread block.
#define ROOT_CHUNK 512
extern "C" __global__ void __launch_bounds__(128) tierkv_checksum_roots_warp(
    const u64* __restrict__ leaves, i64 n, int k, int m, u64* __restrict__ out) {
  __shared__ u64 buf[4][ROOT_CHUNK];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  u64* mine = buf[warp];
  const u64 seed = (u64)n;
  const u64 start = lane == 0 ? seed + P64_1 + P64_2 : lane == 1 ? seed + P64_2 : lane == 2 ? seed : seed - P64_1;
  for (int j = blockIdx.x * 4 + warp; j < m; j += gridDim.x * 4) {  // warp-uniform
    const u64* w = leaves + (i64)j * k;
    u64 v = start;  // lanes 0-3: chain v1..v4
    if (k == 0 && lane == 0) out[j] = xxh64_avalanche(seed + P64_5);
    for (int c = 0; c < k; c += ROOT_CHUNK) {
      const int len = k - c < ROOT_CHUNK ? k - c : ROOT_CHUNK;
      for (int t = lane; t < len; t += 32) mine[t] = w[c + t];
      __syncwarp();
      const int stripes = len >> 2;  // chunks hold whole stripes (ROOT_CHUNK % 4 == 0) but the last
      if (lane < 4) {
#pragma unroll 8
        for (int s = 0; s < stripes; ++s) v = xxh64_round(v, mine[4 * s + lane]);
      }
      if (c + len == k) {  // the last chunk: merge, length, the last k % 4 words
        const u64 v1 = __shfl_sync(0xffffffffu, v, 0);
        const u64 v2 = __shfl_sync(0xffffffffu, v, 1);
        const u64 v3 = __shfl_sync(0xffffffffu, v, 2);
        const u64 v4 = __shfl_sync(0xffffffffu, v, 3);
        if (lane == 0) {
          u64 h = k >= 4 ? xxh64_merge(v1, v2, v3, v4) : seed + P64_5;
          h += (u64)k * 8;
          for (int q = 4 * stripes; q < len; ++q) h = xxh64_tail_round(h, mine[q]);
          out[j] = xxh64_avalanche(h);
        }
      }
      __syncwarp();
    }
  }
}

#define LEAF_KERNEL(W)                                                                                  \
  extern "C" __global__ void __launch_bounds__(256) tierkv_checksum_leaves_w##W(                        \
      const unsigned char* base, const i64* rows, i64 n, int k, int m, u64* leaves) {                   \
    leaves_kernel<W>(base, rows, n, k, m, leaves);                                                      \
  }

LEAF_KERNEL(16)
LEAF_KERNEL(8)
LEAF_KERNEL(4)
LEAF_KERNEL(2)
LEAF_KERNEL(1)
