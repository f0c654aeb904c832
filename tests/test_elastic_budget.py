"""The shared GPU budget on its own: joining, taking and giving back, asking others, dead members.

Cross-process cases run real subprocesses (this file, run as a script) against the same shared
memory file. Run as `python test_elastic_budget.py hold|churn ...` it is that subprocess.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import spawn

from tierkv import ConfigError
from tierkv.tiers.elastic import budget as budget_mod
from tierkv.tiers.elastic.budget import (
    BudgetError,
    BudgetMember,
    BudgetRow,
    budget_path,
    list_budgets,
    process_start,
    read_budget,
)

UNIT = 4096
HERE = Path(__file__).resolve()


def member(name: str, total: int, min_bytes: int = 0, max_bytes: int = 64 * UNIT, label: str = "m") -> BudgetMember:
    return BudgetMember(name, total, label, min_bytes, max_bytes)


def child(*args: str) -> subprocess.Popen[str]:
    """This file run as a script in a child process."""
    return spawn(HERE, *args)


# -- joining and leaving -------------------------------------------------------------------------


def test_join_writes_a_row_and_the_last_member_removes_the_file(name: str) -> None:
    a = member(name, 10 * UNIT, 2 * UNIT, 8 * UNIT, label="model-a")
    b = member(name, 10 * UNIT, 3 * UNIT, label="model-b")
    assert budget_path(name).exists() and name in list_budgets()
    snap = read_budget(name)
    assert snap.total_bytes == 10 * UNIT and snap.held_bytes == 0 and snap.free_bytes == 10 * UNIT
    rows = {m.label: m for m in snap.members}
    assert rows["model-a"].pid == os.getpid() and rows["model-a"].alive
    assert (rows["model-a"].min_bytes, rows["model-a"].max_bytes, rows["model-a"].target_bytes) == (2 * UNIT, 8 * UNIT, None)
    a.leave()
    assert [m.label for m in read_budget(name).members] == ["model-b"]
    b.leave()
    b.leave()  # idempotent
    assert not budget_path(name).exists()


def test_minimums_that_cannot_all_be_promised_are_refused(name: str) -> None:
    a = member(name, 10 * UNIT, 6 * UNIT)
    with pytest.raises(BudgetError, match=r"device_min_bytes=20480 cannot be promised.* already take 24576"):
        member(name, 10 * UNIT, 5 * UNIT)
    assert len(read_budget(name).members) == 1
    a.leave()
    with pytest.raises(BudgetError, match="cannot be promised"):
        member(name, 10 * UNIT, 11 * UNIT, 20 * UNIT)
    assert not budget_path(name).exists()  # a refused first member leaves no file behind


def test_members_must_agree_on_the_total(name: str) -> None:
    a = member(name, 10 * UNIT)
    with pytest.raises(BudgetError, match=r"holds 40960 bytes .* gpu_budget_bytes=81920"):
        member(name, 20 * UNIT)
    a.leave()
    b = member(name, 20 * UNIT)  # no live member left: the new size wins
    assert read_budget(name).total_bytes == 20 * UNIT
    b.leave()


def test_bad_names_sizes_and_files_are_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="gpu_budget_name"):
        member("no/slash", UNIT)
    with pytest.raises(BudgetError, match="above the tier's maximum"):
        member(name, 10 * UNIT, 5 * UNIT, 4 * UNIT)
    with pytest.raises(BudgetError, match="no GPU budget named"):
        read_budget(name)
    budget_path(name).write_bytes(b"something else entirely" * 1000)
    with pytest.raises(BudgetError, match="not a tierkv budget file"):
        member(name, UNIT)
    with pytest.raises(BudgetError, match="not a tierkv budget file"):
        read_budget(name)


def test_a_full_table_is_refused(name: str) -> None:
    members = [member(name, 100 * UNIT) for _ in range(budget_mod.MAX_MEMBERS)]
    with pytest.raises(BudgetError, match="already has 64 live members"):
        member(name, 100 * UNIT)
    for m in members:
        m.leave()


# -- taking and giving back ----------------------------------------------------------------------


def test_acquire_grants_whole_units_up_to_max_and_free(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(budget_mod, "SHRINK_WAIT_S", 0.05)
    a = member(name, 10 * UNIT, max_bytes=6 * UNIT)
    b = member(name, 10 * UNIT)
    assert a.acquire(3 * UNIT + 100, UNIT) == 3 * UNIT
    assert a.acquire(10 * UNIT, UNIT) == 3 * UNIT  # capped by its max
    assert a.acquire(UNIT, UNIT) == 0
    assert b.acquire(10 * UNIT, UNIT) == 4 * UNIT  # what is free: a was asked to shrink but did not act
    assert a.pending_target() == 0 and read_budget(name).free_bytes == 0
    a.release(2 * UNIT)
    assert a.held_bytes() == 4 * UNIT and read_budget(name).free_bytes == 2 * UNIT
    with pytest.raises(AssertionError, match="only 16384 are held"):
        a.release(5 * UNIT)
    a.leave()
    b.leave()


def test_shortfall_asks_the_member_furthest_above_its_minimum(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(budget_mod, "SHRINK_WAIT_S", 0.2)
    monkeypatch.setattr(budget_mod, "GROW_STEP_PAGES", 1)
    far = member(name, 12 * UNIT, min_bytes=1 * UNIT, label="far")
    near = member(name, 12 * UNIT, min_bytes=2 * UNIT, label="near")
    assert far.acquire(6 * UNIT, UNIT) == 6 * UNIT  # 5 above its minimum
    assert near.acquire(4 * UNIT, UNIT) == 4 * UNIT  # 2 above
    me = member(name, 12 * UNIT, label="me")
    # 2 units free, 5 wanted: far is asked for the 3 missing; nobody acts, so after the wait
    # only the free 2 are granted.
    start = time.monotonic()
    assert me.acquire(5 * UNIT, UNIT) == 2 * UNIT
    assert time.monotonic() - start >= 0.2
    assert far.pending_target() == 3 * UNIT and near.pending_target() is None
    # far acts: gives 3 back and settles; the next acquire gets them without asking.
    far.release(3 * UNIT)
    far.settle(3 * UNIT)
    assert far.pending_target() is None
    assert me.acquire(3 * UNIT, UNIT) == 3 * UNIT
    # Nobody is ever asked below its minimum: far is at 3 (min 1), near at 4 (min 2).
    assert me.acquire(10 * UNIT, UNIT) == 0
    targets = {m.label: m.target_bytes for m in read_budget(name).members}
    assert targets == {"far": 1 * UNIT, "near": 2 * UNIT, "me": None}
    for m in (far, near, me):
        m.leave()


def test_a_member_asked_to_shrink_does_not_grow_past_its_target(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(budget_mod, "SHRINK_WAIT_S", 0.05)
    a = member(name, 10 * UNIT)
    b = member(name, 10 * UNIT)
    a.acquire(8 * UNIT, UNIT)
    b.acquire(4 * UNIT, UNIT)  # 2 free: a is asked for at least GROW_STEP_PAGES units, i.e. all it holds
    target = a.pending_target()
    assert target == 0
    assert a.acquire(UNIT, UNIT) == 0
    a.release(8 * UNIT - target)
    a.settle(target + 1)  # a request other than the pending one is not cleared
    assert a.pending_target() == target
    a.settle(target)
    assert a.acquire(UNIT, UNIT) == UNIT
    a.leave()
    b.leave()


def test_a_member_asked_to_shrink_neither_asks_nor_waits(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(budget_mod, "SHRINK_WAIT_S", 0.05)
    monkeypatch.setattr(budget_mod, "GROW_STEP_PAGES", 1)
    a = member(name, 8 * UNIT, label="a")
    b = member(name, 8 * UNIT, label="b")
    a.acquire(6 * UNIT, UNIT)
    b.acquire(2 * UNIT, UNIT)
    assert a.acquire(2 * UNIT, UNIT) == 0  # nothing free: b is asked for 2 (it does not act)
    assert b.pending_target() == 0
    monkeypatch.setattr(budget_mod, "SHRINK_WAIT_S", 30.0)  # a wait would now show
    start = time.monotonic()
    assert b.acquire(4 * UNIT, UNIT) == 0  # b, asked itself, does not ask a back nor wait for it
    assert time.monotonic() - start < 5 and a.pending_target() is None
    a.leave()
    b.leave()


def test_a_waiting_member_is_answered_by_a_local_member_at_once(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Members of one process are asked by a direct call, not by polling, when their lock is free."""
    monkeypatch.setattr(budget_mod, "SHRINK_WAIT_S", 30.0)  # a poll-based answer would take this long
    victim = member(name, 8 * UNIT)
    victim.acquire(8 * UNIT, UNIT)
    calls = []

    def give_back(blocking: bool) -> bool:
        calls.append(blocking)
        target = victim.pending_target()
        victim.release(victim.held_bytes() - target)
        victim.settle(target)
        return True

    victim._on_request = give_back
    taker = member(name, 8 * UNIT)
    start = time.monotonic()
    assert taker.acquire(3 * UNIT, UNIT) == 3 * UNIT
    assert time.monotonic() - start < 5 and calls == [False]
    assert victim.held_bytes() == 0  # asked for GROW_STEP_PAGES units: everything above its minimum
    victim.leave()
    taker.leave()


