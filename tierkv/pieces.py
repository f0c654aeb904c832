"""How a long transfer is cut into pieces: small first, then doubling up to a cap.

A put, a save or a load works piece by piece so that one piece's copy runs while the host (or
the GPU's gather and hash) prepares the next. The copy engines can start only once the first
piece is ready, and everything before that start is time the link stands idle: with pieces of
one size, a 256 MiB put waited for the eviction and bookkeeping of 128 MiB of blocks (~0.5 ms,
a tenth of the whole copy) before its first byte moved. Starting at an eighth of the cap and
doubling keeps that wait short while later pieces stay large (few waits, few DMA batches);
each piece's preparation stays shorter than the previous piece's copy, since host work per
byte is several times faster than PCIe.
"""

from __future__ import annotations

FIRST_PIECE_FRACTION = 8  # the first piece is this fraction of the cap


def ramped_pieces(count: int, item_bytes: int, most_bytes: int) -> list[range]:
    """Consecutive ranges covering `range(count)`: the first about `most_bytes / 8` of items, doubling up to `most_bytes`.

    Every range holds at least one item (an item larger than the cap is a piece of its own).
    """
    most = max(1, most_bytes // max(item_bytes, 1))
    size = max(1, most // FIRST_PIECE_FRACTION)
    pieces, a = [], 0
    while a < count:
        b = min(count, a + size)
        pieces.append(range(a, b))
        a, size = b, min(most, 2 * size)
    return pieces
