#!/usr/bin/env bash
# Issue 25's GPU measurements as one prepared run for a lent GPU (one device call: 15 minutes of
# device time per session, at most 10 minutes a command). Prepare here first:
#   bash tools/gpu_prepare.sh        # .whl/ (diffusers, pydantic, datasets, ...) and .release/
# then, through the device tool, with carry [".whl", ".release"] and timeout_s 540 (leaving the
# session's device time a second, shorter call):
#   bash benchmarks/gpu_issue25.sh
# It runs, in this order, each step only while time is left (BUDGET seconds in all, default 480),
# every JSON written as it goes to $OUT (or /tmp/gpu-issue25):
#   1. release-side-by-side-sd15.json  the release's train_spo.py against `spo train sd15`
#      (defaults) and `sd15-lowmem`, 2 rounds each: round time and peak, ours / theirs
#   2. fullsize-lowmem-sd15.json       sd15 default, lowmem, lowmem + pool pass in calls of 8,
#      lowmem + that + SPM in fp16 (the 8 GiB target at <= 1.3x the default round); the component
#      profile first, which also warms the GPU up, so the first variant's round is comparable; the
#      lowmem variants run with the process capped at 7.5 GiB (an 8 GB card less its CUDA context):
#      an out-of-memory error there means "does not fit"
#   3. fullsize-lowmem-sdxl.json       SDXL default, lowmem, + SPM in fp16, + decode in 512 px tiles
#      (the 12 GiB target at <= 1.5x; lowmem variants capped at 11.5 GiB)
#   4. release-side-by-side-sdxl.json  the release's train_spo_sdxl.py against `spo train sdxl`
#   5. eval-cost.json                  spo eval's scorers in fp16 / bf16 against fp32
#   6. fullsize-sd3.json               the sd3 preset at SD3.5-medium size, with T5-XXL and without,
#      and sd3-lowmem (likely a second run: what is left of the budget rarely reaches it)
# Not here (a later run): compile / channels_last, benchmarks/engines.py.
# TINY=1 runs every step with tiny models on the CPU (--tiny / --smoke): checks this script only.
# STEPS="fullsize-sdxl side-by-side-sdxl" runs only the named steps (a second call on the warm
# machine, for what the first call's budget left out: the log says which were skipped).
set -u
OUT=${OUT:-/tmp/gpu-issue25}
BUDGET=${BUDGET:-480}
BUILD=${BUILD:-/tmp/gpu-issue25-models${TINY:+-tiny$TINY}}  # the random models, built once, shared by the steps
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
start=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
log() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$OUT/log.txt"; }

if [ -d .whl ] && [ "${TINY:-0}" != 1 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { log "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
[ -d .release/spo-release ] && export SPO_RELEASE_DIR=$PWD/.release/spo-release
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
tiny=(); smoke=()
if [ "${TINY:-0}" = 1 ]; then
    tiny=(--tiny); smoke=(--smoke)
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/log.txt"
fi
python3 -c "import torch, diffusers, transformers, peft, accelerate, pydantic, spo.training
print(torch.__version__, diffusers.__version__, transformers.__version__, peft.__version__, accelerate.__version__)" \
    >> "$OUT/log.txt" 2>&1 || { log "the imports failed (see above): nothing measured"; exit 1; }
tail -1 "$OUT/log.txt"

known="side-by-side-sd15 fullsize-sd15 fullsize-sdxl side-by-side-sdxl eval-cost fullsize-sd3"
for name in ${STEPS:-}; do
    [[ " $known " == *" $name "* ]] || { log "STEPS: unknown step '$name' (steps: $known)"; exit 2; }
done

step() {  # step NAME MIN_SECONDS COMMAND...: runs COMMAND if MIN_SECONDS are left, under a timeout
    local name=$1 need=$2
    shift 2
    if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then
        log "$name: not asked for (STEPS=$STEPS)"
        return
    fi
    if [ "$(left)" -lt "$need" ]; then
        log "$name: skipped ($(left) s left, needs about $need)"
        return
    fi
    log "$name: start ($(left) s left)"
    timeout "$(left)" "$@" >> "$OUT/log.txt" 2>&1
    log "$name: exit $?"
}

step side-by-side-sd15 200 python3 benchmarks/release_side_by_side.py --models sd15 --sides release,ours,ours_lowmem \
    --rounds 2 --side-timeout 200 --build-dir "$BUILD" --budget-seconds $(( $(left) - 60 )) \
    --output "$OUT/release-side-by-side-sd15.json" "${tiny[@]}"
step fullsize-sd15 120 python3 benchmarks/fullsize.py --models sd15 --build-dir "$BUILD" \
    --variants default,lowmem,lowmem_pool,lowmem_all --cap-gib 7.5 --budget-seconds $(( $(left) - 50 )) \
    --output "$OUT/fullsize-lowmem-sd15.json" "${tiny[@]}"
step fullsize-sdxl 180 python3 benchmarks/fullsize.py --models sdxl --build-dir "$BUILD" \
    --variants default,lowmem,lowmem_spm16,lowmem_tiled --cap-gib 11.5 --budget-seconds $(( $(left) - 60 )) \
    --output "$OUT/fullsize-lowmem-sdxl.json" "${tiny[@]}"
step side-by-side-sdxl 200 python3 benchmarks/release_side_by_side.py --models sdxl --sides release,ours \
    --rounds 2 --side-timeout 200 --build-dir "$BUILD" --budget-seconds $(( $(left) - 80 )) \
    --output "$OUT/release-side-by-side-sdxl.json" "${tiny[@]}"
step eval-cost 90 python3 benchmarks/eval_cost.py --prompts 8 --seeds 1 --output "$OUT/eval-cost.json" "${smoke[@]}"
step fullsize-sd3 200 python3 benchmarks/fullsize.py --models sd3 --build-dir "$BUILD" --budget-seconds $(( $(left) - 60 )) \
    --output "$OUT/fullsize-sd3.json" "${tiny[@]}"
log "done"
