"""Data-parallel training on the GPUs of one machine: `train.processes: N` runs N ranks under torchrun.

Stage 1 of `python -m wellocr.train` (one process) keeps everything that belongs to the run, not to a GPU: the
run directory and its lock, the attempt record, the bucket restore and the final upload, the exit code SkyPilot
reads. It then starts `torchrun --standalone --nproc_per_node N -m wellocr.rank RUN_DIR`; every rank runs stage
2 (`wellocr.training`) on its own GPU (NCCL; gloo on CPU), and rank 0 alone writes what is written once: the
completeness marker (after every rank finished the step), run.json, the cost ledger (billing N GPUs), W&B, the
evaluations and the report. The launcher forwards a SIGTERM to the ranks, which agree on the step to stop at
(`wellocr.callbacks.AgreeToStop`), and reads rank 0's outcome from run.json: torchrun itself exits 1 for any
failed rank, which is not the exit code the managed job must see (75 relaunches it).

Several machines (`train.nodes: M`, a SkyPilot task with `num_nodes: M`): every node runs `python -m wellocr.train`
and stage 1 there restores the run from the bucket like a single machine does, then starts its torchrun with
`--nnodes M --node_rank R` against node 0's address (`Cluster`, from SKYPILOT_NODE_RANK and SKYPILOT_NODE_IPS). Node
0 is the run's voice: its global rank 0 writes checkpoints (`save_on_each_node` off), uploads and the ledger; the
other nodes upload nothing and exit with their own ranks' outcome (an agreed stop is 75 on every node). Their rng
states stay on their disks, so a resumed multi-node run reseeds those ranks (transformers warns once per rank).

The effective batch (samples per optimizer step) is the run's, whatever N is: each rank takes 1/N of it, so a
recovery onto fewer GPUs continues the same trajectory in expectation (the data order differs: each rank draws
every N-th micro-batch of the sampler). Imports no torch at module level: stage 1 must not; the collectives the
ranks share (`across_ranks`, `barrier`) import it when called.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wellocr.checkpoint import write_json_atomic
from wellocr.errors import UserError
from wellocr.outcome import EXIT_ERROR, EXIT_OK, EXIT_PREEMPTED, Outcome

REQUEST = ".ranks.json"  # what stage 1 hands the ranks: attempt, resume, flags
MASTER_PORT_ENV = "WELLOCR_MASTER_PORT"  # node 0's rendezvous port (default 29500, torchrun's)


@dataclass(frozen=True)
class Cluster:
    """This machine's place in the job: node `rank` of `nodes`, and where node 0 listens."""

    nodes: int = 1
    rank: int = 0
    master: str = "127.0.0.1"
    port: int = 29500

    @property
    def head(self) -> bool:
        """Node 0 speaks for the run: uploads, the ledger, the cost report."""
        return self.rank == 0

    @classmethod
    def from_env(cls, nodes: int, env: Mapping[str, str]) -> Cluster:
        """`train.nodes` with what SkyPilot sets on each node of a `num_nodes` task."""
        if nodes == 1:
            return cls()
        missing = [name for name in ("SKYPILOT_NODE_RANK", "SKYPILOT_NODE_IPS") if not env.get(name)]
        if missing:
            raise UserError(f"train.nodes is {nodes} but {' and '.join(missing)} "
                            f"{'are' if len(missing) > 1 else 'is'} not set: SkyPilot sets them on "
                            f"every node of a task with num_nodes: {nodes}; on one machine use train.nodes=1")
        ips = env["SKYPILOT_NODE_IPS"].split()
        if len(ips) != nodes:
            raise UserError(f"train.nodes is {nodes} but SKYPILOT_NODE_IPS lists {len(ips)} node(s): pass the "
                            "task's node count (--set train.nodes=$SKYPILOT_NUM_NODES)")
        return cls(nodes, int(env["SKYPILOT_NODE_RANK"]), ips[0], int(env.get(MASTER_PORT_ENV) or 29500))

    def torchrun_args(self, processes: int) -> list[str]:
        if self.nodes == 1:
            return ["--standalone", f"--nproc_per_node={processes}"]
        return [f"--nnodes={self.nodes}", f"--node_rank={self.rank}", f"--master_addr={self.master}",
                f"--master_port={self.port}", f"--nproc_per_node={processes}"]


