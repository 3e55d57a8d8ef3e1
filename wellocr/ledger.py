"""What a run costs: a ledger that survives preemption, a budget cap, and the report `python -m wellocr.cost` prints.

Spot pods are billed from the moment they start, not from the moment training starts, and a preempted run is
billed for every attempt. So the ledger keeps one segment per attempt (process start), billed from the machine's
start (setup, installs and the model download included), and never rewrites an earlier segment.

Ledger file `<run dir>/cost.json` (schema version 1)::

    {
      "version": 1,
      "currency": "USD",
      "segments": [
        {
          "attempt": 2,                  # run.json attempt number of the process that wrote this segment
          "start": 1795872829.0,         # billing start, Unix seconds
          "start_source": "boot",        # "boot" | "process", optionally + " (note)"; see below
          "last_heartbeat": 1795876429.0,# last time the process was seen alive, Unix seconds
          "cloud": "runpod",             # cost.cloud; auto: SKYPILOT_CLUSTER_INFO's cloud, "local" without it
          "gpu_type": "NVIDIA GeForce RTX 4090",  # cost.gpu_type; auto: the device's name, "CPU" without a GPU
          "gpu_count": 1,                # cost.gpu_count
          "hourly_rate": 0.74,           # USD per GPU-hour
          "rate_source": "config (cost.hourly_rate)",  # or "table: <gpu> <spot|on-demand> on <cloud> (<source>)"
          "spot": true,                  # cost.spot_instance
          "start_step": 40,              # optimizer step the attempt resumed from
          "last_step": 95,               # optimizer step at the last heartbeat
          "host": "c0ffee-pod",          # hostname, to recognise a restart on the same machine
          "sky_managed_job_id": "3"      # SKYPILOT_MANAGED_JOB_ID under a SkyPilot managed job, else null
        }
      ]
    }

A segment costs `(last_heartbeat - start) / 3600 * hourly_rate * gpu_count`; the run costs the sum.

Billing start (`cost.bill_from`): "auto" (the default) is "boot" on a SkyPilot pod (one of SkyPilot's variables
SKYPILOT_CLUSTER_INFO, SKYPILOT_TASK_ID, SKYPILOT_MANAGED_JOB_ID is set, also after a relaunch on the same pod) and
"process" elsewhere (a local run is billed from its own start, not the machine's). "boot" is the start of the
machine or container, PID 1's start time (psutil: the kernel's start time of the process after the host's boot
time): in a container that is the container's start, on a VM its boot. Where it cannot be read the process start is
used and `start_source` says so. A second attempt on the same host (a local retry) starts no earlier than the
previous same-host segment's last heartbeat, so time already billed is not billed twice.

Rates: `cost.hourly_rate` when set (the user's number wins), else the price table (wellocr.prices, shipped as
wellocr/prices.csv) for the segment's cloud and GPU, with its catalog source in `rate_source`. One job may run on
several clouds: each segment carries its own cloud and rate, the budget cap is over all of them.

`wellocr.callbacks.CostCallback` keeps the ledger during training; this module imports neither torch nor
transformers at import time (only `device_gpu`, when a training attempt opens its segment, asks torch for the GPU's
name), so the report is quick to print.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

from wellocr import prices
from wellocr.artifacts import read_metrics
from wellocr.checkpoint import read_json_dict, write_json_atomic
from wellocr.errors import UserError
from wellocr.rundir import PREEMPTED_REASONS, RunDir

LEDGER_VERSION = 1
LEDGER_NAME = "cost.json"
CURRENCY = "USD"
WARN_FRACTION = 0.9
WRITE_INTERVAL_S = 10.0  # heartbeats closer together than this update memory only; stops and train end flush

_IMPORTED_AT = time.time()  # stands in for the process start where it cannot be read

# ---------------------------------------------------------------- rates

_SKY = "SkyPilot RunPod catalog v8 @01acdfd4, read 2026-11-28"
SKYPILOT_ENV = ("SKYPILOT_CLUSTER_INFO", "SKYPILOT_TASK_ID", "SKYPILOT_MANAGED_JOB_ID")  # set on a SkyPilot pod

# The SkyPilot jobs controller, billed on top of the GPU pods and not in the ledger. With only RunPod enabled,
# `sky jobs launch` starts it on a RunPod CPU pod of 4+ vCPUs and 16 GB (SkyPilot 0.14 jobs/constants.py
# CONTROLLER_RESOURCES: cpus 4+, memory 4x) and never autostops it on RunPod (cloud_vm_ray_backend.py drops the
# AUTOSTOP feature for RunPod controllers): it bills until `sky down`. The cheapest catalog match is cpu3g-4-16.
CONTROLLER_USD_PER_HOUR = 0.16
CONTROLLER_RATE_SOURCE = f"RunPod cpu3g-4-16, {_SKY}"
MANAGED_JOB_ENV = "SKYPILOT_MANAGED_JOB_ID"


def device_gpu() -> str:
    """The GPU this process trains on, as torch names it ("NVIDIA GeForce RTX 4090"), or "CPU" without one."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else prices.CPU


