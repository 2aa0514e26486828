"""How flare compares with transformers + peft, and what FLARE costs against its alternatives (issue 6).

    python bench.py                      # cuda if available, else cpu; writes bench/results-<device>.json
    python bench.py --quick              # small sizes, few repeats: a smoke run

One invocation, one code path for CPU and CUDA, both sides of every ratio in the same run:

  1. LoRA training step (forward, backward, AdamW; r=8 on every linear of every layer): ours vs transformers + peft,
     on the same random Llama (transformers with attn_implementation="sdpa").
  2. FLARE step (no-grad English source pass + fused target forward + backward + AdamW) vs our LoRA step.
  3. Input-fusion step (plain LoRA on English + target, twice as long) vs the FLARE step.
  4. Peak memory of a FLARE step vs a LoRA step.
  5. Loading a sharded bf16 checkpoint of about 1B random parameters, each side in a fresh subprocess.
  6. Batched greedy generation with the KV cache: ours vs transformers' generate.

Times are medians over repeats; the sides of a comparison run interleaved (A B A B ...) after warm-up, so a noisy
machine slows both alike. fp32 on CPU; on CUDA bf16 weights with fp32 adapters under bf16 autocast, on both sides.
"""
import argparse
import json
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
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import flare
import model as flare_model

# The small random Llama of the training and generation benchmarks (issue 6: hidden 512, 4 layers, vocab 32k).
SIZES = dict(hidden=512, intermediate=1536, layers=4, heads=8, kv_heads=4, vocab=32000, batch=8, seq=128,
             prompt=64, new_tokens=64, repeats=20, load_repeats=3)
QUICK = dict(hidden=256, intermediate=768, layers=2, heads=4, kv_heads=2, vocab=8000, batch=2, seq=64,
             prompt=16, new_tokens=8, repeats=3, load_repeats=1)
# The loading benchmark's checkpoint: Llama 3.2 1B's shape (1.24B parameters, 2.5 GB in bf16), in 4 shards.
LOAD_SHAPE = dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256)
LOAD_QUICK = dict(hidden=512, intermediate=1536, layers=4, heads=8, kv_heads=4, vocab=32000)
RANK, ALPHA, LR = 8, 16, 1e-4
GOALS = {"lora_step": 1.0, "flare_step": 1.40, "flare_memory": 1.15}  # ratio at most


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

