"""The SkyPilot files in sky/: valid for SkyPilot 0.14 on every cloud they name, checked offline (no credentials,
no network).

Three layers, each a test that a broken task file fails:
- SkyPilot's own checks: `sky.Task.from_yaml` (schema, typos), each entry's cloud's feature check
  (`sky.<Cloud>.check_features_are_supported`: what `sky launch` refuses there, e.g. bucket mounts on RunPod; the
  optimizer does not run it offline), and for volume files `sky.volumes.Volume.from_yaml_config(...).validate()`.
- `sky_problems`: what SkyPilot does not check offline (GPU and cloud against the multi-cloud rule on the checked-in
  catalog rows, spot, job_recovery values, secrets, the config the task trains with, where checkpoints survive a
  preemption).
- The `run:` sections are executed with bash (as SkyPilot does: `bash -i <script>` in the workdir) with a stand-in
  `python` that records the trainer's command line and environment: the tests see exactly the arguments and
  variables the trainer would get and the exit code SkyPilot would see. Each `run:` is one `exec`'d trainer call:
  the trainer names the run, turns SIGTERM into exit 75 and prints the cost report itself.
- Tasks are loaded the way `sky launch` / `sky jobs launch` load them (`dag_utils.load_chain_dag_from_yaml` with the
  `--env` overrides), because an env declared with no value (WELLOCR_REMOTE) is an error without its `--env`.

SkyPilot writes ~/.sky on import and reads ~/.sky/config.yaml and ./.sky.yaml: the `sky` fixture gives it a
throwaway HOME and empty config files, so a developer's SkyPilot setup changes nothing here.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from wellocr import prices
from wellocr.config import load_config
from wellocr.errors import UserError
from wellocr.rundir import resolve_run_name
from wellocr.train import EXIT_OOM, EXIT_PREEMPTED, parse_args

REPO = Path(__file__).resolve().parents[1]
SKY_DIR = REPO / "sky"
SKY_FILES = sorted(SKY_DIR.glob("*.yaml"))

# The (cloud, GPU) pairs a task may name, with the instance type SkyPilot picks for one of that GPU there (GCP
# prices it as that VM plus the GPU), each checked against SkyPilot's catalog rows in tests/data/catalog/.
CLOUD_GPUS = {("runpod", "RTX4090"): "1x_RTX4090_SECURE", ("gcp", "L4"): "g2-standard-4", ("aws", "L4"): "g6.xlarge"}
# sky/train_r16.yaml's order (docs/CLOUDS.md says why)
JOB_ORDER = [("runpod", "RTX4090"), ("gcp", "L4"), ("aws", "L4")]
CATALOG = Path(__file__).parent / "data" / "catalog"
RECOVERY_KEYS = {"strategy", "max_restarts_on_errors", "recover_on_exit_codes"}
STRATEGIES = {"FAILOVER", "EAGER_NEXT_REGION"}
TASK_ID = "sky-managed-2026-11-28-12-00-00-000000_wellocr-r16_7-0"  # what a managed job's pod sees
EXAMPLE_REMOTE = "s3://wellocr-example-bucket/checkpoints"

CREDENTIAL_PATTERNS = {
    "an AWS access key id": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "a Hugging Face token": r"\bhf_[A-Za-z0-9]{30,}\b",
    "a RunPod API key": r"\brpa_[A-Za-z0-9]{20,}\b",
    "a W&B API key": r"\b[0-9a-f]{40}\b",
    "a private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
}
SETUP = re.compile(r"^bash scripts/pod_setup\.sh ([A-Za-z0-9_,-]+)$")
RUN_PREFIX = "exec python -m wellocr.train "
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)
KEY_LIKE = re.compile(r"^[A-Za-z0-9+/=_-]{32,}$")


# ---------------------------------------------------------------- reading the files


def raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def is_volume_file(path: Path) -> bool:
    data = raw(path)
    return "type" in data and "run" not in data


TASK_FILES = [p for p in SKY_FILES if not is_volume_file(p)]
VOLUME_FILES = [p for p in SKY_FILES if is_volume_file(p)]


def header_commands(path: Path) -> list[str]:
    """The commands in the file's opening comment, continuation lines (`\\`) joined."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return [c.strip() for c in " ".join(x[:-1] if x.endswith("\\") else x + "\n" for x in lines).splitlines()
            if c.strip().startswith("sky ")]


def is_managed(path: Path) -> bool:
    """A managed spot job is a file whose header launches it with `sky jobs launch`."""
    return any(c.startswith(f"sky jobs launch sky/{path.name}") for c in header_commands(path))


