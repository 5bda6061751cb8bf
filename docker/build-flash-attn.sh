#!/bin/sh
# Build the flash-attn wheel against the torch installed here, for the given GPU architectures
# only, into OUT_DIR. Run in the devel image of the same CUDA version as torch's build: the
# script refuses when nvcc and torch disagree (torch would refuse the extension at import).
#
#   build-flash-attn.sh FLASH_ATTN_VERSION CUDA_ARCHS OUT_DIR     # CUDA_ARCHS like "8.0;8.9;9.0"
#
# CUDA_ARCHS uses TORCH_CUDA_ARCH_LIST's syntax. flash-attn's setup.py takes its own list,
# FLASH_ATTN_CUDA_ARCHS, in which only the major architectures exist (80, 90, 100, 110, 120): it
# compiles sm_80 code for 8.x, which 8.6 and 8.9 GPUs run. MAX_JOBS (default 4) parallel nvcc
# jobs of NVCC_THREADS (default 2) threads each: flash-attn's kernels take several GB per job.
set -eu
version=${1:?usage: build-flash-attn.sh FLASH_ATTN_VERSION CUDA_ARCHS OUT_DIR}
archs=${2:?usage: build-flash-attn.sh FLASH_ATTN_VERSION CUDA_ARCHS OUT_DIR}
out=${3:?usage: build-flash-attn.sh FLASH_ATTN_VERSION CUDA_ARCHS OUT_DIR}

fa_archs=$(echo "$archs" | tr ';' '\n' | sed -n 's/^ *\([0-9][0-9]*\)\.[0-9].*/\10/p' | sort -nu | paste -sd';' -)
if [ -z "$fa_archs" ]; then
  echo "build-flash-attn.sh: no architecture in '$archs' (expected e.g. 8.0;8.9;9.0)" >&2
  exit 2
fi
nvcc_cuda=$(nvcc --version | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p')
torch_cuda=$(python3 -c 'import torch; print(torch.version.cuda or "none")')
if [ "$nvcc_cuda" != "$torch_cuda" ]; then
  echo "build-flash-attn.sh: nvcc is CUDA ${nvcc_cuda:-unknown} but torch was built for CUDA $torch_cuda;" \
       "build from the devel image of torch's CUDA version (Dockerfile ARG CUDA_VERSION)" >&2
  exit 1
fi
python3 -m pip install --no-cache-dir packaging==26.3 ninja==1.13.2 wheel==0.48.0
echo "build-flash-attn.sh: flash-attn $version for CUDA $nvcc_cuda, archs $fa_archs (TORCH_CUDA_ARCH_LIST=$archs)"
# FLASH_ATTENTION_FORCE_BUILD: compile here rather than fetch a prebuilt wheel (built for every
# architecture, and for whatever torch its name matches).
FLASH_ATTN_CUDA_ARCHS=$fa_archs TORCH_CUDA_ARCH_LIST=$archs FLASH_ATTENTION_FORCE_BUILD=TRUE \
  MAX_JOBS=${MAX_JOBS:-4} NVCC_THREADS=${NVCC_THREADS:-2} \
  python3 -m pip wheel --no-cache-dir --no-build-isolation --no-deps -w "$out" "flash-attn==$version"
