"""`empty_rows`: fresh host rows, large ones on huge-page-advised mappings that live as long as the tensor."""

import gc

import numpy as np
import torch

from tierkv.tiers.disk.files import ALIGN, aligned_empty
from tierkv.tiers.host_rows import HUGE_MIN_BYTES, HUGE_PAGE, empty_rows


def test_small_rows_are_ordinary_tensors():
    t = empty_rows(3, 1024)
    assert t.shape == (3, 1024) and t.dtype == torch.uint8 and t.is_contiguous()


def test_large_rows_start_on_a_huge_page_and_keep_their_bytes():
    rows, width = 5, HUGE_MIN_BYTES // 4
    t = empty_rows(rows, width)
    assert t.shape == (rows, width) and t.is_contiguous() and t.data_ptr() % HUGE_PAGE == 0
    pattern = torch.arange(rows * width, dtype=torch.int64).remainder(251).to(torch.uint8).view(rows, width)
    t.copy_(pattern)
    view = t[1:3].view(torch.int16)  # a view outlives the tensor it came from
    del t
    gc.collect()
    others = [empty_rows(rows, width).fill_(7) for _ in range(3)]  # memory freed too early would be reused here
    assert torch.equal(view.view(torch.uint8), pattern[1:3])
    assert all(int(o[0, 0]) == 7 for o in others)


def test_large_aligned_buffers_for_direct_io():
    buf = aligned_empty(HUGE_MIN_BYTES + 3 * ALIGN)
    assert isinstance(buf, np.ndarray) and buf.nbytes == HUGE_MIN_BYTES + 3 * ALIGN and buf.ctypes.data % ALIGN == 0
    buf[:] = 3
    assert int(buf.sum()) == 3 * buf.nbytes


def test_zero_rows():
    assert empty_rows(0, HUGE_MIN_BYTES).shape == (0, HUGE_MIN_BYTES)


def test_a_mapping_is_reused_only_once_its_tensors_are_gone():
    rows, width = 4, 3 * (1 << 20) + 4096  # a size no other test asks for
    a = empty_rows(rows, width).fill_(1)
    view = a[2:]  # keeps a's mapping alive after `a` is gone
    ptr = view.data_ptr()
    del a
    gc.collect()
    b = empty_rows(rows, width).fill_(2)  # must not land on the mapping `view` still uses
    assert int(view.min()) == 1 and int(view.max()) == 1
    del view
    gc.collect()
    c = empty_rows(rows, width)  # now that mapping is free: reused, already faulted in
    assert c.data_ptr() + 2 * width == ptr
    assert int(b.min()) == 2  # and b is untouched by c
    c.fill_(3)
    assert int(b.max()) == 2


def test_mappings_kept_for_reuse_are_bounded():
    from tierkv.tiers.host_rows import _MAPPINGS

    live = [empty_rows(1, 64 << 20) for _ in range(12)]  # 768 MiB at once: more than KEEP_BYTES
    assert _MAPPINGS.held_bytes() <= _MAPPINGS.keep_bytes
    live[0].fill_(5)
    assert all(int(t[0, 0]) != 5 or t is live[0] for t in live[1:])
    del live
    gc.collect()
    again = [empty_rows(1, 64 << 20) for _ in range(3)]
    assert len({t.data_ptr() for t in again}) == 3 and _MAPPINGS.held_bytes() <= _MAPPINGS.keep_bytes
