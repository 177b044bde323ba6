#!/usr/bin/env bash
# One command for the GPU machine (issue 16): every GPU check in one run, JSON results under $OUT.
#
# On the GPU machine, in the last of the six carries (see ../shared/gpu/README.md; stage first
# with EXTRA_WHEELS="psutil pyyaml tqdm" bash ../shared/gpu/stage.sh):
#     mkdir -p /tmp/te-parts && cp .gpu-te5/* /tmp/te-parts/ && bash tools/gpu_check.sh
# On the CPU (runs every check's CPU path with tiny sizes; tests/unit/test_gpu_check.py):
#     bash tools/gpu_check.sh --dry-run [OUT_DIR]
#
# Checks, in order, each under its own timeout, each writing $OUT/<name>.log and <name>.rc.json:
#   install    megatron-core + TE under /tmp/site (gpu-install.sh; skipped in the dry run)
#   env        versions, device, importability of mm_megatron.cli           -> env.json
#   gpu_tests  pytest tests/gpu (TE fwd/bwd, TE vs local, THD/CP/SP paths, SDPA backend)
#   curves     debug-tiny 100 steps: CPU fp32 (forced) vs CUDA bf16 local and TE -> curves.json
#   resume     fp32 checkpoints: GPU save -> CPU resume, CPU save -> GPU resume  -> resume.json
#   reference  ref-1.4b side by side + top kernels of the TE row    -> reference/reference.json
#   memcheck   memory model vs max_memory_allocated, ref-1.4b TP1 mbs 1,2,4 -> memcheck/memcheck.json
#   summary    pass/rc of every check                                        -> summary.json
# A failing check is recorded and the script goes on; the whole run stays under ~9 minutes.
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${OUT:-${1:-gpu-check-out}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-$( [ "$DRY" = 1 ] && echo 1800 || echo 560 )}  # seconds for all checks
WORK=$(mktemp -d)
if [ "$DRY" = 1 ]; then
  PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
  export PYTHONPATH=$PWD MM_MEGATRON_FORCE_CPU=1
  STEPS=2; PREC=--fp32; GPU_ENV=(env MM_MEGATRON_FORCE_CPU=1)
else
  PY=${PY:-python3}
  export PYTHONPATH=/tmp/site:$PWD
  STEPS=100; PREC=--bf16; GPU_ENV=(env)
fi
CPU_ENV=(env MM_MEGATRON_FORCE_CPU=1 CUDA_VISIBLE_DEVICES=)

# run NAME LIMIT CMD...: log to $OUT/NAME.log, rc and seconds to $OUT/NAME.rc.json; never fails
run() {
  local name=$1 limit=$2; shift 2
  local t0 rc left
  left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -le 20 ]; then
    echo '{"rc": "skipped: out of time"}' > "$OUT/$name.rc.json"; echo "[gpu_check] $name: skipped"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "{\"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 )), \"limit\": $limit}" > "$OUT/$name.rc.json"
  echo "[gpu_check] $name: rc=$rc in $(( $(date +%s) - t0 )) s"
}

train() {  # train RUN_DIR EXTRA...  (debug-tiny from the shared initial weights, log every step)
  local dir=$1; shift
  "$PY" -m mm_megatron train --preset debug-tiny --load "$WORK/init" --run-dir "$dir" \
    --data-path "$WORK/data/train.index.json" --tokenizer "$WORK/data/tokenizer" \
    --data.template=plain --train.caption_eval=false --log-interval 1 --eval-iters 0 \
    --lr-warmup-iters 0 "$@"
}

if [ "$DRY" = 0 ]; then
  if [ -d /tmp/te-parts ] && [ -f .gpu-wheels/gpu-install.sh ]; then
    run install 240 bash .gpu-wheels/gpu-install.sh
  elif [ -d .gpu-wheels ]; then
    run install 120 "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .gpu-wheels/*.whl
  fi
