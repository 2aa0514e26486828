"""torchrun: two CPU processes (gloo) against one process on the same global batch, on the tiny demo model.

For lora, flare and input-fusion, under DDP and under --fsdp (with --checkpointing): the per-step losses of stage 1
and of each method equal one process's (relative 1e-4), the saved adapters are the same, and the split evaluation
gives the same scores; a two-process run stopped by Ctrl-C and resumed reaches the same losses as the uninterrupted
one, under DDP and under --fsdp; only rank 0 writes and pretrains; --fsdp shards the base and the adapters (each
process holds about half of their weights), DDP neither.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import data
import flare
import train
from conftest import save_tiny, save_tiny_tokenizer, tiny_hf_model
from model import load_model
from test_train import SMALL, read_log, tiny_model  # noqa: F401 (tiny_model is a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Stage 1: 32 English examples, 4 steps of 8; each method 17 target examples, 3 steps, validated at each. A step is
# two micro-batches of 4 (DDP averages at the second); the last step has one example, so one process has no row.
FLAGS = SMALL + ["--methods", "lora,flare,input-fusion", "--max-train", "17", "--batch-size", "4", "--grad-accum", "2"]
STAGES = ("stage1", "lora", "flare", "input-fusion")


def torchrun(out, *flags, env=None, tiny=None, base=FLAGS):
    """train.cli in two processes (tests/torchrun_main.py) on base + flags; returns the completed process. Each
    process's report goes to out.reports/rank<r>.txt (see reports)."""
    os.makedirs(f"{out}.reports", exist_ok=True)
    if tiny and not os.path.exists(os.path.join(out, "tiny-model")):
        shutil.copytree(tiny, os.path.join(out, "tiny-model"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "tests", "torchrun_main.py"), *base, "--out", str(out), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
                               "FLARE_TEST_REPORTS": f"{out}.reports", **(env or {})})


def reports(out):
    """Each process's report lines (tests/torchrun_main.py), by rank."""
    return {rank: open(f"{out}.reports/rank{rank}.txt").read().splitlines() for rank in (0, 1)
            if os.path.exists(f"{out}.reports/rank{rank}.txt")}


