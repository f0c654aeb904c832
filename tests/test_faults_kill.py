"""kill -9 in every durability mode: at random moments, at exact I/O calls, and of an idle store.

After each kill the directory is reopened and asked what `_faults` asks after every fault: no
wrong byte served, every block the mode promised back bit-exact (in "every": each block on disk
once the call that put it there returned; in "batch" and "none": each block on disk once the store
has been idle a moment), and the store still usable. `scripts/fault_soak.py` runs more of the same.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from _faults import key_prefixes, open_fault_store, prefix_closed, reopen_and_check, run_writer

MODES = ["none", "batch", "every"]


@pytest.mark.parametrize("durability", ["batch", "none"])
def test_an_idle_store_killed_keeps_every_block_it_wrote(tmp_path: Path, durability: str) -> None:
    """The write-behind completions of the last call are committed without waiting for another call.

    Before: the manifest was committed only by the next API call, so an idle store killed with
    -9 lost the blocks of its last calls (0-18 of 20 kept over 7 runs). A slow device (each data
    write takes 20 ms) makes sure the last write-backs finish after the call that queued them.
    """
    run = run_writer(tmp_path, seed=7, durability=durability, idle_after=20, kill_after_reports=22, slow_writes=0.02)
    assert run.error is None, run.error
    promised = prefix_closed(run.promised, key_prefixes())
    assert len(promised) > 20, "the writer never got blocks down to disk"
    with open_fault_store(tmp_path) as store:
        lost = [k for k in promised if k not in store.index.blocks]
        assert not lost, f"{len(lost)} of {len(promised)} blocks on disk before the idle kill are gone"
    reopen_and_check(tmp_path, run, seed=7)


@pytest.mark.parametrize("durability", MODES)
def test_kill_at_random_moments_keeps_what_was_promised(tmp_path: Path, durability: str) -> None:
    rng = random.Random(durability)
    promised = 0
    for i in range(4):
        run = run_writer(tmp_path, seed=100 + i, durability=durability, kill_after=rng.uniform(0.1, 1.5))
        assert run.error is None, run.error
        assert run.exitcode == -9
        reopen_and_check(tmp_path, run, seed=i)
        promised = max(promised, len(run.promised))
    assert promised > 0, "no run ever promised a block: the kills came too early to test anything"


@pytest.mark.parametrize("durability", MODES)
@pytest.mark.parametrize("point", ["write:1", "write:3", "write:8", "sync:2", "sync:5"])
def test_kill_at_an_exact_io_call_keeps_what_was_promised(tmp_path: Path, durability: str, point: str) -> None:
    """SIGKILL inside the disk tier's N-th data write or sync: between payload and fsync, fsync and commit."""
    if durability == "none" and point.startswith("sync"):
        pytest.skip("durability='none' never syncs")
    # A first life fills the disk tier a little, so that the killed one has promises to keep.
    first = run_writer(tmp_path, seed=1, durability=durability, idle_after=6, kill_after_reports=7)
    assert first.error is None, first.error
    run = run_writer(tmp_path, seed=2, durability=durability, kill_at=point, timeout=60)
    assert run.error is None, run.error
    assert run.exitcode == -9 and not run.killed, f"the writer never reached {point} (exit {run.exitcode})"
    reopen_and_check(tmp_path, first, run, seed=3)
