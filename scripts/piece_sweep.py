"""Sweep of the piece sizes of puts, hashed saves and verified loads through the public path (H200 tuning).

    PYTHONUNBUFFERED=1 python scripts/piece_sweep.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_path_bench as bench  # noqa: E402

import tierkv.placement  # noqa: E402
import tierkv.tiers.memory  # noqa: E402

MiB = 1 << 20


def main() -> None:
    ref = bench.reference()
    link = min(ref["d2h"], ref["h2d"])
    print(f"link {link / 1e9:.1f} GB/s, both ways {ref['both'] / 1e9:.1f}")
    print("| piece MiB | read-ahead | put 2M | get 2M | save 2M | load 2M | both 2M (x of put) |")
    for piece, ahead in ((32, 4), (64, 2), (128, 2), (256, 1), (256, 2)):
        tierkv.placement.PUT_PIECE_BYTES = piece * MiB
        tierkv.placement.LOAD_PIECE_BYTES = piece * MiB
        tierkv.placement.READ_AHEAD = ahead
        tierkv.tiers.memory.SAVE_PIECE_BYTES = piece * MiB
        lay = bench.layout(16)
        put, get = bench.put_get(lay, 0)
        save, load = bench.save_load(lay)
        both = bench.both_ways(lay)
        r = [x * 1e9 / link for x in (put, get, save, load, both)]
        print(f"| {piece} | {ahead} | {r[0]:.2f} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f} (x{both / put:.2f}) |")


if __name__ == "__main__":
    main()
