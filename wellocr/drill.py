"""`python -m wellocr.drill`: what a SkyPilot managed job of sky/train_r16.yaml goes through, rehearsed on this machine.

    python -m wellocr.drill [--scenario NAME] [--remote URL] [--task FILE] [--workdir DIR] [--keep] [--timeout S]

Runs a task's `run:` section the way a managed job's pod does (bash, in the repo root, with the task's `envs:` and
the SKYPILOT_* variables SkyPilot sets; your ~/.bashrc is not read, so the pod's `python` is the one on your PATH),
on CPU with configs/cpu_smoke.yaml and a tiny model, and checks what the trainer does when SkyPilot relaunches it.

Scenarios (--scenario):
  kill                the default. SIGKILLs the pod's whole process group once a checkpoint is complete (locally,
                      or in the bucket with --remote): a spot pod reclaimed without notice. Then runs the section
                      again with the same SKYPILOT_TASK_ID (the recovery the jobs controller launches) and checks:
                      it resumed from the last complete checkpoint and finished at max_steps; one W&B run; one cost
                      ledger with a segment per attempt; the evaluation report (and, with --remote, the bucket).
  controller-restart  the same kill, but the recovery gets a NEW SKYPILOT_TASK_ID with the same
                      SKYPILOT_MANAGED_JOB_ID (a restarted jobs controller): it must resume the same run directory.
                      Then a launch with the same job id and yet another task id (a recreated controller reusing
                      the id; with --preflight-only) must leave the finished run alone and use a new one.
  done-upload         (--remote) final/ and eval/ of the finished run are deleted from the bucket and the section
                      runs again on the same pod with the same task id (SkyPilot's relaunch after an exit 75): the
                      trainer says "already done", uploads them, reads them back, exits 0 and leaves no lock.
  no-progress         (--remote s3://..., the S3 API at AWS_ENDPOINT_URL) final/ is deleted from the bucket and the
                      section runs again, through a local proxy that forwards reads and refuses every upload (503),
                      with checkpoint.upload_timeout_s=5: three exits 75 in a row without progress, then exit 70.
  rehearsal           (--remote; default task sky/rehearsal.yaml, and the default scenario for any task whose run:
                      has --rehearse-preemption) the trainer stops itself with exit 75 right after its first
                      checkpoint; the relaunch, on a new pod, resumes from the bucket, finishes and prints
                      "rehearsal: PASS: ...".
done-upload and no-progress start from the finished run an earlier scenario left in the same --workdir (same task
and remote), or first run the section once to the end.

Layouts: without --remote, the volume layout (a network volume, or WELLOCR_REMOTE=none): every launch finds the same
output directory. With --remote URL (the launch's --env WELLOCR_REMOTE), the object-storage layout: a new pod starts
from an EMPTY output directory and must get everything from the bucket; a relaunch after an exit code lands on the
same pod. Needs the bucket's credentials in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, and
AWS_ENDPOINT_URL for R2 / MinIO / another S3 API); file:///some/dir works too (not for no-progress).

Options:
  --scenario NAME  kill | controller-restart | done-upload | no-progress | rehearsal (see above)
  --remote URL     object-storage layout, checkpoints synced to URL (the task's WELLOCR_REMOTE); without it a task
                   that declares WELLOCR_REMOTE with no value gets `none`, as a launch without a bucket passes
  --workdir DIR    where everything goes (default: a new directory under $TMPDIR, removed after a pass); never
                   removed when given here, nor after a failure
  --keep           keep the default work directory after a pass too
  --task FILE      the SkyPilot task whose run: section is drilled (default: sky/train_r16.yaml; sky/rehearsal.yaml
                   for the rehearsal)
  --timeout S      limit for each launch in seconds (default 900)
Environment:
  DRILL_CONFIG       trainer config (default configs/cpu_smoke.yaml: the tiny model and synthetic data, on CPU)
  DRILL_EXTRA_ARGS   more trainer flags, appended to the drill's own (later --set wins); no spaces inside a value
                     (nor in the work directory's, DRILL_MODEL's or DRILL_DATA's paths: they become such flags)
  DRILL_MODEL, DRILL_DATA  an existing tiny model / data set directory; default: built under the work directory
  WANDB_MODE         default offline (the drill logs to W&B offline under the run directory)
  secrets the task declares (WANDB_API_KEY, HF_TOKEN, AWS_*) are passed on from your environment, as --secret does
What it leaves in the work directory: launch-<n>.sh (the pod's script: exports, then the run: section), launch-<n>.log
(its output), the pods' output directories (volume/runs, or pod-<k>/runs), after-kill.json (the run as the kill left
it) and drill.json (every launch: scenario, role, task id, output directory, exit code; and the finished run).
Prints one PASS or FAIL line per check and exits 0 only when every check passes (1 otherwise, 2 on bad usage).
Takes a minute or a few on a laptop CPU; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import http.client
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from wellocr.checkpoint import MARKER, latest_complete_checkpoint, read_marker
from wellocr.errors import UserError
from wellocr.rundir import VANISHED, RunDir

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = ("kill", "controller-restart", "done-upload", "no-progress", "rehearsal")
EXIT_PASS, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
EXIT_PREEMPTED, EXIT_NO_PROGRESS = 75, 70
JOB_ID = "1"
STATE = "drill.json"


class UsageError(Exception):
    """Bad usage: one line, exit 2."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM to the drill."""


