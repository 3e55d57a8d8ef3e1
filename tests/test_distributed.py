"""Data-parallel training (`train.processes: N`): N ranks under torchrun, gloo on CPU, on the tiny model.

The reference is one process with the same effective batch (micro-batch 2 x accumulation 2); two ranks each take
micro-batch 2 x accumulation 1. Every optimizer step sees the same samples either way (each rank draws every
second micro-batch of the one sampler), LoRA dropout is 0, and the loss is averaged over the same tokens, so the
losses agree to float rounding (rel 1e-5: what the one-process resume test allows).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_train, smoke_settings
from wellocr.checkpoint import latest_complete_checkpoint, read_marker
from wellocr.distributed import Cluster, per_rank_batch, rank_accumulation
from wellocr.errors import UserError
from wellocr.rundir import RunDir

SETTINGS = {"train.max_steps": 6, "train.save_steps": 3, "train.eval_steps": 3,
            "train.per_device_train_batch_size": 2, "train.gradient_accumulation_steps": 2,
            "eval.generation_samples": 0}


def losses(run_dir: Path, checkpoint: str) -> dict[int, float]:
    state = json.loads((run_dir / checkpoint / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def write_config(path: Path, tiny_model_dir, synth_data_dir, name: str, **extra) -> Path:
    path.write_text(yaml.safe_dump(smoke_settings(tiny_model_dir, synth_data_dir, path.parent / "runs",
                                                  **{**SETTINGS, "run.run_name": name, **extra})))
    return path


def popen_job(config: Path, log: Path) -> subprocess.Popen:
    """The job in its own process group, as a pod runs it (SIGKILL of the group = the pod gone)."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "wellocr.train", "--config", str(config)], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not condition():
        time.sleep(0.05)
    assert condition(), f"not reached (exit {proc.poll()})"


@pytest.fixture(scope="module")
def reference(tiny_model_dir, synth_data_dir, tmp_path_factory) -> Path:
    """One process, the same effective batch: the trajectory the ranks must follow."""
    root = tmp_path_factory.mktemp("ddp-reference")
    result = run_train("--config", str(write_config(root / "one.yaml", tiny_model_dir, synth_data_dir, "one")))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return root / "runs" / "one"