fi
run env 120 "$PY" tools/gpu_check.py env "$OUT/env.json"
run gpu_tests 150 "$PY" -m pytest -q -rA tests/gpu --junitxml="$OUT/gpu_tests.xml" -p no:cacheprovider

# curves: the CPU fp32 reference runs on the CPU cores while the GPU runs go one after another
run data 120 "$PY" -m mm_megatron data synth --out "$WORK/data" --n-train 400 --n-val 16 \
  --image-size 64 --vocab-size 512 --seed 0
run init 120 "${CPU_ENV[@]}" "$PY" tools/gpu_check.py init-ckpt "$WORK/init"
TE_SPEC=(--model.lm.spec=te --model.vision.spec=te --model.projector.spec=te)
[ "$DRY" = 1 ] && TE_SPEC=()
( run curve_cpu_fp32 200 "${CPU_ENV[@]}" bash -c "$(declare -f train); PY=$PY WORK=$WORK train $WORK/cpu --fp32 --train-iters $STEPS" ) &
CPU_PID=$!
run curve_gpu_local 120 "${GPU_ENV[@]}" bash -c "$(declare -f train); PY=$PY WORK=$WORK train $WORK/gpu_local $PREC --train-iters $STEPS"
run curve_gpu_te 120 "${GPU_ENV[@]}" bash -c "$(declare -f train); PY=$PY WORK=$WORK train $WORK/gpu_te $PREC --train-iters $STEPS ${TE_SPEC[*]}"
wait "$CPU_PID"
run curves 60 "$PY" tools/gpu_check.py curves "$OUT/curves.json" "$WORK/cpu" "$WORK/gpu_local" "$WORK/gpu_te"

# resume across devices (fp32, constant LR): GPU 4 steps || CPU 4 steps, then each resumes on
# the other device to step 6
RES=(--fp32 --lr-decay-style constant)
( run resume_cpu_first 120 "${CPU_ENV[@]}" bash -c "$(declare -f train); PY=$PY WORK=$WORK train $WORK/c4 ${RES[*]} --train-iters 4 --save $WORK/ckpt_cpu" ) &
CPU_PID=$!
run resume_gpu_first 120 "${GPU_ENV[@]}" bash -c "$(declare -f train); PY=$PY WORK=$WORK train $WORK/g4 ${RES[*]} --train-iters 4 --save $WORK/ckpt_gpu"
wait "$CPU_PID"
( run resume_on_cpu 120 "${CPU_ENV[@]}" bash -c "$(declare -f train); PY=$PY WORK=$WORK train $WORK/c6r ${RES[*]} --train-iters 6 --save $WORK/ckpt_gpu" ) &
CPU_PID=$!
run resume_on_gpu 120 "${GPU_ENV[@]}" bash -c "$(declare -f train); PY=$PY WORK=$WORK train $WORK/g6r ${RES[*]} --train-iters 6 --save $WORK/ckpt_cpu"
wait "$CPU_PID"
run resume 60 "$PY" tools/gpu_check.py resume "$OUT/resume.json" "$WORK/c4" "$WORK/g4" "$WORK/c6r" "$WORK/g6r"

if [ "$DRY" = 1 ]; then
  run reference 300 "$PY" -m mm_megatron.bench.reference --dry-run --steps 2 --warmup 1 \
    --profile "mm_megatron local" --out "$OUT/reference"
  run memcheck 120 "$PY" -m mm_megatron.bench.memcheck --dry-run --mbs 2 --out "$OUT/memcheck"
else
  run reference 300 "$PY" -m mm_megatron.bench.reference --profile "mm_megatron te" \
    --out "$OUT/reference"
  run memcheck 120 "$PY" -m mm_megatron.bench.memcheck --out "$OUT/memcheck"
fi
run summary 30 "$PY" tools/gpu_check.py summary "$OUT"
cat "$OUT/summary.json"
rm -rf "$WORK"
