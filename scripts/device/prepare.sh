#!/usr/bin/env bash
# Runs HERE (the CPU machine), in any folder: gathers into .device/ (git-ignored) what the
# GPU machine lacks, for `bash scripts/device/run.sh` there (see README.md beside this):
#   .device/wheels/  py3.12 manylinux wheels of the packages the device image lacks that
#                    the tests import (grpc health/reflection, redis, OpenTelemetry), with
#                    grpcio and protobuf at this venv's versions (the generated code's)
#   .device/protos/  the generated gRPC code (genmesh/v1/*_pb2*.py is git-ignored)
#   .device/store/   the default model's small files, no weights (dummy weights there)
# and prints what will travel against the device's 64 MiB limit.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
DEST=.device
MODEL=smollm2-135m-instruct
LIMIT_BYTES=$((64 * 1024 * 1024))

# Imported by the test suite's conftest (and the services it reaches) but missing from
# the device image; their own needs there (typing-extensions, packaging, wrapt) are present.
PACKAGES=(
  grpcio protobuf grpcio-health-checking grpcio-reflection googleapis-common-protos redis
  opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions opentelemetry-proto
  opentelemetry-exporter-otlp-common opentelemetry-exporter-otlp-proto-common
  opentelemetry-exporter-otlp-proto-grpc opentelemetry-instrumentation
  opentelemetry-instrumentation-grpc
  pytest pluggy iniconfig packaging pygments
)

rm -rf "$DEST"
mkdir -p "$DEST/wheels" "$DEST/protos" "$DEST/store"

# 1. Wheels, pinned to the versions installed here.
mapfile -t PINS < <("$PY" - "${PACKAGES[@]}" <<'PYEOF'
import importlib.metadata as md
import sys
for name in sys.argv[1:]:
    print(f"{name}=={md.version(name)}")
PYEOF
)
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST/wheels" "${PINS[@]}" 2>&1 | grep -v "is ignored: it is neither a file" || true
num_wheels=$(find "$DEST/wheels" -name '*.whl' | wc -l)
if [ "$num_wheels" -ne "${#PACKAGES[@]}" ]; then
  echo "prepare: expected ${#PACKAGES[@]} wheels, got $num_wheels" >&2
  exit 1
fi

# 2. Generated gRPC code: built here if missing (it matches this venv's grpcio/protobuf).
if ! ls genmesh/v1/*_pb2.py >/dev/null 2>&1; then
  "$PY" -m genmesh.protos
fi
cp genmesh/v1/*_pb2.py genmesh/v1/*_pb2_grpc.py "$DEST/protos/"

# 3. The default model's small files (tokenizer, chat template, configs); no weights.
model_dir=$("$PY" -c "
from genmesh.core.models.store import ModelStore, default_store_root
print(ModelStore(default_store_root()).ensure('$MODEL'))")
mkdir -p "$DEST/store/$MODEL"
for f in config.json tokenizer.json tokenizer_config.json chat_template.jinja \
         generation_config.json genmesh.json; do
  if [ -f "$model_dir/$f" ]; then cp "$model_dir/$f" "$DEST/store/$MODEL/"; fi
done

# 4. What travels: the working tree (tracked + untracked, not ignored) and .device.
tree_bytes=$(git ls-files -z --cached --others --exclude-standard \
  | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
device_bytes=$(find "$DEST" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
total=$((tree_bytes + device_bytes))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "prepare: $num_wheels wheels, $(ls "$DEST/protos" | wc -l) generated files, $MODEL's small files"
echo "prepare: .device $(mib "$device_bytes") + working tree $(mib "$tree_bytes")" \
     "= $(mib "$total") of the 64 MiB limit"
if [ "$total" -ge "$LIMIT_BYTES" ]; then
  echo "prepare: over the 64 MiB the device call carries" >&2
  exit 1
fi
