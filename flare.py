"""LoRA with FLARE's language fusion.

A LoRA linear keeps its base frozen and adds a low-rank update:

    plain LoRA:  y = W x_t + s * B (A x_t)
    FLARE:       y = W x_t + s * B phi(A x_s, A x_t)        s = alpha / r

x_t is the layer's own (target-language) input, x_s the English source representation of the same layer
(source_representations below). The same A projects both, so A learns from both branches; phi mixes them in
the r-dimensional bottleneck. Without a source the adapter is plain LoRA.

The adapters of the pipeline stack: the stage-1 task adapter wraps the base linear, the stage-2 FLARE adapter
wraps the stage-1 adapter. The stage-1 adapter stays frozen and on; the source pass switches only FLARE off.
"""
import contextlib
import json
import math
import os
import pathlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model import MissingFile, UsageError, compute_dtype, copy_rows, read_json, whole

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED = ("q_proj", "v_proj")  # the paper fuses in the query and value adapters only


# ------------------------------------------------------------------------------------------ fusion functions
# phi(S, T, allowed): S = A x_s and T = A x_t, both (B, L, r). allowed (B, L, L) says which target positions j
# position i may read. The paper writes S T^T T over the whole sequence; in a decoder that would let each position
# see later tokens (the answer, in training), so the position-mixing fusions read only positions j <= i that
# are not padding.

def matmul(s, t, allowed):
    return (s @ t.transpose(1, 2)).masked_fill(~allowed, 0.0) @ t


class CrossAttention(nn.Module):
    """Single-head attention in r dimensions: queries from the source, keys and values from the target."""

    def __init__(self, r):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(r, r), nn.Linear(r, r), nn.Linear(r, r)

    def forward(self, s, t, allowed):
        scores = (self.q(s) @ self.k(t).transpose(1, 2)) / math.sqrt(s.shape[-1])
        return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ self.v(t)


FUSIONS = {
    "add": lambda s, t, allowed: s + t,
    "mul": lambda s, t, allowed: s * t,
    "matmul": matmul,
    "add_relu": lambda s, t, allowed: F.relu(s) + F.relu(t),
    "matmul_relu": lambda s, t, allowed: matmul(F.relu(s), F.relu(t), allowed),
    "cross_attention": None,  # a module with parameters, made per layer
}
POSITION_MIXING = ("matmul", "matmul_relu", "cross_attention")  # need every earlier position: no KV cache


# ------------------------------------------------------------------------------------------ the LoRA layer

