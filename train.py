"""The FLARE pipeline from one command: stage-1 English task LoRA, transfer to the target language, evaluation.

    python train.py --model llama3.1-8b --lang sw                  # XNLI, FLARE, on one CUDA GPU
    python train.py --model tiny --task synth                      # the CPU demo: a few minutes on a laptop
    torchrun --nproc_per_node 8 train.py --model llama3.1-8b       # data parallel over the 8 GPUs of one node
    torchrun --nproc_per_node 8 train.py --model llama3.1-70b --fsdp --checkpointing   # the base sharded too

Methods (--methods, comma-separated, sharing one stage-1 run):
    flare           a fresh LoRA on the target data, fusing the English source in q_proj and v_proj
    lora            a fresh plain LoRA on the target data (translate-train)
    input-fusion    a fresh plain LoRA on "English input, then target input" as one sequence
    translate-test  the stage-1 model on the English translation of the test set
    zero-shot       the stage-1 model on the target test set
Everything lands in --out: the stage-1 adapter, one folder per method (log.jsonl, checkpoint.pt, the best
adapter), results.json and results.md, the run's flags in args.json (a folder holding a run takes only --resume, with
the same flags, or --overwrite). TyDiQA without --translations is first translated into English by the model
itself (few-shot, greedy), cached in --out/translations-<lang>.jsonl.
"""
import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import pathlib
import shutil
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

import data
import flare
import synth
from flare import atomic_write, write_json
from model import KVCache, MissingFile, UsageError, compute_dtype, load_model, load_tokenizer, read_json, whole

