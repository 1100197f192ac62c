#!/usr/bin/env python3
"""DeepSeek-V4 in plain PyTorch: the side-by-side baseline of bench/decode.

The same math as retort's CPU reference forward (model/v4/model.cc, exact
numerics; V4_SPEC.md §2-3), written as a PyTorch engine without custom
kernels would run it:

  * forward(): a full forward of [B, T] tokens from an empty state, optionally
    returning the per-sequence decode state it leaves (a prefill);
  * decode_step() / decode_layers(): one new token per sequence against
    per-sequence state tensors, vectorised over the batch (no Python loop over
    sequences; sequences may sit at different positions). Every state update is
    in place, so one step can be captured in a CUDA graph;
  * bench: times decode_layers() on a stack of V4-Flash-shaped layers with
    random bf16 weights and random state (see `bench --help`).

Numerics: dtype float32 reproduces the reference (fixtures: torch_v4_check.py).
dtype bfloat16 keeps weights, mHC streams, KV entries and matmul inputs in
bf16 and computes norms, softmaxes, mHC mixing, routing and SwiGLU in fp32;
the compressors' pending rows are fp32 (V4_SPEC §3). No FP8/FP4 simulation:
the Walsh-Hadamard rotation of the indexer q/k is orthogonal and cancels in
q.k without the FP4 round-trip, so it is left out, as in model.cc's exact mode.

Dependencies: torch only (safetensors files are read by a small reader here).
Runs on torch 1.13 (CPU check) and 2.x; the bf16 MoE uses torch._grouped_mm
where it exists (sm90/sm100), else a per-expert loop.
"""
import argparse
import json
import math
import os
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F

SLIDING, CSA, HCA = "sliding", "csa", "hca"


# ----------------------------------------------------------------------------
# Configuration (model/io/v4_config.cc)


@dataclass
class RopeConfig:
    theta: float = 10000.0
    yarn: bool = False
    factor: float = 1.0
    original_max_position: float = 0.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclass
class V4Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    rope_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    n_routed_experts: int
    n_shared_experts: int
    experts_per_token: int
    moe_intermediate: int
    routed_scaling_factor: float
    swiglu_limit: float
    sliding_window: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    rms_norm_eps: float
    main_rope: RopeConfig
    compress_rope: RopeConfig
    attention: List[str]       # per layer: sliding | csa | hca
    compress_ratio: List[int]  # per layer: 0, m (CSA) or m' (HCA)
    hash_routed: List[bool]    # per layer: tid2eid routing


def _parse_rope(r, theta):
    rc = RopeConfig(theta=theta)
    if not isinstance(r, dict):
        return rc
    kind = r.get("rope_type", r.get("type", "default"))
    if "rope_theta" in r:
        rc.theta = float(r["rope_theta"])
    if kind == "default":
        return rc
    if kind != "yarn":
        raise ValueError(f"rope type {kind!r} is not supported (default or yarn)")
    if float(r.get("attention_factor", 1.0)) != 1.0:
        raise ValueError("attention_factor != 1 is not V4 (its YaRN has no mscale)")
    rc.yarn = True
    rc.factor = float(r["factor"])
    rc.original_max_position = float(r["original_max_position_embeddings"])
    rc.beta_fast = float(r.get("beta_fast", 32.0))
    rc.beta_slow = float(r.get("beta_slow", 1.0))
    return rc


def parse_config(j):
    """A config.json dict (HF or released layout) -> V4Config, as v4_config.cc reads it."""
    if j.get("num_key_value_heads", 1) != 1:
        raise ValueError("num_key_value_heads must be 1 (V4 shares one K=V head)")
    if j.get("scoring_func", "sqrtsoftplus") != "sqrtsoftplus":
        raise ValueError("scoring_func must be sqrtsoftplus")
    L = int(j["num_hidden_layers"])
    rope_theta = float(j.get("rope_theta", 10000.0))
    compress_theta = float(j.get("compress_rope_theta", 160000.0))
    if "compress_ratios" in j:  # released layout
        rope_dim = int(j["qk_rope_head_dim"])
        ratios = [int(m) for m in j["compress_ratios"][:L]]
        attention = [SLIDING if m == 0 else CSA if m == 4 else HCA for m in ratios]
        n_hash = int(j.get("num_hash_layers", 0))
        hash_routed = [l < n_hash for l in range(L)]
        main_rope = RopeConfig(theta=rope_theta)
        compress_rope = _parse_rope(j.get("rope_scaling"), compress_theta)
        compress_rope.theta = compress_theta
    else:  # HF layout
        head_dim = int(j["head_dim"])
        prf = float(j.get("partial_rotary_factor", 0) or 0)
        rope_dim = int(j["qk_rope_head_dim"]) if "qk_rope_head_dim" in j else int(head_dim * (prf or 0.125))
        rates = j.get("compress_rates", {})
        csa_m = int(rates.get("compressed_sparse_attention", 4))
        hca_m = int(rates.get("heavily_compressed_attention", 128))
        kinds = {"sliding_attention": (SLIDING, 0), "compressed_sparse_attention": (CSA, csa_m),
                 "heavily_compressed_attention": (HCA, hca_m)}
        attention = [kinds[t][0] for t in j["layer_types"]]
        ratios = [kinds[t][1] for t in j["layer_types"]]
        if "mlp_layer_types" in j:
            hash_routed = [t == "hash_moe" for t in j["mlp_layer_types"]]
        else:
            hash_routed = [l < int(j.get("num_hash_layers", 3)) for l in range(L)]
        rp = j.get("rope_parameters")
        if isinstance(rp, dict) and isinstance(rp.get("main"), dict):
            main_rope = _parse_rope(rp["main"], rope_theta)
            compress_rope = _parse_rope(rp.get("compress"), compress_theta)
        else:
            main_rope = RopeConfig(theta=rope_theta)
            compress_rope = _parse_rope(rp, compress_theta)
            compress_rope.theta = compress_theta
    cfg = V4Config(
        vocab_size=int(j["vocab_size"]), hidden_size=int(j["hidden_size"]), num_layers=L,
        num_heads=int(j["num_attention_heads"]), head_dim=int(j["head_dim"]), rope_dim=rope_dim,
        q_lora_rank=int(j["q_lora_rank"]), o_groups=int(j["o_groups"]), o_lora_rank=int(j["o_lora_rank"]),
        n_routed_experts=int(j["n_routed_experts"]), n_shared_experts=int(j.get("n_shared_experts", 1)),
        experts_per_token=int(j["num_experts_per_tok"]), moe_intermediate=int(j["moe_intermediate_size"]),
        routed_scaling_factor=float(j.get("routed_scaling_factor", 1.0)),
        swiglu_limit=float(j.get("swiglu_limit", 0.0) or 0.0), sliding_window=int(j["sliding_window"]),
        index_n_heads=int(j.get("index_n_heads", 0)), index_head_dim=int(j.get("index_head_dim", 0)),
        index_topk=int(j.get("index_topk", 0)), hc_mult=int(j.get("hc_mult", 4)),
        hc_sinkhorn_iters=int(j.get("hc_sinkhorn_iters", 20)), hc_eps=float(j.get("hc_eps", 1e-6)),
        rms_norm_eps=float(j.get("rms_norm_eps", 1e-6)), main_rope=main_rope, compress_rope=compress_rope,
        attention=attention, compress_ratio=ratios, hash_routed=hash_routed)
    if len(cfg.attention) != L or len(cfg.hash_routed) != L:
        raise ValueError("layer type lists do not match num_hidden_layers")
    if cfg.num_heads % cfg.o_groups:
        raise ValueError("num_attention_heads is not a multiple of o_groups")
    if cfg.n_shared_experts not in (0, 1):
        raise ValueError("n_shared_experts must be 0 or 1")
    return cfg


def flash_config(layers):
    """V4-Flash shapes for `layers` layers alternating CSA (m=4) and HCA (m'=128),
    starting with CSA, all routed by biased top-k (Flash's hash layers are 0..2)."""
    kinds = [CSA if l % 2 == 0 else HCA for l in range(layers)]
    return V4Config(
        vocab_size=129280, hidden_size=4096, num_layers=layers, num_heads=64, head_dim=512, rope_dim=64,
        q_lora_rank=1024, o_groups=8, o_lora_rank=1024, n_routed_experts=256, n_shared_experts=1,
        experts_per_token=6, moe_intermediate=2048, routed_scaling_factor=1.5, swiglu_limit=10.0,
        sliding_window=128, index_n_heads=64, index_head_dim=128, index_topk=512, hc_mult=4,
        hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6, main_rope=RopeConfig(theta=10000.0),
        compress_rope=RopeConfig(theta=160000.0, yarn=True, factor=16.0, original_max_position=65536.0,
                                 beta_fast=32.0, beta_slow=1.0),
        attention=kinds, compress_ratio=[4 if k == CSA else 128 for k in kinds], hash_routed=[False] * layers)