# -- dead members --------------------------------------------------------------------------------


def test_process_start_tells_live_dead_and_zombie_processes_apart() -> None:
    assert isinstance(process_start(os.getpid()), int)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert process_start(proc.pid) is not None
        proc.kill()
        deadline = time.monotonic() + 10
        while process_start(proc.pid) is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert process_start(proc.pid) is None  # a zombie until waited for: dead all the same
    finally:
        proc.wait()
    assert process_start(proc.pid) is None


def test_budget_of_a_killed_process_is_reclaimed(name: str) -> None:
    proc = child("hold", name, str(10 * UNIT), str(7 * UNIT))
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        snap = read_budget(name)
        assert [(m.pid, m.held_bytes, m.alive) for m in snap.members] == [(proc.pid, 7 * UNIT, True)]
        me = member(name, 10 * UNIT)
        assert me.acquire(10 * UNIT, UNIT) == 3 * UNIT  # the child holds the rest and is alive
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while process_start(proc.pid) is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        dead = [m for m in read_budget(name).members if m.pid == proc.pid]
        assert dead and not dead[0].alive  # shown dead, not yet cleared: reading changes nothing
        assert me.acquire(10 * UNIT, UNIT) == 7 * UNIT  # its row is cleared and its share is ours
        assert [m.pid for m in read_budget(name).members] == [os.getpid()]
        me.leave()
        assert not budget_path(name).exists()
    finally:
        proc.kill()
        proc.wait()


