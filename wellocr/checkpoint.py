"""Checkpoints that a preemption cannot corrupt, and the retention policy that keeps the disk bounded.

A `checkpoint-<step>/` (HF Trainer layout) or `final/` directory counts only when it holds `wellocr_complete.json`,
written last, after every other file is flushed to disk: the step, the time and every file with its size. A
SIGKILL mid-save leaves a directory without a valid marker, which `latest_complete_checkpoint` skips (saying so)
in favour of the previous complete one.

The one atomic file writer of the package lives here too (`atomic_path`, `write_text_atomic`, `write_bytes_atomic`,
`write_json_atomic`): every file that a reader must see whole or not at all is written through it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("wellocr")

MARKER = "wellocr_complete.json"
TRAINER_STATE = "trainer_state.json"  # written by the HF Trainer into every checkpoint
_STEP_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(path: Path) -> int | None:
    match = _STEP_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """`checkpoint-<step>` directories, oldest first (complete or not)."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


# ---------------------------------------------------------------- atomic writes
# A reader sees the old file or the new one, never half of one: every write goes to a hidden temp file beside the
# target (`.<name>.<pid>.tmp`), flushed and fsynced, renamed over the target with os.replace, and then the directory
# is fsynced so the rename itself survives a power loss. A failure before the rename removes the temp file and
# leaves the target as it was.


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename into it) to disk; a filesystem that refuses is tolerated."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some network filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def temp_path_for(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path to write `path`'s new content to (by any writer: a file handle, a ParquetWriter, a
    download); on a normal exit it is fsynced and renamed over `path`, on an exception it is removed."""
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def write_text_atomic(path: Path, text: str, encoding: str = "utf-8") -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding=encoding) as fh:
        fh.write(text)


def write_json_atomic(path: Path, data: Any, indent: int | None = 2) -> None:
    """Write `data` as JSON atomically (the content json.dump(data, indent=2) writes)."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        json.dump(data, fh, indent=indent)


# ---------------------------------------------------------------- checkpoints


def _fsync_tree(path: Path) -> dict[str, int]:
    sizes = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MARKER):
        fsync_file(file)
        sizes[str(file.relative_to(path))] = file.stat().st_size
    for directory in [path, *(p for p in path.rglob("*") if p.is_dir())]:
        fsync_dir(directory)
    return sizes


def read_json_dict(path: Path) -> dict[str, Any]:
    """A JSON object from disk, or {} when the file is missing, unreadable or not an object (for reports)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def mark_complete(path: Path, step: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Flush everything in `path`, then write the completeness marker (the last write of a checkpoint)."""
    marker = {"step": step, "time": time.time(), "files": _fsync_tree(path), **(extra or {})}
    write_json_atomic(path / MARKER, marker)
    return marker


def read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None


def marker_mismatch(marker: dict[str, Any] | None, size_of: Callable[[str], int | None]) -> str | None:
    """The completeness rule, wherever the directory lies (here, or in object storage: wellocr.remote): why a
    directory with this marker is not complete, given `size_of(relative path)` of its files (None: missing)."""
    if marker is None:
        return "no completeness marker (interrupted while saving)"
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return "marker lists no files"
    for name, size in files.items():
        actual = size_of(name)
        if actual is None:
            return f"{name} is missing"
        if actual != size:
            return f"{name} is {actual} bytes, marker says {size}"
    return None


def incomplete_reason(path: Path) -> str | None:
    """Why `path` is not a usable checkpoint (None when it is complete and intact)."""

    def size_of(name: str) -> int | None:
        file = path / name
        return file.stat().st_size if file.is_file() else None

    return marker_mismatch(read_marker(path), size_of)


def is_complete(path: Path) -> bool:
    return incomplete_reason(path) is None


def latest_complete_checkpoint(run_dir: Path, quiet: bool = False) -> Path | None:
    """The newest complete checkpoint; newer incomplete ones are skipped with a message."""
    for path in reversed(list_checkpoints(run_dir)):
        reason = incomplete_reason(path)
        if reason is None:
            return path
        if not quiet:
            log.warning("ignoring %s: %s", path.name, reason)
    return None


def remove_incomplete(run_dir: Path) -> list[str]:
    """Delete checkpoint directories that never completed, so a resumed run can write them afresh."""
    removed = []
    for path in list_checkpoints(run_dir):
        reason = incomplete_reason(path)
        if reason is not None:
            log.warning("removing incomplete %s (%s)", path.name, reason)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def read_trainer_state(path: Path) -> dict[str, Any] | None:
    """The HF Trainer's trainer_state.json of a checkpoint (or final/) directory; None when missing or unreadable."""
    try:
        state = json.loads((Path(path) / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def eval_losses(state: dict[str, Any] | None, step: int | None = None) -> list[float]:
    """The eval losses in a trainer state's log history, oldest first (only those logged at `step` when given)."""
    return [float(e["eval_loss"]) for e in (state or {}).get("log_history", [])
            if isinstance(e.get("eval_loss"), (int, float)) and (step is None or e.get("step") == step)]


def checkpoint_eval_loss(path: Path, state: dict[str, Any] | None = None) -> float | None:
    """The eval loss measured at this checkpoint's step (from its trainer_state.json, or `state` when given: the
    same file read elsewhere, e.g. from the bucket), if one was."""
    losses = eval_losses(read_trainer_state(path) if state is None else state, checkpoint_step(path))
    return losses[-1] if losses else None


def best_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the lowest eval loss (None when no checkpoint has one)."""
    scored = [(loss, p) for p in list_checkpoints(run_dir) if is_complete(p)
              if (loss := checkpoint_eval_loss(p)) is not None]
    return min(scored, key=lambda item: (item[0], -checkpoint_step(item[1])))[1] if scored else None


@dataclass(frozen=True)
class RetentionPolicy:
    """Keep the `keep_recent` newest checkpoints plus the `keep_best` best (by eval loss) of the older ones.

    So at most keep_recent + keep_best checkpoints stay on disk, the best one always among them, and a protected
    checkpoint (the one a run resumed from) is never deleted.
    """

    keep_best: int
    keep_recent: int

    def to_delete(self, losses: dict[str, float | None], protect: set[str] = frozenset()) -> list[str]:
        by_step = sorted(losses, key=lambda name: checkpoint_step(Path(name)), reverse=True)
        recent = set(by_step[: self.keep_recent])
        older = [n for n in by_step if n not in recent and losses[n] is not None]
        best = set(sorted(older, key=lambda n: losses[n])[: self.keep_best])
        scored = [n for n in losses if losses[n] is not None]
        overall_best = {min(scored, key=lambda n: losses[n])} if scored else set()
        keep = recent | best | overall_best | set(protect)
        return [n for n in by_step[::-1] if n not in keep]

    def apply(self, run_dir: Path, protect: set[str] = frozenset()) -> list[str]:
        """Delete complete checkpoints outside the policy (incomplete ones are left to `remove_incomplete`)."""
        complete = [p for p in list_checkpoints(run_dir) if is_complete(p)]
        losses = {p.name: checkpoint_eval_loss(p) for p in complete}
        deleted = self.to_delete(losses, protect)
        for name in deleted:
            (run_dir / name / MARKER).unlink(missing_ok=True)  # never leave a half-deleted "complete" checkpoint
            shutil.rmtree(run_dir / name, ignore_errors=True)
            log.info("retention: removed %s", name)
        return deleted
