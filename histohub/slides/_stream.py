"""The patches of a cohort as one stream: slides prepared one ahead, read in batches by
reader threads (or DataLoader processes) slide after slide, and run through the model in
full batches that cross slide boundaries.

Why across slides: on a CPU a batch of 10 patches costs far more per patch than a batch of
32, and a cohort of small slides is mostly such short tails (each slide's last batch); with
one model batch per slide boundary the cohort ran at 0.85x the model alone
(``benchmarks/bench_slides.py``). Reader batches stay one slide's each, aligned to the
batch size, so a resumed file restarts where an uninterrupted run would; only the model's
batches mix slides, and every feature goes back to the batch it came from.

- ``Schedule``: prepares job ``i`` (and the next) in one background thread, on demand.
- ``reader_stream`` / ``worker_stream``: ``Batch`` after ``Batch`` in job order.
- ``CrossBatcher``: rows of consecutive batches -> the model in batches of ``batch_size``
  -> batches handed back complete, in order.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from histohub.errors import HistohubError
from histohub._features import PREFETCH_BATCHES, interleave, prefetch
from histohub.slides._batches import BatchReader, ChunkRead, ChunkReader, as_is


@dataclass
class Batch:
    """One reader batch of one job: uint8 ``pixels`` ``(b, S, S, 3)`` of the grid positions
    ``ok`` ``(b,)``, the positions ``failed`` to decode, ``positions`` the range it covers.

    ``unit`` is what the job's preparation returned (or the ``HistohubError`` it raised). A
    job with nothing to read (done, failed, empty grid) gives one ``Batch`` with
    ``positions=None``. ``features`` ``(b, D)`` is set by ``CrossBatcher``.
    """

    slot: int
    unit: Any
    positions: range | None = None
    pixels: Any = None
    ok: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    failed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    features: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return len(self.ok)

    @property
    def last(self) -> bool:
        """Whether this is the job's last batch."""
        ranges = getattr(self.unit, "ranges", None)
        return self.positions is None or not ranges or self.positions == ranges[-1]


class Schedule:
    """Prepares ``jobs[i]`` in a background thread when asked, and ``jobs[i + 1]`` with it.

    ``prepare(job)`` returns a unit; a unit with a ``ranges`` attribute (grid ranges to read)
    and a ``grid`` is read, anything else passes as one empty ``Batch``. A ``HistohubError``
    it raises becomes the unit. ``close()`` cancels what has not started and hands every
    prepared unit to ``release``. ``finished(i)`` forgets job ``i``'s unit once it has been
    consumed, so a cohort holds the units of the jobs in flight, not of every job so far.
    """

    def __init__(self, pool: ThreadPoolExecutor, jobs: Sequence[Any],
                 prepare: Callable[[Any], Any], release: Callable[[Any], None]) -> None:
        self._pool, self._jobs, self._prepare, self._release = pool, jobs, prepare, release
        self._futures: list[Future | None] = [None] * len(jobs)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._jobs)

    def start(self, i: int = 0) -> None:
        """Submit ``jobs[i]`` and ``jobs[i + 1]`` unless already submitted."""
        with self._lock:
            for j in range(i, min(i + 2, len(self._jobs))):
                if self._futures[j] is None:
                    self._futures[j] = self._pool.submit(self._prepare, self._jobs[j])

    def get(self, i: int) -> Any:
        self.start(i)
        try:
            return self._futures[i].result()
        except HistohubError as error:
            return error

    def settle(self) -> None:
        """Wait until no submitted job is still being prepared (its thread then holds no
        lock: an import's, OpenSlide's, a tile's being decoded)."""
        with self._lock:
            futures = [future for future in self._futures if future is not None]
        wait(futures)

    def finished(self, i: int) -> None:
        """Job ``i``'s batches have all been consumed: release its unit and keep only its
        batch count, for reader threads that still have to count past it. Without this a
        run held every slide's grid to the end (its mask alone up to 4096 x 4096 bytes):
        gigabytes over a cohort of thousands of slides."""
        with self._lock:
            future = self._futures[i]
            if future is None or not future.done() or future.cancelled():
                return  # one still being prepared has not been consumed
            error = future.exception()
            if error is not None and not isinstance(error, HistohubError):
                return  # raised in the consumer already
            unit = error or future.result()
            if isinstance(unit, _Spent):
                return
            spent: Future = Future()
            spent.set_result(_Spent(len(getattr(unit, "ranges", None) or [None])))
            self._futures[i] = spent
        if error is None:  # an error's traceback is dropped with it
            self._release(unit)

    def close(self) -> None:
        with self._lock:
            futures, self._futures = self._futures, [None] * len(self._jobs)
        for future in futures:
            if future is None or future.cancel():
                continue
            try:
                unit = future.result()
            except BaseException:  # noqa: BLE001 - nothing was left open by a failed prepare
                continue
            if not isinstance(unit, _Spent):
                self._release(unit)