def tiny_config(layers):
    """Small shapes with the Flash layer pattern, for smoke-testing the bench path on CPU."""
    kinds = [CSA if l % 2 == 0 else HCA for l in range(layers)]
    return V4Config(
        vocab_size=256, hidden_size=128, num_layers=layers, num_heads=8, head_dim=64, rope_dim=16,
        q_lora_rank=64, o_groups=2, o_lora_rank=32, n_routed_experts=16, n_shared_experts=1,
        experts_per_token=4, moe_intermediate=64, routed_scaling_factor=1.5, swiglu_limit=10.0,
        sliding_window=16, index_n_heads=8, index_head_dim=32, index_topk=16, hc_mult=4,
        hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6, main_rope=RopeConfig(theta=10000.0),
        compress_rope=RopeConfig(theta=160000.0, yarn=True, factor=16.0, original_max_position=512.0),
        attention=kinds, compress_ratio=[4 if k == CSA else 32 for k in kinds], hash_routed=[False] * layers)


# ----------------------------------------------------------------------------
# Weights


@dataclass
class HyperConnection:
    fn: torch.Tensor     # f32 [(2+hc)*hc, hc*d]   (hc_head: [hc, hc*d])
    base: torch.Tensor   # f32 [(2+hc)*hc]         (hc_head: [hc])
    scale: torch.Tensor  # f32 [3]                 (hc_head: [1])


@dataclass
class Compressor:
    ratio: int             # m
    dim: int               # c: head_dim (main KV) or index_head_dim (indexer keys)
    overlap: bool          # CSA: two series over 2m tokens with stride m
    wkv: torch.Tensor      # [coff*c, d]
    wgate: torch.Tensor    # [coff*c, d]
    ape: torch.Tensor      # f32 [m, coff*c]
    norm: torch.Tensor     # f32 [c]


@dataclass
class Indexer:
    wq_b: torch.Tensor          # [index_heads*index_dim, q_lora_rank]
    weights_proj: torch.Tensor  # [index_heads, d]
    compressor: Compressor


@dataclass
class Attention:
    kind: str
    wq_a: torch.Tensor
    q_norm: torch.Tensor  # f32 [q_lora_rank]
    wq_b: torch.Tensor
    wkv: torch.Tensor
    kv_norm: torch.Tensor  # f32 [head_dim]
    wo_a: torch.Tensor     # [g*d_g, n_h*head_dim/g]
    wo_b: torch.Tensor     # [d, g*d_g]
    sinks: torch.Tensor    # f32 [n_h]
    compressor: Optional[Compressor] = None
    indexer: Optional[Indexer] = None


@dataclass
class Moe:
    hash_routed: bool
    gate: torch.Tensor                  # f32 [E, d]
    bias: Optional[torch.Tensor]        # f32 [E] (biased top-k layers)
    tid2eid: Optional[torch.Tensor]     # i64 [vocab, k] (hash layers)
    w13: torch.Tensor                   # [E, 2I, d]: gate rows, then up rows
    w2: torch.Tensor                    # [E, d, I]
    shared_w13: Optional[torch.Tensor]  # [2I, d]
    shared_w2: Optional[torch.Tensor]   # [d, I]


@dataclass
class Layer:
    attn_hc: HyperConnection
    ffn_hc: HyperConnection
    attn_norm: torch.Tensor  # f32 [d]
    ffn_norm: torch.Tensor   # f32 [d]
    attn: Attention
    moe: Moe


@dataclass
class Model:
    cfg: V4Config
    dtype: torch.dtype
    layers: List[Layer]
    inv_freq: List[torch.Tensor]  # [0] sliding layers, [1] compressed layers: f32 [rope_dim/2]
    embed: Optional[torch.Tensor] = None  # [vocab, d]
    hc_head: Optional[HyperConnection] = None
    norm: Optional[torch.Tensor] = None   # f32 [d]
    head: Optional[torch.Tensor] = None   # [vocab, d]


