#!/usr/bin/env bash
# The training lab on a GPU machine, unattended (issue 8): build the token shards there, train and
# track every sweep run (scripts/run_sweeps.py: several runs per GPU, most important first, each run
# tracked as soon as it is trained and its JSON packed at once), then pack the results.
#
# It restarts itself in the background (setsid + nohup) and returns at once, so the calling command
# can end; `bash scripts/gpu_status.sh [--wait S] [--copy DIR]` shows progress and fetches results.
#
# Usage, from the repository root on the GPU machine (the prose archive carried beside the code):
#   bash scripts/gpu_pipeline.sh
#   WORK=/tmp/lab DEADLINE_MIN=19 SLOTS=2 bash scripts/gpu_pipeline.sh
#
# Variables (defaults):
#   WORK=/tmp/lab                        everything is written here: corpus/, runs/, logs/, tracked/,
#                                        results/<sweep>/<run>.json, results.tar.gz, status.json, stage
#   PROSE_ARCHIVE=.corpus/prose.jsonl.xz the carried prose archive (scripts/build_corpus.py prose)
#   TOKENIZER=data/tokenizer/tokenizer.json
#   CORPUS_CMD="python3 scripts/build_corpus.py shards --prose-archive $PROSE_ARCHIVE \
#              --tokenizer $TOKENIZER --out $WORK/corpus --workers $(nproc)"   (code: the machine's Python sources)
#   CORPUS=$WORK/corpus                  an existing corpus folder skips the build
#   GPUS=                                comma-separated ids (default: all)
#   SLOTS=2                              runs at a time per GPU
#   DEADLINE_MIN=19                      minutes after the pipeline started by which every run must end
#                                        (a run estimated to end later is not started)
#   ONLY=                                comma-separated run names of configs/plan.json (default: all)
#   PREFLIGHT=1                          while the corpus builds: one short compiled training on GPU 0
#                                        (synthetic tokens; benchmarks/bench_training.py); if compiling
#                                        fails there, every run trains eagerly
#   PLAN=configs/plan.json  DEVICE=cuda  (DEVICE=cpu with a tiny PLAN: a dry run of this script on a CPU)
#   SWEEP_ARGS=                          more options of scripts/run_sweeps.py (e.g. "--track-tokens 16384")
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
WORK=${WORK:-/tmp/lab}
mkdir -p "$WORK"

if [[ "${1:-}" != "--foreground" ]]; then
  date +%s > "$WORK/pipeline_start"
  setsid nohup bash "$0" --foreground > "$WORK/pipeline.log" 2>&1 < /dev/null &
  echo "pipeline started in the background (pid $!); log: $WORK/pipeline.log; progress: bash scripts/gpu_status.sh"
  exit 0
fi

# NVLink multicast stays off (KINDS.md): also for every child process.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-python3}
PROSE_ARCHIVE=${PROSE_ARCHIVE:-$REPO/.corpus/prose.jsonl.xz}
TOKENIZER=${TOKENIZER:-$REPO/data/tokenizer/tokenizer.json}
CORPUS=${CORPUS:-$WORK/corpus}
CORPUS_CMD=${CORPUS_CMD:-"$PYTHON $REPO/scripts/build_corpus.py shards --prose-archive $PROSE_ARCHIVE --tokenizer $TOKENIZER --out $CORPUS --workers $(nproc)"}
SLOTS=${SLOTS:-2}
DEADLINE_MIN=${DEADLINE_MIN:-19}
PREFLIGHT=${PREFLIGHT:-1}
PLAN=${PLAN:-configs/plan.json}
DEVICE=${DEVICE:-cuda}
START=$(cat "$WORK/pipeline_start" 2>/dev/null || date +%s)
stage() { echo "$1" > "$WORK/stage"; echo "[$(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $1"; }

stage "checks"
$PYTHON -c "import torch, transformers, safetensors; print('torch', torch.__version__, '| transformers', transformers.__version__, '| GPUs', torch.cuda.device_count())"
nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader 2>/dev/null || true

preflight_pid=""
if [[ "$PREFLIGHT" == "1" ]]; then
  stage "preflight (background): one compiled training on GPU 0, synthetic tokens"
  PRE_GPU=${GPUS:-0}
  CUDA_VISIBLE_DEVICES=${PRE_GPU%%,*} $PYTHON benchmarks/bench_training.py --configs configs/activation/relu-2m.json \
      --compile on --steps 20 --warmup 5 --no-scaling --no-share --out "$WORK/preflight.json" \
      > "$WORK/logs_preflight.txt" 2>&1 &
  preflight_pid=$!
fi

if [[ -f "$CORPUS/meta.json" ]]; then
  stage "corpus: $CORPUS exists, not rebuilt"
else
  [[ -f "$PROSE_ARCHIVE" ]] || { stage "FAILED: no prose archive at $PROSE_ARCHIVE (carry it, or set PROSE_ARCHIVE)"; exit 1; }
  stage "corpus: $CORPUS_CMD"
  eval "$CORPUS_CMD"
fi
$PYTHON -c "
from sparsing_utils.shards import open_corpus; import json
c = open_corpus('$CORPUS'); print(json.dumps({k: c.summary()[k] for k in ('vocab_size', 'train_tokens', 'heldout_tokens')}))"

COMPILE_FLAG=""
if [[ -n "$preflight_pid" ]]; then
  if wait "$preflight_pid"; then
    stage "preflight ok: $(tail -n 3 "$WORK/logs_preflight.txt" | tr '\n' ' ')"
  else
    stage "preflight with torch.compile FAILED (see $WORK/logs_preflight.txt): every run trains eagerly"
    COMPILE_FLAG="--no-compile"
  fi
fi

NOW=$(date +%s)
LEFT=$(( DEADLINE_MIN * 60 - (NOW - START) ))
stage "sweeps: $(( LEFT / 60 )) min left before the deadline"
$PYTHON scripts/run_sweeps.py --plan "$PLAN" --device "$DEVICE" --corpus "$CORPUS" --work "$WORK" \
    --slots-per-gpu "$SLOTS" --deadline-minutes "$(( LEFT / 60 ))" ${GPUS:+--gpus "$GPUS"} ${ONLY:+--only "$ONLY"} \
    $COMPILE_FLAG ${SWEEP_ARGS:-} || true
stage "done: $(ls "$WORK"/results/*/*.json 2>/dev/null | wc -l) result files in $WORK/results.tar.gz"