def test_total_never_exceeds_the_budget_with_processes_racing(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process and a child take and give back random amounts of one budget at the same time."""
    monkeypatch.setattr(budget_mod, "SHRINK_WAIT_S", 0.01)
    total = 12 * UNIT
    proc = child("churn", name, str(total), "1", "2.0")
    try:
        assert proc.stdout.readline().strip() == "joined", proc.stderr.read()
        rng = random.Random(0)
        me = member(name, total, max_bytes=total)
        held = grants = 0
        while proc.poll() is None:
            held, got = _churn_step(me, rng, held)
            grants += got > 0
            assert read_budget(name).held_bytes <= total
        out, err = proc.communicate()
        assert proc.returncode == 0, err
        assert int(out.split()[-1]) > 10 and grants > 10  # both really took budget, many times
        me.release(held)
        assert read_budget(name).held_bytes == 0
        me.leave()
    finally:
        proc.kill()
        proc.wait()


# -- the row record ------------------------------------------------------------------------------

# The layout every process sharing a table agrees on, written out here independently of the module:
# pid, start time, min, max, held, target, used, hits, lookups, blocks, demoted, updated, label.
ROW_LAYOUT = "<qQQQQQQQQQQd48s"


def test_row_record_round_trips_every_field_through_the_shared_byte_layout() -> None:
    record = BudgetRow(pid=-2, start=3, min_bytes=5, max_bytes=7, held_bytes=11, target_bytes=13, used_bytes=17,
                       hits=19, lookups=23, blocks=29, demoted_bytes=31, updated=37.5, label="modèle-a".encode())
    data = record.pack()
    assert len(data) == BudgetRow.SIZE == struct.calcsize(ROW_LAYOUT) == 144
    assert data == struct.pack(ROW_LAYOUT, -2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37.5, "modèle-a".encode())
    assert BudgetRow.unpack(data) == record
    for field in BudgetRow.__dataclass_fields__:  # each field in its own slot: changing one changes only it
        changed = {"updated": 99.25, "label": b"x" * 48, "target_bytes": None}.get(field, 2**62 + 1)
        other = BudgetRow(**{**{f: getattr(record, f) for f in BudgetRow.__dataclass_fields__}, field: changed})
        assert BudgetRow.unpack(other.pack()) == other and getattr(BudgetRow.unpack(other.pack()), field) == changed
    buf = bytearray(b"\xff" * (3 * BudgetRow.SIZE))
    record.pack_into(buf, BudgetRow.SIZE)
    assert BudgetRow.unpack(buf, BudgetRow.SIZE) == record and buf[:BudgetRow.SIZE] == b"\xff" * BudgetRow.SIZE


def test_row_record_sentinels_empty_row_and_label_padding() -> None:
    pending = BudgetRow(pid=1, target_bytes=None)
    assert struct.unpack(ROW_LAYOUT, pending.pack())[5] == budget_mod.NO_REQUEST  # no request: all ones on disk
    assert BudgetRow.unpack(struct.pack(ROW_LAYOUT, 1, 0, 0, 0, 0, 2**64 - 1, 0, 0, 0, 0, 0, 0.0, b"")).target_bytes is None
    assert BudgetRow().pack() == bytes(BudgetRow.SIZE) and not BudgetRow().in_use  # a free row is all zeros
    assert BudgetRow.unpack(bytes(BudgetRow.SIZE)) == BudgetRow()
    raw = struct.pack(ROW_LAYOUT, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12.0, b"short")
    assert BudgetRow.unpack(raw).label == b"short" and BudgetRow.unpack(raw).pack() == raw  # padding dropped and restored
    assert BudgetRow(label=b"y" * 48).pack().endswith(b"y" * 48)
    with pytest.raises(ValueError, match="at most 48 bytes"):
        BudgetRow(label=b"y" * 49).pack()
    assert BudgetRow(held_bytes=9, target_bytes=None).ceiling == 9 and BudgetRow(held_bytes=9, target_bytes=4).ceiling == 4
    state = BudgetRow(pid=0, label="é".encode()[:1], target_bytes=None, used_bytes=3).state(5)
    assert (state.row, state.label, state.target_bytes, state.used_bytes, state.alive) == (5, "\ufffd", None, 3, False)


def test_rows_in_the_file_are_the_records_members_write(name: str) -> None:
    a = member(name, 10 * UNIT, UNIT, 8 * UNIT, label="a" * 60)  # the label is cut to the field
    assert a.acquire(3 * UNIT, UNIT) == 3 * UNIT
    a.publish(1, 2, 3, 4, 5)  # lock-free writes at fixed offsets of the row
    with open(budget_path(name), "rb") as f:
        data = f.read()
    offset = budget_mod._HEADER.size + a.row * BudgetRow.SIZE
    record = BudgetRow.unpack(data, offset)
    assert (record.pid, record.start) == (os.getpid(), process_start(os.getpid()))
    assert (record.min_bytes, record.max_bytes, record.held_bytes, record.target_bytes) == (UNIT, 8 * UNIT, 3 * UNIT, None)
    assert (record.used_bytes, record.hits, record.lookups, record.blocks, record.demoted_bytes) == (1, 2, 3, 4, 5)
    assert record.label == b"a" * 48 and abs(record.updated - time.time()) < 60
    assert record.state(a.row) == read_budget(name).members[0]
    a.leave()


# -- subprocess entry points -------------------------------------------------------------------


def _hold(name: str, total: str, nbytes: str) -> None:
    m = BudgetMember(name, int(total), "holder", 0, int(total))
    assert m.acquire(int(nbytes), UNIT) == int(nbytes)
    print("ready", flush=True)
    time.sleep(120)


def _churn_step(m: BudgetMember, rng: random.Random, held: int) -> tuple[int, int]:
    """Give back or take a random amount, then honour a shrink request as a store would."""
    got = 0
    if held and rng.random() < 0.5:
        give = rng.randint(1, held // UNIT) * UNIT
        m.release(give)
        held -= give
    else:
        got = m.acquire(rng.randint(1, 6) * UNIT, UNIT)
        held += got
    target = m.pending_target()
    if target is not None:
        if held > target:
            m.release(held - target)
            held = target
        m.settle(target)
    return held, got


def _churn(name: str, total: str, seed: str, seconds: str) -> None:
    rng = random.Random(int(seed))
    m = BudgetMember(name, int(total), f"churn-{seed}", 0, int(total))
    print("joined", flush=True)
    budget_mod.SHRINK_WAIT_S = 0.01
    held = grants = 0
    end = time.monotonic() + float(seconds)
    while time.monotonic() < end:
        held, got = _churn_step(m, rng, held)
        grants += got > 0
        assert read_budget(name).held_bytes <= int(total)
    m.release(held)
    m.leave()
    print("grants", grants)


if __name__ == "__main__":
    {"hold": _hold, "churn": _churn}[sys.argv[1]](*sys.argv[2:])
