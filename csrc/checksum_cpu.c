// TREE_CHECKSUM of whole blocks on the CPU ("xxh3-4k-sectors/xxh64-v1", see tierkv/integrity.py):
// the twin of checksum.cu, for the host side (CPU stores, host slots, disk rows).
//
// Why in C: the `xxhash` package hashes one 4 KiB sector per call, so hashing a block from Python
// is thousands of calls, each holding the interpreter lock. A thread doing that between torch
// calls (which drop and retake the lock) starves every other Python thread: a waiting thread asks
// for the lock only after a whole switch interval without a hand-over, and each short release
// counts as one. An engine thread beside a save thread hashing host slots ran one step in 4 s.
// Here one call hashes every block of a request, and ctypes drops the lock for the call.
//
// Compiled at first use by the system C compiler (tierkv/ops/cpu_build.py). Little-endian
// machines only (x86_64, aarch64): words are read in memory order.

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint64_t u64;
typedef uint32_t u32;

#define SECTOR 4096

#define P32_1 0x9E3779B1u
#define P32_2 0x85EBCA77u
#define P32_3 0xC2B2AE3Du
#define P64_1 0x9E3779B185EBCA87ull
#define P64_2 0xC2B2AE3D27D4EB4Full
#define P64_3 0x165667B19E3779F9ull
#define P64_4 0x85EBCA77C2B2AE63ull
#define P64_5 0x27D4EB2F165667C5ull

// The secret words of checksum.cu: stripe s, accumulator i reads kSecret[s + i]; the last stripe
// and the merge read the (unaligned) words at secret + 121 + 8i and secret + 11 + 8i.
static const u64 kSecret[24] = {
    0xbe4ba423396cfeb8ull, 0x1cad21f72c81017cull, 0xdb979083e96dd4deull, 0x1f67b3b7a4a44072ull,
    0x78e5c0cc4ee679cbull, 0x2172ffcc7dd05a82ull, 0x8e2443f7744608b8ull, 0x4c263a81e69035e0ull,
    0xcb00c391bb52283cull, 0xa32e531b8b65d088ull, 0x4ef90da297486471ull, 0xd8acdea946ef1938ull,
    0x3f349ce33f76faa8ull, 0x1d4f0bc7c7bbdcf9ull, 0x3159b4cd4be0518aull, 0x647378d9c97e9fc8ull,
    0xc3ebd33483acc5eaull, 0xeb6313faffa081c5ull, 0x49daf0b751dd0d17ull, 0x9e68d429265516d3ull,
    0xfca1477d58be162bull, 0xce31d07ad1b8f88full, 0x280416958f3acb45ull, 0x7e404bbbcafbd7afull};
static const u64 kLastStripe[8] = {
    0xea647378d9c97e9full, 0xc5c3ebd33483acc5ull, 0x17eb6313faffa081ull, 0xd349daf0b751dd0dull,
    0x2b9e68d429265516ull, 0x8ffca1477d58be16ull, 0x45ce31d07ad1b8f8ull, 0xaf280416958f3acbull};
static const u64 kMerge[8] = {
    0x6dd4de1cad21f72cull, 0xa44072db979083e9ull, 0xe679cb1f67b3b7a4ull, 0xd05a8278e5c0cc4eull,
    0x4608b82172ffcc7dull, 0x9035e08e2443f774ull, 0x52283c4c263a81e6ull, 0x65d088cb00c391bbull};
static const u64 kInitAcc[8] = {P32_3, P64_1, P64_2, P64_3, P64_4, P32_2, P64_5, P32_1};

static inline u64 read64(const unsigned char* p) {
  u64 v;
  memcpy(&v, p, 8);
  return v;
}

// acc[i] += input[i ^ 1] + lo32(input[i] ^ key[i]) * hi32(input[i] ^ key[i]), for one 64-byte stripe.
static inline void accumulate(u64* acc, const unsigned char* p, const u64* key) {
  u64 d[8];
  for (int i = 0; i < 8; ++i) d[i] = read64(p + 8 * i);
  for (int i = 0; i < 8; ++i) {
    const u64 x = d[i] ^ key[i];
    acc[i] += d[i ^ 1] + (u64)(u32)x * (x >> 32);
  }
}

