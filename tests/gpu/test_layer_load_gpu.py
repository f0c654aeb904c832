"""`BlockStore.load_layers` on a GPU: stored blocks in pinned host memory -> engine pages, one layer at a time.

- each layer's checksum leaves, hashed over that layer's slice of every block, finish into the
  blocks' whole checksums (the same bits the CPU computes);
- every layer lands where `load_into` puts it, through both copy paths (DMA, copy kernel), into
  vLLM's and transformers' page orders, and `wait(layer)` orders the caller after that layer;
- a byte flipped in host memory is caught at `finish()`: the run ends before that block, its copy
  leaves the store, and the next load stops there;
- a layout whose layers are not whole 4 KiB sectors is loaded whole (verified before returning);
- transformers' `TierKV.generate` over a loaded prefix gives the tokens of recompute, and a
  corrupt block makes it recompute (with a warning), never answer from the corrupt KV.

Run on the GPU machine: `python -m pytest -m gpu tests/gpu -q`.
"""

from __future__ import annotations

import math

import pytest
import torch

from tierkv import BlockStore, DimOrder, EngineKV, EngineKVLayout, KVLayout, Namespace, StoreConfig
from tierkv.integrity import checksum_block_slots
from tierkv.ops.checksum import as_unsigned, block_roots_gpu, sector_leaves_gpu

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LAYOUT = KVLayout(num_layers=3, kv_factor=2, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, block_tokens=16)
BB = LAYOUT.block_bytes  # 3 layers of 8 KiB: each layer two whole sectors
N = 12


def tokens(i: int = 0, n: int = N) -> list[int]:
    return list(range(i * 10_000, i * 10_000 + n * LAYOUT.block_tokens))


def make_store(layout: KVLayout = LAYOUT, host_blocks: int = 4 * N) -> BlockStore:
    config = StoreConfig(device_bytes=0, host_bytes=host_blocks * layout.block_bytes)
    return BlockStore(layout, Namespace(model="layer-load"), config)


def host_of(store: BlockStore):  # noqa: ANN201 - the host tier, to look at its bytes where they lie
    return next(t for t in store.tiers if t.name == "host")


def vllm_engine(layout: KVLayout, pages: int) -> tuple[EngineKV, torch.Tensor]:
    lay = EngineKVLayout(order=DimOrder.LBNHSC, num_layers=layout.num_layers, num_blocks=pages, block_size=16,
                         num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim, dtype=layout.dtype)
    buf = torch.randn(lay.shape, device="cuda").to(layout.dtype)
    return EngineKV(lay, buf), buf


