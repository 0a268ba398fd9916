#!/usr/bin/env bash
# Every GPU figure of docs/performance.md plus `pytest -m gpu`, in one run of at most ~8 minutes, into ONE results
# file, so that whoever has a GPU runs it once and commits the file:
#
#   bash benchmarks/gpu_suite.sh                       # on the GPU machine (venv with `make venv` first)
#   bash benchmarks/gpu_suite.sh --dry-run --out F     # on the CPU: every step with --quick sizes (the test suite)
#
# Steps (each under its own time limit; a failed or timed-out step is recorded and the suite goes on):
#   1. device            nvidia-smi / torch device facts
#   2. image encoders    ViT-B/16 and ResNet-50 forward: fp32, bf16, bf16+channels-last, +compile, package path
#   3. training step     stalign-base/small: fp32/bf16 x eager/compile, batch 64
#   3b. input pipeline   per-sample vs batched shard reads + augmentation on the GPU: pairs/s, and stalign-base
#                        training steps/s fed by each next to the model alone (the input pipeline's share)
#   4. WSI prediction    synthetic slide, stalign-base, tiles/s next to the plain openslide path
#   5. retrieval         1,000,000 x 256 bank, 4,096 queries, k = 50, recall next to plain matmul + topk
#   6. stofm embedding   stofm-small fp32/bf16 and the original SToFM SE(2), 100,000 cells
#   6b. feature store    embedding throughput into the store (spots/s), first vs second `stalign bench` on the same
#                        shards, training steps/s from crops vs stored features with frozen encoders
#   7. pytest -m gpu     the GPU-marked tests
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT="benchmarks/gpu_results_$(date -u +%Y%m%d_%H%M).md"
PY="${PY:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown option $1 (use --dry-run, --out FILE)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
mkdir -p "$(dirname "$OUT")"
START=$(date +%s)

if [ "$DRY" = 1 ]; then
  DEV=cpu; Q=--quick
  # dry-run sizes: seconds each
  WSI="--tiles 64 --slide-spots 200"; RET=""; STOFM="--cells 600 --genes 40 --cells-per-tile 200 --original-layers 2"
  LOADER=""; STORE=""
  T_SHORT=300; T_LONG=300
else
  DEV=cuda; Q=""
  WSI="--tiles 20000 --slide-spots 8000 --plain-tiles 3000"; RET=""
  STOFM="--cells 100000 --model stofm-small --dtype fp32 bf16 --original"
  LOADER="--train-model stalign-base --sizes 224 --spots 600 --workers 8 --batches 16 --steps 8"
  STORE="--spots 1200 --train-spots 400 --batch 64"
  T_SHORT=45; T_LONG=90  # limits: 6 x 90 + 45 + 60 s (each step usually ends well before its limit)
fi

{
  echo "# GPU suite ($(date -u '+%Y-%m-%d %H:%M UTC'))"
  echo
  echo "- command: \`bash benchmarks/gpu_suite.sh $([ "$DRY" = 1 ] && echo --dry-run)\`; git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "- mode: $([ "$DRY" = 1 ] && echo 'dry run on the CPU (--quick sizes: checks the suite, not a measurement)' || echo 'GPU measurement')"
  echo
} > "$OUT"

step() {  # step NAME LIMIT_S CMD...: a header, then whatever the command appends, then its status
  local name="$1" limit="$2"; shift 2
  local t0 rc
  t0=$(date +%s)
  echo "== $name (limit ${limit}s)" >&2
  { echo "## $name"; echo; echo "- command: \`$*\`"; echo; } >> "$OUT"
  timeout "$limit" "$@" > "$OUT.step.log" 2>&1
  rc=$?
  {
    if [ $rc -eq 0 ]; then echo "- $name: ok ($(( $(date +%s) - t0 )) s)"
    elif [ $rc -eq 124 ]; then echo "- $name: TIMED OUT after ${limit} s"
    else echo "- $name: FAILED (exit $rc)"; fi
    echo
    if [ $rc -ne 0 ]; then echo '```'; tail -n 30 "$OUT.step.log"; echo '```'; echo; fi
  } >> "$OUT"
  rm -f "$OUT.step.log"
  return 0
}

device_facts() {
  if [ "$DRY" = 0 ] && command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  fi
  "$PY" -c "import torch, platform; print('torch', torch.__version__, '| cuda', torch.version.cuda, '| device',
torch.cuda.get_device_name() if torch.cuda.is_available() else 'none (CPU)', '| python', platform.python_version())"
}

# each benchmark appends its own section (machine, command, table) to the same file
R=(--results "$OUT")
{ echo "## device"; echo; echo '```'; device_facts 2>&1; echo '```'; echo; } >> "$OUT"
step "image encoders" "$T_LONG" "$PY" benchmarks/embed_throughput.py --device "$DEV" $Q "${R[@]}"
step "training step" "$T_LONG" "$PY" benchmarks/train_step.py --device "$DEV" $Q "${R[@]}"
step "input pipeline" "$T_LONG" "$PY" benchmarks/loader.py --device "$DEV" $Q $LOADER "${R[@]}"
step "WSI prediction" "$T_LONG" "$PY" benchmarks/wsi_predict.py --device "$DEV" $Q $WSI "${R[@]}"
step "retrieval" "$T_SHORT" "$PY" benchmarks/retrieval.py --device "$DEV" $Q $RET "${R[@]}"
step "stofm embedding" "$T_LONG" "$PY" benchmarks/stofm_embed.py --device "$DEV" $STOFM "${R[@]}"
step "feature store" "$T_LONG" "$PY" benchmarks/feature_store.py --device "$DEV" $Q $STORE "${R[@]}"
if [ "$DRY" = 1 ]; then
  step "pytest -m gpu" "$T_SHORT" "$PY" -m pytest -q -m gpu -p no:cacheprovider --collect-only tests
else
  step "pytest -m gpu" 60 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests
fi
echo "- total: $(( $(date +%s) - START )) s" >> "$OUT"
echo "results: $OUT" >&2
