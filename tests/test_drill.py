"""`python -m wellocr.drill` in CI: a managed job's `run:` section run as SkyPilot runs it, in both checkpoint
layouts: (a) volume, sky/train_r16_volume.yaml (the run directory survives), and (b) object storage,
sky/train_r16.yaml against a real S3 API (moto's server on localhost, s3fs in the trainer), where a new pod starts
from an empty output directory.

Scenarios: the kill drill (SIGKILL at a checkpoint, recovery), the controller restart (the recovery gets a new task
id; a later job reusing the id gets a new run), the done run whose final/ and eval/ vanished from the bucket, retries
without progress through a proxy refusing uploads, and the rehearsal's self-stop. The tests call the drill itself
(so it cannot rot) and then check what it left in its work directory and in the bucket, independently of its PASS
lines. Runs that later scenarios change are read into the fixture's object as soon as their scenario ends.
The shared tiny model and data set are passed in (DRILL_MODEL / DRILL_DATA): nothing is built or written in the
repo tree.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from wellocr.checkpoint import MARKER

MAX_STEPS = 6  # the first launch is killed once checkpoint-2 (or a later one) is complete; one evaluation, at the end
DRILL_ARGS = (f"--set max_steps={MAX_STEPS} --set save_steps=2 --set eval_steps={MAX_STEPS} "
              "--set eval.max_new_tokens=16 --set eval.generation_samples=2")
AWS = {"AWS_ACCESS_KEY_ID": "dummy-access-key-id", "AWS_SECRET_ACCESS_KEY": "dummy-secret-for-the-drill",
       "AWS_DEFAULT_REGION": "us-east-1"}
TASK_ID = re.compile(r"^sky-managed-\d{4}-\d\d-\d\d-\d\d-\d\d-\d\d-\d{6}_(?P<name>.+)_(?P<job>\d+)-0$")


def repo_state() -> dict:
    """What the drill could leave in the repo tree: a run under runs/, the cpu_smoke assets under .cache/, wandb/."""
    runs = REPO / "runs"
    state = {name: (REPO / name).exists() for name in (".cache/tiny-qwen3-vl", ".cache/synthetic-headers", "wandb")}
    return {**state, "runs": sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []}


def drill(work: Path, tiny_model_dir: Path, synth_data_dir: Path, *args: str, env: dict | None = None):
    full_env = {**os.environ, "DRILL_MODEL": str(tiny_model_dir), "DRILL_DATA": str(synth_data_dir),
                "DRILL_EXTRA_ARGS": DRILL_ARGS, "WANDB_MODE": "offline", **(env or {})}
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):  # a developer's AWS setup
        full_env.pop(name, None)
    before = repo_state()
    result = subprocess.run([sys.executable, "-m", "wellocr.drill", "--workdir", str(work), "--timeout", "300", *args],
                            cwd=REPO, env=full_env, capture_output=True, text=True, timeout=900)
    assert repo_state() == before, "the drill wrote into the repo tree"
    return result


def remote_keys(bucket, prefix: str) -> dict[str, int]:
    pages = bucket.get_paginator("list_objects_v2").paginate(Bucket=bucket.bucket, Prefix=prefix)
    return {obj["Key"][len(prefix):]: obj["Size"] for page in pages for obj in page.get("Contents", [])}


class Drill:
    """A finished drill scenario: its output, and what it left in its work directory (and the bucket), read now."""

    def __init__(self, work: Path, result: subprocess.CompletedProcess, scenario: str, task: Path,
                 bucket=None, prefix: str = ""):
        self.work, self.result, self.task = work, result, yaml.safe_load(task.read_text())
        state = json.loads((work / "drill.json").read_text())
        self.launches = [x for x in state["launches"] if x["scenario"] == scenario]
        self.finished = state["finished"]
        self.logs = [(work / x["log"]).read_text() for x in self.launches]
        self.scripts = [(work / x["script"]).read_text() for x in self.launches]
        self.run = self.finished["run"]
        self.run_dir = Path(self.finished["output_dir"]) / self.run
        self.info = json.loads((self.run_dir / "run.json").read_text())
        self.segments = json.loads((self.run_dir / "cost.json").read_text())["segments"]
        self.stored = remote_keys(bucket, f"{prefix}/{self.run}/") if bucket is not None else None

    @property
    def codes(self) -> list:
        return [x["rc"] for x in self.launches]

    def passes(self) -> list[str]:
        return [line for line in self.result.stdout.splitlines() if line.startswith("PASS ")]


def passed(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert "drill: PASS (0 check(s) failed)" in result.stdout
    assert not [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    return result


@pytest.fixture(scope="module")
def volume_drill(tiny_model_dir, synth_data_dir, tmp_path_factory) -> Drill:
    """The kill drill with a controller restart: the recovery gets a new task id; then a job reusing the id."""
    work = tmp_path_factory.mktemp("drill-volume")
    result = passed(drill(work, tiny_model_dir, synth_data_dir, "--scenario", "controller-restart",
                          "--task", "sky/train_r16_volume.yaml"))
    return Drill(work, result, "controller-restart", REPO / "sky" / "train_r16_volume.yaml")


@pytest.fixture(scope="module")
def bucket(moto_url):
    import boto3

    client = boto3.client("s3", endpoint_url=moto_url, aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"], region_name=AWS["AWS_DEFAULT_REGION"])
    client.bucket = f"wellocr-drill-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=client.bucket)
    return client


@pytest.fixture(scope="module")
def remote_work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("drill-remote")


def remote_scenario(scenario, work, tiny_model_dir, synth_data_dir, moto_url, bucket, prefix="drill", task=None):
    args = ["--scenario", scenario, "--remote", f"s3://{bucket.bucket}/{prefix}"] + (["--task", task] if task else [])
    result = drill(work, tiny_model_dir, synth_data_dir, *args, env={**AWS, "AWS_ENDPOINT_URL": moto_url})
    return Drill(work, passed(result), scenario, REPO / (task or "sky/train_r16.yaml"), bucket, prefix)


@pytest.fixture(scope="module")
def remote_drill(tiny_model_dir, synth_data_dir, remote_work, moto_url, bucket) -> Drill:
    return remote_scenario("kill", remote_work, tiny_model_dir, synth_data_dir, moto_url, bucket)


@pytest.fixture(scope="module")
def done_upload(remote_drill, tiny_model_dir, synth_data_dir, remote_work, moto_url, bucket) -> Drill:
    """The kill drill's finished run, its final/ and eval/ deleted from the bucket, relaunched on the same pod."""
    return remote_scenario("done-upload", remote_work, tiny_model_dir, synth_data_dir, moto_url, bucket)