def rope_inverse_frequencies(rope: RopeConfig, rope_dim: int) -> torch.Tensor:
    """RopeInverseFrequencies of model.cc: theta^(-2i/d_r) in fp32, YaRN-blended
    for compressed layers (V4_SPEC §2.5, no attention scaling)."""
    exponent = torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim
    pos_freq = torch.tensor(rope.theta, dtype=torch.float32) ** exponent
    f = 1.0 / pos_freq
    if not rope.yarn:
        return f

    def corr(rot):
        return rope_dim * math.log(rope.original_max_position / (rot * 2 * math.pi)) / (2 * math.log(rope.theta))

    lo = max(math.floor(corr(rope.beta_fast)), 0.0)
    hi = min(math.ceil(corr(rope.beta_slow)), float(rope_dim - 1))
    if lo == hi:
        hi += 0.001
    i = torch.arange(rope_dim // 2, dtype=torch.float64)
    ramp = ((i - lo) / (hi - lo)).to(torch.float32).clamp(0.0, 1.0)
    pos_freq = 1.0 / f
    extrap = 1.0 / pos_freq
    interp = 1.0 / (float(rope.factor) * pos_freq)
    return interp * ramp + extrap * (1.0 - ramp)


# ----------------------------------------------------------------------------
# Checkpoint reading (HF or released layout; loader.cc's names)

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
              "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "F8_E4M3": torch.uint8, "F8_E8M0": torch.uint8}


def read_safetensors(path):
    """name -> (tensor, safetensors dtype string). FP8 tensors come back as raw uint8 codes."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        dt = _ST_DTYPES[info["dtype"]]
        if end == begin:
            t = torch.empty(info["shape"], dtype=dt)
        else:
            t = torch.frombuffer(bytearray(data[8 + n + begin:8 + n + end]), dtype=dt).reshape(info["shape"])
        out[name] = (t, info["dtype"])
    return out


def _e4m3_table():
    vals = []
    for b in range(256):
        sign = -1.0 if b & 0x80 else 1.0
        e, m = (b >> 3) & 0xF, b & 7
        if e == 0xF and m == 7:
            vals.append(float("nan"))
        elif e == 0:
            vals.append(sign * (m / 8.0) * 2.0 ** -6)
        else:
            vals.append(sign * (1.0 + m / 8.0) * 2.0 ** (e - 7))
    return torch.tensor(vals, dtype=torch.float32)


def _e8m0_table():
    return torch.tensor([2.0 ** (b - 127) if b != 255 else float("nan") for b in range(256)], dtype=torch.float64).float()


E2M1_VALUES = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float32)


class CheckpointReader:
    """Tensors of a checkpoint directory (one file or shards), decoded to f32."""

    def __init__(self, directory):
        self.dir = directory
        self.tensors = {}
        for fn in sorted(os.listdir(directory)):
            if fn.endswith(".safetensors") and fn != "expected.safetensors":
                self.tensors.update(read_safetensors(os.path.join(directory, fn)))
        self.used = set()
        self.e4m3 = _e4m3_table()
        self.e8m0 = _e8m0_table()

    def resolve(self, names):
        for n in names:
            if n in self.tensors:
                return n
        raise KeyError(f"{self.dir}: missing tensor {names[0]!r} (also looked for {names[1:]})")

    @staticmethod
    def names(released, hf, *aliases):
        return [released, "model." + released, hf, *aliases]

    @staticmethod
    def _scale_name(name):
        return name[:-len(".weight")] + ".scale" if name.endswith(".weight") else name + ".scale"

    def f32(self, names, shape):
        name = self.resolve(names)
        t, dt = self.tensors[name]
        self.used.add(name)
        if list(t.shape) != list(shape):
            raise ValueError(f"{self.dir}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
        if dt in ("F32", "F16", "BF16"):
            return t.float()
        if dt == "F8_E4M3":
            return self._dequant_fp8(name, t)
        raise ValueError(f"{self.dir}: tensor {name!r} has dtype {dt}, expected f32/bf16/f16/f8_e4m3")

    def _dequant_fp8(self, name, codes):
        sname = self._scale_name(name)
        s, sdt = self.tensors[sname]
        self.used.add(sname)
        rows, cols = codes.shape
        scale = self.e8m0[s.long()] if sdt == "F8_E8M0" else s.float()
        scale = scale.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
        return self.e4m3[codes.long()] * scale

    def expert_matrix(self, names, out, inn):
        """An expert matrix: MXFP4 (I8/U8 codes, low nibble = even element, E8M0 per 32) or dense."""
        name = self.resolve(names)
        t, dt = self.tensors[name]
        if dt not in ("I8", "U8"):
            return self.f32(names, [out, inn])
        self.used.add(name)
        codes = t.view(torch.uint8).long()
        if list(codes.shape) != [out, inn // 2]:
            raise ValueError(f"{self.dir}: MXFP4 tensor {name!r} has shape {list(codes.shape)}")
        sname = self._scale_name(name)
        s, sdt = self.tensors[sname]
        self.used.add(sname)
        if sdt != "F8_E8M0":
            raise ValueError(f"{self.dir}: MXFP4 scale {sname!r} must be F8_E8M0, got {sdt}")
        vals = torch.stack([E2M1_VALUES[codes & 0xF], E2M1_VALUES[codes >> 4]], dim=-1).reshape(out, inn)
        return vals * self.e8m0[s.long()].repeat_interleave(32, 1)

    def i64(self, names, shape):
        name = self.resolve(names)
        t, _ = self.tensors[name]
        self.used.add(name)
        if list(t.shape) != list(shape):
            raise ValueError(f"{self.dir}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
        return t.long()

    def has(self, name):
        return name in self.tensors

    def check_all_used(self):
        for n in self.tensors:
            if n not in self.used and not n.startswith("mtp.") and not n.startswith("model.mtp."):
                raise ValueError(f"{self.dir}: unexpected tensor {n!r} (not part of this config's model)")


def load_model(directory, dtype=torch.float32, device="cpu"):
    """config.json + safetensors -> Model: weights dequantized exactly to f32, then
    matrices cast to `dtype` (small fp32 parameters stay fp32)."""
    with open(os.path.join(directory, "config.json")) as f:
        cfg = parse_config(json.load(f))
    R = CheckpointReader(directory)
    N = CheckpointReader.names
    d, D, H, hc = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.hc_mult
    E, I = cfg.n_routed_experts, cfg.moe_intermediate

    def mat(t):
        return t.to(device=device, dtype=dtype)

    def f32(t):
        return t.to(device=device, dtype=torch.float32)

    def hyper(rel, hfp, mix, nscale, head=False):
        fn, base, scale = ("hc_fn", "hc_base", "hc_scale") if head else ("fn", "base", "scale")
        return HyperConnection(fn=f32(R.f32(N(rel + "fn", hfp + fn), [mix, hc * d])),
                               base=f32(R.f32(N(rel + "base", hfp + base), [mix])),
                               scale=f32(R.f32(N(rel + "scale", hfp + scale), [nscale])))

    def compressor(rel, hfp, ratio, dim, overlap):
        w = (2 if overlap else 1) * dim
        return Compressor(ratio=ratio, dim=dim, overlap=overlap,
                          wkv=mat(R.f32(N(rel + "wkv.weight", hfp + "kv_proj.weight"), [w, d])),
                          wgate=mat(R.f32(N(rel + "wgate.weight", hfp + "gate_proj.weight"), [w, d])),
                          ape=f32(R.f32(N(rel + "ape", hfp + "position_bias"), [ratio, w])),
                          norm=f32(R.f32(N(rel + "norm.weight", hfp + "kv_norm.weight"), [dim])))

    layers = []
    for l in range(cfg.num_layers):
        r, h = f"layers.{l}.", f"model.layers.{l}."
        ra, ha = r + "attn.", h + "self_attn."
        kind = cfg.attention[l]
        attn = Attention(
            kind=kind,
            wq_a=mat(R.f32(N(ra + "wq_a.weight", ha + "q_a_proj.weight"), [cfg.q_lora_rank, d])),
            q_norm=f32(R.f32(N(ra + "q_norm.weight", ha + "q_a_norm.weight"), [cfg.q_lora_rank])),
            wq_b=mat(R.f32(N(ra + "wq_b.weight", ha + "q_b_proj.weight"), [H * D, cfg.q_lora_rank])),
            wkv=mat(R.f32(N(ra + "wkv.weight", ha + "kv_proj.weight"), [D, d])),
            # transformers 5.17's save_pretrained writes the KV norm as "attn.norm".
            kv_norm=f32(R.f32(N(ra + "kv_norm.weight", ha + "kv_norm.weight", h + "attn.norm.weight"), [D])),
            wo_a=mat(R.f32(N(ra + "wo_a.weight", ha + "o_a_proj.weight"), [cfg.o_groups * cfg.o_lora_rank, H * D // cfg.o_groups])),
            wo_b=mat(R.f32(N(ra + "wo_b.weight", ha + "o_b_proj.weight"), [d, cfg.o_groups * cfg.o_lora_rank])),
            sinks=f32(R.f32(N(ra + "attn_sink", ha + "sinks"), [H])))
        if kind != SLIDING:
            attn.compressor = compressor(ra + "compressor.", ha + "compressor.", cfg.compress_ratio[l], D, kind == CSA)
        if kind == CSA:
            ri, hi = ra + "indexer.", ha + "compressor.indexer."
            attn.indexer = Indexer(
                wq_b=mat(R.f32(N(ri + "wq_b.weight", hi + "q_b_proj.weight"), [cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank])),
                weights_proj=mat(R.f32(N(ri + "weights_proj.weight", hi + "scorer.weights_proj.weight"), [cfg.index_n_heads, d])),
                compressor=compressor(ri + "compressor.", hi, cfg.compress_ratio[l], cfg.index_head_dim, True))
        rf, hm = r + "ffn.", h + "mlp."
        gate = f32(R.f32(N(rf + "gate.weight", hm + "gate.weight"), [E, d]))
        bias = tid2eid = None
        if cfg.hash_routed[l]:
            tid2eid = R.i64(N(rf + "gate.tid2eid", hm + "gate.tid2eid"), [cfg.vocab_size, cfg.experts_per_token]).to(device)
        else:
            bias = f32(R.f32(N(rf + "gate.bias", hm + "gate.e_score_correction_bias"), [E]))
        if R.has(hm + "experts.gate_up_proj"):
            w13 = R.f32([hm + "experts.gate_up_proj"], [E, 2 * I, d])
            w2 = R.f32([hm + "experts.down_proj"], [E, d, I])
        else:
            w1s, w3s, w2s = [], [], []
            for e in range(E):
                re_ = f"{rf}experts.{e}."
                w1s.append(R.expert_matrix([re_ + "w1.weight", "model." + re_ + "w1.weight"], I, d))
                w3s.append(R.expert_matrix([re_ + "w3.weight", "model." + re_ + "w3.weight"], I, d))
                w2s.append(R.expert_matrix([re_ + "w2.weight", "model." + re_ + "w2.weight"], d, I))
            w13 = torch.cat([torch.stack(w1s), torch.stack(w3s)], dim=1)
            w2 = torch.stack(w2s)
        shared_w13 = shared_w2 = None
        if cfg.n_shared_experts:
            rs, hs = rf + "shared_experts.", hm + "shared_experts."
            shared_w13 = mat(torch.cat([R.f32(N(rs + "w1.weight", hs + "gate_proj.weight"), [I, d]),
                                        R.f32(N(rs + "w3.weight", hs + "up_proj.weight"), [I, d])]))
            shared_w2 = mat(R.f32(N(rs + "w2.weight", hs + "down_proj.weight"), [d, I]))
        moe = Moe(hash_routed=cfg.hash_routed[l], gate=gate, bias=bias, tid2eid=tid2eid, w13=mat(w13), w2=mat(w2),
                  shared_w13=shared_w13, shared_w2=shared_w2)
        layers.append(Layer(
            attn_hc=hyper(r + "hc_attn_", h + "attn_hc.", (2 + hc) * hc, 3),
            ffn_hc=hyper(r + "hc_ffn_", h + "ffn_hc.", (2 + hc) * hc, 3),
            attn_norm=f32(R.f32(N(r + "attn_norm.weight", h + "input_layernorm.weight"), [d])),
            ffn_norm=f32(R.f32(N(r + "ffn_norm.weight", h + "post_attention_layernorm.weight"), [d])),
            attn=attn, moe=moe))
    embed = mat(R.f32(N("embed.weight", "model.embed_tokens.weight"), [cfg.vocab_size, d]))
    hc_head = hyper("hc_head_", "model.hc_head.", hc, 1, head=True)
    norm = f32(R.f32(N("norm.weight", "model.norm.weight"), [d]))
    head = mat(R.f32(["head.weight", "lm_head.weight", "model.head.weight"], [cfg.vocab_size, d]))
    R.check_all_used()
    inv_freq = [rope_inverse_frequencies(cfg.main_rope, cfg.rope_dim).to(device),
                rope_inverse_frequencies(cfg.compress_rope, cfg.rope_dim).to(device)]
    return Model(cfg=cfg, dtype=dtype, layers=layers, inv_freq=inv_freq, embed=embed, hc_head=hc_head,
                 norm=norm, head=head)


# ----------------------------------------------------------------------------
# Per-sequence decode state (V4_SPEC §3), batched: leading dim = sequence.


@dataclass
class CompressorState:
    entries: torch.Tensor        # [B, ceil(capacity/m), c] emitted entries (normed, RoPE'd), model dtype
    pending_kv: torch.Tensor     # f32 [B, m, coff*c]: row pos % m of the open window
    pending_score: torch.Tensor  # f32 [B, m, coff*c]: same, with ape added
    prev_kv: Optional[torch.Tensor] = None     # CSA: f32 [B, m, c] last closed window's first-half rows
    prev_score: Optional[torch.Tensor] = None  # CSA: f32 [B, m, c]; -inf before the first window closes


@dataclass
class LayerState:
    window: torch.Tensor                      # [B, n_win, head_dim] ring, slot = pos % n_win
    kv: Optional[CompressorState] = None      # CSA / HCA compressed KV
    index: Optional[CompressorState] = None   # CSA indexer keys


@dataclass
class DecodeState:
    pos: torch.Tensor     # i64 [B]: tokens processed = position of each sequence's next token
    capacity: int         # positions the state can hold (entries are allocated for it)
    layers: List[LayerState]
    batch_index: torch.Tensor = field(default=None)  # i64 [B] = arange(B), for per-sequence scatters

    def tensors(self):
        yield self.pos
        for ls in self.layers:
            yield ls.window
            for cs in (ls.kv, ls.index):
                if cs is not None:
                    yield from (t for t in (cs.entries, cs.pending_kv, cs.pending_score, cs.prev_kv, cs.prev_score)
                                if t is not None)

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.tensors())


def state_shapes(cfg, batch, capacity, dtype):
    """Per layer: {field: (shape, dtype)} of the decode state; state_bytes() and new_state() share it."""
    out = []
    for l in range(cfg.num_layers):
        s = {"window": ((batch, cfg.sliding_window, cfg.head_dim), dtype)}
        kinds = []
        if cfg.attention[l] != SLIDING:
            kinds.append(("kv", cfg.head_dim))
        if cfg.attention[l] == CSA:
            kinds.append(("index", cfg.index_head_dim))
        for prefix, c in kinds:
            m = cfg.compress_ratio[l]
            overlap = cfg.attention[l] == CSA
            w = (2 if overlap else 1) * c
            s[prefix + ".entries"] = ((batch, -(-capacity // m), c), dtype)
            s[prefix + ".pending_kv"] = ((batch, m, w), torch.float32)
            s[prefix + ".pending_score"] = ((batch, m, w), torch.float32)
            if overlap:
                s[prefix + ".prev_kv"] = ((batch, m, c), torch.float32)
                s[prefix + ".prev_score"] = ((batch, m, c), torch.float32)
        out.append(s)
    return out


def state_bytes(cfg, batch, capacity, dtype):
    elt = lambda dt: torch.empty((), dtype=dt).element_size()
    n = batch * 8  # pos
    for s in state_shapes(cfg, batch, capacity, dtype):
        for shape, dt in s.values():
            n += math.prod(shape) * elt(dt)
    return n


def new_state(cfg, batch, capacity, dtype, device):
    """An empty state (position 0) for `batch` sequences of up to `capacity` tokens."""
    layers = []
    for s in state_shapes(cfg, batch, capacity, dtype):
        def make(prefix):
            if prefix + ".entries" not in s:
                return None
            t = {k.split(".", 1)[1]: torch.zeros(shape, dtype=dt, device=device)
                 for k, (shape, dt) in s.items() if k.startswith(prefix + ".")}
            if "prev_score" in t:
                t["prev_score"].fill_(-math.inf)
            return CompressorState(**t)
        shape, dt = s["window"]
        layers.append(LayerState(window=torch.zeros(shape, dtype=dt, device=device), kv=make("kv"), index=make("index")))
    return DecodeState(pos=torch.zeros(batch, dtype=torch.long, device=device), capacity=capacity, layers=layers,
                       batch_index=torch.arange(batch, device=device))


def concat_states(states):
    """Stacks single-sequence (or smaller-batch) states of one capacity into one batch."""
    def cat(xs):
        return None if xs[0] is None else torch.cat(xs)

    def cat_cs(css):
        if css[0] is None:
            return None
        return CompressorState(*(cat([getattr(c, f) for c in css])
                                 for f in ("entries", "pending_kv", "pending_score", "prev_kv", "prev_score")))

    assert len({s.capacity for s in states}) == 1, "states must share one capacity"
    layers = [LayerState(window=cat([s.layers[l].window for s in states]),
                         kv=cat_cs([s.layers[l].kv for s in states]),
                         index=cat_cs([s.layers[l].index for s in states]))
              for l in range(len(states[0].layers))]
    pos = cat([s.pos for s in states])
    return DecodeState(pos=pos, capacity=states[0].capacity, layers=layers,
                       batch_index=torch.arange(pos.numel(), device=pos.device))


# ----------------------------------------------------------------------------
# Building blocks


def rms_norm(x, weight, eps):
    """x * rsqrt(mean(x^2) + eps) (* weight), in fp32, back in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    return y.to(x.dtype)


def apply_rope(x, positions, inv_freq, sign=1.0):
    """Interleaved (GPT-J) RoPE on the trailing 2*len(inv_freq) dims of x; positions
    broadcast against x.shape[:-1]; sign -1 rotates by -pos (the inverse)."""
    rd = 2 * inv_freq.numel()
    angle = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # fp32 angles, as the reference
    cos, sin = torch.cos(angle), torch.sin(angle) * sign
    tail = x[..., -rd:].float().unflatten(-1, (rd // 2, 2))
    a, b = tail[..., 0], tail[..., 1]
    rotated = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    return torch.cat([x[..., :-rd], rotated.to(x.dtype)], dim=-1)


def sinkhorn_project(logits, iters, eps):
    """comb [..., hc, hc] (row = source stream, column = destination): row softmax + eps,
    then column normalisation, then iters-1 rounds of row and column normalisation."""
    m = torch.softmax(logits, dim=-1) + eps
    m = m / (m.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(-1, keepdim=True) + eps)
        m = m / (m.sum(-2, keepdim=True) + eps)
    return m


def hc_pre(cfg, h: HyperConnection, X):
    """mHC (§2.1) before a sublayer: X [N, hc, d] -> (u [N, d] in X's dtype, post [N, hc], comb [N, hc, hc])."""
    hc = cfg.hc_mult
    Xf = X.float()
    flat = Xf.flatten(1)
    inv = torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)
    mix = F.linear(flat, h.fn) * inv
    pre = torch.sigmoid(mix[:, :hc] * h.scale[0] + h.base[:hc]) + cfg.hc_eps
    post = 2.0 * torch.sigmoid(mix[:, hc:2 * hc] * h.scale[1] + h.base[hc:2 * hc])
    comb = (mix[:, 2 * hc:] * h.scale[2] + h.base[2 * hc:]).view(-1, hc, hc)
    comb = sinkhorn_project(comb, cfg.hc_sinkhorn_iters, cfg.hc_eps)
    u = (pre.unsqueeze(-1) * Xf).sum(1)
    return u.to(X.dtype), post, comb


def hc_post(Fout, post, comb, X):
    """X'_k = post_k * F + sum_j comb[j][k] * X_j (fp32, back in X's dtype)."""
    mixed = torch.matmul(comb.transpose(1, 2), X.float())
    return (post.unsqueeze(-1) * Fout.float().unsqueeze(1) + mixed).to(X.dtype)


def hc_head_collapse(cfg, h: HyperConnection, X):
    """hc_head (§2.1.7): y = sum_j (sigmoid(mix_j * scale + base_j) + eps) X_j."""
    Xf = X.float()
    flat = Xf.flatten(1)
    inv = torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)
    w = torch.sigmoid(F.linear(flat, h.fn) * inv * h.scale[0] + h.base) + cfg.hc_eps
    return (w.unsqueeze(-1) * Xf).sum(1).to(X.dtype)


def attention_with_sink(q, blocks, sinks, scale):
    """One softmax over the union of key blocks with exp(sink_h) in the denominator only.

    q [B, T, H, D]; blocks: (keys, valid) with K = V = keys, either [B, S, D] (every
    query of the sequence sees the same keys) or [B, T, S, D] (per-query keys), and
    valid [B or 1, T, S] bool. Logits and probabilities in fp32. Returns [B, T, H, D]."""
    B, T, H, D = q.shape
    logits = []
    for keys, valid in blocks:
        if keys.dim() == 3:
            z = torch.bmm(q.reshape(B, T * H, D), keys.transpose(1, 2)).view(B, T, H, -1)
        else:
            z = torch.matmul(q, keys.transpose(-1, -2))
        z = z.float() * scale
        logits.append(z.masked_fill(~valid.unsqueeze(2), -math.inf))
    z = torch.cat(logits, dim=-1)
    sink = sinks.view(1, 1, H, 1)
    mx = torch.maximum(z.amax(dim=-1, keepdim=True), sink)
    e = torch.exp(z - mx)
    p = (e / (e.sum(-1, keepdim=True) + torch.exp(sink - mx))).to(q.dtype)
    o = torch.zeros(B, T, H, D, dtype=torch.float32, device=q.device)
    start = 0
    for keys, _ in blocks:
        S = keys.shape[-2]
        pb = p[..., start:start + S]
        start += S
        if keys.dim() == 3:
            o = o + torch.bmm(pb.reshape(B, T * H, S), keys).view(B, T, H, D).float()
        else:
            o = o + torch.matmul(pb, keys).float()
    return o.to(q.dtype)


def grouped_output_projection(cfg, a: Attention, o):
    """o [N, H, D]: group g's n_h/g heads -> d_g by wo_a[g], concatenated, then wo_b."""
    N = o.shape[0]
    G, dg = cfg.o_groups, cfg.o_lora_rank
    per_group = cfg.num_heads * cfg.head_dim // G
    grp = o.reshape(N, G, per_group).transpose(0, 1)                       # [G, N, per_group]
    mid = torch.bmm(grp, a.wo_a.view(G, dg, per_group).transpose(1, 2))  # [G, N, d_g]
    return F.linear(mid.transpose(0, 1).reshape(N, G * dg), a.wo_b)


def compressed_entry(comp: Compressor, cand_kv, cand_score, first_pos, inv_freq, eps, dtype):
    """Entries from candidate rows: per-channel softmax over the row axis (-2) of the
    fp32 scores, weighted sum of kv, RMSNorm, RoPE at the block's first position."""
    entry = (torch.softmax(cand_score, dim=-2) * cand_kv).sum(-2)
    entry = rms_norm(entry, comp.norm, eps)
    return apply_rope(entry, first_pos, inv_freq).to(dtype)


def compress_sequence(comp: Compressor, kv, score, inv_freq, eps, dtype):
    """The compressor over a fresh sequence (positions 0..T-1). kv, score: f32 [B, T, coff*c],
    score without ape. Returns (entries [B, T//m, c], score with ape [B, T, coff*c])."""
    B, T, w = kv.shape
    m, c = comp.ratio, comp.dim
    score = score + comp.ape[torch.arange(T, device=kv.device) % m]
    n = T // m
    kb = kv[:, :n * m].reshape(B, n, m, w)
    sb = score[:, :n * m].reshape(B, n, m, w)
    if comp.overlap:
        # Entry i: series "a" = this block's channels [c:2c], series "b" = block i-1's channels [0:c]
        # (for block 0: score -inf, value 0).
        prev_k = F.pad(kb[:, :, :, :c], (0, 0, 0, 0, 1, 0))[:, :n]
        prev_s = F.pad(sb[:, :, :, :c], (0, 0, 0, 0, 1, 0), value=-math.inf)[:, :n]
        cand_kv = torch.cat([prev_k, kb[:, :, :, c:]], dim=2)
        cand_s = torch.cat([prev_s, sb[:, :, :, c:]], dim=2)
    else:
        cand_kv, cand_s = kb, sb
    first = torch.arange(n, device=kv.device) * m
    entries = compressed_entry(comp, cand_kv, cand_s, first, inv_freq, eps, dtype)
    return entries, score


def compressor_state_from_sequence(comp: Compressor, st: CompressorState, kv, score_ape, entries):
    """Writes a prefill's result into a fresh CompressorState (batched, in place)."""
    B, T, _ = kv.shape
    m, c = comp.ratio, comp.dim
    n = entries.shape[1]
    st.entries[:, :n] = entries
    tail = torch.arange(n * m, T, device=kv.device)
    st.pending_kv[:, tail % m] = kv[:, tail]
    st.pending_score[:, tail % m] = score_ape[:, tail]
    if comp.overlap and n > 0:
        last = torch.arange((n - 1) * m, n * m, device=kv.device)
        st.prev_kv.copy_(kv[:, last, :c])
        st.prev_score.copy_(score_ape[:, last, :c])


def compressor_step(comp: Compressor, st: CompressorState, kv, score, pos, batch_index, inv_freq, eps):
    """One token per sequence (kv, score: f32 [B, coff*c], score without ape; pos [B]).

    Stores the row at slot pos % m; where (pos+1) % m == 0 the window is complete and
    entry pos // m (over positions pos+1-m .. pos, plus for CSA the previous window's
    first halves) is emitted, and CSA keeps this window's first halves as `prev`.
    Branch-free for batching and CUDA graphs: every step computes the candidate
    entry of every sequence and commits it only where the window completed."""
    m, c = comp.ratio, comp.dim
    slot = pos % m
    st.pending_kv[batch_index, slot] = kv
    st.pending_score[batch_index, slot] = score + comp.ape[slot]
    if comp.overlap:
        cand_kv = torch.cat([st.prev_kv, st.pending_kv[:, :, c:]], dim=1)
        cand_s = torch.cat([st.prev_score, st.pending_score[:, :, c:]], dim=1)
    else:
        cand_kv, cand_s = st.pending_kv, st.pending_score
    entry = compressed_entry(comp, cand_kv, cand_s, pos + 1 - m, inv_freq, eps, st.entries.dtype)
    emit = (slot == m - 1).unsqueeze(-1)
    idx = pos // m
    st.entries[batch_index, idx] = torch.where(emit, entry, st.entries[batch_index, idx])
    if comp.overlap:
        e3 = emit.unsqueeze(-1)
        st.prev_kv.copy_(torch.where(e3, st.pending_kv[:, :, :c], st.prev_kv))
        st.prev_score.copy_(torch.where(e3, st.pending_score[:, :, :c], st.prev_score))


def lightning_indexer_scores(qi, keys, w):
    """I[b,t,s] = sum_h w[b,t,h] * ReLU(qi[b,t,h] . keys[b,s]).  qi [B,T,Hi,Di], keys [B,S,Di], w [B,T,Hi]."""
    B, T, Hi, Di = qi.shape
    dots = torch.relu(torch.bmm(qi.reshape(B, T * Hi, Di), keys.transpose(1, 2))).view(B, T, Hi, -1)
    return torch.matmul(w.unsqueeze(2).to(dots.dtype), dots).squeeze(2)


def lightning_indexer_topk(scores, visible, topk):
    """Top-min(topk, visible) entries per query, ties towards the lower entry index.
    scores [B, T, S]; visible [B, T] (entries 0..visible-1 are causal). Returns
    (indices [B, T, K], valid [B, T, K]) with K = min(topk, S)."""
    S = scores.shape[-1]
    K = min(topk, S)
    ar = torch.arange(S, device=scores.device)
    masked = scores.masked_fill(ar >= visible.unsqueeze(-1), -math.inf)
    # A stable descending sort keeps equal scores in index order.
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices[..., :K]
    valid = torch.arange(K, device=scores.device) < visible.unsqueeze(-1)
    return order, valid


# ----------------------------------------------------------------------------
# MoE (§2.6)

_GROUPED_MM = {}  # (device, dtype) -> the grouped GEMM function that passed the probe, or None


def _grouped_mm_fn(device, dtype):
    """F.grouped_mm (torch >= 2.10) or torch._grouped_mm: one fused CUTLASS grouped GEMM
    with device-side group offsets (bf16 on sm90/sm100; no host sync, graph-capturable),
    probed once against the per-expert loop. None where neither works."""
    key = (str(device), dtype)
    if key in _GROUPED_MM:
        return _GROUPED_MM[key]
    fn = None
    if (torch.device(device).type == "cuda" and dtype == torch.bfloat16
            and torch.cuda.get_device_capability(device)[0] in (9, 10)):
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(40, 64, device=device, dtype=dtype, generator=g)
        W = torch.randn(4, 32, 64, device=device, dtype=dtype, generator=g)
        counts = torch.tensor([7, 0, 21, 12], device=device)
        ref = _expert_matmul_loop(x, W, counts).float()
        for cand in (getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)):
            if cand is None:
                continue
            try:
                y = cand(x, W.transpose(1, 2), offs=counts.cumsum(0).to(torch.int32))
                if bool(torch.allclose(y.float(), ref, atol=1e-1, rtol=2e-2)):
                    fn = cand
                    break
            except (RuntimeError, TypeError, ValueError):
                continue
    _GROUPED_MM[key] = fn
    return fn


