"""experiment.py: the grid of runs, their records, skipping what has finished, the choice by validation, the table;
and the seconds train.run_method records for each run.

The grid runs against a stand-in for train.main that answers from a table of made-up scores (the real runs take
hours); the seconds are checked on the CPU demo (--model tiny) with an evaluation slowed down by a known amount.
"""
import hashlib
import json
import shutil
import os
import statistics
import time

import pytest
import torch

import experiment
import flare
import train
from test_train import run, tiny_model  # noqa: F401 (tiny_model is a fixture)


def fake_score(lang, method, lr, seed):
    """A distinct made-up score per run, so a test can tell which run a number came from."""
    base = {"zero-shot": 0.30, "translate-test": 0.60, "lora": 0.50, "flare": 0.55, "input-fusion": 0.52}[method]
    first, second = experiment.RATES
    return base + 0.01 * experiment.SEEDS.index(seed) + (0.02 if lr == second and lang == "sun" else 0.0) + \
        (0.03 if lr == first and lang != "sun" else 0.0)


@pytest.fixture
def fake_main(monkeypatch, tmp_path):
    """train.main replaced by a stand-in; returns the list of argv it was called with."""
    calls, stage1s = [], {}

    def main(argv):
        calls.append(argv)
        flag = lambda name: argv[argv.index(name) + 1] if name in argv else None
        out, method, lang, seed = flag("--out"), flag("--methods"), flag("--lang"), int(flag("--seed"))
        if "--resume" not in argv:
            assert not os.path.exists(os.path.join(out, "args.json")), "a second run into a folder needs --resume"
            os.makedirs(out)
            open(os.path.join(out, "args.json"), "w").write("{}")
        if flag("--stage1") is None and not os.path.exists(os.path.join(out, "stage1")):
            os.makedirs(os.path.join(out, "stage1", "adapter"))
            config = {k: None for k in flare.ADAPTER_KEYS}  # a plain LoRA's (fusion None), as --stage1 checks
            open(os.path.join(out, "stage1", "adapter", "adapter.json"), "w").write(json.dumps(config))
            stage1s[seed] = stage1s.get(seed, -1) + 1  # trained again (a lost folder), it scores 1 point more
            with open(os.path.join(out, "stage1", "log.jsonl"), "w") as f:
                f.write(json.dumps({"step": 1, "val_macro_f1": 0.7 + 0.01 * stage1s[seed]}) + "\n"
                        + json.dumps({"step": 2}) + "\n")
        rows = []
        for lr in ([None] if method in train.EVAL_ONLY else [float(x) for x in flag("--lr").split(",")]):
            score = fake_score(lang, method, lr, seed) + (0.07 if flag("--source") == "residual" else 0.0)
            row = {"method": method, "accuracy": score + 0.1, "macro_f1": score, "seconds": 0.0, "cpu_seconds": 0.0}
            if lr is not None:
                row |= {"lr": lr, "val_macro_f1": score}
            if method == "flare":
                row["mismatched_source_macro_f1"] = 0.2
            rows.append(row)
        return {method: {**max(rows, key=lambda r: r.get("val_macro_f1", 0)), "runs": rows} if len(rows) > 1
                else rows[0]}
    monkeypatch.setattr(train, "main", main)
    return calls


def args_for(tmp_path):
    return ["--model", "gemma", "--runs", str(tmp_path / "runs"), "--data-dir", str(tmp_path)]


