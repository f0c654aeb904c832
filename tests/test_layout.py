"""KVLayout: block geometry and the validation that keeps tensors honest about it."""

from __future__ import annotations

import pytest
import torch

from tierkv import KVLayout, LayoutMismatchError
from tierkv.layout import dtype_name, parse_dtype

BASE = dict(num_layers=3, kv_factor=2, num_kv_heads=4, head_dim=8, dtype="bfloat16", block_tokens=16)


def layout(**changes: object) -> KVLayout:
    return KVLayout(**{**BASE, **changes})


def test_block_shape_and_bytes() -> None:
    lay = layout()
    assert lay.block_shape == (3, 2, 16, 4, 8)
    assert lay.block_bytes == 3 * 2 * 16 * 4 * 8 * 2
    assert torch.empty(lay.block_shape, dtype=lay.dtype).nbytes == lay.block_bytes


@pytest.mark.parametrize(
    ("dtype", "size"),
    [("float32", 4), ("float16", 2), ("bfloat16", 2), ("float8_e4m3fn", 1), ("int8", 1), ("uint8", 1)],
)
def test_block_bytes_follows_dtype(dtype: str, size: int) -> None:
    lay = layout(dtype=dtype, kv_factor=1)
    assert lay.element_size == size
    assert lay.block_bytes == 3 * 1 * 16 * 4 * 8 * size


def test_dtype_accepts_torch_dtype_and_prefixed_name() -> None:
    assert layout(dtype=torch.float16).dtype is torch.float16
    assert layout(dtype="torch.float16").dtype is torch.float16
    assert parse_dtype("float32") is torch.float32
    assert dtype_name(torch.bfloat16) == "bfloat16"


@pytest.mark.parametrize("field", ["num_layers", "num_kv_heads", "head_dim", "block_tokens"])
@pytest.mark.parametrize("value", [0, -1, True, 2.0, "4", None])
def test_positive_int_fields_reject_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"KVLayout\.{field} must be a positive int"):
        layout(**{field: value})


@pytest.mark.parametrize("value", [0, 3, -2, None])
def test_kv_factor_must_be_1_or_2(value: object) -> None:
    with pytest.raises(ValueError, match="kv_factor"):
        layout(kv_factor=value)


@pytest.mark.parametrize("value", [True, 1.0, 2.0])
def test_kv_factor_rejects_bool_and_float(value: object) -> None:
    with pytest.raises(ValueError, match="kv_factor"):
        layout(kv_factor=value)


@pytest.mark.parametrize("value", ["half", "float64", "torch.int64", "", 16, torch.float64, torch.int32, None])
def test_bad_dtype_is_named(value: object) -> None:
    with pytest.raises(ValueError, match="dtype .* is not supported"):
        layout(dtype=value)


def test_dict_round_trip_and_differences() -> None:
    lay = layout()
    d = lay.to_dict()
    assert d["dtype"] == "bfloat16"
    assert KVLayout.from_dict(d) == lay
    other = layout(head_dim=16, dtype="float16")
    diffs = lay.differences(other)
    assert sorted(diffs) == ["dtype: 'bfloat16' != 'float16'", "head_dim: 8 != 16"]
    assert lay.differences(layout()) == []


def test_layout_is_frozen_and_hashable() -> None:
    lay = layout()
    with pytest.raises(AttributeError):
        lay.num_layers = 5  # type: ignore[misc]
    assert {lay: 1}[layout()] == 1


def test_check_blocks_accepts_matching_tensor() -> None:
    lay = layout()
    lay.check_blocks(torch.zeros(5, *lay.block_shape, dtype=lay.dtype))
    lay.check_blocks(torch.zeros(5, *lay.block_shape, dtype=lay.dtype), num_blocks=5)
    lay.check_blocks(torch.zeros(0, *lay.block_shape, dtype=lay.dtype), num_blocks=0)


def test_check_blocks_rejects_non_tensor() -> None:
    with pytest.raises(TypeError, match="kv must be a torch.Tensor, got list"):
        layout().check_blocks([[0.0]])


def test_check_blocks_names_wrong_dtype() -> None:
    lay = layout()
    with pytest.raises(LayoutMismatchError, match="kv dtype is float32, the layout says bfloat16"):
        lay.check_blocks(torch.zeros(1, *lay.block_shape, dtype=torch.float32))


@pytest.mark.parametrize(
    "shape",
    [(2, 3, 2, 16, 4, 9), (2, 3, 1, 16, 4, 8), (3, 2, 16, 4, 8), (2, 3, 2, 16, 4, 8, 1), ()],
)
def test_check_blocks_names_wrong_shape(shape: tuple[int, ...]) -> None:
    lay = layout()
    with pytest.raises(LayoutMismatchError, match=r"kv shape is .* expected .*num_blocks, num_layers"):
        lay.check_blocks(torch.zeros(shape, dtype=lay.dtype))


def test_check_blocks_names_wrong_block_count() -> None:
    lay = layout()
    with pytest.raises(LayoutMismatchError, match=r"expected \(4, 3, 2, 16, 4, 8\)"):
        lay.check_blocks(torch.zeros(3, *lay.block_shape, dtype=lay.dtype), num_blocks=4)


def test_layout_mismatch_is_a_value_error() -> None:
    assert issubclass(LayoutMismatchError, ValueError)