class LoRA(nn.Module):
    """A frozen base (a linear, or a linear with an adapter already on it) plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, name: str, r: int, alpha: float, dropout: float = 0.0,
                 fusion: str | None = None):
        super().__init__()
        if fusion is not None and fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
        self.base, self.name, self.r, self.alpha, self.fusion = base, name, r, alpha, fusion
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout)
        self.lora_A = nn.Linear(self.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, self.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.cross = CrossAttention(r) if fusion == "cross_attention" else None
        self.enabled, self.merged = True, False

    def forward(self, x, source=None):
        y = self.base(x)
        if not self.enabled or self.merged:
            return y
        # Dropout only while this adapter trains: a frozen stage-1 adapter acts as if merged.
        drop = self.dropout if self.lora_A.weight.requires_grad else nn.Identity()
        t = self.lora_A(drop(x))                                         # (B, L, r)
        # The scale multiplies the r-dim bottleneck, not the d_out-dim output: the same product, far less work.
        if source is None or self.fusion is None:
            return y + self.lora_B(self.scale * t)
        rows, real = source                                              # (B, <=L, d), (B, L)
        s = self.lora_A(drop(rows))
        s = torch.cat([s, s[:, -1:].expand(-1, t.shape[1] - s.shape[1], -1)], 1)  # past the prompt: last position
        allowed = None
        if self.fusion in POSITION_MIXING:  # (B, L, L): earlier real positions, and itself
            L = t.shape[1]
            causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
            allowed = (causal & real[:, None, :].bool()) | torch.eye(L, dtype=torch.bool, device=x.device)
        phi = self.cross if self.cross is not None else FUSIONS[self.fusion]
        return y + self.lora_B(self.scale * phi(s, t, allowed))

    def delta_weight(self):
        return self.scale * self.lora_B.weight @ self.lora_A.weight     # (out, in)

    def innermost(self) -> nn.Linear:
        return self.base.innermost() if isinstance(self.base, LoRA) else self.base


# ------------------------------------------------------------------------------------------ adapters on a model

def add_lora(model, name, r=8, alpha=16, dropout=0.0, fusion=None, targets=LINEARS):
    """Wraps every target linear of every decoder layer in a new adapter called `name`, with fusion (if any) in
    q_proj and v_proj; then only this adapter trains: base weights, embeddings, lm_head and earlier adapters freeze."""
    unknown = set(targets) - set(LINEARS)
    if unknown:
        raise ValueError(f"unknown target modules {sorted(unknown)}; choose from {', '.join(LINEARS)}")
    model.requires_grad_(False)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for attr in targets:
                if hasattr(parent, attr):
                    lora = LoRA(getattr(parent, attr), name, r, alpha, dropout, fusion if attr in FUSED else None)
                    setattr(parent, attr, lora.to(lora.innermost().weight.device))
    for p in adapter_parameters(model, name):
        p.requires_grad_(True)
    return model


def adapters(model, name):
    """(path of the wrapped linear, adapter) for every adapter called name."""
    found = []
    for path, m in model.named_modules():
        if isinstance(m, LoRA) and m.name == name:
            found.append((path.replace(".base", ""), m))
    if not found:
        raise ValueError(f"the model has no adapter {name!r}")
    return found


def adapter_parameters(model, name):
    return [p for _, m in adapters(model, name) for n, p in m.named_parameters() if not n.startswith("base.")]


def remove(model, name):
    """Takes adapter `name` off the model again, leaving whatever it wrapped."""
    for path, m in adapters(model, name):
        if m.merged:
            raise ValueError(f"{path}: unmerge adapter {name!r} before removing it")
        parent, attr = path.rsplit(".", 1)
        outer = model.get_submodule(parent)
        while getattr(outer, attr) is not m:  # m may sit under a later adapter: walk down the stack
            outer, attr = getattr(outer, attr), "base"
        setattr(outer, attr, m.base)


@contextlib.contextmanager
def disabled(model, name):
    """Switches adapter `name` off for the duration (the FLARE source pass)."""
    mods = [m for _, m in adapters(model, name)]
    for m in mods:
        m.enabled = False
    try:
        yield
    finally:
        for m in mods:
            m.enabled = True


@torch.no_grad()
def source_representations(model, source_ids, source_mask, kind="normed"):
    """The English pass: the same model with the FLARE adapter off (the stage-1 adapter stays on), no gradient.
    The FLARE adapter is any adapter with a fusion, whatever its name. For each layer, what that layer's q_proj
    and v_proj see ("normed": input_layernorm(h)), or the residual stream entering it ("residual", what the
    public reference code feeds). Padded positions are zeroed."""
    fused = {m.name for m in model.modules() if isinstance(m, LoRA) and m.fusion is not None}
    with contextlib.ExitStack() as stack:
        for name in fused:
            stack.enter_context(disabled(model, name))
        reps = model.layer_inputs(source_ids, source_mask, kind)
    # Stored in the dtype the adapters compute in (bf16 under autocast): held once, not once more as autocast's copy.
    keep = source_mask[..., None].to(reps[0].dtype)
    return [(r * keep).to(compute_dtype(r)) for r in reps]


def merge(model, name):
    """Adds s * B A of a plain adapter into the base weight (and stops applying it separately)."""
    for path, m in adapters(model, name):
        if m.fusion is not None:
            raise ValueError(f"{path}: a FLARE adapter's update depends on the source; only plain LoRA merges")
        if not m.merged:
            m.innermost().weight.data += m.delta_weight().to(m.innermost().weight.dtype)
            m.merged = True


def unmerge(model, name):
    for _, m in adapters(model, name):
        if m.merged:
            m.innermost().weight.data -= m.delta_weight().to(m.innermost().weight.dtype)
            m.merged = False


# ------------------------------------------------------------------------------------------ saving

def adapter_config(model, name):
    mods = adapters(model, name)
    first = mods[0][1]
    fusion = next((m.fusion for _, m in mods if m.fusion), None)
    return {"name": name, "r": first.r, "alpha": first.alpha, "dropout": first.dropout.p, "fusion": fusion,
            "targets": sorted({p.rsplit(".", 1)[1] for p, _ in mods}, key=LINEARS.index)}


def adapter_state(model, name):
    """A copy of adapter `name`'s tensors on the CPU, named by the linear they adapt. Tensors sharded by FSDP2
    (DTensors) are gathered whole (model.whole): then every process must call it."""
    return {f"{path}.{n}": whole(p.detach()).to("cpu", copy=True) for path, m in adapters(model, name)
            for n, p in m.named_parameters() if not n.startswith("base.")}


def atomic_write(path, write):
    """write(temporary path), then rename: a crash never leaves a half-written file under path."""
    tmp = f"{path}.tmp"
    write(tmp)
    os.replace(tmp, path)


def write_json(obj, path):
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(obj, indent=2)))


def save_adapter(model, name, folder, base_model=None, state=None):
    """adapter.safetensors and adapter.json (rank, alpha, fusion, targets, base model) in folder, each written
    atomically. state: the adapter's tensors as adapter_state returns them, where they are at hand already."""
    os.makedirs(folder, exist_ok=True)
    state, config = state or adapter_state(model, name), {**adapter_config(model, name), "base_model": base_model}
    atomic_write(os.path.join(folder, "adapter.safetensors"), lambda tmp: save_file(state, tmp))
    write_json(config, os.path.join(folder, "adapter.json"))