@dataclass(frozen=True)
class _Spent:
    """What a finished job leaves in its ``Schedule``: how many batches it had."""

    batches: int


def _units(schedule: Schedule) -> Iterator[tuple[int, Any, list[range | None]]]:
    for slot in range(len(schedule)):
        unit = schedule.get(slot)
        yield slot, unit, list(getattr(unit, "ranges", None) or [None])


def reader_stream(schedule: Schedule, *, threads: int, interpolation: str,
                  allocate: Callable[[tuple[int, ...]], np.ndarray] | None = None
                  ) -> Iterator[Batch]:
    """Every job's batches in order, read ``PREFETCH_BATCHES`` ahead of the consumer by
    ``threads`` reader threads: the k-th batch of the stream (counted across jobs) is read
    by thread ``k % threads``, each with its own slide handle."""
    depth = max(1, PREFETCH_BATCHES // threads)
    return interleave([prefetch(_thread_batches(schedule, k, threads, interpolation, allocate),
                                depth=depth) for k in range(threads)])


def _thread_batches(schedule: Schedule, k: int, threads: int, interpolation: str,
                    allocate: Callable | None) -> Iterator[Batch]:
    count = 0
    for slot, unit, ranges in _units(schedule):
        if isinstance(unit, _Spent):  # consumed already, so none of its batches is ours
            count += unit.batches
            continue
        reader = None
        try:
            for positions in ranges:
                if count % threads == k:
                    if positions is None:
                        yield Batch(slot, unit)
                    else:
                        # the first thread reads with the handle that tiled the slide
                        take = getattr(unit, "take_slide", None) if k == 0 else None
                        reader = reader or BatchReader(unit.grid, interpolation=interpolation,
                                                       allocate=allocate,
                                                       slide=take() if take else None)
                        yield Batch(slot, unit, positions, *reader.read(positions))
                count += 1
        finally:
            if reader is not None:
                reader.close()


def worker_stream(schedule: Schedule, *, num_workers: int, interpolation: str,
                  pin_memory: bool) -> Iterator[Batch]:
    """Every job's batches in order, read by ``num_workers`` DataLoader worker processes
    started once for the whole stream (``ChunkReader``: each keeps the slide it reads from
    open, with its own tile cache). A worker reads up to ``WORKER_CHUNK`` consecutive
    batches of one job as one item (``worker_chunks``).

    A DataLoader per slide would start its workers anew for every slide, 0.3-0.6 s each
    time: a cohort of small slides read 3x slower that way than with one reader thread.

    The workers are forked once the jobs already submitted are prepared: a worker forked
    while the preparing thread held a lock (it was importing PIL) waited on it forever.
    """
    import sys

    schedule.start()
    schedule.settle()

    planned: deque[tuple[int, Any, list[range] | None]] = deque()  # the items, in order

    def items() -> Iterator[ChunkRead]:  # pulled by the DataLoader in this thread
        for slot, unit, ranges in _units(schedule):
            if ranges == [None]:
                planned.append((slot, unit, None))
                yield ChunkRead(slot, None, np.zeros(0, np.int64), np.zeros((0, 2), np.int64))
                continue
            for chunk in worker_chunks(ranges, num_workers):
                planned.append((slot, unit, chunk))
                positions = np.arange(chunk[0].start, chunk[-1].stop, dtype=np.int64)
                yield ChunkRead.of(slot, unit.grid, positions)

    loader = torch.utils.data.DataLoader(
        ChunkReader(interpolation), batch_size=None, sampler=_Once(items()),
        num_workers=num_workers, pin_memory=pin_memory, collate_fn=as_is,
        # one item ahead a worker (up to WORKER_CHUNK batches): with two, two workers read
        # the large benchmark slide at 0.81x the patches/s (1 worker: the same)
        prefetch_factor=1,
        multiprocessing_context="spawn" if sys.platform == "darwin" else None)
    for read in loader:
        slot, unit, chunk = planned.popleft()
        if chunk is None:
            yield Batch(slot, unit)
            continue
        pixels, ok, failed = read
        for positions in chunk:  # the item back into its batches
            a, b = np.searchsorted(ok, [positions.start, positions.stop])
            f, g = np.searchsorted(failed, [positions.start, positions.stop])
            yield Batch(slot, unit, positions, pixels[a:b], ok[a:b], failed[f:g])


class _Once:
    """An iterable over an iterator's items, for DataLoader's ``sampler``."""

    def __init__(self, iterator: Iterator) -> None:
        self._iterator = iterator

    def __iter__(self) -> Iterator:
        return self._iterator


#: Consecutive batches a DataLoader worker reads as one item at most. Neighbouring batches
#: share JPEG tiles (a row of 224 px patches and the next share a row of 256 px tiles), and
#: workers keep one tile cache each: dealt one batch each in turn, workers decoded 1.56x the
#: tiles the large slide of bench_slides needs; in runs of 4, 1.13x (1.27x with 8 workers).
WORKER_CHUNK = 4


def worker_chunks(ranges: list[range], num_workers: int) -> list[list[range]]:
    """``ranges`` in runs of consecutive batches, one run per DataLoader item: up to
    ``WORKER_CHUNK`` long, shorter where a slide would give a worker fewer than two runs."""
    size = max(1, min(WORKER_CHUNK, len(ranges) // (2 * num_workers)))
    return [ranges[i:i + size] for i in range(0, len(ranges), size)]


class CrossBatcher:
    """Runs the rows of consecutive ``Batch``es through ``model`` in batches of
    ``batch_size`` rows, whichever batch they come from.

    ``model``: uint8 ``(n, S, S, 3)`` tensor -> float32 ``(n, D)`` array. ``add(batch)``
    and ``finish()`` return the batches now complete (``features`` set), in the order added.
    ``drop(slot)`` discards a job's rows not yet run (its batches still come back, without
    features).
    """

    def __init__(self, model: Callable[[torch.Tensor], np.ndarray], batch_size: int) -> None:
        self._model, self.batch_size = model, batch_size
        self._waiting: deque[Batch] = deque()            # added, not yet handed back
        self._unrun: deque[tuple[Batch, int]] = deque()  # (batch, first row not yet run)
        self._parts: dict[int, list[np.ndarray]] = {}    # id(batch) -> features so far
        self._dropped: set[int] = set()

    @property
    def pending_rows(self) -> int:
        return sum(b.rows - start for b, start in self._unrun)

    def add(self, batch: Batch) -> list[Batch]:
        self._waiting.append(batch)
        if batch.rows and batch.slot not in self._dropped:
            self._parts[id(batch)] = []
            self._unrun.append((batch, 0))
        while self.pending_rows >= self.batch_size:
            self._run(self.batch_size)
        return self._complete()

    def finish(self) -> list[Batch]:
        while self._unrun:
            self._run(min(self.pending_rows, self.batch_size))
        return self._complete()

    def drop(self, slot: int) -> None:
        self._dropped.add(slot)
        self._unrun = deque((b, s) for b, s in self._unrun if b.slot != slot)
        for batch in self._waiting:
            if batch.slot == slot:
                self._parts.pop(id(batch), None)

    def _run(self, n: int) -> None:
        pieces: list[tuple[Batch, int, int]] = []
        while n > 0:
            batch, start = self._unrun.popleft()
            stop = min(batch.rows, start + n)
            pieces.append((batch, start, stop))
            n -= stop - start
            if stop < batch.rows:
                self._unrun.appendleft((batch, stop))
        tensors = [torch.as_tensor(b.pixels[a:z]) for b, a, z in pieces]
        features = self._model(tensors[0] if len(tensors) == 1 else torch.cat(tensors))
        row = 0
        for batch, start, stop in pieces:
            self._parts[id(batch)].append(features[row:row + stop - start])
            row += stop - start

    def _complete(self) -> list[Batch]:
        done = []
        while self._waiting:
            batch = self._waiting[0]
            parts = self._parts.get(id(batch))
            if parts is not None:
                if sum(len(p) for p in parts) < batch.rows:
                    break
                batch.features = parts[0] if len(parts) == 1 else np.concatenate(parts)
                del self._parts[id(batch)]
            done.append(self._waiting.popleft())
        return done
