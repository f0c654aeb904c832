"""The fault-injection suite, longer: kill -9 storms, crash points, damaged files, I/O faults, a full disk.

CI runs a few minutes of `tests/test_faults_*.py`; this runs the same pieces (`tests/_faults.py`)
for as long as asked and prints the figures docs/reliability.md quotes:

    python scripts/fault_soak.py                      # every section at its default size
    python scripts/fault_soak.py --kills 50 --points 40 --damage full --io 200 --json soak.json
    python scripts/fault_soak.py --only damage --damage full
    python scripts/fault_soak.py --only damage --damage full --damage-stride 8   # an eighth of it, spread evenly

Sections (each asks what every fault test asks: no wrong byte served, no crash, no exception but
a TierKVError, every block the durability mode promised back bit-exact, the store usable):

- kills: per durability mode, a writer child SIGKILLed at a random moment, reopened and verified.
- points: per mode, SIGKILL inside the disk tier's N-th data write and N-th fsync, N = 1..points.
- damage: the store's files damaged in turn (a sample, or `full`: every 64-byte range of the
  manifest, every page zeroed, a cut at every half page, every slot of the data file), each case
  opened in a child process.
- io: random fault plans (EIO / ENOSPC on reads, writes and fsyncs, on random byte ranges) under a
  workload, then a restart.
- enospc: a tmpfs filled up under the store (root only; skipped otherwise).

Exit status 1 when any case fails; the failures are listed.
"""

from __future__ import annotations

import argparse
import errno
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

import _faults  # noqa: E402
from conftest import kv_for  # noqa: E402

MODES = ("none", "batch", "every")


