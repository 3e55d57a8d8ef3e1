"""`python -m wellocr.train` given what a user gets wrong: each mistake is one line and an exit code, never a
traceback, and never a run on the wrong data or from the wrong step."""

import os
import shutil
import socket
import subprocess
import sys
import time

from conftest import REPO
from wellocr import train as T


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_output_dir_that_cannot_be_created_is_a_one_line_error(make_config, capsys):
    cfg = make_config()  # a generated run name: remembered under the output dir before the run directory exists
    assert T.main(["--config", str(cfg), "--set", "run.output_dir=/proc/wellocr-out", "--preflight-only"]) == 2
    err = capsys.readouterr().err
    assert "run.output_dir: cannot create /proc/wellocr-out" in err and "Traceback" not in err


def test_a_hub_model_under_hf_hub_offline_says_so(make_config, capsys):
    cfg = make_config(**{"run.run_name": "offline"})
    assert T.main(["--config", str(cfg), "--set", "model.model_name=someone/not-cached-model",
                   "--preflight-only"]) == 2
    err = capsys.readouterr().err
    assert "'someone/not-cached-model' is not in the local HF cache and HF_HUB_OFFLINE=1 forbids downloading" in err
    assert "config.json" not in err


def test_an_unreachable_hub_is_retried_for_a_bounded_time_then_exit_69(make_config):
    """The hub at a closed local port: retried with backoff within the budget, then one line and exit 69 (not in
    the managed job's recover_on_exit_codes, so a paid pod is not relaunched over and over)."""
    cfg = make_config(**{"run.run_name": "unreachable"})
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
           "WELLOCR_NETWORK_RETRY_S": "4", "PYTHONUNBUFFERED": "1"}
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "wellocr.train", "--config", str(cfg), "--set",
                             "model.model_name=someone/some-model", "--preflight-only"], capture_output=True,
                            text=True, env=env, cwd=REPO, timeout=120)
    assert result.returncode == 69, result.stderr[-2000:]
    assert "model.model_name: the hub for 'someone/some-model': unreachable after 4 s of retries" in result.stderr
    assert result.stderr.count("network error") >= 2  # retried, not given up at the first failure
    assert "Traceback" not in result.stderr and time.time() - started < 60


def test_a_start_that_failed_before_a_checkpoint_does_not_block_the_corrected_one(make_config, tmp_path, capsys):
    cfg = make_config(**{"run.run_name": "fixed-name"})
    assert T.main(["--config", str(cfg), "--set", f"data.dataset_name={tmp_path}/typo"]) == 2
    run = tmp_path / "runs" / "fixed-name"
    assert (run / "config.yaml").is_file()  # the failed start left its run directory behind
    capsys.readouterr()
    for resume in ([], ["--resume-latest"]):  # both a fresh start and a resume accept the corrected config
        assert T.main(["--config", str(cfg), *resume, "--preflight-only"]) == 0
        assert f"run directory {run} never reached a checkpoint: starting it again" in capsys.readouterr().out
    assert str(tmp_path / "typo") not in (run / "config.yaml").read_text()


def test_resuming_past_max_steps_is_refused_naming_the_step_and_the_flag(trained_run_copy, make_config, capsys):
    shutil.rmtree(trained_run_copy / "final")  # preempted after its last checkpoint, before final/
    cfg = make_config(**{"run.run_name": "shared", "run.output_dir": str(trained_run_copy.parent)})
    code = T.main(["--config", str(cfg), "--resume-latest", "--set", "max_steps=4", "--set", "save_steps=4",
                   "--set", "eval_steps=4"])
    assert code == 2
    err = capsys.readouterr().err
    assert "checkpoint-8 is at step 8, past train.max_steps 4" in err and "--set train.max_steps=N" in err
    assert not (trained_run_copy / "final").exists()


def test_a_mistyped_data_path_is_an_error_not_a_fresh_synthetic_set(tmp_path, tiny_model_dir, capsys):
    """build_synthetic_if_missing builds only at the config file's own data.dataset_name."""
    config = tmp_path / "smoke.yaml"
    text = (REPO / "configs" / "cpu_smoke.yaml").read_text()
    text = text.replace(".cache/tiny-qwen3-vl", str(tiny_model_dir)).replace(".cache/synthetic-headers",
                                                                              str(tmp_path / "headers"))
    config.write_text(text.replace("output_dir: runs", f"output_dir: {tmp_path / 'runs'}"))
    typo = tmp_path / "headrs"
    assert T.main(["--config", str(config), "--set", f"data.dataset_name={typo}", "--preflight-only"]) == 2
    assert f"data.dataset_name: {typo} does not exist" in capsys.readouterr().err
    assert not typo.exists() and not (tmp_path / "headers").exists()


def test_resume_given_a_run_directory_says_so_and_what_to_pass(trained_run_copy, capsys):
    assert T.main(["--resume", str(trained_run_copy)]) == 2
    err = capsys.readouterr().err
    assert f"--resume {trained_run_copy}: this is a run directory, not a checkpoint" in err
    assert f"pass --resume {trained_run_copy / 'checkpoint-8'}" in err