def test_two_ranks_follow_one_process_and_a_killed_job_resumes_on_one(reference, tiny_model_dir, synth_data_dir,
                                                                         tmp_path):
    config = write_config(tmp_path / "two.yaml", tiny_model_dir, synth_data_dir, "two", **{"train.processes": 2})
    run_dir = tmp_path / "runs" / "two"
    proc = popen_job(config, tmp_path / "two.log")
    wait_for(lambda: latest_complete_checkpoint(run_dir) is not None, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the pod is gone: launcher, torchrun and both ranks
    proc.wait(timeout=30)
    saved = latest_complete_checkpoint(run_dir)
    assert saved.name == "checkpoint-3" and {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in saved.iterdir()}
    assert losses(run_dir, "checkpoint-3") == pytest.approx(losses(reference, "checkpoint-3"), rel=1e-5)

    # recovered onto a machine with one GPU's worth: the same effective batch, the same samples per step
    resumed = run_train("--config", str(config), "--resume-latest", "--set", "train.processes=1")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resuming from checkpoint-3" in resumed.stdout
    assert losses(run_dir, "checkpoint-6") == pytest.approx(losses(reference, "checkpoint-6"), rel=1e-5)
    run = RunDir(run_dir).read()
    assert [a.get("processes") for a in run["attempts"]] == [2, 1]
    assert [p.name for p in run_dir.iterdir() if p.name.startswith("final")] == ["final"]
    assert len(json.loads((run_dir / "cost.json").read_text())["segments"]) == 2  # one ledger, both attempts
    assert (run_dir / "eval" / "final" / "metrics.json").is_file()
    assert (run_dir / "logs" / "attempt-1-rank1.log").is_file()  # rank 1 keeps its own log


def test_sigterm_stops_every_rank_at_one_step_with_one_checkpoint_and_exit_75(tiny_model_dir, synth_data_dir,
                                                                               tmp_path):
    config = write_config(tmp_path / "term.yaml", tiny_model_dir, synth_data_dir, "term",
                          **{"train.processes": 2, "train.max_steps": 60, "train.save_steps": 60,
                             "train.eval_steps": 60})
    run_dir = tmp_path / "runs" / "term"
    proc = popen_job(config, tmp_path / "term.log")

    def first_step() -> bool:
        attempts = RunDir(run_dir).read().get("attempts", []) if (run_dir / "run.json").is_file() else []
        return bool(attempts) and "first_step_s" in attempts[-1]

    wait_for(first_step, proc)
    proc.send_signal(signal.SIGTERM)  # to the launcher only: it passes the stop on to the ranks
    assert proc.wait(timeout=120) == 75
    saved = latest_complete_checkpoint(run_dir)
    checkpoints = [p.name for p in run_dir.glob("checkpoint-*")]
    assert saved is not None and checkpoints == [saved.name] and 1 <= int(saved.name.split("-")[1]) < 60
    attempt = RunDir(run_dir).read()["attempts"][0]
    assert attempt["exit_reason"] == "preempted" and attempt["rank_outcome"]["step"] == int(saved.name.split("-")[1])
    assert attempt["processes"] == 2 and attempt["precision"] == "fp32"  # CPU: fp32 (bf16 from compute capability 8.0)
    # rank 1 stopped at the same step: rank 0's save waits for every rank, so a rank that went on would have hung

    step = int(saved.name.split("-")[1])  # relaunched on two ranks again: both load the checkpoint's state
    resumed = run_train("--config", str(config), "--resume-latest", "--set", f"train.max_steps={step + 1}",
                        "--set", f"train.eval_steps={step + 1}", "--set", f"train.save_steps={step + 1}")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from {saved.name}" in resumed.stdout and "exit: finished (code 0)" in resumed.stdout


def test_the_effective_batch_must_divide_among_the_processes():
    assert per_rank_batch(8, 2) == 4 and rank_accumulation(4, 2, micro=2) == 2
    with pytest.raises(UserError, match="train.effective_batch_size 8 does not divide among train.processes 3"):
        per_rank_batch(8, 3)
    with pytest.raises(UserError, match="train.gradient_accumulation_steps 1 does not divide"):
        rank_accumulation(1, 2, micro=2)


@pytest.mark.parametrize("sets, named", [
    (["train.processes=3"], "train.processes (3) must divide train.gradient_accumulation_steps (2)"),
    (["train.processes=3", "train.per_device_train_batch_size=auto", "train.effective_batch_size=8"],
     "train.processes (3) must divide train.effective_batch_size (8)"),
    (["train.processes=2", "train.nodes=3"],
     "train.processes (2) x train.nodes (3) = 6 must divide train.gradient_accumulation_steps (2)"),
])
def test_processes_that_do_not_divide_the_batch_stop_the_launch_in_one_line(sets, named, tiny_model_dir,
                                                                              synth_data_dir, tmp_path):
    """Before any rank (or pod) starts: the config itself is refused, exit 2."""
    config = write_config(tmp_path / "bad.yaml", tiny_model_dir, synth_data_dir, "bad")
    result = run_train("--config", str(config), *[a for s in sets for a in ("--set", s)])
    assert result.returncode == 2 and named in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "bad").exists()


