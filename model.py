"""The Llama 3.x, Gemma 2 and Gemma 3 (text) decoders, in one file, loaded from the Hub's safetensors.

One module serves the three families: Gemma 2 differs from Llama in a handful of switches on the Config (embedding
scale, norm offset, sandwich norms, soft-caps, query scale, sliding-window layers, GELU), and Gemma 3 from Gemma 2
in three more (q_norm/k_norm, a second RoPE table for the sliding layers, linear RoPE scaling), with no attention
soft-cap. Parameter names are Hugging Face's (model.layers.0.self_attn.q_proj.weight, ...), so checkpoints load with
no renaming and, because we use rotate-half RoPE like transformers, no permutation; Gemma 3's multimodal checkpoints
(4B, 12B, 27B) nest the same names under a prefix, which loading strips, and their vision tower is skipped.

FLARE hooks in at one place: q_proj and v_proj may receive the English "source" representation of their layer
(see flare.py). A plain model ignores it.
"""
import functools
import json
import math
import os
import re
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch.distributed.tensor import DTensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention


class UsageError(ValueError):
    """The user's input is at fault (a flag, a path, a file's contents): the message names it and says what to do.
    train.py ends with the message alone, without a traceback (internal errors keep theirs)."""


class MissingFile(UsageError, FileNotFoundError):
    """A UsageError about a file or folder that is not there."""


class NoAccess(UsageError, PermissionError):
    """A UsageError about a file the user may not read (a gated Hub repo)."""


