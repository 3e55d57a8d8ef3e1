"""The run directory `<output_dir>/<run_name>/`: its identity, lock, attempt records and per-attempt logs.

```
config.yaml          resolved config, no secrets
run.json             run name, W&B run id, created-at, versions, hardware, attempts (+ adapted batch sizes)
checkpoint-<step>/   complete only with wellocr_complete.json (wellocr.checkpoint)
final/               adapter + processor, same marker
cost.json            cost ledger (wellocr.cost)
eval/<name>/         evaluation outputs (wellocr.evaluate)
logs/attempt-<n>.log console output of each attempt
```

Every process start is an attempt; SkyPilot restarts the same command after a preemption, so everything here is
safe to run any number of times.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from wellocr import __version__
from wellocr.checkpoint import write_json_atomic
from wellocr.config import Config, default_run_name
from wellocr.errors import UserError
from wellocr.redact import redact, redact_data

log = logging.getLogger("wellocr")

LOCK_NAME = ".lock"
LOCK_HEARTBEAT_S = 15.0
LOCK_STALE_S = 90.0
# An attempt still "running" when the next one starts ended without a word: SIGKILL, or a pod that vanished.
VANISHED = "vanished"
# The exit reasons of an attempt that a preemption ended (counted as preemptions by the tracker and the cost report).
PREEMPTED_REASONS = frozenset({"preempted", VANISHED})
# The run's own files (beside its checkpoints, final/ and eval/) that go up to the bucket at every checkpoint and
# come back first on a new machine (wellocr.remote).
RUN_FILES = ("run.json", "config.yaml", "cost.json", "bad_rows.jsonl")
TRACKED_PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "unsloth",
                    "unsloth_zoo", "wandb", "jiwer", "skypilot")


RUN_NAME_ENV = "WELLOCR_RUN_NAME"
RUN_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# SKYPILOT_TASK_ID of a managed job: sky-managed-<controller start time>_<job name>_<job id>-<task index>
MANAGED_TASK_ID = re.compile(r"^sky-managed-(?P<stamp>[0-9-]+)_(?P<name>.+)_(?P<job>\d+)-(?P<task>\d+)$")


@dataclass(frozen=True)
class ManagedJob:
    """The SkyPilot managed job this process runs in. Its task id carries the jobs controller's start time, so a
    controller restart gives the same job a new task id; the job id stays, but starts again from 1 when the
    controller is recreated. The run is named after name and job id; its run.json keeps the task ids seen."""

    job_id: str
    task_id: str
    name: str
    stamp: str

    @classmethod
    def from_env(cls, env: dict) -> ManagedJob | None:
        task_id = env.get("SKYPILOT_TASK_ID", "").strip()
        match = MANAGED_TASK_ID.match(task_id)
        if not match:
            return None
        job_id = env.get("SKYPILOT_MANAGED_JOB_ID", "").strip() or match["job"]
        return cls(job_id, task_id, match["name"], match["stamp"])

    @property
    def run_name(self) -> str:
        return _safe_name(f"{self.name}-job{self.job_id}")

    @property
    def later_run_name(self) -> str:
        """The name of this job's run when an earlier job with the same id left a finished run."""
        return _safe_name(f"{self.name}-job{self.job_id}-{self.stamp.replace('-', '')}")

    def earlier_job(self, run_json: dict) -> str | None:
        """Why the run with this job's name belongs to an earlier job (None: it is this job's, or new).

        The same task id is a recovery; another task id with the run unfinished is this job after a controller
        restart; another task id with the run finished is a new job whose id a recreated controller reused."""
        seen = run_json.get("skypilot", {}).get("task_ids", [])
        if not seen or self.task_id in seen or run_json.get("status") not in ("finished", "early-stopped"):
            return None
        return f"it is a finished run of an earlier job with the same id ({seen[-1]})"

    def record(self, run: RunDir) -> None:
        seen = run.read().get("skypilot", {}).get("task_ids", [])
        if self.task_id not in seen:
            run.update(skypilot={"managed_job_id": self.job_id, "task_ids": [*seen, self.task_id]})


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "sky-job"