def test_a_cluster_reads_its_place_from_skypilot():
    ips = "10.0.0.5\n10.0.0.6\n"
    cluster = Cluster.from_env(2, {"SKYPILOT_NODE_RANK": "1", "SKYPILOT_NODE_IPS": ips})
    assert (cluster.rank, cluster.master, cluster.port, cluster.head) == (1, "10.0.0.5", 29500, False)
    assert cluster.torchrun_args(4) == ["--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.5",
                                        "--master_port=29500", "--nproc_per_node=4"]
    assert Cluster.from_env(1, {}).torchrun_args(2) == ["--standalone", "--nproc_per_node=2"]
    with pytest.raises(UserError, match="SKYPILOT_NODE_RANK and SKYPILOT_NODE_IPS are not set"):
        Cluster.from_env(2, {})
    with pytest.raises(UserError, match="SKYPILOT_NODE_IPS lists 2 node"):
        Cluster.from_env(3, {"SKYPILOT_NODE_RANK": "0", "SKYPILOT_NODE_IPS": ips})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_nodes(config: Path, outputs: list[Path], bucket: Path, logs: Path, *sets: str) -> list[str]:
    """`python -m wellocr.train` on each "node" at once, as a num_nodes task runs its `run:` section: own disk
    (run.output_dir), one bucket, SkyPilot's node variables; returns each node's output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SKYPILOT_NUM_NODES": str(len(outputs)),
           "SKYPILOT_NODE_IPS": "\n".join(["127.0.0.1"] * len(outputs)), "WELLOCR_MASTER_PORT": str(free_port())}
    procs = []
    for rank, output in enumerate(outputs):
        with open(logs / f"node{rank}.log", "w") as out:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "wellocr.train", "--config", str(config), "--resume-latest",
                 "--set", f"run.output_dir={output}", "--set", f"checkpoint.remote=file://{bucket}",
                 "--set", f"train.nodes={len(outputs)}", *[a for s in sets for a in ("--set", s)]],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**env, "SKYPILOT_NODE_RANK": str(rank)}))
    codes = [proc.wait(timeout=400) for proc in procs]
    texts = [(logs / f"node{rank}.log").read_text() for rank in range(len(outputs))]
    assert codes == [0] * len(outputs), "\n----\n".join(t[-2500:] for t in texts)
    return texts


def test_two_machines_train_one_run_and_a_new_machine_resumes_it_from_the_bucket(reference, tiny_model_dir,
                                                                                 synth_data_dir, tmp_path):
    """`train.nodes: 2` (one rank each, gloo): the same trajectory as one process, one writer (node 0: checkpoints,
    final/, ledger, uploads); then both relaunched, node 1 on an empty disk, resume from the bucket's checkpoint."""
    config = write_config(tmp_path / "nodes.yaml", tiny_model_dir, synth_data_dir, "nodes")
    bucket, node0, node1 = tmp_path / "bucket", tmp_path / "node0", tmp_path / "node1"
    texts = run_nodes(config, [node0, node1], bucket, tmp_path)
    assert "--nnodes=2 --node_rank=1" in texts[1] and "node 1 of 2: done" in texts[1]
    run0, run1 = node0 / "nodes", node1 / "nodes"
    assert losses(run0, "checkpoint-6") == pytest.approx(losses(reference, "checkpoint-6"), rel=1e-5)
    assert latest_complete_checkpoint(run1) is None and not (run1 / "final").exists()  # node 0 writes, once
    assert not (run1 / "cost.json").exists()
    stored = RunDir(bucket / "nodes").read()
    assert [a["attempt"] for a in stored["attempts"]] == [1] and stored["attempts"][0]["processes"] == 2
    assert (bucket / "nodes" / "final").is_dir() and (bucket / "nodes" / "eval" / "final" / "metrics.json").is_file()

    shutil.rmtree(node1)  # node 1 is a new machine: an empty disk
    texts = run_nodes(config, [node0, node1], bucket, tmp_path, "train.max_steps=7")
    assert "resuming from checkpoint-6" in texts[0] and "resuming from checkpoint-6" in texts[1]
    assert read_marker(run0 / "final")["step"] == 7
    segments = json.loads((bucket / "nodes" / "cost.json").read_text())["segments"]
    assert len(segments) == 2  # one ledger, both attempts, written by node 0 alone


