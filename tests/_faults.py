"""The fault-injection suite's shared parts: a workload, a verifier that knows every block's bytes, a writer child.

Every fault test asks the same four questions of a store after the fault: did it serve a wrong
byte (never), did it crash or raise something other than a `TierKVError` (never), is everything
its durability mode promised still there, and does it still take and serve new blocks. The
answers come from here so that each test only sets up its fault.

KV is a pure function of the token prefix (`conftest.kv_for`), so the verifier needs no record of
what was written: whatever a store serves for a prompt must equal `kv_for` of that prompt.
`scripts/fault_soak.py` runs the same pieces for longer and prints the figures.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import check_index_invariants, kv_for, prompt, same_bits, tiny_layout

from tierkv import BlockStore, KeyChain, KVLayout, Namespace, StoreConfig

MODEL = "faults"
# 8 families of 3 branches of 12 blocks, sharing 6 blocks per family: 192 distinct blocks, so a
# disk tier of DISK_SLOTS never evicts and every block that reached it stays promised.
FAMILY = [prompt(f * 10_000, 6) + list(range(f * 10_000 + 500 + b * 100, f * 10_000 + 524 + b * 100))
          for f in range(8) for b in range(3)]
# What `still_usable` puts after a fault: 16 prompts of 3 blocks, taken in turn.
AFTER = [prompt(900_000 + 100 * i, 3) for i in range(16)]
DISK_SLOTS = 256  # FAMILY's 192 blocks and AFTER's 48


def fault_config(directory: str | os.PathLike[str], layout: KVLayout | None = None, device: int = 3, host: int = 6,
                 disk: int = DISK_SLOTS, **kw: Any) -> StoreConfig:
    """A CPU store whose tiers hold `device`, `host` and `disk` blocks of the tiny layout, disk under `directory`."""
    layout = layout or tiny_layout()
    bb = layout.block_bytes
    return StoreConfig(device_bytes=device * bb, host_bytes=host * bb, device="cpu", disk_path=str(directory),
                       disk_bytes=disk * 4096 * -(-bb // 4096), disk_io="posix", **kw)


def open_fault_store(directory: str | os.PathLike[str], **kw: Any) -> BlockStore:
    layout = tiny_layout()
    return BlockStore(layout, Namespace(model=MODEL), fault_config(directory, layout, **kw))


def key_prefixes(prompts: list[list[int]] = FAMILY + AFTER) -> dict[bytes, list[int]]:
    """Every block key of `prompts` -> the token prefix ending with that block."""
    layout = tiny_layout()
    chain = KeyChain(Namespace(model=MODEL), layout)
    bt = layout.block_tokens
    out: dict[bytes, list[int]] = {}
    for tokens in prompts:
        for i, key in enumerate(chain.keys(tokens)):
            out[key] = tokens[: (i + 1) * bt]
    return out


def disk_keys(store: BlockStore) -> set[bytes]:
    """Keys with a copy in the disk tier now (the tier's own view: located there, queued or written)."""
    return {key for key, where in store.locate(list(store.index.blocks)).items() if "disk" in where}


@dataclass
class Verdict:
    """What a verification pass saw: blocks and bytes served (all of them checked), prompts asked."""

    blocks: int = 0
    bytes: int = 0
    prompts: int = 0

    def __iadd__(self, other: Verdict) -> Verdict:
        self.blocks += other.blocks
        self.bytes += other.bytes
        self.prompts += other.prompts
        return self


def verify_served(store: BlockStore, prompts: list[list[int]] = FAMILY + AFTER) -> Verdict:
    """`get` every prompt; every byte served must be the KV put for those tokens (AssertionError otherwise)."""
    v = Verdict()
    for tokens in prompts:
        got = store.get(tokens)
        expected = kv_for(store.layout, tokens)[: got.shape[0]]
        assert same_bits(got, expected), f"served KV that was never put for tokens {tokens[:4]}...: a wrong byte"
        v.blocks += got.shape[0]
        v.bytes += got.numel() * got.element_size()
        v.prompts += 1
    return v


def assert_promised(store: BlockStore, promised: set[bytes], prefixes: dict[bytes, list[int]]) -> int:
    """Every promised key is stored and served whole and bit-exact; returns the bytes checked."""
    checked = 0
    missing = [k for k in promised if k not in store.index.blocks]
    assert not missing, f"{len(missing)} of {len(promised)} promised blocks are gone after the fault"
    for key in promised:
        tokens = prefixes[key]
        got = store.get(tokens)
        n = len(tokens) // store.layout.block_tokens
        assert got.shape[0] == n, f"a promised block (prefix of {n} blocks) is served as only {got.shape[0]}"
        assert same_bits(got[-1:], kv_for(store.layout, tokens)[-1:]), "a promised block came back with wrong bytes"
        checked += got[-1:].numel() * got.element_size()
    return checked


def still_usable(store: BlockStore, seed: int) -> None:
    """The store takes a new prompt after the fault and serves it back bit-exact; its index is sound."""
    check_index_invariants(store)
    tokens = AFTER[seed % len(AFTER)]
    store.put(tokens, kv_for(store.layout, tokens))
    assert same_bits(store.get(tokens), kv_for(store.layout, tokens)), "the store no longer serves what it was given"


def settled(store: BlockStore) -> BlockStore:
    """Wait for the disk tier's write-behind queue to empty, then run one operation, whose commit
    takes in every result (what the committer thread would do a moment later)."""
    store.tiers[store.tier_names.index("disk")].queue.drain()  # type: ignore[attr-defined]
    store.match([])
    return store


def prefix_closed(keys: set[bytes], prefixes: dict[bytes, list[int]]) -> set[bytes]:
    """The keys of `keys` whose every ancestor is in `keys` too: only those can be served after a restart."""
    layout = tiny_layout()
    chain = KeyChain(Namespace(model=MODEL), layout)
    return {k for k in keys if set(chain.keys(prefixes[k])) <= keys}


# -- children: a fork server, so that a crash is a finding and not a dead test run -----------------

_CONTEXT: Any = None


def forkserver() -> Any:
    """A multiprocessing context whose children fork from one server that has imported torch and tierkv.

    A child costs a fork, not an interpreter start and a torch import (seconds on a loaded CI
    machine); it still is a process of its own, so a SIGBUS, an abort or a SIGKILL in it is seen
    as its exit code.
    """
    global _CONTEXT
    if _CONTEXT is None:
        import multiprocessing

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "tierkv", "lmdb", "conftest", "_faults"])
        _CONTEXT = ctx
    return _CONTEXT


