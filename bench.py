"""How flare compares with transformers + peft, and what FLARE costs against its alternatives.

    python bench.py                      # cuda if available, else cpu; writes bench/results-<device>.json
    python bench.py --quick              # small sizes, few repeats: a smoke run

One invocation, one code path for CPU and CUDA, both sides of every ratio in the same run:

  1. LoRA training step (forward, backward, AdamW; r=8 on every linear of every layer): ours (train.py's loss, from
     the labelled answer tokens' logits only) vs transformers + peft as a user runs it (labels in: every position's
     logits), on the same random Llama (transformers with attn_implementation="sdpa").
  2. FLARE step (no-grad English source pass + fused target forward + backward + AdamW) vs our LoRA step; the
     English pass alone against the LoRA step, and the two steps' FLOPs by the cost model (item 8).
  3. Input-fusion step (plain LoRA on English + target, twice as long) vs the FLARE step.
  4. Peak memory of a FLARE step vs a LoRA step.
  5. Loading a sharded bf16 checkpoint of about 1B random parameters, each side in a fresh subprocess.
  6. Batched greedy generation with the KV cache: ours vs transformers' generate.
  7. Classification evaluation: train.evaluate vs transformers + peft scoring each label with its own forward.
  8. The cost model: FLOPs and peak memory of one train.py step at the shapes of Llama 3.1 8B / 70B, Gemma 2 9B
     and Gemma 3 270M, on fake tensors (nothing allocated), checked against a measured step at the small size;
     and per GPU for Llama 3.1 70B under torchrun --fsdp on 8 GPUs (fsdp_per_gpu).
  9. With --device cuda: those steps on random-initialised real-shape models: time, tokens/s, MFU, peak memory.

Times are medians over repeats; the sides of a comparison run interleaved (A B A B ...) after warm-up, so a noisy
machine slows both alike. fp32 on CPU; on CUDA bf16 weights with fp32 adapters under bf16 autocast, on both sides.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import weakref

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.tensor import DTensor
from torch.nn.attention.flex_attention import create_block_mask
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

import data
import flare
import model as flare_model
import synth
import train

# The small random Llama of the training and generation benchmarks (hidden 512, 4 layers, vocab 32k).
SIZES = dict(hidden=512, intermediate=1536, layers=4, heads=8, kv_heads=4, vocab=32000, batch=8, seq=128,
             prompt=64, new_tokens=64, repeats=20, load_repeats=3, eval_items=64)
QUICK = dict(hidden=256, intermediate=768, layers=2, heads=4, kv_heads=2, vocab=8000, batch=2, seq=64,
             prompt=16, new_tokens=8, repeats=3, load_repeats=1, eval_items=8)
# The loading benchmark's checkpoint: Llama 3.2 1B's shape (1.24B parameters, 2.5 GB in bf16), in 4 shards.
LOAD_SHAPE = dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256)
LOAD_QUICK = dict(hidden=512, intermediate=1536, layers=4, heads=8, kv_heads=4, vocab=32000)
RANK, ALPHA, LR = 8, 16, 1e-4
GOALS = {"lora_step": ("<=", 0.75), "flare_step": ("<=", 1.25), "flare_memory": ("<=", 1.10),
         "eval_speed": (">=", 3.0)}
ESTIMATE_GOALS = {("llama3.1-8b", "xnli", "flare", True): 22, ("llama3.1-8b", "xnli", "flare", False): 45,
                  ("gemma2-9b", "tydiqa", "flare", True): 40}  # estimated peak GB at most
MFU_GOAL = 0.40  # the Llama 3.1 8B FLARE step on a GPU, at least


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def llama_config(s, dtype=torch.float32):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                       num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                       max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, dtype=dtype)


def machine_info(device, dtype, threads):
    import peft
    import transformers
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu": cpu, "cpu_count": os.cpu_count(), "threads": threads, "dtype": str(dtype).replace("torch.", ""),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}  # at the end, this run included


def interleaved(steps: dict, repeats: int, warmup: int, device) -> dict:
    """Seconds per call of every step function, run round-robin (A B C A B C ...) after warm-up."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs):
    return statistics.median(xs)


def per_round(a, b):
    """Median of A/B over the rounds of an interleaved run: each round's two times were taken side by side, so
    this stays close when other work on the machine comes and goes (the ratio of medians is the headline)."""
    return median([x / y for x, y in zip(a, b)])


# ---------------------------------------------------------------------------------------------- training steps

ANSWER = 3  # labelled tokens at the end of each training sequence: a label word of two tokens + EOS


def labelled(ids):
    """A data.Batch of ids (no padding) whose last ANSWER tokens are the answer, as data.make_batch lays it out."""
    labels = ids.masked_fill(torch.arange(ids.shape[1], device=ids.device) < ids.shape[1] - ANSWER, -100)
    return data.Batch(ids, torch.ones_like(ids), labels, None, None, ids.shape[1] - ANSWER)


def training_setup(folder, s, device, dtype):
    """Our LoRA model, our FLARE model and transformers + peft, all from the same checkpoint, and their batches."""
    import peft
    from transformers import LlamaForCausalLM
    autocast = lambda: torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

    ours = flare.add_lora(flare_model.load_model(folder, dtype, device), "lora", RANK, ALPHA)
    fused = flare.add_lora(flare_model.load_model(folder, dtype, device), "flare", RANK, ALPHA, fusion="add_relu")
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device)
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                 target_modules=list(flare.LINEARS)))
    opt = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=LR)
           for name, m in (("ours", ours), ("flare", fused), ("hf", hf))}

    g = torch.Generator().manual_seed(0)
    batch = lambda T: torch.randint(0, s["vocab"], (s["batch"], T), generator=g).to(device)
    target, source = batch(s["seq"]), batch(s["seq"] - ANSWER)  # the target-language input and its English prompt
    lora_batch = labelled(target)
    flare_batch = dataclasses.replace(lora_batch, source_ids=source, source_mask=torch.ones_like(source))
    fusion_batch = labelled(torch.cat([source, target], 1))  # input fusion: English, then target, one sequence
    args = step_args("xnli", False, "auto")

    def step(loss_of, optimizer):
        """A training step: the loss under autocast, backward, AdamW, gradients cleared."""
        def run():
            with autocast():
                loss = loss_of()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss
        return run

    def loss_of(m, b, method):
        """train.py's loss (train.train_adapter): logits at the labelled positions only."""
        positions, targets = train.next_token_targets(b.labels)
        return lambda: train.lm_loss(train.batch_forward(m, b, method, args, logits_at=positions), targets)

    lora_loss, flare_loss = loss_of(ours, lora_batch, "lora"), loss_of(fused, flare_batch, "flare")
    fusion_loss = loss_of(ours, fusion_batch, "input-fusion")
    # transformers + peft as a user runs it: labels in, every position's logits and the loss out
    peft_loss = lambda: hf(input_ids=target, attention_mask=lora_batch.attention_mask, labels=lora_batch.labels).loss

    # Same weights, adapters at zero: the first losses must agree (ours and theirs compute the same model).
    with torch.no_grad(), autocast():
        a, b = lora_loss().item(), peft_loss().item()
    assert abs(a - b) < 1e-3 * max(1.0, abs(b)) * (10 if device.type == "cuda" else 1), f"losses differ: {a} vs {b}"
    models = {"lora": ours, "flare": fused, "peft": hf}

    def english_pass():  # what the FLARE step adds to a LoRA step, timed on its own
        with autocast():
            flare.source_representations(fused, source, flare_batch.source_mask)

    steps = {"peft": step(peft_loss, opt["hf"]), "lora": step(lora_loss, opt["ours"]),
             "flare": step(flare_loss, opt["flare"]), "input_fusion": step(fusion_loss, opt["ours"]),
             "flare_source": english_pass}
    return steps, models, opt


