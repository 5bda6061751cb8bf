#!/bin/sh
# Install torch==TORCH_VERSION built for CUDA_VERSION (e.g. 13.0.2) or for the CPU ("cpu"), from
# PyTorch's own index for that build (https://download.pytorch.org/whl/cuXY, XY = the CUDA
# version's major and minor), then check that the installed torch reports that CUDA version.
# The Dockerfile's GPU stages call this with their one CUDA_VERSION, so the base image, torch and
# flash-attn's nvcc cannot drift apart.
#
#   install-torch.sh CUDA_VERSION|cpu TORCH_VERSION
set -eu
cuda=${1:?usage: install-torch.sh CUDA_VERSION|cpu TORCH_VERSION}
torch_version=${2:?usage: install-torch.sh CUDA_VERSION|cpu TORCH_VERSION}
case $cuda in
  cpu)
    flavour=cpu
    want=none ;;
  [0-9]*.[0-9]*)
    want=$(echo "$cuda" | cut -d. -f1,2)
    flavour=cu$(echo "$want" | tr -d .) ;;
  *)
    echo "install-torch.sh: CUDA version must look like 13.0.2, or be 'cpu'; got '$cuda'" >&2
    exit 2 ;;
esac
python3 -m pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/$flavour" "torch==$torch_version"
got=$(python3 -c 'import torch; print(torch.version.cuda or "none")')
if [ "$got" != "$want" ]; then
  echo "install-torch.sh: torch $torch_version from the $flavour index reports CUDA $got, expected $want" >&2
  exit 1
fi
echo "install-torch.sh: torch $torch_version for CUDA $got ($flavour)"
