#!/usr/bin/env bash
# Local preemption drill: does a SkyPilot managed job of sky/train_r16.yaml survive its pod vanishing mid-training?
#
# Runs the task's `run:` section on this machine the way a managed job's pod does (bash -i, in the repo root, the
# task's `envs:` and the SKYPILOT_* variables SkyPilot sets; your ~/.bashrc is not read, so the pod's `python` is the
# one on your PATH), on CPU with configs/cpu_smoke.yaml and a tiny model;
# SIGKILLs it and everything it started once a checkpoint is complete (a spot pod reclaimed without notice), then
# runs the same section again with the same SKYPILOT_TASK_ID (the recovery the jobs controller launches), and checks:
#   - the recovery resumed from the last complete checkpoint ("resuming from checkpoint-N") and finished at max_steps;
#   - one W&B run (run.json's wandb_run_id unchanged; every attempt's W&B run directory ends with that id);
#   - one cost ledger with one segment per attempt, not overlapping, summed by `python -m wellocr.cost`;
#   - the evaluation report eval/final/report.html.
#
# Usage, from anywhere (it runs in the repo root; every file goes under the work directory):
#   bash scripts/preemption_drill.sh [--task sky/train_r16_volume.yaml]
#       volume layout (a network volume, or no WELLOCR_REMOTE): the recovery finds the same run directory
#   bash scripts/preemption_drill.sh --remote s3://my-bucket/drill
#       object-storage layout: the recovery starts from an EMPTY output directory (a new pod's disk) and must resume
#       from what the first attempt uploaded; needs the bucket's credentials in the environment (AWS_ACCESS_KEY_ID,
#       AWS_SECRET_ACCESS_KEY, and AWS_ENDPOINT_URL for R2 / MinIO / another S3 API); file:///some/dir works too.
#       The kill waits until a checkpoint is complete in the bucket.
# Options:
#   --remote URL     object-storage layout, checkpoints synced to URL (the task's WELLOCR_REMOTE)
#   --workdir DIR    where everything goes (default: a new directory under ${TMPDIR:-/tmp}, removed after a
#                    pass); never removed when given here, nor after a failure
#   --keep           keep the default work directory after a pass too
#   --task FILE      the SkyPilot task whose run: section is drilled (default: sky/train_r16.yaml)
#   --timeout S      limit for each attempt in seconds (default 900)
# Environment:
#   DRILL_CONFIG       trainer config (default configs/cpu_smoke.yaml: the tiny model and synthetic data, on CPU)
#   DRILL_EXTRA_ARGS   more trainer flags, appended to the drill's own (later --set wins); no spaces inside a value
#                      (nor in the work directory's, DRILL_MODEL's or DRILL_DATA's paths: they become such flags)
#   DRILL_MODEL, DRILL_DATA  an existing tiny model / data set directory; default: built under the work directory
#   WANDB_MODE         default offline (the drill logs to W&B offline under the run directory)
#   secrets the task declares (WANDB_API_KEY, HF_TOKEN, AWS_*) are passed on from your environment, as --secret does
# Prints one PASS or FAIL line per check and exits 0 only when every check passes (1 otherwise, 2 on bad usage).
# Takes a few minutes on a laptop CPU; nothing is downloaded.
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

