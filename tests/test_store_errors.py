"""Bad input to BlockStore: each a clear ValueError/TypeError naming the problem, nothing half-stored."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from conftest import check_index_invariants, kv_for, make_store, prompt, same_bits, tiny_layout
from tierkv import BlockStore, ConfigError, KVLayout, LayoutMismatchError, Namespace, StoreConfig


@pytest.fixture
def store(layout: KVLayout):
    """A store already holding one prompt, so a failed put has something to disturb."""
    with make_store(4, 4, layout) as s:
        held = prompt(0, 2)
        s.put(held, kv_for(layout, held))
        yield s


def assert_unchanged(store: BlockStore, before: dict) -> None:
    assert store.stats() == before
    assert len(store.residency()) == 2
    held = prompt(0, 2)
    assert same_bits(store.get(held), kv_for(store.layout, held))
    check_index_invariants(store)


BAD_KV: list[tuple[str, Callable[[KVLayout], object], type[Exception], str]] = [
    ("wrong dtype", lambda lay: torch.zeros(3, *lay.block_shape, dtype=torch.float32), LayoutMismatchError, "kv dtype is float32, the layout says bfloat16"),
    ("wrong head_dim", lambda lay: torch.zeros(3, 2, 2, 4, 2, 8, dtype=lay.dtype), LayoutMismatchError, r"kv shape is \(3, 2, 2, 4, 2, 8\), expected \(3, 2, 2, 4, 2, 4\)"),
    ("missing block dim", lambda lay: torch.zeros(*lay.block_shape, dtype=lay.dtype), ValueError, "kv holds 2 blocks but tokens hold 3 full blocks"),
    ("too few blocks", lambda lay: torch.zeros(2, *lay.block_shape, dtype=lay.dtype), ValueError, r"kv holds 2 blocks but tokens hold 3 full blocks of 4 \(14 tokens\)"),
    ("too many blocks", lambda lay: torch.zeros(4, *lay.block_shape, dtype=lay.dtype), ValueError, "kv holds 4 blocks but tokens hold 3 full blocks"),
    ("scalar", lambda lay: torch.tensor(1.0, dtype=lay.dtype), LayoutMismatchError, r"kv shape is \(\), expected \(3,"),
    ("numpy array", lambda lay: np.zeros((3, *lay.block_shape), dtype=np.float32), TypeError, "kv must be a torch.Tensor, got ndarray"),
    ("list", lambda lay: [[0.0]], TypeError, "kv must be a torch.Tensor, got list"),
    ("kv_factor 1 layout", lambda lay: torch.zeros(3, 2, 1, 4, 2, 4, dtype=lay.dtype), LayoutMismatchError, "kv shape is"),
]


@pytest.mark.parametrize(("what", "make_kv", "error", "message"), BAD_KV, ids=[b[0] for b in BAD_KV])
def test_bad_kv_is_rejected_and_nothing_is_stored(store, what, make_kv, error, message) -> None:
    before = store.stats()
    tokens = prompt(0, 3, extra=2)  # shares two blocks with what is stored, one new
    with pytest.raises(error, match=message):
        store.put(tokens, make_kv(store.layout))
    assert_unchanged(store, before)


def test_layout_mismatch_is_a_value_error(store) -> None:
    other = tiny_layout(torch.float16)
    with pytest.raises(ValueError):
        store.put(prompt(50, 1), kv_for(other, prompt(50, 1)))


BAD_TOKENS: list[tuple[str, object, type[Exception], str]] = [
    ("floats", [0.0, 1.0, 2.0, 3.0], TypeError, "tokens must be integers"),
    ("float tensor", torch.arange(4, dtype=torch.float32), TypeError, "tokens must be integers, got a tensor of torch.float32"),
    ("float array", np.arange(4, dtype=np.float64), TypeError, "tokens must be integers, got an array of float64"),
    ("bool tensor", torch.ones(4, dtype=torch.bool), TypeError, "tokens must be integers"),
    ("strings", ["a", "b", "c", "d"], TypeError, "tokens must be integers"),
    ("2-D", [[0, 1], [2, 3]], ValueError, "tokens must be one-dimensional"),
    ("too large", [0, 1, 2, 2**31], ValueError, "token ids must fit in int32"),
]


@pytest.mark.parametrize(("what", "tokens", "error", "message"), BAD_TOKENS, ids=[b[0] for b in BAD_TOKENS])
def test_bad_tokens_are_rejected_by_every_call(store, what, tokens, error, message) -> None:
    before = store.stats()
    kv = torch.zeros(1, *store.layout.block_shape, dtype=store.layout.dtype)
    for call in (lambda: store.put(tokens, kv), lambda: store.get(tokens), lambda: store.match(tokens), lambda: store.lease(tokens)):
        with pytest.raises(error, match=message):
            call()
    assert_unchanged(store, before)


@pytest.mark.parametrize(
    ("field", "value"),
    [("device_bytes", -1), ("host_bytes", -4096), ("device_bytes", "-1GiB"), ("host_bytes", "lots")],
)
def test_negative_or_garbled_capacity_is_a_config_error_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        StoreConfig(**{field: value})


def test_constructor_checks_argument_types(layout, namespace) -> None:
    config = StoreConfig(device_bytes=4096, host_bytes=4096, device="cpu")
    with pytest.raises(TypeError, match="layout must be a KVLayout, got dict"):
        BlockStore(layout.to_dict(), namespace, config)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="namespace must be a Namespace, got str"):
        BlockStore(layout, "tiny-test", config)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="config must be a StoreConfig, got dict"):
        BlockStore(layout, namespace, {"device_bytes": 4096})  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is missing")
def test_pinned_host_without_cuda_is_a_config_error(layout, namespace) -> None:
    with pytest.raises(ConfigError, match="pin_host"):
        BlockStore(layout, namespace, StoreConfig(device_bytes=4096, host_bytes=4096, pin_host=True))


def test_errors_do_not_poison_the_store(store) -> None:
    for _ in range(3):
        with pytest.raises(ValueError):
            store.put(prompt(100, 2), torch.zeros(1, *store.layout.block_shape, dtype=store.layout.dtype))
    good = prompt(100, 2)
    assert store.put(good, kv_for(store.layout, good)) == 2
    assert same_bits(store.get(good), kv_for(store.layout, good))
    check_index_invariants(store)


def test_namespace_layout_mismatch_between_stores_never_shares(namespace) -> None:
    a_layout, b_layout = tiny_layout(torch.bfloat16), tiny_layout(torch.float16)
    assert namespace.digest(a_layout) != namespace.digest(b_layout)
    tokens = prompt(0, 1)
    with make_store(2, 2, a_layout, namespace) as a, make_store(2, 2, b_layout, Namespace(model="tiny-test")) as b:
        a.put(tokens, kv_for(a_layout, tokens))
        b.put(tokens, kv_for(b_layout, tokens))
        assert not set(a.residency()) & set(b.residency())
