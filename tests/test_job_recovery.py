"""What a SkyPilot managed job relies on when it relaunches the trainer: a run is done only when the bucket holds
it, retries end when they make no progress, and a job without a bucket is refused before it costs anything."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import run_train
from wellocr import prices
from wellocr import train as T
from wellocr.checkpoint import MARKER
from wellocr.config import load_config
from wellocr.rundir import RunDir


def test_a_done_run_finishes_its_uploads_and_reads_them_back_before_exit_0(trained_run_copy, make_config, tmp_path):
    """Uploads that did not finish made the trainer exit 75; SkyPilot relaunched it on the same pod, where the run
    was done locally: it must upload final/ and eval/, read them back, and release the lock before exit 0."""
    bucket = tmp_path / "bucket"
    cfg = make_config(**{"run.run_name": "shared", "run.output_dir": str(trained_run_copy.parent),
                         "checkpoint.remote": f"file://{bucket}"})
    result = run_train("--config", str(cfg), "--resume-latest")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "already done (finished at step 8)" in result.stdout
    assert f"remote: final/ and eval/ verified at file://{bucket}/shared" in result.stdout
    stored = bucket / "shared"
    assert json.loads((stored / "final" / MARKER).read_text())["step"] == 8
    for file in (trained_run_copy / "eval").rglob("*"):
        if file.is_file():
            assert (stored / file.relative_to(trained_run_copy)).stat().st_size == file.stat().st_size
    assert not (trained_run_copy / ".lock").exists()
    attempt = RunDir(trained_run_copy).read()["attempts"][-1]
    assert (attempt["exit_reason"], attempt["exit_code"], attempt["start_step"], attempt["step"]) == \
        ("nothing-to-do", 0, 8, 8)
    assert attempt["uploaded_files"] > 0


def test_retryable_exits_without_progress_end_after_three(trained_run_copy, make_config, capsys):
    run = RunDir(trained_run_copy)
    stalled = {"exit_reason": "upload-incomplete", "exit_code": 75, "start_step": 8, "step": 8, "uploaded_files": 0}
    attempts = run.read()["attempts"]
    run.update(attempts=attempts + [{**stalled, "attempt": len(attempts) + i + 1} for i in range(3)])
    cfg = make_config(**{"run.run_name": "shared", "run.output_dir": str(trained_run_copy.parent)})
    shutil.rmtree(trained_run_copy / "final")  # not done: it would train again
    assert T.main(["--config", str(cfg), "--resume-latest"]) == 70
    err = capsys.readouterr().err
    assert "the last 3 attempts exited 75 (upload-incomplete) without a new step or a file uploaded" in err
    assert run.read()["attempts"][-1]["exit_reason"] == "no-progress"


@pytest.mark.parametrize("progress", [{"step": 9}, {"uploaded_files": 3}, {"exit_reason": "preempted"}])
def test_an_attempt_with_progress_or_a_preemption_resets_the_count(progress):
    stalled = {"exit_reason": "upload-incomplete", "exit_code": 75, "start_step": 8, "step": 8, "uploaded_files": 0}
    assert T.retries_without_progress([stalled] * 3)
    assert T.retries_without_progress([stalled, stalled, {**stalled, **progress}]) is None
    assert T.retries_without_progress([stalled] * 2) is None


def test_an_empty_wellocr_remote_is_refused_and_none_opts_out(make_config, monkeypatch, capsys):
    cfg = make_config(**{"run.run_name": "noremote"})
    monkeypatch.setenv("WELLOCR_REMOTE", "")
    assert T.main(["--config", str(cfg), "--preflight-only"]) == 2
    assert "WELLOCR_REMOTE is empty" in capsys.readouterr().err
    monkeypatch.setenv("WELLOCR_REMOTE", "none")
    assert load_config(cfg, ["checkpoint.remote=none"]).checkpoint.remote is None
    assert T.main(["--config", str(cfg), "--set", "checkpoint.remote=none", "--preflight-only"]) == 0


TASK_ID = "sky-managed-2026-11-29-10-00-00-000001_wellocr-r16_7-0"  # as SkyPilot 0.14 builds it
RESTARTED = "sky-managed-2026-11-29-12-30-00-000002_wellocr-r16_7-0"  # same job, the controller started again


@pytest.mark.parametrize("case, task_id, finished, chosen", [
    ("recovery", TASK_ID, True, "wellocr-r16-job7"),
    ("controller restart", RESTARTED, False, "wellocr-r16-job7"),
    ("recreated controller", RESTARTED, True, "wellocr-r16-job7-20261129123000000002"),
])
def test_the_run_stays_the_jobs_across_recoveries_and_controller_restarts_and_never_an_older_jobs(
        trained_run_copy, make_config, monkeypatch, capsys, case, task_id, finished, chosen):
    """A recovery keeps the task id; a restarted jobs controller gives the same job id a new task id (the run
    is unfinished: continue it); a recreated controller starts job ids again (the run of that id is finished:
    a new run, never the older job's checkpoints)."""
    run = trained_run_copy.rename(trained_run_copy.parent / "wellocr-r16-job7")
    RunDir(run).update(skypilot={"managed_job_id": "7", "task_ids": [TASK_ID]})
    if not finished:
        shutil.rmtree(run / "final")
        RunDir(run).update(status="running")
    before = RunDir(run).read()
    monkeypatch.setenv("SKYPILOT_TASK_ID", task_id)
    monkeypatch.setenv("SKYPILOT_MANAGED_JOB_ID", "7")
    cfg = make_config(**{"run.output_dir": str(run.parent)})
    assert T.main(["--config", str(cfg), "--resume-latest", "--preflight-only"]) == 0
    out = capsys.readouterr().out
    target = run.parent / chosen
    if chosen == run.name:
        assert f"resuming run directory {target}" in out
        assert RunDir(run).read()["skypilot"]["task_ids"] == sorted({TASK_ID, task_id})
    else:
        assert f"run directory {run} is not this job's: it is a finished run of an earlier job" in out
        assert RunDir(target).read()["skypilot"]["task_ids"] == [task_id]
        assert RunDir(run).read() == before  # the older job's run is left as it was


def test_an_explicit_wellocr_run_name_wins_over_the_jobs_name(make_config, monkeypatch, tmp_path):
    monkeypatch.setenv("SKYPILOT_TASK_ID", TASK_ID)
    monkeypatch.setenv("WELLOCR_RUN_NAME", "r16-first")
    assert T.main(["--config", str(make_config()), "--preflight-only"]) == 0
    assert RunDir(tmp_path / "runs" / "r16-first").exists()


def test_the_rehearsal_stops_once_after_a_checkpoint_recovers_from_the_bucket_and_passes(make_config, tmp_path):
    bucket, runs = tmp_path / "bucket", tmp_path / "runs"
    cfg = make_config(**{"run.run_name": "rehearsal", "checkpoint.remote": f"file://{bucket}",
                         "train.max_steps": 6, "train.save_steps": 2, "train.eval_steps": 6})
    first = run_train("--config", str(cfg), "--resume-latest", "--rehearse-preemption")
    assert first.returncode == 75, first.stderr[-2000:]
    assert "rehearsal: stopping after checkpoint-2 with exit 75" in first.stdout
    assert "rehearsal: PASS" not in first.stdout + first.stderr
    shutil.rmtree(runs)  # the recovery lands on a new pod: an empty disk
    second = run_train("--config", str(cfg), "--resume-latest", "--rehearse-preemption")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming from checkpoint-2 (step 2)" in second.stdout
    verdict = next(line for line in second.stdout.splitlines() if line.startswith("rehearsal:"))
    assert verdict.startswith("rehearsal: PASS: stopped after checkpoint-2, relaunched and resumed from it"), verdict
    assert f"read back from file://{bucket}/rehearsal" in verdict and "cost $" in verdict
    assert json.loads((bucket / "rehearsal" / "final" / MARKER).read_text())["step"] == 6


def test_a_rehearsal_that_never_stopped_or_had_no_bucket_fails(tmp_path):
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    run.update(attempts=[{"attempt": 1, "exit_reason": "finished", "start_step": 0, "started_at": 0, "ended_at": 9}])
    verdict = T.rehearsal_verdict(run, None, T.Outcome("finished", 0, 6))
    assert verdict.startswith("rehearsal: FAIL: the run never stopped after a checkpoint; no checkpoint.remote")


def test_a_recovery_on_another_cloud_continues_the_run_in_one_ledger_priced_per_cloud(make_config, tmp_path):
    """sky/train_r16.yaml's recovery across clouds: attempt 1 on a RunPod pod stops after its first checkpoint
    (exit 75), attempt 2 starts on an AWS machine with an empty disk, resumes from the bucket, and the run's one
    ledger holds two segments, each priced for its cloud and GPU, under one budget cap."""
    bucket, runs = tmp_path / "bucket", tmp_path / "runs"
    cfg = make_config(**{"run.run_name": "xcloud", "checkpoint.remote": f"file://{bucket}", "train.max_steps": 4,
                         "train.save_steps": 2, "train.eval_steps": 4, "eval.generation_samples": 1,
                         "cost.spot_instance": True, "cost.budget_cap": 1000.0})
    pods = [("RunPod", "RTX4090"), ("AWS", "L4")]  # cost.gpu_type names the GPU a CPU test cannot have
    results = []
    for cloud, gpu in pods:
        info = json.dumps({"cluster_name": "wellocr-r16-7", "cloud": cloud, "region": "r", "zone": None})
        results.append(run_train("--config", str(cfg), "--resume-latest", "--rehearse-preemption",
                                 "--set", f"cost.gpu_type={gpu}", env={"SKYPILOT_CLUSTER_INFO": info}))
        shutil.rmtree(runs, ignore_errors=True)  # the next attempt lands on another machine: an empty disk
    assert [r.returncode for r in results] == [75, 0], results[-1].stderr[-2000:]
    assert "resuming from checkpoint-2 (step 2)" in results[1].stdout
    segments = json.loads((bucket / "xcloud" / "cost.json").read_text())["segments"]
    table = prices.price_table()
    assert [(s["attempt"], s["cloud"], s["gpu_type"], s["hourly_rate"], s["start_step"]) for s in segments] == [
        (1, "runpod", "RTX4090", table[("runpod", "RTX4090")].spot, 0),
        (2, "aws", "L4", table[("aws", "L4")].spot, 2)]
    assert all("skypilot-catalog catalogs/v8/" in s["rate_source"] for s in segments)
    assert all(s["start_source"].startswith("boot (a SkyPilot pod: SKYPILOT_CLUSTER_INFO)") for s in segments)
    cost = subprocess.run([sys.executable, "-m", "wellocr.cost", "--run", str(bucket / "xcloud"), "--json"],
                          capture_output=True, text=True)
    report = json.loads(cost.stdout)
    assert list(report["clouds"]) == ["runpod", "aws"] and all(c["usd"] > 0 for c in report["clouds"].values())
    assert report["total_usd"] == pytest.approx(sum(c["usd"] for c in report["clouds"].values()))