REMOTE="" WORK="" KEEP=0 TASK="sky/train_r16.yaml" TIMEOUT=900
while [ $# -gt 0 ]; do
  case "$1" in
    --remote) REMOTE="${2:?--remote needs a URL}"; shift 2 ;;
    --workdir) WORK="${2:?--workdir needs a directory}"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --task) TASK="${2:?--task needs a file}"; shift 2 ;;
    --timeout) TIMEOUT="${2:?--timeout needs seconds}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "preemption_drill: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "$TASK" in /*) ;; *) TASK="$REPO/$TASK" ;; esac
[ -f "$TASK" ] || { echo "preemption_drill: no task file $TASK" >&2; exit 2; }
if ! command -v python >/dev/null; then
  echo "preemption_drill: no 'python' on PATH (the run: section calls python)" >&2; exit 2
fi
CREATED=0
if [ -z "$WORK" ]; then
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/wellocr-drill.XXXXXX")" && CREATED=1
else
  mkdir -p "$WORK" && WORK="$(cd "$WORK" && pwd)"
fi

# What the pod gets: none of this shell's WELLOCR_* / SKYPILOT_* settings, only the task's and SkyPilot's.
for name in $(compgen -e); do
  case "$name" in WELLOCR_*|SKYPILOT_*) unset "$name" ;; esac
done
export WANDB_MODE="${WANDB_MODE:-offline}"
export WANDB_DATA_DIR="${WANDB_DATA_DIR:-$WORK/wandb-data}" WANDB_CACHE_DIR="${WANDB_CACHE_DIR:-$WORK/wandb-cache}"

# ---------------------------------------------------------------- the checks (Python, beside the work files)

cat > "$WORK/drill.py" <<'PY'
"""Helpers of scripts/preemption_drill.sh: wait for a checkpoint, snapshot the run after the kill, check the end."""
import argparse, glob, json, os, re, subprocess, sys, time
from pathlib import Path

from wellocr.checkpoint import MARKER, latest_complete_checkpoint, read_marker


def run_name_from(log, output_dir):
    """The run the attempt trains: named in its log, or else the one run directory (with run.json) it created."""
    match = re.search(r"^wellocr: run directory (.+)$", Path(log).read_text(errors="replace"), re.MULTILINE)
    if match:
        return Path(match.group(1).strip()).name
    runs = glob.glob(os.path.join(glob.escape(output_dir), "*", "run.json"))
    return Path(runs[0]).parent.name if len(runs) == 1 else None


def remote_store(url, run):
    from wellocr.remote import RemoteStore
    return RemoteStore(url, run, retries=2, retry_wait=0.2, retry_wait_max=1.0)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def wait_checkpoint(a):
    """Print the run name once a checkpoint is complete (locally, or in the remote store); 1 if the attempt ended."""
    deadline, run, store = time.time() + a.timeout, None, None
    while time.time() < deadline:
        if not alive(a.pid):
            print(f"attempt ended before a checkpoint was complete{' in ' + a.remote if a.remote else ''}",
                  file=sys.stderr)
            return 1
        run = run or run_name_from(a.log, a.output_dir)
        if run:
            if a.remote:
                store = store or remote_store(a.remote, run)
                if store.latest_complete_checkpoint():
                    print(run)
                    return 0
            elif glob.glob(os.path.join(glob.escape(a.output_dir), glob.escape(run), "checkpoint-*", MARKER)):
                print(run)
                return 0
        time.sleep(0.5 if a.remote else 0.1)
    print(f"no complete checkpoint after {a.timeout:.0f} s", file=sys.stderr)
    return 2


def read_json(path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def snapshot(a):
    """What the recovery must continue from, as the kill left it."""
    run_dir = Path(a.output_dir) / a.run
    local = latest_complete_checkpoint(run_dir, quiet=True)
    checkpoint = remote_store(a.remote, a.run).latest_complete_checkpoint() if a.remote else (local and local.name)
    info = read_json(run_dir / "run.json", {})
    state = {"run": a.run, "checkpoint": checkpoint, "wandb_run_id": info.get("wandb_run_id"),
             "segments": (read_json(run_dir / "cost.json", {}) or {}).get("segments", []),
             "final_exists": (run_dir / "final").exists()}
    Path(a.out).write_text(json.dumps(state, indent=2))
    return 0


class Checks:
    def __init__(self):
        self.failed = 0

    def __call__(self, ok, passed, failed=None):
        print(f"{'PASS' if ok else 'FAIL'} {passed if ok or failed is None else failed}", flush=True)
        self.failed += not ok
        return ok


def check(a):
    c = Checks()
    before = json.loads(Path(a.snapshot).read_text())
    run = before["run"]
    run_dir = Path(a.output_dir) / run
    log = Path(a.log).read_text(errors="replace")
    where = f"in {a.remote}" if a.remote else "locally"
    n = before["checkpoint"]
    c(a.killed_rc == 137 and not before["final_exists"] and n is not None,
      f"attempt 1 was SIGKILLed mid-training, with {n} complete {where}",
      f"attempt 1: exit {a.killed_rc} (expected 137, SIGKILL), final/ exists: {before['final_exists']}, "
      f"last complete checkpoint {where}: {n}")
    if n is not None:
        step = int(n.split("-")[1])
        c(f"resuming from {n} (step {step})" in log, f"attempt 2 resumed from {n} (step {step})",
          f"attempt 2 did not print 'resuming from {n} (step {step})': "
          + "; ".join(re.findall(r"^(resuming from .*|no complete checkpoint.*)$", log, re.MULTILINE)))
        if a.remote:
            c(f"remote: restored {n} " in log,
              f"attempt 2 started from an empty directory and restored {n} from {a.remote}",
              f"attempt 2 did not restore {n} from {a.remote}")
    c(a.rc == 0, "attempt 2 exited 0",
      f"attempt 2 exited {a.rc} (see {a.log})")

    config = {}
    try:
        import yaml
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, ValueError):
        pass
    max_steps = (config.get("train") or {}).get("max_steps")
    final_step = (read_marker(run_dir / "final") or {}).get("step")
    c(max_steps is not None and final_step == max_steps, f"finished at max_steps: final/ complete at step {final_step}",
      f"final/ step {final_step}, max_steps {max_steps}")

    info = read_json(run_dir / "run.json", {})
    attempts = [(x.get("attempt"), x.get("exit_reason")) for x in info.get("attempts", [])]
    c(len(attempts) == 2 and attempts[0][1] != "finished" and attempts[1] == (2, "finished"),
      f"run.json: attempt 1 ({attempts[0][1] if attempts else '?'}: killed) and attempt 2 (finished)",
      f"run.json attempts: {attempts}")

    wandb_on = (config.get("wandb") or {}).get("enabled") and os.environ.get("WANDB_MODE", "") != "disabled"
    if not wandb_on:
        print("NOTE W&B is off (wandb.enabled false or WANDB_MODE=disabled): run id not checked")
    else:
        run_id = info.get("wandb_run_id")
        dirs = sorted({p for d in a.run_dirs for p in glob.glob(os.path.join(glob.escape(d), "wandb", "*run-*"))
                       if not p.endswith("latest-run")})
        names = [Path(p).name for p in dirs]
        c(bool(run_id) and run_id == before["wandb_run_id"] and len(names) >= 2
          and all(x.endswith(f"-{run_id}") for x in names),
          f"one W&B run: run.json wandb_run_id {run_id} unchanged, both attempts logged to it ({', '.join(names)})",
          f"W&B run id after the kill {before['wandb_run_id']}, at the end {run_id}; W&B run dirs: {names}")

    segments = (read_json(run_dir / "cost.json", {}) or {}).get("segments", [])
    report = subprocess.run([sys.executable, "-m", "wellocr.cost", "--run", str(run_dir), "--json"],
                            capture_output=True, text=True)
    total = read_json_text(report.stdout).get("total_usd")
    from wellocr.cost import segment_usd
    summed = sum(segment_usd(s) for s in segments)
    no_overlap = len(segments) == 2 and (segments[0].get("host") != segments[1].get("host")
                                         or segments[1]["start"] >= segments[0]["last_heartbeat"])
    c([s.get("attempt") for s in segments] == [1, 2] and no_overlap and total is not None
      and abs(total - summed) <= 1e-9 * max(1.0, summed),
      f"one cost ledger: 2 segments (attempts 1 and 2), not overlapping; the report's total ${summed:.4f} is "
      "their sum",
      f"cost.json segments {[(s.get('attempt'), s.get('start'), s.get('last_heartbeat')) for s in segments]}, "
      f"report total {total} (exit {report.returncode}: {report.stderr.strip()[-300:]}), sum {summed}")

    html = run_dir / "eval" / "final" / "report.html"
    c(html.is_file() and html.stat().st_size > 0, f"evaluation report {html}", f"no evaluation report at {html}")

    if a.remote:
        from wellocr.remote import open_filesystem
        fs, root = open_filesystem(a.remote)
        base = f"{root}/{run}"
        wanted = [f"final/{MARKER}", "eval/final/report.html", "run.json", "cost.json"]
        missing = [p for p in wanted if not fs.exists(f"{base}/{p}")]
        c(not missing, f"{a.remote}/{run} holds final/, eval/final/report.html, run.json and cost.json",
          f"missing in {a.remote}/{run}: {', '.join(missing)}")

    print(f"drill: {'PASS' if not c.failed else 'FAIL'} ({c.failed} check(s) failed)")
    return 1 if c.failed else 0


def read_json_text(text):
    try:
        return json.loads(text)
    except ValueError:
        return {}


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wait-checkpoint")
    w.add_argument("--log", required=True); w.add_argument("--output-dir", required=True)
    w.add_argument("--pid", type=int, required=True); w.add_argument("--timeout", type=float, required=True)
    w.add_argument("--remote", default="")
    s = sub.add_parser("snapshot")
    s.add_argument("--output-dir", required=True); s.add_argument("--run", required=True)
    s.add_argument("--remote", default=""); s.add_argument("--out", required=True)
    k = sub.add_parser("check")
    k.add_argument("--snapshot", required=True); k.add_argument("--output-dir", required=True)
    k.add_argument("--log", required=True); k.add_argument("--rc", type=int, required=True)
    k.add_argument("--killed-rc", type=int, required=True); k.add_argument("--remote", default="")
    k.add_argument("--run-dirs", nargs="+", required=True)
    a = p.parse_args()
    return {"wait-checkpoint": wait_checkpoint, "snapshot": snapshot, "check": check}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
PY

# ---------------------------------------------------------------- the pod's script: SkyPilot's wrapper + run:

TASK_NAME="$(python - "$TASK" "$WORK/run_section.sh" "$WORK/task_envs.sh" "$WORK" <<'PY'
import shlex, sys, yaml
task = yaml.safe_load(open(sys.argv[1])) or {}
if not isinstance(task.get("run"), str):
    sys.exit(f"{sys.argv[1]}: no run: section")
open(sys.argv[2], "w").write(task["run"])
with open(sys.argv[3], "w") as f:
    for key, value in (task.get("envs") or {}).items():
        if key == "HF_HOME":  # a cache on the pod's volume (/checkpoints/...): here, under the work directory
            value = f"{sys.argv[4]}/hf-home"
        if key == "WELLOCR_REMOTE" and value is None:  # declared with no value: the launch must give one; without
            value = "none"                             # --remote the drill gives what a launch without a bucket does
        if key == "PIP_CACHE_DIR":  # setup's cache on the volume; the drill runs no setup
            continue
        f.write(f"export {key}={shlex.quote('' if value is None else str(value))}\n")
print(task.get("name") or "task")
PY
)" || { echo "preemption_drill: cannot read $TASK" >&2; exit 2; }

MODEL="${DRILL_MODEL:-$WORK/cache/tiny-qwen3-vl}"
DATA="${DRILL_DATA:-$WORK/cache/synthetic-headers}"
case "$MODEL$DATA" in
  *[[:space:]]*) echo "preemption_drill: no spaces in the paths of the model, the data or --workdir: they are" \
                   "passed in WELLOCR_EXTRA_ARGS, which the run: section splits at spaces" >&2; exit 2 ;;
esac
EXTRA="--set max_steps=8 --set save_steps=2 --set eval_steps=4 --set eval.max_new_tokens=24"
EXTRA+=" --set eval.generation_samples=2 --set wandb.enabled=true --set cost.hourly_rate=0.74 --set cost.budget_cap=0"
EXTRA+=" --set model.model_name=$MODEL --set data.dataset_name=$DATA ${DRILL_EXTRA_ARGS:-}"
TASK_ID="sky-managed-$(date -u +%Y-%m-%d-%H-%M-%S-%6N)_${TASK_NAME}_1-0"  # one managed job: same id on recovery

write_pod_script() {  # $1 script path, $2 WELLOCR_OUTPUT_DIR of this pod
  {
    echo "export PYTHONUNBUFFERED=1"
    printf 'cd %q\n' "$REPO"
    cat "$WORK/task_envs.sh"
    [ -n "$REMOTE" ] && printf 'export %s=%q\n' WELLOCR_REMOTE "$REMOTE"  # the launch's --env WELLOCR_REMOTE
    printf 'export %s=%q\n' WELLOCR_CONFIG "${DRILL_CONFIG:-configs/cpu_smoke.yaml}" WELLOCR_OUTPUT_DIR "$2" \
      WELLOCR_EXTRA_ARGS "$EXTRA" \
      SKYPILOT_TASK_ID "$TASK_ID" SKYPILOT_TASK_IDS "$TASK_ID" SKYPILOT_MANAGED_JOB_ID 1 \
      SKYPILOT_NODE_RANK 0 SKYPILOT_NUM_NODES 1 SKYPILOT_NODE_IPS 127.0.0.1 SKYPILOT_NUM_GPUS_PER_NODE 0 \
      SKYPILOT_CLUSTER_INFO "{\"cluster_name\": \"${TASK_NAME}-1\", \"cloud\": \"RunPod\", \"num_nodes\": 1}"
    cat "$WORK/run_section.sh"
  } > "$1"
}

descendants() {  # $1 and every process below it, parents first
  local all todo=("$1") pid child
  all="$(ps -e -o pid=,ppid=)"
  while [ ${#todo[@]} -gt 0 ]; do
    pid=${todo[0]}; todo=("${todo[@]:1}")
    echo "$pid"
    for child in $(awk -v p="$pid" '$2 == p {print $1}' <<<"$all"); do todo+=("$child"); done
  done
}

vanish() {  # SIGKILL the pod's processes (the run section, the trainer, W&B's service): the pod is gone
  local pids pid
  pids="$(descendants "$1")"
  for pid in $pids; do kill -STOP "$pid" 2>/dev/null; done
  for pid in $pids; do kill -KILL "$pid" 2>/dev/null; done
  wait "$1" 2>/dev/null
  KILLED_RC=$?
  for _ in $(seq 100); do  # orphans are reaped by init; a zombie would still hold the run's lock
    local left=""
    for pid in $pids; do [ -e "/proc/$pid" ] && left="$left $pid"; done
    [ -z "$left" ] && return 0
    sleep 0.2
  done
  echo "NOTE processes$left are still not reaped 20 s after the kill" >&2
}

if [ -n "$REMOTE" ]; then
  LAYOUT="object storage ($REMOTE): the recovery starts from an empty output directory"
  OUT1="$WORK/pod-1/runs" OUT2="$WORK/pod-2/runs"
else
  LAYOUT="volume: the recovery finds the same output directory"
  OUT1="$WORK/volume/runs" OUT2="$WORK/volume/runs"
fi
write_pod_script "$WORK/pod-1.sh" "$OUT1"
write_pod_script "$WORK/pod-2.sh" "$OUT2"
echo "drill: $(basename "$TASK") run: section, layout $LAYOUT"
echo "drill: SKYPILOT_TASK_ID=$TASK_ID; work directory $WORK"

# ---------------------------------------------------------------- attempt 1, killed; attempt 2, the recovery

# Everything runs in the background and is waited for, so that Ctrl-C or a SIGTERM to the drill acts at once.
pod="" waiter=""
interrupted() {
  [ -n "$waiter" ] && kill "$waiter" 2>/dev/null
  [ -n "$pod" ] && vanish "$pod"
  echo "drill: interrupted (work directory kept: $WORK)"
  exit 130
}
trap interrupted INT TERM
started=$SECONDS
bash --norc -i "$WORK/pod-1.sh" </dev/null >"$WORK/attempt-1.log" 2>&1 &
pod=$!
python "$WORK/drill.py" wait-checkpoint --log "$WORK/attempt-1.log" --output-dir "$OUT1" --pid "$pod" \
  --timeout "$TIMEOUT" ${REMOTE:+--remote "$REMOTE"} >"$WORK/run-name" &
waiter=$!
wait "$waiter"
waited=$?
waiter=""
RUN="$(cat "$WORK/run-name")"
vanish "$pod"
pod=""
if [ $waited -ne 0 ] || [ -z "$RUN" ]; then
  echo "FAIL attempt 1 never had a complete checkpoint to recover from; its output ends:"
  tail -n 40 "$WORK/attempt-1.log" | sed 's/^/  | /'
  echo "drill: FAIL (work directory kept: $WORK)"
  exit 1
fi
echo "drill: attempt 1 SIGKILLed after $((SECONDS - started)) s (run $RUN); starting attempt 2"
python "$WORK/drill.py" snapshot --output-dir "$OUT1" --run "$RUN" --out "$WORK/after-kill.json" \
  ${REMOTE:+--remote "$REMOTE"} || { echo "drill: FAIL (cannot read the run after the kill)"; exit 1; }

started=$SECONDS
timeout -k 30 "$TIMEOUT" bash --norc -i "$WORK/pod-2.sh" </dev/null >"$WORK/attempt-2.log" 2>&1 &
pod=$!
wait "$pod"
rc=$?
pod=""
echo "drill: attempt 2 exited $rc after $((SECONDS - started)) s"

python "$WORK/drill.py" check --snapshot "$WORK/after-kill.json" --output-dir "$OUT2" --log "$WORK/attempt-2.log" \
  --rc "$rc" --killed-rc "$KILLED_RC" --run-dirs "$OUT1/$RUN" "$OUT2/$RUN" ${REMOTE:+--remote "$REMOTE"}
status=$?
if [ $status -ne 0 ]; then
  echo "drill: attempt 2's output ends:"
  tail -n 40 "$WORK/attempt-2.log" | sed 's/^/  | /'
  echo "drill: work directory kept: $WORK"
  exit 1
fi
if [ $KEEP -eq 0 ] && [ $CREATED -eq 1 ]; then
  rm -rf "$WORK"  # only a directory this drill made
else
  echo "drill: work directory kept: $WORK"
fi
exit 0