def test_layer_leaves_finish_into_the_block_checksums() -> None:
    g = torch.Generator(device="cuda").manual_seed(1)
    blocks = torch.randint(0, 256, (N, BB), dtype=torch.uint8, device="cuda", generator=g)
    lb = BB // LAYOUT.num_layers
    s = torch.cuda.current_stream()
    leaves = torch.empty((LAYOUT.num_layers, N, lb // 4096), dtype=torch.int64, device="cuda")
    for layer in range(LAYOUT.num_layers):
        sector_leaves_gpu(blocks[:, layer * lb : (layer + 1) * lb].contiguous(), leaves[layer], s)
    roots = block_roots_gpu(leaves.permute(1, 0, 2).reshape(N, -1).contiguous(), BB, s)
    assert as_unsigned(roots) == checksum_block_slots(blocks.cpu(), range(N))
    with pytest.raises(ValueError, match="whole 4096-byte sectors"):
        sector_leaves_gpu(blocks[:, :100].contiguous(), leaves[0], s)


@pytest.mark.parametrize("path", ["dma", "kernel"])
def test_every_layer_lands_where_load_into_puts_it(path: str) -> None:
    eng, buf = vllm_engine(LAYOUT, 2 * N)
    table = list(range(1, 2 * N, 2))
    t = tokens(1)
    with make_store() as s:
        assert s.save_from(eng, table, t) == N
        want = buf.clone()
        buf.zero_()
        load = s.load_layers(eng, table, t, path=path)
        assert load.layerwise and load.end == N and not load.finished
        for layer in range(LAYOUT.num_layers):
            load.wait(layer)
            assert torch.equal(buf[layer, table], want[layer, table]), f"layer {layer} after wait({layer})"
        assert load.finish() == N and load.finished and load.finish() == N
        assert torch.equal(buf.index_select(1, torch.tensor(table, device="cuda")),
                           want.index_select(1, torch.tensor(table, device="cuda")))
        assert s.stats()["tiers"]["host"]["corrupt"] == 0


def test_a_flipped_host_byte_ends_the_run_at_finish_and_leaves_the_store() -> None:
    eng, buf = vllm_engine(LAYOUT, N)
    t = tokens(2)
    with make_store() as s:
        s.save_from(eng, list(range(N)), t)
        key = s.keys(t)[7]
        torch.cuda.synchronize()
        host_of(s).storage[s.locate([key])[key]["host"], BB - 5] ^= 0x10  # in the last layer
        load = s.load_layers(eng, list(range(N)), t)
        assert load.layerwise and load.end == N
        assert load.finish() == 7
        assert s.stats()["tiers"]["host"]["corrupt"] == 1
        assert s.residency([key]) == {key: None}, "the corrupt copy (the only one) is gone"
        again = s.load_layers(eng, list(range(N)), t)
        assert again.end == 7 and again.finish() == 7


def test_transformers_order_with_left_padding() -> None:
    pads, columns = [0, 8], 8 + N * 16
    heads, dim, layers = LAYOUT.num_kv_heads, LAYOUT.head_dim, LAYOUT.num_layers
    padded = -(-columns // 16) * 16
    g = math.gcd(16, *pads)
    kv = torch.randn((layers, 2, 2, heads, padded, dim), device="cuda").to(LAYOUT.dtype)
    lay = EngineKVLayout(DimOrder.HBNC, num_layers=layers, num_blocks=padded // g, block_size=g, num_kv_heads=heads,
                         head_dim=dim, dtype=LAYOUT.dtype)
    with make_store() as s:
        for row, pad in enumerate(pads):
            eng = EngineKV(lay, [(kv[layer, 0, row], kv[layer, 1, row]) for layer in range(layers)])
            table = list(range(pad // g, padded // g))
            n = (columns - pad) // 16
            assert s.save_from(eng, table, tokens(row, n)) == n
            want = kv[:, :, row, :, pad : pad + n * 16].clone()
            kv[:, :, row].zero_()
            with s.load_layers(eng, table, tokens(row, n)) as load:
                assert load.layerwise
            assert torch.equal(kv[:, :, row, :, pad : pad + n * 16], want)
            assert not kv[:, :, row, :, :pad].any() and not kv[:, :, row, :, pad + n * 16 :].any()


def test_layers_of_partial_sectors_are_loaded_whole_and_verified() -> None:
    odd = KVLayout(num_layers=2, kv_factor=2, num_kv_heads=1, head_dim=48, dtype=torch.bfloat16, block_tokens=16)
    eng, buf = vllm_engine(odd, N)
    t = tokens(3)
    with make_store(odd) as s:
        s.save_from(eng, list(range(N)), t)
        want = buf.clone()
        buf.zero_()
        load = s.load_layers(eng, list(range(N)), t)
        assert not load.layerwise and load.finished and load.finish() == N
        assert torch.equal(buf, want)


def test_close_finishes_a_load_still_in_flight() -> None:
    eng, _ = vllm_engine(LAYOUT, N)
    s = make_store()
    s.save_from(eng, list(range(N)), tokens(4))
    load = s.load_layers(eng, list(range(N)), tokens(4))
    s.close()
    assert load.finished and load.finish() == N


def test_transformers_generate_over_a_layerwise_load_and_a_corrupt_block() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tierkv_connectors.hf import TierKV

    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to("cuda").eval()  # float32: reuse and recompute agree token for token
    model.generation_config.pad_token_id = 0
    prompt = torch.randint(1, 1000, (1, 1024), device="cuda")
    mask = torch.ones_like(prompt)
    with torch.no_grad():
        dense = model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=8, do_sample=False)
        with TierKV(model, StoreConfig(device_bytes=0, host_bytes=64 << 20)) as tkv:
            tkv.generate(prompt[:, :960], mask[:, :960], max_new_tokens=1)
            cache = tkv.cache(prompt, mask)
            assert cache._loads is not None and all(ld.layerwise for ld in cache._loads.loads)
            cache.release_loads()
            out = tkv.generate(prompt, mask, max_new_tokens=8)
            assert out.reused_tokens == [960] and not out.recomputed
            assert torch.equal(out.sequences, dense)
            host = host_of(tkv.store)
            key = tkv.store.keys(prompt[0, :960].tolist(), tenant=None)
            torch.cuda.synchronize()
            host.storage[tkv.store.locate([key[30]])[key[30]]["host"], 100] ^= 1
            with pytest.warns(RuntimeWarning, match="failed its checksum"):
                again = tkv.generate(prompt, mask, max_new_tokens=8)
            assert again.recomputed and torch.equal(again.sequences, dense)