def test_the_grid_runs_every_method_once_and_a_second_start_runs_nothing(fake_main, tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "ROOT", tmp_path)
    experiment.main(args_for(tmp_path))
    records = experiment.read_records(tmp_path / "experiment" / "nusax-gemma3-270m.jsonl")

    assert len(records) == experiment.EXPECTED == len({experiment.key(r) for r in records})
    # per seed: zero-shot on the first language with stage 1, translate-test, the other languages' zero-shot, and per
    # language each trained method at each rate, then input fusion at one
    langs, rates = len(experiment.LANGS), len(experiment.RATES)
    assert len(fake_main) == len(experiment.SEEDS) * (2 + (langs - 1) + langs * (2 * rates + 1))
    assert sum(1 for argv in fake_main if "--stage1" not in argv and "--resume" not in argv) == len(experiment.SEEDS)
    assert all(r["val_macro_f1"] == 0.7 and r["seconds"] == 0.0 for r in records if r["method"] == "stage1")
    every = (tmp_path / "experiment" / "nusax-gemma3-270m.md").read_text().split("Every run made")[1]
    assert sum(line.startswith("| ") for line in every.splitlines()) == 1 + len(records)  # a head, a line per run

    calls = len(fake_main)
    experiment.main(args_for(tmp_path))
    assert len(fake_main) == calls


def test_input_fusion_runs_at_the_rate_lora_chose_on_validation(fake_main, tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "ROOT", tmp_path)
    experiment.main(args_for(tmp_path))

    fusion = [argv for argv in fake_main if "input-fusion" in argv]
    rates = {(argv[argv.index("--lang") + 1], argv[argv.index("--seed") + 1]): argv[argv.index("--lr") + 1]
             for argv in fusion}
    first, second = (f"{lr:g}" for lr in experiment.RATES)
    assert rates[("sun", "1")] == second and rates[("jav", "1")] == first and len(rates) == 9


def test_each_ablation_runs_once_per_language_and_seed_at_the_rate_its_method_chose(fake_main, tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "ROOT", tmp_path)
    experiment.main(args_for(tmp_path))
    calls = len(fake_main)
    experiment.main(args_for(tmp_path) + ["--ablations", "residual,epochs4,again"])  # after the grid: these alone

    ablations = [(argv, train.parse_args(argv)) for argv in fake_main[calls:]]  # what train.py makes of the flags
    pairs = len(experiment.SEEDS) * len(experiment.LANGS)
    residual = [(argv, a) for argv, a in ablations if a.source == "residual"]
    assert len(residual) == pairs and all(a.methods == ["flare"] and a.epochs == 2 for _, a in residual)
    longer = [a for _, a in ablations if a.epochs == 4]
    assert sorted(m for a in longer for m in a.methods) == ["flare"] * pairs + ["lora"] * pairs
    assert all(a.source == "normed" for a in longer)
    again = [a for _, a in ablations if a.epochs == 2 and a.source == "normed"]  # the budget's flags, unchanged
    assert sorted(m for a in again for m in a.methods) == ["flare"] * pairs + ["lora"] * pairs
    assert len(ablations) == 5 * pairs
    first, second = experiment.RATES  # flare and lora are best at the second rate on sun only
    assert all(float(a.lr) == (second if a.lang == "sun" else first) for _, a in ablations)  # --lr is a list
    table = (tmp_path / "experiment" / "nusax-gemma3-270m.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| flare, residual source |"))
    jav = [fake_score("jav", "flare", experiment.RATES[0], s) + 0.07 for s in experiment.SEEDS]
    assert row.split("|")[2].strip() == f"{100 * statistics.mean(jav):.1f} ± {100 * statistics.stdev(jav):.1f}"
    assert any(line.startswith("| lora, 4 epochs |") for line in table.splitlines())
    assert f"{experiment.EXPECTED} of {experiment.EXPECTED} runs" in table and "PARTIAL" not in table

    experiment.main(args_for(tmp_path) + ["--ablations", "residual,epochs4,again"])
    assert len(fake_main) == calls + len(ablations)