def resolve_where(cost_cfg: Any, env: Mapping[str, str]) -> tuple[str, str]:
    """(cloud, gpu) a segment is priced for: `cost.cloud` / `cost.gpu_type`, or with "auto" the cloud SkyPilot
    reports (SKYPILOT_CLUSTER_INFO; "local" without it) and the device's GPU."""
    cloud = prices.cloud_from_env(env)[0] if cost_cfg.cloud == "auto" else cost_cfg.cloud.strip().lower()
    gpu = device_gpu() if cost_cfg.gpu_type == "auto" else cost_cfg.gpu_type
    return cloud, gpu


def resolve_rate(cost_cfg: Any, cloud: str = prices.LOCAL, gpu: str | None = None) -> tuple[float, str]:
    """(USD per GPU-hour, where it came from). Precedence: `cost.hourly_rate` when set (the user's number wins),
    else the price table's row for (cloud, GPU) (wellocr/prices.csv, spot or on-demand by cost.spot_instance)."""
    if cost_cfg.hourly_rate is not None:
        return float(cost_cfg.hourly_rate), "config (cost.hourly_rate)"
    return prices.lookup(cloud, cost_cfg.gpu_type if gpu is None else gpu, cost_cfg.spot_instance)


def on_skypilot_pod(env: Mapping[str, str]) -> str | None:
    """The SkyPilot variable that says this process runs on a SkyPilot pod (None elsewhere)."""
    return next((name for name in SKYPILOT_ENV if env.get(name, "").strip()), None)


# ---------------------------------------------------------------- billing start


def started_at(pid: int | None = None) -> float:
    """When process `pid` (None: this one) started, in Unix seconds (psutil: the kernel's start time of it)."""
    return psutil.Process(pid).create_time()


def process_start_time() -> tuple[float, str]:
    """This process's start (Unix seconds) and a `start_source` for it."""
    try:
        return started_at(), "process"
    except (OSError, psutil.Error) as exc:
        return _IMPORTED_AT, f"process (module import time; process start unavailable: {exc})"


def boot_time() -> tuple[float, str]:
    """The machine's or container's start: PID 1's start time; the process start where it cannot be read."""
    try:
        return started_at(1), "boot"
    except (OSError, psutil.Error) as exc:
        start, _ = process_start_time()
        return start, f"process (no boot time: {exc})"


# ---------------------------------------------------------------- the ledger


def segment_usd(segment: dict[str, Any], until: float | None = None) -> float:
    end = segment["last_heartbeat"] if until is None else max(segment["last_heartbeat"], until)
    return max(0.0, end - segment["start"]) / 3600 * segment["hourly_rate"] * segment["gpu_count"]


def segment_gpu_hours(segment: dict[str, Any]) -> float:
    return max(0.0, segment["last_heartbeat"] - segment["start"]) / 3600 * segment["gpu_count"]