static inline u64 xxh3_avalanche(u64 h) {
  h ^= h >> 37;
  h *= 0x165667919E3779F9ull;
  h ^= h >> 32;
  return h;
}

// XXH3_64bits of one 4096-byte sector (default secret, seed 0): 3 blocks of 16 stripes, each
// followed by a scramble, then 15 stripes and the last stripe (at 4032) with its own key.
static u64 leaf(const unsigned char* sector) {
  u64 acc[8];
  memcpy(acc, kInitAcc, sizeof acc);
  for (int b = 0; b < 4; ++b) {
    const unsigned char* block = sector + 1024 * b;
    for (int s = 0; s < 15; ++s) accumulate(acc, block + 64 * s, kSecret + s);
    if (b < 3) {
      accumulate(acc, block + 64 * 15, kSecret + 15);
      for (int i = 0; i < 8; ++i) acc[i] = ((acc[i] ^ (acc[i] >> 47)) ^ kSecret[16 + i]) * P32_1;
    } else {
      accumulate(acc, block + 64 * 15, kLastStripe);
    }
  }
  u64 h = (u64)SECTOR * P64_1;
  for (int j = 0; j < 4; ++j) {
    const unsigned __int128 m = (unsigned __int128)(acc[2 * j] ^ kMerge[2 * j]) * (acc[2 * j + 1] ^ kMerge[2 * j + 1]);
    h += (u64)m ^ (u64)(m >> 64);
  }
  return xxh3_avalanche(h);
}

static inline u64 rotl64(u64 x, int r) { return (x << r) | (x >> (64 - r)); }

static inline u64 xxh64_round(u64 acc, u64 input) { return rotl64(acc + input * P64_2, 31) * P64_1; }

static inline u64 xxh64_merge_round(u64 acc, u64 val) { return (acc ^ xxh64_round(0, val)) * P64_1 + P64_4; }

// XXH64 of k little-endian u64 words, seed `seed` (the input is 8k bytes long).
static u64 xxh64_words(const u64* w, int64_t k, u64 seed) {
  u64 h;
  int64_t i = 0;
  if (k >= 4) {
    u64 v1 = seed + P64_1 + P64_2, v2 = seed + P64_2, v3 = seed, v4 = seed - P64_1;
    for (; i + 4 <= k; i += 4) {
      v1 = xxh64_round(v1, w[i]);
      v2 = xxh64_round(v2, w[i + 1]);
      v3 = xxh64_round(v3, w[i + 2]);
      v4 = xxh64_round(v4, w[i + 3]);
    }
    h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
    h = xxh64_merge_round(h, v1);
    h = xxh64_merge_round(h, v2);
    h = xxh64_merge_round(h, v3);
    h = xxh64_merge_round(h, v4);
  } else {
    h = seed + P64_5;
  }
  h += (u64)k * 8;
  for (; i < k; ++i) h = rotl64(h ^ xxh64_round(0, w[i]), 27) * P64_1 + P64_4;
  h ^= h >> 33;
  h *= P64_2;
  h ^= h >> 29;
  h *= P64_3;
  h ^= h >> 32;
  return h;
}

// out[j] = TREE_CHECKSUM of the n bytes at base + rows[j] * n (row j when rows is NULL).
// Returns 0, or -1 when the leaves of one block could not be allocated (nothing is written then).
int tierkv_block_checksums(const unsigned char* base, const int64_t* rows, int64_t m, int64_t n, u64* out) {
  const int64_t k = (n + SECTOR - 1) / SECTOR;
  u64 small[512];
  u64* leaves = k <= 512 ? small : (u64*)malloc((size_t)k * sizeof(u64));
  if (leaves == NULL) return -1;
  unsigned char tail[SECTOR];
  for (int64_t j = 0; j < m; ++j) {
    const unsigned char* block = base + (rows ? rows[j] : j) * n;
    for (int64_t s = 0; s < k; ++s) {
      const int64_t left = n - s * SECTOR;
      if (left >= SECTOR) {
        leaves[s] = leaf(block + s * SECTOR);
      } else {
        memset(tail, 0, SECTOR);
        memcpy(tail, block + s * SECTOR, (size_t)left);
        leaves[s] = leaf(tail);
      }
    }
    out[j] = xxh64_words(leaves, k, (u64)n);
  }
  if (leaves != small) free(leaves);
  return 0;
}
