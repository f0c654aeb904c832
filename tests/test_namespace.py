"""Namespace: every field that changes KV bytes must change the key-chain seed."""

from __future__ import annotations

import pytest
import torch

from tierkv import KVLayout, Namespace

LAYOUT = KVLayout(num_layers=2, kv_factor=2, num_kv_heads=2, head_dim=4, dtype=torch.bfloat16, block_tokens=4)
BASE = Namespace(model="llama", weights_fingerprint="abc", tp_rank=0, tp_size=2, adapter="", tenant="")


def test_digest_is_16_bytes_and_deterministic() -> None:
    d = BASE.digest(LAYOUT)
    assert isinstance(d, bytes) and len(d) == 16
    assert Namespace(model="llama", weights_fingerprint="abc", tp_size=2).digest(LAYOUT) == d


@pytest.mark.parametrize(
    "changes",
    [
        {"model": "llama-2"},
        {"weights_fingerprint": "abd"},
        {"weights_fingerprint": ""},
        {"tp_rank": 1},
        {"tp_size": 4},
        {"adapter": "lora-a"},
        {"tenant": "acme"},
    ],
)
def test_digest_changes_with_every_namespace_field(changes: dict[str, object]) -> None:
    ns = Namespace(**{**BASE.to_dict(), **changes})
    assert ns.digest(LAYOUT) != BASE.digest(LAYOUT)


@pytest.mark.parametrize(
    "changes",
    [
        {"num_layers": 3},
        {"kv_factor": 1},
        {"num_kv_heads": 1},
        {"head_dim": 8},
        {"dtype": "float16"},
        {"block_tokens": 16},
    ],
)
def test_digest_changes_with_every_layout_field(changes: dict[str, object]) -> None:
    other = KVLayout(**{**LAYOUT.to_dict(), **changes})
    assert BASE.digest(other) != BASE.digest(LAYOUT)


def test_all_single_field_variants_are_pairwise_distinct() -> None:
    variants = [
        BASE,
        Namespace(model="llama-2", weights_fingerprint="abc", tp_size=2),
        Namespace(model="llama", weights_fingerprint="abd", tp_size=2),
        Namespace(model="llama", weights_fingerprint="abc", tp_rank=1, tp_size=2),
        Namespace(model="llama", weights_fingerprint="abc", tp_size=3),
        Namespace(model="llama", weights_fingerprint="abc", tp_size=2, adapter="x"),
        Namespace(model="llama", weights_fingerprint="abc", tp_size=2, tenant="x"),
    ]
    digests = {ns.digest(LAYOUT) for ns in variants}
    assert len(digests) == len(variants)


def test_field_values_cannot_bleed_into_each_other() -> None:
    # Concatenation-style hashing would make these equal; canonical JSON must not.
    a = Namespace(model="ab", adapter="c")
    b = Namespace(model="a", adapter="bc")
    assert a.digest(LAYOUT) != b.digest(LAYOUT)


def test_with_tenant_only_changes_tenant() -> None:
    t = BASE.with_tenant("acme")
    assert t.tenant == "acme"
    assert {**t.to_dict(), "tenant": ""} == BASE.to_dict()
    assert t.digest(LAYOUT) == Namespace(**{**BASE.to_dict(), "tenant": "acme"}).digest(LAYOUT)


def test_defaults() -> None:
    ns = Namespace(model="m")
    assert (ns.weights_fingerprint, ns.tp_rank, ns.tp_size, ns.adapter, ns.tenant) == ("", 0, 1, "", "")


@pytest.mark.parametrize("model", ["", None, 5])
def test_model_must_be_non_empty_string(model: object) -> None:
    with pytest.raises(ValueError, match="Namespace.model must be a non-empty string"):
        Namespace(model=model)  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["weights_fingerprint", "adapter", "tenant"])
@pytest.mark.parametrize("value", [None, 3, b"x"])
def test_string_fields_reject_non_strings(field: str, value: object) -> None:
    with pytest.raises(TypeError, match=rf"Namespace\.{field} must be a string"):
        Namespace(model="m", **{field: value})


@pytest.mark.parametrize("field", ["tp_rank", "tp_size"])
@pytest.mark.parametrize("value", [True, 1.0, "1", None])
def test_tp_fields_must_be_ints(field: str, value: object) -> None:
    with pytest.raises(TypeError, match=rf"Namespace\.{field} must be an int"):
        Namespace(model="m", **{field: value})


@pytest.mark.parametrize(("rank", "size"), [(-1, 1), (1, 1), (4, 2), (0, 0), (0, -1)])
def test_tp_rank_must_lie_within_tp_size(rank: int, size: int) -> None:
    with pytest.raises(ValueError, match=rf"0 <= tp_rank < tp_size, got tp_rank={rank}, tp_size={size}"):
        Namespace(model="m", tp_rank=rank, tp_size=size)


def test_namespace_is_frozen() -> None:
    with pytest.raises(AttributeError):
        BASE.tenant = "x"  # type: ignore[misc]
