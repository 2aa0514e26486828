"""The Llama 3.x and Gemma 2 decoders, in one file, loaded from the Hub's safetensors.

One module serves both families: Gemma 2 differs from Llama in a handful of switches on the Config (embedding
scale, norm offset, sandwich norms, soft-caps, query scale, sliding-window layers, GELU). Parameter names are
Hugging Face's (model.layers.0.self_attn.q_proj.weight, ...), so checkpoints load with no renaming and, because
we use rotate-half RoPE like transformers, no permutation.

FLARE hooks in at one place: q_proj and v_proj may receive the English "source" representation of their layer
(see flare.py). A plain model ignores it.
"""
import functools
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

ALIASES = {
    "llama3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama3.1-70b": "meta-llama/Llama-3.1-70B",
    "llama3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama3.2-3b": "meta-llama/Llama-3.2-3B",
    "gemma2-2b": "google/gemma-2-2b",
    "gemma2-9b": "google/gemma-2-9b",
    "gemma2-27b": "google/gemma-2-27b",
}
ARCHITECTURES = ("llama", "gemma2")  # config.json model_type values we implement


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
    rope_theta: float
    rope_scaling: dict | None     # Llama 3.1: {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
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

    @classmethod
    def from_hf(cls, hf: dict) -> "Config":
        """Reads a Hub config.json, in either shape: rope_theta + rope_scaling (the Hub's) or rope_parameters (transformers 5)."""
        kind = hf.get("model_type")
        if kind not in ARCHITECTURES:
            raise ValueError(f"model_type {kind!r} is not supported; flare implements {', '.join(ARCHITECTURES)} "
                             f"(Llama 3.x and Gemma 2). Pick one of: {', '.join(ALIASES)}.")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope type {rope_type!r} is not supported (only 'default' and 'llama3').")
        heads = hf["num_attention_heads"]
        common = dict(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=hf.get("num_key_value_heads", heads),
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, rms_norm_eps=hf["rms_norm_eps"],
            rope_theta=theta, rope_scaling=rope if rope_type == "llama3" else None,
        )
        if kind == "llama":
            if hf.get("attention_bias") or hf.get("mlp_bias"):
                raise ValueError("Llama checkpoints with attention_bias or mlp_bias are not supported (Llama 3.x has none).")
            return cls(**common, tie_word_embeddings=hf.get("tie_word_embeddings", False))
        layers = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                           for i in range(hf["num_hidden_layers"])]
        return cls(**common, tie_word_embeddings=hf.get("tie_word_embeddings", True), embed_scale=True,
                   norm_offset=True, sandwich_norms=True, gelu=True, query_scale=hf["query_pre_attn_scalar"] ** -0.5,
                   attn_softcap=hf.get("attn_logit_softcapping"), final_softcap=hf.get("final_logit_softcapping"),
                   sliding_window=hf.get("sliding_window"),
                   sliding_layers=tuple(i for i, t in enumerate(layers) if t == "sliding_attention"))


class RMSNorm(nn.Module):
    def __init__(self, dim, eps, offset):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma: (1 + w), multiplied in fp32, then cast
            return (y * (1.0 + self.weight.float())).type_as(x)
        return self.weight * y.type_as(x)  # Llama: cast back first, then the weight


