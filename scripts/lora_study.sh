#!/usr/bin/env bash
# LoRA against full fine-tuning on the CPU (docs/finetuning.md, "Quality"):
#   1. pretrain the `tiny` U-Net centrally on FashionMNIST classes 0-4 (the centralized trainer);
#   2. fine-tune it federatedly on classes 5-9, Dirichlet 0.5 over 2 nodes, 3 seeds, three arms:
#      full FedAvg fine-tuning, LoRA 'ffa' (rank 8) and LoRA 'ab' (rank 2), int8 both ways: on
#      this U-Net each moves at least 64x fewer bytes a round than FedAvg (`bench lora-bytes`);
#   3. no fine-tuning is every run's round 0 (the pretrained model on classes 5-9).
# Usage: scripts/lora_study.sh [OUT]   (default outputs/lora-study; rerun to resume)
# FFA_RANK (8) and AB_RANK (2) set the ranks; ROUNDS (3) and STEPS (60) the rounds and local steps.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
out="$(realpath -m "${1:-outputs/lora-study}")"

if [ ! -e "$out/pretrained/pipeline/unet/config.json" ]; then
  python -m feddm_flower.tools.centralized --num-supernodes 2 --out "$out/pretrained" \
    --run-config "classes='0-4' num-server-rounds=5 local-steps=150 server-eval-examples=500"
fi

rounds="${ROUNDS:-3}"
common="init-from='$out/pretrained' classes='5-9' num-server-rounds=$rounds"
common+=" local-steps=${STEPS:-60} eval-every=$rounds fid-samples=1000 sample-steps=25"
lora="trainable='lora' uplink='int8' downlink='int8'"
cells="full: ; lora-ffa: $lora lora-rank=${FFA_RANK:-8} lora-variant='ffa';"
cells+=" lora-ab: $lora lora-rank=${AB_RANK:-2} lora-variant='ab'"
python -m feddm_flower.tools.ablate --out "$out/study" --seeds 0,1,2 --partitions dir0.5 \
  --num-supernodes 2 --set "$common" --cells "$cells"
