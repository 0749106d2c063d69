#!/usr/bin/env bash
# Runs THERE (the GPU machine), in the repo root, with .device carried (see README.md):
# the GPU tests, then the engine benchmarks, each stage under its own timeout so that one
# hang loses only itself. Everything lands in $OUT (at most 8 files come back):
#   env.txt            nvidia-smi, Python/torch/triton/transformers versions, the install
#   run.log            every stage's output
#   pytest-junit.xml   `pytest -m gpu`
#   bench-<model>.json `genmesh bench engine` per model (partial if its stage was cut)
#   summary.json       each stage's exit code and seconds (rewritten after each stage)
#
# Knobs (environment):
#   GENMESH_DEVICE          cuda (default) | cpu: cpu runs the same stages here, on the
#                           tiny-llama preset, to test this script without a GPU
#   GENMESH_DEVICE_PLAN     the bench plan: gpu (default on cuda) | quick (default on cpu) | full
#   GENMESH_DEVICE_MODELS   dummy presets to bench (default: smollm2-135m llama-3-8b on cuda)
#   GENMESH_DEVICE_STAGES   which stages run (default: "env tests bench")
#   GENMESH_DEVICE_CARRIED  1: install .device's wheels, protos and model store (default on
#                           cuda); 0: use this machine's environment as it is (default on cpu)
#   GENMESH_DEVICE_BENCH_ARGS  more `genmesh bench engine` flags
#   PYTHON                  the interpreter (default python3; the device's holds torch)
set -uo pipefail
cd "$(dirname "$0")/../.."

DEVICE=${GENMESH_DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then
  PLAN=${GENMESH_DEVICE_PLAN:-quick}
  MODELS=${GENMESH_DEVICE_MODELS:-tiny-llama}
  CARRIED=${GENMESH_DEVICE_CARRIED:-0}
  EXTRA_ARGS=${GENMESH_DEVICE_BENCH_ARGS:---dtype float32 --kv-cache-gib 0.25}
else
  PLAN=${GENMESH_DEVICE_PLAN:-gpu}
  MODELS=${GENMESH_DEVICE_MODELS:-smollm2-135m llama-3-8b}
  CARRIED=${GENMESH_DEVICE_CARRIED:-1}
  EXTRA_ARGS=${GENMESH_DEVICE_BENCH_ARGS:-}
fi
STAGES=${GENMESH_DEVICE_STAGES:-env tests bench}
PY=${PYTHON:-python3}
if [ -z "${OUT:-}" ]; then
  OUT=$(mktemp -d /tmp/genmesh-device.XXXXXX)
fi
mkdir -p "$OUT"
LOG=$OUT/run.log
export PYTHONUNBUFFERED=1

# Stage timeouts (s), sized so env + tests + both benches end inside ~8 minutes.
TESTS_TIMEOUT=${GENMESH_DEVICE_TESTS_TIMEOUT:-100}
bench_timeout() {
  case "$1" in
    llama-3-8b) echo "${GENMESH_DEVICE_BENCH_TIMEOUT:-200}" ;;
    *) echo "${GENMESH_DEVICE_BENCH_TIMEOUT:-165}" ;;
  esac
}

SUMMARY=()
write_summary() {
  local IFS=,
  printf '{"device": "%s", "plan": "%s", "stages": {%s}}\n' \
    "$DEVICE" "$PLAN" "${SUMMARY[*]}" >"$OUT/summary.json"
}

# run_stage NAME TIMEOUT_S COMMAND...: output to the log (and to stdout unless QUIET=1),
# exit code and seconds to the summary.
run_stage() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "=== $name (timeout ${limit}s): $*" | tee -a "$LOG"
  local rc
  if [ "${QUIET:-0}" = 1 ]; then
    timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
  else
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
  fi
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  SUMMARY+=("\"$name\": {\"rc\": $rc, \"seconds\": $((SECONDS - t0))}")
  write_summary
  return 0
}

has_stage() { [[ " $STAGES " == *" $1 "* ]]; }

# -- what .device carries ---------------------------------------------------------------
if [ "$CARRIED" = 1 ]; then
  if [ -d .device/wheels ]; then
    run_stage install 120 "$PY" -m pip install -q --disable-pip-version-check --no-index \
      --no-deps --no-compile --no-cache-dir --upgrade --target .device/site .device/wheels/*.whl
  else
    echo "run: no .device/wheels (run scripts/device/prepare.sh, carry .device)" | tee -a "$LOG"
  fi
  export PYTHONPATH="$PWD/.device/site${PYTHONPATH:+:$PYTHONPATH}"
  for f in .device/protos/*.py; do  # the generated gRPC code is git-ignored: it is carried
    [ -e "$f" ] || continue
    cmp -s "$f" "genmesh/v1/${f##*/}" || cp "$f" genmesh/v1/
  done
  if [ -d .device/store ]; then
    export GENMESH_MODEL_STORE="$PWD/.device/store"  # config + tokenizer, no weights
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# -- env --------------------------------------------------------------------------------
if has_stage env; then
  t0=$SECONDS
  {
    date -u
    timeout 30 nvidia-smi || echo "nvidia-smi: not available"
    timeout 120 "$PY" - <<'PYEOF' || echo "versions: failed"
import importlib
import sys

import torch

print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
for name in ("triton", "transformers", "tokenizers", "grpc", "google.protobuf", "redis",
             "opentelemetry.sdk.version"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"), getattr(mod, "__file__", ""))
    except Exception as exc:
        print(name, "not importable:", exc)
PYEOF
  } >"$OUT/env.txt" 2>&1
  cat "$OUT/env.txt" | tee -a "$LOG"
  SUMMARY+=("\"env\": {\"rc\": 0, \"seconds\": $((SECONDS - t0))}")
  write_summary
fi

# -- the GPU tests ----------------------------------------------------------------------
if has_stage tests; then
  run_stage tests "$TESTS_TIMEOUT" "$PY" -m pytest -m gpu -q -p no:cacheprovider -x \
    tests/services/worker/engine/test_cuda_path.py \
    --junitxml="$OUT/pytest-junit.xml"
fi

# -- the engine benchmarks --------------------------------------------------------------
if has_stage bench; then
  for model in $MODELS; do
    json="$OUT/bench-$model.json"
    # shellcheck disable=SC2086  # EXTRA_ARGS is a list of flags
    QUIET=1 run_stage "bench-$model" "$(bench_timeout "$model")" "$PY" scripts/device/bench_cli.py \
      bench engine --device "$DEVICE" --dummy --model "$model" --plan "$PLAN" \
      --output "$json" $EXTRA_ARGS
    rm -f "$json.tmp"
    if [ ! -s "$json" ]; then  # cut before its first stage ended: say so in the JSON
      printf '{"model": "%s", "partial": true, "error": "no result: see run.log"}\n' \
        "$model" >"$json"
    fi
    "$PY" scripts/device/bench_brief.py "$json" 2>&1 | tee -a "$LOG"
  done
fi

echo "run: done in $SECONDS s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$LOG"
