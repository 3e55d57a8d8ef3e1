#!/usr/bin/env bash
# The `setup:` of every task in sky/: installs this checkout into the pod's python, with torch kept at the image's.
#
# SkyPilot runs `setup:` again on every launch and every recovery of a managed job, and a failed setup ends the job
# as FAILED_SETUP, which `max_restarts_on_errors: 0` never retries. So this script:
#   - keeps the image's torch: it pins `torch==<public part of the installed distribution's version>`
#     (importlib.metadata, e.g. 2.9.1 for 2.9.1+cu128), which the installed CUDA build satisfies, so pip never
#     swaps it for another build to suit a dependency (xformers wheels are built for one torch release each);
#   - retries pip a few times with a growing wait (a package-index hiccup on a new pod), then fails in one line;
#   - writes a stamp keyed on what it installed (pyproject.toml, the extras, torch, python): run again on the same
#     pod it checks the stamp and exits within a second or two instead of asking the package index again.
# pip's download cache is pip's own: set PIP_CACHE_DIR on a volume (sky/train_r16_volume.yaml does) and a new pod
# can reuse the wheels (~600 MB) an earlier pod downloaded, as far as the package index's caching headers allow.
#
# Usage, from the repo root (SkyPilot runs setup in the workdir):  bash scripts/pod_setup.sh [EXTRAS]
#   EXTRAS   the project's extras, comma-separated (default gpu,remote)
# Environment:
#   WELLOCR_SETUP_PYTHON     the interpreter to install into (default: python, the image's)
#   WELLOCR_SETUP_ATTEMPTS   pip attempts before giving up (default 4)
#   WELLOCR_SETUP_BACKOFF    seconds before the second attempt, doubled before each later one (default 15)
#   WELLOCR_SETUP_STAMP_DIR  where the stamp goes (default ~/.cache/wellocr-setup: the pod's own disk, never a
#                            volume, because the packages it vouches for live on the pod's disk)
# Exit: 0 installed (or already installed), pip's exit code after the last failed attempt, 2 on bad usage.
set -uo pipefail

EXTRAS="${1:-gpu,remote}"
PY="${WELLOCR_SETUP_PYTHON:-python}"
ATTEMPTS="${WELLOCR_SETUP_ATTEMPTS:-4}"
BACKOFF="${WELLOCR_SETUP_BACKOFF:-15}"
STAMP_DIR="${WELLOCR_SETUP_STAMP_DIR:-$HOME/.cache/wellocr-setup}"

fail() { echo "pod_setup: $*" >&2; exit 2; }
[ $# -le 1 ] || fail "one argument at most (the extras, e.g. gpu,remote); got $#"
[[ "$EXTRAS" =~ ^[A-Za-z0-9_,-]+$ ]] || fail "extras must look like gpu,remote; got '$EXTRAS'"
[[ "$ATTEMPTS" =~ ^[1-9][0-9]*$ ]] || fail "WELLOCR_SETUP_ATTEMPTS must be a positive whole number; got '$ATTEMPTS'"
[[ "$BACKOFF" =~ ^[0-9]+([.][0-9]+)?$ ]] || fail "WELLOCR_SETUP_BACKOFF must be seconds; got '$BACKOFF'"
[ -f pyproject.toml ] || fail "no pyproject.toml in $(pwd): run it from the repo root (the task's workdir)"
command -v "$PY" >/dev/null || fail "no '$PY' on PATH (set WELLOCR_SETUP_PYTHON to the image's python)"

started=$SECONDS
# The installed torch's distribution version (torch.__version__ can name another build than pip knows) and the
# interpreter: both part of what the stamp vouches for.
probe="$("$PY" - <<'PY'
import importlib.metadata, platform, sys
try:
    torch = importlib.metadata.version("torch")
except importlib.metadata.PackageNotFoundError:
    torch = "none"
print(torch, f"{sys.executable}:{platform.python_version()}")
PY
)" || fail "'$PY' cannot run: $probe"
read -r TORCH_DIST PY_ID <<<"$probe"
if [ "$TORCH_DIST" = "none" ]; then
  TORCH_PIN=()
  echo "pod_setup: note: no torch in $PY; pip installs the newest torch the project allows"
else
  TORCH_PIN=("torch==${TORCH_DIST%%+*}")  # 2.9.1+cu128 -> torch==2.9.1, which the installed 2.9.1+cu128 satisfies
fi

KEY="$( { cat pyproject.toml; echo "extras=$EXTRAS torch=$TORCH_DIST python=$PY_ID"; } | sha256sum | cut -c1-16)"
STAMP="$STAMP_DIR/installed-$KEY"
if [ -f "$STAMP" ] && "$PY" -c 'import importlib.metadata as m; m.version("wellocr")' 2>/dev/null; then
  echo "pod_setup: already installed on this pod (.[${EXTRAS}], torch $TORCH_DIST; stamp $STAMP): nothing to do"
  exit 0
fi

cmd=("$PY" -m pip install --progress-bar off -e ".[$EXTRAS]" "${TORCH_PIN[@]}")
echo "pod_setup: ${cmd[*]}${PIP_CACHE_DIR:+ (PIP_CACHE_DIR=$PIP_CACHE_DIR)}"
wait_s="$BACKOFF"
for attempt in $(seq "$ATTEMPTS"); do
  "${cmd[@]}"
  rc=$?
  [ $rc -eq 0 ] && break
  if [ "$attempt" -lt "$ATTEMPTS" ]; then
    echo "pod_setup: pip failed (exit $rc, attempt $attempt of $ATTEMPTS); retrying in ${wait_s} s"
    sleep "$wait_s"
    wait_s="$(awk -v w="$wait_s" 'BEGIN { print w * 2 }')"
  fi
done
if [ $rc -ne 0 ]; then
  echo "pod_setup: FAILED: pip install of .[${EXTRAS}] ${TORCH_PIN[*]} failed $ATTEMPTS times (last exit $rc, see" \
    "pip's errors above); the job ends FAILED_SETUP: fix the cause, then launch again with --env" \
    "WELLOCR_RUN_NAME=<run> to continue the run" >&2
  exit $rc
fi

mkdir -p "$STAMP_DIR" \
  && printf 'extras=%s\ntorch=%s\npython=%s\ninstalled_at=%s\n' "$EXTRAS" "$TORCH_DIST" "$PY_ID" \
       "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$STAMP.tmp" && mv "$STAMP.tmp" "$STAMP" \
  || echo "pod_setup: note: cannot write the stamp $STAMP: the next setup on this pod installs again"
echo "pod_setup: installed .[${EXTRAS}] with torch $TORCH_DIST in $((SECONDS - started)) s"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
exit 0