# ---------------------------------------------------------------- the task and the pod


@dataclass
class Task:
    path: Path
    name: str
    run: str
    envs: dict

    @classmethod
    def load(cls, path: Path) -> Task:
        try:
            task = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"cannot read the task {path}: {exc}") from None
        if not isinstance(task, dict) or not isinstance(task.get("run"), str):
            raise UsageError(f"{path}: no run: section")
        return cls(path, str(task.get("name") or "task"), task["run"], dict(task.get("envs") or {}))

    @property
    def uses_remote(self) -> bool:
        return "WELLOCR_REMOTE" in self.envs or "WELLOCR_REMOTE" in self.run

    @property
    def rehearses(self) -> bool:
        return "--rehearse-preemption" in self.run


def new_task_id(task_name: str, job_id: str = JOB_ID, after: str | None = None) -> str:
    """SKYPILOT_TASK_ID as SkyPilot 0.14 builds it for a managed job: the jobs controller's backend creation time,
    the job's name, its id and the task index; a later controller gives a later time."""
    while True:
        task_id = f"sky-managed-{dt.datetime.now(dt.UTC):%Y-%m-%d-%H-%M-%S-%f}_{task_name}_{job_id}-0"
        if task_id != after:
            return task_id
        time.sleep(0.001)


def skypilot_env(task_name: str, task_id: str, job_id: str = JOB_ID) -> dict[str, str]:
    return {
        "SKYPILOT_TASK_ID": task_id, "SKYPILOT_TASK_IDS": task_id, "SKYPILOT_MANAGED_JOB_ID": job_id,
        "SKYPILOT_NODE_RANK": "0", "SKYPILOT_NUM_NODES": "1", "SKYPILOT_NODE_IPS": "127.0.0.1",
        "SKYPILOT_NUM_GPUS_PER_NODE": "0",
        "SKYPILOT_CLUSTER_INFO": json.dumps({"cluster_name": f"{task_name}-{job_id}", "cloud": "RunPod",
                                             "num_nodes": 1}),
    }


def pod_environment(work: Path) -> dict[str, str]:
    """The environment the pod's bash starts with: none of this shell's WELLOCR_* / SKYPILOT_* settings (only the
    task's and SkyPilot's, which the pod script exports), W&B offline under the work directory by default."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WELLOCR_", "SKYPILOT_"))}
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("WANDB_DATA_DIR", str(work / "wandb-data"))
    env.setdefault("WANDB_CACHE_DIR", str(work / "wandb-cache"))
    return env


@dataclass
class Launch:
    """One run of the task's run: section on a pod, as the drill saw it."""

    number: int
    scenario: str
    role: str
    task_id: str
    output_dir: Path
    script: Path
    log: Path
    rc: int | None = None  # None: timed out (then killed)
    killed: bool = False
    run: str | None = None

    @property
    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def record(self) -> dict:
        return {"launch": self.number, "scenario": self.scenario, "role": self.role, "task_id": self.task_id,
                "output_dir": str(self.output_dir), "script": self.script.name, "log": self.log.name, "rc": self.rc,
                "killed": self.killed, "run": self.run}


def run_name_from(text: str, output_dir: Path) -> str | None:
    """The run a launch works on: what the trainer printed about it, or else the one run directory there."""
    for pattern in (r"this job's run is (\S+)\s*$", r"^  output +(.+?)\s*$", r"^resuming run directory (.+?)\s*$",
                    r"^wellocr: run (.+?) is already done", r"^wellocr: run directory (.+?)\s*$"):
        found = re.findall(pattern, text, re.MULTILINE)
        if found:
            return Path(found[-1]).name
    runs = glob.glob(os.path.join(glob.escape(str(output_dir)), "*", "run.json"))
    return Path(runs[0]).parent.name if len(runs) == 1 else None


def exit_code(returncode: int) -> int:
    """As a shell reports it: 128 + the signal for a process killed by one."""
    return 128 - returncode if returncode < 0 else returncode


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def vanish(proc: subprocess.Popen) -> int:
    """SIGKILL the pod: its process group and anything it started elsewhere (W&B's service may start a session of
    its own), stopped first so that nothing forks or writes in between. Waits until every one is gone (or a
    zombie: orphans are reaped by init, which may never reap them, and a zombie holds no lock)."""
    tree = process_tree(proc.pid)
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for p in tree:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
    rc = proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline:
        left = [p for p in tree if _running(p)]
        if not left:
            break
        time.sleep(0.2)
    else:
        print(f"NOTE processes {[p.pid for p in tree if _running(p)]} are still not reaped 20 s after the kill",
              file=sys.stderr)
    return exit_code(rc)


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# ---------------------------------------------------------------- the store


def store_fs(remote: str):
    from wellocr.remote import open_filesystem

    return open_filesystem(remote)


def remote_store(remote: str, run: str):
    from wellocr.remote import RemoteStore

    return RemoteStore(remote, run, retries=2, retry_wait=0.2, retry_wait_max=1.0)


def remote_files(remote: str, run: str) -> dict[str, int]:
    """Every object of the run in the store: relative path -> size."""
    fs, root = store_fs(remote)
    base = f"{root}/{run}"
    try:
        found = fs.find(base, detail=True)
    except FileNotFoundError:
        return {}
    prefix = fs._strip_protocol(base).rstrip("/") + "/"
    return {p[len(prefix):]: info.get("size") for p, info in found.items()
            if p.startswith(prefix) and info.get("type", "file") != "directory"}