@pytest.fixture(scope="module")
def no_progress(done_upload, tiny_model_dir, synth_data_dir, remote_work, moto_url, bucket) -> Drill:
    """The same finished run, final/ deleted from the bucket, relaunched while every upload gets a 503."""
    return remote_scenario("no-progress", remote_work, tiny_model_dir, synth_data_dir, moto_url, bucket)


@pytest.fixture(scope="module")
def rehearsal(tiny_model_dir, synth_data_dir, tmp_path_factory, moto_url, bucket) -> Drill:
    return remote_scenario("rehearsal", tmp_path_factory.mktemp("drill-rehearsal"), tiny_model_dir, synth_data_dir,
                           moto_url, bucket, prefix="rehearsal", task="sky/rehearsal.yaml")


# ---------------------------------------------------------------- a SIGKILL and the recovery, both layouts


@pytest.fixture(params=["volume", "remote"])
def done(request) -> Drill:
    return request.getfixturevalue(f"{request.param}_drill")


def test_drill_passes_every_check(done):
    checks = " | ".join(done.passes())
    for what in ("SIGKILLed mid-training", "resumed from checkpoint-", "exited 0", "finished at max_steps",
                 "one W&B run", "one cost ledger", "evaluation report"):
        assert what in checks, done.result.stdout


def test_the_pod_got_skypilots_variables_and_the_tasks_envs(done):
    # a managed job's run is named after the task and the job id, not after SKYPILOT_TASK_ID
    assert done.run == f"{done.task['name']}-job1"
    first, second = done.scripts[:2]
    for line in ("export SKYPILOT_NODE_RANK=0", "export SKYPILOT_NUM_GPUS_PER_NODE=0",
                 "export SKYPILOT_MANAGED_JOB_ID=1", "export WELLOCR_CONFIG=configs/cpu_smoke.yaml"):
        assert line in second
    assert second.endswith(done.task["run"]) and first.endswith(done.task["run"])
    for launch, script in zip(done.launches, done.scripts):
        match = TASK_ID.match(launch["task_id"])
        assert match and (match["name"], match["job"]) == (done.task["name"], "1")
        assert f"export SKYPILOT_TASK_ID={launch['task_id']}" in script
    assert f"  output   {done.run_dir}" in done.logs[1]
    assert "WELLOCR_REMOTE" not in first or "export WELLOCR_REMOTE=s3://" in first