def test_an_interrupted_grid_goes_on_where_it_stopped(fake_main, tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "ROOT", tmp_path)
    real = train.main

    def stop_in_the_fifth_call(argv):  # as train.main stops in training: args.json and a checkpoint, no result
        if len(fake_main) == 4:
            out = argv[argv.index("--out") + 1]
            method = argv[argv.index("--methods") + 1]
            os.makedirs(os.path.join(out, method))
            open(os.path.join(out, "args.json"), "w").write("{}")
            open(os.path.join(out, method, "checkpoint.pt"), "w").write("")
            fake_main.append(argv)
            raise SystemExit("interrupted")
        return real(argv)
    monkeypatch.setattr(train, "main", stop_in_the_fifth_call)
    with pytest.raises(SystemExit):
        experiment.main(args_for(tmp_path))
    assert len(experiment.read_records(tmp_path / "experiment" / "nusax-gemma3-270m.jsonl")) == 5  # 4 runs, 5 records
    stopped = fake_main[4]

    monkeypatch.setattr(train, "main", real)
    experiment.main(args_for(tmp_path))
    records = experiment.read_records(tmp_path / "experiment" / "nusax-gemma3-270m.jsonl")
    assert len(records) == experiment.EXPECTED == len({experiment.key(r) for r in records})
    assert fake_main[5] == stopped + ["--resume"]  # the stopped run continued, and its record says so
    flag = lambda name: stopped[stopped.index(name) + 1]
    resumed = [r for r in records if r["resumed"]]
    assert [(r["language"], r["method"], r["rate"]) for r in resumed] == [
        (flag("--lang"), flag("--methods"), float(flag("--lr")))]
    assert all(r["threads"] == torch.get_num_threads() and r["model_sha256"] is None for r in records)  # no weights
    assert all(r["cpu"].endswith(f", {torch.backends.cpu.get_cpu_capability()}") for r in records)


def test_the_model_digest_hashes_the_config_less_its_transformers_version_then_the_weights_in_name_order(tmp_path):
    files = {"config.json": b'{"transformers_version": "5.24.0"}', "model-00002-of-00002.safetensors": b"second",
             "model-00001-of-00002.safetensors": b"first", "tokenizer.json": b"not hashed"}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)

    assert experiment.model_digest(tmp_path) == hashlib.sha256(b"{}firstsecond").hexdigest()[:16]
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"secont")
    assert experiment.model_digest(tmp_path) == hashlib.sha256(b"{}firstsecont").hexdigest()[:16]
    (tmp_path / "config.json").write_text('{"transformers_version": "5.25.0"}')  # converted by another release
    assert experiment.model_digest(tmp_path) == hashlib.sha256(b"{}firstsecont").hexdigest()[:16]
    (tmp_path / "config.json").write_text('{"z": 1, "a": 2}')
    assert experiment.model_digest(tmp_path) == hashlib.sha256(b'{"a": 2, "z": 1}firstsecont').hexdigest()[:16]
    assert experiment.model_digest(tmp_path / "nothing-here") is None


def test_the_table_takes_each_seed_at_its_best_rate_on_validation(fake_main, tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "ROOT", tmp_path)
    experiment.main(args_for(tmp_path))
    table = (tmp_path / "experiment" / "nusax-gemma3-270m.md").read_text()

    # sun is best at the second rate, the others at the first
    sun = [fake_score("sun", "flare", experiment.RATES[1], s) for s in experiment.SEEDS]
    jav = [fake_score("jav", "flare", experiment.RATES[0], s) for s in experiment.SEEDS]
    row = next(line for line in table.splitlines() if line.startswith("| flare |"))
    cells = [c.strip() for c in row.split("|")[2:-1]]
    assert cells[0] == f"{100 * statistics.mean(jav):.1f} ± {100 * statistics.stdev(jav):.1f}"
    assert cells[2] == f"{100 * statistics.mean(sun):.1f} ± {100 * statistics.stdev(sun):.1f}"
    assert "PARTIAL" not in table and f"{experiment.EXPECTED} of {experiment.EXPECTED} runs" in table


