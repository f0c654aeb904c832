"""One inference node's store in its own process, for the remote tier's two-process tests.

    python tests/_remote_node.py CONFIG_JSON

CONFIG_JSON: {"remote_url", "model", "host_blocks", "disk_path"?, ...StoreConfig fields}. Reads
one JSON command per line on stdin and answers one JSON line:

    {"op": "put", "first": F, "blocks": N, "tenant": T?}   -> {"added": n}
    {"op": "get", "first": F, "blocks": N, "tenant": T?}   -> {"blocks": k, "exact": bool}
    {"op": "publish"}                                      -> {"ok": true}  (every queued remote write sent)
    {"op": "stats"}                                        -> the store's stats()
    {"op": "quit"}                                         -> {"ok": true}, then the store closes
"""

from __future__ import annotations

import json
import sys

from conftest import kv_for, prompt, same_bits
from remote_fixtures import LAYOUT

from tierkv import BlockStore, Namespace, StoreConfig


def main() -> None:
    spec = json.loads(sys.argv[1])
    model = spec.pop("model")
    host_blocks = spec.pop("host_blocks")
    config = StoreConfig(device_bytes=0, host_bytes=host_blocks * LAYOUT.block_bytes, device="cpu", **spec)
    store = BlockStore(LAYOUT, Namespace(model=model), config)
    remote = store.tiers[store.tier_names.index("remote")]
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        tenant = cmd.get("tenant", "")
        reply: dict = {"ok": True}
        if op in ("put", "get"):
            tokens = prompt(cmd["first"], cmd["blocks"])
            kv = kv_for(LAYOUT, tokens, tenant)
            if op == "put":
                reply = {"added": store.put(tokens, kv, tenant=tenant)}
            else:
                got = store.get(tokens, tenant=tenant)
                reply = {"blocks": got.shape[0], "exact": same_bits(got, kv[: got.shape[0]])}
        elif op == "publish":
            remote.writer.drain(30)
        elif op == "stats":
            reply = store.stats()
        print(json.dumps(reply), flush=True)
        if op == "quit":
            break
    store.close()


if __name__ == "__main__":
    main()