def resolve_run_name(cfg: Config, config_path: Path | None, resume: bool, env: dict | None = None) -> tuple[str, str]:
    """The run name, stable across restarts: $WELLOCR_RUN_NAME > run.run_name > the SkyPilot managed job (name
    and job id) > SKYPILOT_TASK_ID > the name generated for this config file.

    A generated name is remembered per config file under `<output_dir>/.wellocr/`, so `--resume-latest`
    without a name finds the same run again; a run started without `--resume-latest` gets a new name.
    """
    env = os.environ if env is None else env
    explicit = env.get(RUN_NAME_ENV, "").strip()
    if explicit:
        if not RUN_NAME_PATTERN.fullmatch(explicit):
            raise UserError(f"{RUN_NAME_ENV} must be letters, digits, '.', '_' or '-' (it names a directory), "
                            f"got {explicit!r}")
        return explicit, RUN_NAME_ENV
    job = ManagedJob.from_env(env)
    if not cfg.run.run_name and job is not None:
        return job.run_name, "managed job"
    name, how = default_run_name(cfg, env)
    if how != "generated":
        return name, how
    key = hashlib.sha1(str(Path(config_path).resolve() if config_path else "none").encode()).hexdigest()[:12]
    pointer = Path(cfg.run.output_dir) / ".wellocr" / f"last-run-{key}"
    if resume and pointer.is_file():
        remembered = pointer.read_text().strip()
        if remembered and (Path(cfg.run.output_dir) / remembered).is_dir():
            return remembered, f"last run of {config_path}"
    try:
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.write_text(name + "\n")
    except OSError as exc:
        raise UserError(f"run.output_dir: cannot write to {cfg.run.output_dir} ({exc.strerror or exc}); choose a "
                        "writable directory, e.g. --set run.output_dir=runs") from None
    return name, "generated"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"host": socket.gethostname(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                    gpu_memory_gb=round(props.total_memory / 2**30, 1))
    else:
        info["gpu"] = None
    return info