def read_json(path, remedy):
    """The JSON object in path; a file cut short or not JSON is an error naming it, with remedy (what to do)."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON ({e}): the file is damaged or was cut short; {remedy}.") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path} holds a JSON {type(obj).__name__}, not an object; {remedy}.")
    return obj


ALIASES = {
    "llama3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama3.1-70b": "meta-llama/Llama-3.1-70B",
    "llama3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama3.2-3b": "meta-llama/Llama-3.2-3B",
    "gemma2-2b": "google/gemma-2-2b",
    "gemma2-9b": "google/gemma-2-9b",
    "gemma2-27b": "google/gemma-2-27b",
    "gemma3-270m": "google/gemma-3-270m",
    "gemma3-1b": "google/gemma-3-1b-pt",
    "gemma3-4b": "google/gemma-3-4b-pt",
    "gemma3-12b": "google/gemma-3-12b-pt",
    "gemma3-27b": "google/gemma-3-27b-pt",
}
# config.json model_type values we implement; "gemma3" is the multimodal checkpoint, of which we use the text decoder
ARCHITECTURES = ("llama", "gemma2", "gemma3_text", "gemma3")
# transformers' Gemma3TextConfig defaults (those we read): a Gemma 3 config.json, and above all the sparse text_config
# of the multimodal ones, leaves out every field that has its default value.
GEMMA3_TEXT_DEFAULTS = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6, tie_word_embeddings=True, query_pre_attn_scalar=256,
    sliding_window=4096, sliding_window_pattern=6, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
    final_logit_softcapping=None, use_bidirectional_attention=False,
)
# Where the multimodal Gemma 3 checkpoints keep the text decoder (the Hub's prefix; some fine-tunes' prefix), and the
# tensor families of theirs that flare does not use.
TEXT_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                 "language_model.lm_head.": "lm_head."}
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


@dataclass
class Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int             # < num_heads: grouped-query attention
    head_dim: int                 # Gemma 2: head_dim * num_heads != hidden_size
    rms_norm_eps: float
    rope_theta: float             # of the full-attention layers (all layers but Gemma 3's sliding ones)
    rope_scaling: dict | None     # Llama 3.1: {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
                                  # "original_max_position_embeddings"}; Gemma 3 4B+: {"rope_type": "linear", "factor"}
    tie_word_embeddings: bool
    # Gemma 2's differences from Llama, off for Llama:
    embed_scale: bool = False     # embeddings times sqrt(hidden_size)
    norm_offset: bool = False     # RMSNorm multiplies by (1 + w) instead of w
    sandwich_norms: bool = False  # extra norms after attention and around the MLP
    gelu: bool = False            # GeGLU with tanh-GELU instead of SwiGLU
    query_scale: float | None = None      # attention scale; None: head_dim ** -0.5
    attn_softcap: float | None = None     # tanh soft-cap of attention logits
    final_softcap: float | None = None    # tanh soft-cap of output logits
    sliding_window: int | None = None
    sliding_layers: tuple = ()    # indices of layers with sliding-window attention
    # Gemma 3's differences from Gemma 2, off for the others:
    qk_norm: bool = False         # q_norm and k_norm: each head of q and k normalised before RoPE
    sliding_rope_theta: float | None = None  # the sliding layers' own RoPE table (rope_local_base_freq), unscaled

    @classmethod
    def from_hf(cls, hf: dict) -> "Config":
        """Reads a Hub config.json, in either shape: rope_theta + rope_scaling (the Hub's) or rope_parameters
        (transformers 5; Gemma 3's holds one entry per layer type). Of a multimodal Gemma 3, its text_config."""
        kind = hf.get("model_type")
        if kind not in ARCHITECTURES:
            raise UsageError(f"model_type {kind!r} is not supported; flare implements {', '.join(ARCHITECTURES)} "
                             f"(Llama 3.x, Gemma 2, Gemma 3). Pick one of: {', '.join(ALIASES)}.")
        if kind == "gemma3":  # the text decoder of the multimodal checkpoint
            hf, kind = hf.get("text_config") or {}, "gemma3_text"
        if kind == "gemma3_text":
            hf = {**GEMMA3_TEXT_DEFAULTS, **hf}
            if hf["use_bidirectional_attention"]:
                raise UsageError("use_bidirectional_attention is set: that is EmbeddingGemma, an encoder, and flare "
                                 "needs a causal decoder (use a Gemma 3 language model such as gemma3-270m).")
        rope = hf.get("rope_parameters") or {}
        if kind == "gemma3_text" and "full_attention" in rope:  # transformers 5: one RoPE per layer type
            rope, sliding_rope = rope["full_attention"], rope["sliding_attention"]
        else:  # the Hub's: rope_theta and rope_scaling for the full layers, rope_local_base_freq for the sliding ones
            rope = {"rope_theta": hf.get("rope_theta", 10000.0), **(rope or hf.get("rope_scaling") or {})}
            sliding_rope = {"rope_theta": hf.get("rope_local_base_freq")}
        theta, rope_scaling = parse_rope(rope)
        heads = hf["num_attention_heads"]
        common = dict(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=hf.get("num_key_value_heads", heads),
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, rms_norm_eps=hf["rms_norm_eps"],
            rope_theta=theta, rope_scaling=rope_scaling,
        )
        if kind == "llama":
            if hf.get("attention_bias") or hf.get("mlp_bias"):
                raise UsageError("Llama checkpoints with attention_bias or mlp_bias are not supported "
                                 "(Llama 3.x has none).")
            return cls(**common, tie_word_embeddings=hf.get("tie_word_embeddings", False))
        gemma2 = kind == "gemma2"
        # Gemma 2 alternates sliding and full layers; Gemma 3 has one full layer in every sliding_window_pattern.
        full = (lambda i: i % 2 == 1) if gemma2 else (lambda i: (i + 1) % hf["sliding_window_pattern"] == 0)
        layers = hf.get("layer_types") or ["full_attention" if full(i) else "sliding_attention"
                                           for i in range(hf["num_hidden_layers"])]
        if not gemma2:
            sliding_theta, sliding_scaling = parse_rope(sliding_rope)
            if sliding_scaling is not None:
                raise UsageError(f"Gemma 3's sliding layers take unscaled RoPE, but config.json scales them with "
                                 f"{sliding_scaling}: the checkpoint is not a Gemma 3 flare implements.")
        return cls(**common, tie_word_embeddings=hf.get("tie_word_embeddings", True), embed_scale=True,
                   norm_offset=True, sandwich_norms=True, gelu=True, query_scale=hf["query_pre_attn_scalar"] ** -0.5,
                   # Gemma 3 has no attention soft-cap, whatever its config says (transformers ignores the value too)
                   attn_softcap=hf.get("attn_logit_softcapping") if gemma2 else None,
                   final_softcap=hf.get("final_logit_softcapping"), sliding_window=hf.get("sliding_window"),
                   sliding_layers=tuple(i for i, t in enumerate(layers) if t == "sliding_attention"),
                   qk_norm=not gemma2, sliding_rope_theta=None if gemma2 else sliding_theta)


def parse_rope(rope: dict) -> tuple[float, dict | None]:
    """(theta, scaling) of one config.json RoPE entry; scaling None for plain RoPE."""
    rope = dict(rope)
    theta = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))  # "type": older config.json files
    if rope_type not in ("default", "linear", "llama3"):
        raise UsageError(f"rope type {rope_type!r} is not supported (only 'default', 'linear' and 'llama3').")
    return theta, None if rope_type == "default" else {"rope_type": rope_type, **rope}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps, offset):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()  # one fp32 copy for backward to keep (two casts kept two: +4.3 GB, Llama 3.1 8B at 32 x 131)
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma: (1 + w), multiplied in fp32, then cast
            return (y * (1.0 + self.weight.float())).type_as(x)
        return self.weight * y.type_as(x)  # Llama: cast back first, then the weight


