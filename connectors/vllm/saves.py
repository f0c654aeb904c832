"""Saves off the engine's step: a worker thread gathers completed blocks out of vLLM's pages.

`wait_for_save` only enqueues; vLLM keeps a finished request's blocks until the connector reports
it "finished sending" (`request_finished` returns True for every request that had saves, and
`get_finished` reports it once its saves are done), and a preempted request's pending saves are
finished before vLLM reuses its pages (`handle_preemptions`). A queue that falls behind drops
new saves, counted: a lost save is a future miss, a stalled engine step is a cost every request
pays. On a GPU each save first waits for an event recorded on the engine's stream, so the gather
sees the KV the forward pass wrote. The save thread runs its CPU tensor ops on one core
(`_one_core_for_tensor_ops`), leaving the others to the engine.
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from .meta import SaveJob

log = logging.getLogger("tierkv.vllm")


def _one_core_for_tensor_ops() -> None:
    """Make the calling thread's CPU tensor ops single-threaded (the save thread's initializer).

    torch splits a large CPU copy over an OpenMP team as wide as the machine. From the save thread
    that team competes with the engine's own for the same cores: on the 2-core CPU machine, a step
    thread waiting for a core while a save copied woke up to 16 ms late, against 3-5 ms with the
    save thread on one core and 3 ms with no save at all (`scripts/save_thread_probe.py`). An
    OpenMP thread count is per thread, so no other thread's changes. torch sets a thread's count
    (to the process's `torch.set_num_threads`) the first time the thread asks for it, so this asks
    first. Every OpenMP runtime loaded is told, not only the first one the linker finds: wheels
    bundle their own (sentencepiece's libgomp sits beside torch's).
    """
    torch.get_num_threads()
    for set_threads in _openmp_thread_setters():
        set_threads(1)


def _openmp_thread_setters() -> list[Callable[[int], None]]:
    """`omp_set_num_threads` of each OpenMP runtime mapped into this process (Linux), else the linker's first."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    mapped = {line.split()[-1] for line in maps.splitlines() if line.strip()}
    paths = sorted(p for p in mapped if p.startswith("/") and re.search(r"/lib[gi]?omp[^/]*\.so", p))
    setters = []
    libs: list[str | None] = [*paths] or [None]  # None: the symbol the dynamic linker finds first
    for lib in libs:
        try:
            fn = getattr(ctypes.CDLL(lib), "omp_set_num_threads", None)
        except OSError:
            continue
        if fn is not None:
            setters.append(fn)
    return setters


class SaveQueue:
    """Pending saves of one worker, by request."""

    def __init__(self, save: Callable[[SaveJob], None], device: Callable[[], torch.device | None], limit: int) -> None:
        self._save = save
        self._device = device
        self._limit = limit
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tierkv-save",
                                        initializer=_one_core_for_tensor_ops)
        self._lock = threading.Lock()
        self._pending: dict[str, list[Future[None]]] = {}  # req_id -> saves not yet known done
        self._had_saves: set[str] = set()  # requests the scheduler keeps blocks for until reported
        self._finishing: set[str] = set()  # finished requests waiting for their saves
        self._queued = 0
        self._stream: torch.cuda.Stream | None = None
        self.dropped = 0

    def submit(self, jobs: Iterable[SaveJob]) -> None:
        """Queue this step's saves; never waits for the disk or the copy."""
        device = self._device()
        event = None
        if device is not None and device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
        for job in jobs:
            with self._lock:
                self._had_saves.add(job.req_id)
                if self._queued >= self._limit:
                    self.dropped += 1
                    log.warning("tierkv: save queue full (%d jobs); the blocks of request %s are not stored", self._limit,
                                job.req_id)
                    continue
                self._queued += 1
                future = self._pool.submit(self._run, job, event)
                kept = [f for f in self._pending.get(job.req_id, ()) if not f.done()]
                self._pending[job.req_id] = [*kept, future]

    def _run(self, job: SaveJob, event: torch.cuda.Event | None) -> None:
        try:
            if event is None:
                self._save(job)
                return
            device = self._device()
            assert device is not None
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=device)
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(event)
                self._save(job)
            self._stream.synchronize()
        except Exception:  # a failed save is a future miss, never a failed engine step
            log.exception("tierkv: saving the blocks of request %s failed", job.req_id)
        finally:
            with self._lock:
                self._queued -= 1

    def wait(self, req_ids: Iterable[str]) -> None:
        """Finish the pending saves of `req_ids` (preempted: vLLM is about to reuse their pages)."""
        for req_id in req_ids:
            with self._lock:
                futures = list(self._pending.get(req_id, ()))
            for future in futures:
                future.result()

    def finished(self, finished_req_ids: Iterable[str]) -> set[str]:
        """Requests, among those that finished now or before, whose saves are all done: vLLM may free their blocks."""
        with self._lock:
            self._finishing.update(r for r in finished_req_ids if r in self._had_saves)
            done = set()
            for req_id in self._finishing:
                futures = self._pending.get(req_id, [])
                if all(f.done() for f in futures):
                    done.add(req_id)
            for req_id in done:
                self._finishing.discard(req_id)
                self._had_saves.discard(req_id)
                self._pending.pop(req_id, None)
            return done

    def drain(self) -> None:
        """Wait for every queued save."""
        with self._lock:
            futures = [f for fs in self._pending.values() for f in fs]
        for future in futures:
            future.exception()

    def close(self) -> None:
        self.drain()
        self._pool.shutdown(wait=True)