@dataclass
class ChildResult:
    """How a child ended: its exit code (negative: the signal that killed it) and what it sent back."""

    exitcode: int | None
    value: Any = None
    error: str | None = None  # the traceback of an exception that escaped the child's function

    @property
    def crashed(self) -> bool:
        return self.exitcode is None or self.exitcode < 0 or (self.exitcode != 0 and self.error is None)


def _child_main(fn: Any, args: tuple[Any, ...], conn: Any) -> None:
    import traceback

    try:
        conn.send(("ok", fn(*args)))
    except BaseException as e:  # reported, not raised: the parent decides what a failure means
        conn.send(("error", f"{type(e).__module__}.{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        raise SystemExit(3) from None


def run_in_child(fn: Any, *args: Any, timeout: float = 120.0) -> ChildResult:
    """Call `fn(*args)` in a forked child; its return value (picklable) or its exception, and how it exited."""
    ctx = forkserver()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(fn, args, send), daemon=True)
    proc.start()
    send.close()
    message = None
    if recv.poll(timeout):
        try:
            message = recv.recv()
        except EOFError:
            message = None
    proc.join(5 if message is not None else 0.1)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
    recv.close()
    if message is None:
        return ChildResult(proc.exitcode)
    kind, value = message
    return ChildResult(proc.exitcode, value if kind == "ok" else None, value if kind == "error" else None)


# -- the writer child ------------------------------------------------------------------------------

QUIET_SECONDS = 0.3


@dataclass
class WriterRun:
    """What a writer child said before it died: the keys it saw on disk, and those its durability mode promised."""

    reports: int = 0
    seen: set[bytes] = field(default_factory=set)  # keys located on disk at some report
    promised: set[bytes] = field(default_factory=set)  # keys promised by the last report that promises
    exitcode: int | None = None
    error: str | None = None
    killed: bool = False  # by the parent (else it died of its own kill_at, or of an error)


def writer_main(directory: str, seed: int, durability: str, kill_at: str | None, idle_after: int | None,
                slow_writes: float, conn: Any) -> None:
    """Put and get on a disk-backed store until killed, reporting after each operation what the disk tier holds.

    Each report is `(keys newly found in the disk tier, quiet)`; `quiet` says the writer sat idle
    for `QUIET_SECONDS` first, so a store in "batch" or "none" mode must have committed everything
    by then with nobody calling it. `kill_at` "write:N" (or "sync:N", "read:N") makes the disk
    tier's N-th such I/O call SIGKILL the process (`tierkv.tiers.disk.faults`): a crash at an
    exact point of the data path. `idle_after` stops working after that many operations: the idle store.
    `slow_writes` makes every data write take that long (a slow device), so write-backs finish
    after the call that queued them.
    """
    import random

    try:
        rng = random.Random(seed)
        store = open_fault_store(directory, durability=durability)
        from tierkv.tiers.disk import faults

        rules = []
        if kill_at:
            op, n = kill_at.split(":")
            rules.append(faults.Rule(op=op, action="kill", after=int(n)))
        if slow_writes:
            rules.append(faults.Rule(op="write", action="delay", seconds=slow_writes))
        faults.install(faults.FaultPlan(rules) if rules else None)
        conn.send("ready")
        known: set[bytes] = set()
        ops = 0
        while True:
            if idle_after is not None and ops >= idle_after:
                time.sleep(QUIET_SECONDS)
                quiet = True
            else:
                tokens = rng.choice(FAMILY)
                tokens = tokens[: rng.randint(1, len(tokens) // 4) * 4]
                store.put(tokens, kv_for(store.layout, tokens))
                if rng.random() < 0.3:
                    store.get(rng.choice(FAMILY))
                ops += 1
                quiet = rng.random() < 0.15
                if quiet:
                    time.sleep(QUIET_SECONDS)
            now = disk_keys(store)
            if known - now:
                raise AssertionError("a block left the disk tier, which the kill tests size never to evict")
            conn.send(([k.hex() for k in now - known], quiet))
            known = now
    except BaseException:
        import traceback

        conn.send(("error", traceback.format_exc()))
        raise


def run_writer(directory: Path, seed: int, durability: str, *, kill_after: float | None = None,
               kill_after_reports: int | None = None, kill_at: str | None = None, idle_after: int | None = None,
               slow_writes: float = 0.0, timeout: float = 120.0) -> WriterRun:
    """Run `writer_main` in a child until it dies by its own `kill_at`, or SIGKILL it `kill_after` s after
    it is ready or once it has sent `kill_after_reports` reports.

    In mode "every" a key is promised as soon as a report lists it; in "batch" and "none" once a
    quiet report (the store left idle for a while) comes after it.
    """
    ctx = forkserver()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=writer_main, daemon=True,
                       args=(str(directory), seed, durability, kill_at, idle_after, slow_writes, send))
    proc.start()
    send.close()
    run = WriterRun()
    pending: set[bytes] = set()
    start = None
    eof = False
    if kill_at is not None and kill_after is None:
        kill_after = timeout  # it must die of its own kill_at before this
    try:
        while True:
            if kill_after is not None and start is not None:
                wait = start + kill_after - time.monotonic()
                if wait <= 0 or not recv.poll(wait):
                    break
            elif not recv.poll(timeout):
                raise AssertionError(f"the writer sent nothing for {timeout} s")
            try:
                message = recv.recv()
            except EOFError:
                eof = True  # it died (of its kill_at, or of an error it could not report)
                break
            if message == "ready":
                start = time.monotonic()
                continue
            if message[0] == "error":
                run.error = message[1]
                break
            new, quiet = message
            run.reports += 1
            keys = {bytes.fromhex(k) for k in new}
            run.seen |= keys
            pending |= keys
            if durability == "every" or quiet:
                run.promised |= pending
                pending.clear()
            if kill_after_reports is not None and run.reports >= kill_after_reports:
                break
    finally:
        proc.join(timeout if eof else 0)
        if proc.exitcode is None:
            run.killed = True
            proc.kill()
        proc.join(timeout)
        recv.close()
    run.exitcode = proc.exitcode
    if start is None and run.error is None:
        run.error = f"the writer died before it was ready (exit {proc.exitcode})"
    return run


def reopen_and_check(directory: Path, *runs: WriterRun, seed: int) -> tuple[Verdict, int]:
    """After writers died: no wrong byte served, every promised block back bit-exact, the store usable.

    Each run's promises count only where the blocks before them were promised by the same run:
    a block that reached disk before its parent is an orphan if that life is killed, and the next
    open drops it, whatever a later life writes. Returns the verification figures and the promised
    bytes checked.
    """
    prefixes = key_prefixes()
    promised = set().union(*(prefix_closed(run.promised, prefixes) for run in runs))
    with open_fault_store(directory) as store:
        verdict = verify_served(store)
        checked = assert_promised(store, promised, prefixes)
        still_usable(store, seed)
    return verdict, checked