def rope_frequencies(config: Config, sliding: bool = False) -> torch.Tensor:
    """Inverse frequencies of rotate-half RoPE, scaled if configured (linearly, or Llama 3.1's rescaling of the low
    frequencies); sliding=True: those of Gemma 3's sliding layers, from their own theta and never scaled."""
    d, theta = config.head_dim, config.sliding_rope_theta if sliding else config.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = None if sliding else config.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":  # positions divided by factor, which is the same as the frequencies
        return inv_freq / s["factor"]
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)  # long wavelengths: divide by factor
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)  # in between: interpolate
    return torch.where(medium, smoothed, scaled)


def rope_table(pos, inv_freq, dtype):
    """cos and sin (B, 1, T, hd) of positions pos (B, T), computed in fp32 as in transformers, cast to dtype."""
    freqs = pos[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), -1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def compute_dtype(x: torch.Tensor):
    """The dtype activations are computed in: autocast's where it is on, else x's own."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def call_fused(linear, x, source):
    """q_proj and v_proj take the FLARE source representation when there is one (flare.FusedLoRA)."""
    return linear(x) if source is None else linear(x, source)


class KVCache:
    """Preallocated keys and values of every layer for incremental decoding."""

    def __init__(self, config: Config, batch: int, max_len: int, dtype, device):
        shape = (batch, config.num_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.length = 0  # positions filled so far (advanced by Transformer.forward)

    def update(self, layer, k, v):
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def visible(q, k, real_k, window=None):
    """Which keys k each query q attends to: earlier or itself, not padding, and on sliding layers fewer than
    `window` positions back. Every query sees itself, so rows of padding stay finite."""
    seen = (k <= q) & real_k | (k == q)
    return seen & (k > q - window) if window else seen


def uses_flex(device, config: Config, cache) -> bool:
    """Gemma's attention on CUDA runs through flex_attention: the soft-cap a score_mod, causal + window + padding
    a block mask, all in one compiled kernel that keeps no (B, nh, T, T) scores for the backward pass, as the
    eager math below does in every layer. The eager math stays the path on CPU (flex_attention has no CPU
    backward) and in decoding with the KV cache (one query per step: small scores)."""
    return device.type == "cuda" and cache is None and (config.attn_softcap is not None or bool(config.sliding_window))


def block_masks(real, window):
    """flex_attention's block masks of visible() over a (B, T) padding mask: for global and for sliding layers."""
    B, T = real.shape
    block = lambda w: create_block_mask(lambda b, h, q, k: visible(q, k, real[b, k], w), B, None, T, T,
                                        device=real.device)
    full = block(None)
    return full, block(window) if window else full


@functools.cache
def compiled_flex_attention():
    return torch.compile(flex_attention)  # compiled once, on first use: importing model.py stays cheap


def flex(q, k, v, softcap, block_mask, scale):
    """flex_attention, with Gemma 2's tanh soft-cap of the scaled scores. Compiled on CUDA; elsewhere torch's
    unfused version, forward only, which the tests compare with the eager math."""
    cap = None if softcap is None else lambda score, b, h, i, j: torch.tanh(score / softcap) * softcap
    attend = compiled_flex_attention() if q.device.type == "cuda" else flex_attention
    return attend(q, k, v, score_mod=cap, block_mask=block_mask, scale=scale, enable_gqa=True)


