"""A forked child holding the writer's inherited descriptors (multiprocessing forks by default on Linux)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

from _faults import FAMILY, forkserver, open_fault_store, run_in_child, still_usable, verify_served
from conftest import kv_for


def _writer_with_a_sleeping_child(directory: str, conn: Any) -> None:
    """Open the store, put blocks, fork a child that just sleeps (holding every inherited descriptor), report, wait."""
    store = open_fault_store(directory)
    for tokens in FAMILY[:4]:
        store.put(tokens, kv_for(store.layout, tokens))
    pid = os.fork()
    if pid == 0:  # the child: inherits the lock's descriptor, the data files and LMDB's
        time.sleep(60)
        os._exit(0)
    conn.send(pid)
    time.sleep(60)


def test_a_forked_child_does_not_keep_the_store_locked_after_the_writer_dies(tmp_path: Path) -> None:
    """Before: the child's copy of the flock descriptor kept the directory locked, and the restart was refused."""
    ctx = forkserver()
    recv, send = ctx.Pipe(duplex=False)
    writer = ctx.Process(target=_writer_with_a_sleeping_child, args=(str(tmp_path), send), daemon=True)
    writer.start()
    send.close()
    assert recv.poll(120), "the writer never forked its child"
    child = recv.recv()
    try:
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(30)
        with open_fault_store(tmp_path) as store:  # the writer is dead; its child is alive and must not matter
            os.kill(child, 0)  # still alive
            verify_served(store)
            still_usable(store, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def _child_uses_the_parents_store(directory: str) -> dict[str, Any]:
    """Open a store, fork; the child tries to use the parent's store; the parent goes on and closes."""
    store = open_fault_store(directory)
    for tokens in FAMILY[:3]:
        store.put(tokens, kv_for(store.layout, tokens))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        outcome = []
        for call in (lambda: store.put(FAMILY[5], kv_for(store.layout, FAMILY[5])), lambda: store.get(FAMILY[0]),
                     store.close):
            try:
                call()
                outcome.append("done")
            except Exception as e:
                outcome.append(f"{type(e).__name__}: {e}")
        os.write(write, "\n".join(outcome).encode())
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    child_said = b""
    while chunk := os.read(read, 65536):
        child_said += chunk
    for tokens in FAMILY[3:6]:
        store.put(tokens, kv_for(store.layout, tokens))
    served = verify_served(store).blocks
    store.close()
    return {"child": child_said.decode().split("\n"), "status": status, "served": served}


def test_a_forked_child_may_not_use_the_parents_store_and_the_parent_carries_on(tmp_path: Path) -> None:
    result = run_in_child(_child_uses_the_parents_store, str(tmp_path))
    assert not result.crashed and result.error is None, result.error or f"exit {result.exitcode}"
    said = result.value["child"]
    assert said[0].startswith("TierKVError") and "forked child" in said[0], said
    assert said[1].startswith("TierKVError") and "forked child" in said[1], said
    assert result.value["status"] == 0
    with open_fault_store(tmp_path) as store:  # nothing the child did (or tried) damaged the store
        assert verify_served(store).blocks == result.value["served"]
        assert store.match(FAMILY[5]) == len(FAMILY[5])
        assert store.stats()["disk"]["recovery_dropped"] == 0
