"""`python benchmarks/bench.py --whole-run` — the shipped run, end to end, under a GPU memory cap.

The training bench times steps; a real run also evaluates while it trains and at its end, and evaluation is where
a 24 GB card can run out. This mode runs the product's own entry point, `python -m wellocr.train --config
configs/train_r16.yaml`, with only the model, data, output folder and the step counts overridden (evaluation every
--eval-every steps, every eval setting the shipped default), and `WELLOCR_GPU_MEMORY_GB` set to --cap-gb
(23: what an RTX 4090 leaves after the CUDA context). Then a second process resumes the run one step further, on
an empty pod, to time a restart. Everything is read back from what the run records (run.json's phases, the log):

- auto batch: the micro-batch the probe chose; fallback: whether training had to halve it (an out-of-memory);
- peak reserved / allocated GiB per phase: auto batch probe, training, eval loss, generation, final evaluation;
- training samples/s: the effective batch over the median interval between steps with nothing else between;
- per evaluation: seconds of the eval-loss and generation passes (first and later: the first compiles), the first
  step after it, and the evaluation overhead projected to the shipped schedule (--project-steps steps, an
  evaluation every --project-every): an upper bound with random weights, whose generations all run to the limit;
- restart: seconds from process start to the end of the first optimizer step of the resumed process (--resumes N:
  N of them, one after the other, each one step further).

Each run's run.json is copied beside its log (LOGS/BACKEND-whole-NAME-run.json), also when the bench is stopped by a
SIGTERM (a time limit): the run in progress is stopped at a step boundary first, so its phases are recorded.

Data-parallel scaling: `--processes N --micro M` trains N ranks (`train.processes`) at micro-batch M each with
accumulation N overall (one optimizer step = M x N samples); `--processes 1 --micro M --accumulation N` is the one-GPU
run at the same effective batch. Peaks are rank 0's GPU.

    python benchmarks/bench.py --whole-run --backend unsloth,hf --cap-gb 23 --work /tmp/wb --out whole.json
    python benchmarks/bench.py --whole-run --tiny        (CPU, the tiny model: a smoke test of this mode)

docs/BENCHMARKS.md ("The whole shipped run under a 23 GiB cap") has the measured numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "train_r16.yaml"
RUN = "whole"
PHASES = ("auto_batch", "train", "eval_loss", "generation", "final_eval")
STOP_WAIT_S = 60  # for a stopped run to save and record its phases


def overrides(args: Any, backend: str) -> list[str]:
    """What differs from the shipped config: model, data, where the run goes, how long it is."""
    root = Path(args.work) / backend
    width, height = args.image_size
    sets = {"model.model_name": args.model, "model.backend": backend, "data.dataset_name": args.whole_data,
            "data.max_pixels": width * height, "run.output_dir": run_dir(args, backend).parent, "run.run_name": RUN,
            "run.compile_cache_dir": root / "compile-cache", "wandb.enabled": "false",
            "train.max_steps": args.whole_steps, "train.eval_steps": args.eval_every,
            "train.save_steps": args.eval_every}
    fixed = fixed_sizes(args)
    if fixed:  # data-parallel scaling: a fixed micro-batch per GPU
        sets.update({"train.processes": args.processes, "train.per_device_train_batch_size": fixed[0],
                     "train.gradient_accumulation_steps": fixed[1]})
    if args.tiny:  # CPU: seconds, not minutes
        sets.update({"data.min_pixels": width * height // 4, "data.dataloader_num_workers": 0,
                     "eval.max_new_tokens": 8, "eval.generation_samples": 2, "data.eval_subset": 2})
    sets.update(item.split("=", 1) for item in args.whole_set)
    return [item for key, value in sets.items() for item in ("--set", f"{key}={value}")]


def fixed_sizes(args: Any) -> tuple[int, int] | None:
    """(micro-batch per rank, accumulation overall) of a scaling run; None: the shipped config's auto."""
    if args.processes > 1 or args.micro:
        return args.micro or 8, args.accumulation or args.processes
    return None


def train(args: Any, backend: str, name: str, extra: list[str]) -> tuple[int, Path]:
    from bench import fresh_pod

    log = Path(args.logs) / f"{backend}-whole-{name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", **fresh_pod(Path(args.work), backend, name)}
    if args.cap_gb:
        env["WELLOCR_GPU_MEMORY_GB"] = str(args.cap_gb)
    command = [sys.executable, "-m", "wellocr.train", "--config", str(CONFIG), *overrides(args, backend), *extra]
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            code = proc.wait()
        finally:
            if proc.poll() is None:  # the bench was stopped (a time limit's SIGTERM): the run records what it has
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_WAIT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
            keep_run_record(args, backend, name)
    return code, log