def read_ledger(path: Path) -> dict[str, Any]:
    """The ledger at `path`, validated; a missing file is an empty ledger."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"version": LEDGER_VERSION, "currency": CURRENCY, "segments": []}
    except ValueError as exc:
        raise UserError(f"{path}: unreadable cost ledger ({exc}); restore it or move it aside") from None
    valid = isinstance(data, dict) and data.get("version") == LEDGER_VERSION and isinstance(data.get("segments"), list)
    if not valid:
        raise UserError(f"{path}: not a version {LEDGER_VERSION} cost ledger; move it aside to start a new one")
    return data


class CostLedger:
    """This process's segment of `cost.json`, plus every earlier segment (read once, kept, never rewritten)."""

    def __init__(self, path: Path, data: dict[str, Any], write_interval_s: float = WRITE_INTERVAL_S):
        self.path = Path(path)
        self.data = data
        self.write_interval_s = write_interval_s
        self._last_write = -math.inf

    @classmethod
    def open(cls, path: Path, cost_cfg: Any, attempt: int, start_step: int, now: float | None = None, *,
             start: float | None = None, host: str | None = None, env: Mapping[str, str] | None = None,
             write_interval_s: float = WRITE_INTERVAL_S) -> CostLedger:
        """Append this attempt's segment and write the ledger.

        `start` overrides the billing start that `cost.bill_from` gives (boot or process start); either way a
        segment never starts before the last heartbeat of an earlier segment on the same host. `env` (default
        os.environ) gives the cloud (SKYPILOT_CLUSTER_INFO), whether this is a SkyPilot pod (for bill_from auto)
        and whether the attempt runs under a managed job (SKYPILOT_MANAGED_JOB_ID).
        """
        now = time.time() if now is None else now
        env = os.environ if env is None else env
        cloud, gpu = resolve_where(cost_cfg, env)
        try:
            rate, rate_source = resolve_rate(cost_cfg, cloud, gpu)
        except UserError:
            if cost_cfg.gpu_type != "auto" or cloud != prices.LOCAL:
                raise  # on a cloud, an unpriced GPU would make the budget cap meaningless
            rate, rate_source = 0.0, f"no price known for {gpu}: a local run, not billed (cost.hourly_rate bills it)"
        data = read_ledger(path)
        host = socket.gethostname() if host is None else host
        managed_job = env.get(MANAGED_JOB_ENV, "").strip() or None
        pod = on_skypilot_pod(env)
        if start is not None:
            source = "explicit"
        elif cost_cfg.bill_from == "boot" or (cost_cfg.bill_from == "auto" and pod):
            start, source = boot_time()
            if cost_cfg.bill_from == "auto" and source == "boot":
                source = f"boot (a SkyPilot pod: {pod})"
        else:
            start, source = process_start_time()
            if cost_cfg.bill_from == "auto" and source == "process":
                source = "process (not a SkyPilot pod)"
        billed_until = max((s["last_heartbeat"] for s in data["segments"] if s.get("host") == host), default=None)
        if billed_until is not None and billed_until > start:
            start, source = billed_until, f"{source} (after the previous segment on this host)"
        start = min(start, now)
        data["segments"].append({
            "attempt": attempt, "start": start, "start_source": source, "last_heartbeat": now,
            "cloud": cloud, "gpu_type": gpu, "gpu_count": cost_cfg.gpu_count, "hourly_rate": rate,
            "rate_source": rate_source, "spot": cost_cfg.spot_instance, "start_step": start_step,
            "last_step": start_step, "host": host, "sky_managed_job_id": managed_job,
        })
        ledger = cls(path, data, write_interval_s)
        ledger.flush(now)
        return ledger

    @property
    def segment(self) -> dict[str, Any]:
        return self.data["segments"][-1]

    @property
    def segments(self) -> list[dict[str, Any]]:
        return self.data["segments"]

    def heartbeat(self, step: int, now: float | None = None, force: bool = False) -> None:
        """Record that the process is alive at `step`; written at most every `write_interval_s` unless forced."""
        now = time.time() if now is None else now
        self.segment["last_heartbeat"] = max(self.segment["last_heartbeat"], now)
        self.segment["last_step"] = max(self.segment["last_step"], int(step))
        if force or now - self._last_write >= self.write_interval_s:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        write_json_atomic(self.path, self.data)
        self._last_write = time.time() if now is None else now

    def total_usd(self, now: float | None = None) -> float:
        """All segments; with `now`, the current segment counts up to then (a live estimate)."""
        earlier = sum(segment_usd(s) for s in self.segments[:-1])
        return earlier + segment_usd(self.segment, until=now)

    def segment_usd(self) -> float:
        return segment_usd(self.segment)

    def gpu_hours(self) -> float:
        return sum(segment_gpu_hours(s) for s in self.segments)

    def steps_done(self) -> int:
        return max((s["last_step"] for s in self.segments), default=0)


def budget_exhausted(ledger: CostLedger, cost_cfg: Any) -> str | None:
    """The stop message when the run has spent its `cost.budget_cap` (None when under it, or no cap)."""
    cap = cost_cfg.budget_cap
    spent = ledger.total_usd()
    if cap <= 0 or spent < cap:
        return None
    attempts = len(ledger.segments)
    plural = "s" if attempts != 1 else ""
    return (f"budget cap ${cap:.2f} reached (${spent:.2f} spent over {attempts} attempt{plural}); "
            "raise cost.budget_cap and run --resume-latest with the same run name to continue")


