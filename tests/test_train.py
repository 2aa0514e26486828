"""train.py: the pipeline end to end at a toy size, resume after Ctrl-C or a crash, NaN stop, atomic checkpoints,
flag errors, bf16 autocast, progress output.

Every run is train.main in-process on the CPU demo (--model tiny --task synth) at a few steps per stage. The tiny
model is pretrained once, for a handful of steps (it only has to run, not to be good), and copied into each run's
--out, where main finds it as <out>/tiny-model and skips pretraining.
"""
import glob
import json
import math
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

import flare
import synth
import train

# 16 target and 32 English examples in batches of 8, one epoch: stage 1 is 4 steps, each trained method 2.
SMALL = ["--model", "tiny", "--task", "synth", "--max-train", "16", "--stage1-max-train", "32", "--max-eval", "16",
         "--batch-size", "8", "--epochs", "1", "--eval-every", "1", "--lr", "5e-3"]  # one rate: one folder per method


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """Folder of the tiny synth model, pretrained for 5 steps."""
    folder = str(tmp_path_factory.mktemp("pretrained") / "tiny-model")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(synth, "PRETRAIN_STEPS", 5)
        synth.pretrain_tiny(folder, 100, torch.device("cpu"))
    return folder


def run(tiny_model, out, *flags):
    """train.main on SMALL with flags on top (a later flag wins), the pretrained tiny model copied into out."""
    if not os.path.exists(os.path.join(out, "tiny-model")):
        shutil.copytree(tiny_model, os.path.join(out, "tiny-model"))
    return train.main(SMALL + ["--out", str(out), *flags])


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def count_calls(monkeypatch, fail_at=None, error=None, nan_at=None):
    """Wraps train.lm_loss (called once per training micro-batch, after the forward) with a counter; at call
    fail_at it raises error instead, at call nan_at it returns NaN. Returns one entry per call: the dtype autocast
    was running in (None when off)."""
    real, calls = train.lm_loss, []

    def lm_loss(logits, targets):
        calls.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        if len(calls) == fail_at:
            raise error
        loss = real(logits, targets)
        return loss * float("nan") if len(calls) == nan_at else loss
    monkeypatch.setattr(train, "lm_loss", lm_loss)
    return calls


# ------------------------------------------------------------------------------------------ the pipeline

def test_demo_pipeline_writes_every_method_result_log_and_adapter(tiny_model, tmp_path):
    results = run(tiny_model, tmp_path, "--methods", ",".join(train.METHODS))

    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert list(results) == list(train.METHODS)
    for method, row in results.items():
        assert row["method"] == method
        for key in ("accuracy", "macro_f1"):
            assert 0.0 <= row[key] <= 1.0, (method, key, row[key])
    for method in ("flare", "lora", "input-fusion"):
        assert 0.0 <= results[method]["val_accuracy"] <= 1.0
        log = read_log(tmp_path / method / "log.jsonl")
        assert [r["step"] for r in log] == [1, 2]
        assert all(math.isfinite(r["loss"]) and "val_accuracy" in r for r in log)  # --eval-every 1
        assert (tmp_path / method / "adapter" / "adapter.safetensors").exists()
        assert json.loads((tmp_path / method / "adapter" / "adapter.json").read_text())["fusion"] == \
            ("add_relu" if method == "flare" else None)
    assert 0.0 <= results["flare"]["mismatched_source_accuracy"] <= 1.0
    assert not any("mismatched_source_accuracy" in results[m] for m in train.METHODS if m != "flare")
    assert len(read_log(tmp_path / "stage1" / "log.jsonl")) == 4
    assert (tmp_path / "stage1" / "adapter" / "adapter.safetensors").exists()
    assert not (tmp_path / "zero-shot").exists() and not (tmp_path / "translate-test").exists()  # nothing trained
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {m} |" in table for m in train.METHODS)


def test_two_learning_rates_train_both_and_report_the_better_on_validation(tiny_model, tmp_path):
    results = run(tiny_model, tmp_path, "--methods", "lora", "--lr", "1e-3,2e-2")

    row = results["lora"]
    assert [r["lr"] for r in row["runs"]] == [1e-3, 2e-2]
    assert row["val_accuracy"] == max(r["val_accuracy"] for r in row["runs"])
    assert row["lr"] in (1e-3, 2e-2) and {k: v for k, v in row.items() if k != "runs"} in row["runs"]
    logs = [read_log(tmp_path / "lora" / sub / "log.jsonl") for sub in ("lr0.001", "lr0.02")]
    assert logs[0][0]["lr"] != logs[1][0]["lr"] and logs[0][1]["loss"] != logs[1][1]["loss"]
    assert all((tmp_path / "lora" / sub / "adapter" / "adapter.safetensors").exists() for sub in ("lr0.001", "lr0.02"))


