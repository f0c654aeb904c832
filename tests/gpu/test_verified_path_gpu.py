"""The verified data path on a GPU: checksums taken on the GPU where the bytes are, checked there before use.

- a block leaving GPU memory for host slots (put of GPU KV, save_from GPU pages, demotion from a
  GPU device tier) gets the checksum that the CPU computes over its host slot, bit for bit;
- a block read back for a GPU (get to cuda, load_into GPU pages, promotion into a GPU device tier)
  is verified on the GPU after its one copy: a host byte flipped behind the store's back stops the
  read at that block, which is never handed over (the engine's pages for it stay as they were).

Run on the GPU machine: `python -m pytest -m gpu tests/gpu -q`. The same checks run on the CPU path
with TIERKV_TEST_DEVICE=cpu (how they were written and checked on a machine without a GPU).
"""

from __future__ import annotations

import os

import pytest
import torch

import tierkv.placement
import tierkv.tiers.memory
from tierkv import BlockStore, DimOrder, EngineKV, EngineKVLayout, KVLayout, Namespace, StoreConfig
from tierkv.integrity import checksum_block_slots

DEVICE = os.environ.get("TIERKV_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LAYOUT = KVLayout(num_layers=2, kv_factor=2, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, block_tokens=16)
BB = LAYOUT.block_bytes  # 16 KiB: four sectors
N = 12


def tokens(i: int = 0) -> list[int]:
    return list(range(i * 10_000, i * 10_000 + N * LAYOUT.block_tokens))


def kv(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((N, *LAYOUT.block_shape), generator=g).to(LAYOUT.dtype).to(DEVICE)


def make_store(device_blocks: int = 0, host_blocks: int = 4 * N) -> BlockStore:
    config = StoreConfig(device="cpu" if DEVICE == "cpu" else None, device_bytes=device_blocks * BB,
                         host_bytes=host_blocks * BB)
    return BlockStore(LAYOUT, Namespace(model="verified-path"), config)


def host_of(store: BlockStore):  # noqa: ANN201 - the host tier, to look at its bytes where they lie
    return next(t for t in store.tiers if t.name == "host")


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def stamped_equal_cpu(store: BlockStore, toks: list[int]) -> None:
    keys = store.keys(toks)
    slots = [store.locate([k])[k]["host"] for k in keys]
    sync()
    assert [store.index.blocks[k].checksum for k in keys] == checksum_block_slots(host_of(store).storage, slots)


def flip(store: BlockStore, toks: list[int], block: int) -> None:
    key = store.keys(toks)[block]
    sync()
    host_of(store).storage[store.locate([key])[key]["host"], 77] ^= 0x21


def engine(num_pages: int) -> tuple[EngineKV, torch.Tensor]:
    lay = EngineKVLayout(order=DimOrder.LBNHSC, num_layers=LAYOUT.num_layers, num_blocks=num_pages, block_size=16,
                         num_kv_heads=LAYOUT.num_kv_heads, head_dim=LAYOUT.head_dim, dtype=LAYOUT.dtype)
    buf = torch.randn(lay.shape).to(LAYOUT.dtype).to(DEVICE)
    return EngineKV(lay, buf), buf


@pytest.fixture(params=["one piece", "pieces of 3 blocks"])
def pieces(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Saves and loads staged through GPU rows in one piece, and in several (the loop over pieces)."""
    if request.param != "one piece":
        monkeypatch.setattr(tierkv.tiers.memory, "SAVE_PIECE_BYTES", 3 * BB)
        monkeypatch.setattr(tierkv.placement, "LOAD_PIECE_BYTES", 3 * BB)


def test_put_from_gpu_stamps_the_cpu_checksum_and_get_to_gpu_verifies(pieces: None) -> None:
    with make_store() as s:
        t, want = tokens(), kv()
        assert s.put(t, want) == N
        stamped_equal_cpu(s, t)
        assert torch.equal(s.get(t, device=DEVICE), want)
        flip(s, t, 5)
        got = s.get(t, device=DEVICE)
        assert got.shape[0] == 5 and torch.equal(got, want[:5]), "nothing at or past the corrupt block is served"
        assert s.stats()["tiers"]["host"]["corrupt"] == 1


def test_save_from_gpu_pages_and_load_into_stops_at_a_corrupt_block(pieces: None) -> None:
    eng, buf = engine(2 * N)
    table = list(range(1, 2 * N, 2))
    with make_store() as s:
        t = tokens(1)
        assert s.save_from(eng, table, t) == N
        stamped_equal_cpu(s, t)
        before = buf.clone()
        buf.zero_()
        assert s.load_into(eng, table, t) == N
        sync()
        assert torch.equal(buf, before.index_fill(1, torch.tensor(range(0, 2 * N, 2), device=DEVICE), 0))
        flip(s, t, 7)
        buf.zero_()
        assert s.load_into(eng, table, t) == 7
        sync()
        idx = torch.tensor(table, device=DEVICE)
        assert torch.equal(buf.index_select(1, idx[:7]), before.index_select(1, idx[:7]))
        assert not buf.index_select(1, idx[7:]).any(), "a block at or past the corrupt one reached the engine's pages"
        assert s.stats()["tiers"]["host"]["corrupt"] == 1


def test_demotion_from_a_gpu_tier_and_promotion_back_are_verified() -> None:
    with make_store(device_blocks=N, host_blocks=4 * N) as s:
        first, second = tokens(2), tokens(3)
        want = kv(2)
        s.put(first, want)
        s.put(second, kv(3))  # the device tier is full: `first` is demoted to host (hashed on the source side)
        assert set(s.residency(s.keys(first)).values()) == {"host"}
        stamped_equal_cpu(s, first)
        flip(s, first, 4)
        got = s.get(first, device=DEVICE)  # promoted into the device tier, verified where it landed
        assert got.shape[0] == 4 and torch.equal(got, want[:4])
        assert s.stats()["tiers"]["host"]["corrupt"] == 1
        assert s.residency(s.keys(first)[4:5]) == {s.keys(first)[4]: None}, "the corrupt copy (the only one) is gone"