class Attention(nn.Module):
    def __init__(self, config: Config, layer: int):
        super().__init__()
        c, self.layer = config, layer
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        self.n_heads, self.n_kv, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.scale = c.query_scale or c.head_dim ** -0.5
        self.softcap = c.attn_softcap
        self.qk_norm = c.qk_norm
        if self.qk_norm:  # Gemma 3: an RMSNorm over head_dim, shared by the heads
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, c.norm_offset)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, c.norm_offset)

    def forward(self, x, cos, sin, mask, cache=None, source=None):
        B, T, _ = x.shape
        # q (B, nh, T, hd); k and v (B, nkv, T, hd)
        q = call_fused(self.q_proj, x, source).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = call_fused(self.v_proj, x, source).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, S, hd), S = positions so far
        if isinstance(mask, BlockMask):  # uses_flex: capped, masked and fused on CUDA
            y = flex(q, k, v, self.softcap, mask, self.scale)
        elif self.softcap is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)
        else:  # Gemma 2 caps the scores before the mask and softmax, which SDPA cannot do
            k, v = k.repeat_interleave(self.n_heads // self.n_kv, 1), v.repeat_interleave(self.n_heads // self.n_kv, 1)
            scores = torch.tanh(q @ k.transpose(-2, -1) * self.scale / self.softcap) * self.softcap
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            y = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = (lambda g: F.gelu(g, approximate="tanh")) if config.gelu else F.silu

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: Config, layer: int):
        super().__init__()
        norm = lambda: RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_offset)
        self.self_attn, self.mlp = Attention(config, layer), MLP(config)
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.sandwich = config.sandwich_norms
        if self.sandwich:  # Gemma 2: post_attention_layernorm normalises the attention output, these wrap the MLP
            self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def forward(self, h, cos, sin, mask, cache=None, source=None):
        a = self.self_attn(self.input_layernorm(h), cos, sin, mask, cache, source)
        if not self.sandwich:  # Llama: post_attention_layernorm is the norm in front of the MLP
            h = h + a
            return h + self.mlp(self.post_attention_layernorm(h))
        h = h + self.post_attention_layernorm(a)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Decoder(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_offset)


