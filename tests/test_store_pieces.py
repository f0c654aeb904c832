"""Long puts are placed and written in pieces (`placement.PUT_PIECE_BYTES`): same result as one piece, same all-or-nothing."""

import pytest
import torch
from conftest import check_index_invariants, kv_for, make_store, prompt, same_bits, tiny_layout

from tierkv import placement


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of 3 blocks of the tiny layout, so that every test put spans several."""
    monkeypatch.setattr(placement, "PUT_PIECE_BYTES", 3 * tiny_layout().block_bytes)


def test_a_put_of_many_pieces_stores_every_block_bit_exact(small_pieces):
    lay = tiny_layout()
    with make_store(4, 12, lay) as store:
        old = prompt(50_000, 5)
        store.put(old, kv_for(lay, old))
        tokens = prompt(0, 11)  # 4 pieces; the device tier overflows into the host tier on the way
        assert store.put(tokens, kv_for(lay, tokens)) == 11
        assert store.match(tokens) == len(tokens)
        assert same_bits(store.get(tokens), kv_for(lay, tokens))
        check_index_invariants(store)
        assert store.index.leased_copies == 0  # the pieces' own leases are given back


def test_a_put_after_a_stored_prefix_in_pieces(small_pieces):
    lay = tiny_layout()
    with make_store(8, 16, lay) as store:
        tokens = prompt(0, 10)
        store.put(tokens[: 4 * lay.block_tokens], kv_for(lay, tokens)[:4])
        assert store.put(tokens, kv_for(lay, tokens)[4:], first_block=4) == 6
        assert same_bits(store.get(tokens), kv_for(lay, tokens))
        check_index_invariants(store)


def test_a_failed_write_in_a_later_piece_takes_out_every_new_block(small_pieces):
    lay = tiny_layout()
    with make_store(4, 12, lay) as store:
        kept = prompt(70_000, 3)
        store.put(kept, kv_for(lay, kept))
        tokens = prompt(0, 10)
        rows = kv_for(lay, tokens).view(torch.uint8).reshape(10, -1)
        calls = []

        def write(t, slots, span, blocks):
            calls.append(span)
            if len(calls) == 3:
                raise OSError("the third piece's write fails")
            store.placement.write(t, slots, rows[span], blocks, "put")

        with pytest.raises(OSError, match="third piece"):
            store._store_chain(store.chain.chunks(tokens), None, 0, write)
        assert store.match(tokens) == 0
        assert store.index.leased_copies == 0
        assert same_bits(store.get(kept), kv_for(lay, kept))  # what was stored before is untouched
        assert len(store.index) == 3  # only `kept` (making room may have demoted it: that loses nothing)
        check_index_invariants(store)
        assert store.put(tokens, kv_for(lay, tokens)) == 10  # and the store still takes the put

