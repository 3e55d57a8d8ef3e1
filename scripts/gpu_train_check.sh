#!/usr/bin/env bash
# GPU check of the training engine on a random-weight model of the real Qwen3-VL-2B architecture
# (offline: model and data are built on the machine). For each backend: train 5 steps (checkpoint-5 + final),
# then a SECOND process resumes with --resume-latest to step 10. Logs go to $OUT (or ./gpu-check).
#   bash scripts/gpu_train_check.sh [unsloth,hf]
set -uo pipefail
OUT=${OUT:-gpu-check}; mkdir -p "$OUT"
BACKENDS=${1:-unsloth,hf}
WORK=${WORK:-/tmp/wellocr-gpu}; mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 \
  UNSLOTH_COMPILE_LOCATION=$WORK/unsloth_compiled_cache TORCHINDUCTOR_CACHE_DIR=$WORK/inductor_cache \
  PYTORCH_ALLOC_CONF=expandable_segments:True WANDB_MODE=disabled
python3 - <<PY 2>&1 | tee "$OUT/build.log"
import time
from wellocr.tiny import build_tiny_model
from wellocr.synth import write_dataset
t = time.time(); build_tiny_model("$WORK/qwen3-vl-2b-random", seed=0, arch="qwen3-vl-2b"); print(f"model built in {time.time()-t:.0f} s")
t = time.time(); write_dataset("$WORK/headers", train=64, eval=16, seed=0, width=1024); print(f"data written in {time.time()-t:.0f} s")
PY
COMMON=(--config configs/quick_val.yaml --set model.model_name=$WORK/qwen3-vl-2b-random --set data.dataset_name=$WORK/headers
        --set train_subset=64 --set eval_subset=16 --set run.output_dir=$WORK/runs --set wandb.enabled=false
        --set eval.generation_samples=0 --set save_steps=5 --set eval_steps=5)
for backend in ${BACKENDS//,/ }; do
  for phase in 1 2; do
    if [ $phase = 1 ]; then extra=(--set max_steps=5); else extra=(--resume-latest --set max_steps=10); fi
    start=$(date +%s)
    timeout 420 python3 -m wellocr.train "${COMMON[@]}" --set model.backend=$backend --set run.run_name=check-$backend \
      "${extra[@]}" > "$OUT/$backend-$phase.log" 2>&1
    rc=$?
    echo "$backend phase $phase: exit $rc in $(( $(date +%s) - start )) s"
    grep -E "resuming|training time|final adapter|exit:|Error|error" "$OUT/$backend-$phase.log" | tail -8
  done
done
