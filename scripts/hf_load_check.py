#!/usr/bin/env python3
# Loads a retort checkpoint (HF layout: config.json + model.safetensors) with
# transformers' DeepseekV4ForCausalLM and compares its logits with `retort
# forward` output on the same input_ids. Runs where torch + transformers are
# (the GPU machine). Exit 0 when max |hf - retort| < tolerance.
# usage: hf_load_check.py CHECKPOINT_DIR INPUT.safetensors RETORT_OUT.safetensors [TOL]
import sys

import torch
from safetensors.torch import load_file
from transformers import DeepseekV4ForCausalLM

ckpt, inp, ours = sys.argv[1:4]
tol = float(sys.argv[4]) if len(sys.argv) > 4 else 1e-4
torch.use_deterministic_algorithms(True)
model = DeepseekV4ForCausalLM.from_pretrained(ckpt, attn_implementation="eager", torch_dtype=torch.float32).eval()
ids = load_file(inp)["input_ids"]
ref = load_file(ours)["logits"]
with torch.no_grad():
    out = model(input_ids=ids).logits.float()
d = (out - ref).abs().max().item()
print(f"transformers loaded {ckpt}: logits {tuple(out.shape)}, max |hf - retort| = {d:.3e} "
      f"(max |logit| {out.abs().max().item():.2f}, tolerance {tol:g})")
sys.exit(0 if d < tol else 1)
