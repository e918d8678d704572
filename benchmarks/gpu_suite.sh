#!/usr/bin/env bash
# The GPU benchmark suite, one prepared script (< 8 minutes on one GPU).
#
# Usage: bash benchmarks/gpu_suite.sh [OUT_DIR]     (default: $OUT, else ./gpu_suite_out)
#
# Writes, one JSON object each (see docs/benchmarks.md):
#   step_clip_resnet50.json  step overhead, CLIP ResNet-50, batch 256, bfloat16
#   step_clip_vit_b16.json   step overhead, CLIP ViT-B/16, batch 128, bfloat16
#   input_pipeline.json      input pipeline images/s, 1 / half / all cores
#   suite.log                stderr of every part, with its wall time
# Each part has its own time limit, so one slow part cannot take the others down; a
# part that fails or times out leaves its JSON empty and the script goes on (exit 1).
set -u -o pipefail

out="${1:-${OUT:-gpu_suite_out}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"  # absolute: the parts run from the repository root
cd "$(dirname "$0")/.."
log="$out/suite.log"
: >"$log"
status=0
# bfloat16 params: a bfloat16 anchor is the default there, so project_bf16_anchor is left out.
methods="plain,project,project_only,radii_update,adam,ftp,spd,digrap"

part() {  # part NAME LIMIT_S COMMAND...: COMMAND's stdout -> $out/NAME.json
  local name="$1" limit="$2"
  shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*" >>"$log"
  if ! timeout "$limit" "$@" >"$out/$name.json" 2>>"$log"; then
    echo "!! $name failed or timed out" | tee -a "$log" >&2
    status=1
  fi
  echo "== $name took $((SECONDS - t0))s" >>"$log"
}

python -c "import jax; print(jax.devices())" >>"$log" 2>&1
part step_clip_resnet50 200 python -m benchmarks.step_overhead --model clip_resnet50 \
  --dtype bfloat16 --batch 256 --steps 15 --warmup 3 --methods "$methods"
part step_clip_vit_b16 170 python -m benchmarks.step_overhead --model clip_vit_b16 \
  --dtype bfloat16 --batch 128 --steps 15 --warmup 3 --methods "$methods"
cores="$(nproc)"
workers="$(printf '%s\n' 1 $(((cores + 1) / 2)) "$cores" | sort -nu | paste -sd, -)"
part input_pipeline 100 python -m benchmarks.input_pipeline \
  --workers "$workers" --repeats 2 --batches 16
echo "wrote $out (total ${SECONDS}s)" | tee -a "$log"
exit "$status"