MANAGED_FILES = [p for p in TASK_FILES if is_managed(p)]


# ---------------------------------------------------------------- running a run: section


STAND_IN_PYTHON = textwrap.dedent("""\
    import json, os, signal, sys, time
    args = sys.argv[1:]
    if args[:1] == ["-m"] and args[1:2] and args[1] in ("wellocr.train", "wellocr.cost"):
        call = {"module": args[1], "args": args[2:], "WELLOCR_CONFIG": os.environ.get("WELLOCR_CONFIG"),
                "env": {k: v for k, v in os.environ.items() if k.startswith(("WELLOCR_", "SKYPILOT_"))}}
        with open(os.environ["STAND_IN_CALLS"], "a") as f:
            f.write(json.dumps(call) + "\\n")
        if args[1] == "wellocr.cost":
            sys.exit(0)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))  # the trainer's contract: SIGTERM -> exit 75
        if os.environ.get("STAND_IN_TRAIN_SECONDS"):
            print("stand-in trainer: training", flush=True)
            time.sleep(float(os.environ["STAND_IN_TRAIN_SECONDS"]))
        sys.exit(int(os.environ.get("STAND_IN_TRAIN_EXIT", "0")))
    os.execv(sys.executable, [sys.executable, *args])
""")


@dataclass
class RunResult:
    code: int
    output: str
    calls: list[dict] = field(default_factory=list)

    def args_of(self, module: str) -> list[str]:
        found = [c["args"] for c in self.calls if c["module"] == module]
        assert found, f"the run section never calls python -m {module}:\n{self.output}"
        return found[0]

    def trainer_config_path(self) -> Path:
        call = next(c for c in self.calls if c["module"] == "wellocr.train")
        path = Path(parse_args(call["args"]).config or call["WELLOCR_CONFIG"] or "")
        return path if path.is_absolute() else REPO / path

    def trainer_config(self):
        """The config the trainer would train with: its file plus the --set flags it was given."""
        return load_config(self.trainer_config_path(), parse_args(self.args_of("wellocr.train")).set)

    def trainer_env(self) -> dict:
        return next(c["env"] for c in self.calls if c["module"] == "wellocr.train")