def run_dir(args: Any, backend: str) -> Path:
    return Path(args.work) / backend / "whole-runs" / RUN


def keep_run_record(args: Any, backend: str, name: str) -> None:
    """run.json (phases, peaks, steps) beside the logs: the run's own folder may not outlive the machine."""
    record = run_dir(args, backend) / "run.json"
    if record.is_file():
        shutil.copyfile(record, Path(args.logs) / f"{backend}-whole-{name}-run.json")


def stop_on_sigterm() -> None:
    """A SIGTERM (`timeout`, a job's time limit) ends the bench through its cleanup: the run in progress is
    stopped at a step boundary and its run.json kept with the logs."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def ensure_data(args: Any) -> None:
    from wellocr.synthetic import write_dataset

    if not (Path(args.whole_data) / "README.md").is_file():
        train_rows, eval_rows = (8, 4) if args.tiny else (64, 8)
        write_dataset(args.whole_data, train=train_rows, eval=eval_rows, seed=0, width=args.image_size[0])


def measure(args: Any, backend: str, report: dict) -> dict[str, Any]:
    """The whole run, then one restart; both read back from run.json and the logs (the report is written after
    each, so a bench stopped during the restart keeps the run's numbers)."""
    from bench import write_json

    shutil.rmtree(run_dir(args, backend).parent, ignore_errors=True)
    started = time.time()
    code, log = train(args, backend, "run", [])
    out: dict[str, Any] = {"exit_code": code, "wall_s": round(time.time() - started, 1), "log": str(log)}
    report["backends"][backend] = out
    record = run_dir(args, backend) / "run.json"
    run = json.loads(record.read_text()) if record.is_file() else {}
    attempts = run.get("attempts", [])
    if code != 0 or not attempts:
        out["error"] = f"exit {code}, see {log}"
        if attempts:
            out.update(summarise(run, attempts[0], args))
        return out
    text = log.read_text(errors="replace")
    out.update(summarise(run, attempts[0], args))
    out["fallback"] = bool(run.get("adapted_batch")) or "CUDA out of memory at micro-batch" in text
    out["eval_oom_shrinks"] = text.count("CUDA out of memory in evaluation")
    out["memory_line"] = next((line for line in text.splitlines() if line.startswith("peak ")), None)
    write_json(Path(args.out), report)
    if args.no_restart:
        return out
    restarts = []
    for i in range(args.resumes):  # each a new process on an empty pod, one step further
        name = "restart" if i == 0 else f"restart{i + 1}"
        code, log = train(args, backend, name, ["--resume-latest", "--set",
                                                f"train.max_steps={args.whole_steps + i + 1}", "--set",
                                                "eval.max_new_tokens=8", "--set", "eval.generation_samples=0"])
        attempts = json.loads(record.read_text())["attempts"]
        last = attempts[-1] if len(attempts) > i + 1 and code == 0 else {}
        restarts.append({"exit_code": code, "to_first_step_s": last.get("first_step_s"),
                         "startup": last.get("startup"), "compile_cache": last.get("compile_cache"), "log": str(log)})
        out["restart"], out["restarts"] = restarts[0], restarts
        write_json(Path(args.out), report)
        if code != 0:
            break
    return out


def summarise(run: dict, attempt: dict, args: Any) -> dict[str, Any]:
    phases = attempt.get("phases", {})
    sizes = run.get("adapted_batch") or run.get("auto_batch") or {}
    effective = sizes.get("per_device_train_batch_size", 0) * sizes.get("gradient_accumulation_steps", 0)
    fixed = fixed_sizes(args)
    if not sizes and fixed:  # micro x accumulation: all ranks together
        effective = fixed[0] * fixed[1]
    step_s = attempt.get("median_step_s")
    peaks = {name: {k: phases[name].get(k) for k in ("peak_reserved_gib", "peak_allocated_gib")}
             for name in PHASES if name in phases}
    after_eval = [s for before, s in attempt.get("first_step_after", []) if before in ("eval_loss", "generation")]
    batch = (f"{sizes['per_device_train_batch_size']}x{sizes['gradient_accumulation_steps']}" if sizes else
             f"{fixed[0]}x{fixed[1] // args.processes} x {args.processes} ranks" if fixed else "not recorded")
    out = {"auto_batch": run.get("auto_batch"), "adapted_batch": run.get("adapted_batch"), "batch": batch,
           "effective_batch": effective, "peaks": peaks,
           "max_reserved_gib": max((p["peak_reserved_gib"] for p in peaks.values() if p["peak_reserved_gib"]),
                                   default=None),
           "median_step_s": step_s, "samples_per_s": round(effective / step_s, 2) if step_s else None,
           **steady(attempt.get("step_intervals_s") or [], effective),
           "median_data_wait_s": attempt.get("median_data_wait_s"),
           "eval_loss_s": phases.get("eval_loss", {}).get("seconds_each"),
           "generation_s": phases.get("generation", {}).get("seconds_each"),
           "final_eval_s": phases.get("final_eval", {}).get("seconds"),
           "first_step_after": attempt.get("first_step_after"), "first_step_s": attempt.get("first_step_s")}
    out["projection"] = project(out, after_eval, args)
    return out


def steady(intervals: list[float], effective: int) -> dict[str, Any]:
    """The median of the later half of the step intervals: a short run's median still holds its first steps
    (recompiles for new sequence lengths, the DataLoader's first epochs), a long run's does not."""
    later = intervals[len(intervals) // 2:]
    if not later:
        return {}
    step = statistics.median(later)
    return {"later_half_step_s": round(step, 4), "later_half_samples_per_s": round(effective / step, 2)}


def project(m: dict, after_eval: list[float], args: Any) -> dict[str, Any] | None:
    """Evaluation's share of a run of --project-steps steps with an evaluation every --project-every: the first
    evaluation as measured (it compiles), every later one as the later ones measured, each followed by its first
    step's excess over a median step; the final evaluation counted in the run's time, not in the overhead."""
    loss, gen, step = m["eval_loss_s"], m["generation_s"], m["median_step_s"]
    if not (loss and gen and step):
        return None
    evaluations = args.project_steps // args.project_every
    later = statistics.median(a + b for a, b in zip(loss[1:], gen[1:])) if len(loss) > 1 else loss[0] + gen[0]
    excess = statistics.median(after_eval) - step if after_eval else 0.0
    evaluating = loss[0] + gen[0] + (evaluations - 1) * later + evaluations * max(excess, 0.0)
    training = args.project_steps * step
    total = training + evaluating + (m["final_eval_s"] or 0.0)
    return {"steps": args.project_steps, "evaluations": evaluations, "training_s": round(training, 1),
            "evaluation_s": round(evaluating, 1), "final_eval_s": m["final_eval_s"],
            "overhead": round(evaluating / total, 4), "per_later_evaluation_s": round(later, 1),
            "post_eval_step_excess_s": round(excess, 2)}


def run(args: Any) -> dict[str, Any]:
    """Model and data built once (bench's builder), then each backend's whole run and restart."""
    import torch
    from bench import SCRIPT, common_args, write_json

    stop_on_sigterm()
    work, logs = Path(args.work), Path(args.logs)
    work.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    args.whole_data = args.data if args.data_given else str(work / f"whole-headers-{args.image_size[0]}")
    report: dict[str, Any] = {"meta": {"command": sys.argv, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                                       "torch": torch.__version__, "cap_gb": args.cap_gb, "config": str(CONFIG),
                                       "steps": args.whole_steps, "eval_every": args.eval_every}, "backends": {}}
    if not (Path(args.model) / "wellocr_build.json").is_file():
        with open(logs / "build.log", "w") as log:
            subprocess.run([sys.executable, str(SCRIPT), "--worker", "build", *common_args(args), "--launched-at", "0"],
                           stdout=log, stderr=subprocess.STDOUT, check=True)
    ensure_data(args)
    for backend in [b for b in args.backends if b != "unsloth" or cuda]:
        measure(args, backend, report)
        write_json(Path(args.out), report)
    print_table(report)
    return report


def print_table(report: dict) -> None:
    print(f"\nwhole run under {report['meta']['cap_gb'] or 'no'} GiB cap, {report['meta']['steps']} steps, "
          f"evaluation every {report['meta']['eval_every']}")
    head = ["backend", "batch", "fallback", *(f"peak {p}" for p in PHASES), "samples/s", "eval overhead", "restart s"]
    print("| " + " | ".join(head) + " |")
    for backend, m in report["backends"].items():
        if "error" in m:
            print(f"| {backend} | {m['error']} |")
            continue
        peaks = [f"{m['peaks'][p]['peak_reserved_gib']}/{m['peaks'][p]['peak_allocated_gib']}"
                 if p in m["peaks"] and m["peaks"][p]["peak_reserved_gib"] is not None else "-" for p in PHASES]
        projection = m.get("projection") or {}
        print("| " + " | ".join(map(str, [
            backend, m["batch"],
            "yes" if m["fallback"] else "no", *peaks, m["samples_per_s"], projection.get("overhead"),
            m.get("restart", {}).get("to_first_step_s", "-")])) + " |")