def rope_frequencies(config: Config) -> torch.Tensor:
    """Inverse frequencies of rotate-half RoPE, with Llama 3.1's rescaling of the low frequencies if configured."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if config.rope_scaling is None:
        return inv_freq
    s = config.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)  # long wavelengths: divide by factor
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)  # in between: interpolate
    return torch.where(medium, smoothed, scaled)


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

    def forward(self, x, cos, sin, mask, cache=None, source=None):
        B, T, _ = x.shape
        q = call_fused(self.q_proj, x, source).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)                         # (B, nkv, T, hd)
        v = call_fused(self.v_proj, x, source).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
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
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)

    def forward(self, input_ids, attention_mask=None, source=None, cache=None, checkpoint=False, layer_inputs=None,
                logits_at=None):
        """Logits (B, T, vocab) in fp32, or (B, K, vocab) at the positions logits_at asks for.

        attention_mask: (B, S) with 1 for real tokens and 0 for (left) padding; S = T, or with a cache, every
            position so far including these T. Positions count real tokens only, as in transformers.
        source: FLARE's English representations, one (B, P, hidden) tensor per layer over the source prompt.
            Target position i is fused with source position i, and positions past P with the last one (P - 1).
            q_proj and v_proj receive (source rows for these positions, mask of the real target positions).
        checkpoint: recompute each layer in the backward pass (activation checkpointing); the source goes in as
            an argument, so it is fused in the recomputation too.
        layer_inputs: "normed" or "residual": return each layer's input (after or before input_layernorm)
            instead of logits; this is the source pass (flare.source_representations).
        logits_at: (B, K) positions (of these T) whose logits are wanted, gathered from the last hidden state
            before the final norm and lm_head; None: every position. The lm_head and the fp32 logits cost B x T x
            vocab, while training reads only the few positions whose next token is labelled and greedy decoding
            only the last.
        """
        c, (B, T) = self.config, input_ids.shape
        start = cache.length if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, start + T, dtype=torch.long, device=input_ids.device)
        real = attention_mask.bool()
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]  # (B, T)
        freqs = pos[..., None].float() * self.inv_freq  # (B, T, hd/2), fp32 as in transformers
        emb = torch.cat((freqs, freqs), -1)[:, None]     # (B, 1, T, hd)
        h = self.model.embed_tokens(input_ids)
        if c.embed_scale:
            h = h * torch.tensor(c.hidden_size ** 0.5, dtype=h.dtype)  # the constant rounded to the activation dtype
        dtype = compute_dtype(h)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        if uses_flex(h.device, c, cache):
            causal, window = block_masks(real, c.sliding_window)
        else:  # boolean masks (B, 1, T, S)
            q_idx = torch.arange(start, start + T, device=h.device)[:, None]
            k_idx = torch.arange(start + T, device=h.device)[None, :]
            causal = visible(q_idx, k_idx, real[:, None, None, :])
            window = visible(q_idx, k_idx, real[:, None, None, :], c.sliding_window)
        if source is not None:  # source rows of these positions; past the prompt only its last (flare.LoRA repeats it)
            rows = slice(min(start, source[0].shape[1] - 1), start + T)
        reps = []
        for i, layer in enumerate(self.model.layers):
            if layer_inputs is not None:
                reps.append(layer.input_layernorm(h) if layer_inputs == "normed" else h)
            mask = window if i in c.sliding_layers else causal
            src = None if source is None else (source[i][:, rows], real[:, start:])
            if checkpoint and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, mask, cache, src, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, cache, src)
        if cache is not None:
            cache.length += T
        if layer_inputs is not None:
            return reps
        if logits_at is not None:
            h = h.gather(1, logits_at[..., None].expand(-1, -1, h.shape[-1]))  # (B, K, hidden)
        h = self.model.norm(h)
        logits = (self.lm_head(h) if self.lm_head is not None else h @ self.model.embed_tokens.weight.T).float()
        if c.final_softcap:
            logits = torch.tanh(logits / c.final_softcap) * c.final_softcap
        return logits

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, max_new_tokens, eos_id, source=None, use_cache=True):
        """Greedy decoding of a left-padded batch. Returns the new tokens (B, <= max_new_tokens); a sequence that
        has produced EOS is continued with EOS. use_cache=False recomputes the whole sequence at every step, which
        FLARE's position-mixing fusions need (they mix over all earlier positions, which a cache does not keep)."""
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
            if done.all():
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            tokens = next_token[:, None] if use_cache else torch.cat([tokens, next_token[:, None]], 1)
        return torch.stack(out, 1)


# ---------------------------------------------------------------------------------------------- loading