def training_speed(steps, repeats, device):
    """Items 1-3: all four training steps and FLARE's English pass round-robin, so every ratio compares steps
    taken side by side."""
    times = interleaved(steps, repeats, warmup=2, device=device)
    return {name: {"median_s": median(t), "times_s": t} for name, t in times.items()}


# ---------------------------------------------------------------------------------------------- memory

class LiveTensorBytes(TorchDispatchMode):
    """A tracking allocator in Python: the bytes of tensor storages created inside it that are still alive, and
    their peak. Storages are counted once however many views share them; a storage's bytes are given back when
    it dies (torch keeps a storage's Python object alive exactly as long as the storage). Storages are told apart
    by identity, not address, so it counts FakeTensorMode's storages (which have none) as well."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = set(), 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key, size = st._cdata, st.nbytes()
                # A view or in-place result shares an input's storage: that of a weight (W.t() in a linear) is
                # not an allocation of the step.
                if size and key not in self.live and key not in inputs:
                    self.live.add(key)
                    self.now += size
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(st, self._free, key, size)
        return out

    def _free(self, key, size):
        self.live.discard(key)
        self.now -= size


def resident_bytes(m, opt):
    """Weights and optimizer state: what a step starts from (its gradients are allocated inside the step)."""
    tensors = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in m.parameters()}
    tensors.update({t.untyped_storage()._cdata: t.untyped_storage().nbytes()
                    for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor)})
    return sum(tensors.values()) + sum(b.nbytes for b in m.buffers())


def step_memory(step, m, opt, device):
    """Peak bytes of one step: weights + optimizer state, plus the peak of what the step allocates on top.
    On CUDA the step's part is max_memory_allocated above the allocation before it; on CPU it is the peak of
    LiveTensorBytes (every tensor the step creates, forward, source pass, backward and optimizer)."""
    step()  # the optimizer state exists from here on
    base = resident_bytes(m, opt)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        extra = torch.cuda.max_memory_allocated(device) - before
    else:
        tracker = LiveTensorBytes()
        with tracker:
            step()
        extra = tracker.peak
    return {"resident_bytes": base, "step_peak_bytes": extra, "peak_bytes": base + extra}


def memory(steps, models, opt, device):
    """Item 4: FLARE step vs LoRA step (and input fusion for reference)."""
    return {"lora": step_memory(steps["lora"], models["lora"], opt["ours"], device),
            "flare": step_memory(steps["flare"], models["flare"], opt["flare"], device),
            "input_fusion": step_memory(steps["input_fusion"], models["lora"], opt["ours"], device)}


# ---------------------------------------------------------------------------------------- cost model at real scale
# FLOPs and peak memory of one train.py training step at the exact shapes of real models, without their weights:
# the model is built on the meta device, its tensors then replaced by FakeTensorMode's (shapes and dtypes, no data),
# and the step runs through train.batch_forward and train.lm_loss as in train.train_adapter, under StepCost
# (LiveTensorBytes and FlopCounterMode's formulas). bf16 weights, fp32 adapters, bf16 autocast, as on CUDA.

LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
# The fields model.Config reads from each Hub repo's config.json (https://huggingface.co/<repo>/blob/main/config.json).
HUB_CONFIGS = {
    # meta-llama/Llama-3.1-8B
    "llama3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                        rope_theta=500000.0, rope_scaling=LLAMA31_ROPE, tie_word_embeddings=False),
    # meta-llama/Llama-3.1-70B
    "llama3.1-70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                         num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5,
                         rope_theta=500000.0, rope_scaling=LLAMA31_ROPE, tie_word_embeddings=False),
    # google/gemma-2-9b
    "gemma2-9b": dict(model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                      num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                      rms_norm_eps=1e-6, rope_theta=10000.0, query_pre_attn_scalar=256, sliding_window=4096,
                      attn_logit_softcapping=50.0, final_logit_softcapping=30.0, tie_word_embeddings=True),
    # google/gemma-3-270m
    "gemma3-270m": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
                        num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                        rms_norm_eps=1e-6, rope_theta=1000000.0, rope_local_base_freq=10000.0, rope_scaling=None,
                        query_pre_attn_scalar=256, sliding_window=512, attn_logit_softcapping=None,
                        final_logit_softcapping=None, tie_word_embeddings=True,
                        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3),
}
# (batch, prompt tokens, answer tokens): the paper's batch 32 and the tasks' max lengths (data.TASKS); a label word
# of two tokens + EOS, a TyDiQA answer of up to 32 (train.MAX_NEW_TOKENS). XNLI: 32 x 131, TyDiQA: 8 x 544.
TASK_SHAPES = {"xnli": (32, 128, 3), "nusax": (32, 128, 3), "tydiqa": (8, 512, 32)}
TASK_LANG = {"xnli": "sw", "nusax": "ind", "tydiqa": "sw"}
COST_RUNS = [("llama3.1-8b", "xnli"), ("gemma2-9b", "tydiqa"), ("llama3.1-70b", "xnli"), ("gemma3-270m", "xnli"),
             ("gemma3-270m", "nusax")]
COST_QUICK = [("llama3.1-8b", "xnli")]
COST_METHODS = ("lora", "flare", "input-fusion")
GPU_MEMORY_GB = (24, 48, 80)
XNLI_TRAIN, EPOCHS = 392_702, 3         # XNLI's (MT) training items per language, the paper's epochs
H100_BF16_FLOPS, ASSUMED_MFU = 989e12, 0.40  # dense bf16 peak of an H100 SXM; the MFU goal of this bench


def real_config(name):
    """model.Config of a HUB_CONFIGS entry."""
    return flare_model.Config.from_hf(HUB_CONFIGS[name])


def adapted_model(config, method, device, dtype):
    """Random base weights and the adapters as train.py adds them: the stage-1 "task" LoRA, frozen, under a
    fresh "transfer" LoRA (with fusion for flare). On the meta device nothing is allocated."""
    with torch.device(device):
        m = flare_model.Transformer(config).to(dtype)
        flare.add_lora(m, "task", RANK, ALPHA)
        m.requires_grad_(False)
        flare.add_lora(m, "transfer", RANK, ALPHA, fusion="add_relu" if method == "flare" else None)
    return m


def faked(m, mode):
    """m with every parameter and buffer replaced by a FakeTensorMode tensor of the same shape, dtype and
    requires_grad, on the CPU (so that CPU autocast applies, as CUDA autocast does on a GPU)."""
    with mode:
        for mod in m.modules():
            for name, p in mod._parameters.items():
                if p is not None:
                    mod._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                               requires_grad=p.requires_grad)
            for name, b in mod._buffers.items():  # inv_freq: fp32, as load_model keeps it
                mod._buffers[name] = torch.empty(b.shape, dtype=torch.float32)
    return m


def task_batch(method, task, vocab, batch=None):
    """A data.Batch of random tokens at the task's shape: left-padded to P like data.make_batch, the answer
    labelled; flare with its English source, input-fusion with English and target prompts in one sequence."""
    B, P, A = TASK_SHAPES[task]
    B = batch or B
    prompt = 2 * P - 1 if method == "input-fusion" else P  # the target prompt follows without its BOS
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (B, prompt + A), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, prompt:] = ids[:, prompt:]
    mask = torch.ones_like(ids)
    mask[1::2, : prompt // 4] = 0  # every other row left-padded
    source = (torch.randint(3, vocab, (B, P), generator=g), torch.ones(B, P, dtype=torch.long)) \
        if method == "flare" else (None, None)
    return data.Batch(ids, mask, labels, *source, prompt)


class FusedAttentionCost(torch.autograd.Function):
    """What a fused attention kernel allocates and keeps, without computing anything: flex_attention (Gemma on
    CUDA) and SDPA's memory-efficient kernel (the others) save q, k, v, the output and one logsumexp per query
    row, and the backward makes dq, dk, dv. FLOPs as FlopCounterMode counts SDPA: dense, forward 4·B·H·T·S·D,
    backward 2.5 times that (the scores are recomputed)."""
    flops = 0

    @staticmethod
    def forward(ctx, q, k, v):
        B, H, T, D = q.shape
        out, lse = q.new_empty(B, H, T, v.shape[-1]), q.new_empty(B, H, T, dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        FusedAttentionCost.flops += 4 * B * H * T * k.shape[2] * D
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        FusedAttentionCost.flops += 10 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class StepCost(LiveTensorBytes):
    """LiveTensorBytes that also adds up FLOPs with FlopCounterMode's formulas (torch.utils.flop_counter), but
    without FlopCounterMode's module tracking, whose hooks keep module outputs alive: under --checkpointing
    that would hold every layer's activations, the very thing checkpointing frees."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **(kwargs or {}), out_val=out)
        return out