AGREE = """
import os, sys, json
from pathlib import Path
import torch.distributed as dist
from wellocr.rundir import RunDir
from wellocr.training import Attempt, common_resume_point
from wellocr.checkpoint import latest_complete_checkpoint, checkpoint_step
dist.init_process_group("gloo")
run = RunDir(Path(sys.argv[1]))
newest = latest_complete_checkpoint(run.path)
a = Attempt.__new__(Attempt)
a.run = run
resume, step = common_resume_point(a, newest, checkpoint_step(newest) if newest else 0)
print(json.dumps({"resume": resume.name if resume else None, "step": step}))
"""


def test_machines_whose_newest_checkpoints_differ_all_resume_from_the_one_every_machine_has(reference, tmp_path):
    """Node 0 kept a newer checkpoint than the bucket gave node 1 (an upload cut short): both take the older."""
    disks = [tmp_path / "a" / "run", tmp_path / "b" / "run"]
    for disk, names in zip(disks, (["checkpoint-3", "checkpoint-6"], ["checkpoint-3"])):
        for name in names:
            shutil.copytree(reference / name, disk / name)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", AGREE, str(disk)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**env, "RANK": str(rank)})
             for rank, disk in enumerate(disks)]
    results = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), results
    picks = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    assert picks == [{"resume": "checkpoint-3", "step": 3}] * 2
    assert "the newest every machine has (this one has step 6)" in results[0][0]


def test_auto_micro_batch_is_chosen_once_before_the_ranks_and_they_follow_one_process(reference, tiny_model_dir,
                                                                                      synth_data_dir, tmp_path):
    """`auto` with two ranks: one process chooses the micro-batch of a rank's share (2 of 4) before torchrun starts
    (a probe under DDP could leave ranks waiting on one that ran out of memory), records it, and the ranks train
    2 x 1 each: the reference's trajectory at the same effective batch."""
    config = write_config(tmp_path / "auto.yaml", tiny_model_dir, synth_data_dir, "auto",
                          **{"train.processes": 2, "train.per_device_train_batch_size": "auto",
                             "train.effective_batch_size": 4})
    result = run_train("--config", str(config))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert out.index("auto batch: micro-batch 2 x 1 accumulation x 2 processes = 4") < out.index("2 ranks:")
    run_dir = tmp_path / "runs" / "auto"
    assert RunDir(run_dir).read()["auto_batch"] == {"per_device_train_batch_size": 2,
                                                    "gradient_accumulation_steps": 1, "device": "cpu"}
    assert losses(run_dir, "checkpoint-6") == pytest.approx(losses(reference, "checkpoint-6"), rel=1e-5)


def test_a_rank_takes_the_largest_divisor_of_its_share_up_to_the_recorded_choice(tmp_path):
    """A choice made for a bigger share (a one-GPU start chose 8 of 8) bounds what each of 2 ranks takes of 4."""
    from wellocr.config import load_config
    from wellocr.model import Backend
    from wellocr.training import Attempt, batch_sizes

    cfg = load_config(REPO / "configs" / "cpu_smoke.yaml", ["train.per_device_train_batch_size=auto",
                                                             "train.effective_batch_size=12"])
    run = RunDir(tmp_path / "run")
    run.create("run", "test")
    run.update(auto_batch={"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "device": "cpu"})
    a = Attempt.__new__(Attempt)
    a.world, a.rank = 2, 0
    assert batch_sizes(cfg, run, Backend("hf", "cpu", "test"), None, a) == {
        "per_device_train_batch_size": 6, "gradient_accumulation_steps": 1}
    a.world = 4  # 3 each: 3 (a divisor of 3, at most 8)
    assert batch_sizes(cfg, run, Backend("hf", "cpu", "test"), None, a)["per_device_train_batch_size"] == 3
    run.update(auto_batch={"per_device_train_batch_size": 4, "gradient_accumulation_steps": 3, "device": "cpu"})
    a.world = 2  # 6 each, at most 4: 3 x 2
    assert batch_sizes(cfg, run, Backend("hf", "cpu", "test"), None, a) == {
        "per_device_train_batch_size": 3, "gradient_accumulation_steps": 2}