def test_the_adapter_kept_is_the_best_on_validation_not_the_last(tiny_model, tmp_path, monkeypatch):
    real, snapshots = train.evaluate, []

    def evaluate(model, tok, task, pairs, method, args, device):  # validation of lora: 1, 1/2, ...: step 1 is best
        if method == "lora" and pairs[0].id.startswith("synth-validation"):
            snapshots.append({k: v.clone() for k, v in flare.adapter_state(model, "transfer").items()})
            return {"accuracy": 1 / len(snapshots)}
        return real(model, tok, task, pairs, method, args, device)
    monkeypatch.setattr(train, "evaluate", evaluate)
    results = run(tiny_model, tmp_path, "--stage1-max-train", "16", "--methods", "lora")

    saved = load_file(tmp_path / "lora" / "adapter" / "adapter.safetensors")
    assert len(snapshots) == 2 and results["lora"]["val_accuracy"] == 1.0
    assert all(torch.equal(saved[k], snapshots[0][k]) for k in saved)
    assert not all(torch.equal(saved[k], snapshots[1][k]) for k in saved)


# ------------------------------------------------------------------------------------------ resume
# Resumed losses equal uninterrupted ones only if everything a step depends on comes back: the adapter, AdamW's
# moments, the schedule, the data order (a function of the step) and the random state of dropout (on here, 0.1,
# so a wrong random state shows). Two epochs, so the resumed run crosses an epoch boundary into a new order.
RESUME = ["--methods", "flare", "--dropout", "0.1", "--max-train", "32", "--max-eval", "8", "--epochs", "2",
          "--eval-every", "2"]
STAGE1_STEPS = FLARE_STEPS = 8  # 32 examples, batches of 8, two epochs


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    return out, run(tiny_model, out, *RESUME)


def same_logs(a, b):
    """Every record of log a equals b's, tokens per second aside."""
    strip = lambda log: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in log]
    a, b = strip(read_log(a)), strip(read_log(b))
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra == pytest.approx(rb, rel=1e-6, abs=1e-7), (ra, rb)


def untimed(results):
    """results.json without the seconds each run took, which differ from run to run."""
    strip = lambda row: {k: [strip(r) for r in v] if k == "runs" else v for k, v in row.items()
                         if k not in ("seconds", "cpu_seconds")}
    return {method: strip(row) for method, row in results.items()}


def assert_same_run(uninterrupted, out, results):
    ref_out, ref_results = uninterrupted
    same_logs(ref_out / "stage1" / "log.jsonl", out / "stage1" / "log.jsonl")
    same_logs(ref_out / "flare" / "log.jsonl", out / "flare" / "log.jsonl")
    assert untimed(results) == untimed(ref_results)
    for stage in ("stage1", "flare"):
        ref, got = (load_file(o / stage / "adapter" / "adapter.safetensors") for o in (ref_out, out))
        assert all(torch.allclose(ref[k], got[k], rtol=1e-6, atol=1e-7) for k in ref)


@pytest.mark.parametrize("stage, step", [("stage1", 3), ("flare", 6)])
def test_run_resumed_after_ctrl_c_mid_step_reaches_the_same_losses(tiny_model, tmp_path, monkeypatch, uninterrupted,
                                                                   stage, step):
    call = step if stage == "stage1" else STAGE1_STEPS + step  # Ctrl-C inside `step`, after its forward pass
    with monkeypatch.context() as mp:
        count_calls(mp, fail_at=call, error=KeyboardInterrupt())
        with pytest.raises(SystemExit, match=f"interrupted at step {step - 1}; checkpoint saved"):
            run(tiny_model, tmp_path, *RESUME)  # --save-every 200: the checkpoint is the Ctrl-C one
    assert torch.load(tmp_path / stage / "checkpoint.pt", weights_only=False)["step"] == step - 1

    calls = count_calls(monkeypatch)
    results = run(tiny_model, tmp_path, *RESUME, "--resume")

    done = step - 1 if stage == "stage1" else STAGE1_STEPS + step - 1
    assert len(calls) == STAGE1_STEPS + FLARE_STEPS - done  # it went on from the checkpoint, not from the start
    assert_same_run(uninterrupted, tmp_path, results)


def test_run_resumed_after_a_crash_goes_on_from_the_last_periodic_checkpoint(tiny_model, tmp_path, monkeypatch,
                                                                             uninterrupted):
    with monkeypatch.context() as mp:
        count_calls(mp, fail_at=STAGE1_STEPS + 6, error=RuntimeError("the machine went away"))
        with pytest.raises(RuntimeError, match="went away"):
            run(tiny_model, tmp_path, *RESUME, "--save-every", "4")
    assert torch.load(tmp_path / "flare" / "checkpoint.pt", weights_only=False)["step"] == 4
    assert len(read_log(tmp_path / "flare" / "log.jsonl")) == 5  # step 5, logged past the checkpoint, runs again

    calls = count_calls(monkeypatch)
    results = run(tiny_model, tmp_path, *RESUME, "--save-every", "4", "--resume")

    assert len(calls) == FLARE_STEPS - 4
    assert_same_run(uninterrupted, tmp_path, results)


