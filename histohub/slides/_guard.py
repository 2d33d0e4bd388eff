"""A cohort extracted in a child process, so that a native crash costs one slide, not the run.

OpenSlide, libtiff, libjpeg and the DataLoader's workers run native code that can end the
process that called it: glib's ``g_malloc`` aborts when an allocation a file asked for
fails, a decoder may segfault, the kernel may kill a worker. ``guarded_results`` runs
``SlideExtractor.extract_many`` in a child process (spawned: a fresh interpreter) and
passes its results (and its log
records) back through a pipe. When the child dies (a signal, or an exception that is not a
``HistohubError``), the slides it had not finished are taken up again: the first of them
alone in a fresh child, which tells whether that slide is the one that kills the reader
(it then fails with one line, and the others go on) or whether it was another one in
flight; then the rest, as before. Each death settles at least one slide, so a run ends;
a ``HistohubError`` that is no slide's (a model that cannot load) stops the run as it
would without the guard. The partial files a dead child left are resumed, and its output
locks were released by its death (``_outputs``).

The child is spawned, not forked: a fork of a process whose torch already ran OpenMP
threads hangs in the child's first parallel operation (libgomp), and a fork copies the
locks other threads held. It costs one interpreter start (importing torch) per run.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any

from histohub.errors import HistohubError, SlideError
from histohub.slides._jobs import SlideJob, SlideResult, Tiling

log = logging.getLogger(__name__)

#: This many slides in a row dying alone of one cause stop the run: no slide's doing.
SAME_DEATHS = 5
#: Makes a ``SlideExtractor`` (in the child: the model is loaded there).
ExtractorFactory = Callable[[], AbstractContextManager]


def guarded_results(make_extractor: ExtractorFactory, jobs: Sequence[SlideJob], *,
                    tiling: Tiling, overwrite: bool) -> Iterator[SlideResult]:
    """``make_extractor().extract_many(jobs, ...)``'s results, in job order, with every
    slide whose reading kills the process given a result whose ``error`` says so.

    Raises the ``HistohubError`` that stopped a child before it was a slide's (a model that
    cannot load); ``KeyboardInterrupt`` stops the child and is raised again.
    """
    pending = list(jobs)
    alone = False
    lone_deaths: list[str] = []  # causes of the slides that died alone, in a row
    while pending:
        batch = pending[:1] if alone else pending
        child = _Child(make_extractor, batch, tiling, overwrite)
        for result in child.results():
            pending.pop(0)
            yield result
        if child.death is None:
            alone, lone_deaths = False, []
            continue
        if not alone and len(batch) > 1:
            log.warning("the extraction process died (%s) with %d slides left; trying %s "
                        "alone", child.death, len(pending), quoted(pending[0].slide.name))
            alone = True
            continue
        lone_deaths.append(child.death)
        if len(lone_deaths) >= SAME_DEATHS and len(set(lone_deaths)) == 1:
            raise HistohubError(f"{SAME_DEATHS} slides in a row each killed the process that "
                                f"read it alone ({child.death}): this is no slide's doing "
                                "(the installation, the memory?); stopped. A rerun resumes")
        job = pending.pop(0)
        error = SlideError(f"the process reading this slide died ({child.death}); the "
                           "other slides go on")
        log.error("%s: %s", quoted(job.slide.name), error)
        alone = False
        yield SlideResult(job.slide, job.output, 0, error=error)


def quoted(name: str) -> str:
    """A file name as logs and reports show it: as it is when printable, else ``repr``'d,
    so a name holding a newline cannot start a fake log line."""
    return name if name.isprintable() else repr(name)


class _Child:
    """One child process running ``extract_many`` over ``jobs``; ``death``: None after a
    clean end, else what ended it (a signal's name, an exception's last line)."""

    def __init__(self, make_extractor: ExtractorFactory, jobs: Sequence[SlideJob],
                 tiling: Tiling, overwrite: bool) -> None:
        # spawned, not forked: a process that ran torch's OpenMP threads cannot fork a
        # child that runs them again (libgomp hangs in the child's first parallel op)
        context = multiprocessing.get_context("spawn")
        self._receive, send = context.Pipe(duplex=False)
        levels = (logging.getLogger().level, logging.getLogger("histohub").getEffectiveLevel())
        self._process = context.Process(
            target=_run_child,
            args=(send, make_extractor, list(jobs), tiling, overwrite, os.getpid(), levels),
            name="histohub-extract")  # not a daemon: it starts DataLoader workers
        self._process.start()
        send.close()
        self.death: str | None = None

    def results(self) -> Iterator[SlideResult]:
        try:
            yield from self._messages()
        except BaseException:
            self._process.terminate()
            raise
        finally:
            self._process.join()
            self._receive.close()
        code = self._process.exitcode
        if self.death == "?" or (self.death is None and code):
            self.death = (f"signal {signal.Signals(-code).name}" if code and code < 0
                          else f"exit code {code}")

    def _messages(self) -> Iterator[SlideResult]:
        while True:
            try:
                kind, value = self._receive.recv()
            except EOFError:  # died: what ended it is read from its exit code
                self.death = self.death or "?"
                return
            if kind == "result":
                yield value
            elif kind == "log":
                logging.getLogger(value.name).handle(value)
            elif kind == "error":
                raise value
            elif kind == "interrupted":
                raise KeyboardInterrupt
            elif kind == "crash":
                self.death = value
            elif kind == "done":
                self.death = None
                return


class _Sender:
    """The child's end of the pipe, shared by its threads (logging) and its main thread."""

    def __init__(self, connection) -> None:
        self._connection = connection
        self._lock = threading.Lock()

    def send(self, kind: str, value: Any) -> None:
        with self._lock:
            self._connection.send((kind, value))


