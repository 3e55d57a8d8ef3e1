"""W&B tracking and the cost ledger end to end on CPU (tiny model, `python -m wellocr.train` in subprocesses).

- What the Tracker hands to W&B: each trainer process runs with the Tracker seam recorded (RECORD_TRACKER), so the
  id and config of the real offline wandb run it opened and every `Run.log` call it made on it (tables with their
  columns, rows and images) land in a JSON-lines file: train/eval/cost keys, the worst-sample tables, and a config
  with secrets masked. Nothing reads wandb's private transaction log.
- A SIGKILL mid-training (the pod vanishing) and `--resume-latest`: the same W&B run id in run.json and in both
  attempts' offline runs, and one cost ledger with one segment per attempt that the report sums.
- The budget cap: exit 0 with a checkpoint, an unchanged cap stops again at once, a raised cap continues.

Per-sample losses (different across samples, equal to the model's own loss for one sample) are covered by
tests/test_evaluate.py (test_per_sample_losses_differ_between_samples, test_per_sample_loss_equals_...).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_train, smoke_settings
from wellocr.checkpoint import MARKER, incomplete_reason, latest_complete_checkpoint, list_checkpoints
from wellocr.ledger import segment_usd

SECRET = "hf_secret_value_123"  # HF_TOKEN of the trainer processes; also pasted into a config value
MAX_STEPS = 6
WORST_COLUMNS = ["step", "index", "image", "prediction", "reference", "loss", "cer", "wer"]


# ---------------------------------------------------------------- helpers


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (from /proc), parents first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop(0)
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started (W&B's wandb-core runs in its own session): a vanished pod."""
    pids = descendants(proc.pid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGSTOP)  # freeze first, so nothing reacts to the others dying
        except ProcessLookupError:
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def wait_for_complete_checkpoint(proc: subprocess.Popen, run_dir: Path, timeout: float = 300) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list(run_dir.glob(f"checkpoint-*/{MARKER}")):
            return run_dir
        assert proc.poll() is None, f"the trainer exited ({proc.returncode}) before its first checkpoint"
        time.sleep(0.05)
    raise AssertionError(f"no complete checkpoint under {run_dir} after {timeout} s")


# The trainer (`wellocr.train.main`, as `python -m wellocr.train` runs it) with the Tracker seam recorded: once
# Tracker.start has opened its wandb run, the run's id, mode and config (wandb's public Run API), then each Run.log
# call the Tracker makes on it, one JSON line each, written through before wandb sees the call (a SIGKILL loses
# nothing already logged). wandb.Table and wandb.Image values are recorded by their columns, rows and image size.
RECORD_TRACKER = r"""
import json, os, sys

import wandb

from wellocr import tracking
from wellocr.train import main

out = open(os.environ["WELLOCR_TEST_TRACKER_RECORD"], "a", buffering=1)


def jsonable(value):
    if isinstance(value, wandb.Table):
        return {"_type": "table", "columns": list(value.columns),
                "data": [[jsonable(v) for v in row] for row in value.data]}
    if isinstance(value, wandb.Image):
        return {"_type": "image", "size": list(value.image.size)}
    return value


def record(**event):
    out.write(json.dumps({"pid": os.getpid(), **event}, default=repr) + "\n")


start = tracking.Tracker.start


def recorded_start(self, *args, **kwargs):
    start(self, *args, **kwargs)
    run = self.wandb_run
    if run is None:
        return
    record(event="init", run_id=run.id, mode=run.settings.mode, config=run.config.as_dict())
    log = run.log

    def recorded_log(data, step=None, **options):
        record(event="log", step=step, data={key: jsonable(value) for key, value in data.items()})
        return log(data, step=step, **options)

    run.log = recorded_log


tracking.Tracker.start = recorded_start
sys.exit(main(sys.argv[1:]))
"""


