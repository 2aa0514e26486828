"""Bad input and faults: a run folder is never wiped or mixed, SIGTERM saves like Ctrl-C, damaged files are named
with what to do, bad flags are refused at parse time, and a user error ends in one line, not a traceback.

Each case asserts the message and that nothing already done was lost (every file of the run still byte for byte
what it was). Runs are train.main in-process on the CPU demo at a few steps per stage, as in test_train.py; a
subprocess only where a signal or the real command line is the point.
"""
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import data
import flare
import model
import synth
import train
from test_train import SMALL, count_calls, read_log, run, same_logs, tiny_model, untimed  # noqa: F401 (a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINISHED = ["--methods", "lora", "--stage1-max-train", "16"]  # on SMALL: stage 1 is 2 steps, lora 2


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory):  # noqa: F811
    """A finished run (stage 1 and lora), never changed: tests copy it."""
    out = tmp_path_factory.mktemp("finished")
    return out, run(tiny_model, out, *FINISHED)


@pytest.fixture
def done(finished, tmp_path):
    """A copy of the finished run to damage or continue."""
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    return out


def files(out):
    """Every file under out with its bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(pathlib.Path(out).rglob("*")) if p.is_file()}


def cut(path, keep=0.5):
    """The file cut to a share of its bytes, as a crash or a full disk leaves it."""
    raw = path.read_bytes()
    path.write_bytes(raw[:int(len(raw) * keep)])


def edit_json(path, edit):
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def main(out, *flags):
    """train.main on SMALL with flags on top, into out as it is (no tiny model copied in)."""
    return train.main(SMALL + ["--out", str(out), *flags])


# ------------------------------------------------------------------------------------------ the run folder

@pytest.mark.parametrize("flags", [FINISHED, ["--methods", "flare", "--stage1-max-train", "16"]],
                         ids=["same command", "other method"])
def test_rerun_into_a_finished_run_without_resume_refuses_and_keeps_every_file(done, flags):
    before = files(done)
    with pytest.raises(train.UsageError, match=re.escape(
            f"{done} holds a run (lora, results.json, results.md, stage1): add --resume to continue it, pick another "
            f"--out for a new run, or add --overwrite to delete it and start over.")):
        main(done, *flags)
    assert files(done) == before


def test_overwrite_deletes_the_old_run_and_starts_over(done):
    results = main(done, "--methods", "zero-shot", "--stage1-max-train", "16", "--overwrite")

    assert list(results) == ["zero-shot"] and json.loads((done / "results.json").read_text()) == results
    assert not (done / "lora").exists()  # the old method's folder went with its results
    assert [r["step"] for r in read_log(done / "stage1" / "log.jsonl")] == [1, 2]  # trained again, not appended
    assert json.loads((done / "args.json").read_text())["methods"] == ["zero-shot"]
    assert (done / "tiny-model" / "model.safetensors").exists()  # the base model is no part of a run


@pytest.mark.parametrize("flags, changes", [
    (["--lr", "1e-2"], ["--lr 0.005 in the run, 0.01 now"]),
    (["--batch-size", "4"], ["--batch-size 8 in the run, 4 now"]),
    (["--fusion", "mul"], ["--fusion add_relu in the run, mul now"]),
    (["--rank", "4"], ["--rank 8 in the run, 4 now"]),
    (["--alpha", "8"], ["--alpha 16 in the run, 8 now"]),
    (["--dropout", "0.1"], ["--dropout 0 in the run, 0.1 now"]),
    (["--epochs", "2"], ["--epochs 1 in the run, 2 now"]),
    (["--seed", "1"], ["--seed 100 in the run, 1 now"]),
    (["--max-eval", "8"], ["--max-eval 16 in the run, 8 now"]),
    (["--precision", "bf16"], ["--precision auto in the run, bf16 now"]),
    (["--stage1-lr", "1e-3", "--source", "residual"],
     ["--source normed in the run, residual now", "--stage1-lr 0.005 in the run, 0.001 now"]),
])
def test_resume_refuses_changed_training_flags_naming_both_values(done, flags, changes):
    before = files(done)
    with pytest.raises(train.UsageError, match=r"--resume: the run in .* has other flags: ") as e:
        main(done, *FINISHED, *flags, "--resume")
    assert all(change in str(e.value) for change in changes), str(e.value)
    assert str(e.value).count(" now") == len(changes)  # only the flags that changed
    assert f"Continue it with its own flags ({done / 'args.json'})" in str(e.value)
    assert files(done) == before


def test_resume_takes_flags_that_do_not_change_training_and_adds_a_method(done, finished):
    before = files(done)
    results = main(done, "--methods", "lora,zero-shot", "--stage1-max-train", "16", "--lr", "0.005",  # 5e-3 before
                   "--eval-every", "2", "--save-every", "1", "--checkpointing", "--resume")

    assert list(results) == ["lora", "zero-shot"] and results["lora"] == finished[1]["lora"]
    after = files(done)
    assert all(after[name] == raw for name, raw in before.items() if name not in ("args.json", "results.json",
                                                                                  "results.md"))
    assert json.loads(after["args.json"])["methods"] == ["lora", "zero-shot"]


def test_resume_in_a_folder_without_a_run_says_so_and_creates_nothing(tmp_path):
    out = tmp_path / "runs" / "tiny-synht-syn"  # a typo
    with pytest.raises(train.UsageError, match=re.escape(
            f"--resume: there is no run in {out} to continue (it has no args.json); check --out, or leave out "
            f"--resume to start a run there.")):
        main(out, "--resume")
    assert not out.exists()


def test_overwrite_refuses_to_delete_the_stage1_adapter_it_is_told_to_reuse(done):
    before = files(done)
    stage1 = str(done / "stage1" / "adapter")
    with pytest.raises(train.UsageError, match=re.escape(f"--stage1 {stage1} lies in {done}, which --overwrite "
                                                         f"deletes: copy the adapter elsewhere first.")):
        main(done, *FINISHED, "--stage1", stage1, "--overwrite")
    assert files(done) == before


# ------------------------------------------------------------------------------------------ SIGTERM

SIGTERM_AT_CALL = """
import os, signal, sys
import train
real, calls = train.lm_loss, []
def lm_loss(logits, labels):  # a scheduler's SIGTERM while step {call} runs
    calls.append(1)
    if len(calls) == {call}:
        os.kill(os.getpid(), signal.SIGTERM)
    return real(logits, labels)
