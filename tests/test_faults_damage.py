"""Damaged files: byte ranges of the manifest, its lock file and the data file flipped, zeroed or cut off, in turn.

Each damaged copy is opened in a child process (`_faults.run_in_child`), so that a crash is a
finding and not a dead test run. Before the manifest was vetted, a damaged or truncated LMDB
file killed the process at open (SIGBUS, or SIGABRT from an LMDB assertion), every time. Now the
child must: open the store, serve no wrong byte, take new blocks, close, and open again cleanly.
The only refusal allowed is the one that protects the bytes: a flip inside the identity record
that still reads as another layout (`LayoutMismatchError`), which names the difference.

`scripts/fault_soak.py --only damage --damage full` runs every 64-byte range of every file; CI runs a sample.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _faults import FAMILY, open_fault_store, run_in_child, still_usable, verify_served
from conftest import kv_for

from tierkv.tiers.disk.vetting import MARK

PAGE = 4096


@dataclass(frozen=True)
class Damage:
    """One injury to one file: `kind` "flip" (xor 0xff), "zero" or "truncate", at `offset` for `length` bytes."""

    file: str  # relative to the store directory
    kind: str
    offset: int
    length: int = 8

    @property
    def name(self) -> str:
        return f"{self.file}:{self.kind}@{self.offset}+{self.length}"

    def apply(self, directory: Path) -> bool:
        """Damage the file; False when the offset is past its end (nothing to damage)."""
        path = directory / self.file
        size = path.stat().st_size
        if self.offset >= size:
            return False
        if self.kind == "truncate":
            os.truncate(path, self.offset)
            return True
        with path.open("r+b") as f:
            f.seek(self.offset)
            data = f.read(self.length)
            f.seek(self.offset)
            f.write(bytes(b ^ 0xFF for b in data) if self.kind == "flip" else bytes(len(data)))
        return True


def build_store(directory: Path) -> None:
    """The store every damage case starts from: FAMILY's 192 blocks, closed cleanly."""
    with open_fault_store(directory) as store:
        for tokens in FAMILY:
            store.put(tokens, kv_for(store.layout, tokens))


def open_damaged(directory: str) -> dict[str, Any]:
    """In a child: open the damaged store, verify what it serves, use it, close it, and open it again.

    A LayoutMismatchError (the identity record now names another layout) is the one refusal
    allowed; anything else that escapes is the finding the test reports.
    """
    from tierkv import LayoutMismatchError

    try:
        store = open_fault_store(directory)
    except LayoutMismatchError as e:
        return {"refused": str(e)}
    with store:
        disk = store.stats()["disk"]
        first = verify_served(store)
        still_usable(store, 0)
    with open_fault_store(directory) as store:
        again = store.stats()["disk"]
        second = verify_served(store)
    return {"refused": None, "manifest": disk["manifest_at_open"], "dropped": disk["recovery_dropped"],
            "corrupt": disk.get("corrupt", 0), "served": first.blocks, "bytes": first.bytes + second.bytes,
            "reopened": again["manifest_at_open"], "served_again": second.blocks}


