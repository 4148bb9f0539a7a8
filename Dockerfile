# loramux: OpenAI-compatible multi-LoRA serving for MoE models.
#   GPU: docker build -t loramux .
#   CPU: docker build -t loramux:cpu --build-arg BASE_IMAGE=ubuntu:24.04 \
#          --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# Both stages share one base so the virtual environment built in the first runs in the second.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS builder
ARG TORCH_INDEX_URL=
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml constraints.txt README.md LICENSE ./
COPY server ./server
COPY engine ./engine
COPY kernels ./kernels
COPY ray_serve ./ray_serve
# The Makefile's install commands: torch first, pinned, then the project, both constrained.
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install -q --upgrade pip \
 && /opt/venv/bin/python -m pip install -q -c constraints.txt \
      ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0 \
 && /opt/venv/bin/python -m pip install -q -c constraints.txt .

FROM ${BASE_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
# Triton compiles its launcher stubs with a C compiler at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 gcc libc6-dev python3-dev \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 --shell /usr/sbin/nologin loramux \
 && mkdir -p /models /adapters && chown loramux /models /adapters
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HF_HOME=/home/loramux/.cache/huggingface \
    LORAMUX_HOME=/home/loramux/.cache/loramux \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1
USER loramux
WORKDIR /home/loramux
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# Arguments after the image name are `loramux serve` arguments: MODEL and flags (none: demo).
ENTRYPOINT ["loramux", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD []
