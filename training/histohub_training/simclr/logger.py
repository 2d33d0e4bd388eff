"""Run logs: a CSV file (always) and TensorBoard scalars (when ``tensorboard`` is installed)."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from histohub.files import atomic_path

log = logging.getLogger(__name__)

COLUMNS = ("epoch", "step", "loss", "lr", "images_per_s", "elapsed_s")


class RunLogger:
    """Appends rows to ``log.csv``; on resume, rows after the checkpoint's step are dropped."""

    def __init__(self, folder: str | os.PathLike, *, resume_step: int | None = None,
                 tensorboard: bool = True) -> None:
        self.path = Path(folder) / "log.csv"
        rows = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= resume_step]
        with atomic_path(self.path) as temporary, open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        self._handle = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._handle, COLUMNS)
        self._tb = _tensorboard(Path(folder) / "tensorboard") if tensorboard else None

    def write(self, **row) -> None:
        self._writer.writerow({k: row[k] for k in COLUMNS})
        self._handle.flush()
        if self._tb is not None:
            for key in ("loss", "lr", "images_per_s"):
                self._tb.add_scalar(f"train/{key}", row[key], row["step"])

    def close(self) -> None:
        self._handle.close()
        if self._tb is not None:
            self._tb.close()


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard is not installed: logging to log.csv only "
                 "(pip install tensorboard for live curves)")
        return None
    return SummaryWriter(str(folder))


def read_log(folder: str | os.PathLike) -> list[dict]:
    """The rows of a run's ``log.csv`` with numbers parsed."""
    with open(Path(folder) / "log.csv", newline="") as handle:
        return [{"epoch": int(r["epoch"]), "step": int(r["step"]), "loss": float(r["loss"]),
                 "lr": float(r["lr"]), "images_per_s": float(r["images_per_s"]),
                 "elapsed_s": float(r["elapsed_s"])} for r in csv.DictReader(handle)]