# ---------------------------------------------------------------- the report


def cost_report(run_dir: Path) -> dict[str, Any]:
    """The run's cost summary (the `--json` keys, documented in docs/COST.md). Raises UserError without a ledger."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"--run {run_dir}: no such run directory")
    ledger_path = run_dir / LEDGER_NAME
    if not ledger_path.is_file():
        raise UserError(f"--run {run_dir}: no {LEDGER_NAME} (the run has no cost ledger yet; train it first)")
    segments = read_ledger(ledger_path)["segments"]
    try:
        cfg = RunDir(run_dir).read_config_data() or {}
    except (UserError, OSError):  # a report from the ledger alone is better than none
        cfg = {}
    run = read_json_dict(run_dir / "run.json")
    train, cost = cfg.get("train") or {}, cfg.get("cost") or {}

    total = sum(segment_usd(s) for s in segments)
    steps = max((s["last_step"] for s in segments), default=0)
    max_steps = train.get("max_steps")
    batch = run.get("adapted_batch") or run.get("auto_batch") or train
    micro, accumulation = batch.get("per_device_train_batch_size"), batch.get("gradient_accumulation_steps")
    effective_batch = micro * accumulation if isinstance(micro, int) and isinstance(accumulation, int) else None
    per_step = total / steps if steps else None
    samples = steps * effective_batch if effective_batch else None
    attempts = run.get("attempts") or []

    report: dict[str, Any] = {
        "run": run.get("run_name") or run_dir.name,
        "currency": CURRENCY,
        "total_usd": total,
        "gpu_hours": sum(segment_gpu_hours(s) for s in segments),
        "attempts": len(attempts) if attempts else len(segments),
        "segments": len(segments),
        "preemptions": sum(1 for a in attempts if a.get("exit_reason") in PREEMPTED_REASONS),
        "steps_done": steps,
        "max_steps": max_steps,
        "usd_per_step": per_step,
        "effective_batch": effective_batch,
        "usd_per_1000_samples": total / samples * 1000 if samples else None,
        "projected_usd": (per_step * max(max_steps, steps)) if per_step is not None and max_steps else None,
        "budget_cap": cost.get("budget_cap"),
        "hourly_rate": segments[-1]["hourly_rate"] if segments else None,
        "rate_source": segments[-1]["rate_source"] if segments else None,
        "rates": sorted({(s["gpu_type"], s["gpu_count"], s["hourly_rate"], s["rate_source"]) for s in segments}),
        "cer_base": None, "cer_final": None, "cer_points_gained": None, "usd_per_cer_point": None,
    }
    report["rates"] = [dict(zip(("gpu_type", "gpu_count", "hourly_rate", "rate_source"), r)) for r in report["rates"]]
    report["clouds"] = cloud_split(segments)
    report["billed_from"] = {}
    for s in segments:  # how each segment's billing start was chosen (cost.bill_from), in ledger order
        report["billed_from"][s["start_source"]] = report["billed_from"].get(s["start_source"], 0) + 1
    report.update(startup_cost(attempts, segments))
    report.update(controller_cost(run, segments))
    base, final = read_metrics(run_dir / "eval/base/metrics.json"), read_metrics(run_dir / "eval/final/metrics.json")
    if base and final and isinstance(base.get("cer"), (int, float)) and isinstance(final.get("cer"), (int, float)):
        points = (base["cer"] - final["cer"]) * 100
        report.update(cer_base=base["cer"], cer_final=final["cer"], cer_points_gained=points,
                      usd_per_cer_point=total / points if points > 0 else None)
    return report


def cloud_split(segments: list[dict]) -> dict[str, dict[str, Any]]:
    """Dollars, GPU-hours and segments per cloud, in the order the run first reached each ("unknown": ledgers
    written before segments recorded their cloud)."""
    split: dict[str, dict[str, Any]] = {}
    for s in segments:
        entry = split.setdefault(s.get("cloud") or "unknown", {"usd": 0.0, "gpu_hours": 0.0, "segments": 0})
        entry["usd"] += segment_usd(s)
        entry["gpu_hours"] += segment_gpu_hours(s)
        entry["segments"] += 1
    return split


def is_managed_job(run: dict[str, Any], segments: list[dict]) -> bool:
    """Whether the run ran as a SkyPilot managed job: a segment recorded SKYPILOT_MANAGED_JOB_ID, or (ledgers written
    before that field) the run is named after a managed job's SKYPILOT_TASK_ID (`sky-managed-...`)."""
    if any(s.get("sky_managed_job_id") for s in segments):
        return True
    return run.get("run_name_from") == "SKYPILOT_TASK_ID" and str(run.get("run_name", "")).startswith("sky-managed-")


