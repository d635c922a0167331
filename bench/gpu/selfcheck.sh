#!/usr/bin/env bash
# The GPU self-check: what the CPU tests cannot show, on one CUDA GPU, in at most 8 minutes.
# Run it:   bash bench/gpu/selfcheck.sh            (from the repository root, in the project's venv)
# Prints one table: bf16 tiny and 2B-shaped Qwen3-VL (random weights), real 4-bit QLoRA through
# bitsandbytes' CUDA kernels, paged AdamW8bit, the faults demo's faults, and the guarded/plain
# step-time ratio on an 8B-shaped text stack, and `check --probe` on the 2B shape (activation maxima,
# peak memory against check's estimate). Nothing is downloaded.
# Without a CUDA GPU it stops at once with exit code 2 and says so.
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false STABGUARD_DISABLE_PLUGIN_AUTOLOAD=1

if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "selfcheck: no CUDA GPU visible to torch (torch.cuda.is_available() is False); nothing was run." >&2
    echo "selfcheck: run it on a machine with an NVIDIA GPU and a CUDA build of torch." >&2
    exit 2
fi
if ! python -c 'import bitsandbytes' 2>/dev/null; then
    echo "selfcheck: bitsandbytes is not installed; the 4-bit and 8-bit checks need it (pip install bitsandbytes)." >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout --signal=TERM 480 python bench/gpu/selfcheck.py "$@"
