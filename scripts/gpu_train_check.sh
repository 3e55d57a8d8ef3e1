#!/usr/bin/env bash
# GPU check of the training engine on a random-weight model of the real Qwen3-VL-2B architecture
# (offline: model and data are built on the machine, the model on the GPU). For each backend: train STEPS1 steps
# (checkpoints + final + final evaluation), then a SECOND process resumes with --resume-latest to STEPS2. Compile
# caches stay where wellocr.train puts them (<output_dir>/.compile-cache), so the second process finds them warm;
# its restart overhead (process start → end of its first optimizer step) is read back from run.json. Each process
# runs as on a new, empty pod (fresh HOME and TMPDIR): it finds only what the run directory (the volume) holds.
#   bash scripts/gpu_train_check.sh [unsloth,hf]       (CONFIG=configs/train_r16.yaml STEPS1=6 STEPS2=9 ...)
set -uo pipefail
OUT=${OUT:-gpu-check}; mkdir -p "$OUT"
BACKENDS=${1:-unsloth,hf}
CONFIG=${CONFIG:-configs/quick_val.yaml}
STEPS1=${STEPS1:-5}; STEPS2=${STEPS2:-10}; SAVE=${SAVE:-$STEPS1}
WORK=${WORK:-/tmp/wellocr-gpu}; mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 \
  PYTORCH_ALLOC_CONF=expandable_segments:True WANDB_MODE=disabled
python3 - <<PY 2>&1 | tee "$OUT/build.log"
import time, torch
from wellocr.tiny import build_tiny_model
from wellocr.synthetic import write_dataset
t = time.time()
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # a GPU init takes seconds, a CPU one minutes
    build_tiny_model("$WORK/qwen3-vl-2b-random", seed=0, arch="qwen3-vl-2b")
print(f"model built in {time.time()-t:.0f} s")
t = time.time(); write_dataset("$WORK/headers", train=64, eval=16, seed=0, width=1024); print(f"data written in {time.time()-t:.0f} s")
PY
COMMON=(--config "$CONFIG" --set model.model_name=$WORK/qwen3-vl-2b-random --set data.dataset_name=$WORK/headers
        --set train_subset=64 --set eval_subset=8 --set run.output_dir=$WORK/runs --set wandb.enabled=false
        --set eval.generation_samples=${GEN_SAMPLES:-2} --set eval.max_new_tokens=32 --set save_steps=$SAVE --set eval_steps=$SAVE)
for backend in ${BACKENDS//,/ }; do
  rm -rf "$WORK/runs/check-$backend"  # a new run each time (a warm machine still has the last one); caches stay
  for phase in 1 2; do
    if [ $phase = 1 ]; then extra=(--set max_steps=$STEPS1); else extra=(--resume-latest --set max_steps=$STEPS2); fi
    pod=$WORK/pod-$backend-$phase; rm -rf "$pod"; mkdir -p "$pod/home" "$pod/tmp"
    start=$(date +%s)
    HOME=$pod/home TMPDIR=$pod/tmp timeout ${PHASE_TIMEOUT:-420} python3 -m wellocr.train "${COMMON[@]}" --set model.backend=$backend \
      --set run.run_name=check-$backend "${extra[@]}" > "$OUT/$backend-$phase.log" 2>&1
    rc=$?
    echo "$backend phase $phase: exit $rc in $(( $(date +%s) - start )) s"
    grep -E "auto batch|resuming|first optimizer step|this attempt|final (adapter|eval)|exit:|Error|error" \
      "$OUT/$backend-$phase.log" | tail -10
  done
  python3 -c "import json; r = json.load(open('$WORK/runs/check-$backend/run.json'));
print('auto_batch', r.get('auto_batch')); [print('attempt', a['attempt'], a['exit_reason'], 'first_step', a.get('first_step'),
  'first_step_s', a.get('first_step_s')) for a in r['attempts']]" 2>&1 | tee -a "$OUT/summary.txt"
  cp "$WORK/runs/check-$backend/run.json" "$OUT/$backend-run.json" 2>/dev/null
  du -sh "$WORK/runs/.compile-cache"/* 2>/dev/null | tee -a "$OUT/summary.txt"
done