def remote_delete(remote: str, run: str, *names: str) -> None:
    fs, root = store_fs(remote)
    for name in names:
        try:
            fs.rm(f"{root}/{run}/{name}", recursive=True)
        except FileNotFoundError:
            pass


class RefusingProxy:
    """A local HTTP proxy in front of an S3 API that forwards reads (GET, HEAD: object reads and listings) and
    DELETE, and answers every write (PUT, POST) with 503: uploads that cannot succeed, the rest working."""

    def __init__(self, upstream: str):
        target = urllib.parse.urlsplit(upstream)
        if target.scheme not in ("http", "https") or not target.hostname:
            raise UsageError(f"AWS_ENDPOINT_URL {upstream!r}: expected http(s)://host[:port]")
        self.refused = 0
        self.forwarded = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes, length: str | None = None):
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", length if length is not None else str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                if body and self.command != "HEAD":
                    self.wfile.write(body)
                self.close_connection = True

            def _refuse(self):
                self._body()
                proxy.refused += 1
                body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code>'
                        b"<Message>the drill refuses every upload</Message></Error>")
                self._reply(503, [("Content-Type", "application/xml")], body)

            def _forward(self):
                body = self._body()
                conn_cls = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
                conn = conn_cls(target.hostname, target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "keep-alive", "proxy-connection", "transfer-encoding")}
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                    kept = [(k, v) for k, v in response.getheaders()
                            if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length")]
                    length = response.getheader("Content-Length") if self.command == "HEAD" else None
                    proxy.forwarded += 1
                    self._reply(response.status, kept, data, length)
                finally:
                    conn.close()

            do_GET = do_HEAD = do_DELETE = _forward
            do_PUT = do_POST = _refuse

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="drill-proxy", daemon=True)

    def __enter__(self) -> RefusingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------- checks


class Checks:
    def __init__(self):
        self.failed = 0
        self.passed = 0

    def __call__(self, ok: bool, passed: str, failed: str | None = None) -> bool:
        print(f"{'PASS' if ok else 'FAIL'} {passed if ok or failed is None else failed}", flush=True)
        self.failed += not ok
        self.passed += bool(ok)
        return bool(ok)


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def tail(launch: Launch, lines: int = 40) -> None:
    print(f"drill: launch {launch.number} ({launch.role}) output ends:")
    for line in launch.text.splitlines()[-lines:]:
        print(f"  | {line}")


# ---------------------------------------------------------------- the drill


