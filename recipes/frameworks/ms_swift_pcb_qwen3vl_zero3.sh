#!/usr/bin/env bash
# Qwen3-VL-32B LoRA on PCB boards with ms-swift, DeepSpeed ZeRO-3 over 8 GPUs, every stabguard guard on:
#   bash recipes/frameworks/ms_swift_pcb_qwen3vl_zero3.sh            (NPROC_PER_NODE=8: swift starts torchrun)
# Data, in ms-swift's format (messages with <image> tags, an images column):
#   stabguard data synth-pcb --out data/pcb --n 2000 --size 640
#   stabguard data export data/pcb/train.jsonl --to ms-swift --out data/pcb_swift
# Probe first (the first step, its update vetoed; report, exit 0 or 1): STABGUARD_PROBE=1 bash ...
# Resume: bash ... --resume_from_checkpoint checkpoints/pcb_swift_zero3/v0-<time>/checkpoint-N
# --deepspeed zero2 or --fsdp fsdp2 instead of zero3: the same guards (tox -e ms-swift runs all three).
# Tested on 2 CPU ranks with the tiny Qwen3-VL (tox -e ms-swift); this 32B command has not run (no GPU).
set -euo pipefail
# The guards, snapshots and recovery of the stabguard recipe for the same run (ms-swift's command line has
# no place for them; STABGUARD_GUARDS='{"nonfinite": {}}' names guards inline instead).
export STABGUARD_RECIPE=${STABGUARD_RECIPE:-recipes/pcb_qwen3vl_zero3.toml}
export NPROC_PER_NODE=${NPROC_PER_NODE:-8}
swift sft \
  --model Qwen/Qwen3-VL-32B-Instruct --model_type qwen3_vl --template qwen3_vl --torch_dtype bfloat16 \
  --dataset data/pcb_swift/train.jsonl --split_dataset_ratio 0 --max_length 2048 --max_pixels 1048576 \
  --tuner_type lora --lora_rank 16 --lora_alpha 32 --lora_dropout 0.05 --target_modules all-linear \
  --freeze_vit true --freeze_aligner true \
  --deepspeed zero3 \
  --per_device_train_batch_size 2 --gradient_accumulation_steps 1 --learning_rate 1e-4 --num_train_epochs 3 \
  --lr_scheduler_type cosine --warmup_ratio 0.1 --max_grad_norm 0.3 \
  --logging_steps 10 --save_steps 100 --save_total_limit 3 --dataloader_num_workers 0 \
  --output_dir checkpoints/pcb_swift_zero3 \
  --external_plugins "$(python -m stabguard.integrations.ms_swift)" \
  "$@"