def causal_lm_loss(logits, ids):
    """The same next-token loss on both sides (fp32, as transformers' ForCausalLMLoss)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


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
    target, source = batch(s["seq"]), batch(s["seq"])   # the target-language input and its English version
    ones = torch.ones_like(target)
    both = torch.cat([source, target], 1)                 # input fusion: English then target, one sequence

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

    lora_loss = lambda: causal_lm_loss(ours(target, ones), target)
    peft_loss = lambda: causal_lm_loss(hf(input_ids=target, attention_mask=ones).logits, target)
    flare_loss = lambda: causal_lm_loss(fused(target, ones, source=flare.source_representations(fused, source, ones)),
                                        target)
    fusion_loss = lambda: causal_lm_loss(ours(both, torch.ones_like(both)), both)

    # Same weights, adapters at zero: the first losses must agree (ours and theirs compute the same model).
    with torch.no_grad(), autocast():
        a, b = lora_loss().item(), peft_loss().item()
    assert abs(a - b) < 1e-3 * max(1.0, abs(b)) * (10 if device.type == "cuda" else 1), f"losses differ: {a} vs {b}"
    models = {"lora": ours, "flare": fused, "peft": hf}
    steps = {"peft": step(peft_loss, opt["hf"]), "lora": step(lora_loss, opt["ours"]),
             "flare": step(flare_loss, opt["flare"]), "input_fusion": step(fusion_loss, opt["ours"])}
    return steps, models, opt


def training_speed(steps, repeats, device):
    """Items 1-3: all four training steps round-robin, so every ratio compares steps taken side by side."""
    times = interleaved(steps, repeats, warmup=2, device=device)
    return {name: {"median_s": median(t), "times_s": t} for name, t in times.items()}


# ---------------------------------------------------------------------------------------------- memory

class LiveTensorBytes(TorchDispatchMode):
    """A tracking allocator in Python: the bytes of tensor storages created inside it that are still alive, and
    their peak. Storages are counted once however many views share them; a storage's bytes are given back when
    it dies (torch keeps a storage's Python object alive exactly as long as the storage)."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = set(), 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key, size = st.data_ptr(), st.nbytes()
                if size and key not in self.live:
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
    tensors = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in m.parameters()}
    tensors.update({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
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


# ---------------------------------------------------------------------------------------------- loading

def write_checkpoint(folder, shape, shards=4):
    """Random bf16 tensors under Llama's names, in `shards` files + index + config.json, without building a model."""
    from transformers import LlamaConfig
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
    t, m, ld, gen = r["training"], r["memory"], r["loading"], r["generation"]
    mib = lambda b: f"{b / 2 ** 20:.0f} MiB"
    ms = lambda x: f"{x * 1e3:.0f} ms"
    pr = r["per_round"]
    rows = [
        ("LoRA step: ours vs transformers+peft (sdpa)", ms(t["lora"]["median_s"]), ms(t["peft"]["median_s"]),
         r["ratios"]["lora_step"], GOALS["lora_step"], pr["lora_step"]),
        ("FLARE step vs our LoRA step", ms(t["flare"]["median_s"]), ms(t["lora"]["median_s"]),
         r["ratios"]["flare_step"], GOALS["flare_step"], pr["flare_step"]),
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
        (f"greedy generation B={gen['batch']}, {gen['new_tokens']} new (same tokens: "
         f"{gen['tokens_agree']:.0%}): tokens/s, ours vs HF",
         f"{gen['ours']['tokens_per_s']:.0f}", f"{gen['hf']['tokens_per_s']:.0f}", r["ratios"]["generation_speed"],
         None, pr["generation_speed"]),
    ]
    lines = ["| measurement | ours / A | baseline / B | A/B | goal | A/B per round |", "|---|---|---|---|---|---|"]
    for name, a, b, ratio, goal, *paired in rows:
        verdict = "" if goal is None else f"<= {goal:.2f} " + ("met" if ratio <= goal else "MISSED")
        lines.append(f"| {name} | {a} | {b} | {ratio:.2f} | {verdict} | {f'{paired[0]:.2f}' if paired else ''} |")
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
        del steps, models, opt
        gen = generation(folder, s, device, dtype, repeats)
    load = loading(load_shape, s["load_repeats"])

    t = training
    r = {"machine": machine_info(device, dtype, torch.get_num_threads()),
         "sizes": {**s, "repeats": repeats, "lora_r": RANK, "lora_alpha": ALPHA, "fusion": "add_relu",
                   "load_checkpoint": load_shape, "hf_attention": "sdpa"},
         "memory_method": "cuda max_memory_allocated" if device.type == "cuda" else "live-tensor tracker",
         "training": t, "memory": mem, "loading": load, "generation": gen}
    r["ratios"] = {
        "lora_step": t["lora"]["median_s"] / t["peft"]["median_s"],
        "flare_step": t["flare"]["median_s"] / t["lora"]["median_s"],
        "input_fusion_step": t["input_fusion"]["median_s"] / t["flare"]["median_s"],
        "flare_memory": mem["flare"]["peak_bytes"] / mem["lora"]["peak_bytes"],
        "flare_step_allocations": mem["flare"]["step_peak_bytes"] / mem["lora"]["step_peak_bytes"],
        "input_fusion_memory": mem["input_fusion"]["peak_bytes"] / mem["flare"]["peak_bytes"],
        "load_time": load["ours"]["load_s"] / load["hf"]["load_s"],
        "start_to_logits_time": load["ours"]["start_to_logits_s"] / load["hf"]["start_to_logits_s"],
        "load_rss": load["ours"]["peak_rss_bytes"] / load["hf"]["peak_rss_bytes"],
        "generation_speed": gen["ours"]["tokens_per_s"] / gen["hf"]["tokens_per_s"],
    }
    r["per_round"] = {
        "lora_step": per_round(t["lora"]["times_s"], t["peft"]["times_s"]),
        "flare_step": per_round(t["flare"]["times_s"], t["lora"]["times_s"]),
        "input_fusion_step": per_round(t["input_fusion"]["times_s"], t["flare"]["times_s"]),
        "generation_speed": per_round(gen["hf"]["times_s"], gen["ours"]["times_s"]),  # tokens/s: B over A
    }
    m = r["machine"]
    print(f"\n{m['gpu'] or m['cpu']}, {m['threads']} threads, torch {m['torch']}, transformers {m['transformers']}, "
          f"peft {m['peft']}, {m['dtype']}; model hidden {s['hidden']}, {s['layers']} layers, vocab {s['vocab']}, "
          f"batch {s['batch']} x {s['seq']}; medians of {repeats}; load average {m['load_average']}\n")
    print(table(r))
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(r, f, indent=2)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