def start_run_section(task, tmp_path: Path, env: dict | None = None, trainer_exit: int = 0,
                      train_seconds: float | None = None) -> tuple[subprocess.Popen, Path]:
    """Start the task's run: section the way SkyPilot does (`bash -i script` in the workdir, task envs exported),
    with a stand-in `python` on PATH; returns the process and the file the stand-in records its calls in.
    `env` is what the pod gets on top of the task's envs (a launch's --env values, SkyPilot's variables)."""
    work = tmp_path / f"run-{time.monotonic_ns()}"
    (work / "bin").mkdir(parents=True)
    (work / "home").mkdir()
    (work / "stand_in.py").write_text(STAND_IN_PYTHON)
    python = work / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{work / "stand_in.py"}" "$@"\n')
    python.chmod(0o755)
    script = work / "run.sh"
    script.write_text(task.run)
    calls = work / "calls.jsonl"
    calls.touch()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("WELLOCR_", "SKYPILOT_"))}
    full_env = {
        **base, **task.envs,
        "HOME": str(work / "home"), "PATH": f"{work / 'bin'}{os.pathsep}{base.get('PATH', '')}",
        "SKYPILOT_TASK_ID": TASK_ID,
        "SKYPILOT_NUM_GPUS_PER_NODE": str(max((n for r in task.resources for n in (r.accelerators or {}).values()),
                                              default=1)),
        "SKYPILOT_CLUSTER_INFO": json.dumps({"cluster_name": "wellocr-test", "cloud": "RunPod"}),
        "STAND_IN_CALLS": str(calls), "STAND_IN_TRAIN_EXIT": str(trainer_exit),
        **({"STAND_IN_TRAIN_SECONDS": str(train_seconds)} if train_seconds else {}),
        **(env or {}),
    }
    proc = subprocess.Popen(["bash", "-i", str(script)], cwd=REPO, env=full_env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, calls


def run_section(task, tmp_path: Path, env: dict | None = None, trainer_exit: int = 0) -> RunResult:
    proc, calls = start_run_section(task, tmp_path, env, trainer_exit)
    output, _ = proc.communicate(timeout=120)
    return RunResult(proc.returncode, output, [json.loads(line) for line in calls.read_text().splitlines()])


# ---------------------------------------------------------------- what SkyPilot does not check offline


def cloud_feature_check(task) -> None:
    """Each entry's cloud's provisioner check, as `sky launch` runs it there (`sky.RunPod`, `sky.AWS`, ...):
    raises sky.exceptions.NotSupportedError."""
    import sky

    for resources in task.resources:
        features = task.get_required_cloud_features() | resources.get_required_cloud_features()
        autostop = resources.autostop_config
        if autostop is not None and autostop.enabled:
            features.add(sky.clouds.CloudImplementationFeatures.AUTODOWN if autostop.down
                         else sky.clouds.CloudImplementationFeatures.AUTOSTOP)
        type(resources.cloud).check_features_are_supported(resources, features)


def catalog_problems(cloud: str, accelerator: str) -> list[str]:
    """Why (cloud, accelerator) fails the multi-cloud rule on the checked-in catalog rows of its instance type
    ([] when it passes); on GCP the VM's and the GPU's rows, joined per zone, must both have a spot price."""
    path = CATALOG / cloud / "vms.csv"
    if not path.is_file():
        return [f"{cloud}: no catalog rows in {path.relative_to(REPO)}"]
    rows = prices.offers(prices.read_catalog_rows(path), accelerator, CLOUD_GPUS[(cloud, accelerator)])
    return prices.qualifies(accelerator, rows)


def credential_problems(where: str, text: str) -> list[str]:
    return [f"{where} looks like {what}" for what, pattern in CREDENTIAL_PATTERNS.items() if re.search(pattern, text)]


def sky_problems(path: Path, tmp_path: Path) -> list[str]:
    """Everything wrong with a task file that SkyPilot would not notice before launching; [] when it is fine."""
    import sky

    problems: list[str] = []
    task = load_task(sky, path)
    data = raw(path)
    text = path.read_text()
    managed = is_managed(path)
    commands = header_commands(path)

    if not text.startswith("#") or not any(re.match(rf"sky (jobs )?launch\b.*\bsky/{re.escape(path.name)}\b", c)
                                           for c in commands):
        problems.append(f"the file must open with a comment giving its launch command (sky/{path.name})")

    for resources in task.resources:
        cloud = str(resources.cloud).lower() if resources.cloud else None
        gpus = resources.accelerators or {}
        data_parallel = "train.processes" in (task.run or "")  # one rank per GPU of the pod
        if len(gpus) != 1 or (list(gpus.values()) != [1] and not data_parallel):
            problems.append(f"each entry names one GPU (accelerators: NAME:1), got {gpus}")
        elif (cloud, next(iter(gpus))) not in CLOUD_GPUS:
            problems.append(f"({cloud}, {next(iter(gpus))}) is not one of {sorted(CLOUD_GPUS)} (infra and "
                            "accelerators of an entry)")
        else:
            problems += catalog_problems(cloud, next(iter(gpus)))
        if managed and not resources.use_spot:
            problems.append("a managed training job runs on spot pods: use_spot: true")
        recovery = resources.job_recovery
        if managed and not isinstance(recovery, dict):
            problems.append("a managed training job needs job_recovery: {strategy, recover_on_exit_codes: [75]}")
        if isinstance(recovery, dict):
            if set(recovery) - RECOVERY_KEYS:
                problems.append(f"job_recovery has unknown keys {sorted(set(recovery) - RECOVERY_KEYS)}")
            if recovery.get("strategy") not in STRATEGIES:
                problems.append(f"job_recovery.strategy must be one of {sorted(STRATEGIES)}, got "
                                f"{recovery.get('strategy')!r}")
            codes = recovery.get("recover_on_exit_codes") or []
            codes = [codes] if isinstance(codes, int) else codes
            if EXIT_PREEMPTED not in codes:
                problems.append(f"job_recovery.recover_on_exit_codes must contain {EXIT_PREEMPTED} (SIGTERM)")
            if EXIT_OOM in codes:
                problems.append(f"job_recovery.recover_on_exit_codes must not contain {EXIT_OOM} (out of memory "
                                "is not retryable: it would relaunch at spot prices forever)")

    run_text = task.run if isinstance(task.run, str) else ""
    if "python -m wellocr.train" not in run_text:
        problems.append("run must call python -m wellocr.train")
    elif len(run_text.strip().splitlines()) != 1 or not run_text.strip().startswith(RUN_PREFIX):
        problems.append(f"run must be one line, `{RUN_PREFIX}...`: the trainer names the run, turns SIGTERM into "
                        "exit 75 and prints the cost report")
    setup = SETUP.match((task.setup or "").strip())
    extras = setup.group(1).split(",") if setup else []
    if not setup:
        problems.append("setup must be one call of scripts/pod_setup.sh (`bash scripts/pod_setup.sh gpu,...`): "
                        "it retries the package index and does nothing when repeated on the same pod")
    elif "gpu" not in extras:
        problems.append("setup must install the gpu extra (bash scripts/pod_setup.sh gpu,...)")

    secrets = data.get("secrets") or {}
    for name, value in (secrets.items() if isinstance(secrets, dict) else []):
        if value is not None:
            problems.append(f"secret {name} has a value in the file: declare it as `{name}: null`, pass --secret")
        elif not any(re.search(rf"--secret {re.escape(name)}(\s|=|$)", c) for c in commands):
            problems.append(f"secret {name} is not passed with --secret {name} in the header's launch command "
                            "(SkyPilot 0.14 refuses to launch with an unresolved secret)")
    for name, value in task.envs.items():
        if SECRET_NAME.search(name) and value:
            problems.append(f"env {name} has a value: credentials belong in secrets: with no value")
        elif KEY_LIKE.match(value or ""):
            problems.append(f"env {name} looks like a key")
    problems += credential_problems(path.name, text)

    result = run_section(task, tmp_path)
    if not any(call["module"] == "wellocr.train" for call in result.calls):
        return problems + [f"the run section never calls python -m wellocr.train; it printed:\n{result.output}"]
    try:
        trainer_args = parse_args(result.args_of("wellocr.train"))
    except SystemExit:
        return problems + [f"the trainer rejects its arguments {result.args_of('wellocr.train')}"]
    if managed and not trainer_args.resume_latest:
        problems.append("a managed job must run the trainer with --resume-latest (it is re-run after a preemption)")
    config_path = result.trainer_config_path()
    if not config_path.is_file():
        return problems + [f"the config {config_path} does not exist"]
    try:
        cfg = result.trainer_config()
    except UserError as exc:
        return problems + [f"the trainer's config does not load: {exc}"]

    if managed and task.volumes:
        if not any(Path(cfg.run.output_dir).is_relative_to(mount) for mount in task.volumes):
            problems.append(f"run.output_dir {cfg.run.output_dir} is not on the volume ({', '.join(task.volumes)})")
        if any(r.zone is None for r in task.resources):
            problems.append("a network volume lives in one data center: pin infra: runpod/<region>/<data center>")
    elif managed:
        envs = data.get("envs") or {}
        if "WELLOCR_REMOTE" not in envs or envs["WELLOCR_REMOTE"] is not None:
            problems.append("declare WELLOCR_REMOTE with no value (`WELLOCR_REMOTE: null`): SkyPilot then refuses a "
                            "launch without --env WELLOCR_REMOTE=<url> (or =none)")
        elif not any(re.search(r"--env WELLOCR_REMOTE=\S", c) for c in commands):
            problems.append("the header's launch command must pass --env WELLOCR_REMOTE=<url>")
        try:
            remote = run_section(task, tmp_path, env={"WELLOCR_REMOTE": EXAMPLE_REMOTE}).trainer_config()
        except UserError as exc:
            return problems + [f"with WELLOCR_REMOTE set the config does not load: {exc}"]
        if remote.checkpoint.remote != EXAMPLE_REMOTE:
            problems.append("the run must pass --set checkpoint.remote=\"$WELLOCR_REMOTE\"")
        if setup and "remote" not in extras:
            problems.append("setup must install the remote extra (s3fs) to sync checkpoints to object storage")
    return problems


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sky(tmp_path_factory):
    """SkyPilot with a throwaway HOME and empty user/project config; usage collection off."""
    home = tmp_path_factory.mktemp("sky-home")
    empty = home / "empty-config.yaml"
    empty.write_text("{}\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        mp.setenv("SKYPILOT_GLOBAL_CONFIG", str(empty))
        mp.setenv("SKYPILOT_PROJECT_CONFIG", str(empty))
        mp.setenv("SKYPILOT_DISABLE_USAGE_COLLECTION", "1")
        import sky

        sky.skypilot_config.reload_config()
        yield sky


def launch_env(path: Path) -> dict[str, str]:
    """The --env values a launch must give: every env the file declares with no value, set to an example."""
    envs = raw(path).get("envs") or {}
    return {k: EXAMPLE_REMOTE if k == "WELLOCR_REMOTE" else "example" for k, v in envs.items() if v is None}


def load_task(sky, path: Path, env: dict[str, str] | None = None):
    """The task as `sky launch` / `sky jobs launch` loads it, with the --env overrides `env` (default: launch_env)."""
    from sky.utils import dag_utils

    overrides = launch_env(path) if env is None else env
    dag = dag_utils.load_chain_dag_from_yaml(str(path), env_overrides=list(overrides.items()) or None)
    assert len(dag.tasks) == 1, dag.tasks
    return dag.tasks[0]


def write_task(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sky" / "job.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


# A managed job that passes every check; each negative test breaks one thing in it.
GOOD_JOB = textwrap.dedent("""\
    # sky jobs launch sky/job.yaml --env WELLOCR_REMOTE=s3://wellocr-example-bucket/checkpoints --secret WANDB_API_KEY
    name: job
    resources:
      infra: runpod
      accelerators: RTX4090:1
      use_spot: true
      job_recovery: {strategy: FAILOVER, max_restarts_on_errors: 0, recover_on_exit_codes: [75]}
    envs:
      WELLOCR_CONFIG: configs/train_r16.yaml
      WELLOCR_REMOTE: null
    secrets:
      WANDB_API_KEY: null
    setup: bash scripts/pod_setup.sh gpu,remote
    run: exec python -m wellocr.train --resume-latest --set checkpoint.remote="$WELLOCR_REMOTE"
""")


# ---------------------------------------------------------------- the shipped files


def test_sky_dir_holds_the_smoke_test_the_managed_jobs_and_the_volume():
    assert {p.name for p in TASK_FILES} >= {"quick_val.yaml", "train_r16.yaml", "train_r16_runpod.yaml",
                                            "train_r16_volume.yaml"}
    assert {p.name for p in MANAGED_FILES} >= {"train_r16.yaml", "train_r16_runpod.yaml", "train_r16_volume.yaml"}
    assert "quick_val.yaml" not in {p.name for p in MANAGED_FILES}
    assert {p.name for p in VOLUME_FILES} == {"checkpoint_volume.yaml"}


@pytest.mark.parametrize("path", TASK_FILES, ids=[p.name for p in TASK_FILES])
def test_skypilot_parses_the_task(sky, path):
    task = load_task(sky, path)
    assert task.run and task.setup and task.resources


@pytest.mark.parametrize("path", TASK_FILES, ids=[p.name for p in TASK_FILES])
def test_each_cloud_supports_every_feature_the_task_needs(sky, path):
    cloud_feature_check(load_task(sky, path))


def test_the_multi_cloud_job_fails_over_across_clouds_the_others_stay_on_runpod(sky):
    """sky/train_r16.yaml names every (cloud, GPU) pair of the rule in the documented order (RunPod, GCP, AWS); the
    RunPod-only job and the network-volume job (a volume lives in one RunPod data center) name RunPod alone, with
    the same GPU."""
    multi = load_task(sky, SKY_DIR / "train_r16.yaml")
    assert set(JOB_ORDER) == set(CLOUD_GPUS)
    assert [(e["infra"], e["accelerators"].split(":")[0]) for e in raw(SKY_DIR / "train_r16.yaml")["resources"][
        "ordered"]] == JOB_ORDER
    assert sorted((str(r.cloud).lower(), *r.accelerators) for r in multi.resources) == sorted(JOB_ORDER)
    assert all(r.use_spot and r.job_recovery == multi.resources[0].job_recovery for r in multi.resources)
    for name in ("train_r16_runpod.yaml", "train_r16_volume.yaml"):
        assert [(str(r.cloud).lower(), *r.accelerators) for r in load_task(sky, SKY_DIR / name).resources] == [
            ("runpod", "RTX4090")]


def test_the_multi_node_job_names_clouds_with_multi_node_clusters_and_gives_the_trainer_its_place(sky, tmp_path):
    """sky/train_r16_multinode.yaml: two machines on GCP or AWS (SkyPilot's own feature check refuses num_nodes 2 on
    RunPod: why the file names no RunPod entry), and every node's trainer learns the node count and its GPUs."""
    path = SKY_DIR / "train_r16_multinode.yaml"
    task = load_task(sky, path)
    assert task.num_nodes == 2 and sorted(str(r.cloud).lower() for r in task.resources) == ["aws", "gcp"]
    on_runpod = path.read_text().replace("infra: gcp", "infra: runpod").replace("L4:1", "RTX4090:1")
    with pytest.raises(sky.exceptions.NotSupportedError, match="[Mm]ulti-node"):
        cloud_feature_check(load_task(sky, write_task(tmp_path, on_runpod)))
    result = run_section(task, tmp_path, env={"SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_RANK": "1",
                                              "SKYPILOT_NODE_IPS": "10.0.0.5\n10.0.0.6",
                                              "SKYPILOT_NUM_GPUS_PER_NODE": "1"})
    cfg = result.trainer_config()
    assert (cfg.train.nodes, cfg.train.processes, cfg.train.per_device_train_batch_size) == (2, 1, 8)
    assert result.trainer_env()["SKYPILOT_NODE_RANK"] == "1"


@pytest.mark.parametrize("cloud_gpu", sorted(CLOUD_GPUS), ids=lambda p: "-".join(p))
def test_every_listed_gpu_qualifies_in_its_clouds_catalog_rows(cloud_gpu):
    """>= 22 GB, bf16 (compute capability >= 8.0), a spot price in every checked-in row of SkyPilot's catalog."""
    assert catalog_problems(*cloud_gpu) == []


@pytest.mark.parametrize("path", TASK_FILES, ids=[p.name for p in TASK_FILES])
def test_task_passes_the_checks_skypilot_cannot_do_offline(sky, path, tmp_path):
    assert sky_problems(path, tmp_path) == []


@pytest.mark.parametrize("path", VOLUME_FILES, ids=[p.name for p in VOLUME_FILES])
def test_volume_passes_skypilot_volume_validation(sky, path):
    volume = sky.volumes.Volume.from_yaml_config(raw(path))
    volume.validate()
    assert volume.type == "runpod-network-volume" and str(volume.cloud).lower() == "runpod"
    assert volume.zone, "a RunPod network volume needs its data center: infra: runpod/<region>/<data center>"
    assert int(volume.size) >= 10
    assert any(c.startswith(f"sky volumes apply sky/{path.name}") for c in header_commands(path))


def test_volume_task_mounts_the_shipped_volume_in_its_data_center(sky):
    """SkyPilot pins a task to its volume's region and zone and fails on a mismatch, comparing them as written."""
    volume = raw(SKY_DIR / "checkpoint_volume.yaml")
    task = load_task(sky, SKY_DIR / "train_r16_volume.yaml")
    assert list(task.volumes.values()) == [volume["name"]]
    assert raw(SKY_DIR / "train_r16_volume.yaml")["resources"]["infra"] == volume["infra"]


# ---------------------------------------------------------------- what the run: sections do


@pytest.mark.parametrize("path", TASK_FILES, ids=[p.name for p in TASK_FILES])
def test_setup_is_one_call_of_the_retrying_setup_script(sky, path):
    """setup: runs again on every launch and recovery, and a failed one is FAILED_SETUP, never retried."""
    task = load_task(sky, path)
    match = SETUP.match(task.setup.strip())
    assert match, f"setup is not one call of scripts/pod_setup.sh: {task.setup!r}"
    wanted = {"gpu", "remote"} if path in MANAGED_FILES else {"gpu"}
    assert wanted <= set(match.group(1).split(","))


@pytest.mark.parametrize("path", TASK_FILES, ids=[p.name for p in TASK_FILES])
def test_run_is_one_line_that_execs_the_trainer(sky, path):
    run = load_task(sky, path).run.strip()
    assert len(run.splitlines()) == 1 and run.startswith(RUN_PREFIX), run


@pytest.mark.parametrize("code", [0, 2, EXIT_PREEMPTED, EXIT_OOM])
@pytest.mark.parametrize("path", MANAGED_FILES, ids=[p.name for p in MANAGED_FILES])
def test_job_exit_code_is_the_trainers(sky, path, code, tmp_path):
    result = run_section(load_task(sky, path), tmp_path, trainer_exit=code)
    assert result.code == code, result.output
    assert [c["module"] for c in result.calls] == ["wellocr.train"]  # the trainer prints the cost report itself


@pytest.mark.parametrize("path", MANAGED_FILES, ids=[p.name for p in MANAGED_FILES])
def test_every_recovery_of_a_job_continues_the_run_named_after_its_task_id(sky, path, tmp_path):
    task = load_task(sky, path)
    first, recovery = run_section(task, tmp_path), run_section(task, tmp_path)
    assert first.args_of("wellocr.train") == recovery.args_of("wellocr.train")
    assert first.trainer_env()["SKYPILOT_TASK_ID"] == recovery.trainer_env()["SKYPILOT_TASK_ID"] == TASK_ID

    def run_name(result: RunResult) -> tuple[str, str]:  # the trainer's own naming, from what the pod hands it
        return resolve_run_name(result.trainer_config(), result.trainer_config_path(), resume=True,
                                env=result.trainer_env())

    assert run_name(first) == run_name(recovery) and run_name(first)[1] != "generated"
    named = run_section(task, tmp_path, env={"WELLOCR_RUN_NAME": "r16-first"})
    assert named.trainer_env()["WELLOCR_RUN_NAME"] == "r16-first"  # the trainer's: a non-empty name wins


@pytest.mark.parametrize("path", MANAGED_FILES, ids=[p.name for p in MANAGED_FILES])
def test_sigterm_to_the_job_shell_reaches_the_trainer_and_the_job_exits_75(sky, path, tmp_path):
    proc, _ = start_run_section(load_task(sky, path), tmp_path, train_seconds=60)
    try:
        deadline = time.monotonic() + 60
        while "stand-in trainer: training" not in (proc.stdout.readline() or ""):
            assert time.monotonic() < deadline and proc.poll() is None, "the stand-in trainer never started"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == EXIT_PREEMPTED
    finally:
        if proc.poll() is None:
            proc.kill()


def test_object_storage_job_passes_the_remote_and_none_opts_out(sky, tmp_path):
    task = load_task(sky, SKY_DIR / "train_r16.yaml")
    assert task.envs["WELLOCR_REMOTE"] == EXAMPLE_REMOTE
    with_remote = run_section(task, tmp_path, env={"WELLOCR_REMOTE": EXAMPLE_REMOTE})
    assert with_remote.trainer_config().checkpoint.remote == EXAMPLE_REMOTE
    opted_out = run_section(load_task(sky, SKY_DIR / "train_r16.yaml", {"WELLOCR_REMOTE": "none"}), tmp_path)
    assert "checkpoint.remote=none" in opted_out.args_of("wellocr.train")
    assert opted_out.trainer_config().checkpoint.remote is None


def test_skypilot_refuses_the_object_storage_job_without_a_remote(sky):
    """WELLOCR_REMOTE is declared with no value: SkyPilot's launch path (load_chain_dag_from_yaml, which
    `sky launch` and `sky jobs launch` call with their --env values) refuses the file until it gets one."""
    with pytest.raises(ValueError, match=r"Environment variable 'WELLOCR_REMOTE' is None\. Please set a value"):
        load_task(sky, SKY_DIR / "train_r16.yaml", env={})
    with pytest.raises(ValueError, match="'WELLOCR_REMOTE' is None"):
        sky.Task.from_yaml(str(SKY_DIR / "train_r16.yaml"))
    assert load_task(sky, SKY_DIR / "train_r16.yaml", {"WELLOCR_REMOTE": "none"}).envs["WELLOCR_REMOTE"] == "none"


@pytest.mark.parametrize("path", TASK_FILES, ids=[p.name for p in TASK_FILES])
def test_extra_args_and_another_config_reach_the_trainer(sky, path, tmp_path):
    """What the local preemption drill relies on: WELLOCR_CONFIG and WELLOCR_EXTRA_ARGS select what runs."""
    result = run_section(load_task(sky, path), tmp_path, env={  # on a one-GPU pod, as the drill runs it here
        "WELLOCR_CONFIG": "configs/cpu_smoke.yaml", "WELLOCR_EXTRA_ARGS": "--set cost.budget_cap=3.5 --set seed=7",
        "SKYPILOT_NUM_GPUS_PER_NODE": "1"})
    cfg = result.trainer_config()
    assert (cfg.model.backend, cfg.cost.budget_cap, cfg.train.seed) == ("hf", 3.5, 7)


# ---------------------------------------------------------------- the checks catch bad files


def test_checks_accept_the_minimal_good_job(sky, tmp_path):
    assert sky_problems(write_task(tmp_path, GOOD_JOB), tmp_path) == []


def test_feature_check_rejects_a_bucket_mount_on_runpod(sky, tmp_path):
    path = write_task(tmp_path, GOOD_JOB + "file_mounts:\n  /data:\n    source: s3://wellocr-example-bucket/data\n"
                                           "    mode: MOUNT\n")
    with pytest.raises(sky.exceptions.NotSupportedError, match="storage_mounting"):
        cloud_feature_check(load_task(sky, path))


def test_checks_reject_a_gpu_outside_the_rule(sky, tmp_path):
    path = write_task(tmp_path, GOOD_JOB.replace("  infra: runpod\n  accelerators: RTX4090:1\n",
                                                 "  infra: aws\n  accelerators: T4:1\n"))
    assert sky_problems(path, tmp_path) == [f"(aws, T4) is not one of {sorted(CLOUD_GPUS)} (infra and accelerators "
                                            "of an entry)"]


def test_rule_rejects_a_gpu_without_bf16_or_memory_or_spot():
    row = {"InstanceType": "x", "AcceleratorName": "T4", "AcceleratorCount": "1", "SpotPrice": "", "Price": "0.5",
           "GpuInfo": "{'Gpus': [], 'TotalGpuMemoryInMiB': 15360}"}
    problems = prices.qualifies("T4", [row])
    assert [p.split(": ", 1)[1].split(" ")[0] for p in problems] == ["a", "15.0", "no"], problems


def test_gcp_feature_check_runs_on_the_gcp_entry_and_refuses_spot_on_a_managed_instance_group(sky, tmp_path):
    """GCP's own check (SkyPilot 0.14 `GCP._unsupported_features_for_resources`): a DWS managed instance group
    (config gcp.managed_instance_group) cannot hold spot VMs, so a job that sets it fails before any launch."""
    gcp = GOOD_JOB.replace("  infra: runpod\n  accelerators: RTX4090:1\n", "  infra: gcp\n  accelerators: L4:1\n")
    cloud_feature_check(load_task(sky, write_task(tmp_path, gcp)))
    mig = gcp + "config:\n  gcp:\n    managed_instance_group:\n      run_duration: 3600\n"
    with pytest.raises(sky.exceptions.NotSupportedError, match="spot_instance"):
        cloud_feature_check(load_task(sky, write_task(tmp_path, mig)))


def test_checks_reject_retrying_out_of_memory(sky, tmp_path):
    path = write_task(tmp_path, GOOD_JOB.replace("recover_on_exit_codes: [75]", "recover_on_exit_codes: [75, 76]"))
    problems = sky_problems(path, tmp_path)
    assert len(problems) == 1 and "must not contain 76" in problems[0], problems


def test_checks_reject_a_credential_in_the_file(sky, tmp_path):
    path = write_task(tmp_path, GOOD_JOB.replace('WELLOCR_REMOTE: null', 'WELLOCR_REMOTE: null\n  HF_TOKEN: hf_'
                                                   + "a1B2" * 9))
    problems = sky_problems(path, tmp_path)
    assert any("env HF_TOKEN has a value" in p for p in problems), problems
    assert any("Hugging Face token" in p for p in problems), problems


def test_checks_reject_a_secret_the_launch_command_does_not_pass(sky, tmp_path):
    path = write_task(tmp_path, GOOD_JOB.replace("  WANDB_API_KEY: null", "  WANDB_API_KEY: null\n  HF_TOKEN: null"))
    assert sky_problems(path, tmp_path) == [
        "secret HF_TOKEN is not passed with --secret HF_TOKEN in the header's launch command "
        "(SkyPilot 0.14 refuses to launch with an unresolved secret)"]


def test_checks_reject_a_managed_job_that_would_lose_its_checkpoints(sky, tmp_path):
    path = write_task(tmp_path, GOOD_JOB.replace(' --set checkpoint.remote="$WELLOCR_REMOTE"', ""))
    assert sky_problems(path, tmp_path) == ['the run must pass --set checkpoint.remote="$WELLOCR_REMOTE"']


def test_checks_reject_a_remote_with_a_default(sky, tmp_path):
    path = write_task(tmp_path, GOOD_JOB.replace("WELLOCR_REMOTE: null", 'WELLOCR_REMOTE: ""'))
    problems = sky_problems(path, tmp_path)
    assert len(problems) == 1 and "declare WELLOCR_REMOTE with no value" in problems[0], problems


def test_checks_reject_a_bash_program_as_run(sky, tmp_path):
    path = write_task(tmp_path, GOOD_JOB.replace('run: exec python', 'run: |\n  echo starting\n  python'))
    problems = sky_problems(path, tmp_path)
    assert len(problems) == 1 and "run must be one line" in problems[0], problems


def test_checks_reject_an_inline_pip_setup(sky, tmp_path):
    path = write_task(tmp_path, GOOD_JOB.replace("setup: bash scripts/pod_setup.sh gpu,remote",
                                                 "setup: pip install -e '.[gpu,remote]'"))
    problems = sky_problems(path, tmp_path)
    assert len(problems) == 1 and "setup must be one call of scripts/pod_setup.sh" in problems[0], problems


def test_the_rehearsal_is_the_object_storage_job_with_one_self_stop(sky):
    rehearsal, real = load_task(sky, SKY_DIR / "rehearsal.yaml"), load_task(sky, SKY_DIR / "train_r16.yaml")
    assert rehearsal.run == real.run.replace("--resume-latest", "--resume-latest --rehearse-preemption")
    assert rehearsal.envs["WELLOCR_CONFIG"] == "configs/rehearsal.yaml" and (REPO / "configs/rehearsal.yaml").is_file()
    assert [r.to_yaml_config() for r in rehearsal.resources] == [r.to_yaml_config() for r in real.resources]
    assert rehearsal.setup == real.setup