class Transformer(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = (None if config.tie_word_embeddings
                        else nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        self.fill_rope()

    def fill_rope(self, device=None):
        """The RoPE frequency tables: buffers computed from the config, never loaded, and kept in fp32 whatever the
        weights' dtype, so filled again after .to(dtype) and after building on the meta device."""
        self.register_buffer("inv_freq", rope_frequencies(self.config).to(device), persistent=False)
        if self.config.sliding_rope_theta:  # Gemma 3: the sliding layers' table
            sliding = rope_frequencies(self.config, sliding=True).to(device)
            self.register_buffer("sliding_inv_freq", sliding, persistent=False)

    def forward(self, input_ids, attention_mask=None, source=None, cache=None, checkpoint=False, logits_at=None):
        """Logits (B, T, vocab) in fp32, or (B, K, vocab) at the positions logits_at asks for.

        attention_mask, source, cache: as attention_inputs takes them.
        checkpoint: recompute each layer in the backward pass (activation checkpointing); the source goes in as
            an argument, so it is fused in the recomputation too.
        logits_at: (B, K) positions (of these T) whose logits are wanted, gathered from the last hidden state
            before the final norm and lm_head; None: every position. The lm_head and the fp32 logits cost B x T x
            vocab, while training reads only the few positions whose next token is labelled and greedy decoding
            only the last.
        """
        c = self.config
        h = self.embed(input_ids)
        per_layer = self.attention_inputs(h, attention_mask, cache, source)
        for layer, (cos, sin, mask, src) in zip(self.model.layers, per_layer):
            if checkpoint and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, mask, cache, src, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, cache, src)
        if cache is not None:
            cache.length += input_ids.shape[1]
        if logits_at is not None:
            h = h.gather(1, logits_at[..., None].expand(-1, -1, h.shape[-1]))  # (B, K, hidden)
        h = self.model.norm(h)
        logits = (self.lm_head(h) if self.lm_head is not None else h @ self.model.embed_tokens.weight.T).float()
        if c.final_softcap:
            logits = torch.tanh(logits / c.final_softcap) * c.final_softcap
        return logits

    def layer_inputs(self, input_ids, attention_mask=None, kind="normed"):
        """FLARE's source pass (flare.source_representations): each layer's input, (B, T, hidden) per layer, after
        its input_layernorm ("normed", what its q_proj and v_proj see) or before ("residual", the residual stream
        entering it). It runs the layers only up to the last one's input: not the last layer, the final norm or the
        lm_head. attention_mask: as attention_inputs takes it."""
        if kind not in ("normed", "residual"):
            raise ValueError(f"unknown source representation {kind!r}; choose 'normed' or 'residual'")
        h = self.embed(input_ids)
        per_layer = self.attention_inputs(h, attention_mask)
        reps = []
        for i, (layer, (cos, sin, mask, _)) in enumerate(zip(self.model.layers, per_layer)):
            reps.append(layer.input_layernorm(h) if kind == "normed" else h)
            if i < self.config.num_layers - 1:  # the last layer's output: nothing here reads it
                h = layer(h, cos, sin, mask)
        return reps

    def embed(self, input_ids):
        """The residual stream entering the first layer, (B, T, hidden)."""
        h = self.model.embed_tokens(input_ids)
        if self.config.embed_scale:  # the constant rounded to the activation dtype
            h = h * torch.tensor(self.config.hidden_size ** 0.5, dtype=h.dtype)
        return h

    def attention_inputs(self, h, attention_mask=None, cache=None, source=None):
        """What each layer takes besides the hidden states h (B, T, hidden), built once for all layers: a list of
        (cos, sin, mask, source) per layer, with the RoPE table and the mask of its kind (sliding or full). The
        masks are boolean (B, 1, T, S), or flex_attention block masks where uses_flex.

        attention_mask: (B, S) with 1 for real tokens and 0 for (left) padding; S = T, or with a cache, every
            position so far including these T. Positions count real tokens only, as in transformers.
        cache: the KVCache of the positions before these T (incremental decoding), or None.
        source: FLARE's English representations, one (B, P, hidden) tensor per layer over the source prompt.
            Target position i is fused with source position i, and positions past P with the last one (P - 1).
            q_proj and v_proj receive (source rows for these positions, mask of the real target positions).
        """
        c, (B, T) = self.config, h.shape[:2]
        start = cache.length if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, start + T, dtype=torch.long, device=h.device)
        real = attention_mask.bool()
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]  # (B, T)
        dtype = compute_dtype(h)
        full_rope = rope_table(pos, self.inv_freq, dtype)
        sliding_rope = rope_table(pos, self.sliding_inv_freq, dtype) if c.sliding_rope_theta else full_rope
        if uses_flex(h.device, c, cache):
            causal, window = block_masks(real, c.sliding_window)
        else:  # boolean masks (B, 1, T, S)
            q_idx = torch.arange(start, start + T, device=h.device)[:, None]
            k_idx = torch.arange(start + T, device=h.device)[None, :]
            causal = visible(q_idx, k_idx, real[:, None, None, :])
            window = visible(q_idx, k_idx, real[:, None, None, :], c.sliding_window)
        if source is not None:  # source rows of these positions; past the prompt only its last (flare.LoRA repeats it)
            rows = slice(min(start, source[0].shape[1] - 1), start + T)
        per_layer = []
        for i in range(c.num_layers):
            src = None if source is None else (source[i][:, rows], real[:, start:])
            per_layer.append((*sliding_rope, window, src) if i in c.sliding_layers else (*full_rope, causal, src))
        return per_layer

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, max_new_tokens, eos_id, source=None, use_cache=True,
                 all_done=torch.all):
        """Greedy decoding of a left-padded batch. Returns the new tokens (B, <= max_new_tokens); a sequence that
        has produced EOS is continued with EOS. use_cache=False recomputes the whole sequence at every step, which
        FLARE's position-mixing fusions need (they mix over all earlier positions, which a cache does not keep).
        all_done(done) says when to stop early: train.py's asks every process (under FSDP each step's forward
        gathers weights from all of them, so they stop together)."""
        B, P = input_ids.shape
        dtype = compute_dtype(self.model.embed_tokens.weight)
        cache = KVCache(self.config, B, P + max_new_tokens, dtype, input_ids.device) if use_cache else None
        eos = torch.tensor(eos_id, device=input_ids.device).flatten()
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        tokens, mask, out = input_ids, attention_mask, []
        for _ in range(max_new_tokens):
            last = torch.full((B, 1), tokens.shape[1] - 1, device=tokens.device)
            next_token = self(tokens, mask, source=source, cache=cache, logits_at=last)[:, 0].argmax(-1)
            next_token = torch.where(done, eos[0], next_token)
            out.append(next_token)
            done |= torch.isin(next_token, eos)
            if all_done(done):
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            tokens = next_token[:, None] if use_cache else torch.cat([tokens, next_token[:, None]], 1)
        return torch.stack(out, 1)