def test_the_recovery_resumed_from_the_last_complete_checkpoint_and_finished(done):
    after_kill = json.loads((done.work / "after-kill.json").read_text())
    checkpoint = after_kill["checkpoint"]
    step = int(checkpoint.split("-")[1])
    assert 2 <= step < MAX_STEPS and not after_kill["final_exists"] and after_kill["rc"] == 137
    assert done.launches[0]["killed"] and done.launches[1]["rc"] == 0
    assert f"resuming from {checkpoint} (step {step})" in done.logs[1]
    assert json.loads((done.run_dir / "final" / MARKER).read_text())["step"] == MAX_STEPS
    assert "exit: finished (code 0)" in done.logs[1] and "wellocr: trainer exit code 0" in done.logs[1]
    assert (done.run_dir / "eval" / "final" / "report.html").stat().st_size > 0


def test_one_wandb_run_and_one_cost_ledger_across_the_kill(done):
    after_kill = json.loads((done.work / "after-kill.json").read_text())
    assert done.info["wandb_run_id"] and done.info["wandb_run_id"] == after_kill["wandb_run_id"]
    assert [a["exit_reason"] for a in done.info["attempts"]] == ["vanished", "finished"]
    assert [s["attempt"] for s in done.segments] == [1, 2]
    assert done.segments[1]["start"] >= done.segments[0]["last_heartbeat"]  # same host: nothing billed twice
    assert done.segments[1]["start_step"] == int(after_kill["checkpoint"].split("-")[1])


# ---------------------------------------------------------------- layout specifics