METHODS = ("flare", "lora", "input-fusion", "translate-test", "zero-shot")
EVAL_ONLY = ("translate-test", "zero-shot")  # the stage-1 model as it is: no target training, no target train split
MAX_NEW_TOKENS = 32  # QA answers are short spans
DEFAULTS = {"methods": "flare", "lr": "2e-4", "stage1_lr": 2e-4, "epochs": 3}  # --eval-every: a tenth of each run
# The CPU demo: 256 target examples; each method at its best rate on validation out of two, the two fixed in advance
# by the sweep in the README (--lr 2.5e-3,5e-3,1e-2 over three seeds).
DEMO = {"methods": "lora,flare,zero-shot,translate-test", "lr": "5e-3,1e-2", "stage1_lr": 5e-3, "epochs": 2,
        "eval_every": 8, "max_train": 256, "stage1_max_train": 2000, "max_eval": 500}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="alias (llama3.1-8b, gemma2-9b, ...), Hub repo id, local folder, "
                   "or 'tiny' (the CPU demo, task synth only); default: llama3.1-8b with a CUDA GPU, else tiny")
    p.add_argument("--task", default=None,
                   help=f"one of {', '.join(data.TASKS)} (default: xnli; synth for --model tiny)")
    p.add_argument("--lang", default=None, help="target language code (see data.TASKS; default sw for xnli)")
    p.add_argument("--methods", default=None, help=f"comma-separated from {', '.join(METHODS)} (default: flare; "
                                                    f"the demo: {DEMO['methods']})")
    p.add_argument("--fusion", default="add_relu", choices=[f for f in flare.FUSIONS])
    p.add_argument("--source", default="normed", choices=["normed", "residual"],
                   help="source representation: the layer's q/v input (normed) or the residual stream "
                   "(the reference's)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--lr", default=None, help="learning rate (default 2e-4; the demo 5e-3,1e-2); several, "
                                             "comma-separated, to train each method at each and keep the best on "
                                             "validation")
    p.add_argument("--stage1-lr", type=float, default=None, help="stage-1 learning rate (default 2e-4; the demo 5e-3)")
    p.add_argument("--epochs", type=float, default=None, help="default 3 (the demo: 2)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max-length", type=int, default=None, help="tokens per prompt (default: the task's)")
    p.add_argument("--max-train", type=int, default=None, help="cap on target-language training examples")
    p.add_argument("--stage1-max-train", type=int, default=None, help="cap on English (stage-1) training examples")
    p.add_argument("--max-eval", type=int, default=None, help="cap on validation and test examples")
    p.add_argument("--eval-every", type=int, default=None, help="optimizer steps between validation runs "
                   "(default: a tenth of each run's steps, as the reference code; the demo: 8)")
    p.add_argument("--save-every", type=int, default=200, help="optimizer steps between checkpoints")
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing (fusion stays on)")
    p.add_argument("--fsdp", action="store_true", help="with torchrun: shard the base model's weights and the adapters "
                   "over the processes (FSDP2, per decoder layer), for a model that does not fit one GPU")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="autocast dtype; auto: bf16 on CUDA, fp32 on CPU (most CPUs lack bf16 units: 5-10x slower)")
    p.add_argument("--stage1", default=None, help="folder of a saved stage-1 adapter to reuse")
    p.add_argument("--translations", default=None, help="TyDiQA: JSONL of English translations (see data.py)")
    p.add_argument("--data-dir", default=None, help="local copy of the dataset repos, DIR/<owner>/<repo>/<file> as "
                   "`hf download <repo> --repo-type dataset --local-dir DIR/<repo>` leaves it (default: the Hub cache)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<model>-<task>-<lang>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoints (with the "
                   "flags it was started with; --methods may add methods)")
    p.add_argument("--overwrite", action="store_true", help="delete the run in --out (results, logs, checkpoints, "
                   "adapters) and start over")
    args = p.parse_args(argv)
    if args.model is None:
        args.model = "llama3.1-8b" if torch.cuda.is_available() else "tiny"
        print(f"--model {args.model} ({'a CUDA GPU is' if args.model != 'tiny' else 'no CUDA GPU:'} "
              f"{'here' if args.model != 'tiny' else 'the CPU demo'})", file=sys.stderr)
    for name, value in (DEMO if args.model == "tiny" else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    args.task = args.task or ("synth" if args.model == "tiny" else "xnli")
    if args.task not in data.TASKS:
        p.error(f"unknown task {args.task!r}; choose one of {', '.join(data.TASKS)}")
    task = data.TASKS[args.task]
    if args.model == "tiny" and args.task != "synth":
        p.error("--model tiny is the CPU demo and knows only --task synth; pick a real model for other tasks")
    if args.task == "synth" and args.model != "tiny":
        p.error("--task synth needs --model tiny (the synthetic language is not in any real model's vocabulary)")
    args.lang = args.lang or (task.languages[0] if len(task.languages) == 1 else "sw" if args.task == "xnli" else None)
    if args.lang not in task.languages:
        p.error(f"--lang {args.lang!r} is not a target language of {args.task}; "
                f"choose one of {', '.join(task.languages)}")
    args.methods = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        p.error(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    try:
        args.lrs = [float(x) for x in args.lr.split(",")]
    except ValueError:
        p.error(f"--lr {args.lr!r} is not a number or comma-separated numbers")
    folders = [f"lr{lr:g}" for lr in args.lrs]  # each rate trains into its own folder
    if len(set(folders)) < len(folders):
        twice = next(f for f in folders if folders.count(f) > 1)[2:]
        p.error(f"--lr {args.lr} gives the rate {twice} twice (rates equal to 6 digits are one): give each rate once")
    for name in ("rank", "batch_size", "grad_accum", "eval_every", "save_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name, unset in (("max_length", "the task's length"), ("max_train", "all the data"),
                        ("stage1_max_train", "all the data"), ("max_eval", "all the data")):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1 (leave it out for {unset})")
    if not all(math.isfinite(v) and v > 0 for v in (args.epochs, *args.lrs)):
        p.error(f"--epochs and --lr must be positive and finite (got --epochs {args.epochs:g}, --lr {args.lr})")
    for name in ("stage1_lr", "alpha"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            p.error(f"--{name.replace('_', '-')} must be positive and finite (got {getattr(args, name):g})")
    if not 0 <= args.dropout < 1:
        p.error(f"--dropout is the share of inputs dropped: at least 0 and below 1 (got {args.dropout:g})")
    if not 0 <= args.seed < 2 ** 32:
        p.error(f"--seed must be at least 0 and below 2**32 (got {args.seed})")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out and --overwrite deletes it: give one of them")
    if args.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        p.error("--fsdp shards the model over the processes that torchrun starts: run "
                "`torchrun --nproc_per_node <GPUs> train.py ... --fsdp`")
    if args.stage1:
        try:
            fusion = flare.read_adapter_config(args.stage1)["fusion"]
        except UsageError as e:
            p.error(f"--stage1 {e}")
        if fusion is not None:  # a fused adapter would switch itself off in the source pass (flare.py)
            p.error(f"--stage1 {args.stage1} is a FLARE adapter (fusion {fusion}); stage 1 is a plain LoRA: point it "
                    f"to <out>/stage1/adapter of an earlier run")
    if args.data_dir and args.task == "synth":
        p.error("--task synth is generated here and reads no files: leave out --data-dir")
    if args.data_dir and not os.path.isdir(args.data_dir):
        p.error(f"--data-dir {args.data_dir} is not a folder: point it to the folder that holds <owner>/<repo>/<file>")
    args.max_length = args.max_length or task.max_length
    args.out = args.out or os.path.join("runs", f"{os.path.basename(args.model.rstrip('/'))}-{args.task}-{args.lang}")
    return args


# ------------------------------------------------------------------------------------------ the run folder
# Flags a resumed run may change: none of them changes what is trained or how it is tested. --methods may add
# methods to a run; lr is compared as lrs (the rates as numbers, so 5e-3 and 0.005 are the same). Neither --fsdp nor
# the number of processes changes a result: a run may continue with other ones.
RESUMABLE_FLAGS = ("methods", "eval_every", "save_every", "checkpointing", "lr", "fsdp")


def run_entries(out):
    """What a run wrote into out besides args.json; the tiny demo model is a base model, not part of a run."""
    if not os.path.isdir(out):
        return []
    return [name for name in sorted(os.listdir(out)) if name in ("results.json", "results.md", "stage1", *METHODS)
            or name.startswith("translations-") and name.endswith(".jsonl")]


def prepare_out(args):
    """Makes sure this command neither wipes nor mixes the run in --out, then records its flags in <out>/args.json.
    A new run needs a folder without one (--overwrite deletes it first); --resume needs the run, with its flags."""
    path = os.path.join(args.out, "args.json")
    flags = {k: v for k, v in vars(args).items() if k not in ("out", "resume", "overwrite")}  # a run may move
    if args.resume:
        if not os.path.exists(path):
            raise UsageError(f"--resume: there is no run in {args.out} to continue (it has no args.json); check "
                             f"--out, or leave out --resume to start a run there.")
        run = read_json(path, "restore it, or start over with --overwrite (or another --out)")
        def show(v):
            return "unset" if v is None else ",".join(map(show, v)) if isinstance(v, list) else \
                f"{v:g}" if isinstance(v, float) else str(v)
        changed = [f"--{'lr' if k == 'lrs' else k.replace('_', '-')} {show(run.get(k))} in the run, {show(v)} now"
                   for k, v in flags.items() if k not in RESUMABLE_FLAGS and run.get(k) != v]
        if changed:
            raise UsageError(f"--resume: the run in {args.out} has other flags: {'; '.join(changed)}. Continue it "
                             f"with its own flags ({path}), or start a new run in another --out (or with --overwrite).")
        flags["methods"] = run.get("methods", []) + [m for m in args.methods if m not in run.get("methods", [])]
    else:
        held = run_entries(args.out)
        if held and not args.overwrite:
            raise UsageError(f"{args.out} holds a run ({', '.join(held)}): add --resume to continue it, pick another "
                             f"--out for a new run, or add --overwrite to delete it and start over.")
        if held and args.stage1 and os.path.abspath(args.stage1).startswith(os.path.abspath(args.out) + os.sep):
            raise UsageError(f"--stage1 {args.stage1} lies in {args.out}, which --overwrite deletes: copy the adapter "
                             f"elsewhere first.")
        for name in held:
            entry = os.path.join(args.out, name)
            shutil.rmtree(entry) if os.path.isdir(entry) else os.remove(entry)
    os.makedirs(args.out, exist_ok=True)
    write_json(flags, path)


# ------------------------------------------------------------------------------------------ small utilities

def next_token_targets(labels):
    """The positions whose next token is labelled (position t predicts token t + 1) and those tokens, (B, K) each,
    K the most labelled tokens of any row; a row with fewer is filled up with other positions, target -100."""
    following = labels[:, 1:]  # (B, T - 1): the token each position predicts
    labelled = following != -100
    k = int(labelled.sum(1).max())
    positions = labelled.int().sort(dim=1, descending=True, stable=True).indices[:, :k]  # the labelled ones first
    return positions, following.gather(1, positions)


def lm_loss(logits, targets):
    """Mean cross-entropy over the labelled tokens: logits (B, K, vocab) at the positions of next_token_targets,
    targets (B, K), -100 ignored. The same as the loss over every position with unlabelled tokens ignored, but the
    lm_head runs on the 2-4 answer tokens of a row instead of all of them (B x T x vocab fp32 logits: 2.1 GB for
    Llama 3.1 8B at batch 32 x 131 tokens)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


class Progress:
    """One line, rewritten in place: step, loss, learning rate, tokens per second, time left."""

    def __init__(self, total, label, first_step=0):
        self.total, self.label, self.first_step = total, label, first_step  # first_step: where a resumed run starts
        self.start, self.tty, self.quiet = time.time(), sys.stderr.isatty(), not rank0()

    def update(self, step, loss, lr, tokens_per_s):
        if self.quiet:
            return
        per_step = (time.time() - self.start) / max(step - self.first_step, 1)  # this session's pace
        left = per_step * (self.total - step)
        bar = "#" * int(20 * step / self.total)
        line = (f"{self.label} [{bar:<20}] {step}/{self.total} loss {loss:.4f} lr {lr:.2e} "
                f"{tokens_per_s:,.0f} tok/s {int(left // 60)}:{int(left % 60):02d} left")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self):
        if self.tty and not self.quiet:
            print(file=sys.stderr)


# ------------------------------------------------------------------------------------------ more than one process
# torchrun starts one process per GPU. Every process runs the whole pipeline over the same data order and takes
# every N-th row of each batch (the global batch keeps its size); DDP averages the adapter's gradients over them, so
# each step equals one process's over the whole batch; evaluation is split the same way and gathered. Rank 0 alone
# writes files and prints. --fsdp also shards the base and the adapters (see shard_per_layer and parallel).

def world():
    """(number of processes, this one's rank): (1, 0) without torchrun."""
    return (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)


def rank0():
    """Whether this process writes and prints: the only one without torchrun, rank 0 with it."""
    return world()[1] == 0


def start_processes():
    """This process's device; under torchrun (WORLD_SIZE > 1) it joins the others first: NCCL between GPUs, gloo
    on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # experiment.py calls main once per run, in one process
        # The others wait while rank 0 alone pretrains the demo model: longer than the default 10 minutes on a CPU.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=1))
    return device


def on_rank0(fn, *args):
    """fn(*args) on rank 0 only (what writes files); the others wait for it, and fail with its error if it fails
    with a UsageError (any other error stops rank 0, and torchrun then stops them all)."""
    world_size, rank = world()
    if world_size == 1:
        fn(*args)
        return
    error = None
    try:
        if rank == 0:
            fn(*args)
    except UsageError as e:
        error = e
    message = [None if error is None else str(error)]
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise UsageError(message[0])


def note(*args):
    """A notice on stderr, from rank 0 only."""
    if rank0():
        print(*args, file=sys.stderr, flush=True)


def my_share(items):
    """Every N-th item from this process's rank on, padded (with its last) to the same count on every process:
    under FSDP every process must run the same forwards, since each gathers weights from all the others."""
    world_size, rank = world()
    mine = items[rank::world_size]
    return mine + (mine[-1:] or items[:1]) * (math.ceil(len(items) / world_size) - len(mine))


def gathered(mine, n):
    """The n results of every process's my_share, in the order of the items they came from."""
    world_size, _ = world()
    if world_size == 1:
        return mine[:n]
    shares = [None] * world_size
    dist.all_gather_object(shares, mine)
    return [shares[i % world_size][i // world_size] for i in range(n)]


def process_mean(x):
    """The mean of a scalar tensor over the processes, as a number."""
    if world()[0] == 1:
        return x.item()
    x = x.clone()
    dist.all_reduce(x)  # a sum: gloo has no average
    return x.item() / world()[0]


def all_done(done):
    """Whether every process's sequences have all ended (greedy decoding stops for all processes at once)."""
    if world()[0] == 1:
        return bool(done.all())
    pending = (~done).sum()
    dist.all_reduce(pending)
    return int(pending) == 0


def batch_rows(b):
    """This process's rows of a training batch (every N-th from its rank) and the weight of their mean loss: their
    share of the batch's labelled tokens, times N. DDP averages the gradients over the N processes, so the weighted
    means add up to the mean over the whole batch, as one process computes it. A process left without rows (a last
    batch smaller than N) runs row 0 at weight 0: DDP needs every process in every backward."""
    world_size, rank = world()
    if world_size == 1:
        return b, 1.0
    if rank >= len(b.input_ids):
        return b.map(lambda t: t[:1]), 0.0
    mine = b.map(lambda t: t[rank::world_size])
    labelled = lambda batch: int((batch.labels[:, 1:] != -100).sum())
    return mine, labelled(mine) * world_size / labelled(b)


def parallel(model, device, fsdp=False):
    """The model as this process trains it: the model itself without torchrun. Under torchrun, DDP over the
    trainable adapter (gradients averaged over the processes during backward; the frozen rest, whole on every
    process, left out: nothing of it is broadcast or reduced). With --fsdp, each adapter of each linear becomes an
    FSDP2 unit of its own instead: its weights split by rows like the base's (shard_per_layer), gathered for its
    forward and backward, its gradients averaged and split (reduce-scatter), so each process holds, and optimizes,
    its rows only. FSDP2 fixes its units at a model's first forward: this comes before it (see base_model)."""
    if world()[0] == 1:
        return model
    if fsdp:
        for m in model.modules():
            if isinstance(m, flare.LoRA):  # what it wraps is another unit's: the layer's or an earlier adapter's
                fully_shard(m, ignored_params=set(m.base.parameters()))
        return model
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   broadcast_buffers=False)


def shard_per_layer(model):
    """FSDP2 (--fsdp): each decoder layer's weights split by rows over the processes, gathered for the layer's
    forward and backward and freed after; then the rest (embeddings, final norm, lm_head) as the root. Applied to
    the model on the meta device, before model.load_model reads each process's rows. The input norms stay whole
    (a few KB): the source pass calls them outside their layer's forward, where FSDP would not gather them. The
    adapters, added later, are sharded by parallel."""
    for layer in model.model.layers:
        fully_shard(layer, ignored_params={layer.input_layernorm.weight})
    fully_shard(model)
    register_fsdp_forward_method(model, "layer_inputs")  # the source pass: the root's weights are gathered for it too


# ------------------------------------------------------------------------------------------ forward per method

def batch_source(model, batch, method, args):
    """FLARE's English source representations of a batch (flare.source_representations); None for other methods."""
    if method == "flare" and batch.source_ids is not None:
        return flare.source_representations(model, batch.source_ids, batch.source_mask, args.source)
    return None


def batch_forward(model, batch, method, args, logits_at=None):
    """Logits of one batch, the way `method` sees its input (see data.make_batch for the batch layout), at the
    positions logits_at (B, K) asks for or at all. model may be under DDP (parallel): the source pass, which
    has no gradient, runs on the model inside."""
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    return model(batch.input_ids, batch.attention_mask, source=batch_source(inner, batch, method, args),
                 checkpoint=args.checkpointing and torch.is_grad_enabled(), logits_at=logits_at)


def method_batch(pairs, tok, task, method, device, answers=None):
    """The batch `method` trains and evaluates on: English only (stage 1, translate-test), target only (lora,
    zero-shot), English then target in one sequence (input-fusion), or target with the English source (flare)."""
    b = data.make_batch(pairs, tok, task, answers=answers, source=method == "flare",
                        input_fusion=method == "input-fusion", english_only=method in ("english", "translate-test"))
    return b.map(lambda t: t.to(device))


# ------------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def evaluate(model, tok, task, pairs, method, args, device):
    """The task's metrics on pairs: classification by the most likely label word, QA by greedy decoding. Under
    torchrun each process predicts its share (my_share) in batches of its share of --batch-size."""
    model.eval()
    preds, mine, per_batch = [], my_share(pairs), math.ceil(args.batch_size / world()[0])
    for i in range(0, len(mine), per_batch):
        chunk = mine[i:i + per_batch]
        with autocast(device, args):
            if task.labels:  # log-likelihood of each label word (+ EOS) after the prompt
                best = label_logprobs(model, tok, task, chunk, method, args, device).argmax(-1).tolist()
                preds += [task.labels[j] for j in best]
            else:  # QA: greedy, a short answer, source fused at every step past the prompt
                b = method_batch(chunk, tok, task, method, device, answers=False)
                new = model.generate(b.input_ids, b.attention_mask, MAX_NEW_TOKENS, tok.eos_id,
                                     source=batch_source(model, b, method, args),
                                     use_cache=not position_mixing(method, args), all_done=all_done)
                preds += [tok.decode([t for t in row if t != tok.eos_id]).strip() for row in new.tolist()]
    return data.metrics(task, gathered(preds, len(pairs)), [p.answer for p in pairs], [p.more_answers for p in pairs])


def position_mixing(method, args):
    """FLARE with a fusion that mixes over every earlier position (flare.POSITION_MIXING), which a KV cache does not
    keep: each step, or each label, runs over the whole sequence instead."""
    return method == "flare" and args.fusion in flare.POSITION_MIXING


def label_logprobs(model, tok, task, pairs, method, args, device):
    """(B, labels): the summed log-likelihood of each label word + EOS after each pair's prompt. The prompt runs
    once into a KV cache; each label's tokens then run over it as a continuation (the cache rewound to the prompt's
    end each time), FLARE's source fused past the prompt with its last position, as in training and decoding.
    log p(first label token) comes from the prompt's last position. Position-mixing fusions score each label with
    a forward over prompt + label."""
    if position_mixing(method, args):
        scores = []
        for label in task.labels:
            b = method_batch(pairs, tok, task, method, device, answers=[label] * len(pairs))
            scores.append(data.answer_logprob(batch_forward(model, b, method, args), b.labels))
        return torch.stack(scores, -1)
    b = method_batch(pairs, tok, task, method, device, answers=False)
    (B, P), source = b.input_ids.shape, batch_source(model, b, method, args)
    answers = [torch.tensor(data.answer_ids(tok, label), device=device).expand(B, -1) for label in task.labels]
    dtype = compute_dtype(model.model.embed_tokens.weight)
    cache = KVCache(model.config, B, P + max(a.shape[1] for a in answers) - 1, dtype, device)
    last = torch.full((B, 1), P - 1, device=device)
    first = model(b.input_ids, b.attention_mask, source=source, cache=cache, logits_at=last)[:, 0].log_softmax(-1)
    scores = []
    for answer in answers:  # (B, L): the label's tokens and EOS
        cache.length = P
        mask = torch.cat([b.attention_mask, b.attention_mask.new_ones(answer.shape)], 1)[:, :-1]
        rest = model(answer[:, :-1], mask, source=source, cache=cache).log_softmax(-1)  # (B, L - 1, vocab)
        scores.append(first.gather(1, answer[:, :1])[:, 0] + rest.gather(-1, answer[:, 1:, None]).sum((1, 2)))
    return torch.stack(scores, -1)


def generate_text(model, tok, prompts, max_new_tokens, args, device):
    """Greedy continuations of a list of prompts, each cut at its first line break (each process its share)."""
    ids = [tok.encode(p) for p in my_share(prompts)]
    P = max(map(len, ids))
    x = torch.tensor([[tok.pad_id] * (P - len(i)) + i for i in ids], device=device)
    mask = torch.tensor([[0] * (P - len(i)) + [1] * len(i) for i in ids], device=device)
    with autocast(device, args):
        new = model.generate(x, mask, max_new_tokens, tok.eos_id, all_done=all_done)
    texts = [tok.decode([t for t in row if t != tok.eos_id]).strip().split("\n")[0] for row in new.tolist()]
    return gathered(texts, len(prompts))


def autocast(device, args):
    bf16 = args.precision == "bf16" or args.precision == "auto" and device.type == "cuda"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


# ------------------------------------------------------------------------------------------ training

def train_adapter(model, tok, task, train_pairs, val_pairs, method, name, lr, folder, args, device):
    """A plain loop over adapter `name`: AdamW, linear warmup (10%) then linear decay, gradient clipping,
    validation every --eval-every steps (default: a tenth of the run) with the best adapter kept, atomic
    checkpoints every --save-every steps and on Ctrl-C. With --resume it continues from folder/checkpoint.pt to
    the same losses."""
    os.makedirs(folder, exist_ok=True)
    net = parallel(model, device, args.fsdp)  # first: FSDP2 replaces the parameters by its shards
    params = flare.adapter_parameters(model, name)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    per_epoch = math.ceil(len(train_pairs) / (args.batch_size * args.grad_accum))
    total = max(1, round(per_epoch * args.epochs))
    warmup = max(1, round(0.1 * total))
    # Without --eval-every, validation every tenth of the run (rounded up), as the public reference code does:
    # 10 validations whatever the run's length, not one per 200 steps (184 for XNLI's 36.8k steps at batch 32).
    eval_every = args.eval_every or math.ceil(total / 10)
    schedule = lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    log_path, ckpt_path = os.path.join(folder, "log.jsonl"), os.path.join(folder, "checkpoint.pt")
    if args.resume and os.path.exists(ckpt_path):
        step, best, best_state = resume(ckpt_path, log_path, model, name, opt, sched)
        note(f"resuming {folder} at step {step}/{total}")
    else:  # a fresh run: nothing of an earlier one in this folder may be resumed or appended to
        step, best, best_state = 0, -1.0, None
        for stale in (log_path, ckpt_path):
            if os.path.exists(stale) and rank0():
                os.remove(stale)
    progress = Progress(total, f"{method} lr {lr:g}", first_step=step)
    try:
        while step < total:
            model.train()
            torch.manual_seed(args.seed * 1_000_003 + step)  # dropout's random state (on every device) too
            start = time.time()
            batches = [[train_pairs[i] for i in idx] for idx in step_batches(len(train_pairs), step, per_epoch, args)]
            loss, tokens = accumulate(net, batches, tok, task, method, args, device)
            if not math.isfinite(loss):
                kept = f"the last good checkpoint is {ckpt_path}" if os.path.exists(ckpt_path) else \
                    f"no checkpoint was saved yet (--save-every {args.save_every})"
                raise Diverged(f"{method}: the loss is {loss} at step {step + 1}; stopped, {kept}. Lower --lr "
                               f"(now {lr:g}) or use --precision fp32, then rerun with --resume.")
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            record = {"step": step, "loss": loss, "lr": opt.param_groups[0]["lr"],
                      "tokens_per_s": tokens / (time.time() - start)}
            if step % eval_every == 0 or step == total:
                score = evaluate(model, tok, task, val_pairs, method, args, device)[task.metric]
                record["val_" + task.metric] = score
                if score > best:
                    best, best_state = score, flare.adapter_state(model, name)
            if rank0():
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            progress.update(step, loss, record["lr"], record["tokens_per_s"])
            if step % args.save_every == 0 or step == total:
                save_checkpoint(ckpt_path, model, name, opt, sched, step, best, best_state)
    except KeyboardInterrupt:
        if args.fsdp:  # saving gathers from every process, and each may be anywhere in the step: the last one stands
            kept = f"the last checkpoint (every {args.save_every} steps) stands"
        else:
            save_checkpoint(ckpt_path, model, name, opt, sched, step, best, best_state)
            kept = "checkpoint saved"
        progress.close()
        raise SystemExit(f"\ninterrupted at step {step}; {kept}. Continue with the same command and --resume."
                         if rank0() else 1)
    progress.close()
    if best_state is None:  # a Ctrl-C stopped the only validation, at the last step: it runs now
        best, best_state = evaluate(model, tok, task, val_pairs, method, args, device)[task.metric], \
            flare.adapter_state(model, name)
    flare.set_adapter_state(model, name, best_state)  # keep the best adapter by validation
    if rank0():
        flare.save_adapter(model, name, os.path.join(folder, "adapter"), base_model=args.model, state=best_state)
    return best


def accumulate(net, batches, tok, task, method, args, device):
    """Forward and backward over one optimizer step's micro-batches (lists of pairs), this process's rows of each
    (batch_rows): the gradients of the step's mean loss. Returns that loss and the step's tokens; a micro-batch
    whose loss is not finite stops it before its backward, and its loss is returned."""
    tokens, loss_sum = 0, 0.0
    for a, pairs in enumerate(batches):
        whole = method_batch(pairs, tok, task, method, device)
        b, weight = batch_rows(whole)
        positions, targets = next_token_targets(b.labels)
        last = a == len(batches) - 1  # DDP averages the gradients in the last micro-batch's backward
        with net.no_sync() if isinstance(net, DistributedDataParallel) and not last else contextlib.nullcontext():
            with autocast(device, args):
                loss = weight * lm_loss(batch_forward(net, b, method, args, logits_at=positions), targets)
            batch_loss = process_mean(loss.detach())  # the mean over the whole micro-batch
            if not math.isfinite(batch_loss):
                return batch_loss, tokens
            (loss / args.grad_accum).backward()
        tokens += int(whole.attention_mask.sum())
        loss_sum += batch_loss / args.grad_accum
    return loss_sum, tokens


def step_batches(n, step, per_epoch, args):
    """The micro-batches (item indices out of n) of optimizer step `step`. The data order follows from the epoch
    and the seed, so a resumed run needs nothing saved to go on with the same batches."""
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
    first = k * args.grad_accum * args.batch_size
    micro = [order[first + a * args.batch_size:first + (a + 1) * args.batch_size] for a in range(args.grad_accum)]
    return [idx for idx in micro if idx]


class Diverged(UsageError, FloatingPointError):
    """The loss is no longer finite: the rate is too high for the run (a UsageError, it ends in one line)."""


CHECKPOINT_KEYS = ("adapter", "optimizer", "scheduler", "step", "best", "best_state")


def load_checkpoint(path):
    """checkpoint.pt as train_adapter saves it; a damaged one is an error that says how to go on without it."""
    try:
        ck = torch.load(path, weights_only=False)
        problem = None if isinstance(ck, dict) and all(k in ck for k in CHECKPOINT_KEYS) else "not a flare checkpoint"
    except Exception as e:  # a cut zip archive, a pickle or an EOF error, depending on where the file ends
        problem = f"{type(e).__name__}: {e}"
    if problem:
        raise UsageError(f"{path} is not a readable checkpoint ({problem}): the file is damaged or was cut short; "
                         f"delete it and rerun with --resume to train this stage again from its first step (the "
                         f"rest of the run is kept).")
    return ck


def save_checkpoint(path, model, name, opt, sched, step, best, best_state):
    """checkpoint.pt, atomically, from rank 0: what a resumed run needs besides the step (data order and dropout
    follow from it): the adapter, the optimizer and schedule, the best validation score so far and its adapter.
    Every process calls it: under --fsdp the adapter and the optimizer's moments are gathered from their shards."""
    state = {"adapter": flare.adapter_state(model, name), "optimizer": whole(opt.state_dict()),
             "scheduler": sched.state_dict(), "step": step, "best": best, "best_state": best_state}
    if rank0():
        atomic_write(path, lambda tmp: torch.save(state, tmp))


def resume(ckpt_path, log_path, model, name, opt, sched):
    """Puts the checkpoint back into the adapter, optimizer and schedule; returns its step, best score and best
    adapter. The log is cut back to the checkpoint's steps: a crash leaves the records of steps after it, which run
    again."""
    ck = load_checkpoint(ckpt_path)
    flare.set_adapter_state(model, name, ck["adapter"], ckpt_path)
    opt.load_state_dict(ck["optimizer"])
    for p, moments in opt.state.items():  # under --fsdp: this process's rows of each moment, as for the adapter
        if isinstance(p, DTensor):
            for k, v in moments.items():
                if v.dim():
                    moments[k] = distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)
    sched.load_state_dict(ck["scheduler"])
    step = ck["step"]
    if os.path.exists(log_path) and rank0():
        with open(log_path) as f:
            lines = f.readlines()
        if lines and not lines[-1].endswith("\n"):  # a record cut short: the next one must not be glued to it
            lines.pop()
        atomic_write(log_path, lambda tmp: pathlib.Path(tmp).write_text("".join(lines[:step])))
        if len(lines) < step:
            note(f"{log_path} lacks the records of steps {len(lines) + 1} to {step} (the file was cut short); "
                 f"training goes on from the checkpoint")
    return step, ck["best"], ck["best_state"]


def run_method(new_model, tok, task, splits, method, args, device):
    """Trains (at each --lr, keeping the best on validation) and tests one method, each rate on a model of its own
    from new_model() (the base with the stage-1 adapter); returns its result row, with the wall-clock and CPU
    seconds that training and testing took (in this process: a resumed run counts from there)."""
    if method in EVAL_ONLY:
        wall, cpu = time.time(), time.process_time()
        row = {"method": method, **evaluate(new_model(), tok, task, splits["test"], method, args, device)}
        return {**row, "seconds": time.time() - wall, "cpu_seconds": time.process_time() - cpu}
    folder = os.path.join(args.out, method)
    runs = [run_rate(new_model(), tok, task, splits, method, lr,
                     folder if len(args.lrs) == 1 else os.path.join(folder, f"lr{lr:g}"), args, device)
            for lr in args.lrs]
    best = max(runs, key=lambda r: r["val_" + task.metric])
    return {**best, "runs": runs} if len(runs) > 1 else best


def run_rate(model, tok, task, splits, method, lr, folder, args, device):
    """A fresh adapter ("transfer") for one method at one rate, trained into folder and tested."""
    wall, cpu = time.time(), time.process_time()
    torch.manual_seed(args.seed)
    flare.add_lora(model, "transfer", args.rank, args.alpha, args.dropout,
                   fusion=args.fusion if method == "flare" else None)
    val = train_adapter(model, tok, task, splits["train"], splits["validation"], method, "transfer", lr, folder,
                        args, device)
    row = {"method": method, "lr": lr, "val_" + task.metric: val,
           **evaluate(model, tok, task, splits["test"], method, args, device)}
    if method == "flare":  # the control: each test item gets the English source of another item
        test = splits["test"]
        mismatched = [dataclasses.replace(p, source=q.source) for p, q in zip(test, test[1:] + test[:1])]
        row["mismatched_source_" + task.metric] = evaluate(model, tok, task, mismatched, method, args, device)[
            task.metric]
    return {**row, "seconds": time.time() - wall, "cpu_seconds": time.process_time() - cpu}


# ------------------------------------------------------------------------------------------ the pipeline

def main(argv=None):
    args = parse_args(argv)
    device = start_processes()
    torch.manual_seed(args.seed)
    on_rank0(prepare_out, args)
    if args.model == "tiny":
        model_path = os.path.join(args.out, "tiny-model")
        on_rank0(synth.pretrain_tiny, model_path, args.seed, device, autocast(device, args))
    else:
        model_path = args.model
    task = dataclasses.replace(data.TASKS[args.task], max_length=args.max_length)
    tok = load_tokenizer(model_path)
    # Methods that only evaluate read the target test split alone: XNLI's train file (392k items) is absent from
    # many local copies, and TyDiQA's validation split is carved out of its train file.
    splits = ("test",) if set(args.methods) <= set(EVAL_ONLY) else ("train", "validation", "test")
    if args.task == "tydiqa" and args.translations is None:  # not parallel: the base model translates it first
        args.translations = os.path.join(args.out, f"translations-{args.lang}.jsonl")
        translate(base_model(model_path, device, args), tok, splits, args, device)

    def load(lang, split, limit):  # the demo's task is generated (synth.py), the real ones are read from files
        if args.task == "synth":
            return synth.synth_pairs(lang, split, n=limit, seed=args.seed)
        return data.load_pairs(args.task, lang, split, limit=limit, seed=args.seed, translations=args.translations,
                               data_dir=args.data_dir)
    target = {s: load(args.lang, s, args.max_train if s == "train" else args.max_eval) for s in splits}
    stage1 = train_stage1(model_path, tok, task, load, args, device)

    def with_stage1():  # the base with the English task adapter, frozen and always on from here
        model = base_model(model_path, device, args)
        flare.load_adapter(model, stage1, name="task")
        return model.requires_grad_(False)

    results_path = os.path.join(args.out, "results.json")
    results = read_json(results_path, "delete it and rerun with --resume, which tests the trained methods again from "
                        "their checkpoints") if args.resume and os.path.exists(results_path) else {}
    for method in args.methods:
        if method in results:
            note(f"{method}: done before, kept")
            continue
        results[method] = run_method(with_stage1, tok, task, target, method, args, device)
        on_rank0(write_json, results, results_path)
    table = results_table(results, task, args)
    on_rank0(atomic_write, os.path.join(args.out, "results.md"), lambda tmp: pathlib.Path(tmp).write_text(table + "\n"))
    if rank0():
        print(table)
    return results


def base_model(path, device, args):
    """The base model, loaded afresh (sharded by --fsdp). Each adapter trains on a model of its own: FSDP2 fixes its
    units at a model's first forward, so an adapter added to a model that has run could not be sharded; and no
    method inherits anything of the one before. The last model goes first: DDP's and FSDP's hooks hold reference
    cycles, which only the garbage collector breaks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return load_model(path, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device,
                      shard=shard_per_layer if args.fsdp else None)


def translate(model, tok, splits, args, device):
    """TyDiQA's English side, translated by the base model (data.translate_tydiqa) into args.translations."""
    generate = lambda prompts, max_new_tokens: generate_text(model, tok, prompts, max_new_tokens, args, device)
    for split in splits:
        lost = data.translate_tydiqa(args.lang, split, generate, args.translations, seed=args.seed,
                                     limit=args.max_train if split == "train" else args.max_eval,
                                     data_dir=args.data_dir, write=rank0())
        note(f"tydiqa {args.lang} {split}: translated into {args.translations}; {lost} items lost their answer and "
             f"are left out")
    if world()[0] > 1:
        dist.barrier()  # every process reads the translations, once rank 0 has written them all


def train_stage1(model_path, tok, task, load, args, device):
    """Stage 1, the English task adapter: trained into <out>/stage1, or reused (--stage1, or this run's with
    --resume). Returns the folder of the adapter."""
    stage1 = args.stage1 or os.path.join(args.out, "stage1", "adapter")
    if args.stage1 or args.resume and os.path.exists(os.path.join(stage1, "adapter.json")):
        note(f"stage 1: reusing {stage1}")
        return stage1
    try:
        english = {s: load("en", s, args.stage1_max_train if s == "train" else args.max_eval)
                   for s in ("train", "validation")}
    except FileNotFoundError as e:
        raise MissingFile(f"{e} Stage 1 trains on the English train and validation splits; without them, reuse a "
                          f"stage-1 adapter trained elsewhere: --stage1 <run>/stage1/adapter.") from e
    model = base_model(model_path, device, args)
    torch.manual_seed(args.seed)
    flare.add_lora(model, "task", args.rank, args.alpha, args.dropout)
    train_adapter(model, tok, task, english["train"], english["validation"], "english", "task", args.stage1_lr,
                  os.path.dirname(stage1), args, device)
    return stage1


def results_table(results, task, args):
    keys = [k for k in ("accuracy", "macro_f1", "exact_match", "token_f1", "exact_match_squad", "token_f1_squad")
            if any(k in r for r in results.values())]
    head = f"{args.task} ({args.lang}), model {args.model}, test n={args.max_eval or 'all'}\n\n"
    lines = ["| method | lr | " + " | ".join(keys) + f" | val {task.metric} | mismatched source |",
             "|---" * (len(keys) + 4) + "|"]
    for name, r in results.items():
        cells = [f"{100 * r[k]:.1f}" if k in r else "" for k in keys]
        val, mis = r.get("val_" + task.metric), r.get("mismatched_source_" + task.metric)
        lines.append(f"| {name} | {r.get('lr', '')} | " + " | ".join(cells) +
                     f" | {'' if val is None else f'{100 * val:.1f}'} | {'' if mis is None else f'{100 * mis:.1f}'} |")
    return head + "\n".join(lines)


def interrupt(signum, frame):
    """SIGTERM, which cluster schedulers send before they kill a job, takes Ctrl-C's path: a checkpoint, then exit."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def cli(argv=None):
    """The command line: main, with SIGTERM handled like Ctrl-C and a user error ending in its one-line message
    (an internal error keeps its traceback)."""
    signal.signal(signal.SIGTERM, interrupt)
    try:
        main(argv)
    except UsageError as e:
        sys.exit(f"flare: {e}")
    except KeyboardInterrupt:  # outside a training loop, where nothing is lost that --resume does not redo
        sys.exit("flare: interrupted; continue with the same command and --resume")
    finally:
        if dist.is_initialized():
            gc.collect()  # the last model's FSDP and DDP state (in reference cycles) goes while Python can free it:
            dist.destroy_process_group()  # left to the interpreter's exit, gloo's teardown can abort (SIGABRT)


if __name__ == "__main__":
    cli()