class _ForwardLogs(logging.Handler):
    """Sends the child's log records to the parent, which hands them to its own handlers."""

    def __init__(self, sender: _Sender) -> None:
        super().__init__()
        self._sender = sender

    def emit(self, record: logging.LogRecord) -> None:
        try:
            record.msg, record.args = record.getMessage(), None
            record.exc_info = record.exc_text = record.stack_info = None
            self._sender.send("log", record)
        except Exception:
            self.handleError(record)


def _die_with_parent(parent: int) -> None:
    """A killed parent (SIGKILL, a job's time limit) takes the child along: an orphan would
    go on writing and holding the output locks the rerun needs (Linux: PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # died before that was set
        os._exit(1)


def _run_child(connection, make_extractor: ExtractorFactory, jobs: list[SlideJob],
               tiling: Tiling, overwrite: bool, parent: int, levels: tuple[int, int]) -> None:
    _die_with_parent(parent)
    sender = _Sender(connection)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_ForwardLogs(sender))
    root.setLevel(levels[0])  # the parent's levels: its handlers see what they saw before
    logging.getLogger("histohub").setLevel(levels[1])
    try:
        with make_extractor() as extractor:
            for result in extractor.extract_many(jobs, tiling=tiling, overwrite=overwrite):
                sender.send("result", _portable(result))
        sender.send("done", None)
    except HistohubError as error:
        sender.send("error", _portable_error(error))
    except KeyboardInterrupt:
        sender.send("interrupted", None)
    except BaseException as error:  # a worker killed, an out-of-memory: the slides go on
        last = traceback.format_exception_only(type(error), error)[-1].strip()
        sender.send("crash", last.splitlines()[0] if last else type(error).__name__)
    finally:
        connection.close()


def _portable(result: SlideResult) -> SlideResult:
    return result if result.error is None else replace(result,
                                                       error=_portable_error(result.error))


def _portable_error(error: HistohubError) -> HistohubError:
    """``error`` as the parent can unpickle it (a class whose constructor takes other
    arguments than its message comes back as a ``SlideError`` with the same message)."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return SlideError(str(error))