@contextlib.contextmanager
def attention_as_on_cuda():
    """model.py's attention as it runs on CUDA (model.uses_flex), with FusedAttentionCost for the kernels."""
    saved = flare_model.uses_flex, flare_model.block_masks, flare_model.flex, F.scaled_dot_product_attention
    block = create_block_mask(lambda b, h, q, k: k <= q, 1, 1, 128, 128, device="cpu")  # only its type is read
    flare_model.uses_flex = lambda device, config, cache: saved[0](torch.device("cuda"), config, cache)
    flare_model.block_masks = lambda real, window: (block, block)
    flare_model.flex = lambda q, k, v, softcap, mask, scale: FusedAttentionCost.apply(q, k, v)
    F.scaled_dot_product_attention = lambda q, k, v, **kwargs: FusedAttentionCost.apply(q, k, v)
    try:
        yield
    finally:
        flare_model.uses_flex, flare_model.block_masks, flare_model.flex, F.scaled_dot_product_attention = saved


def train_step(m, b, targets, method, args, params, opt=None):
    """One step of train.train_adapter's loop (one micro-batch): the loss under autocast, backward, clipping,
    AdamW, gradients cleared. targets: train.next_token_targets(b.labels), computed from the real labels (it
    reads their values, which fake tensors do not have)."""
    positions, targets = targets
    with train.autocast(b.input_ids.device, args):
        loss = train.lm_loss(train.batch_forward(m, b, method, args, logits_at=positions), targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    if opt is not None:
        opt.step()
    for p in params:
        p.grad = None


def step_args(task, checkpointing, precision):
    flags = ["--model", "cost-model", "--task", task, "--lang", TASK_LANG.get(task, "syn"), "--precision", precision]
    return train.parse_args(flags + (["--checkpointing"] if checkpointing else []))


def estimate_step(config, method, task, checkpointing, dtype=torch.bfloat16, precision="bf16", on_cuda=True,
                  batch=None):
    """FLOPs and peak bytes of one training step, computed on fake tensors. The peak is the resident part
    (weights, both adapters, AdamW's two fp32 moments of the trained one) plus the peak of what the step
    allocates (LiveTensorBytes). AdamW's update itself is not run (it reads values: .item()); it comes after the
    backward has freed the activations, and its temporaries are a few copies of the adapter, far below the peak."""
    mode = FakeTensorMode()
    m = faked(adapted_model(config, method, "meta", dtype), mode)
    params = flare.adapter_parameters(m, "transfer")
    args = step_args(task, checkpointing, precision)
    resident = sum(p.nbytes for p in m.parameters()) + 2 * sum(p.nbytes for p in params) \
        + sum(b.nbytes for b in m.buffers())
    b = task_batch(method, task, config.vocab_size, batch)
    targets = train.next_token_targets(b.labels)
    with mode:
        b = b.map(mode.from_tensor)
        targets = tuple(mode.from_tensor(t) for t in targets)
        tracker = StepCost()
        FusedAttentionCost.flops = 0
        with attention_as_on_cuda() if on_cuda else contextlib.nullcontext(), tracker:
            train_step(m, b, targets, method, args, params)
    return {"flops": tracker.flops + FusedAttentionCost.flops, "resident_bytes": resident,
            "step_peak_bytes": tracker.peak, "peak_bytes": resident + tracker.peak,
            "tokens": b.input_ids.numel(), "batch": tuple(b.input_ids.shape)}


def measured_step(config, method, task, batch, checkpointing=False):
    """The same step on real CPU tensors in fp32, its peak by the same tracker: the estimator's check."""
    torch.manual_seed(0)
    m = adapted_model(config, method, "cpu", torch.float32)
    params = flare.adapter_parameters(m, "transfer")
    opt = torch.optim.AdamW(params, lr=LR)
    args = step_args(task, checkpointing, "fp32")
    b = task_batch(method, task, config.vocab_size, batch)
    targets = train.next_token_targets(b.labels)
    train_step(m, b, targets, method, args, params, opt)  # AdamW's state exists from here on
    tracker = LiveTensorBytes()
    with tracker:
        train_step(m, b, targets, method, args, params, opt)
    return resident_bytes(m, opt) + tracker.peak


def cost_check(s):
    """Estimated vs measured peak of a lora, a flare (also with --checkpointing) and an input-fusion step at the
    bench's small Llama (fp32, CPU attention on both sides), at its batch and an XNLI-shaped prompt."""
    config = flare_model.Config.from_hf(dict(model_type="llama", vocab_size=s["vocab"], hidden_size=s["hidden"],
                                             intermediate_size=s["intermediate"], num_hidden_layers=s["layers"],
                                             num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                                             rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False))
    rows = {}
    for method, checkpointing in [(m, False) for m in COST_METHODS] + [("flare", True)]:
        est = estimate_step(config, method, "xnli", checkpointing, torch.float32, "fp32", on_cuda=False,
                            batch=s["batch"])
        real = measured_step(config, method, "xnli", s["batch"], checkpointing)
        rows[method + (" --checkpointing" if checkpointing else "")] = {
            "estimated_bytes": est["peak_bytes"], "measured_bytes": real, "ratio": est["peak_bytes"] / real,
            "flops": est["flops"]}
    return rows


def estimate_by_depth(config, method, task, checkpointing, batch=None):
    """estimate_step at full depth from runs at 2 and 3 layers (the fake step costs a few ms of Python per
    operation, whatever the shapes: a 70B model at full depth would take minutes). On the CUDA path every layer
    costs the same (sliding and global layers run the same kernel), so FLOPs and resident bytes grow linearly
    with depth, and so does the step's peak from the second layer on (with one layer only, the peak falls at
    another point of the step); cost_model checks one run against the full depth."""
    a, b = (estimate_step(dataclasses.replace(config, num_layers=n), method, task, checkpointing, batch=batch)
            for n in (2, 3))
    out = dict(b)
    for key in ("flops", "resident_bytes", "step_peak_bytes"):
        out[key] = a[key] + (b[key] - a[key]) * (config.num_layers - 2)
    out["peak_bytes"] = out["resident_bytes"] + out["step_peak_bytes"]
    return out


def cost_model(runs, depth_check=True):
    """Every named run x method x with/without --checkpointing: FLOPs, peak GB, which GPUs it fits, XNLI time.
    depth_check: also the first run's flare step at full depth, against the extrapolation."""
    rows, check = [], None
    if depth_check:
        config = real_config(runs[0][0])
        full, by_depth = (f(config, "flare", runs[0][1], True) for f in (estimate_step, estimate_by_depth))
        check = {"run": f"{runs[0][0]} {runs[0][1]} flare --checkpointing",
                 **{k: by_depth[k] / full[k] for k in ("flops", "peak_bytes")}}
    for name, task in runs:
        config = real_config(name)
        for method in COST_METHODS:
            for checkpointing in (False, True):
                t0 = time.perf_counter()
                r = estimate_by_depth(config, method, task, checkpointing)
                steps = math.ceil(XNLI_TRAIN / TASK_SHAPES[task][0]) * EPOCHS
                rows.append({"model": name, "task": task, "method": method, "checkpointing": checkpointing,
                             **r, "peak_gb": r["peak_bytes"] / 1e9,
                             "fits_gb": [g for g in GPU_MEMORY_GB if r["peak_bytes"] <= g * 1e9],
                             "xnli_run_hours": steps * r["flops"] / (ASSUMED_MFU * H100_BF16_FLOPS) / 3600
                             if task == "xnli" else None,
                             "estimate_s": time.perf_counter() - t0})
                print(f"  {name} {task} {method}{' --checkpointing' if checkpointing else ''}: "
                      f"{r['flops'] / 1e12:.1f} TFLOP, {r['peak_bytes'] / 1e9:.1f} GB", file=sys.stderr)
    return {"rows": rows, "depth_check": check}


FSDP_RUNS, FSDP_GPUS = [("llama3.1-70b", "xnli")], 8  # the model that fits no one GPU, on one node of 8


def fsdp_per_gpu(name, task, method, checkpointing, gpus=FSDP_GPUS):
    """Peak bytes per GPU of a `torchrun --nproc_per_node gpus train.py --fsdp` step, by the cost model's
    arithmetic: each process holds 1/gpus of each decoder layer's base weights (the input norms whole), the root's
    (embeddings, final norm, lm_head: FSDP2 keeps them gathered through the step) and two decoder layers gathered
    (the one running and the one fetched ahead) whole, 1/gpus of the adapters (train.parallel shards them too: both
    adapters, and the trained one's AdamW moments), and what the step allocates at its share of the global batch
    (estimate_by_depth)."""
    config = real_config(name)
    m = adapted_model(config, method, "meta", torch.bfloat16)
    nbytes = lambda params: sum(p.nbytes for p in params)
    adapters = {id(p) for a in ("task", "transfer") for p in flare.adapter_parameters(m, a)}
    base = lambda module: [p for p in module.parameters() if id(p) not in adapters]
    layer, root = nbytes(base(m.model.layers[0])), nbytes(base(m)) - nbytes(base(m.model.layers))
    norms = nbytes(block.input_layernorm.weight for block in m.model.layers)
    trained = nbytes(flare.adapter_parameters(m, "transfer"))
    adapter_bytes = (nbytes(p for p in m.parameters() if id(p) in adapters) + 2 * trained) / gpus
    step = estimate_by_depth(config, method, task, checkpointing, batch=TASK_SHAPES[task][0] // gpus)
    sharded = nbytes(base(m.model.layers)) - norms
    peak = sharded / gpus + norms + root + 2 * layer * (gpus - 1) / gpus + adapter_bytes + step["step_peak_bytes"]
    return {"model": name, "task": task, "method": method, "checkpointing": checkpointing, "gpus": gpus,
            "batch_per_gpu": step["batch"], "peak_gb": peak / 1e9, "base_shard_gb": sharded / gpus / 1e9,
            "gathered_gb": (root + 2 * layer * (gpus - 1) / gpus) / 1e9, "adapters_gb": adapter_bytes / 1e9,
            "step_gb": step["step_peak_bytes"] / 1e9, "fits_gb": [g for g in GPU_MEMORY_GB if peak <= g * 1e9]}


def fsdp_table(rows):
    lines = ["| model | task | GPUs | batch per GPU | method | --checkpointing | base shard | gathered | adapters | "
             "step | peak per GPU (GB) | fits in |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        lines.append(f"| {x['model']} | {x['task']} | {x['gpus']} | {x['batch_per_gpu'][0]} x "
                     f"{x['batch_per_gpu'][1]} | {x['method']} | {'yes' if x['checkpointing'] else 'no'} | "
                     + " | ".join(f"{x[k]:.1f}" for k in ("base_shard_gb", "gathered_gb", "adapters_gb", "step_gb",
                                                          "peak_gb"))
                     + f" | {', '.join(f'{g} GB' for g in x['fits_gb']) or 'none of 24/48/80 GB'} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- evaluation

def eval_items(n, words=100):
    """n classification items of about `words` words (an XNLI prompt's length): synthetic reviews strung
    together, three label words as XNLI has (the synthetic tokenizer maps the third to <unk>: the timing is the
    same)."""
    reviews = synth.synth_pairs("syn", "test", n=n * 12)
    pairs = []
    for i in range(n):
        text = " ".join(p.target["text"] for p in reviews[i * 12:(i + 1) * 12]).split()[:words]
        pairs.append(dataclasses.replace(reviews[i], target={"text": " ".join(text)}))
    task = dataclasses.replace(data.TASKS["synth"], labels=("negative", "neutral", "positive"))
    return task, pairs


def evaluation(ours, hf, s, device, repeats):
    """Classification evaluation on the same items and batches: ours is train.evaluate (whatever scoring it
    does), theirs the transformers + peft model scoring each label with its own full forward over prompt + label,
    as lm-eval-harness does."""
    with tempfile.TemporaryDirectory() as folder:
        synth.write_synth_tokenizer(folder)
        tok = flare_model.load_tokenizer(folder)
    task, pairs = eval_items(s["eval_items"])
    args = train.parse_args(["--model", "tiny", "--batch-size", str(s["batch"]),
                             "--precision", "auto" if device.type == "cuda" else "fp32"])

    @torch.no_grad()
    def theirs():
        hf.eval()
        preds = []
        for i in range(0, len(pairs), args.batch_size):
            chunk, scores = pairs[i:i + args.batch_size], []
            for label in task.labels:
                b = train.method_batch(chunk, tok, task, "lora", device, answers=[label] * len(chunk))
                with train.autocast(device, args):
                    logits = hf(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
                scores.append(data.answer_logprob(logits, b.labels))
            preds += [task.labels[j] for j in torch.stack(scores, -1).argmax(-1).tolist()]
        return preds

    ours_eval = lambda: train.evaluate(ours, tok, task, pairs, "lora", args, device)
    times = interleaved({"ours": ours_eval, "theirs": theirs}, repeats, warmup=1, device=device)
    return {"items": len(pairs), "batch": args.batch_size, "labels": len(task.labels),
            **{side: {"median_s": median(t), "items_per_s": len(pairs) / median(t), "times_s": t}
               for side, t in times.items()}}


# ---------------------------------------------------------------------------------------------- real shapes on CUDA

GPU_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}  # dense bf16
CUDA_RUNS = [("llama3.1-8b", "xnli", "lora"), ("llama3.1-8b", "xnli", "flare"), ("gemma2-9b", "tydiqa", "flare"),
             ("gemma3-270m", "xnli", "flare")]


def random_model(config, method, device, shard=None):
    """A real-shape model with random bf16 weights, built on meta and materialised on device (no download, nothing
    initialised twice), with the adapters as train.py adds them in fp32: a trained stage-1 LoRA under a fresh
    transfer one. shard: train.shard_per_layer (--fsdp), applied on meta as load_model applies it; each process then
    fills only its rows of each base weight; the adapters, added after, are whole until train.parallel shards them."""
    with torch.device("meta"):
        m = flare_model.Transformer(config).to(torch.bfloat16)
    if shard is not None:
        shard(m)
    m = m.to_empty(device=device)
    with torch.no_grad():
        for name, p in m.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            local.fill_(0.0 if config.norm_offset else 1.0) if "norm" in name else local.normal_(0.0, 0.02)
        m.fill_rope(device)  # fp32, as load_model keeps them
        flare.add_lora(m, "task", RANK, ALPHA)
        for p in flare.adapter_parameters(m, "task"):
            p.normal_(0.0, 0.02)  # trained: lora_B no longer zero
    m.requires_grad_(False)
    return flare.add_lora(m, "transfer", RANK, ALPHA, fusion="add_relu" if method == "flare" else None)


def real_shape_step(config, method, task, checkpointing, device, repeats, batch=None):
    """Step time, tokens/s, MFU and peak memory of train.py's step at a real shape on device (meant for CUDA)."""
    m = random_model(config, method, device)
    params = flare.adapter_parameters(m, "transfer")
    opt = torch.optim.AdamW(params, lr=LR)
    args = step_args(task, checkpointing, "bf16")
    b = task_batch(method, task, config.vocab_size, batch)
    targets = tuple(t.to(device) for t in train.next_token_targets(b.labels))
    b = b.map(lambda t: t.to(device))
    run = lambda: train_step(m, b, targets, method, args, params, opt)
    run()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = interleaved({"step": run}, repeats, warmup=1, device=device)["step"]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    flops = estimate_by_depth(config, method, task, checkpointing, batch)["flops"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    gpu_peak = next((f for key, f in GPU_BF16_FLOPS.items() if key in name), None)
    step_s = median(times)
    return {"step_s": step_s, "tokens_per_s": b.input_ids.numel() / step_s, "flops": flops,
            "mfu": flops / step_s / gpu_peak if gpu_peak else None, "peak_cuda_bytes": peak, "times_s": times}


def cuda_real_shapes(device, repeats, estimates):
    """CUDA_RUNS, each with --checkpointing when the estimate without it does not fit in the GPU's memory."""
    free = torch.cuda.get_device_properties(device).total_memory
    out = []
    for name, task, method in CUDA_RUNS:
        config = real_config(name)
        est = {r["checkpointing"]: r for r in estimates if (r["model"], r["task"], r["method"]) == (name, task, method)}
        checkpointing = not (est and est[False]["peak_bytes"] < 0.9 * free)
        if est and est[True]["peak_bytes"] > 0.9 * free:
            out.append({"model": name, "task": task, "method": method, "skipped": "does not fit"})
            continue
        r = real_shape_step(config, method, task, checkpointing, device, repeats)
        out.append({"model": name, "task": task, "method": method, "checkpointing": checkpointing, **r,
                    "estimated_peak_bytes": est[checkpointing]["peak_bytes"] if est else None})
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------- loading

def write_checkpoint(folder, shape, shards=4):
    """Random bf16 tensors under Llama's names, in `shards` files + index + config.json, without building a model."""
    c = llama_config(shape, torch.bfloat16)
    c.tie_word_embeddings = True  # as Llama 3.2 1B
    c.save_pretrained(folder)
    h, i, hd = shape["hidden"], shape["intermediate"], shape["hidden"] // shape["heads"]
    q, kv = shape["heads"] * hd, shape["kv_heads"] * hd
    layer = {"self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
             "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
             "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
             "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}
    g = torch.Generator().manual_seed(0)
    rand = lambda shp: torch.empty(shp, dtype=torch.bfloat16).uniform_(-0.03, 0.03, generator=g)
    per_shard = -(-shape["layers"] // shards)
    weight_map, total = {}, 0
    for k in range(shards):
        tensors = {"model.embed_tokens.weight": rand((shape["vocab"], h))} if k == 0 else {}
        for l in range(k * per_shard, min((k + 1) * per_shard, shape["layers"])):
            tensors.update({f"model.layers.{l}.{n}": rand(shp) for n, shp in layer.items()})
        if k == shards - 1:
            tensors["model.norm.weight"] = rand((h,))
        name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({n: name for n in tensors})
        total += sum(t.nbytes for t in tensors.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


# Run in a fresh interpreter. Peak RSS is VmHWM, the high-water mark of this process alone: ru_maxrss would start
# from the parent's (Linux carries it over fork and exec). transformers maps the safetensors files and reads each
# weight on first use, we copy every weight in while loading, and importing transformers already costs what our
# first load pays for torch's lazy imports; so besides the load call we time the whole process: imports, load and a
# first forward over 8 tokens (which reads every weight). Peak RSS is taken after that forward.
LOAD_SCRIPT = r"""
import time
start = time.perf_counter()
import json, resource, sys
import torch

def peak_rss():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    except FileNotFoundError:  # not Linux: ru_maxrss (bytes on macOS)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

side, folder = sys.argv[1], sys.argv[2]
if side == "ours":
    import model
else:
    from transformers import LlamaForCausalLM
rss_after_imports = peak_rss()
t0 = time.perf_counter()
if side == "ours":
    m = model.load_model(folder, torch.bfloat16, "cpu")
else:
    m = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
t1 = time.perf_counter()
with torch.no_grad():
    m(torch.arange(8)[None])
t2 = time.perf_counter()
assert all(p.dtype == torch.bfloat16 for p in m.parameters())
print(json.dumps({"import_s": t0 - start, "load_s": t1 - t0, "first_forward_s": t2 - t1,
                  "start_to_logits_s": t2 - start,
                  "peak_rss_bytes": peak_rss(), "rss_after_imports_bytes": rss_after_imports}))
"""


def loading(shape, repeats):
    """Item 5: time and peak RSS of loading the checkpoint into CPU memory (on any --device), ours vs
    transformers, in fresh subprocesses taking turns."""
    with tempfile.TemporaryDirectory() as folder:
        weight_bytes = write_checkpoint(folder, shape)
        runs = {"ours": [], "hf": []}
        for _ in range(repeats):
            for side in runs:
                out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, side, folder], capture_output=True, text=True,
                                     cwd=os.path.dirname(os.path.abspath(__file__)))
                if out.returncode:
                    raise RuntimeError(f"loading with {side} failed:\n{out.stderr[-3000:]}")
                runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    result = {"weight_bytes": weight_bytes, "params": weight_bytes // 2}
    for side, rs in runs.items():
        result[side] = {key: median([r[key] for r in rs]) for key in rs[0]}
        result[side]["peak_rss_per_weight_byte"] = result[side]["peak_rss_bytes"] / weight_bytes
        result[side]["runs"] = rs
    return result


# ---------------------------------------------------------------------------------------------- generation

def generation(folder, s, device, dtype, repeats):
    """Item 6: greedy decoding with the KV cache, a left-padded batch, every sequence running to max_new_tokens."""
    from transformers import LlamaForCausalLM
    ours = flare_model.load_model(folder, dtype, device)
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    hf.generation_config.eos_token_id = None
    B, P, N = s["batch"], s["prompt"], s["new_tokens"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, s["vocab"], (B, P), generator=g)
    mask = torch.ones(B, P, dtype=torch.long)
    for b in range(B):  # rows of different lengths, left-padded
        mask[b, : b * P // (2 * B)] = 0
    ids = (ids * mask).to(device)
    mask = mask.to(device)
    # No EOS: ours never stops on id -1, and transformers has no eos_token_id, so both produce all N tokens.
    ours_gen = lambda: ours.generate(ids, mask, N, eos_id=-1)
    hf_gen = lambda: hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N, do_sample=False,
                                 pad_token_id=0)[:, P:]
    a, b = ours_gen(), hf_gen()
    assert a.shape == b.shape == (B, N), (a.shape, b.shape)
    agree = (a == b).float().mean().item()  # fp32 greedy should agree; bf16 may drift after a near-tie
    times = interleaved({"ours": ours_gen, "hf": hf_gen}, repeats, warmup=1, device=device)
    return {"batch": B, "prompt": P, "new_tokens": N, "tokens_agree": agree,
            **{side: {"median_s": median(t), "tokens_per_s": B * N / median(t), "times_s": t}
               for side, t in times.items()}}


# ---------------------------------------------------------------------------------------------- report

def table(r):
    t, m, ld, gen, ev = r["training"], r["memory"], r["loading"], r["generation"], r["evaluation"]
    mib = lambda b: f"{b / 2 ** 20:.0f} MiB"
    ms = lambda x: f"{x * 1e3:.0f} ms"
    pr = r["per_round"]
    rows = [
        ("LoRA step: ours vs transformers+peft (sdpa)", ms(t["lora"]["median_s"]), ms(t["peft"]["median_s"]),
         r["ratios"]["lora_step"], GOALS["lora_step"], pr["lora_step"]),
        ("FLARE step vs our LoRA step", ms(t["flare"]["median_s"]), ms(t["lora"]["median_s"]),
         r["ratios"]["flare_step"], GOALS["flare_step"], pr["flare_step"]),
        ("  of which the English source pass (no grad), vs our LoRA step", ms(t["flare_source"]["median_s"]),
         ms(t["lora"]["median_s"]), r["ratios"]["flare_source_share"], None, pr["flare_source_share"]),
        ("  FLOPs per step, FLARE vs LoRA, at this size (the cost model below)",
         f"{r['cost_check']['flare']['flops'] / 1e9:.1f} GFLOP",
         f"{r['cost_check']['lora']['flops'] / 1e9:.1f} GFLOP",
         r["ratios"]["flare_step_flops"], None),
        ("input-fusion step vs FLARE step", ms(t["input_fusion"]["median_s"]), ms(t["flare"]["median_s"]),
         r["ratios"]["input_fusion_step"], None, pr["input_fusion_step"]),
        (f"peak memory, FLARE vs LoRA step ({r['memory_method']})", mib(m["flare"]["peak_bytes"]),
         mib(m["lora"]["peak_bytes"]), r["ratios"]["flare_memory"], GOALS["flare_memory"]),
        ("  of which the step's own allocations", mib(m["flare"]["step_peak_bytes"]),
         mib(m["lora"]["step_peak_bytes"]), r["ratios"]["flare_step_allocations"], None),
        ("peak memory, input-fusion vs FLARE step", mib(m["input_fusion"]["peak_bytes"]),
         mib(m["flare"]["peak_bytes"]), r["ratios"]["input_fusion_memory"], None),
        (f"load {ld['params'] / 1e9:.2f}B bf16 (4 shards) to CPU, ours vs HF: load call",
         f"{ld['ours']['load_s']:.2f} s", f"{ld['hf']['load_s']:.2f} s", r["ratios"]["load_time"], None),
        ("  process start to first logits (imports + load + forward of 8 tokens)",
         f"{ld['ours']['start_to_logits_s']:.2f} s", f"{ld['hf']['start_to_logits_s']:.2f} s",
         r["ratios"]["start_to_logits_time"], None),
        ("  peak RSS (x weight bytes)",
         f"{mib(ld['ours']['peak_rss_bytes'])} ({ld['ours']['peak_rss_per_weight_byte']:.2f}x)",
         f"{mib(ld['hf']['peak_rss_bytes'])} ({ld['hf']['peak_rss_per_weight_byte']:.2f}x)",
         r["ratios"]["load_rss"], None),
        (f"classification evaluation, {ev['items']} items x {ev['labels']} labels: items/s, ours (train.evaluate) "
         f"vs transformers+peft, one forward per label", f"{ev['ours']['items_per_s']:.1f}",
         f"{ev['theirs']['items_per_s']:.1f}", r["ratios"]["eval_speed"], GOALS["eval_speed"], pr["eval_speed"]),
        (f"greedy generation B={gen['batch']}, {gen['new_tokens']} new (same tokens: "
         f"{gen['tokens_agree']:.0%}): tokens/s, ours vs HF",
         f"{gen['ours']['tokens_per_s']:.0f}", f"{gen['hf']['tokens_per_s']:.0f}", r["ratios"]["generation_speed"],
         None, pr["generation_speed"]),
    ]
    lines = ["| measurement | ours / A | baseline / B | A/B | goal | A/B per round |", "|---|---|---|---|---|---|"]
    for name, a, b, ratio, goal, *paired in rows:
        verdict = "" if goal is None else f"{goal[0]} {goal[1]:.2f} " + (
            "met" if (ratio <= goal[1] if goal[0] == "<=" else ratio >= goal[1]) else "MISSED")
        lines.append(f"| {name} | {a} | {b} | {ratio:.2f} | {verdict} | {f'{paired[0]:.2f}' if paired else ''} |")
    return "\n".join(lines)


def cost_table(r):
    """The cost model: one row per named run, method and --checkpointing; then its checks."""
    lines = ["| model | task | batch x tokens | method | --checkpointing | TFLOP per step | estimated peak GB | "
             "fits in | full XNLI run (h) | goal |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["cost_model"]["rows"]:
        goal = ESTIMATE_GOALS.get((row["model"], row["task"], row["method"], row["checkpointing"]))
        verdict = "" if goal is None else f"<= {goal} GB " + ("met" if row["peak_gb"] <= goal else "MISSED")
        fits = ", ".join(f"{g} GB" for g in row["fits_gb"]) or "none of 24/48/80 GB"
        hours = "" if row["xnli_run_hours"] is None else f"{row['xnli_run_hours']:.1f}"
        lines.append(f"| {row['model']} | {row['task']} | {row['batch'][0]} x {row['batch'][1]} | {row['method']} | "
                     f"{'yes' if row['checkpointing'] else 'no'} | {row['flops'] / 1e12:.1f} | {row['peak_gb']:.1f} | "
                     f"{fits} | {hours} | {verdict} |")
    a = r["cost_assumptions"]
    lines.append(f"\nFull XNLI run: {a['xnli_train']:,} items x {a['epochs']} epochs / batch 32, at "
                 f"{a['mfu']:.0%} MFU of {a['gpu_bf16_flops'] / 1e12:.0f} TFLOP/s (H100 SXM dense bf16), FLOPs "
                 f"from FlopCounterMode (dense attention). Peaks: allocated tensor bytes (no allocator overhead).")
    checks = ", ".join(f"{k} {v['ratio']:.3f}" for k, v in r["cost_check"].items())
    lines.append(f"Estimator vs measured peak (same step on real CPU tensors, bench's small Llama, fp32): {checks}.")
    d = r["cost_model"]["depth_check"]
    if d:
        lines.append(f"Extrapolated from 2 and 3 layers vs run at full depth ({d['run']}): FLOPs {d['flops']:.4f}, "
                     f"peak {d['peak_bytes']:.4f}.")
    return "\n".join(lines)


def cuda_table(rows):
    lines = ["| model | task | method | --checkpointing | step | tokens/s | MFU | peak CUDA memory | estimated |",
             "|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        if "skipped" in x:
            lines.append(f"| {x['model']} | {x['task']} | {x['method']} | | {x['skipped']} | | | | |")
            continue
        mfu = "" if x["mfu"] is None else f"{x['mfu']:.1%}" + (
            f" (goal >= {MFU_GOAL:.0%})" if (x["model"], x["method"]) == ("llama3.1-8b", "flare") else "")
        est = "" if x["estimated_peak_bytes"] is None else f"{x['estimated_peak_bytes'] / 1e9:.1f} GB"
        lines.append(f"| {x['model']} | {x['task']} | {x['method']} | {'yes' if x['checkpointing'] else 'no'} | "
                     f"{x['step_s'] * 1e3:.0f} ms | {x['tokens_per_s']:,.0f} | {mfu} | "
                     f"{x['peak_cuda_bytes'] / 1e9:.1f} GB | {est} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats: a smoke run")
    p.add_argument("--repeats", type=int, help="timed repeats of each training step and generation (default 20)")
    p.add_argument("--out", help="JSON file for the results (default bench/results-<device>.json)")
    args = p.parse_args()
    device = torch.device(args.device)
    s, load_shape = (QUICK, LOAD_QUICK) if args.quick else (SIZES, LOAD_SHAPE)
    repeats = args.repeats or s["repeats"]
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    out = args.out or f"bench/results-{device.type}{'-quick' if args.quick else ''}.json"
    torch.manual_seed(0)

    from transformers import LlamaForCausalLM
    with tempfile.TemporaryDirectory() as folder:
        LlamaForCausalLM(llama_config(s)).save_pretrained(folder)  # random weights; both sides load them from here
        steps, models, opt = training_setup(folder, s, device, dtype)
        training = training_speed(steps, repeats, device)
        mem = memory(steps, models, opt, device)
        evals = evaluation(models["lora"], models["peft"], s, device, max(3, repeats // 4))
        del steps, models, opt
        gen = generation(folder, s, device, dtype, repeats)
    load = loading(load_shape, s["load_repeats"])
    print("cost model (fake tensors):", file=sys.stderr)
    check = cost_check(QUICK if args.quick else SIZES)
    costs = cost_model(COST_QUICK if args.quick else COST_RUNS, depth_check=not args.quick)
    costs["fsdp"] = [fsdp_per_gpu(name, task, method, ckpt) for name, task in ([] if args.quick else FSDP_RUNS)
                     for method in COST_METHODS for ckpt in (False, True)]
    cuda = cuda_real_shapes(device, max(3, repeats // 4), costs["rows"]) if device.type == "cuda" else None

    t = training
    r = {"machine": machine_info(device, dtype, torch.get_num_threads()),
         "sizes": {**s, "repeats": repeats, "lora_r": RANK, "lora_alpha": ALPHA, "fusion": "add_relu",
                   "load_checkpoint": load_shape, "hf_attention": "sdpa"},
         "memory_method": "cuda max_memory_allocated" if device.type == "cuda" else "live-tensor tracker",
         "training": t, "memory": mem, "loading": load, "generation": gen, "evaluation": evals,
         "cost_check": check, "cost_model": costs, "cuda_real_shapes": cuda,
         "cost_assumptions": {"gpu_bf16_flops": H100_BF16_FLOPS, "mfu": ASSUMED_MFU, "xnli_train": XNLI_TRAIN,
                              "epochs": EPOCHS, "task_shapes": TASK_SHAPES}}
    r["ratios"] = {
        "lora_step": t["lora"]["median_s"] / t["peft"]["median_s"],
        "flare_step": t["flare"]["median_s"] / t["lora"]["median_s"],
        "flare_source_share": t["flare_source"]["median_s"] / t["lora"]["median_s"],
        "flare_step_flops": check["flare"]["flops"] / check["lora"]["flops"],
        "input_fusion_step": t["input_fusion"]["median_s"] / t["flare"]["median_s"],
        "flare_memory": mem["flare"]["peak_bytes"] / mem["lora"]["peak_bytes"],
        "flare_step_allocations": mem["flare"]["step_peak_bytes"] / mem["lora"]["step_peak_bytes"],
        "input_fusion_memory": mem["input_fusion"]["peak_bytes"] / mem["flare"]["peak_bytes"],
        "load_time": load["ours"]["load_s"] / load["hf"]["load_s"],
        "start_to_logits_time": load["ours"]["start_to_logits_s"] / load["hf"]["start_to_logits_s"],
        "load_rss": load["ours"]["peak_rss_bytes"] / load["hf"]["peak_rss_bytes"],
        "generation_speed": gen["ours"]["tokens_per_s"] / gen["hf"]["tokens_per_s"],
        "eval_speed": evals["ours"]["items_per_s"] / evals["theirs"]["items_per_s"],
    }
    r["per_round"] = {
        "lora_step": per_round(t["lora"]["times_s"], t["peft"]["times_s"]),
        "flare_step": per_round(t["flare"]["times_s"], t["lora"]["times_s"]),
        "flare_source_share": per_round(t["flare_source"]["times_s"], t["lora"]["times_s"]),
        "input_fusion_step": per_round(t["input_fusion"]["times_s"], t["flare"]["times_s"]),
        "generation_speed": per_round(gen["hf"]["times_s"], gen["ours"]["times_s"]),  # tokens/s: B over A
        "eval_speed": per_round(evals["theirs"]["times_s"], evals["ours"]["times_s"]),
    }
    m = r["machine"]
    print(f"\n{m['gpu'] or m['cpu']}, {m['threads']} threads, torch {m['torch']}, transformers {m['transformers']}, "
          f"peft {m['peft']}, {m['dtype']}; model hidden {s['hidden']}, {s['layers']} layers, vocab {s['vocab']}, "
          f"batch {s['batch']} x {s['seq']}; medians of {repeats}; load average {m['load_average']}\n")
    print(table(r))
    print("\n" + cost_table(r))
    if costs["fsdp"]:
        print("\n" + fsdp_table(costs["fsdp"]))
    if cuda:
        print("\n" + cuda_table(cuda))
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(r, f, indent=2)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
