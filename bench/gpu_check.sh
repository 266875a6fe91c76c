#!/usr/bin/env bash
# GPU check of catalogbuilder's inference path, ready to run on a machine with one (or more) NVIDIA GPU(s):
# at most about 5 minutes of wall time on one H100/H200-class GPU.
#
#   bash bench/gpu_check.sh             # installs catalogbuilder[gpu,test] (keeping the machine's CUDA torch), then
#                                       # bench/gpu_check.py and the GPU-routing test on a real LocalCUDACluster
#   bash bench/gpu_check.sh --dry-run [gpu_check.py options]   # no install, CPU only: every step with a small model
#                                       # and a few spectra (tests/test_gpu_check.py)
#
# What it prints: docs/inference.md, section "GPU check". Run from anywhere; it works in the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--dry-run" ]]; then
    python bench/gpu_check.py --dry-run "${@:2}"
    # the routing test needs dask-cuda and a GPU: here it must skip, which shows it is collected and wired up
    python -m pytest -q -p no:cacheprovider tests/test_gpu_routing.py -k local_cuda_cluster
    exit 0
fi

# The installed torch (a CUDA build) satisfies the torch requirement, so pip keeps it; dask-cuda comes from [gpu].
python -m pip install --quiet --upgrade-strategy only-if-needed -e ".[gpu,test]"
python -c "import torch, dask_cuda; assert torch.cuda.is_available(), 'torch sees no GPU'; print('torch', torch.__version__, 'dask-cuda', dask_cuda.__version__)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 240 python bench/gpu_check.py
timeout 120 python -m pytest -q -p no:cacheprovider tests/test_gpu_routing.py -k local_cuda_cluster -rs