class Tally:
    """Figures of one section, and the failures found."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []
        self.start = time.monotonic()

    def fail(self, what: str, error: BaseException | str) -> None:
        text = error if isinstance(error, str) else "".join(traceback.format_exception_only(type(error), error)).strip()
        self.failures.append(f"{what}: {text}")
        print(f"  FAIL {what}: {text.splitlines()[0] if text else ''}", flush=True)

    def report(self) -> dict[str, Any]:
        return {"section": self.name, "seconds": round(time.monotonic() - self.start, 1), **self.counts,
                "failures": self.failures}


def soak_kills(work: Path, kills: int, seed: int) -> Tally:
    tally = Tally("kills")
    rng = random.Random(seed)
    for mode in MODES:
        directory = work / f"kills-{mode}"
        shutil.rmtree(directory, ignore_errors=True)
        for i in range(kills):
            what = f"kill {mode} #{i}"
            try:
                run = _faults.run_writer(directory, seed=rng.randrange(1 << 30), durability=mode,
                                         kill_after=rng.uniform(0.05, 2.0))
                if run.error:
                    tally.fail(what, run.error)
                    continue
                verdict, checked = _faults.reopen_and_check(directory, run, seed=i)
                tally.counts["kills survived"] += 1
                tally.counts[f"kills survived ({mode})"] += 1
                tally.counts["blocks promised"] += len(_faults.prefix_closed(run.promised, _faults.key_prefixes()))
                tally.counts["bytes verified"] += verdict.bytes + checked
            except Exception as e:
                tally.fail(what, e)
        print(f"  {mode}: {tally.counts[f'kills survived ({mode})']} of {kills} kills survived", flush=True)
    return tally


def soak_points(work: Path, points: int) -> Tally:
    tally = Tally("crash points")
    for mode in MODES:
        for op in ("write", "sync"):
            if mode == "none" and op == "sync":
                continue
            for n in range(1, points + 1):
                directory = work / f"points-{mode}-{op}-{n}"
                what = f"SIGKILL at {op} #{n}, durability={mode}"
                try:
                    first = _faults.run_writer(directory, seed=n, durability=mode, idle_after=4, kill_after_reports=5)
                    run = _faults.run_writer(directory, seed=1000 + n, durability=mode, kill_at=f"{op}:{n}", timeout=60)
                    if first.error or run.error:
                        tally.fail(what, first.error or run.error or "")
                        continue
                    if run.killed:  # the workload never reached that call in its time: not a crash point
                        tally.counts["points not reached"] += 1
                        continue
                    verdict, checked = _faults.reopen_and_check(directory, first, run, seed=n)
                    tally.counts["crash points survived"] += 1
                    tally.counts["bytes verified"] += verdict.bytes + checked
                except Exception as e:
                    tally.fail(what, e)
                finally:
                    shutil.rmtree(directory, ignore_errors=True)
        print(f"  {mode}: done", flush=True)
    return tally


def soak_damage(work: Path, full: bool, jobs: int, stride: int = 1) -> Tally:
    from concurrent.futures import ThreadPoolExecutor

    import test_faults_damage as damage

    tally = Tally("damage")
    pristine = work / "pristine"
    shutil.rmtree(pristine, ignore_errors=True)
    damage.build_store(pristine)
    cases = damage.damage_cases(pristine, full=full)[::stride]
    print(f"  {len(cases)} cases x (after a clean close, after a crash), {jobs} at a time", flush=True)

    def one(i: int, case: Any, clean: bool) -> tuple[Any, bool, Any]:
        try:
            return case, clean, damage.run_case(pristine, work / f"case-{i}", case, clean)
        except AssertionError as e:
            return case, clean, e
        finally:
            shutil.rmtree(work / f"case-{i}", ignore_errors=True)

    work_list = [(case, clean) for clean in (True, False) for case in cases]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = pool.map(lambda item: one(item[0], *item[1]), enumerate(work_list))
        for done, (case, clean, report) in enumerate(results, 1):
            what = f"{case.name} ({'clean close' if clean else 'crash'})"
            if isinstance(report, AssertionError):
                tally.fail(what, report)
                continue
            if done % 200 == 0:
                print(f"  {done} of {len(work_list)}", flush=True)
            if report is None:
                continue
            tally.counts["cases"] += 1
            if report["refused"]:
                tally.counts["refused: identity names another layout"] += 1
                continue
            tally.counts[f"manifest {report['manifest']}"] += 1
            tally.counts["bytes verified"] += report["bytes"]
            tally.counts["records dropped by recovery"] += report["dropped"]
            if case.file.startswith("data") and report["served"] < 24 * 12:
                tally.counts["data damage detected (fewer blocks served)"] += 1
    return tally


def _io_case(directory: str, seed: int) -> dict[str, Any]:
    """In a child: a workload under a random fault plan, then the plan lifted, the store settled and closed."""
    from tierkv.tiers.disk import faults

    rng = random.Random(seed)
    rules = []
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(faults.OPS)
        start = rng.randrange(0, 256) * 4096
        rules.append(faults.Rule(op=op, errno=rng.choice([errno.EIO, errno.ENOSPC]), start=start,
                                 stop=start + rng.randint(1, 16) * 4096 if rng.random() < 0.7 else None,
                                 after=rng.randint(1, 20), times=rng.choice([1, 3, 10, None])))
    plan = faults.FaultPlan(rules)
    store = _faults.open_fault_store(directory, durability=rng.choice(MODES), device=rng.randint(0, 3),
                                     host=rng.randint(1, 6))
    faults.install(plan)
    served = _faults.Verdict()
    for _ in range(60):
        tokens = rng.choice(_faults.FAMILY)
        tokens = tokens[: rng.randint(1, len(tokens) // 4) * 4]
        store.put(tokens, kv_for(store.layout, tokens))
        served += _faults.verify_served(store, [rng.choice(_faults.FAMILY)])
    faults.install(None)
    disk = _faults.settled(store).stats()["disk"]
    store.close()
    with _faults.open_fault_store(directory) as again:
        served += _faults.verify_served(again)
        _faults.still_usable(again, seed)
    return {"fired": plan.fired, "read_errors": disk["read_errors"], "write_errors": disk["write_errors"],
            "commit_failures": disk["commit_failures"], "bytes": served.bytes}


def soak_io(work: Path, cases: int, seed: int) -> Tally:
    tally = Tally("io faults")
    for i in range(cases):
        directory = work / f"io-{i}"
        result = _faults.run_in_child(_io_case, str(directory), seed * 1000 + i)
        shutil.rmtree(directory, ignore_errors=True)
        if result.crashed or result.error:
            tally.fail(f"io case {i}", result.error or f"exit {result.exitcode}")
            continue
        v = result.value
        tally.counts["cases"] += 1
        tally.counts["injections fired"] += v["fired"]
        tally.counts["faults counted by the store"] += v["read_errors"] + v["write_errors"] + v["commit_failures"]
        tally.counts["bytes verified"] += v["bytes"]
    print(f"  {tally.counts['cases']} cases", flush=True)
    return tally


def soak_enospc(work: Path, rounds: int) -> Tally:
    import test_faults_enospc as enospc

    tally = Tally("enospc")
    for i in range(rounds):
        where = work / f"fs-{i}"
        if not enospc._mount_tmpfs(where, "1536k"):
            tally.counts["skipped: cannot mount a tmpfs"] += 1
            break
        try:
            enospc.test_a_file_system_that_fills_up_under_the_store(where, work / f"enospc-{i}")
            tally.counts["full file systems survived"] += 1
        except Exception as e:
            tally.fail(f"enospc round {i}", e)
        finally:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
    return tally


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="random kills per durability mode")
    parser.add_argument("--points", type=int, default=12, help="crash points per mode and call kind")
    parser.add_argument("--damage", choices=["sample", "full"], default="sample")
    parser.add_argument("--io", type=int, default=30, help="random I/O fault plans")
    parser.add_argument("--enospc", type=int, default=3, help="full file systems")
    parser.add_argument("--only", choices=["kills", "points", "damage", "io", "enospc"], action="append")
    parser.add_argument("--jobs", type=int, default=2, help="damage cases run at a time")
    parser.add_argument("--damage-stride", type=int, default=1, metavar="N",
                        help="run every N-th damage case (full: 1673 cases x 2, an hour or more on 2 loaded cores)")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    sections = args.only or ["kills", "points", "damage", "io", "enospc"]
    work = Path(tempfile.mkdtemp(prefix="tierkv-soak-"))
    reports = []
    try:
        for name in sections:
            print(f"{name}:", flush=True)
            if name == "kills":
                tally = soak_kills(work, args.kills, args.seed)
            elif name == "points":
                tally = soak_points(work, args.points)
            elif name == "damage":
                tally = soak_damage(work, args.damage == "full", args.jobs, max(1, args.damage_stride))
            elif name == "io":
                tally = soak_io(work, args.io, args.seed)
            else:
                tally = soak_enospc(work, args.enospc)
            reports.append(tally.report())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\nsection        seconds  figures")
    for r in reports:
        figures = ", ".join(f"{k}: {v}" for k, v in r.items() if k not in ("section", "seconds", "failures"))
        print(f"{r['section']:<14} {r['seconds']:>7}  {figures}; failures: {len(r['failures'])}")
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2))
    failed = [f for r in reports for f in r["failures"]]
    for f in failed:
        print("FAIL", f)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
