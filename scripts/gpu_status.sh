#!/usr/bin/env bash
# Progress of scripts/gpu_pipeline.sh: the stage, every run's state, tokens/s, MFU and an ETA.
#
#   bash scripts/gpu_status.sh                     # print once
#   bash scripts/gpu_status.sh --wait 540          # print every 60 s for up to 540 s (keeps a call busy),
#                                                  # returning early once the pipeline is done
#   bash scripts/gpu_status.sh --copy "$OUT"       # also copy results.tar.gz, status.json and the
#                                                  # pipeline log tail into $OUT (after waiting, if --wait)
# WORK=/tmp/lab by default, as in gpu_pipeline.sh.
set -uo pipefail
WORK=${WORK:-/tmp/lab}
WAIT=0
COPY=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --wait) WAIT=$2; shift 2 ;;
    --copy) COPY=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

show() {
  python3 - "$WORK" <<'EOF'
import json, sys, time
from pathlib import Path
work = Path(sys.argv[1])
stage = (work / "stage").read_text().strip() if (work / "stage").is_file() else "not started"
start = float((work / "pipeline_start").read_text()) if (work / "pipeline_start").is_file() else time.time()
print(f"[{time.strftime('%H:%M:%S')}] pipeline +{(time.time() - start) / 60:.1f} min | stage: {stage}")
path = work / "status.json"
if not path.is_file():
    sys.exit(0)
s = json.loads(path.read_text())
now = time.time()
counts = {}
print(f"{'run':18} {'state':9} {'gpu':>3} {'done':>6} {'tok/s':>9} {'MFU':>6} {'loss':>6} {'min':>5} {'ETA min':>7}  note")
for r in s["runs"]:
    counts[r["state"]] = counts.get(r["state"], 0) + 1
    frac = r["tokens"] / r["total_tokens"] if r["total_tokens"] else 0
    el = ((r["finished"] or now) - r["started"]) / 60 if r["started"] else 0
    eta = ""
    if r["state"] == "training" and r["tokens_per_s"]:
        eta = f"{(r['total_tokens'] - r['tokens']) / r['tokens_per_s'] / 60:.1f}"
    tps = f"{r['tokens_per_s'] / 1e6:.2f}M" if r["tokens_per_s"] else ""
    mfu = f"{r['mfu']:.1%}" if r["mfu"] else ""
    loss = f"{r['loss']:.3f}" if r["loss"] else ""
    gpu = "" if r["gpu"] is None else r["gpu"]
    print(f"{r['run']:18} {r['state']:9} {gpu!s:>3} {frac:>6.0%} {tps:>9} {mfu:>6} {loss:>6} {el:>5.1f} {eta:>7}  {r['note'][:60]}")
left = (s["deadline"] - now) / 60 if s.get("deadline") else None
print(" | ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
      + (f" | deadline in {left:.1f} min" if left is not None else "")
      + (f" | calibration x{s['calibration']:.2f}" if s.get("calibration") else ""))
EOF
}

finished() { grep -q "^done\|^FAILED" "$WORK/stage" 2>/dev/null; }

END=$(( $(date +%s) + WAIT ))
show
while [[ $WAIT -gt 0 && $(date +%s) -lt $END ]] && ! finished; do
  sleep $(( END - $(date +%s) < 60 ? END - $(date +%s) : 60 ))
  show
done
if [[ -n "$COPY" ]]; then
  mkdir -p "$COPY"
  for f in results.tar.gz status.json preflight.json; do
    [[ -f "$WORK/$f" ]] && cp "$WORK/$f" "$COPY/"
  done
  tail -n 300 "$WORK/pipeline.log" > "$COPY/pipeline_tail.log" 2>/dev/null || true
  echo "copied to $COPY: $(ls "$COPY" | tr '\n' ' ')"
fi