def test_volume_layout_kept_both_attempts_in_one_run_directory(volume_drill):
    runs = sorted(p.name for p in (volume_drill.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(volume_drill.info["wandb_run_id"]) for r in runs)
    assert not list(volume_drill.work.glob("pod-*"))
    assert {x["output_dir"] for x in volume_drill.launches} == {str(volume_drill.work / "volume" / "runs")}
    assert f"export HF_HOME={volume_drill.work}/hf-home" in volume_drill.scripts[1]


def test_a_restarted_controllers_recovery_continues_the_same_run(volume_drill):
    """SkyPilot 0.14 builds SKYPILOT_TASK_ID from the controller's start: a restarted controller recovers the same
    job (same SKYPILOT_MANAGED_JOB_ID) with a new task id, and the trainer must continue the same run."""
    first, second = volume_drill.launches[:2]
    assert first["task_id"] != second["task_id"] and first["run"] == second["run"] == volume_drill.run
    assert volume_drill.info["skypilot"] == {"managed_job_id": "1",
                                             "task_ids": sorted([first["task_id"], second["task_id"]])}
    assert f"resuming run directory {volume_drill.run_dir}" in volume_drill.logs[1]


def test_a_new_job_reusing_a_finished_jobs_id_gets_a_new_run(volume_drill):
    """A recreated controller starts job ids again at 1: the finished run of job 1 is not the new job's."""
    third = volume_drill.launches[2]
    assert third["rc"] == 0 and "--preflight-only" in volume_drill.scripts[2]
    stamp = TASK_ID.match(third["task_id"])[0].split("_")[0].removeprefix("sky-managed-").replace("-", "")
    assert third["run"] == f"{volume_drill.run}-{stamp}"
    assert (f"run directory {volume_drill.run_dir} is not this job's: it is a finished run of an earlier job"
            in volume_drill.logs[2])
    new = json.loads((volume_drill.run_dir.parent / third["run"] / "run.json").read_text())
    assert new["skypilot"]["task_ids"] == [third["task_id"]]
    assert json.loads((volume_drill.run_dir / "run.json").read_text()) == volume_drill.info  # left as it was
    assert json.loads((volume_drill.run_dir / "final" / MARKER).read_text())["step"] == MAX_STEPS


def test_remote_layout_recovered_into_an_empty_directory_from_the_bucket(remote_drill):
    checkpoint = json.loads((remote_drill.work / "after-kill.json").read_text())["checkpoint"]
    log2 = remote_drill.logs[1]
    assert remote_drill.launches[0]["task_id"] == remote_drill.launches[1]["task_id"]  # a recovery keeps the id
    assert f"remote: restored {checkpoint} " in log2
    assert "remote: restored run.json" in log2 and "remote: restored cost.json" in log2
    assert "remote: restored config.yaml" in log2
    first_pod = Path(remote_drill.launches[0]["output_dir"])
    assert first_pod != Path(remote_drill.launches[1]["output_dir"])
    assert not (first_pod / remote_drill.run / "final").exists()  # the first pod never finished
    assert {f"final/{MARKER}", "eval/final/report.html", "run.json", "cost.json", "config.yaml",
            "logs/attempt-2.log"} <= set(remote_drill.stored)
    assert "dummy-secret-for-the-drill" not in log2 + "".join(remote_drill.scripts)


def test_remote_run_json_in_the_bucket_keeps_the_wandb_id(remote_drill, bucket):
    key = f"drill/{remote_drill.run}/run.json"
    stored = json.loads(bucket.get_object(Bucket=bucket.bucket, Key=key)["Body"].read())
    assert stored["wandb_run_id"] == remote_drill.info["wandb_run_id"]


# ---------------------------------------------------------------- a done run is done once the bucket holds it


def test_a_done_run_whose_final_vanished_from_the_bucket_uploads_it_and_exits_0(done_upload):
    [launch] = done_upload.launches
    log = done_upload.logs[0]
    assert launch["rc"] == 0 and launch["task_id"] == done_upload.finished["task_id"]  # relaunch, same pod and id
    assert f"wellocr: run {done_upload.run_dir} is already done (finished at step {MAX_STEPS})" in log
    assert "remote: final/ and eval/ verified at s3://" in log and f"/drill/{done_upload.run}\n" in log
    final = json.loads((done_upload.run_dir / "final" / MARKER).read_text())
    assert done_upload.stored[f"final/{MARKER}"] > 0
    for rel, size in final["files"].items():
        assert done_upload.stored[f"final/{rel}"] == size
    for file in (done_upload.run_dir / "eval").rglob("*"):
        if file.is_file():
            assert done_upload.stored[file.relative_to(done_upload.run_dir).as_posix()] == file.stat().st_size
    assert not (done_upload.run_dir / ".lock").exists()
    last = done_upload.info["attempts"][-1]
    assert (last["attempt"], last["exit_reason"], last["exit_code"]) == (3, "nothing-to-do", 0)
    assert last["uploaded_files"] > 0


# ---------------------------------------------------------------- retries without progress end


def test_uploads_that_cannot_succeed_end_in_exit_70_after_three_exits_75(no_progress, moto_url):
    assert no_progress.codes == [75, 75, 75, 70]
    assert {x["task_id"] for x in no_progress.launches} == {no_progress.finished["task_id"]}
    for script in no_progress.scripts:
        endpoint = re.search(r"^export AWS_ENDPOINT_URL=(\S+)$", script, re.MULTILINE)[1]
        assert endpoint.startswith("http://127.0.0.1:") and endpoint != moto_url  # the refusing proxy
        assert "export WELLOCR_EXTRA_ARGS=" in script and "checkpoint.upload_timeout_s=5" in script
    for log in no_progress.logs[:3]:
        assert "uploads to checkpoint.remote did not finish" in log
        assert "wellocr: trainer exit code 75 (upload-incomplete)" in log
    lines = [line for line in no_progress.logs[3].splitlines() if "the last 3 attempts exited 75" in line]
    assert len(lines) == 1 and "without a new step or a file uploaded" in lines[0], lines
    attempts = no_progress.info["attempts"][-4:]
    assert [(a["exit_reason"], a["exit_code"], a["uploaded_files"]) for a in attempts] == \
        [("upload-incomplete", 75, 0)] * 3 + [("no-progress", 70, 0)]
    assert not [key for key in no_progress.stored if key.startswith("final/")]  # nothing got through
    assert not (no_progress.run_dir / ".lock").exists()


# ---------------------------------------------------------------- the rehearsal


def test_the_rehearsal_stops_itself_after_its_first_checkpoint_and_recovers_from_the_bucket(rehearsal):
    assert "--rehearse-preemption" in rehearsal.task["run"]
    assert rehearsal.codes == [75, 0] and not rehearsal.launches[0]["killed"]
    assert rehearsal.run == "wellocr-rehearsal-job1"
    assert "wellocr: rehearsal: stopping after checkpoint-2 with exit 75" in rehearsal.logs[0]
    assert "rehearsal: PASS" not in rehearsal.logs[0]
    pods = [Path(x["output_dir"]) for x in rehearsal.launches]
    assert pods[0] != pods[1] and not (pods[0] / rehearsal.run / "final").exists()  # the relaunch: a new pod
    assert "remote: restored checkpoint-2 " in rehearsal.logs[1]
    assert "resuming from checkpoint-2 (step 2)" in rehearsal.logs[1]
    verdict = [line for line in rehearsal.logs[1].splitlines() if line.startswith("rehearsal:")]
    assert len(verdict) == 1 and verdict[0].startswith("rehearsal: PASS: stopped after checkpoint-2"), verdict
    assert [a["exit_reason"] for a in rehearsal.info["attempts"]] == ["rehearsal-stop", "finished"]
    assert rehearsal.info["rehearsal"]["stopped_after"] == "checkpoint-2"
    assert [s["attempt"] for s in rehearsal.segments] == [1, 2]
    assert {f"final/{MARKER}", "eval/final/report.html"} <= set(rehearsal.stored)


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
    assert "FAIL launch 2 did not print 'resuming from checkpoint-" in result.stdout
    assert "FAIL launch 2 exited 2" in result.stdout
    assert "drill: FAIL" in result.stdout and "already exists; continue it with --resume-latest" in result.stdout
    state = json.loads((tmp_path / "work" / "drill.json").read_text())
    assert [x["rc"] for x in state["launches"]] == [137, 2] and state["finished"] is None


def test_usage(tmp_path):
    run = [sys.executable, "-m", "wellocr.drill"]
    helped = subprocess.run([*run, "--help"], capture_output=True, text=True, cwd=REPO)
    assert helped.returncode == 0
    scenarios = ("kill", "controller-restart", "done-upload", "no-progress", "rehearsal")
    for option in ("--remote URL", "--workdir DIR", "--keep", "--task FILE", "--timeout S", "DRILL_EXTRA_ARGS",
                   *("  " + name for name in scenarios)):
        assert option in helped.stdout
    wrong = subprocess.run([*run, "--bogus"], capture_output=True, text=True, cwd=REPO)
    assert wrong.returncode == 2 and "unrecognized arguments: --bogus" in wrong.stderr
    for args, message in ((["--scenario", "done-upload"], "needs --remote URL"),
                          (["--scenario", "no-progress", "--remote", f"file://{tmp_path}"], "needs an s3:// remote"),
                          (["--task", "sky/nope.yaml"], "no task file"),
                          (["--task", "sky/train_r16_volume.yaml", "--remote", "s3://b/p"],
                           "does not use WELLOCR_REMOTE")):
        result = subprocess.run([*run, *args, "--workdir", str(tmp_path / "w")], capture_output=True, text=True,
                                cwd=REPO)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------- the drill's own parts, without training


def test_the_task_id_is_skypilots_and_a_restarted_controller_gets_a_later_one():
    from wellocr.drill import new_task_id
    from wellocr.rundir import ManagedJob

    first = new_task_id("wellocr-r16")
    later = new_task_id("wellocr-r16", after=first)
    assert TASK_ID.match(first) and TASK_ID.match(later) and later > first
    job = ManagedJob.from_env({"SKYPILOT_TASK_ID": later, "SKYPILOT_MANAGED_JOB_ID": "1"})
    assert job.run_name == "wellocr-r16-job1"


def test_the_kill_takes_the_whole_process_group_and_what_left_it(tmp_path):
    """A SIGKILLed pod leaves nothing running: not the shell's children, nor one that started a session of its own
    (the run's lock would otherwise stay held by a live process)."""
    from wellocr.drill import process_tree, vanish

    script = tmp_path / "pod.sh"
    script.write_text(f"sleep 300 &\nsetsid sleep 301 &\necho started > {tmp_path / 'ready'}\nwait\n")
    proc = subprocess.Popen(["bash", str(script)], start_new_session=True)
    deadline = time.time() + 20
    while (len(process_tree(proc.pid)) < 3 or not (tmp_path / "ready").exists()) and time.time() < deadline:
        time.sleep(0.05)
    tree = process_tree(proc.pid)
    assert len(tree) == 3
    assert vanish(proc) == 137
    for p in tree:
        assert not p.is_running() or p.status() == "zombie"