ADAPTER_KEYS = ("name", "r", "alpha", "dropout", "fusion", "targets")


def read_adapter_config(folder):
    """adapter.json of a saved adapter; an incomplete or damaged one is an error that names it."""
    path = os.path.join(folder, "adapter.json")
    if not os.path.exists(path):
        raise MissingFile(f"{folder} holds no adapter.json: point to a folder written by save_adapter "
                          f"(<out>/stage1/adapter or <out>/<method>/adapter of a run).")
    cfg = read_json(path, "rerun the stage that wrote it")
    missing = [k for k in ADAPTER_KEYS if k not in cfg]
    if missing:
        raise UsageError(f"{path} has no {', '.join(missing)}: the file is incomplete; rerun the stage that wrote it.")
    return cfg


def load_adapter(model, folder, name=None):
    """Adds the saved adapter to the model (under its saved name, or `name`) and fills it."""
    cfg = read_adapter_config(folder)
    path = os.path.join(folder, "adapter.safetensors")
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as e:
        raise UsageError(f"{path} is not a readable safetensors file ({e}): it is damaged or was cut short; "
                         f"rerun the stage that wrote it.") from None
    name = name or cfg["name"]
    add_lora(model, name, cfg["r"], cfg["alpha"], cfg["dropout"], cfg["fusion"], tuple(cfg["targets"]))
    try:
        set_adapter_state(model, name, state, folder)
    except Exception:
        remove(model, name)  # a file that does not fit leaves the model as it was
        raise
    return cfg


def set_adapter_state(model, name, state, where="the given state"):
    """Copies tensors named as adapter_state names them into adapter `name` (into each process's rows, where FSDP2
    shards it); every name and shape must match."""
    params = {f"{path}.{n}": p for path, m in adapters(model, name) for n, p in m.named_parameters()
              if not n.startswith("base.")}
    if set(state) != set(params):
        raise UsageError(f"{where} does not fit adapter {name!r}: missing {sorted(set(params) - set(state))[:5]}, "
                         f"unexpected {sorted(set(state) - set(params))[:5]}")
    with torch.no_grad():
        for key, value in state.items():
            if value.shape != params[key].shape:
                raise UsageError(f"{key}: saved shape {tuple(value.shape)}, model expects {tuple(params[key].shape)}")
            copy_rows(params[key], value)


def export_peft(model, name, folder, base_model=None):
    """The adapter in PEFT's format (adapter_config.json + adapter_model.safetensors), loadable with
    peft.PeftModel.from_pretrained onto the transformers model. PEFT has no fusion: it runs as plain LoRA."""
    cfg = adapter_config(model, name)
    if cfg["fusion"] == "cross_attention":
        raise ValueError("a cross-attention FLARE adapter has parameters PEFT cannot hold; export add/mul/... ones")
    os.makedirs(folder, exist_ok=True)
    state = {f"base_model.model.{path}.{ab}.weight": getattr(m, ab).weight.detach().cpu().contiguous()
             for path, m in adapters(model, name) for ab in ("lora_A", "lora_B")}
    save_file(state, os.path.join(folder, "adapter_model.safetensors"))
    peft_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
                   "r": cfg["r"], "lora_alpha": cfg["alpha"], "lora_dropout": cfg["dropout"],
                   "target_modules": cfg["targets"], "bias": "none", "fan_in_fan_out": False,
                   "use_rslora": False, "init_lora_weights": True, "inference_mode": True}
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(peft_config, f, indent=2)