def run_case(pristine: Path, work: Path, damage: Damage, clean: bool) -> dict[str, Any] | None:
    """Copy the pristine store, damage it, open it in a child; the child's report (None: nothing damaged)."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(pristine, work)
    if not clean:
        (work / MARK).unlink()  # as after a crash: the manifest is vetted in a child process
    if not damage.apply(work):
        return None
    result = run_in_child(open_damaged, str(work), timeout=120)
    assert not result.crashed, f"{damage.name}: the store's process died (exit {result.exitcode})"
    assert result.error is None, f"{damage.name}: {result.error}"
    report = result.value
    if report["refused"] is None:
        assert report["reopened"] == "clean", f"{damage.name}: the store did not close cleanly after healing"
        assert report["served_again"] >= 3, f"{damage.name}: the healed store lost what it was given after the fault"
    else:
        assert "layout or namespace" in report["refused"], report["refused"]
    return report


def damage_cases(pristine: Path, full: bool = False) -> list[Damage]:
    """Damage to every page of the manifest, to its lock file and to the data file.

    `full` (the soak): 8 bytes flipped at every 64-byte step of the manifest, each page zeroed,
    a cut at every page boundary and mid-page, 64 bytes flipped in every slot of the data file.
    Otherwise (CI) a sample: the two meta pages at their fields (magic, version, page size, root
    pointers, txnid), two places in every other page, three cuts, the lock file and the data file.
    """
    manifest = pristine / "manifest" / "data.mdb"
    size = manifest.stat().st_size
    data_size = (pristine / "data000.bin").stat().st_size
    m = "manifest/data.mdb"
    if full:
        cases = [Damage(m, "flip", o) for o in range(0, size, 64)]
        cases += [Damage(m, "zero", p, PAGE) for p in range(0, size, PAGE)]
        cases += [Damage(m, "truncate", o) for o in range(PAGE // 2, size, PAGE // 2)] + [Damage(m, "truncate", 0)]
        cases += [Damage("manifest/lock.mdb", "flip", o) for o in range(0, 8192, 64)]
        cases += [Damage("data000.bin", "flip", o, 64) for o in range(100, data_size, PAGE)]
        cases += [Damage("data000.bin", "truncate", o) for o in range(0, data_size, 16 * PAGE)]
        return cases
    cases = [Damage(m, "flip", p * PAGE + o) for p in (0, 1) for o in (0, 16, 24, 48, 128)]
    cases += [Damage(m, "flip", p * PAGE + o) for p in range(2, size // PAGE) for o in (16, PAGE // 2)]
    cases += [Damage(m, "truncate", o) for o in (100, 2 * PAGE, size - PAGE // 2)]
    cases += [Damage("manifest/lock.mdb", "flip", o) for o in (0, 128)]
    cases += [Damage("data000.bin", "flip", 4096 * 7 + 100, 64), Damage("data000.bin", "truncate", 4096 * 50 + 17)]
    return cases


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pristine") / "store"
    build_store(directory)
    assert (directory / MARK).exists(), "a clean close left no mark"
    return directory


@pytest.mark.parametrize("clean", [True, False], ids=["after-clean-close", "after-crash"])
def test_every_page_of_the_manifest_damaged_in_turn(pristine: Path, tmp_path: Path, clean: bool) -> None:
    cases = damage_cases(pristine)
    if not clean:
        cases = cases[::3]  # the same code path once the mark is gone; a third of the sample
    outcomes = {"served": 0, "refused": 0, "rebuilt": 0, "damaged": 0, "bytes": 0}
    for damage in cases:
        report = run_case(pristine, tmp_path / "work", damage, clean)
        if report is None:
            continue
        if report["refused"]:
            outcomes["refused"] += 1
            continue
        outcomes["served"] += report["served"]
        outcomes["bytes"] += report["bytes"]
        outcomes[report["manifest"]] = outcomes.get(report["manifest"], 0) + 1
    assert outcomes["damaged"] > 0, "no case damaged the manifest beyond reading: the sample missed its tree"
    assert outcomes["served"] > 0


def test_a_truncated_manifest_is_moved_aside_and_counted(pristine: Path, tmp_path: Path) -> None:
    """Before: SIGBUS at open, every time."""
    work = tmp_path / "work"
    shutil.copytree(pristine, work)
    os.truncate(work / "manifest" / "data.mdb", 3 * PAGE)
    result = run_in_child(open_damaged, str(work))
    assert not result.crashed and result.error is None, result.error or f"exit {result.exitcode}"
    assert result.value["manifest"] == "damaged"
    assert (work / "manifest.damaged" / "data.mdb").exists(), "the damaged manifest was not kept for inspection"
    with open_fault_store(work) as store:
        verify_served(store)
        assert store.stats()["disk"]["manifest_at_open"] == "clean"


def test_a_manifest_damaged_after_a_crash_is_rebuilt_from_what_can_be_read(pristine: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(pristine, work)
    (work / MARK).unlink()
    with open_fault_store(work) as store:  # nothing damaged: read whole in the child, rewritten, all kept
        disk = store.stats()["disk"]
        assert disk["manifest_at_open"] == "rebuilt"
        assert disk["recovered_blocks"] == 192 and disk["recovery_dropped"] == 0
        assert verify_served(store).blocks == 24 * 12