class RunLock:
    """One live writer per run directory, also across machines sharing a network volume.

    The lock file holds owner and heartbeat; a background thread refreshes the heartbeat. A lock whose owner
    process is gone (same host) or whose heartbeat is older than LOCK_STALE_S (another host: a preempted pod) is
    taken over with a message; a live one makes the second writer wait that long, then fail.
    """

    def __init__(self, run_dir: Path, stale_after: float = LOCK_STALE_S, heartbeat: float = LOCK_HEARTBEAT_S):
        self.path = run_dir / LOCK_NAME
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _stale_reason(self, holder: dict | None) -> str | None:
        if holder is None:
            return "unreadable lock file"
        age = time.time() - float(holder.get("heartbeat", 0))
        if holder.get("host") == self.owner["host"]:
            if not _pid_alive(int(holder.get("pid", -1))):
                return f"process {holder.get('pid')} on this host is gone"
            return None
        if age > self.stale_after:
            return f"no heartbeat from {holder.get('host')} for {age:.0f} s"
        return None

    def acquire(self, wait: float | None = None) -> None:
        deadline = time.time() + (self.stale_after + 5 if wait is None else wait)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                reason = self._stale_reason(holder)
                if reason is not None:
                    log.warning("taking over the stale lock of %s (%s)", self.path.parent, reason)
                    self.path.unlink(missing_ok=True)
                    continue
                if time.time() >= deadline:
                    raise UserError(  # noqa: B904 - the lock being held is the error, not the FileExistsError
                        f"run directory {self.path.parent} is in use by pid {holder.get('pid')} on "
                        f"{holder.get('host')}; wait for it to finish or pick another run.run_name"
                    )
                time.sleep(min(5.0, self.heartbeat))
                continue
            os.close(fd)
            self._beat()
            break
        self._thread = threading.Thread(target=self._run, name="wellocr-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        write_json_atomic(self.path, {**self.owner, "heartbeat": time.time()})

    def _run(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                self._beat()
            except OSError as exc:  # a flaky network volume must not kill training
                log.warning("lock heartbeat failed: %s", exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._read()
        if holder and holder.get("pid") == self.owner["pid"] and holder.get("host") == self.owner["host"]:
            self.path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped where PID 1 reaps nothing) holds no lock
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


_CURSOR_MOVE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class RedrawnLines:
    """Console text as a log holds it: a line that is redrawn in place (a progress bar's carriage returns and
    cursor moves) keeps its last state only, so a bar becomes one line instead of one endless line of redraws.
    Text is passed on a whole line at a time; `rest()` gives what is left without a newline at the end."""

    def __init__(self) -> None:
        self.pending = ""

    def feed(self, text: str) -> str:
        self.pending += text
        if "\n" not in self.pending:
            return ""
        *lines, self.pending = self.pending.split("\n")
        return "".join(f"{line}\n" for line in map(self._last_state, lines) if line is not None)

    def rest(self) -> str:
        line, self.pending = self._last_state(self.pending), ""
        return line or ""

    @staticmethod
    def _last_state(line: str) -> str | None:
        if "\r" not in line and "\x1b" not in line:
            return line
        segments = line.removesuffix("\r").split("\r")
        last = _CURSOR_MOVE.sub("", segments[-1])
        return last if last.strip() else None  # a bar that was cleared leaves nothing


class _Tee:
    """Write console output to the terminal and to the attempt log (secrets masked in the log). The log, and the
    stream when it is not a terminal (`sky jobs logs`, a pipe), get progress bars as lines (RedrawnLines)."""

    def __init__(self, stream: TextIO, log_file: TextIO):
        self.stream, self.log_file = stream, log_file
        self.lines = RedrawnLines()
        self.terminal = bool(getattr(stream, "isatty", lambda: False)())

    def write(self, text: str) -> int:
        lines = self.lines.feed(text)
        self.stream.write(text if self.terminal else lines)
        self._log(lines)
        return len(text)

    def close(self) -> None:
        """Pass on what is left of the last line (the Tee is being taken down)."""
        rest = self.lines.rest()
        if rest:
            if not self.terminal:
                self.stream.write(rest)
            self._log(rest)

    def _log(self, text: str) -> None:
        if not text:
            return
        try:
            self.log_file.write(redact(text))
            self.log_file.flush()
        except (OSError, ValueError):
            pass

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    config_file = property(lambda self: self.path / "config.yaml")
    run_json = property(lambda self: self.path / "run.json")
    final_dir = property(lambda self: self.path / "final")
    cost_file = property(lambda self: self.path / "cost.json")
    eval_dir = property(lambda self: self.path / "eval")
    logs_dir = property(lambda self: self.path / "logs")
    bad_rows_log = property(lambda self: self.path / "bad_rows.jsonl")

    def run_files(self) -> list[Path]:
        """The RUN_FILES of this run that exist now."""
        return [self.path / name for name in RUN_FILES if (self.path / name).is_file()]

    def exists(self) -> bool:
        return self.run_json.is_file()

    def read_config_data(self) -> dict[str, Any] | None:
        """config.yaml as plain data (the saved, resolved config, not validated); None when there is none.

        UserError when it is not valid YAML or not a mapping of sections.
        """
        path = self.config_file
        if not path.is_file():
            return None
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{path}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: not a mapping of config sections; give a run directory made by wellocr.train")
        return data

    def read(self) -> dict[str, Any]:
        try:
            return json.loads(self.run_json.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise UserError(f"{self.run_json}: unreadable ({exc}); restore it or start a new run_name") from None

    def update(self, **fields: Any) -> dict[str, Any]:
        data = self.read()
        data.update(fields)
        write_json_atomic(self.run_json, redact_data(data))
        return data

    def create(self, run_name: str, how: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.exists():
            self.update(run_name=run_name, run_name_from=how, created_at=time.time(), wandb_run_id=None,
                        wellocr_version=__version__, git_commit=git_commit(), attempts=[])

    def start_attempt(self, command: list[str]) -> int:
        data = self.read()
        attempts = data.get("attempts", [])
        for earlier in attempts:
            if earlier.get("exit_reason") == "running":
                earlier["exit_reason"] = VANISHED
        number = len(attempts) + 1
        attempts.append({
            "attempt": number, "started_at": time.time(), "command": command, "versions": package_versions(),
            "exit_reason": "running", "exit_code": None,
        })
        self.update(attempts=attempts)
        return number

    def update_attempt(self, number: int, **fields: Any) -> None:
        data = self.read()
        for attempt in data.get("attempts", []):
            if attempt["attempt"] == number:
                attempt.update(**fields)
        self.update(attempts=data.get("attempts", []))

    def end_attempt(self, number: int, **fields: Any) -> None:
        self.update_attempt(number, ended_at=time.time(), **fields)

    @contextlib.contextmanager
    def console_log(self, number: int) -> Iterator[Path]:
        """Tee stdout/stderr into logs/attempt-<n>.log for the duration of the attempt."""
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        path = self.logs_dir / f"attempt-{number}.log"
        old = sys.stdout, sys.stderr
        with open(path, "a", buffering=1) as fh:
            sys.stdout, sys.stderr = _Tee(old[0], fh), _Tee(old[1], fh)
            handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)]
            saved_streams = [h.stream for h in handlers]
            for h in handlers:
                h.setStream(sys.stderr if h.stream is old[1] else h.stream)
            try:
                yield path
            finally:
                for tee in (sys.stdout, sys.stderr):
                    if isinstance(tee, _Tee):
                        tee.close()
                for h, s in zip(handlers, saved_streams):
                    h.setStream(s)
                sys.stdout, sys.stderr = old