def grouped_mm_available(device, dtype):
    return _grouped_mm_fn(device, dtype) is not None


def _expert_matmul_loop(x, W, counts):
    out = torch.empty(x.shape[0], W.shape[1], dtype=x.dtype, device=x.device)
    start = 0
    for e, n in enumerate(counts.tolist()):  # host sync: not capturable
        if n:
            out[start:start + n] = F.linear(x[start:start + n], W[e])
        start += n
    return out


def expert_matmul(x, W, counts):
    """Rows of x grouped by expert (counts [E] rows each, in order) times W[e]^T: [rows, out]."""
    fn = _grouped_mm_fn(x.device, x.dtype)
    if fn is not None:
        return fn(x, W.transpose(1, 2), offs=counts.cumsum(0).to(torch.int32))
    return _expert_matmul_loop(x, W, counts)


def swiglu(h, limit, weight=None):
    """h [N, 2I] = (gate | up) -> silu(min(gate, limit)) * clamp(up, ±limit) (* weight), fp32."""
    g, u = h.float().chunk(2, dim=-1)
    if limit > 0:
        g = g.clamp(max=limit)
        u = u.clamp(-limit, limit)
    a = F.silu(g) * u
    return a if weight is None else a * weight.unsqueeze(-1)


def route_tokens(cfg, moe: Moe, x, tokens):
    """sqrt-softplus scores; selection by biased top-k (ties to the lower expert) or
    tid2eid; weights = unbiased scores of the chosen experts, normalised, * route scale."""
    s = torch.sqrt(F.softplus(F.linear(x.float(), moe.gate)))
    if moe.hash_routed:
        idx = moe.tid2eid[tokens]
    else:
        idx = torch.sort(s + moe.bias, dim=-1, descending=True, stable=True).indices[:, :cfg.experts_per_token]
    w = s.gather(1, idx)
    w = w / (w.sum(-1, keepdim=True) + 1e-20) * cfg.routed_scaling_factor
    return idx, w


