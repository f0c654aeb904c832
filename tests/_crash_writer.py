"""Child process of the crash test: puts blocks into a disk-backed store until it is killed.

Usage: python _crash_writer.py DIR SEED DURABILITY. Prints "ready" once the store is open and
then one line per put, so the parent can kill it in the middle of real work.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest import kv_for, tiny_layout  # noqa: E402
from test_disk import FAMILY, disk_config  # noqa: E402

from tierkv import BlockStore, Namespace  # noqa: E402


def main() -> None:
    directory, seed, durability = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    layout = tiny_layout()
    rng = random.Random(seed)
    store = BlockStore(layout, Namespace(model="crash"), disk_config(layout, directory, durability=durability))
    print("ready", flush=True)
    while True:
        tokens = rng.choice(FAMILY)
        tokens = tokens[: rng.randint(1, len(tokens) // 4) * 4]
        store.put(tokens, kv_for(layout, tokens))
        if rng.random() < 0.3:
            store.get(rng.choice(FAMILY))
        print("put", len(tokens), flush=True)


if __name__ == "__main__":
    main()