def test_the_paired_differences_subtract_the_runs_of_one_language_and_seed(fake_main, tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "ROOT", tmp_path)
    experiment.main(args_for(tmp_path) + ["--ablations", "residual"])
    lines = (tmp_path / "experiment" / "nusax-gemma3-270m.md").read_text().splitlines()
    row = lambda name: [c.strip() for c in next(ln for ln in lines if ln.startswith(f"| {name} |")).split("|")[2:-1]]

    pairs = [(lang, seed) for lang in experiment.LANGS for seed in experiment.SEEDS]
    best = lambda lang: experiment.RATES[1] if lang == "sun" else experiment.RATES[0]  # on validation, as fake_score
    control = [100 * (fake_score(lang, "flare", best(lang), seed) - 0.2) for lang, seed in pairs]
    assert row("flare - control") == [f"{v:+.1f}" for v in control] + [f"{statistics.mean(control):+.1f}", "9 of 9"]
    assert row("flare-residual - flare") == ["+7.0"] * len(pairs) + ["+7.0", f"{len(pairs)} of {len(pairs)}"]
    assert not any(ln.startswith("| lora-epochs4 - lora |") for ln in lines)  # not run: no row


def test_a_partial_table_says_so_and_counts_the_seeds(fake_main, tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "ROOT", tmp_path)
    experiment.main(args_for(tmp_path))
    path = tmp_path / "experiment" / "nusax-gemma3-270m.jsonl"
    records = [r for r in experiment.read_records(path) if r["seed"] == experiment.SEEDS[0]]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))

    table = experiment.summary(experiment.read_records(path), "cpu")
    assert "PARTIAL" in table and "(n=1)" in table and " ± " not in table.split("\n\n")[1]


# ------------------------------------------------------------------------------------------ train.run_method

def test_each_result_row_records_the_seconds_its_training_and_testing_took(tiny_model, tmp_path, monkeypatch):  # noqa: F811
    real, pause = train.evaluate, 0.3

    def slow_evaluate(*args, **kwargs):
        time.sleep(pause)  # wall-clock time, no CPU time
        return real(*args, **kwargs)
    monkeypatch.setattr(train, "evaluate", slow_evaluate)
    results = run(tiny_model, tmp_path, "--methods", "zero-shot,lora", "--lr", "5e-3,1e-2")

    assert pause <= results["zero-shot"]["seconds"] < 30 * pause
    assert 0 < results["zero-shot"]["cpu_seconds"] < results["zero-shot"]["seconds"]
    for row in results["lora"]["runs"]:  # two validations (--eval-every 1, two steps) and the test, per rate
        assert 3 * pause <= row["seconds"] < 4 * pause + 30


def test_a_seed_split_over_languages_runs_each_run_once(fake_main, tmp_path, monkeypatch):
    """--langs bug after --langs jav,sun on the same seed: the second runs bug's runs only, on the first's stage 1."""
    monkeypatch.setattr(experiment, "ROOT", tmp_path)
    seed = str(experiment.SEEDS[0])
    experiment.main(args_for(tmp_path) + ["--seeds", seed, "--langs", "sun,jav"])
    calls = len(fake_main)
    experiment.main(args_for(tmp_path) + ["--seeds", seed, "--langs", "bug"])

    later = [argv[argv.index("--lang") + 1] for argv in fake_main[calls:]]
    assert later == ["bug"] * (2 + 2 * len(experiment.RATES)) and all("--stage1" in argv for argv in fake_main[calls:])
    records = experiment.read_records(tmp_path / "experiment" / "nusax-gemma3-270m.jsonl")
    assert len(records) == experiment.EXPECTED // len(experiment.SEEDS) == len({experiment.key(r) for r in records})


def test_two_processes_on_different_seeds_fill_one_record_file(fake_main, tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "ROOT", tmp_path)
    first, rest = experiment.SEEDS[0], experiment.SEEDS[1:]
    experiment.main(args_for(tmp_path) + ["--seeds", str(first)])
    assert {r["seed"] for r in experiment.read_records(tmp_path / "experiment" / "nusax-gemma3-270m.jsonl")} == {first}

    experiment.main(args_for(tmp_path) + ["--seeds", ",".join(map(str, rest))])
    records = experiment.read_records(tmp_path / "experiment" / "nusax-gemma3-270m.jsonl")
    assert len(records) == experiment.EXPECTED == len({experiment.key(r) for r in records})
    assert "PARTIAL" not in (tmp_path / "experiment" / "nusax-gemma3-270m.md").read_text()


