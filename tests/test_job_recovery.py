"""What a SkyPilot managed job relies on when it relaunches the trainer: a run is done only when the bucket holds
it, retries end when they make no progress, and a job without a bucket is refused before it costs anything."""

import json
import shutil

import pytest

from conftest import run_train
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
