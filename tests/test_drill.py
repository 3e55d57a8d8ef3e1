"""scripts/preemption_drill.sh in CI: a managed job's `run:` section, SIGKILLed mid-training and run again, in both
checkpoint layouts: (a) volume, sky/train_r16_volume.yaml (the run directory survives), and (b) object storage,
sky/train_r16.yaml against a real S3 API (moto's server on localhost, s3fs in the trainer), where the recovery
starts from an empty output directory.

The tests call the script itself (so it cannot rot) and then check its work directory independently of its
PASS lines. The shared tiny model and data set are passed in (DRILL_MODEL / DRILL_DATA): nothing is built or
written in the repo tree.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from wellocr.checkpoint import MARKER

SCRIPT = REPO / "scripts" / "preemption_drill.sh"
MAX_STEPS = 6  # attempt 1 is killed once checkpoint-2 (or a later one) is complete; one evaluation, at the end
DRILL_ARGS = (f"--set max_steps={MAX_STEPS} --set save_steps=2 --set eval_steps={MAX_STEPS} "
              "--set eval.max_new_tokens=16 --set eval.generation_samples=2")
AWS = {"AWS_ACCESS_KEY_ID": "dummy-access-key-id", "AWS_SECRET_ACCESS_KEY": "dummy-secret-for-the-drill",
       "AWS_DEFAULT_REGION": "us-east-1"}


def repo_state() -> dict:
    """What the drill could leave in the repo tree: a run under runs/, the cpu_smoke assets under .cache/, wandb/."""
    runs = REPO / "runs"
    state = {name: (REPO / name).exists() for name in (".cache/tiny-qwen3-vl", ".cache/synthetic-headers", "wandb")}
    return {**state, "runs": sorted(p.name for p in runs.glob("sky-managed-*")) if runs.is_dir() else []}


def drill(work: Path, tiny_model_dir: Path, synth_data_dir: Path, *args: str, env: dict | None = None):
    full_env = {**os.environ, "DRILL_MODEL": str(tiny_model_dir), "DRILL_DATA": str(synth_data_dir),
                "DRILL_EXTRA_ARGS": DRILL_ARGS, "WANDB_MODE": "offline", **(env or {})}
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):  # a developer's AWS setup
        full_env.pop(name, None)
    before = repo_state()
    result = subprocess.run(["bash", str(SCRIPT), "--workdir", str(work), "--timeout", "300", *args], cwd=REPO,
                            env=full_env, capture_output=True, text=True, timeout=900)
    assert repo_state() == before, "the drill wrote into the repo tree"
    return result


class Drill:
    """A finished drill: its output and what it left in its work directory."""

    def __init__(self, work: Path, result: subprocess.CompletedProcess, out2: Path, task: Path):
        self.work, self.result, self.task = work, result, yaml.safe_load(task.read_text())
        self.after_kill = json.loads((work / "after-kill.json").read_text())
        self.run = self.after_kill["run"]
        self.run_dir = out2 / self.run
        self.log2 = (work / "attempt-2.log").read_text()

    def passes(self) -> list[str]:
        return [line for line in self.result.stdout.splitlines() if line.startswith("PASS ")]


@pytest.fixture(scope="module")
def volume_drill(tiny_model_dir, synth_data_dir, tmp_path_factory) -> Drill:
    work = tmp_path_factory.mktemp("drill-volume")
    result = drill(work, tiny_model_dir, synth_data_dir, "--task", "sky/train_r16_volume.yaml")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return Drill(work, result, work / "volume" / "runs", REPO / "sky" / "train_r16_volume.yaml")


@pytest.fixture(scope="module")
def moto_url():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def bucket(moto_url):
    import boto3

    client = boto3.client("s3", endpoint_url=moto_url, aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"], region_name=AWS["AWS_DEFAULT_REGION"])
    client.bucket = f"wellocr-drill-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=client.bucket)
    return client


@pytest.fixture(scope="module")
def remote_drill(tiny_model_dir, synth_data_dir, tmp_path_factory, moto_url, bucket) -> Drill:
    work = tmp_path_factory.mktemp("drill-remote")
    result = drill(work, tiny_model_dir, synth_data_dir, "--remote", f"s3://{bucket.bucket}/drill",
                   env={**AWS, "AWS_ENDPOINT_URL": moto_url})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return Drill(work, result, work / "pod-2" / "runs", REPO / "sky" / "train_r16.yaml")


def remote_keys(bucket, prefix: str) -> set[str]:
    pages = bucket.get_paginator("list_objects_v2").paginate(Bucket=bucket.bucket, Prefix=prefix)
    return {obj["Key"][len(prefix):] for page in pages for obj in page.get("Contents", [])}


# ---------------------------------------------------------------- both layouts


@pytest.fixture(params=["volume", "remote"])
def done(request) -> Drill:
    return request.getfixturevalue(f"{request.param}_drill")


def test_drill_passes_every_check(done):
    assert "drill: PASS (0 check(s) failed)" in done.result.stdout
    assert not [line for line in done.result.stdout.splitlines() if line.startswith("FAIL")]
    checks = " | ".join(done.passes())
    for what in ("SIGKILLed mid-training", "resumed from checkpoint-", "exited 0", "finished at max_steps",
                 "one W&B run", "one cost ledger", "evaluation report"):
        assert what in checks, done.result.stdout


def test_the_pod_got_skypilots_variables_and_the_tasks_envs(done):
    # the run is named after SKYPILOT_TASK_ID (sky-managed-<time>_<task name>_<job id>-<task index>)
    assert done.run.startswith("sky-managed-") and done.run.endswith(f"_{done.task['name']}_1-0")
    script = (done.work / "pod-2.sh").read_text()
    for line in ("export SKYPILOT_NODE_RANK=0", "export SKYPILOT_NUM_GPUS_PER_NODE=0",
                 "export SKYPILOT_MANAGED_JOB_ID=1", "export WELLOCR_CONFIG=configs/cpu_smoke.yaml"):
        assert line in script
    assert script.endswith(done.task["run"])
    assert f"wellocr: run directory {done.run_dir}" in done.log2


def test_the_recovery_resumed_from_the_last_complete_checkpoint_and_finished(done):
    checkpoint = done.after_kill["checkpoint"]
    step = int(checkpoint.split("-")[1])
    assert 2 <= step < MAX_STEPS and not done.after_kill["final_exists"]
    assert f"resuming from {checkpoint} (step {step})" in done.log2
    assert json.loads((done.run_dir / "final" / MARKER).read_text())["step"] == MAX_STEPS
    assert "exit: finished (code 0)" in done.log2 and "wellocr: trainer exit code 0" in done.log2
    assert (done.run_dir / "eval" / "final" / "report.html").stat().st_size > 0


def test_one_wandb_run_and_one_cost_ledger_across_the_kill(done):
    info = json.loads((done.run_dir / "run.json").read_text())
    assert info["wandb_run_id"] and info["wandb_run_id"] == done.after_kill["wandb_run_id"]
    assert [a["exit_reason"] for a in info["attempts"]] == ["vanished", "finished"]
    segments = json.loads((done.run_dir / "cost.json").read_text())["segments"]
    assert [s["attempt"] for s in segments] == [1, 2]
    assert segments[1]["start"] >= segments[0]["last_heartbeat"]  # same host: nothing billed twice
    assert segments[1]["start_step"] == int(done.after_kill["checkpoint"].split("-")[1])


# ---------------------------------------------------------------- layout specifics


def test_volume_layout_kept_both_attempts_in_one_run_directory(volume_drill):
    runs = sorted(p.name for p in (volume_drill.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(volume_drill.after_kill["wandb_run_id"]) for r in runs)
    assert not (volume_drill.work / "pod-2").exists()
    assert f"export HF_HOME={volume_drill.work}/hf-home" in (volume_drill.work / "pod-2.sh").read_text()


def test_remote_layout_recovered_into_an_empty_directory_from_the_bucket(remote_drill, bucket):
    checkpoint = remote_drill.after_kill["checkpoint"]
    assert f"remote: restored {checkpoint} " in remote_drill.log2
    assert "remote: restored run.json" in remote_drill.log2 and "remote: restored cost.json" in remote_drill.log2
    first_pod = remote_drill.work / "pod-1" / "runs" / remote_drill.run
    assert not (first_pod / "final").exists()  # the first pod never finished: the second did it all from the bucket
    keys = remote_keys(bucket, f"drill/{remote_drill.run}/")
    assert {f"final/{MARKER}", "eval/final/report.html", "run.json", "cost.json", "logs/attempt-2.log"} <= keys
    remote_info = json.loads(bucket.get_object(Bucket=bucket.bucket,
                                               Key=f"drill/{remote_drill.run}/run.json")["Body"].read())
    assert remote_info["wandb_run_id"] == remote_drill.after_kill["wandb_run_id"]
    assert "dummy-secret-for-the-drill" not in remote_drill.log2


def test_remote_layout_restores_the_runs_config(remote_drill, bucket):
    assert "config.yaml" in remote_keys(bucket, f"drill/{remote_drill.run}/")
    assert "remote: restored config.yaml" in remote_drill.log2


# ---------------------------------------------------------------- the drill can fail


def test_drill_fails_when_the_recovery_does_not_resume(tiny_model_dir, synth_data_dir, tmp_path):
    """A task whose run: section forgets --resume-latest: the trainer refuses the existing run directory."""
    task = yaml.safe_load((REPO / "sky" / "train_r16.yaml").read_text())
    assert " --resume-latest" in task["run"]
    task["run"] = task["run"].replace(" --resume-latest", "")
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(task))
    result = drill(tmp_path / "work", tiny_model_dir, synth_data_dir, "--task", str(broken))
    assert result.returncode == 1
    assert "FAIL attempt 2 did not print 'resuming from checkpoint-" in result.stdout
    assert "FAIL attempt 2 exited 2" in result.stdout
    assert "drill: FAIL" in result.stdout and "already exists; continue it with --resume-latest" in result.stdout


def test_usage(tmp_path):
    helped = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--remote URL" in helped.stdout and "DRILL_EXTRA_ARGS" in helped.stdout
    wrong = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "unknown argument --bogus" in wrong.stderr