def per_rank_batch(effective: int, processes: int) -> int:
    """Samples each rank contributes to one optimizer step."""
    if effective % processes:
        raise UserError(f"train.effective_batch_size {effective} does not divide among train.processes {processes}: "
                        f"use a multiple of {processes}")
    return effective // processes


def rank_accumulation(accumulation: int, processes: int, micro: int) -> int:
    """A fixed micro-batch config (not auto) with N ranks: `gradient_accumulation_steps` is the one-process value,
    so the effective batch stays micro x accumulation; each rank accumulates accumulation / N micro-batches."""
    if accumulation % processes:
        raise UserError(f"train.gradient_accumulation_steps {accumulation} does not divide among train.processes "
                        f"{processes} (micro-batch {micro}, effective batch {micro * accumulation}): use a multiple "
                        f"of {processes}, or per_device_train_batch_size: auto")
    return accumulation // processes


def launch(run: Any, processes: int, request: dict, stop: Any, cluster: Cluster | None = None) -> Outcome:
    """torchrun over this machine's `processes` ranks; its output goes through this process's console (the
    attempt log); a SIGTERM seen by `stop` is passed on once; the outcome is the node's first rank's, from run.json
    (on node 0: global rank 0's)."""
    cluster = cluster or Cluster()
    write_json_atomic(run.path / REQUEST, {**request, "ranks": processes * cluster.nodes})
    if request.get("choose_batch"):  # auto: the micro-batch is chosen in one process, before the ranks start
        code = _child([sys.executable, "-m", "wellocr.rank", str(run.path), "--choose-batch"], stop)
        if code != EXIT_OK:  # its outcome as a rank records one; a SIGTERM before its handler leaves none
            return rank_outcome(run, request["attempt"]) or (
                Outcome("preempted", EXIT_PREEMPTED) if stop.reason == "preempted" else Outcome("crashed", code))
    command = [sys.executable, "-m", "torch.distributed.run", *cluster.torchrun_args(processes),
               "-m", "wellocr.rank", str(run.path)]
    where = f" on node {cluster.rank} of {cluster.nodes}" if cluster.nodes > 1 else ""
    print(f"wellocr: {processes} rank{'s' if processes > 1 else ''}{where}: {' '.join(command[1:])}", flush=True)
    code = _child(command, stop)  # torchrun passes a SIGTERM on to every rank
    outcome = rank_outcome(run, request["attempt"])
    if outcome is None:
        print(f"error: the ranks ended without an outcome (torchrun exit {code}; see the log above)",
              file=sys.stderr, flush=True)
        return Outcome("crashed", EXIT_ERROR)
    return outcome


def _child(command: list[str], stop: Any) -> int:
    """Run `command` with its output through this process's console; a SIGTERM seen by `stop` is passed on once."""
    stop.in_training_loop = True  # a SIGTERM is recorded and forwarded, not raised here
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    pump = threading.Thread(target=_copy, args=(proc.stdout,), daemon=True)
    pump.start()
    forwarded = False
    while proc.poll() is None:
        if stop.reason == "preempted" and not forwarded:
            proc.send_signal(signal.SIGTERM)
            forwarded = True
        time.sleep(0.2)
    pump.join(timeout=10)
    stop.in_training_loop = False
    return proc.returncode


def _copy(stream: Any) -> None:
    for line in stream:
        sys.stdout.write(line)
        sys.stdout.flush()


def rank_outcome(run: Any, attempt: int) -> Outcome | None:
    for entry in run.read().get("attempts", []):
        if entry.get("attempt") == attempt and entry.get("rank_outcome"):
            o = entry["rank_outcome"]
            return Outcome(o["reason"], o["code"], o.get("step"))
    return None


def across_ranks(values: list[int], op: str = "max") -> list[int]:
    """`values` combined element-wise over every rank (max or min); the values themselves in one process."""
    import torch

    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    tensor = torch.tensor(values, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor, dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
    return [int(v) for v in tensor.tolist()]


def barrier() -> None:
    """Every rank gets here before any goes on (nothing in one process)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def read_request(run_dir: Path) -> dict:
    return json.loads((run_dir / REQUEST).read_text())
