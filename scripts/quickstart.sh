#!/usr/bin/env bash
# Sets up, builds and runs retort's main job on CPU. Until the full quickstart
# pipeline lands, the main job runs the V4 model shipped in tests/fixtures/v4/q
# (released layout: FP8 weights, MXFP4 experts): it prints the model summary,
# generates tokens and checks a full forward against the reference logits; then
# it fine-tunes the tiny fixture model b with SFT (configs/sft_tiny.textproto) and
# generates from the trained checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/build.sh
model=tests/fixtures/v4/q
./build/controller/retort inspect --model "$model" --context 4096
./build/controller/retort generate --model "$model" --tokens "0 17 42 99" --max-new-tokens 24 --temperature 0.8 --seed 7
out=$(mktemp -d)
./build/controller/retort forward --model "$model" --input "$model/expected.safetensors" \
  --output "$out/out.safetensors" --decode-from 37 --compare "$model/expected.safetensors"
# SFT on the tiny V4 (all components on): loss falls to ~0 in 60 steps; the
# trained model then reverses the first training prompt (expect 44 353 222 97 185 1).
./build/controller/retort learner sft --config configs/sft_tiny.textproto
./build/controller/retort generate --model /tmp/retort_sft_tiny/checkpoint --tokens "10 185 97 222 353 44 11" \
  --max-new-tokens 16 --temperature 0