def finished(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module", autouse=True)
def cpu_only():
    """Everything on the CPU, on a machine with GPUs too: gloo between the processes, fp32 as in the one process."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        yield


@pytest.fixture(scope="module")
def one(tiny_model, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("one")
    shutil.copytree(tiny_model, out / "tiny-model")
    return out, train.main(FLAGS + ["--out", str(out)])


@pytest.fixture(scope="module")
def ddp(tiny_model, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("ddp")
    return out, finished(torchrun(out, tiny=tiny_model))


@pytest.fixture(scope="module")
def fsdp(tiny_model, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("fsdp")
    return out, finished(torchrun(out, "--fsdp", "--checkpointing", tiny=tiny_model))  # the same numbers


def same_losses(a, b, rel=1e-4):
    for stage in STAGES:
        la, lb = read_log(a / stage / "log.jsonl"), read_log(b / stage / "log.jsonl")
        assert [r["step"] for r in la] == [r["step"] for r in lb] and la
        for ra, rb in zip(la, lb):
            assert ra["loss"] == pytest.approx(rb["loss"], rel=rel), (stage, ra, rb)
            assert ra.get("val_accuracy") == rb.get("val_accuracy"), (stage, ra, rb)


def same_adapters(a, b, rel=1e-3):
    """Each tensor of each saved adapter within rel of the other's, in norm. Adam's first steps divide each gradient
    by its own size, so where a gradient is near zero a rounding difference (the sum over two processes' rows is
    added in another order) moves that element by up to the learning rate (measured: 2e-4 of the norm of a flare
    q_proj lora_B, within 1e-5 for the others)."""
    for stage in STAGES:
        wa, wb = (load_file(out / stage / "adapter" / "adapter.safetensors") for out in (a, b))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert (wa[k] - wb[k]).norm() <= rel * wb[k].norm(), (stage, k)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_train_as_one_on_the_same_global_batch(mode, one, request):
    out, _ = request.getfixturevalue(mode)
    same_losses(one[0], out)
    same_adapters(one[0], out)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_the_split_evaluation_scores_what_one_process_scores(mode, one, request):
    out, proc = request.getfixturevalue(mode)
    results = json.loads((out / "results.json").read_text())
    for method in ("lora", "flare", "input-fusion"):
        for key in ("accuracy", "macro_f1", "val_accuracy", "mismatched_source_accuracy"):
            assert results[method].get(key) == one[1][method].get(key), (method, key)
    assert proc.stdout.count("| method |") == 1  # the table, printed by rank 0 alone


@pytest.mark.parametrize("what", ["base", "adapter"])
def test_fsdp_shards_the_base_and_the_adapters_and_ddp_does_not(what, ddp, fsdp):
    """Each process's report (tests/torchrun_main.py) as each model is loaded (base) and as each adapter starts
    training (adapter): under DDP every process holds all of them, under --fsdp about half, the two halves adding up
    to the whole (plus the small tensors each keeps whole: the input norms)."""
    def held(out):  # per rank: (held, of) for each model or adapter in turn
        return {rank: [(int(w[3]), int(w[5])) for w in map(str.split, lines) if w[-2:] == [what, "weights"]]
                for rank, lines in reports(out).items()}
    whole, shards = held(ddp[0]), held(fsdp[0])
    assert whole.keys() == shards.keys() == {0, 1}
    assert all(len(v) == len(whole[0]) > 0 for v in [*whole.values(), *shards.values()])
    assert all(h == n for rank in whole for h, n in whole[rank])
    assert all(0.4 * n < h < 0.6 * n for rank in shards for h, n in shards[rank])
    assert all(h0 + h1 <= 1.01 * n and n == n1 for (h0, n), (h1, n1) in zip(shards[0], shards[1]))


def test_only_rank_0_writes_the_logs(ddp, one):
    for stage in STAGES:  # one record per step: a second writer would double them
        assert len(read_log(ddp[0] / stage / "log.jsonl")) == len(read_log(one[0] / stage / "log.jsonl"))


def test_an_interrupted_two_process_run_resumes_to_the_same_losses(ddp, tiny_model, tmp_path):  # noqa: F811
    stopped = torchrun(tmp_path, tiny=tiny_model, env={"FLARE_TEST_STOP_AT": "6"})  # stage 1's 4 steps, lora's 2nd
    assert stopped.returncode != 0 and "interrupted at step 1; checkpoint saved" in stopped.stderr
    assert (tmp_path / "lora" / "checkpoint.pt").exists() and not (tmp_path / "results.json").exists()

    finished(torchrun(tmp_path, "--resume"))
    same_losses(ddp[0], tmp_path, rel=1e-6)
    same_adapters(ddp[0], tmp_path, rel=1e-6)


def test_an_interrupted_fsdp_run_resumes_from_its_last_checkpoint_to_the_same_losses(fsdp, tiny_model, tmp_path):  # noqa: F811
    """Under --fsdp a Ctrl-C saves nothing (saving gathers from every process, and each may be anywhere in its step):
    the last periodic checkpoint, the adapter and the optimizer's moments gathered whole, is put back into each
    process's rows."""
    flags = ("--fsdp", "--checkpointing", "--save-every", "1")
    stopped = torchrun(tmp_path, *flags, tiny=tiny_model, env={"FLARE_TEST_STOP_AT": "6"})  # lora's 2nd step
    assert stopped.returncode != 0 and "interrupted at step 1; the last checkpoint (every 1 steps) stands" in \
        stopped.stderr
    assert torch.load(tmp_path / "lora" / "checkpoint.pt", weights_only=False)["step"] == 1

    finished(torchrun(tmp_path, *flags, "--resume"))
    same_losses(fsdp[0], tmp_path, rel=1e-6)
    same_adapters(fsdp[0], tmp_path, rel=1e-6)


def test_rank_0_alone_pretrains_the_demo_model(tmp_path):
    finished(torchrun(tmp_path, "--methods", "zero-shot", env={"FLARE_TEST_PRETRAIN_STEPS": "2"}))
    assert [line for lines in reports(tmp_path).values() for line in lines if "pretrains" in line] == \
        ["rank 0 pretrains"]
    assert (tmp_path / "tiny-model" / "model.safetensors").exists()
    assert "accuracy" in json.loads((tmp_path / "results.json").read_text())["zero-shot"]


def test_fsdp_without_torchrun_says_how_to_start_it(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit):
        train.parse_args(["--fsdp"])
    assert "torchrun --nproc_per_node" in capsys.readouterr().err


def test_tydiqa_is_translated_once_by_both_processes_and_scored_as_one_process_scores(tmp_path):
    """The model translates the test items itself (split over the processes, rank 0 writing the file), then
    zero-shot and translate-test decode their answers (split too): the same file and scores as one process."""
    copy = tmp_path / "copy" / data.HUB["tydiqa"][0]
    shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "tydiqa"), copy)
    folder = save_tiny_tokenizer(save_tiny(tiny_hf_model("llama"), tmp_path / "tiny"))
    tiny = load_model(folder, dtype=torch.float32)
    flare.add_lora(tiny, "task")
    flare.save_adapter(tiny, "task", str(tmp_path / "stage1"), base_model=folder)
    flags = ["--model", folder, "--task", "tydiqa", "--lang", "sw", "--data-dir", str(tmp_path / "copy"),
             "--methods", "zero-shot,translate-test", "--stage1", str(tmp_path / "stage1"), "--batch-size", "4"]

    one = train.main(flags + ["--out", str(tmp_path / "one")])
    finished(torchrun(tmp_path / "two", base=flags))
    translations = [(out / "translations-sw.jsonl").read_text() for out in (tmp_path / "one", tmp_path / "two")]
    assert translations[0] == translations[1] and len(translations[0].splitlines()) == 3
    untimed = lambda results: {m: {k: v for k, v in row.items() if "seconds" not in k} for m, row in results.items()}
    assert untimed(json.loads((tmp_path / "two" / "results.json").read_text())) == untimed(one)