def test_a_lost_run_folder_trains_stage_1_again_only_for_the_runs_still_to_come(fake_main, tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "ROOT", tmp_path)
    experiment.main(args_for(tmp_path))
    path = tmp_path / "experiment" / "nusax-gemma3-270m.jsonl"
    seed = experiment.SEEDS[1]
    lost = lambda r: (r["language"], r["method"], r["seed"]) == ("sun", "lora", seed)
    records = [r for r in experiment.read_records(path) if not lost(r)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    for d in (tmp_path / "runs").iterdir():  # runs/ is not committed: a fresh clone has only the records
        shutil.rmtree(d)

    calls = len(fake_main)
    experiment.main(args_for(tmp_path))
    again = [[argv[argv.index(flag) + 1] for flag in ("--methods", "--lang")] for argv in fake_main[calls:]]
    assert again == [["zero-shot", "jav"], ["lora", "sun"], ["lora", "sun"]]  # stage 1 in its first run, then
    # the runs that need it, one per rate
    records = experiment.read_records(path)
    assert len({experiment.key(r) for r in records if r["method"] != "stage1-again"}) == experiment.EXPECTED
    again = [r for r in records if r["method"] == "stage1-again"]  # recorded beside the first, which stays
    assert [(r["seed"], r["val_macro_f1"]) for r in again] == [(seed, 0.71)]
    assert [r["val_macro_f1"] for r in records if r["method"] == "stage1" and r["seed"] == seed] == [0.7]
    read = lambda r: (r["language"], r["method"], r["seed"], r["stage1_val_macro_f1"])
    assert sorted(read(r) for r in records if r["seed"] == seed and r.get("stage1_val_macro_f1") == 0.71) == \
        [("sun", "lora", seed, 0.71)] * len(experiment.RATES)  # each record names the stage 1 it read
    assert all(r["stage1_val_macro_f1"] == 0.7 for r in records if r["method"] not in ("stage1", "stage1-again")
               and r["stage1_val_macro_f1"] != 0.71)
    table = (tmp_path / "experiment" / "nusax-gemma3-270m.md").read_text()
    assert "PARTIAL" not in table and "| stage1-again | en |" in table


def test_records_elsewhere_run_the_grid_afresh_and_leave_the_default_records_alone(fake_main, tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "ROOT", tmp_path)
    experiment.main(args_for(tmp_path) + ["--seeds", "2", "--langs", "sun"])
    default = tmp_path / "experiment" / "nusax-gemma3-270m.jsonl"
    before = default.read_text()
    other = tmp_path / "repeat" / "other-machine.jsonl"
    experiment.main(args_for(tmp_path) + ["--runs", str(tmp_path / "runs-again"), "--seeds", "2", "--langs", "sun",
                                          "--records", str(other)])  # the last --runs wins

    assert default.read_text() == before
    again = experiment.read_records(other)
    assert sorted(map(experiment.key, again)) == sorted(map(experiment.key, experiment.read_records(default)))
    assert other.with_suffix(".md").read_text().startswith("Gemma 3 270M base on NusaX-senti")


@pytest.mark.parametrize("capability, preset, runs_again", [("AVX512", None, True), ("AVX2", None, False),
                                                            ("AVX512", "avx512", False), ("DEFAULT", None, False)])
def test_the_cpu_budget_runs_on_avx2_kernels_where_the_cpu_has_avx512(monkeypatch, capability, preset, runs_again):
    class Exec(Exception):
        pass

    def execve(path, argv, env):
        raise Exec(path, argv, env)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(os, "execve", execve)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    if preset:
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", preset)
    if runs_again:
        with pytest.raises(Exec) as e:
            experiment.same_kernels(["--seeds", "2"])
        path, argv, env = e.value.args
        assert argv[1:] == [os.path.abspath(experiment.__file__), "--seeds", "2"] and path == argv[0]
        assert env["ATEN_CPU_CAPABILITY"] == "avx2"
    else:
        experiment.same_kernels(["--seeds", "2"])  # returns: this process goes on