def tracked_attempts(root: Path) -> list[dict]:
    """Per trainer process that opened a wandb run, in order: its run id, mode, config and history rows (what it
    passed to Run.log, with its `step` as `_step`). As in W&B's history, calls at the same step make one row."""
    attempts: dict[int, dict] = {}
    for line in (root / "tracker.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "init":
            attempts[event["pid"]] = {**{k: event[k] for k in ("run_id", "mode", "config")}, "history": []}
            continue
        history = attempts[event["pid"]]["history"]
        if event["step"] is not None and history and history[-1]["_step"] == event["step"]:
            history[-1].update(event["data"])
        else:
            history.append({**event["data"], "_step": event["step"]})
    return list(attempts.values())


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def wandb_env(root: Path) -> dict:
    """Offline W&B, its data/cache/config dirs (artifact staging included) under `root`, a secret in the env."""
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_TOKEN": SECRET,
           "WANDB_DATA_DIR": str(root / "wandb-data"), "WANDB_CACHE_DIR": str(root / "wandb-cache"),
           "WANDB_CONFIG_DIR": str(root / "wandb-config"), "WELLOCR_TEST_TRACKER_RECORD": str(root / "tracker.jsonl")}
    return env


def leaks(*bases: Path) -> list[str]:
    """Files under `bases` that hold the secret's value."""
    return [str(p) for base in bases for p in base.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


def popen_train(*args: str, env: dict, log: Path) -> subprocess.Popen:
    """The trainer with the Tracker seam recorded (RECORD_TRACKER), in the background."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-c", RECORD_TRACKER, *args], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **env})


def run_train_recorded(*args: str, env: dict) -> subprocess.CompletedProcess:
    """The trainer with the Tracker seam recorded (RECORD_TRACKER), to its end."""
    return subprocess.run([sys.executable, "-c", RECORD_TRACKER, *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, timeout=600)


# ---------------------------------------------------------------- one run, SIGKILLed after its first checkpoint


@pytest.fixture(scope="module")
def killed_run(tiny_model_dir, synth_data_dir, tmp_path_factory) -> dict:
    """W&B on (offline), a secret in the env, a billed rate; SIGKILL (the whole process tree) once the first
    checkpoint is complete, then `--resume-latest` to the end. Eval (loss, CER/WER, worst tables) runs at the end."""
    root = tmp_path_factory.mktemp("e2e")
    settings = smoke_settings(tiny_model_dir, synth_data_dir, root / "runs", **{
        "run.run_name": "killed", "wandb.enabled": True,
        "train.max_steps": MAX_STEPS, "train.save_steps": 2, "train.eval_steps": MAX_STEPS,
        "eval.max_new_tokens": 16, "cost.hourly_rate": 1.0, "cost.budget_cap": 0.0, "cost.bill_from": "boot"})
    config = root / "exp.yaml"
    config.write_text(yaml.safe_dump(settings))
    run_dir = root / "runs" / "killed"
    env = wandb_env(root)

    started = time.time()
    first = popen_train("--config", str(config), "--resume-latest", env=env, log=root / "attempt1.out")
    try:
        wait_for_complete_checkpoint(first, run_dir)
    finally:
        kill_tree(first)
    killed_after = time.time() - started
    assert first.returncode == -signal.SIGKILL
    resume_from = latest_complete_checkpoint(run_dir)
    after_kill = {"run_json": json.loads((run_dir / "run.json").read_text()),
                  "cost": json.loads((run_dir / "cost.json").read_text()), "checkpoint": resume_from.name}

    result = run_train_recorded("--config", str(config), "--resume-latest", env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"root": root, "run_dir": run_dir, "config": config, "after_kill": after_kill, "second": result,
            "env": env, "timings": {"killed_after_s": killed_after, "total_s": time.time() - started}}


def test_the_resumed_attempt_continues_from_the_checkpoint_complete_at_the_kill(killed_run):
    name = killed_run["after_kill"]["checkpoint"]
    step = int(name.split("-")[1])
    assert f"resuming from {name} (step {step})" in killed_run["second"].stdout
    info = json.loads((killed_run["run_dir"] / "run.json").read_text())
    # SIGKILL records nothing; the next attempt marks it
    assert [a["exit_reason"] for a in info["attempts"]] == ["vanished", "finished"]
    assert json.loads((killed_run["run_dir"] / "final" / MARKER).read_text())["step"] == MAX_STEPS


def test_wandb_run_id_survives_a_sigkill_and_resume_latest(killed_run):
    run_id = killed_run["after_kill"]["run_json"]["wandb_run_id"]
    assert run_id and json.loads((killed_run["run_dir"] / "run.json").read_text())["wandb_run_id"] == run_id
    runs = offline_runs(killed_run["run_dir"])
    assert len(runs) == 2, runs  # one offline run per attempt ...
    assert all(r.name.endswith(f"-{run_id}") and (r / f"run-{run_id}.wandb").is_file() for r in runs), runs
    killed, resumed = tracked_attempts(killed_run["root"])  # ... both the same W&B run, as each attempt opened it
    assert killed["run_id"] == resumed["run_id"] == run_id
    assert killed["mode"] == resumed["mode"] == "offline"
    assert f"W&B run {run_id} (offline)" in killed_run["second"].stdout


def test_wandb_receives_train_eval_and_cost_keys(killed_run):
    history = [row for attempt in tracked_attempts(killed_run["root"]) for row in attempt["history"]]
    keys = set().union(*history)
    for key in ("train/loss", "train/lr", "train/grad_norm", "eval/loss", "eval/cer", "eval/wer", "cost/usd",
                "cost/usd_per_step", "cost/projected_usd", "final/eval_cer", "final/test_cer"):
        assert key in keys, f"{key} never logged; logged: {sorted(keys)}"
    train_steps = sorted(row["_step"] for row in history if "train/loss" in row)
    resumed_at = int(killed_run["after_kill"]["checkpoint"].split("-")[1])
    # every step of the resumed attempt, at its own step number (what the killed one flushed may be lost)
    assert set(range(resumed_at + 1, MAX_STEPS + 1)) <= set(train_steps) <= set(range(1, MAX_STEPS + 1)), train_steps
    assert all(isinstance(row["train/loss"], float) and row["train/loss"] > 0 for row in history if "train/loss" in row)
    assert any(row.get("cost/usd", 0) > 0 for row in history)  # cost.hourly_rate 1.0: the run costs something
    [evaluation] = [row for row in history if "eval/cer" in row]
    assert evaluation["_step"] == MAX_STEPS and "eval/loss" in evaluation and 0 <= evaluation["eval/wer"]


@pytest.mark.parametrize("by", ["loss", "cer"])
def test_wandb_gets_the_worst_samples_table_with_images(killed_run, by):
    run = tracked_attempts(killed_run["root"])[-1]
    [row] = [row for row in run["history"] if f"eval/worst_by_{by}" in row]
    table = row[f"eval/worst_by_{by}"]  # a wandb.Table, logged at the eval step
    assert table["_type"] == "table" and row["_step"] == MAX_STEPS
    assert table["columns"] == WORST_COLUMNS and len(table["data"]) == 2
    records = [dict(zip(table["columns"], values)) for values in table["data"]]
    for record in records:
        assert record["step"] == MAX_STEPS
        assert record["image"]["_type"] == "image" and min(record["image"]["size"]) > 0  # a wandb.Image of the scan
        assert record["reference"].startswith("COMPANY:") and isinstance(record["prediction"], str)
        assert record["loss"] > 0 and record["cer"] >= 0 and record["wer"] >= 0
    ranked = [(r[by], r["loss"]) for r in records]
    assert ranked == sorted(ranked, reverse=True)  # worst first
    assert len({r["index"] for r in records}) == 2
    # wandb took it: the offline run holds the table's JSON among the files `wandb sync` uploads
    [written] = offline_runs(killed_run["run_dir"])[-1].glob(f"files/media/table/**/worst_by_{by}_*.table.json")
    assert json.loads(written.read_text())["columns"] == WORST_COLUMNS


def test_logged_config_is_the_resolved_config(killed_run):
    config = tracked_attempts(killed_run["root"])[-1]["config"]  # the wandb run's config, as wandb holds it
    saved = yaml.safe_load((killed_run["run_dir"] / "config.yaml").read_text())
    assert {k: v for k, v in config.items() if not k.startswith("_")} == saved
    assert config["train"]["max_steps"] == MAX_STEPS and config["cost"]["hourly_rate"] == 1.0


def test_the_secret_in_the_env_is_written_nowhere(killed_run):
    assert leaks(killed_run["run_dir"], killed_run["root"] / "wandb-data") == []


def test_cost_ledger_has_one_segment_per_attempt_and_the_report_sums_them(killed_run):
    run_dir = killed_run["run_dir"]
    segments = json.loads((run_dir / "cost.json").read_text())["segments"]
    assert [s["attempt"] for s in segments] == [1, 2]
    first, second = segments
    assert first == killed_run["after_kill"]["cost"]["segments"][0]  # an earlier segment is never rewritten
    resumed_at = int(killed_run["after_kill"]["checkpoint"].split("-")[1])
    assert (first["start_step"], second["start_step"], second["last_step"]) == (0, resumed_at, MAX_STEPS)
    # bill_from boot on the same host: the second segment starts where the first was last seen, no overlap
    assert second["start"] >= first["last_heartbeat"] and first["start"] < first["last_heartbeat"]
    assert second["start_source"] == "boot (after the previous segment on this host)"
    assert all(segment_usd(s) > 0 for s in segments)

    report = subprocess.run([sys.executable, "-m", "wellocr.cost", "--run", str(run_dir), "--json"],
                            capture_output=True, text=True, cwd=REPO)
    assert report.returncode == 0, report.stderr
    data = json.loads(report.stdout)
    assert data["total_usd"] == pytest.approx(sum(segment_usd(s) for s in segments), rel=1e-12)
    assert (data["segments"], data["attempts"], data["steps_done"], data["max_steps"]) == (2, 2, MAX_STEPS, MAX_STEPS)
    assert data["hourly_rate"] == 1.0 and data["rate_source"] == "config (cost.hourly_rate)"
    printed = re.search(r"^cost: \$([0-9.]+) over 2 attempt\(s\)", killed_run["second"].stdout, re.MULTILINE)
    assert printed and 0 < float(printed.group(1)) <= data["total_usd"]  # printed before the last heartbeat


# ---------------------------------------------------------------- a secret pasted into a config value


@pytest.fixture(scope="module")
def secret_run(tiny_model_dir, synth_data_dir, tmp_path_factory) -> dict:
    """A short W&B run whose config holds the value of a secret env var (HF_TOKEN) in data.instruction."""
    root = tmp_path_factory.mktemp("secret")
    settings = smoke_settings(tiny_model_dir, synth_data_dir, root / "runs", **{
        "run.run_name": "secret", "wandb.enabled": True, "data.instruction": f"Transcribe the header ({SECRET}).",
        "train.max_steps": 2, "train.save_steps": 2, "train.eval_steps": 2, "eval.generation_samples": 0,
        "eval.max_new_tokens": 8})
    config = root / "exp.yaml"
    config.write_text(yaml.safe_dump(settings))
    env = wandb_env(root)
    result = run_train_recorded("--config", str(config), env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"root": root, "run_dir": root / "runs" / "secret", "config": config, "env": env}


def test_logged_and_saved_config_mask_a_secret_value(secret_run):
    assert len(offline_runs(secret_run["run_dir"])) == 1
    [attempt] = tracked_attempts(secret_run["root"])
    config = attempt["config"]
    assert config["data"]["instruction"] == "Transcribe the header (***)."
    saved = yaml.safe_load((secret_run["run_dir"] / "config.yaml").read_text())
    assert saved["data"]["instruction"] == "Transcribe the header (***)."
    assert leaks(secret_run["run_dir"], secret_run["root"] / "wandb-data") == []


def test_a_run_whose_config_holds_a_secret_value_can_be_resumed(secret_run, tmp_path):
    import shutil

    copy = tmp_path / "runs" / "secret"
    shutil.copytree(secret_run["run_dir"], copy)
    result = run_train("--config", str(secret_run["config"]), "--resume-latest", "--set", "max_steps=3",
                       "--set", f"run.output_dir={copy.parent}", env=secret_run["env"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from checkpoint-2 (step 2)" in result.stdout


# ---------------------------------------------------------------- the budget cap

# The segment is billed from the moment the ledger opens (not from the process start, whose distance to the first
# step depends on the machine's load): it costs exactly $0 when the ledger opens, so the cap is not reached at the
# start, and at 1e6 USD/h a cap of $1 (3.6 ms) is always reached by the first logged step. CostCallback requests the
# stop in on_log of step 1, after StopCallback.on_step_end of that step: training stops, saving, at step 2.
BILL_FROM_LEDGER_OPEN = (
    "import sys, time; import wellocr.ledger as ledger; "
    "ledger.process_start_time = lambda: (time.time(), 'process'); "
    "from wellocr.train import main; sys.exit(main(sys.argv[1:]))"
)


def train_billed_from_open(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BILL_FROM_LEDGER_OPEN, *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=600)


def test_budget_cap_stops_with_exit_0_and_a_checkpoint_and_a_raised_cap_continues(make_config, tmp_path):
    cfg = make_config(**{"run.run_name": "capped", "train.max_steps": 8, "train.save_steps": 8,
                         "train.eval_steps": 8, "eval.generation_samples": 0, "eval.max_new_tokens": 16,
                         "cost.hourly_rate": 1e6, "cost.budget_cap": 1.0, "cost.bill_from": "process"})
    run_dir = tmp_path / "runs" / "capped"

    stopped = train_billed_from_open("--config", str(cfg))
    assert stopped.returncode == 0, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert "wellocr: budget cap $1.00 reached ($" in stopped.stdout
    assert "spent over 1 attempt); raise cost.budget_cap and run --resume-latest" in stopped.stdout
    assert "exit: budget (code 0)" in stopped.stdout
    info = json.loads((run_dir / "run.json").read_text())
    [attempt] = info["attempts"]
    assert info["status"] == "budget" and (attempt["exit_reason"], attempt["exit_code"]) == ("budget", 0)
    step = attempt["step"]
    assert step == 2
    checkpoint = run_dir / f"checkpoint-{step}"
    assert incomplete_reason(checkpoint) is None  # the stop saved a complete checkpoint at the stop step ...
    assert [c.name for c in list_checkpoints(run_dir)] == [checkpoint.name]  # ... the only one (save_steps 8)
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    assert not (run_dir / "final").exists()
    spent = sum(segment_usd(s) for s in json.loads((run_dir / "cost.json").read_text())["segments"])
    assert spent >= 1.0

    again = train_billed_from_open("--config", str(cfg), "--resume-latest")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "wellocr: budget cap $1.00 reached" in again.stdout and "over 2 attempts" in again.stdout
    assert "max sequence length" not in again.stdout  # stopped before loading the model and the data
    assert [c.name for c in list_checkpoints(run_dir)] == [checkpoint.name] and not (run_dir / "final").exists()
    assert json.loads((run_dir / "run.json").read_text())["attempts"][-1]["exit_reason"] == "budget"

    raised = train_billed_from_open("--config", str(cfg), "--resume-latest", "--set", "cost.budget_cap=1000000000")
    assert raised.returncode == 0, raised.stdout[-3000:] + raised.stderr[-3000:]
    assert f"resuming from checkpoint-{step} (step {step})" in raised.stdout
    assert "wellocr: budget cap" not in raised.stdout  # no stop (the closing cost report names the cap, raised)
    assert json.loads((run_dir / "final" / MARKER).read_text())["step"] == 8
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished"
    assert [a["exit_reason"] for a in info["attempts"]] == ["budget", "budget", "finished"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["cost"]["budget_cap"] == 1_000_000_000