# ---------------------------------------------------------------------------------------------- loading

HUB_ID = re.compile(r"\w[\w.-]*/[\w.-]*\w")  # owner/name, as the Hub spells repo ids


def resolve(name_or_path: str) -> str:
    """A local folder as it is; an alias or Hub repo id downloaded (config, tokenizer, safetensors only)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path):
        raise UsageError(f"model {name_or_path} is a file: a local model is a folder with config.json, "
                         f"tokenizer.json and *.safetensors.")
    repo = ALIASES.get(name_or_path, name_or_path)
    if not HUB_ID.fullmatch(repo):
        if any(c in name_or_path for c in "/\\") or name_or_path.startswith((".", "~")):  # meant as a path
            raise MissingFile(f"the model folder {name_or_path} does not exist: check the path (a local model is a "
                              f"folder with config.json, tokenizer.json and *.safetensors).")
        raise UsageError(f"unknown model {name_or_path!r}: it is neither a local folder, nor a known alias "
                         f"({', '.join(ALIASES)}), nor a Hub repo id (owner/name).")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    try:
        return snapshot_download(repo, allow_patterns=["config.json", "generation_config.json", "tokenizer.json",
                                                       "tokenizer_config.json", "special_tokens_map.json",
                                                       "*.safetensors", "model.safetensors.index.json"],
                                 ignore_patterns=["original/*"])
    except GatedRepoError as e:
        raise NoAccess(f"{repo} is gated: accept its licence on https://huggingface.co/{repo} and log in with "
                       f"a token that has access (`hf auth login` or HF_TOKEN=...).") from e
    except RepositoryNotFoundError as e:
        raise UsageError(f"{repo} was not found on the Hub (or is private): check the name, or pass one of "
                         f"{', '.join(ALIASES)} or a local folder.") from e
    except LocalEntryNotFoundError as e:  # offline, and not in the Hub cache either
        raise MissingFile(f"{name_or_path} is no local folder, and {repo} could not be downloaded from the Hub nor "
                          f"found in its local cache: connect to the internet (or log in), or pass a local "
                          f"folder.") from e


def checkpoint_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json(index, "download the model again").get("weight_map")
        if not isinstance(weight_map, dict):
            raise UsageError(f"{index} has no weight_map: the file is incomplete; download the model again.")
        return sorted({os.path.join(folder, name) for name in weight_map.values()})
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise MissingFile(f"no *.safetensors in {folder}: flare reads safetensors only (convert .bin "
                          f"checkpoints with transformers' save_pretrained(safe_serialization=True)).")
    return files


def load_model(name_or_path: str, dtype=torch.bfloat16, device="cpu", shard=None) -> Transformer:
    """The model of an alias, Hub repo id or local folder, weights streamed tensor by tensor into place, so the
    weights are never held twice. Every tensor of the checkpoint is checked against the config by name and shape.
    shard: a function that shards the model in place (train.shard_per_layer, FSDP2), applied before any weight is
    read: each process then reads only its rows of each tensor."""
    folder = resolve(name_or_path)
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise MissingFile(f"{folder} has no config.json: point to a Hugging Face model folder "
                          f"(config.json, tokenizer.json, *.safetensors).")
    hf_config = read_json(config_path, "download the model again")
    try:
        config = Config.from_hf(hf_config)
    except KeyError as e:
        raise UsageError(f"{config_path} has no field {e.args[0]!r}, which a {hf_config.get('model_type')} config "
                         f"needs: the file is incomplete; download the model again.") from None
    multimodal = hf_config.get("model_type") == "gemma3"
    files = checkpoint_files(folder)
    with torch.device("meta"):
        model = Transformer(config).to(dtype)  # the dtype is set on meta tensors: nothing allocated, nothing converted
    if shard is not None:
        shard(model)
    model = model.to_empty(device=device)  # uninitialised: every value comes from the checkpoint
    model.fill_rope(device)
    params = dict(model.named_parameters())
    missing, unexpected, skipped = set(params), [], {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        except (SafetensorError, OSError) as e:
            raise UsageError(f"{path} is not a readable safetensors file ({e}): it is damaged or was cut short; "
                             f"delete it and download (or convert) the model again.") from None
        for stored, shape in shapes.items():
            name = stored
            if multimodal:
                vision = next((p for p in VISION_PREFIXES if stored.startswith(p)), None)
                if vision is not None:
                    skipped[vision] = skipped.get(vision, 0) + 1
                    continue
                text = next((p for p in TEXT_PREFIXES if stored.startswith(p)), None)
                name = stored if text is None else TEXT_PREFIXES[text] + stored[len(text):]
            if name not in params:
                # Tied checkpoints may still carry lm_head.weight, older ones the RoPE buffer: both are derived.
                tied_head = name == "lm_head.weight" and config.tie_word_embeddings
                if not (tied_head or name.endswith("rotary_emb.inv_freq")):
                    unexpected.append(stored)
                continue
            if shape != tuple(params[name].shape):
                raise UsageError(f"{stored} in {path} has shape {shape}, but config.json implies "
                                 f"{tuple(params[name].shape)}: the checkpoint does not match its config.")
            # The file is opened per tensor: safe_open memory-maps it, and the pages read stay resident until it is
            # closed, which would hold a second copy of a one-file checkpoint next to the weights. The weights are
            # copied, not left in the file's pages as transformers leaves them: mapped, they lie off 64-byte
            # boundaries, and a run resumed in another process then ended with another adapter.
            with torch.no_grad(), safe_open(path, framework="pt") as f:
                copy_rows(params[name], f.get_slice(stored))
            missing.discard(name)
    if unexpected or missing:
        raise UsageError(f"checkpoint {folder} does not match the {config_path} architecture: "
                         f"missing tensors {sorted(missing)[:10]}, unexpected tensors {sorted(unexpected)[:10]}"
                         f" ({len(missing)} missing, {len(unexpected)} unexpected in all).")
    if skipped:
        print(f"{folder}: a multimodal Gemma 3, of which flare uses the text decoder; skipped " +
              ", ".join(f"{prefix}* ({n} tensors)" for prefix, n in sorted(skipped.items())), file=sys.stderr)
    return model.eval().requires_grad_(False)


def whole(state):
    """A tensor, or a (nested) dict of them, with FSDP2's shards (DTensors) gathered whole, as one process holds it:
    then every process must call it."""
    if isinstance(state, dict):
        return {k: whole(v) for k, v in state.items()}
    return state.full_tensor() if isinstance(state, DTensor) else state


def copy_rows(param, stored):
    """Fills a parameter from a safetensors slice or a tensor: all of it, or of a parameter sharded by FSDP2 (a
    DTensor split by rows over the processes, as torch.chunk splits them) only this process's rows."""
    if isinstance(param, DTensor):
        local = param.to_local()
        start = param.device_mesh.get_local_rank() * math.ceil(param.shape[0] / param.device_mesh.size())
        if local.shape[0]:  # the last processes hold no rows of a tensor shorter than their number
            local.copy_(stored[start:start + local.shape[0]])
    else:
        param.copy_(stored[:])


