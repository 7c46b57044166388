#!/bin/bash
# Everything a short GPU lease should check, in one call that fits LIMIT seconds (default 570), most needed first:
# the CUDA kernel tests, the other CUDA tests, the side-by-side benchmark (benchmarks/gpu_compare.py, SAELens too
# when its script and wheels are given), `sae-stream run` end to end, kernel tables of the step, the LM and the
# loop (benchmarks/profile_step.py), the text reader on this node's cores, then a checkpoint snapshot's cost; each
# step bounded by what is left, so a hang cannot eat the next step's time.
#
#   LIMIT=570 OUT=/tmp/gpu WHEELS=.whl SAELENS=.whl/bench_saelens.py bash benchmarks/gpu_session.sh
#
# (session 3's H200 call: kernel tests ~40 s, gpu_compare with SAELens at one size ~230 s; it has more variants
# now, and what does not fit is cut at its end: every row carries wall_s. Under the device tool: timeout_s 600,
# carry .whl.)
#
# WHEELS: a folder of wheels to install first (--target /tmp/site; e.g. sae-lens and what the machine lacks, from
# shared/peer-bench/fetch_wheels.sh). Results: $OUT/gpu.jsonl (append it to benchmarks/results/gpu.jsonl),
# $OUT/checkpoint.jsonl (to benchmarks/results/checkpoint.jsonl), $OUT/data_throughput.jsonl (to
# benchmarks/results/data_throughput.jsonl), the logs,
# and a summary on stdout; the other logs go to $OUT/logs.tgz, repacked after each step (the device tool brings back at
# most 8 files, so a run stopped midway still returns the results and the logs so far). The benchmark runs the
# Triton kernels even if their tests fail (session 15's first call lost its Triton figures to a test's tolerance):
# a kernel that cannot run falls back to torch's ops by itself, and every row names the kernels that ran.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TQDM_DISABLE=1
LIMIT=${LIMIT:-570}
OUT=${OUT:-benchmarks/results/session}
mkdir -p "$OUT"
LOGS=$(mktemp -d)
pack() { tar czf "$OUT/logs.tgz" -C "$LOGS" .; }
T0=$SECONDS
left() { echo $((LIMIT - (SECONDS - T0))); }
# budget RESERVE [CAP]: seconds for a step: what is left minus RESERVE (for the later steps), at most CAP, at
# least 1 (timeout 0 would mean no limit)
budget() { local b=$(( $(left) - $1 )); [ -n "$2" ] && [ $b -gt $2 ] && b=$2; [ $b -lt 1 ] && b=1; echo $b; }
if [ -n "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOGS/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$LOGS/env.txt"

# 1. the Triton kernels, the step's and the LM's (one fixed block config: seconds, not a minute of autotuning)
SAE_STREAM_TRITON_AUTOTUNE=0 timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_fused_ops.py \
  tests/test_lm_capture.py -k "cuda" > "$LOGS/tests_kernels.log" 2>&1
rc=$?; echo "kernel tests rc=$rc at $((SECONDS - T0)) s"; grep -E "passed|failed|Error" "$LOGS/tests_kernels.log" | head -12
pack
if [ $rc -ne 0 ]; then echo "KERNEL TESTS FAILED (see logs.tgz): the figures below are not yet trustworthy"; fi

# 2. the other CUDA tests, before the benchmark: they check the CUDA-only paths the figures come from (the graph's
# input, the LM's stores into the ring, the streams), at most 120 s (pytest has been seen to hang at exit on these
# machines after its summary: bounded)
timeout $(budget 330 120) python3 -m pytest -q -p no:cacheprovider tests/ -k "cuda or gpu" \
  --ignore=tests/test_fused_ops.py --ignore=tests/test_lm_capture.py > "$LOGS/gpu_tests.log" 2>&1
echo "gpu tests rc=$? at $((SECONDS - T0)) s"; grep -E "passed|failed|Error" "$LOGS/gpu_tests.log" | head -16
pack

# 3. the benchmark (one SAELens size: its trainer is slow; issue 6's rows first, so a cut keeps them), leaving
# 150 s for the rest
SAELENS_ARGS=(); if [ -n "$SAELENS" ]; then SAELENS_ARGS=(--saelens "$SAELENS" --saelens-d-sae 4096); fi
timeout $(budget 150) python3 benchmarks/gpu_compare.py --seconds 1 --kernels auto "${SAELENS_ARGS[@]}" \
  --out "$OUT/gpu.jsonl" > "$OUT/gpu_compare.log" 2>&1
echo "gpu_compare rc=$? at $((SECONDS - T0)) s"; grep -v '^{' "$OUT/gpu_compare.log" | grep -v "^\s*$" | tail -40
pack

# 4. `sae-stream run` end to end on the GPU (embedded data: LM, SAE, eval, dashboard; the pipeline's own wiring of
# the graph's input), at most 80 s (58 s on an H200 in session 15)
timeout $(budget 40 80) python3 -m sae_stream run --out /tmp/gpu_session_run \
  --overwrite > "$LOGS/e2e.log" 2>&1
echo "e2e rc=$? at $((SECONDS - T0)) s"; grep -E "^(LM|SAE|eval|dashboard)|Error" "$LOGS/e2e.log" | head -8
cp /tmp/gpu_session_run/eval.json /tmp/gpu_session_run/job.json "$LOGS/" 2>/dev/null; pack

# 5. where the device time goes (profile_step.py: the step, the LM into a ring, the loop, the step by op), <= 90 s
timeout $(budget 15 90) python3 benchmarks/profile_step.py > "$OUT/profile.txt" 2>&1
echo "profile rc=$? at $((SECONDS - T0)) s"; grep "^==" "$OUT/profile.txt"
pack

# 6. text -> token batches on this node's cores (CPU only: does reading and tokenizing keep up with the loop?)
timeout $(budget 10 80) python3 benchmarks/data_throughput.py --repeats 1 --threads 1 4 16 --out "$OUT/data_throughput.jsonl" \
  > "$LOGS/data_throughput.log" 2>&1
echo "data throughput rc=$? at $((SECONDS - T0)) s"; grep '^{' "$LOGS/data_throughput.log" | \
  python3 -c "import json,sys; [print(r['variant'], r['tokens_per_s']) for r in map(json.loads, sys.stdin)]"
pack

# 7. what a checkpoint still costs the training thread with background writes: A/1's ring (4M x 512 bf16) to host
timeout $(budget 3 40) python3 benchmarks/checkpoint_write.py --mode snapshot --device cuda --repeats 1 \
  --out "$OUT/checkpoint.jsonl" > "$LOGS/snapshot.log" 2>&1
echo "snapshot rc=$? at $((SECONDS - T0)) s"; tail -2 "$LOGS/snapshot.log"
pack

# 8. autotune picks kept on disk by the runs above (fused_ops.autotuned: Triton's cache_results)
echo "autotune picks cached: $(find "${TRITON_CACHE_DIR:-$HOME/.triton/cache}" -name '*.autotune.json' 2>/dev/null | wc -l)"
pack