@dataclass
class Drill:
    task: Task
    work: Path
    remote: str | None
    timeout: float
    checks: Checks = field(default_factory=Checks)
    launches: list[Launch] = field(default_factory=list)

    def __post_init__(self):
        state = read_json(self.work / STATE, {}) or {}
        self.history: list[dict] = state.get("launches", [])
        self.finished: dict | None = state.get("finished")
        model = os.environ.get("DRILL_MODEL") or str(self.work / "cache" / "tiny-qwen3-vl")
        data = os.environ.get("DRILL_DATA") or str(self.work / "cache" / "synthetic-headers")
        if any(c.isspace() for c in model + data):
            raise UsageError("no spaces in the paths of the model, the data or --workdir: they are passed in "
                             "WELLOCR_EXTRA_ARGS, which the run: section splits at spaces")
        self.extra = ("--set max_steps=8 --set save_steps=2 --set eval_steps=4 --set eval.max_new_tokens=24 "
                      "--set eval.generation_samples=2 --set wandb.enabled=true --set cost.hourly_rate=0.74 "
                      f"--set cost.budget_cap=0 --set model.model_name={model} --set data.dataset_name={data}")
        if os.environ.get("DRILL_EXTRA_ARGS", "").strip():
            self.extra += " " + os.environ["DRILL_EXTRA_ARGS"].strip()
        self.config = os.environ.get("DRILL_CONFIG") or "configs/cpu_smoke.yaml"
        self.env = pod_environment(self.work)

    @property
    def layout(self) -> str:
        return "object storage" if self.remote else "volume"

    def pod_dir(self, new_pod: bool, previous: Path | None = None) -> Path:
        """The pod's output directory: the volume's, the previous pod's (a relaunch on it), or a new pod's."""
        if not self.remote:
            return self.work / "volume" / "runs"
        if not new_pod and previous is not None:
            return previous
        pods = [int(m.group(1)) for p in self.work.glob("pod-*") if (m := re.fullmatch(r"pod-(\d+)", p.name))]
        return self.work / f"pod-{max(pods, default=0) + 1}" / "runs"

    def script(self, path: Path, output_dir: Path, task_id: str, extra: str = "", env: dict | None = None) -> None:
        lines = ["export PYTHONUNBUFFERED=1", f"cd {shlex.quote(str(REPO))}"]
        for key, value in self.task.envs.items():
            if key == "HF_HOME":  # a cache on the pod's volume (/checkpoints/...): here, under the work directory
                value = str(self.work / "hf-home")
            if key == "WELLOCR_REMOTE" and value is None:  # declared with no value: the launch must give one
                value = self.remote or "none"               # without --remote: what a launch without a bucket gives
            if key == "PIP_CACHE_DIR":  # setup's cache on the volume; the drill runs no setup
                continue
            lines.append(f"export {key}={shlex.quote('' if value is None else str(value))}")
        launch_env = {"WELLOCR_REMOTE": self.remote} if self.remote and "WELLOCR_REMOTE" not in self.task.envs else {}
        launch_env.update({"WELLOCR_CONFIG": self.config, "WELLOCR_OUTPUT_DIR": str(output_dir),
                           "WELLOCR_EXTRA_ARGS": f"{self.extra} {extra}".strip(),
                           **skypilot_env(self.task.name, task_id), **(env or {})})
        lines += [f"export {key}={shlex.quote(value)}" for key, value in launch_env.items()]
        path.write_text("\n".join(lines) + "\n" + self.task.run)

    def launch(self, scenario: str, role: str, output_dir: Path, task_id: str, *, kill_at_checkpoint: bool = False,
               extra: str = "", env: dict | None = None) -> Launch:
        """Run the section once; with kill_at_checkpoint, SIGKILL it once a checkpoint is complete."""
        number = len(self.history) + len(self.launches) + 1
        launch = Launch(number, scenario, role, task_id, output_dir, self.work / f"launch-{number}.sh",
                        self.work / f"launch-{number}.log")
        self.launches.append(launch)
        self.script(launch.script, output_dir, task_id, extra, env)
        started = time.time()
        with open(launch.log, "w") as log:
            proc = subprocess.Popen(["bash", "--norc", "-i", str(launch.script)], cwd=REPO, env=self.env,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            if kill_at_checkpoint:
                why = self.wait_checkpoint(launch, proc, started)
                if proc.poll() is None:
                    launch.rc, launch.killed = vanish(proc), True
                    print(f"drill: launch {number} ({role}) SIGKILLed after {time.time() - started:.0f} s: {why}",
                          flush=True)
                else:
                    launch.rc = exit_code(proc.returncode)
            else:
                try:
                    launch.rc = exit_code(proc.wait(timeout=self.timeout))
                except subprocess.TimeoutExpired:
                    vanish(proc)
                    print(f"drill: launch {number} ({role}) still running after {self.timeout:.0f} s: killed")
        except BaseException:  # Ctrl-C or SIGTERM to the drill: the pod, in a session of its own, goes too
            if proc.poll() is None:
                vanish(proc)
            raise
        finally:
            self.save()
        launch.run = run_name_from(launch.text, output_dir)
        if not launch.killed and launch.rc is not None:
            print(f"drill: launch {number} ({role}) exited {launch.rc} after {time.time() - started:.0f} s",
                  flush=True)
        self.save()
        return launch

    def wait_checkpoint(self, launch: Launch, proc: subprocess.Popen, started: float) -> str:
        """Until a checkpoint of the run is complete (locally, or in the store), the launch ended, or the timeout."""
        store = None
        while time.time() < started + self.timeout:
            if proc.poll() is not None:
                return "ended"
            run = run_name_from(launch.text, launch.output_dir)
            if run:
                if self.remote:
                    store = store if store is not None and store.run_name == run else remote_store(self.remote, run)
                    try:
                        if store.latest_complete_checkpoint():
                            return f"{store.latest_complete_checkpoint()} complete in {self.remote}/{run}"
                    except Exception:  # noqa: BLE001 - the store may not exist yet; keep looking
                        pass
                else:
                    done = latest_complete_checkpoint(launch.output_dir / run, quiet=True)
                    if done is not None:
                        return f"{done.name} complete in {launch.output_dir / run}"
            time.sleep(0.5 if self.remote else 0.1)
        return f"no complete checkpoint after {self.timeout:.0f} s"

    def save(self) -> None:
        state = {"task": str(self.task.path), "task_name": self.task.name, "remote": self.remote,
                 "layout": self.layout, "launches": self.history + [x.record() for x in self.launches],
                 "finished": self.finished}
        (self.work / STATE).write_text(json.dumps(state, indent=2) + "\n")

    def remember_finished(self, launch: Launch) -> None:
        self.finished = {"task": str(self.task.path), "remote": self.remote, "run": launch.run,
                         "output_dir": str(launch.output_dir), "task_id": launch.task_id}
        self.save()

    # ------------------------------------------------------------ what the scenarios check

    def run_dir(self, launch: Launch) -> Path:
        return launch.output_dir / (launch.run or "?")

    def max_steps(self, run_dir: Path) -> int | None:
        config = read_run_config(run_dir)
        return (config.get("train") or {}).get("max_steps")

    def check_first(self, launch: Launch) -> dict | None:
        """After the kill: the run as it was left (the recovery must continue from it)."""
        c, where = self.checks, f"in {self.remote}" if self.remote else "locally"
        if launch.run is None:
            c(False, "", f"launch {launch.number} never named its run directory")
            tail(launch)
            return None
        run_dir = self.run_dir(launch)
        local = latest_complete_checkpoint(run_dir, quiet=True)
        checkpoint = remote_store(self.remote, launch.run).latest_complete_checkpoint() if self.remote else (
            local and local.name)
        info = read_json(run_dir / "run.json", {}) or {}
        state = {"run": launch.run, "checkpoint": checkpoint, "wandb_run_id": info.get("wandb_run_id"),
                 "segments": (read_json(run_dir / "cost.json", {}) or {}).get("segments", []),
                 "final_exists": (run_dir / "final").exists(), "attempts": len(info.get("attempts", [])),
                 "task_id": launch.task_id, "output_dir": str(launch.output_dir), "rc": launch.rc}
        (self.work / "after-kill.json").write_text(json.dumps(state, indent=2) + "\n")
        ok = c(launch.killed and launch.rc == 137 and not state["final_exists"] and checkpoint is not None,
               f"launch {launch.number} was SIGKILLed mid-training, with {checkpoint} complete {where}",
               f"launch {launch.number}: exit {launch.rc} (expected 137, SIGKILL), final/ exists: "
               f"{state['final_exists']}, last complete checkpoint {where}: {checkpoint}")
        if not ok:
            tail(launch)
            return None
        return state

    def check_recovery(self, before: dict, first: Launch, second: Launch, first_reason: str) -> None:
        """The recovery resumed from the last complete checkpoint and finished, with one W&B run, one ledger."""
        c, log = self.checks, second.text
        n = before["checkpoint"]
        step = int(n.split("-")[1])
        c(second.run == before["run"], f"launch {second.number} worked on the same run {before['run']}",
          f"launch {second.number} worked on run {second.run}, not {before['run']}")
        c(f"resuming from {n} (step {step})" in log, f"launch {second.number} resumed from {n} (step {step})",
          f"launch {second.number} did not print 'resuming from {n} (step {step})': "
          + "; ".join(re.findall(r"^(resuming from .*|no complete checkpoint.*)$", log, re.MULTILINE)))
        if self.remote and second.output_dir != first.output_dir:
            c(f"remote: restored {n} " in log,
              f"launch {second.number} started from an empty directory and restored {n} from {self.remote}",
              f"launch {second.number} did not restore {n} from {self.remote}")
        c(second.rc == 0, f"launch {second.number} exited 0", f"launch {second.number} exited {second.rc}")
        run_dir = self.run_dir(second)
        max_steps = self.max_steps(run_dir)
        final_step = (read_marker(run_dir / "final") or {}).get("step")
        c(max_steps is not None and final_step == max_steps,
          f"finished at max_steps: final/ complete at step {final_step}",
          f"final/ step {final_step}, max_steps {max_steps}")

        info = read_json(run_dir / "run.json", {}) or {}
        attempts = [(x.get("attempt"), x.get("exit_reason")) for x in info.get("attempts", [])][before["attempts"] - 1:]
        k = before["attempts"]
        c(attempts == [(k, first_reason), (k + 1, "finished")],
          f"run.json: attempt {k} ({first_reason}) and attempt {k + 1} (finished)", f"run.json attempts: {attempts}")

        config = read_run_config(run_dir)
        if not (config.get("wandb") or {}).get("enabled") or self.env.get("WANDB_MODE") == "disabled":
            print("NOTE W&B is off (wandb.enabled false or WANDB_MODE=disabled): run id not checked")
        else:
            run_id = info.get("wandb_run_id")
            dirs = sorted({p for d in {first.output_dir, second.output_dir}
                           for p in glob.glob(os.path.join(glob.escape(str(d / before["run"])), "wandb", "*run-*"))
                           if not p.endswith("latest-run")})
            names = [Path(p).name for p in dirs]
            c(bool(run_id) and run_id == before["wandb_run_id"] and len(names) >= 2
              and all(x.endswith(f"-{run_id}") for x in names),
              f"one W&B run: run.json wandb_run_id {run_id} unchanged, both attempts logged to it ({', '.join(names)})",
              f"W&B run id after the first launch {before['wandb_run_id']}, at the end {run_id}; W&B run dirs: "
              f"{names}")

        segments = (read_json(run_dir / "cost.json", {}) or {}).get("segments", [])
        report = subprocess.run([sys.executable, "-m", "wellocr.cost", "--run", str(run_dir), "--json"],
                                capture_output=True, text=True, cwd=REPO)
        total = (read_json_text(report.stdout) or {}).get("total_usd")
        from wellocr.ledger import segment_usd

        summed = sum(segment_usd(s) for s in segments)
        no_overlap = len(segments) == 2 and (segments[0].get("host") != segments[1].get("host")
                                             or segments[1]["start"] >= segments[0]["last_heartbeat"])
        c([s.get("attempt") for s in segments] == [k, k + 1] and no_overlap and total is not None
          and abs(total - summed) <= 1e-9 * max(1.0, summed),
          f"one cost ledger: 2 segments (attempts {k} and {k + 1}), not overlapping; the report's total "
          f"${summed:.4f} is their sum",
          f"cost.json segments {[(s.get('attempt'), s.get('start'), s.get('last_heartbeat')) for s in segments]}, "
          f"report total {total} (exit {report.returncode}: {report.stderr.strip()[-300:]}), sum {summed}")

        html = run_dir / "eval" / "final" / "report.html"
        c(html.is_file() and html.stat().st_size > 0, f"evaluation report {html}", f"no evaluation report at {html}")
        if self.remote:
            self.check_bucket_holds_the_end(second)

    def check_bucket_holds_the_end(self, launch: Launch) -> None:
        stored = remote_files(self.remote, launch.run)
        wanted = [f"final/{MARKER}", "eval/final/report.html", "run.json", "cost.json"]
        missing = [p for p in wanted if p not in stored]
        self.checks(not missing, f"{self.remote}/{launch.run} holds final/, eval/final/report.html, run.json and "
                    "cost.json", f"missing in {self.remote}/{launch.run}: {', '.join(missing)}")

    def finished_run(self, scenario: str) -> Launch | None:
        """The finished run an earlier scenario left in this work directory, or one run to the end now."""
        f = self.finished
        if f and f["task"] == str(self.task.path) and f["remote"] == self.remote:
            run_dir = Path(f["output_dir"]) / f["run"]
            if read_marker(run_dir / "final") is not None:
                print(f"drill: starting from the finished run {run_dir} (task id {f['task_id']})", flush=True)
                return Launch(0, scenario, "earlier", f["task_id"], Path(f["output_dir"]), Path(), Path(),
                              rc=0, run=f["run"])
        print("drill: no finished run in the work directory: running the task once to the end", flush=True)
        launch = self.launch(scenario, "run to the end", self.pod_dir(new_pod=True), new_task_id(self.task.name))
        if not self.checks(launch.rc == 0 and launch.run is not None,
                           f"launch {launch.number} finished the run {launch.run}",
                           f"launch {launch.number} exited {launch.rc} (expected 0: a finished run to start from)"):
            tail(launch)
            return None
        self.remember_finished(launch)
        return launch


def read_run_config(run_dir: Path) -> dict:
    """The run's config.yaml as plain data, {} while it is missing or unreadable (the scenario checks report it)."""
    try:
        return RunDir(run_dir).read_config_data() or {}
    except (OSError, UserError):
        return {}


def read_json_text(text: str) -> dict | None:
    try:
        return json.loads(text)
    except ValueError:
        return None


# ---------------------------------------------------------------- scenarios


def scenario_kill(d: Drill, restart_controller: bool = False) -> None:
    name = "controller-restart" if restart_controller else "kill"
    first_id = new_task_id(d.task.name)
    first = d.launch(name, "killed at a checkpoint", d.pod_dir(new_pod=True), first_id, kill_at_checkpoint=True)
    before = d.check_first(first)
    if before is None:
        return
    second_id = new_task_id(d.task.name, after=first_id) if restart_controller else first_id
    what = "a restarted controller's new task id" if restart_controller else "the same task id"
    print(f"drill: recovery with {what}: SKYPILOT_TASK_ID={second_id}", flush=True)
    second = d.launch(name, "recovery", d.pod_dir(new_pod=True), second_id)
    d.check_recovery(before, first, second, VANISHED)
    if second.rc == 0 and second.run:
        d.remember_finished(second)
    if second.rc != 0:
        tail(second)
        return
    if not restart_controller:
        return
    c, run_dir = d.checks, d.run_dir(second)
    seen = (read_json(run_dir / "run.json", {}) or {}).get("skypilot", {})
    c(f"resuming run directory {run_dir}" in second.text and seen.get("task_ids") == sorted({first_id, second_id})
      and seen.get("managed_job_id") == JOB_ID,
      f"the recovery with a new task id (job {JOB_ID}) resumed the same run directory {run_dir}; run.json records "
      "both task ids",
      f"the recovery did not resume {run_dir} (run.json skypilot: {seen})")

    # A recreated jobs controller starts job ids again: a new job with the finished job's id.
    third_id = new_task_id(d.task.name, after=second_id)
    run_json_before = (run_dir / "run.json").read_bytes()
    stored_before = remote_files(d.remote, second.run) if d.remote else None
    third = d.launch(name, "a new job reusing the id (--preflight-only)", d.pod_dir(new_pod=True), third_id,
                     extra="--preflight-only")
    expected = f"{second.run}-{third_id.split('_')[0].removeprefix('sky-managed-').replace('-', '')}"
    seen_by_third = third.output_dir / second.run  # on a new pod (object storage): restored from the bucket
    c(third.rc == 0 and f"run directory {seen_by_third} is not this job's" in third.text and third.run == expected,
      f"launch {third.number} (same job id, new task id, the run finished) left {second.run} alone: "
      f"\"is not this job's\", new run {third.run}",
      f"launch {third.number} exited {third.rc}, run {third.run} (expected {expected}); "
      + "; ".join(re.findall(r"^.*(?:run directory|this job's).*$", third.text, re.MULTILINE)))
    if third.run:
        new_seen = (read_json(third.output_dir / third.run / "run.json", {}) or {}).get("skypilot", {})
        c(new_seen.get("task_ids") == [third_id], f"the new run records only the new task id {third_id}",
          f"the new run's run.json skypilot: {new_seen}")
    untouched = (run_dir / "run.json").read_bytes() == run_json_before and (
        d.remote is None or remote_files(d.remote, second.run) == stored_before)
    c(untouched, f"the finished run {second.run} is as it was (run.json{' and the bucket' if d.remote else ''})",
      f"the finished run {second.run} was changed by launch {third.number}")


def scenario_done_upload(d: Drill) -> None:
    c = d.checks
    done = d.finished_run("done-upload")
    if done is None:
        return
    run, run_dir = done.run, d.run_dir(done)
    remote_delete(d.remote, run, "final", "eval")
    stored = remote_files(d.remote, run)
    if not c(not any(p.startswith(("final/", "eval/")) for p in stored),
             f"deleted final/ and eval/ of {run} from {d.remote}", f"final/ or eval/ still in {d.remote}/{run}"):
        return
    attempts_before = len((read_json(run_dir / "run.json", {}) or {}).get("attempts", []))
    launch = d.launch("done-upload", "relaunch after exit 75, same pod", d.pod_dir(False, done.output_dir),
                      done.task_id)
    text = launch.text
    c(launch.rc == 0, f"launch {launch.number} exited 0", f"launch {launch.number} exited {launch.rc}")
    c(f"wellocr: run {run_dir} is already done" in text, f"launch {launch.number}: the run is already done",
      f"launch {launch.number} did not print 'wellocr: run {run_dir} is already done'")
    where = f"{d.remote.rstrip('/')}/{run}"
    c(f"remote: final/ and eval/ verified at {where}" in text,
      f"launch {launch.number} uploaded final/ and eval/ and read them back: 'remote: final/ and eval/ verified at "
      f"{where}'", f"launch {launch.number} did not print 'remote: final/ and eval/ verified at {where}'")
    stored = remote_files(d.remote, run)
    local_eval = {p.relative_to(run_dir).as_posix(): p.stat().st_size
                  for p in (run_dir / "eval").rglob("*") if p.is_file()}
    final_marker = read_marker(run_dir / "final") or {}
    missing = [p for p, size in {**local_eval, **{f"final/{k}": v for k, v in final_marker.get("files", {}).items()},
                                 f"final/{MARKER}": None}.items()
               if p not in stored or (size is not None and stored[p] != size)]
    c(local_eval and not missing, f"{where} holds final/ and every file of eval/ ({len(local_eval)}) at its size",
      f"{where} lacks {', '.join(missing[:6]) or 'eval/ (none here)'}")
    c(not (run_dir / ".lock").exists(), f"no .lock left in {run_dir}", f"{run_dir / '.lock'} was left behind")
    attempts = (read_json(run_dir / "run.json", {}) or {}).get("attempts", [])
    last = attempts[-1] if len(attempts) > attempts_before else {}
    c((last.get("exit_reason"), last.get("exit_code")) == ("nothing-to-do", 0) and last.get("uploaded_files", 0) > 0,
      f"run.json: attempt {last.get('attempt')} nothing-to-do, exit 0, {last.get('uploaded_files')} file(s) uploaded",
      f"run.json's last attempt: {last}")


def scenario_no_progress(d: Drill) -> None:
    c = d.checks
    upstream = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    done = d.finished_run("no-progress")
    if done is None:
        return
    run, run_dir = done.run, d.run_dir(done)
    remote_delete(d.remote, run, "final")
    stored_before = remote_files(d.remote, run)
    c(not any(p.startswith("final/") for p in stored_before), f"deleted final/ of {run} from {d.remote}",
      f"final/ still in {d.remote}/{run}")
    attempts_before = len((read_json(run_dir / "run.json", {}) or {}).get("attempts", []))
    launches = []
    with RefusingProxy(upstream) as proxy:
        print(f"drill: uploads refused: AWS_ENDPOINT_URL={proxy.url} (a proxy of {upstream} answering PUT/POST "
              "with 503)", flush=True)
        env = {"AWS_ENDPOINT_URL": proxy.url, "AWS_ENDPOINT_URL_S3": proxy.url}
        for _ in range(5):
            launch = d.launch("no-progress", "relaunch, uploads refused", d.pod_dir(False, done.output_dir),
                              done.task_id, extra="--set checkpoint.upload_timeout_s=5", env=env)
            launches.append(launch)
            if launch.rc != EXIT_PREEMPTED:
                break
    codes = [x.rc for x in launches]
    c(codes == [75, 75, 75, 70], f"exits {codes}: three retryable exits (75), then 70",
      f"exits {codes} (expected [75, 75, 75, 70])")
    c(all("uploads to checkpoint.remote did not finish" in x.text for x in launches[:3]),
      "each exit 75 said the uploads to checkpoint.remote did not finish",
      "an exit 75 did not say 'uploads to checkpoint.remote did not finish'")
    lines = [line for line in launches[-1].text.splitlines()
             if re.search(r"the last 3 attempts exited 75 .*without a new step or a file uploaded", line)]
    c(len(lines) == 1, f"launch {launches[-1].number}: {lines[0] if lines else ''}",
      f"launch {launches[-1].number} printed {len(lines)} 'the last 3 attempts exited 75 ... without a new step or a "
      "file uploaded' line(s), expected 1")
    attempts = (read_json(run_dir / "run.json", {}) or {}).get("attempts", [])[attempts_before:]
    reasons = [(a.get("exit_reason"), a.get("exit_code"), a.get("uploaded_files")) for a in attempts]
    c(reasons == [("upload-incomplete", 75, 0)] * 3 + [("no-progress", 70, 0)],
      "run.json: 3 attempts upload-incomplete (75, nothing uploaded), then no-progress (70)",
      f"run.json attempts (reason, exit, uploaded files): {reasons}")
    stored = remote_files(d.remote, run)
    c(proxy.refused > 0 and not any(p.startswith("final/") for p in stored),
      f"the proxy refused {proxy.refused} upload(s) and forwarded {proxy.forwarded} read(s); final/ is still not in "
      "the bucket", f"refused {proxy.refused}, final/ in the bucket: "
      f"{sorted(p for p in stored if p.startswith('final/'))}")


def scenario_rehearsal(d: Drill) -> None:
    c = d.checks
    task_id = new_task_id(d.task.name)
    first = d.launch("rehearsal", "stops itself after its first checkpoint", d.pod_dir(new_pod=True), task_id)
    stop = re.search(r"rehearsal: stopping after (checkpoint-\d+) with exit 75", first.text)
    if not c(first.rc == EXIT_PREEMPTED and stop is not None and "rehearsal: PASS" not in first.text,
             f"launch {first.number} stopped itself after {stop and stop.group(1)} with exit 75",
             f"launch {first.number} exited {first.rc}, expected 75 after 'rehearsal: stopping after checkpoint-N'"):
        tail(first)
        return
    run_dir = d.run_dir(first)
    checkpoint = remote_store(d.remote, first.run).latest_complete_checkpoint()
    info = read_json(run_dir / "run.json", {}) or {}
    before = {"run": first.run, "checkpoint": checkpoint, "wandb_run_id": info.get("wandb_run_id"),
              "attempts": len(info.get("attempts", []))}
    if not c(checkpoint == stop.group(1), f"{checkpoint} is complete in {d.remote}/{first.run}",
             f"the newest complete checkpoint in {d.remote}/{first.run} is {checkpoint}, not {stop.group(1)}"):
        return
    second = d.launch("rehearsal", "recovery on a new pod", d.pod_dir(new_pod=True), task_id)
    d.check_recovery(before, first, second, "rehearsal-stop")
    verdict = [line for line in second.text.splitlines() if line.startswith("rehearsal:")]
    c(bool(verdict) and verdict[-1].startswith("rehearsal: PASS:"), f"the trainer's verdict: {verdict[-1]}"
      if verdict else "", f"the trainer's verdict: {verdict[-1] if verdict else 'none printed'}")
    if second.rc == 0 and second.run:
        d.remember_finished(second)
    else:
        tail(second)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m wellocr.drill", description=__doc__.split("\n")[0],
                                     usage=__doc__.split("\n")[2].strip(), add_help=False)
    parser.add_argument("--scenario", choices=SCENARIOS)
    parser.add_argument("--remote", metavar="URL")
    parser.add_argument("--workdir", metavar="DIR")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--task", metavar="FILE")
    parser.add_argument("--timeout", type=float, default=900.0, metavar="S")
    parser.add_argument("-h", "--help", action="store_true")
    args = parser.parse_args(argv)
    if args.help:
        print(__doc__)
        sys.exit(EXIT_PASS)
    return args


