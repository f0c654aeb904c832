// Copy kernels of tierkv: engine paged KV <-> store blocks, and rows of one slot pool -> rows of another.
//
// Compiled at first use by NVRTC (tierkv/ops/cuda_build.py), so this file includes no headers.
// Pointers to pinned host memory work like device pointers here (UVA), which is how one kernel
// serves device and host destinations alike.
//
// Work is split into "pieces" that each cover one contiguous run on the store side, so the store
// side is written (or read) in full 16-byte vectors by consecutive threads, and one thread block
// per piece keeps all index arithmetic but the piece number in 32 bits. Each thread loads UNROLL
// vectors before it stores any, to keep several memory requests in flight.
//
// Every kernel exists once per access width W (16, 8, 4, 2, 1 bytes): the Python side picks the
// widest W that divides every address and stride it passes.

typedef long long i64;

template <int W> struct Vec;
template <> struct Vec<16> { typedef uint4 T; };
template <> struct Vec<8> { typedef uint2 T; };
template <> struct Vec<4> { typedef unsigned int T; };
template <> struct Vec<2> { typedef unsigned short T; };
template <> struct Vec<1> { typedef unsigned char T; };

#define UNROLL 4

// One store block is [layers * kv_factor][block_tokens][heads][row_bytes]; piece (j, ls) is the
// run of block j that holds layer/KV `ls`. Engine side: layer_ptrs[ls] + block * block_stride +
// head * head_stride + token * token_stride, each a `row_bytes` run of channels.
template <int W, bool TO_STORE>
__device__ __forceinline__ void engine_copy(
    const i64* __restrict__ layer_ptrs, i64 block_stride, i64 head_stride, i64 token_stride,
    const i64* __restrict__ chunk_slots, int engine_block, int chunk_tokens,
    char* store_base, const i64* __restrict__ store_rows, i64 store_row_bytes,
    int n, int layers_kv, int block_tokens, int heads, int row_bytes) {
  typedef typename Vec<W>::T V;
  const int vpr = row_bytes / W;
  const int units = block_tokens * heads * vpr;
  const int per_block = block_tokens / chunk_tokens;
  const i64 pieces = (i64)n * layers_kv;
  for (i64 p = blockIdx.x; p < pieces; p += gridDim.x) {
    const int j = (int)(p / layers_kv);
    const int ls = (int)(p - (i64)j * layers_kv);
    V* store = (V*)(store_base + store_rows[j] * store_row_bytes + (i64)ls * units * W);
    char* eng = (char*)layer_ptrs[ls];
    const i64* cs = chunk_slots + (i64)j * per_block;
    for (int base = threadIdx.x; base < units; base += UNROLL * blockDim.x) {
      V r[UNROLL];
      V* e[UNROLL];
#pragma unroll
      for (int k = 0; k < UNROLL; ++k) {
        const int u = base + k * blockDim.x;
        if (u < units) {
          const int v = u % vpr;
          const int th = u / vpr;
          const int h = th % heads;
          const int t = th / heads;
          const i64 slot = cs[t / chunk_tokens] + t % chunk_tokens;
          const i64 eb = slot / engine_block;
          const i64 et = slot - eb * engine_block;
          e[k] = (V*)(eng + eb * block_stride + h * head_stride + et * token_stride) + v;
          r[k] = TO_STORE ? *e[k] : store[u];
        }
      }
#pragma unroll
      for (int k = 0; k < UNROLL; ++k) {
        const int u = base + k * blockDim.x;
        if (u < units) {
          if (TO_STORE) store[u] = r[k]; else *e[k] = r[k];
        }
      }
    }
  }
}

// dst row dst_rows[j] = src row src_rows[j]; rows are split into segments of seg_units vectors
// so that a few large rows still spread over every SM the grid was given. An entry whose source
// row is negative copies nothing: a caller on the device can queue a fixed-length list in which
// only some entries are real (tierkv/decode fetches pages without the host knowing how many).
template <int W>
__device__ __forceinline__ void copy_rows(
    const char* src, const i64* __restrict__ src_rows, char* dst, const i64* __restrict__ dst_rows,
    i64 row_bytes, int n, int seg_units) {
  typedef typename Vec<W>::T V;
  const i64 row_units = row_bytes / W;
  const i64 segs = (row_units + seg_units - 1) / seg_units;
  const i64 pieces = (i64)n * segs;
  for (i64 p = blockIdx.x; p < pieces; p += gridDim.x) {
    const i64 j = p / segs;
    if (src_rows[j] < 0) continue;  // a negative source row is skipped (dst_rows[j] is not read)
    const i64 first = (p - j * segs) * seg_units;
    const int count = (int)(row_units - first < seg_units ? row_units - first : seg_units);
    const V* s = (const V*)(src + src_rows[j] * row_bytes) + first;
    V* d = (V*)(dst + dst_rows[j] * row_bytes) + first;
    for (int base = threadIdx.x; base < count; base += UNROLL * blockDim.x) {
      V r[UNROLL];
#pragma unroll
      for (int k = 0; k < UNROLL; ++k) {
        const int u = base + k * blockDim.x;
        if (u < count) r[k] = s[u];
      }
#pragma unroll
      for (int k = 0; k < UNROLL; ++k) {
        const int u = base + k * blockDim.x;
        if (u < count) d[u] = r[k];
      }
    }
  }
}

#define ENGINE_KERNELS(W)                                                                          \
  extern "C" __global__ void tierkv_gather_w##W(                                                   \
      const i64* layer_ptrs, i64 block_stride, i64 head_stride, i64 token_stride,                  \
      const i64* chunk_slots, int engine_block, int chunk_tokens, char* store_base,                \
      const i64* store_rows, i64 store_row_bytes, int n, int layers_kv, int block_tokens,          \
      int heads, int row_bytes) {                                                                  \
    engine_copy<W, true>(layer_ptrs, block_stride, head_stride, token_stride, chunk_slots,         \
                         engine_block, chunk_tokens, store_base, store_rows, store_row_bytes, n,   \
                         layers_kv, block_tokens, heads, row_bytes);                               \
  }                                                                                                \
  extern "C" __global__ void tierkv_scatter_w##W(                                                  \
      const i64* layer_ptrs, i64 block_stride, i64 head_stride, i64 token_stride,                  \
      const i64* chunk_slots, int engine_block, int chunk_tokens, char* store_base,                \
      const i64* store_rows, i64 store_row_bytes, int n, int layers_kv, int block_tokens,          \
      int heads, int row_bytes) {                                                                  \
    engine_copy<W, false>(layer_ptrs, block_stride, head_stride, token_stride, chunk_slots,        \
                          engine_block, chunk_tokens, store_base, store_rows, store_row_bytes, n,  \
                          layers_kv, block_tokens, heads, row_bytes);                              \
  }                                                                                                \
  extern "C" __global__ void tierkv_copy_rows_w##W(const char* src, const i64* src_rows,          \
                                                    char* dst, const i64* dst_rows,                \
                                                    i64 row_bytes, int n, int seg_units) {         \
    copy_rows<W>(src, src_rows, dst, dst_rows, row_bytes, n, seg_units);                           \
  }

ENGINE_KERNELS(16)
ENGINE_KERNELS(8)
ENGINE_KERNELS(4)
ENGINE_KERNELS(2)
ENGINE_KERNELS(1)
