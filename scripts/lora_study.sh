#!/usr/bin/env bash
# LoRA against full fine-tuning on the CPU (docs/finetuning.md, "Quality"):
#   1. pretrain the `tiny` U-Net centrally on FashionMNIST classes 0-4 (the centralized trainer);
#   2. fine-tune it federatedly on classes 5-9, Dirichlet 0.5 over 2 nodes, 3 seeds, three arms:
#      full FedAvg fine-tuning, LoRA 'ffa' and LoRA 'ab' (int8 both ways);
#   3. no fine-tuning is every run's round 0 (the pretrained model on classes 5-9).
# Usage: scripts/lora_study.sh [OUT]   (default outputs/lora-study; rerun to resume)
# RANK (default 8) sets lora-rank; ROUNDS and STEPS the fine-tuning rounds and local steps.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
out="$(realpath -m "${1:-outputs/lora-study}")"
rank="${RANK:-8}"

if [ ! -e "$out/pretrained/pipeline/unet/config.json" ]; then
  python -m feddm_flower.tools.centralized --num-supernodes 2 --out "$out/pretrained" \
    --run-config "classes='0-4' num-server-rounds=5 local-steps=150 server-eval-examples=500"
fi

rounds="${ROUNDS:-3}"
common="init-from='$out/pretrained' classes='5-9' num-server-rounds=$rounds"
common+=" local-steps=${STEPS:-60} eval-every=$rounds fid-samples=1000 sample-steps=25"
lora="trainable='lora' lora-rank=$rank uplink='int8' downlink='int8'"
python -m feddm_flower.tools.ablate --out "$out/study" --seeds 0,1,2 --partitions dir0.5 \
  --num-supernodes 2 --set "$common" \
  --cells "full: ; lora-ffa: $lora; lora-ab: $lora lora-variant='ab'"