def resolve(args: argparse.Namespace) -> tuple[Task, str]:
    default_task = "sky/rehearsal.yaml" if args.scenario == "rehearsal" else "sky/train_r16.yaml"
    path = Path(args.task or default_task)
    path = path if path.is_absolute() or path.is_file() else REPO / path
    if not path.is_file():
        raise UsageError(f"no task file {path}")
    task = Task.load(path.resolve())
    scenario = args.scenario or ("rehearsal" if task.rehearses else "kill")
    if args.remote and not task.uses_remote:
        raise UsageError(f"--remote: {path} does not use WELLOCR_REMOTE (a volume task); drop --remote or pick "
                         "an object-storage task")
    if scenario in ("done-upload", "no-progress", "rehearsal") and not args.remote:
        raise UsageError(f"--scenario {scenario} needs --remote URL (the object-storage layout)")
    if scenario == "no-progress":
        if not args.remote.startswith(("s3://", "s3a://")):
            raise UsageError("--scenario no-progress needs an s3:// remote: its uploads are refused by a proxy in "
                             "front of the S3 API")
        if not (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")):
            raise UsageError("--scenario no-progress needs AWS_ENDPOINT_URL (the S3 API the proxy stands in front of)")
    if scenario == "rehearsal" and not task.rehearses:
        print(f"NOTE {path.name}'s run: has no --rehearse-preemption: the first launch will not stop itself")
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    if shutil.which("bash") is None or shutil.which("python", path=os.environ.get("PATH")) is None:
        raise UsageError("no bash or no 'python' on PATH (the run: section calls python)")
    return task, scenario


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        task, scenario = resolve(args)
        created = not args.workdir
        if created:
            work = Path(tempfile.mkdtemp(prefix="wellocr-drill.", dir=os.environ.get("TMPDIR") or None))
        else:
            work = Path(args.workdir).resolve()
            work.mkdir(parents=True, exist_ok=True)
        remote = args.remote.rstrip("/") if args.remote else None
        drill = Drill(task, work, remote, args.timeout)
    except UsageError as exc:
        print(f"drill: {exc}", file=sys.stderr)
        return EXIT_USAGE

    layout = (f"object storage ({remote}): a new pod starts from an empty output directory" if remote
              else "volume: every launch finds the same output directory")
    print(f"drill: scenario {scenario}: {task.path.name} run: section, layout {layout}")
    print(f"drill: work directory {work}", flush=True)

    def on_term(*_):
        raise Interrupted()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        {"kill": scenario_kill, "controller-restart": lambda d: scenario_kill(d, restart_controller=True),
         "done-upload": scenario_done_upload, "no-progress": scenario_no_progress,
         "rehearsal": scenario_rehearsal}[scenario](drill)
    except (KeyboardInterrupt, Interrupted):
        print(f"drill: interrupted (work directory kept: {work})")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    c = drill.checks
    failed = c.failed + (c.passed == 0)
    print(f"drill: {'PASS' if not failed else 'FAIL'} ({c.failed} check(s) failed)", flush=True)
    if failed:
        print(f"drill: work directory kept: {work}")
        return EXIT_FAIL
    if created and not args.keep:
        shutil.rmtree(work, ignore_errors=True)  # only a directory this drill made
    else:
        print(f"drill: work directory kept: {work}")
    return EXIT_PASS


if __name__ == "__main__":
    sys.exit(main())