def moe_forward(cfg, moe: Moe, x, tokens=None, routes=None):
    """x [N, d] -> [N, d]: routed experts (rows sorted by expert, grouped GEMMs) + shared expert."""
    N, d = x.shape
    K, E = cfg.experts_per_token, cfg.n_routed_experts
    idx, w = route_tokens(cfg, moe, x, tokens)
    if routes is not None:
        routes.append(idx)
    flat = idx.reshape(-1)
    order = torch.sort(flat, stable=True).indices  # (row, slot) pairs grouped by expert
    counts = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    xs = x.index_select(0, order // K)
    act = swiglu(expert_matmul(xs, moe.w13, counts), cfg.swiglu_limit, w.reshape(-1)[order]).to(x.dtype)
    y = expert_matmul(act, moe.w2, counts)
    out = torch.empty_like(y).index_copy_(0, order, y).view(N, K, d).float().sum(1)  # slot order
    if moe.shared_w13 is not None:
        hs = swiglu(F.linear(x, moe.shared_w13), cfg.swiglu_limit).to(x.dtype)
        out = out + F.linear(hs, moe.shared_w2).float()
    return out.to(x.dtype)


# ----------------------------------------------------------------------------
# Attention: full forward (fresh sequences) and one-token decode


def _queries_and_window_keys(cfg, a: Attention, x, positions, inv_freq):
    """x [B, T, d] -> qr [B,T,d_c], q [B,T,H,D] (normed per head, RoPE'd), kv [B,T,D]."""
    B, T, _ = x.shape
    eps = cfg.rms_norm_eps
    qr = rms_norm(F.linear(x, a.wq_a), a.q_norm, eps)
    q = rms_norm(F.linear(qr, a.wq_b).view(B, T, cfg.num_heads, cfg.head_dim), None, eps)
    q = apply_rope(q, positions.unsqueeze(-1), inv_freq)
    kv = apply_rope(rms_norm(F.linear(x, a.wkv), a.kv_norm, eps), positions, inv_freq)
    return qr, q, kv


def _indexer_queries(cfg, a: Attention, x, qr, positions, inv_freq):
    B, T, _ = x.shape
    qi = F.linear(qr, a.indexer.wq_b).view(B, T, cfg.index_n_heads, cfg.index_head_dim)
    qi = apply_rope(qi, positions.unsqueeze(-1), inv_freq)
    w = F.linear(x, a.indexer.weights_proj) * (cfg.index_n_heads ** -0.5 * cfg.index_head_dim ** -0.5)
    return qi, w


def attention_forward(cfg, a: Attention, x, inv_freq, compress_freq, ls: Optional[LayerState] = None):
    """Attention block over fresh sequences x [B, T, d] (positions 0..T-1) -> [B, T, d].
    With `ls`, the state the T tokens leave is written into it (a prefill)."""
    B, T, _ = x.shape
    dev, eps = x.device, cfg.rms_norm_eps
    positions = torch.arange(T, device=dev)
    t = positions.view(1, T, 1)
    qr, q, kv = _queries_and_window_keys(cfg, a, x, positions.view(1, T).expand(B, T), inv_freq)
    win = cfg.sliding_window
    s = positions.view(1, 1, T)
    blocks = [(kv, (s <= t) & (s > t - win))]
    if a.kind != SLIDING:
        comp = a.compressor
        m = comp.ratio
        ckv = F.linear(x, comp.wkv).float()
        entries, score_ape = compress_sequence(comp, ckv, F.linear(x, comp.wgate).float(), compress_freq, eps, x.dtype)
        n = entries.shape[1]
        if ls is not None:
            compressor_state_from_sequence(comp, ls.kv, ckv, score_ape, entries)
        visible = ((positions + 1) // m).view(1, T).expand(B, T)
        if n > 0 and a.kind == HCA:
            blocks.append((entries, torch.arange(n, device=dev).view(1, 1, n) < visible.unsqueeze(-1)))
        if a.kind == CSA:
            ic = a.indexer.compressor
            ikv = F.linear(x, ic.wkv).float()
            ikeys, iscore_ape = compress_sequence(ic, ikv, F.linear(x, ic.wgate).float(), compress_freq, eps, x.dtype)
            if ls is not None:
                compressor_state_from_sequence(ic, ls.index, ikv, iscore_ape, ikeys)
            if n > 0:
                qi, w = _indexer_queries(cfg, a, x, qr, positions.view(1, T).expand(B, T), compress_freq)
                scores = lightning_indexer_scores(qi, ikeys, w)
                sel, valid = lightning_indexer_topk(scores, visible, cfg.index_topk)
                keys = entries[torch.arange(B, device=dev).view(B, 1, 1), sel]  # [B, T, K, D]
                blocks.append((keys, valid))
    o = attention_with_sink(q, blocks, a.sinks, cfg.head_dim ** -0.5)
    o = apply_rope(o, positions.view(1, T, 1), inv_freq, sign=-1.0)  # inverse RoPE at -t
    if ls is not None:
        tail = positions[max(0, T - win):]
        ls.window[:, tail % win] = kv[:, tail]
    return grouped_output_projection(cfg, a, o.reshape(B * T, cfg.num_heads, cfg.head_dim)).view(B, T, -1)


def attention_decode(cfg, a: Attention, x, ls: LayerState, pos, batch_index, inv_freq, compress_freq):
    """One token per sequence: x [B, d] at positions pos [B] -> [B, d]; updates ls in place.

    Order within the step (§3): window key into the ring, compressors (an entry
    completed at pos is visible to pos), indexer top-k, one attention softmax."""
    B = x.shape[0]
    eps = cfg.rms_norm_eps
    x3, p2 = x.unsqueeze(1), pos.unsqueeze(1)
    qr, q, kv = _queries_and_window_keys(cfg, a, x3, p2, inv_freq)
    win = cfg.sliding_window
    ls.window[batch_index, pos % win] = kv[:, 0]
    ring = torch.arange(win, device=x.device)
    blocks = [(ls.window, (ring.view(1, win) <= pos.view(B, 1)).unsqueeze(1))]  # slot s holds a position iff s <= pos
    if a.kind != SLIDING:
        comp = a.compressor
        compressor_step(comp, ls.kv, F.linear(x, comp.wkv).float(), F.linear(x, comp.wgate).float(), pos,
                        batch_index, compress_freq, eps)
        visible = ((pos + 1) // comp.ratio).view(B, 1)
        cap = ls.kv.entries.shape[1]
        if a.kind == HCA:
            blocks.append((ls.kv.entries, (torch.arange(cap, device=x.device).view(1, cap) < visible).unsqueeze(1)))
        else:
            ic = a.indexer.compressor
            compressor_step(ic, ls.index, F.linear(x, ic.wkv).float(), F.linear(x, ic.wgate).float(), pos,
                            batch_index, compress_freq, eps)
            qi, w = _indexer_queries(cfg, a, x3, qr, p2, compress_freq)
            scores = lightning_indexer_scores(qi, ls.index.entries, w)
            sel, valid = lightning_indexer_topk(scores, visible, cfg.index_topk)
            keys = ls.kv.entries[batch_index.view(B, 1, 1), sel]  # [B, 1, K, D]
            blocks.append((keys, valid))
    o = attention_with_sink(q, blocks, a.sinks, cfg.head_dim ** -0.5)
    o = apply_rope(o, p2.unsqueeze(-1), inv_freq, sign=-1.0)
    return grouped_output_projection(cfg, a, o.reshape(B, cfg.num_heads, cfg.head_dim))


# ----------------------------------------------------------------------------
# The model


def _layer_freqs(model, l):
    return model.inv_freq[0 if model.cfg.attention[l] == SLIDING else 1], model.inv_freq[1]


def forward(model: Model, tokens, capacity=None, hidden=None):
    """Full forward of fresh sequences tokens [B, T] -> logits [B, T, V] (fp32).
    With capacity (>= T), also returns the DecodeState the tokens leave (a prefill).
    hidden: a list that receives the mHC streams [B, T, hc, d] after each layer."""
    cfg = model.cfg
    B, T = tokens.shape
    state = new_state(cfg, B, capacity, model.dtype, tokens.device) if capacity is not None else None
    X = model.embed[tokens].unsqueeze(2).expand(B, T, cfg.hc_mult, cfg.hidden_size).reshape(B * T, cfg.hc_mult, -1)
    flat_tokens = tokens.reshape(-1)
    for l, L in enumerate(model.layers):
        freq, cfreq = _layer_freqs(model, l)
        u, post, comb = hc_pre(cfg, L.attn_hc, X)
        xn = rms_norm(u, L.attn_norm, cfg.rms_norm_eps).view(B, T, -1)
        Fa = attention_forward(cfg, L.attn, xn, freq, cfreq, state.layers[l] if state is not None else None)
        X = hc_post(Fa.reshape(B * T, -1), post, comb, X)
        u, post, comb = hc_pre(cfg, L.ffn_hc, X)
        X = hc_post(moe_forward(cfg, L.moe, rms_norm(u, L.ffn_norm, cfg.rms_norm_eps), flat_tokens), post, comb, X)
        if hidden is not None:
            hidden.append(X.view(B, T, cfg.hc_mult, -1))
    logits = lm_head(model, X).view(B, T, -1)
    if state is not None:
        state.pos.fill_(T)
        return logits, state
    return logits


def lm_head(model: Model, X):
    y = rms_norm(hc_head_collapse(model.cfg, model.hc_head, X), model.norm, model.cfg.rms_norm_eps)
    return F.linear(y, model.head).float()


def decode_layers(model: Model, X, state: DecodeState, tokens=None, routes=None):
    """The layer stack for one new token per sequence: streams X [B, hc, d] -> [B, hc, d].
    Advances state.pos by one (in place, like every state update: CUDA-graph safe).
    tokens [B] are needed by hash-routed layers only; routes receives each layer's experts."""
    cfg = model.cfg
    pos, bi = state.pos, state.batch_index
    for l, L in enumerate(model.layers):
        freq, cfreq = _layer_freqs(model, l)
        u, post, comb = hc_pre(cfg, L.attn_hc, X)
        Fa = attention_decode(cfg, L.attn, rms_norm(u, L.attn_norm, cfg.rms_norm_eps), state.layers[l], pos, bi,
                              freq, cfreq)
        X = hc_post(Fa, post, comb, X)
        u, post, comb = hc_pre(cfg, L.ffn_hc, X)
        X = hc_post(moe_forward(cfg, L.moe, rms_norm(u, L.ffn_norm, cfg.rms_norm_eps), tokens, routes), post, comb, X)
    state.pos.add_(1)
    return X


def decode_step(model: Model, tokens, state: DecodeState):
    """tokens [B] (one per sequence, at positions state.pos) -> logits [B, V] (fp32)."""
    cfg = model.cfg
    X = model.embed[tokens].unsqueeze(1).expand(-1, cfg.hc_mult, -1).contiguous()
    return lm_head(model, decode_layers(model, X, state, tokens))


# ----------------------------------------------------------------------------
# Benchmark: random V4-Flash-shaped layers, random state, timed decode steps


def random_model(cfg, dtype, device, seed=0):
    """Random weights for cfg's layers on `device` (no embeddings / LM head). Scales keep
    activations O(1); experts are dense `dtype` values (what an engine without MXFP4
    kernels holds)."""
    g = torch.Generator(device=device).manual_seed(seed)
    d, D, H, hc = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.hc_mult
    E, I = cfg.n_routed_experts, cfg.moe_intermediate

    def w(out, inn, dt=dtype, *lead):  # in-place scaling: no second copy of a 8.6 GB expert tensor
        return torch.randn(*lead, out, inn, generator=g, device=device, dtype=dt).mul_(inn ** -0.5)

    def vec(n, mean=0.0, std=1.0):
        return torch.randn(n, generator=g, device=device, dtype=torch.float32) * std + mean

    def hyper():
        mix = (2 + hc) * hc
        return HyperConnection(fn=w(mix, hc * d, torch.float32), base=vec(mix, std=0.5), scale=vec(3, 0.5, 0.1).abs())

    def compressor(m, c, overlap):
        cw = (2 if overlap else 1) * c
        return Compressor(ratio=m, dim=c, overlap=overlap, wkv=w(cw, d), wgate=w(cw, d),
                          ape=vec(m * cw, std=0.1).view(m, cw), norm=vec(c, 1.0, 0.1))

    layers = []
    for l in range(cfg.num_layers):
        kind = cfg.attention[l]
        attn = Attention(kind=kind, wq_a=w(cfg.q_lora_rank, d), q_norm=vec(cfg.q_lora_rank, 1.0, 0.1),
                         wq_b=w(H * D, cfg.q_lora_rank), wkv=w(D, d), kv_norm=vec(D, 1.0, 0.1),
                         wo_a=w(cfg.o_groups * cfg.o_lora_rank, H * D // cfg.o_groups),
                         wo_b=w(d, cfg.o_groups * cfg.o_lora_rank), sinks=vec(H))
        if kind != SLIDING:
            attn.compressor = compressor(cfg.compress_ratio[l], D, kind == CSA)
        if kind == CSA:
            attn.indexer = Indexer(wq_b=w(cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank),
                                   weights_proj=w(cfg.index_n_heads, d),
                                   compressor=compressor(cfg.compress_ratio[l], cfg.index_head_dim, True))
        moe = Moe(hash_routed=False, gate=w(E, d, torch.float32), bias=vec(E, std=0.1), tid2eid=None,
                  w13=w(2 * I, d, dtype, E), w2=w(d, I, dtype, E),
                  shared_w13=w(2 * I, d) if cfg.n_shared_experts else None,
                  shared_w2=w(d, I) if cfg.n_shared_experts else None)
        layers.append(Layer(attn_hc=hyper(), ffn_hc=hyper(), attn_norm=vec(d, 1.0, 0.1), ffn_norm=vec(d, 1.0, 0.1),
                            attn=attn, moe=moe))
    inv_freq = [rope_inverse_frequencies(cfg.main_rope, cfg.rope_dim).to(device),
                rope_inverse_frequencies(cfg.compress_rope, cfg.rope_dim).to(device)]
    return Model(cfg=cfg, dtype=dtype, layers=layers, inv_freq=inv_freq)


def fill_random_state(cfg, state: DecodeState, context, seed=1):
    """Random state as if `context` tokens had been processed: full window ring,
    context//m entries (and indexer keys) of unit RMS, open-window rows, CSA prev rows."""
    g = torch.Generator(device=state.pos.device).manual_seed(seed)

    def rnd(t, std=1.0):
        t.copy_(torch.randn(t.shape, generator=g, device=t.device, dtype=torch.float32) * std)

    state.pos.fill_(context)
    for l, ls in enumerate(state.layers):
        rnd(ls.window)
        for cs in (ls.kv, ls.index):
            if cs is None:
                continue
            m = cfg.compress_ratio[l]
            cs.entries.zero_()
            rnd(cs.entries[:, :context // m])
            rnd(cs.pending_kv)
            rnd(cs.pending_score)
            if cs.prev_kv is not None:
                rnd(cs.prev_kv)
                rnd(cs.prev_score)


def weight_bytes_estimate(cfg, dtype):
    """Bytes random_model() allocates for cfg (matrices in dtype, small parameters f32)."""
    elt = torch.empty((), dtype=dtype).element_size()
    d, D, H, E, I = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.n_routed_experts, cfg.moe_intermediate
    total = 0
    for l in range(cfg.num_layers):
        mats = (cfg.q_lora_rank * d + H * D * cfg.q_lora_rank + D * d + 2 * H * D * cfg.o_lora_rank
                + 3 * (E + cfg.n_shared_experts) * I * d)
        if cfg.attention[l] != SLIDING:
            mats += 2 * (2 if cfg.attention[l] == CSA else 1) * D * d
        if cfg.attention[l] == CSA:
            mats += cfg.index_n_heads * (cfg.index_head_dim * cfg.q_lora_rank + d) + 4 * cfg.index_head_dim * d
        small = 2 * (2 + cfg.hc_mult) * cfg.hc_mult * cfg.hc_mult * d + E * d + 4 * d + cfg.q_lora_rank + D
        total += mats * elt + small * 4
    return total


def layer_weight_bytes(L: Layer, experts_touched):
    """Bytes of one layer's weights a decode step reads: every dense weight plus the
    routed experts it touched."""
    def nb(t):
        return 0 if t is None else t.numel() * t.element_size()
    a, m = L.attn, L.moe
    dense = sum(nb(t) for t in (a.wq_a, a.q_norm, a.wq_b, a.wkv, a.kv_norm, a.wo_a, a.wo_b, a.sinks,
                                L.attn_norm, L.ffn_norm, m.gate, m.bias, m.shared_w13, m.shared_w2))
    dense += sum(nb(t) for h in (L.attn_hc, L.ffn_hc) for t in (h.fn, h.base, h.scale))
    comps = [c for c in (a.compressor, a.indexer.compressor if a.indexer else None) if c is not None]
    dense += sum(nb(t) for c in comps for t in (c.wkv, c.wgate, c.ape, c.norm))
    if a.indexer is not None:
        dense += nb(a.indexer.wq_b) + nb(a.indexer.weights_proj)
    per_expert = (nb(m.w13) + nb(m.w2)) // m.w13.shape[0]
    return dense + experts_touched * per_expert


def decode_workspace_bytes(cfg, batch, capacity, dtype):
    """A generous estimate of one decode step's transient tensors (the largest layer's)."""
    elt = torch.empty((), dtype=dtype).element_size()
    n_idx = -(-capacity // 4)
    n_hca = -(-capacity // 128)
    keys = cfg.sliding_window + max(cfg.index_topk, n_hca)
    nk = batch * cfg.experts_per_token
    return int(2 * (batch * cfg.index_n_heads * n_idx * elt * 2 + batch * n_idx * (4 + 8 + 8 + elt))
               + batch * cfg.num_heads * keys * 4 * 4
               + batch * cfg.index_topk * cfg.head_dim * elt * 2
               + nk * 2 * cfg.moe_intermediate * (elt + 4 * 3) + nk * cfg.hidden_size * (elt * 3 + 4)
               + batch * cfg.hc_mult * cfg.hidden_size * 4 * 6
               + batch * cfg.num_heads * cfg.head_dim * 4 * 4)


def _median(xs):
    s = sorted(xs)
    k = len(s) // 2
    return s[k] if len(s) % 2 else 0.5 * (s[k - 1] + s[k])


def bench_one(model, batch, context, iters, warmup, use_graph, device):
    """Times decode_layers() at (batch, context). Returns the JSON record (or a skip record)."""
    cfg = model.cfg
    steps = warmup + iters + 2
    capacity = context + steps
    sbytes = state_bytes(cfg, batch, capacity, model.dtype)
    wsbytes = decode_workspace_bytes(cfg, batch, capacity, model.dtype) * (2 if use_graph else 1)
    rec = {"impl": "torch", "layers": cfg.num_layers, "batch": batch, "context": context, "graph": use_graph,
           "state_bytes": sbytes}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(device)
        print(f"# batch {batch} context {context}: state {sbytes / 2**30:.2f} GiB + workspace ~{wsbytes / 2**30:.2f} GiB,"
              f" free {free / 2**30:.2f} GiB", file=sys.stderr, flush=True)
        if sbytes + wsbytes > free - (1 << 30):
            rec.update(skipped=True, reason=f"needs ~{(sbytes + wsbytes) / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
            return rec
    oom = getattr(torch.cuda, "OutOfMemoryError", RuntimeError)
    state = graph = None
    try:
        state = new_state(cfg, batch, capacity, model.dtype, device)
        fill_random_state(cfg, state, context)
        g = torch.Generator(device=device).manual_seed(2)
        X = torch.randn(batch, cfg.hc_mult, cfg.hidden_size, generator=g, device=device, dtype=torch.float32)
        X = X.to(model.dtype)
        routes = []
        with torch.no_grad():
            out = decode_layers(model, X, state, routes=routes)  # untimed: routing statistics, first-call setup
            finite = bool(torch.isfinite(out.float()).all())
            touched = [int(torch.unique(r).numel()) for r in routes]
            sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
            if use_graph:
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    decode_layers(model, X, state)
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    decode_layers(model, X, state)
                run = graph.replay
            else:
                run = lambda: decode_layers(model, X, state)
            for _ in range(warmup):
                run()
            sync()
            times = []
            for _ in range(iters):
                if device.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    run()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end))
                else:
                    t0 = time.perf_counter()
                    run()
                    times.append((time.perf_counter() - t0) * 1e3)
        ms = _median(times)
        wbytes = sum(layer_weight_bytes(L, t) for L, t in zip(model.layers, touched))
        rec.update(ms_per_step=round(ms, 4), ms_per_layer=round(ms / cfg.num_layers, 4),
                   tokens_per_s=round(batch / (ms / 1e3), 1), weight_bytes_per_step=wbytes,
                   experts_touched=touched, finite=finite, final_position=int(state.pos[0]))
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one; a failed capture is another
        first = (str(e).splitlines() or [""])[0][:200]
        if isinstance(e, oom) or "out of memory" in str(e):
            rec.update(skipped=True, reason=f"out of memory: {first}")
        else:
            rec.update(skipped=True, reason=f"error: {type(e).__name__}: {first}")
    finally:
        state = graph = run = None  # drop the state and the graph's memory pool before the next configuration
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rec


def bench_main(argv):
    ap = argparse.ArgumentParser(prog="torch_v4.py bench", description=(
        "Times one decode step (one new token per sequence) of a stack of V4-Flash-shaped layers "
        "(CSA m=4 / HCA m'=128 alternating, starting with CSA) in PyTorch: the [B, hc, d] stream "
        "tensor in, streams out; no embeddings or LM head. Random bf16 weights (dense bf16 experts) "
        "and random per-sequence state as if `context` tokens had been processed. Every step "
        "computes both compressors' candidate entries and commits them where a window completes, "
        "so each timed step costs what an emitting step costs. One JSON line per configuration."))
    ap.add_argument("--layers", type=int, default=4, help="layers in the stack (default 4: ~53 GB of bf16 weights)")
    ap.add_argument("--batch", default="1,8,64,256", help="comma-separated batch sizes")
    ap.add_argument("--context", default="4096,65536", help="comma-separated context lengths (tokens already processed)")
    ap.add_argument("--iters", type=int, default=20, help="timed steps; the median is reported (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (default 3)")
    ap.add_argument("--cuda-graph", action="store_true", help="capture one decode step in a CUDA graph and replay it")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--shape", default="flash", choices=["flash", "tiny"], help="tiny: small shapes for a smoke test")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cfg = flash_config(args.layers) if args.shape == "flash" else tiny_config(args.layers)
    if args.cuda_graph and device.type != "cuda":
        ap.error("--cuda-graph needs a CUDA device")
    if args.cuda_graph and not grouped_mm_available(device, dtype):
        ap.error("--cuda-graph needs torch._grouped_mm for the experts (bf16 on sm90/sm100); "
                 "the per-expert loop reads expert counts on the host")
    est = weight_bytes_estimate(cfg, dtype)
    print(f"# {args.shape} shapes, {cfg.num_layers} layers ({','.join(cfg.attention)}), {args.dtype}: "
          f"weights {est / 1e9:.1f} GB", file=sys.stderr, flush=True)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if est > free - (4 << 30):
            ap.error(f"{cfg.num_layers} layers need {est / 1e9:.1f} GB of weights, {free / 1e9:.1f} GB free "
                     f"(keeping 4 GiB for state): use fewer --layers")
    torch.manual_seed(0)
    with torch.no_grad():
        model = random_model(cfg, dtype, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        print(f"# weights allocated: {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB; grouped_mm experts: "
              f"{grouped_mm_available(device, dtype)}", file=sys.stderr, flush=True)
    for context in [int(c) for c in args.context.split(",")]:
        for batch in [int(b) for b in args.batch.split(",")]:
            print(json.dumps(bench_one(model, batch, context, args.iters, args.warmup, args.cuda_graph, device)),
                  flush=True)


def main(argv):
    if len(argv) >= 1 and argv[0] == "bench":
        return bench_main(argv[1:])
    print(__doc__)
    print("usage: torch_v4.py bench [--help]    (the correctness check is torch_v4_check.py)")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]) or 0)