def controller_cost(run: dict[str, Any], segments: list[dict]) -> dict[str, Any]:
    """The jobs controller's rate, and what it cost at least over the run (first segment start to last heartbeat:
    it also runs before, between and after the job's pods, until `sky down`); None when not a managed job."""
    if not segments or not is_managed_job(run, segments):
        return {"managed_job": False, "controller_usd_per_hour": None, "controller_usd_during_run": None}
    hours = max(0.0, max(s["last_heartbeat"] for s in segments) - min(s["start"] for s in segments)) / 3600
    return {"managed_job": True, "controller_usd_per_hour": CONTROLLER_USD_PER_HOUR,
            "controller_usd_during_run": hours * CONTROLLER_USD_PER_HOUR}


def startup_cost(attempts: list[dict], segments: list[dict]) -> dict[str, Any]:
    """Seconds and dollars the attempts spent from process start to their first optimizer step (run.json
    `first_step_s`: imports, model load, compilation, resume), each at its own segment's rate."""
    rate = {s["attempt"]: s["hourly_rate"] * s["gpu_count"] for s in segments if "attempt" in s}
    timed = [a for a in attempts if isinstance(a.get("first_step_s"), (int, float))]
    fallback = segments[-1]["hourly_rate"] * segments[-1]["gpu_count"] if segments else 0.0
    return {"startup_attempts": len(timed), "startup_s": sum(a["first_step_s"] for a in timed) if timed else None,
            "startup_usd": sum(a["first_step_s"] / 3600 * rate.get(a.get("attempt"), fallback) for a in timed)
            if timed else None}


def _money(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"${value:,.{digits}f}"


def format_report(report: dict[str, Any]) -> str:
    steps = f"{report['steps_done']}" + (f" of {report['max_steps']}" if report["max_steps"] else "")
    cap = report["budget_cap"]
    rows = [
        ("run", report["run"]),
        ("cost", f"{_money(report['total_usd'])} over {report['gpu_hours']:.2f} GPU-hours"),
        ("attempts", f"{report['attempts']} ({report['preemptions']} preempted; {report['segments']} billed segments)"),
        ("steps", steps),
        ("per step", _money(report["usd_per_step"], 4)),
        ("per 1000 samples", _money(report["usd_per_1000_samples"], 4)
         + (f" (effective batch {report['effective_batch']})" if report["effective_batch"] else "")),
        ("projected", _money(report["projected_usd"]) + (" at max_steps" if report["projected_usd"] is not None
                                                          else "")),
        ("budget cap", "none" if not cap else _money(cap)),
    ]
    if report["managed_job"]:  # right under the projection: it is billed beside it, by the hour
        rows.insert(7, ("jobs controller",
                        f"{_money(report['controller_usd_per_hour'])}/hour on top, not in the totals: at least "
                        f"{_money(report['controller_usd_during_run'])} during this run; SkyPilot never stops it on "
                        "RunPod (`sky down` it when no job is left)"))
    if report["startup_s"] is not None:
        rows.append(("start-up", f"{report['startup_s']:.0f} s from process start to first step over "
                                 f"{report['startup_attempts']} attempt(s), {_money(report['startup_usd'], 4)}"))
    if report["billed_from"]:
        rows.append(("billed from", "; ".join(f"{source} ({n} segment{'s' if n != 1 else ''})"
                                              for source, n in report["billed_from"].items())))
    for cloud, part in report["clouds"].items():
        plural = "s" if part["segments"] != 1 else ""
        rows.append((f"on {cloud}", f"{_money(part['usd'])} over {part['gpu_hours']:.2f} GPU-hours "
                                    f"({part['segments']} segment{plural})"))
    for rate in report["rates"]:
        rows.append(("rate", f"${rate['hourly_rate']:.2f}/GPU-hour x {rate['gpu_count']} {rate['gpu_type']} "
                             f"({rate['rate_source']})"))
    if report["cer_points_gained"] is not None:
        rows.append(("CER", f"{report['cer_base']:.4f} (base) -> {report['cer_final']:.4f} (final), "
                            f"{report['cer_points_gained']:+.2f} points"))
        rows.append(("per CER point", _money(report["usd_per_cer_point"], 4)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows) + "\n"
