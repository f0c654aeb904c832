"""The block checksum tree (`TREE_CHECKSUM`): its definition, what it detects, and the GPU kernel's algorithm.

`block_checksum` is XXH64(XXH3_64 of each zero-padded 4 KiB sector, seed = block length). The
tests pin it against direct `xxhash` calls and fixed values, check that every single-bit flip,
torn or misplaced sector and swapped block changes it, and run a Python model of the CUDA
kernel's four-lanes-per-sector decomposition (with the constant tables read out of
csrc/checksum.cu) against `xxhash`, so the GPU side's arithmetic is checked on every CPU run;
tests/gpu/test_checksum_gpu.py compares the kernel itself with this CPU function.
"""

from __future__ import annotations

import random
import re
import shutil
import struct
import threading

import numpy as np
import pytest
import torch
import xxhash

from tierkv import integrity
from tierkv.integrity import (
    SECTOR_BYTES,
    TREE_CHECKSUM,
    block_checksum,
    checksum_block_slots,
    checksum_blocks,
)
from tierkv.ops import cpu_build, cuda_build

S = SECTOR_BYTES
M64 = (1 << 64) - 1


def rand_bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def direct(block: bytes) -> int:
    """The definition, spelled out with one xxhash call per sector."""
    n = len(block)
    k = -(-n // S)
    leaves = [xxhash.xxh3_64_intdigest(block[i * S:(i + 1) * S].ljust(S, b"\0")) for i in range(k)]
    return xxhash.xxh64_intdigest(b"".join(x.to_bytes(8, "little") for x in leaves), seed=n)


def pattern(n: int) -> bytes:
    return (np.arange(n, dtype=np.uint64) * 2654435761 >> 7).astype(np.uint8).tobytes()


# -- the definition --------------------------------------------------------------------


def test_identity_and_sector_size() -> None:
    assert TREE_CHECKSUM == "xxh3-4k-sectors/xxh64-v1"
    assert S == 4096


@pytest.mark.parametrize("n", [0, 1, 3, 16, 17, 240, 241, 1000, 4095, 4096, 4097, 8191, 8192, 12289, 65536, 65536 + 48, 1 << 20])
def test_tree_equals_direct_xxhash_calls(n: int) -> None:
    block = rand_bytes(n, n)
    assert block_checksum(block) == direct(block)


# Fixed values: a change of the function (or of xxhash's output) must be a new TREE_CHECKSUM.
KNOWN = {0: 0xEF46DB3751D8E999, 1: 0x02DA24BC0D47CD22, 4095: 0x8D2CB101B61828EB, 4096: 0x9E5A99FC4A023D0D,
         4097: 0x8C4E7C84062A5893, 12288: 0xD08721E2EC785815, 65636: 0x503C11D17CA1A651}


@pytest.mark.parametrize("n", sorted(KNOWN))
def test_known_answers(n: int) -> None:
    assert block_checksum(pattern(n)) == KNOWN[n]


def test_empty_block_is_defined() -> None:
    """No sectors: XXH64 of nothing with seed 0 (the value xxhash gives for b"")."""
    assert block_checksum(b"") == xxhash.xxh64_intdigest(b"") == 0xEF46DB3751D8E999
    assert checksum_blocks(torch.empty(3, 0, dtype=torch.uint8)) == [block_checksum(b"")] * 3


def test_single_sector_leaf_is_plain_xxh3() -> None:
    block = rand_bytes(S, 7)
    leaf = xxhash.xxh3_64_intdigest(block)
    assert block_checksum(block) == xxhash.xxh64_intdigest(struct.pack("<Q", leaf), seed=S)


def test_every_input_kind_counts_by_its_bytes() -> None:
    block = rand_bytes(3 * S + 100, 3)
    want = direct(block)
    arr = np.frombuffer(block, dtype=np.uint8)
    assert block_checksum(bytearray(block)) == want
    assert block_checksum(memoryview(block)) == want
    assert block_checksum(arr) == want
    assert block_checksum(torch.from_numpy(arr.copy())) == want
    f32 = torch.randn(1000)
    assert block_checksum(f32) == direct(f32.numpy().tobytes()) == block_checksum(f32.numpy())
    with pytest.raises(ValueError, match="contiguous"):
        block_checksum(np.arange(100, dtype=np.uint8)[::2])


def test_short_blocks_bind_their_length() -> None:
    """Zero padding is not data: b"abc" and b"abc\\0" differ (the seed is the length)."""
    assert block_checksum(b"abc") != block_checksum(b"abc\0")
    block = rand_bytes(5000, 1)
    assert block_checksum(block) != block_checksum(block + bytes(S * 2 - 5000))
    for n in (1, 100, 4095):
        b = rand_bytes(n, n)
        assert block_checksum(b) == direct(b)
        assert block_checksum(b) != block_checksum(b[:-1])


# -- what it detects -------------------------------------------------------------------


def test_every_single_bit_flip_of_a_two_sector_block() -> None:
    block = bytearray(rand_bytes(2 * S, 11))
    seen = {block_checksum(block)}
    for byte in range(len(block)):
        for bit in range(8):
            block[byte] ^= 1 << bit
            seen.add(block_checksum(block))
            block[byte] ^= 1 << bit
    assert len(seen) == 1 + 8 * len(block)  # every flip detected, and no two flips collide


def test_random_bit_flips_of_a_2mib_block() -> None:
    block = bytearray(rand_bytes(2 << 20, 12))
    clean = block_checksum(block)
    rng = random.Random(12)
    positions = [0, len(block) * 8 - 1] + [rng.randrange(len(block) * 8) for _ in range(60)]
    for pos in positions:
        block[pos >> 3] ^= 1 << (pos & 7)
        assert block_checksum(block) != clean, pos
        block[pos >> 3] ^= 1 << (pos & 7)
    assert block_checksum(block) == clean


def sectors(block: bytes) -> list[bytes]:
    return [block[i:i + S] for i in range(0, len(block), S)]


def test_torn_sectors() -> None:
    old = rand_bytes(16 * S, 21)
    new = rand_bytes(16 * S, 22)
    clean = block_checksum(new)
    for i in (0, 7, 15):
        parts = sectors(new)
        parts[i] = bytes(S)  # never written
        assert block_checksum(b"".join(parts)) != clean
        parts[i] = sectors(old)[i]  # the previous version survived
        assert block_checksum(b"".join(parts)) != clean
        parts[i] = new[i * S:i * S + S // 2] + old[i * S + S // 2:(i + 1) * S]  # half written
        assert block_checksum(b"".join(parts)) != clean
    torn_tail = new[:-S] + old[-S:]  # every sector but the last
    assert block_checksum(torn_tail) != clean


def test_misplaced_and_swapped_sectors() -> None:
    block = rand_bytes(8 * S, 31)
    clean = block_checksum(block)
    parts = sectors(block)
    swapped = parts.copy()
    swapped[2], swapped[5] = swapped[5], swapped[2]
    assert block_checksum(b"".join(swapped)) != clean
    moved = parts.copy()
    moved[6] = parts[1]  # sector 1 also written where sector 6 belongs
    assert block_checksum(b"".join(moved)) != clean
    rotated = parts[1:] + parts[:1]
    assert block_checksum(b"".join(rotated)) != clean
    same = [parts[0]] * 8  # identical sectors: positions still count
    alt = [parts[0]] * 7 + [parts[1]]
    assert block_checksum(b"".join(same)) != block_checksum(b"".join(alt))


def test_a_block_swapped_for_another() -> None:
    """Each block's checksum names its bytes: rows swapped in a pool change both recorded values."""
    pool = torch.from_numpy(np.frombuffer(rand_bytes(6 * 5 * S, 41), dtype=np.uint8).copy()).reshape(6, 5 * S)
    before = checksum_blocks(pool)
    assert len(set(before)) == 6
    pool[[1, 4]] = pool[[4, 1]]
    after = checksum_blocks(pool)
    assert after[1] == before[4] and after[4] == before[1]
    assert after[1] != before[1] and after[4] != before[4]
    assert [after[i] for i in (0, 2, 3, 5)] == [before[i] for i in (0, 2, 3, 5)]


# -- the compiled CPU hasher (csrc/checksum_cpu.c) --------------------------------------


needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")


@needs_cc
@pytest.mark.parametrize("n", [0, 1, 100, 4095, 4096, 4097, 3 * 4096 + 5, 65536, 720 << 10, 2 << 20])
def test_compiled_hasher_is_the_definition(n: int) -> None:
    fn = cpu_build.native_checksums()
    assert fn is not None, "a C compiler is here, so the CPU hasher must build"
    pool = np.random.default_rng(n).integers(0, 256, (4, n), dtype=np.uint8)
    rows = np.array([3, 0, 3, 1], dtype=np.int64)
    out = np.empty(4, dtype=np.uint64)
    assert fn(pool.ctypes.data, rows.ctypes.data, 4, n, out.ctypes.data) == 0
    assert out.tolist() == [direct(pool[r].tobytes()) for r in rows]


@needs_cc
def test_compiled_hasher_lets_other_threads_run() -> None:
    """One call hashes with the interpreter lock dropped: a Python thread counts on meanwhile."""
    fn = cpu_build.native_checksums()
    assert fn is not None
    pool = np.random.default_rng(0).integers(0, 256, (32, 4 << 20), dtype=np.uint8)
    rows = np.tile(np.arange(32, dtype=np.int64), 16)  # 2 GiB of hashing in one call
    out = np.empty(rows.size, dtype=np.uint64)
    started, done = threading.Event(), threading.Event()
    counted = [0]

    def count() -> None:
        started.wait()
        while not done.is_set():
            counted[0] += 1

    t = threading.Thread(target=count)
    t.start()
    started.set()
    before = counted[0]
    fn(pool.ctypes.data, rows.ctypes.data, rows.size, pool.shape[1], out.ctypes.data)
    during = counted[0] - before
    done.set()
    t.join()
    # Held, the lock would let the counter run at most one switch interval (5 ms: ~40k counts here)
    # before the call took it; dropped, it counts throughout (~800k here).
    assert during > 100_000, f"the counting thread ran {during} times while 2 GiB were hashed"


def test_without_the_compiled_hasher_xxhash_gives_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = torch.randint(0, 256, (5, 2 * 4096 + 9), dtype=torch.uint8)
    want = [direct(bytes(pool[i].numpy())) for i in range(5)]
    monkeypatch.setattr(integrity, "native_checksums", lambda: None)
    assert checksum_blocks(pool) == want
    assert checksum_block_slots(pool, [4, 1]) == [want[4], want[1]]


def test_a_compiler_that_fails_leaves_the_xxhash_path(monkeypatch: pytest.MonkeyPatch, tmp_path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CC", "/bin/false")
    monkeypatch.setenv("TIERKV_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_build, "_loaded", {})
    with caplog.at_level("WARNING", logger="tierkv.ops"):
        assert cpu_build.native_checksums() is None
    assert "could not build checksum_cpu.c with /bin/false" in caplog.text
    pool = torch.randint(0, 256, (2, 4096), dtype=torch.uint8)
    assert checksum_blocks(pool) == [direct(bytes(pool[i].numpy())) for i in range(2)]


# -- the row and slot variants ---------------------------------------------------------


@pytest.mark.parametrize("n", [1, 4096, 5000, 3 * 4096])
def test_checksum_blocks_and_slots(n: int) -> None:
    pool = torch.randint(0, 256, (9, n), dtype=torch.uint8)
    want = [direct(bytes(pool[i].numpy())) for i in range(9)]
    assert checksum_blocks(pool) == want
    assert checksum_block_slots(pool, [8, 0, 3, 3]) == [want[8], want[0], want[3], want[3]]
    assert checksum_block_slots(pool, torch.tensor([2, 1]).tolist()) == [want[2], want[1]]
    assert checksum_blocks(pool[::2]) == want[::2]  # non-contiguous rows: hashed from a copy
    assert checksum_block_slots(pool, []) == []


def test_row_variants_refuse_wrong_input() -> None:
    pool = torch.zeros(4, 64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="2-D uint8"):
        checksum_blocks(torch.zeros(4, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="2-D uint8"):
        checksum_blocks(torch.zeros(64, dtype=torch.uint8))
    with pytest.raises(IndexError, match="slot 4"):
        checksum_block_slots(pool, [0, 4])
    with pytest.raises(IndexError, match="slot -1"):
        checksum_block_slots(pool, [-1])
    with pytest.raises(ValueError, match="contiguous"):
        checksum_block_slots(torch.zeros(4, 64, dtype=torch.uint8)[:, :32], [0])


# -- the GPU kernel's algorithm, modelled in Python ------------------------------------


def cu_table(name: str, source: str = "checksum.cu") -> list[int]:
    text = (cuda_build.CSRC_DIR / source).read_text()
    body = re.search(rf"{name}\[\d+\] = \{{(.*?)\}};", text, re.S)
    assert body, name
    items = [t.strip() for t in body.group(1).split(",")]
    consts = dict(re.findall(r"#define (P\d\d_\d) (0x[0-9A-Fa-f]+)", text))
    return [int(consts.get(t, t).rstrip("uUlL"), 16) for t in items]


def kernel_model_leaf(sector: bytes) -> int:
    """XXH3_64(sector) the way csrc/checksum.cu computes it: lane j runs accumulator pair (2j, 2j+1) alone."""
    secret, last, merge, init = (cu_table(n) for n in ("kSecret", "kLastStripe", "kMerge", "kInitAcc"))
    words = struct.unpack("<512Q", sector)
    total = 0
    for j in range(4):
        a0, a1 = init[2 * j], init[2 * j + 1]
        sec = secret[2 * j:2 * j + 18]
        for st in range(64):
            d0, d1 = words[8 * st + 2 * j], words[8 * st + 2 * j + 1]
            s = st % 16
            k0, k1 = (last[2 * j], last[2 * j + 1]) if st == 63 else (sec[s], sec[s + 1])
            x0, x1 = d0 ^ k0, d1 ^ k1
            a0 = (a0 + d1 + (x0 & 0xFFFFFFFF) * (x0 >> 32)) & M64
            a1 = (a1 + d0 + (x1 & 0xFFFFFFFF) * (x1 >> 32)) & M64
            if s == 15 and st < 63:
                a0 = ((a0 ^ (a0 >> 47) ^ sec[16]) * 0x9E3779B1) & M64
                a1 = ((a1 ^ (a1 >> 47) ^ sec[17]) * 0x9E3779B1) & M64
        p = (a0 ^ merge[2 * j]) * (a1 ^ merge[2 * j + 1])
        total = (total + ((p & M64) ^ (p >> 64))) & M64
    h = (S * 0x9E3779B185EBCA87 + total) & M64
    h ^= h >> 37
    h = (h * 0x165667919E3779F9) & M64
    return h ^ (h >> 32)


@pytest.mark.parametrize("seed", range(4))
def test_kernel_decomposition_matches_xxh3(seed: int) -> None:
    sector = rand_bytes(S, 100 + seed) if seed else bytes(S)
    assert kernel_model_leaf(sector) == xxhash.xxh3_64_intdigest(sector)


def test_the_cpu_hasher_and_the_kernels_share_their_tables() -> None:
    """checksum_cpu.c keeps its own copy of the kernels' constant tables (NVRTC compiles checksum.cu
    without headers): the two copies must not drift apart."""
    for name in ("kSecret", "kLastStripe", "kMerge", "kInitAcc"):
        assert cu_table(name, "checksum_cpu.c") == cu_table(name), name


def test_kernel_source_names_its_kernels() -> None:
    text = (cuda_build.CSRC_DIR / "checksum.cu").read_text()
    for w in (16, 8, 4, 2, 1):
        assert f"LEAF_KERNEL({w})" in text
    assert "tierkv_checksum_roots" in text


def test_u64_checksums_round_trip_through_the_kernels_int64_bits() -> None:
    from tierkv.ops.checksum import as_unsigned

    values = [0, 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 0x9E3779B97F4A7C15]
    signed = [v - (1 << 64) if v >= 1 << 63 else v for v in values]  # the int64 with the same bits, as the kernels write
    assert all(-(1 << 63) <= s < 1 << 63 for s in signed)
    assert as_unsigned(torch.tensor(signed, dtype=torch.int64)) == values