def resolve(name_or_path: str) -> str:
    """A local folder as it is; an alias or Hub repo id downloaded (config, tokenizer, safetensors only)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    repo = ALIASES.get(name_or_path, name_or_path)
    if "/" not in repo:
        raise ValueError(f"unknown model {name_or_path!r}: use one of {', '.join(ALIASES)}, a Hub repo id "
                         f"(owner/name) or a local folder with config.json and *.safetensors.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    try:
        return snapshot_download(repo, allow_patterns=["config.json", "generation_config.json", "tokenizer.json",
                                                       "tokenizer_config.json", "special_tokens_map.json",
                                                       "*.safetensors", "model.safetensors.index.json"],
                                 ignore_patterns=["original/*"])
    except GatedRepoError as e:
        raise PermissionError(f"{repo} is gated: accept its licence on https://huggingface.co/{repo} and log in with "
                              f"a token that has access (`hf auth login` or HF_TOKEN=...).") from e
    except RepositoryNotFoundError as e:
        raise ValueError(f"{repo} was not found on the Hub (or is private): check the name, or pass one of "
                         f"{', '.join(ALIASES)} or a local folder.") from e


def checkpoint_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted({os.path.join(folder, name) for name in json.load(f)["weight_map"].values()})
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}: flare reads safetensors only (convert .bin "
                                f"checkpoints with transformers' save_pretrained(safe_serialization=True)).")
    return files


def load_model(name_or_path: str, dtype=torch.bfloat16, device="cpu") -> Transformer:
    """The model of an alias, Hub repo id or local folder, weights streamed tensor by tensor into place, so the
    weights are never held twice. Every tensor of the checkpoint is checked against the config by name and shape."""
    folder = resolve(name_or_path)
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{folder} has no config.json: point to a Hugging Face model folder "
                                f"(config.json, tokenizer.json, *.safetensors).")
    with open(config_path) as f:
        config = Config.from_hf(json.load(f))
    files = checkpoint_files(folder)
    with torch.device("meta"):
        model = Transformer(config).to(dtype)  # the dtype is set on meta tensors: nothing allocated, nothing converted
    model = model.to_empty(device=device)  # uninitialised: every value comes from the checkpoint
    model.inv_freq = rope_frequencies(config).to(device)  # a computed buffer, not in the checkpoint, kept in fp32
    params = dict(model.named_parameters())
    missing, unexpected = set(params), []
    for path in files:
        with safe_open(path, framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        for name, shape in shapes.items():
            if name not in params:
                # Tied checkpoints may still carry lm_head.weight, older ones the RoPE buffer: both are derived.
                if not (name == "lm_head.weight" and config.tie_word_embeddings or name.endswith("rotary_emb.inv_freq")):
                    unexpected.append(name)
                continue
            if shape != tuple(params[name].shape):
                raise ValueError(f"{name} in {path} has shape {shape}, but config.json implies "
                                 f"{tuple(params[name].shape)}: the checkpoint does not match its config.")
            # The file is opened per tensor: safe_open memory-maps it, and the pages read stay resident until it is
            # closed, which would hold a second copy of a one-file checkpoint next to the weights.
            with torch.no_grad(), safe_open(path, framework="pt") as f:
                params[name].copy_(f.get_tensor(name))
            missing.discard(name)
    if unexpected or missing:
        raise ValueError(f"checkpoint {folder} does not match the {config_path} architecture: "
                         f"missing tensors {sorted(missing)[:10]}, unexpected tensors {sorted(unexpected)[:10]}"
                         f" ({len(missing)} missing, {len(unexpected)} unexpected in all).")
    return model.eval().requires_grad_(False)


class Tokenizer:
    """tokenizer.json through the tokenizers library; encode(text) starts with BOS exactly once."""

    def __init__(self, folder: str):
        from tokenizers import Tokenizer as HFTokenizer
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{folder} has no tokenizer.json (flare reads the fast-tokenizer file only).")
        self.tok = HFTokenizer.from_file(path)
        special = {}
        for name in ("tokenizer_config.json", "config.json"):
            if os.path.exists(os.path.join(folder, name)):
                with open(os.path.join(folder, name)) as f:
                    special = {**json.load(f), **special}
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
            raise ValueError(f"no {kind} token in tokenizer_config.json or config.json")
        return value

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if bos else ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(name_or_path: str) -> Tokenizer:
    return Tokenizer(resolve(name_or_path))