class Tokenizer:
    """tokenizer.json through the tokenizers library; encode(text) starts with BOS exactly once."""

    def __init__(self, folder: str):
        from tokenizers import Tokenizer as HFTokenizer
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.exists(path):
            raise MissingFile(f"{folder} has no tokenizer.json (flare reads the fast-tokenizer file only).")
        try:
            self.tok = HFTokenizer.from_file(path)
        except Exception as e:  # the tokenizers library raises a bare Exception for a file it cannot parse
            raise UsageError(f"{path} is not a readable tokenizer ({e}): it is damaged or was cut short; "
                             f"download the model again.") from None
        special = {}
        for name in ("tokenizer_config.json", "config.json"):
            if os.path.exists(os.path.join(folder, name)):
                special = {**read_json(os.path.join(folder, name), "download the model again"), **special}
        self.bos_id = self._id(special, "bos")
        self.eos_id = self._id(special, "eos")
        pad = self._id(special, "pad", required=False)
        self.pad_id = pad if pad is not None else self.eos_id  # Llama 3 has no pad token; pads are masked anyway

    def _id(self, special, kind, required=True):
        token = special.get(f"{kind}_token")
        if isinstance(token, dict):  # older tokenizer_config.json: {"content": "<s>", ...}
            token = token["content"]
        if token is not None:
            return self.tok.token_to_id(token)
        value = special.get(f"{kind}_token_id")
        if isinstance(value, list):
            value = value[0]
        if value is None and required:
            raise UsageError(f"no {kind} token in tokenizer_config.json or config.json")
        return value

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if bos else ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(name_or_path: str) -> Tokenizer:
    return Tokenizer(resolve(name_or_path))
