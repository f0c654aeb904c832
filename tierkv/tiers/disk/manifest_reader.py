"""Child process of `vetting.py`: read a manifest that may be damaged and send every entry it can.

Usage: python manifest_reader.py MANIFEST_DIR. Run as a script (only the standard library and
lmdb are imported, so it starts in a blink), read-only and without LMDB's lock file. LMDB trusts
its file, so a damaged one can kill this process (SIGBUS, SIGSEGV, SIGABRT) or hang it; that is
why it runs here and not in the store's process. What it sends on stdout before it dies is kept.

Output, frames of `tag (1 byte) | key length (u16) | value length (u32) | key | value`:
`n` the block count LMDB says it holds (key empty, value a decimal), `m` an entry of the meta
database, `b` an entry of the blocks database, `e` the end (sent only if everything was read).
"""

from __future__ import annotations

import struct
import sys

FRAME = struct.Struct("<cHI")


def main(path: str) -> int:
    import lmdb

    out = sys.stdout.buffer

    def send(tag: bytes, key: bytes, value: bytes) -> None:
        out.write(FRAME.pack(tag, len(key), len(value)) + key + value)
        out.flush()  # what was sent survives the crash this process may be about to have

    env = lmdb.open(path, subdir=True, readonly=True, lock=False, max_dbs=2, readahead=False)
    with env.begin() as txn:
        meta = env.open_db(b"meta", txn=txn, create=False)
        for key, value in txn.cursor(db=meta):
            send(b"m", bytes(key), bytes(value))
        blocks = env.open_db(b"blocks", txn=txn, create=False)
        send(b"n", b"", str(txn.stat(blocks)["entries"]).encode())
        for key, value in txn.cursor(db=blocks):
            send(b"b", bytes(key), bytes(value))
    send(b"e", b"", b"")
    env.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
