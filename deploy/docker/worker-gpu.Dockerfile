# syntax=docker/dockerfile:1.7
# The GPU worker: genmesh's worker with the TensorRT-LLM backend, on NVIDIA's TensorRT-LLM
# release container (its CUDA, its PyTorch, its TensorRT-LLM), built from the repository's
# root:
#
#   docker build -f deploy/docker/worker-gpu.Dockerfile -t genmesh/worker-gpu:0.1.0 .
#   docker compose --profile gpu build    (COMPOSE_PROFILES=gpu in .env does the same)
#
# The adapter (services/worker/engine/trtllm_engine.py) is written against the LLM API of
# TensorRT-LLM 1.2; TRTLLM_IMAGE picks another release container. Run it with an NVIDIA
# GPU (docker-compose.yml's gpu profile, or the Kubernetes gpu overlay). Model weights come
# from the model store volume at /models, never from this image.

ARG TRTLLM_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:1.2.0

FROM ${TRTLLM_IMAGE} AS worker-gpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONPATH=/app \
    GENMESH_MODEL_STORE=/models \
    HF_HUB_OFFLINE=1
WORKDIR /app
COPY pyproject.toml ./
COPY deploy/docker/requirements.py deploy/docker/
# genmesh's dependencies beside the container's own stack, which stays as NVIDIA built it:
# its PyTorch, TensorRT(-LLM), transformers, Triton and CUDA libraries are held at their
# installed versions by a constraints file (a requirement that would move one fails the
# build instead of breaking the runtime). PyTorch is never installed here.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN { python3 -m pip freeze \
      | grep -iE '^(torch|torchvision|tensorrt|tensorrt[-_]llm|transformers|triton|nvidia-[a-z0-9-]+)==' \
      || true; } > /tmp/container-stack.txt \
    && python3 deploy/docker/requirements.py gpu > /tmp/requirements.txt \
    && python3 -m pip install -c /tmp/container-stack.txt -r /tmp/requirements.txt
COPY protos/ protos/
COPY genmesh/ genmesh/
COPY gateway/ gateway/
COPY services/ services/
COPY deploy/docker/probe.py deploy/docker/
RUN python3 -m genmesh.protos \
    && python3 -m compileall -q genmesh gateway services deploy/docker/probe.py \
    && groupadd --system --gid 10001 genmesh \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/genmesh \
       --shell /usr/sbin/nologin genmesh \
    && install -d -o 10001 -g 10001 /models
ENV GENMESH_WORKER_HOST=0.0.0.0 \
    GENMESH_WORKER_PORT=50061 \
    GENMESH_WORKER_METRICS_PORT=9161 \
    GENMESH_WORKER_HEALTH_PORT=9261 \
    GENMESH_WORKER_BACKEND=tensorrt_llm \
    GENMESH_WORKER_DEVICE=cuda
EXPOSE 50061 9161
USER 10001:10001
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "/app/deploy/docker/probe.py", "grpc", "127.0.0.1:50061"]
ENTRYPOINT ["python3", "-m", "services.worker.main"]