train.lm_loss = lm_loss
train.cli(sys.argv[1:])
"""


def test_sigterm_saves_a_checkpoint_and_resume_reaches_the_uninterrupted_run(tiny_model,  # noqa: F811
                                                                             tmp_path, finished):
    shutil.copytree(tiny_model, tmp_path / "tiny-model")
    script = SIGTERM_AT_CALL.replace("{call}", "2")  # stage 1, step 2 of 2
    proc = subprocess.run([sys.executable, "-c", script, *SMALL, *FINISHED, "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)

    assert proc.returncode == 1, proc.stderr
    assert "interrupted at step 1; checkpoint saved. Continue with the same command and --resume." in proc.stderr
    assert "Traceback" not in proc.stderr
    assert torch.load(tmp_path / "stage1" / "checkpoint.pt", weights_only=False)["step"] == 1

    results = run(tiny_model, tmp_path, *FINISHED, "--resume")

    ref_out, ref_results = finished
    assert untimed(results) == untimed(ref_results)
    for stage in ("stage1", "lora"):
        same_logs(ref_out / stage / "log.jsonl", tmp_path / stage / "log.jsonl")
        ref, got = (load_file(o / stage / "adapter" / "adapter.safetensors") for o in (ref_out, tmp_path))
        assert all(torch.allclose(ref[k], got[k], rtol=1e-6, atol=1e-7) for k in ref)


# ------------------------------------------------------------------------------------------ exit and traceback

def test_a_user_error_on_the_command_line_ends_in_one_line_and_a_nonzero_exit(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "--model", "./my-llama", "--out", str(tmp_path / "x")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)

    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "flare: the model folder ./my-llama does not exist: check the path (a local model is a folder with "
        "config.json, tokenizer.json and *.safetensors)."]


def test_an_internal_error_keeps_its_traceback(tiny_model, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # cli's SIGTERM handler stays out of pytest's process
    monkeypatch.setattr(train, "load_model", lambda *a, **k: 1 / 0)
    shutil.copytree(tiny_model, tmp_path / "tiny-model")
    with pytest.raises(ZeroDivisionError):  # not turned into a one-line exit
        train.cli(SMALL + ["--out", str(tmp_path)])


# ------------------------------------------------------------------------------------------ the model argument

def refuse_hub(*args, **kwargs):
    raise AssertionError("the Hub was asked")


@pytest.mark.parametrize("name, message", [
    ("./my-llama", "the model folder ./my-llama does not exist: check the path"),
    ("~/models/llama", "the model folder ~/models/llama does not exist"),
    ("my-llama", "unknown model 'my-llama': it is neither a local folder, nor a known alias (llama3.1-8b, "
                 "llama3.1-70b, "),  # the list goes on
    ("my-llama", "gemma3-27b), nor a Hub repo id (owner/name)."),
    ("config.json", "model config.json is a file: a local model is a folder with config.json"),
])
def test_a_model_that_is_no_folder_alias_or_repo_id_says_which_was_expected(tmp_path, monkeypatch, name, message):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(model.UsageError, match=re.escape(message)):
        model.load_model(name)


def test_a_repo_id_without_a_connection_says_it_is_no_local_folder_either(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("Please check your internet connection and try again.")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(
            "runs/llama is no local folder, and runs/llama could not be downloaded from the Hub nor found in its "
            "local cache")):
        model.load_model("runs/llama")


# ------------------------------------------------------------------------------------------ damaged files

@pytest.mark.parametrize("name, damage, message", [
    ("results.json", cut, "results.json is not valid JSON"),
    ("args.json", cut, "args.json is not valid JSON"),
    ("stage1/adapter/adapter.json", cut, "adapter.json is not valid JSON"),
    ("stage1/adapter/adapter.json", lambda p: edit_json(p, lambda c: c.pop("r")), "adapter.json has no r: the file "
                                                                                   "is incomplete; rerun the stage"),
    ("stage1/adapter/adapter.safetensors", cut, "adapter.safetensors is not a readable safetensors file"),
    ("tiny-model/config.json", cut, "config.json is not valid JSON"),
    ("tiny-model/config.json", lambda p: edit_json(p, lambda c: c.pop("hidden_size")),
     "config.json has no field 'hidden_size', which a llama config needs: the file is incomplete; download"),
    ("tiny-model/model.safetensors", cut, "model.safetensors is not a readable safetensors file"),
    ("tiny-model/tokenizer.json", cut, "tokenizer.json is not a readable tokenizer"),
], ids=["results.json cut", "args.json cut", "adapter.json cut", "adapter.json without r", "adapter cut",
        "config.json cut", "config.json without hidden_size", "model cut", "tokenizer cut"])
def test_a_damaged_file_is_named_with_what_to_do_and_nothing_else_changes(done, name, damage, message):
    """As if the run had crashed before testing lora, which reads the model and the stage-1 adapter again (a finished
    run reads neither: nothing is left to do with them)."""
    if name != "results.json":
        (done / "results.json").unlink()
    damage(done / name)
    before = files(done)
    with pytest.raises(train.UsageError) as e:
        main(done, *FINISHED, "--resume")
    assert str(done / name) in str(e.value) and message in str(e.value), str(e.value)
    assert re.search(r"(delete|rerun|restore|download)", str(e.value))  # what to do
    assert files(done) == before


@pytest.mark.parametrize("keep", [0.5, 0.0], ids=["cut", "empty"])
def test_a_damaged_checkpoint_is_named_with_how_to_go_on(done, keep):
    (done / "results.json").unlink()  # as if it crashed before testing lora: its checkpoint is read
    cut(done / "lora" / "checkpoint.pt", keep)
    before = files(done)
    with pytest.raises(train.UsageError, match=re.escape(
            f"{done / 'lora' / 'checkpoint.pt'} is not a readable checkpoint (")) as e:
        main(done, *FINISHED, "--resume")
    assert "delete it and rerun with --resume to train this stage again from its first step" in str(e.value)
    assert files(done) == before


def test_a_damaged_parquet_download_is_named(tmp_path, monkeypatch):
    path = tmp_path / "test-00000-of-00001.parquet"
    shutil.copy(os.path.join(ROOT, "tests", "fixtures", "xnli", "sw", "test-00000-of-00001.parquet"), path)
    cut(path)
    monkeypatch.setattr(data, "_download", lambda task, filename, cache_dir, data_dir: str(path))
    with pytest.raises(model.UsageError, match=re.escape(f"{path} is not a readable parquet file (")):
        data.load_pairs("xnli", "sw", "test")


# ------------------------------------------------------------------------------------------ files the tool repairs

def test_a_crash_while_saving_the_tiny_model_leaves_no_half_file_for_the_next_run(tmp_path, monkeypatch):
    import safetensors.torch
    real = safetensors.torch.save_file

    def dies_half_way(tensors, path, *args, **kwargs):
        real(tensors, path, *args, **kwargs)
        cut(pathlib.Path(path))
        raise OSError("No space left on device")
    monkeypatch.setattr(synth, "PRETRAIN_STEPS", 1)
    monkeypatch.setattr(synth, "save_file", dies_half_way)  # synth imports it at the top
    folder = tmp_path / "tiny-model"
    with pytest.raises(OSError, match="No space left"):
        synth.pretrain_tiny(str(folder), 100, torch.device("cpu"))
    assert not (folder / "model.safetensors").exists()  # so the next run pretrains instead of skipping

    monkeypatch.setattr(synth, "save_file", real)
    synth.pretrain_tiny(str(folder), 100, torch.device("cpu"))
    assert isinstance(model.load_model(str(folder), dtype=torch.float32), model.Transformer)


def test_a_half_written_last_line_of_the_translations_cache_is_translated_again(tmp_path, monkeypatch):
    from test_data import FIXTURES, fake_model
    monkeypatch.setattr(data, "_download",
                        lambda task, filename, cache_dir, data_dir: os.path.join(FIXTURES, task, filename))
    whole, path = tmp_path / "whole.jsonl", tmp_path / "cache.jsonl"
    fake_model.calls = 0
    data.translate_tydiqa("sw", "test", fake_model, str(whole), batch_size=2)
    lines = whole.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + lines[2][:len(lines[2]) // 2], encoding="utf-8")  # crashed in line 3

    fake_model.calls = 0
    assert data.translate_tydiqa("sw", "test", fake_model, str(path), batch_size=2) == 1

    assert path.read_text(encoding="utf-8") == whole.read_text(encoding="utf-8")
    assert fake_model.calls == 2  # one batch, the cut item's context and question: the first two items were kept


def test_a_log_cut_behind_its_checkpoint_is_repaired_on_resume(tiny_model, tmp_path, monkeypatch, capsys):  # noqa: F811
    flags = ["--methods", "zero-shot", "--stage1-max-train", "24"]  # stage 1: 3 steps
    with monkeypatch.context() as mp:
        count_calls(mp, fail_at=3, error=KeyboardInterrupt())
        with pytest.raises(SystemExit, match="interrupted at step 2; checkpoint saved"):
            run(tiny_model, tmp_path, *flags)
    log = tmp_path / "stage1" / "log.jsonl"
    first, second = log.read_text().splitlines(keepends=True)
    log.write_text(first + second[:len(second) // 2])  # the disk lost the log's tail: step 2's record is half there

    run(tiny_model, tmp_path, *flags, "--resume")

    assert [r["step"] for r in read_log(log)] == [1, 3]  # every line a record: step 3's was not glued to the half
    assert f"{log} lacks the records of steps 2 to 2" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ flags

@pytest.mark.parametrize("flags, message", [
    (["--max-train", "0"], "--max-train must be at least 1 (leave it out for all the data)"),
    (["--max-eval", "0"], "--max-eval must be at least 1 (leave it out for all the data)"),
    (["--stage1-max-train", "-5"], "--stage1-max-train must be at least 1"),
    (["--max-length", "0"], "--max-length must be at least 1 (leave it out for the task's length)"),
    (["--epochs", "nan"], "--epochs and --lr must be positive and finite (got --epochs nan"),
    (["--epochs", "inf"], "--epochs and --lr must be positive and finite (got --epochs inf"),
    (["--lr", "nan"], "--epochs and --lr must be positive and finite (got --epochs 2, --lr nan)"),
    (["--lr", "5e-3,-1e-3"], "--epochs and --lr must be positive and finite (got --epochs 2, --lr 5e-3,-1e-3)"),
    (["--stage1-lr", "-0.001"], "--stage1-lr must be positive and finite (got -0.001)"),
    (["--alpha", "nan"], "--alpha must be positive and finite (got nan)"),
    (["--alpha", "0"], "--alpha must be positive and finite (got 0)"),
    (["--dropout", "1.5"], "--dropout is the share of inputs dropped: at least 0 and below 1 (got 1.5)"),
    (["--dropout", "-0.1"], "--dropout is the share of inputs dropped: at least 0 and below 1 (got -0.1)"),
    (["--seed", "-1"], "--seed must be at least 0 and below 2**32 (got -1)"),
    (["--lr", "5e-3,0.005"], "--lr 5e-3,0.005 gives the rate 0.005 twice"),
    (["--resume", "--overwrite"], "--resume continues the run in --out and --overwrite deletes it: give one of them"),
])
def test_bad_numbers_and_combinations_are_refused_at_parse_time(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--model", "tiny", *flags])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def flare_adapter(tiny_model, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("flare-adapter")
    m = model.load_model(tiny_model, dtype=torch.float32)
    flare.add_lora(m, "transfer", fusion="add_relu")
    flare.save_adapter(m, "transfer", str(folder))
    return folder


def test_stage1_must_be_a_plain_adapter(flare_adapter, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--model", "tiny", "--stage1", str(flare_adapter)])
    assert e.value.code == 2
    assert f"--stage1 {flare_adapter} is a FLARE adapter (fusion add_relu); stage 1 is a plain LoRA" in \
        capsys.readouterr().err


def test_stage1_with_a_damaged_adapter_json_names_it(flare_adapter, tmp_path, capsys):
    shutil.copytree(flare_adapter, tmp_path / "adapter")
    cut(tmp_path / "adapter" / "adapter.json")
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "tiny", "--stage1", str(tmp_path / "adapter")])
    assert f"--stage1 {tmp_path / 'adapter' / 'adapter.json'} is not valid JSON" in capsys.readouterr().err