# ------------------------------------------------------------------------------------------ failures

def test_nan_loss_stops_with_the_last_periodic_checkpoint_intact(tiny_model, tmp_path, monkeypatch):
    count_calls(monkeypatch, nan_at=5)  # stage 1, step 5 of 6
    with pytest.raises(FloatingPointError) as e:
        run(tiny_model, tmp_path, "--stage1-max-train", "48", "--save-every", "2")

    ckpt = str(tmp_path / "stage1" / "checkpoint.pt")
    assert ckpt in str(e.value) and "--lr" in str(e.value) and "--resume" in str(e.value)
    saved = torch.load(ckpt, weights_only=False)
    assert saved["step"] == 4
    assert all(torch.isfinite(t).all() for t in saved["adapter"].values())
    assert [r["step"] for r in read_log(tmp_path / "stage1" / "log.jsonl")] == [1, 2, 3, 4]  # no NaN record
    assert glob.glob(str(tmp_path / "**" / "*.tmp"), recursive=True) == []


def test_checkpoint_is_replaced_atomically_so_a_failed_save_keeps_the_previous_one(tiny_model, tmp_path, monkeypatch):
    ckpt, real_save, saves, before = tmp_path / "stage1" / "checkpoint.pt", torch.save, [], []

    def save(obj, f, *a, **kw):  # the second save (step 2) dies half-way through writing
        saves.append(f)
        if len(saves) == 2:
            before.append(ckpt.read_bytes())
            with open(f, "wb") as half:
                half.write(b"half a checkpoint")
            raise OSError("No space left on device")
        return real_save(obj, f, *a, **kw)
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError, match="No space left"):
        run(tiny_model, tmp_path, "--save-every", "1")

    assert ckpt.read_bytes() == before[0]
    assert torch.load(ckpt, weights_only=False)["step"] == 1


@pytest.mark.parametrize("flags, message", [
    (["--model", "tiny", "--task", "mnli"], "unknown task 'mnli'; choose one of xnli, nusax, tydiqa, synth"),
    (["--model", "llama3.1-8b", "--lang", "xx"], "--lang 'xx' is not a target language of xnli; choose one of ar, bg"),
    (["--model", "tiny", "--lang", "sw"], "--lang 'sw' is not a target language of synth; choose one of syn"),
    (["--model", "tiny", "--methods", "flare,lora2"],
     "unknown method(s) ['lora2']; choose from flare, lora, input-fusion"),
    (["--model", "tiny", "--task", "xnli"], "--model tiny is the CPU demo and knows only --task synth"),
    (["--model", "llama3.1-8b", "--task", "synth"], "--task synth needs --model tiny"),
    (["--model", "tiny", "--lr", "fast"], "--lr 'fast' is not a number"),
    (["--model", "tiny", "--rank", "0"], "--rank must be at least 1"),
    (["--model", "tiny", "--epochs", "-1"], "--epochs and --lr must be positive"),
    (["--model", "tiny", "--stage1", "/nonexistent"], "--stage1 /nonexistent holds no adapter.json"),
    (["--model", "llama3.1-8b", "--data-dir", "/nonexistent"], "--data-dir /nonexistent is not a folder: point it to"),
    (["--model", "tiny", "--data-dir", "."], "--task synth is generated here and reads no files: leave out --data-dir"),
])
def test_bad_flags_exit_with_usage_error_saying_what_is_allowed(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(flags)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ precision and output

def test_training_runs_under_bf16_autocast_on_cpu(tiny_model, tmp_path, monkeypatch):
    autocast = count_calls(monkeypatch)
    run(tiny_model, tmp_path, "--precision", "bf16", "--stage1-max-train", "16", "--methods", "flare",
        "--max-eval", "4", "--eval-every", "2")

    assert autocast == [torch.bfloat16] * 4  # 2 stage-1 steps, 2 FLARE steps
    for stage in ("stage1", "flare"):
        assert all(math.isfinite(r["loss"]) for r in read_log(tmp_path / stage / "log.jsonl"))


def test_progress_line_shows_step_loss_lr_throughput_and_time_left(tiny_model, tmp_path, capsys):
    run(tiny_model, tmp_path, "--stage1-max-train", "16", "--methods", "lora")

    err = capsys.readouterr().err
    for label in ("english", "lora"):
        line = rf"^{label} lr 0.005 \[#{{20}}\] 2/2 loss \d+\.\d{{4}} lr \d\.\d\de[-+]\d\d [\d,]+ tok/s \d+:\d\d left$"
        assert re.search(line, err, re.M), err
