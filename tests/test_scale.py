"""Training and evaluation without the work nobody reads, each checked against the computation it replaces (fp32):
the loss from the labelled positions only against the loss over full logits (its value and the adapter gradients),
label scoring over one cached prompt against one full forward per label, and the validation cadence of a run
without --eval-every (a tenth of the run).

The models are conftest.py's tiny random Llama 3 and Gemma 2 (soft-caps on, sliding window 6, shorter than the
prompts) with a stage-1 adapter and a transfer adapter, both with a non-zero B. The prompts are XNLI's, with
conftest's byte-level tokenizer, under which the three label words are 9, 7 and 12 tokens long (with EOS).
"""
import argparse
import json

import pytest
import torch
import torch.nn.functional as F

import data
import flare
import train
from conftest import SENTENCES, save_tiny, save_tiny_tokenizer, tiny_hf_model
from model import load_model, load_tokenizer

CPU = torch.device("cpu")
TASK = data.TASKS["xnli"]
# Target and English sides of different lengths, so prompts and sources are left-padded by different amounts.
PAIRS = [data.Pair(f"item-{i}", {"premise": SENTENCES[i], "hypothesis": SENTENCES[i + 1][:12 + 9 * i]},
                   {"premise": SENTENCES[5 - i][:30 + 7 * i], "hypothesis": SENTENCES[i + 2]}, TASK.labels[i % 3])
         for i in range(4)]


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def folder(request, tmp_path_factory):
    """A tiny random checkpoint of each family, with conftest's tokenizer beside it."""
    folder = save_tiny(tiny_hf_model(request.param), tmp_path_factory.mktemp(request.param))
    return save_tiny_tokenizer(folder)


def pipeline_model(folder, fusion):
    """The pipeline's model in stage 2: the frozen stage-1 adapter "task", the transfer adapter on top (fused with
    `fusion`, or plain LoRA for None), both B random so that both adapters and the fusion change the output."""
    torch.manual_seed(0)
    model = load_model(folder, dtype=torch.float32)
    for name, seed in (("task", 1), ("transfer", 2)):
        flare.add_lora(model, name, fusion=fusion if name == "transfer" else None)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, m in flare.adapters(model, name):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    return model


def run_args(fusion="add_relu"):
    return argparse.Namespace(source="normed", checkpointing=False, fusion=fusion, precision="fp32")


def close(actual, expected):
    torch.testing.assert_close(actual, expected)  # fp32 defaults: rtol 1.3e-6, atol 1e-5


# ------------------------------------------------------------------------------------------ the training loss

def test_the_label_words_have_different_token_lengths(folder):
    assert sorted(len(data.answer_ids(load_tokenizer(folder), label)) for label in TASK.labels) == [7, 9, 12]


def test_logits_at_positions_are_the_full_logits_at_those_positions(folder):
    model = pipeline_model(folder, None)
    b = train.method_batch(PAIRS, load_tokenizer(folder), TASK, "lora", CPU)
    positions = torch.tensor([[0, 5, 5, 40], [1, 2, 3, 4], [60, 9, 0, 0], [b.input_ids.shape[1] - 1] * 4])
    with torch.no_grad():
        full = model(b.input_ids, b.attention_mask)
        gathered = model(b.input_ids, b.attention_mask, logits_at=positions)
    assert gathered.shape == (4, 4, model.config.vocab_size)
    close(gathered, full[torch.arange(4)[:, None], positions])


@pytest.mark.parametrize("method", ["lora", "flare"])
def test_loss_from_labelled_positions_has_the_full_logits_loss_and_gradients(folder, method):
    model = pipeline_model(folder, "add_relu" if method == "flare" else None).train()
    b = train.method_batch(PAIRS, load_tokenizer(folder), TASK, method, CPU)
    params = flare.adapter_parameters(model, "transfer")

    def loss_and_grads(loss_of):
        model.zero_grad(set_to_none=True)
        loss = loss_of()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    labels = b.labels[:, 1:]
    full, full_grads = loss_and_grads(lambda: F.cross_entropy(
        train.batch_forward(model, b, method, run_args())[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100))
    positions, targets = train.next_token_targets(b.labels)
    loss, grads = loss_and_grads(lambda: train.lm_loss(
        train.batch_forward(model, b, method, run_args(), logits_at=positions), targets))

    per_row = (labels != -100).sum(1)
    assert len(set(per_row.tolist())) > 1 and positions.shape == (4, per_row.max())  # rows padded to the longest
    assert torch.equal(targets[targets != -100], labels[labels != -100])  # every labelled token, in order
    close(loss, full)
    assert all(g.abs().sum() > 0 for g in full_grads)  # lora_A and lora_B (and so the fusion) all learn
    for g, expected in zip(grads, full_grads):
        close(g, expected)


# ------------------------------------------------------------------------------------------ label scoring

def per_label_logprobs(model, tok, method, args):
    """The computation the cached scoring replaces: a forward over prompt + label + EOS for each label."""
    scores = []
    for label in TASK.labels:
        b = train.method_batch(PAIRS, tok, TASK, method, CPU, answers=[label] * len(PAIRS))
        scores.append(data.answer_logprob(train.batch_forward(model, b, method, args), b.labels))
    return torch.stack(scores, -1)


@pytest.mark.parametrize("method", ["flare", "lora", "input-fusion", "translate-test", "zero-shot", "english"])
def test_one_pass_label_scores_equal_one_forward_per_label(folder, method):
    model, tok = pipeline_model(folder, "add_relu").eval(), load_tokenizer(folder)
    with torch.no_grad():
        expected = per_label_logprobs(model, tok, method, run_args())
        scores = train.label_logprobs(model, tok, TASK, PAIRS, method, run_args(), CPU)

    assert scores.shape == (len(PAIRS), len(TASK.labels))
    close(scores, expected)
    assert len(set(expected.flatten().tolist())) == expected.numel()  # distinct scores: nothing trivially equal


def test_one_pass_flare_scores_read_the_source(folder):
    """The cached continuation is fused with the source: another item's source changes the label scores."""
    model, tok = pipeline_model(folder, "add_relu").eval(), load_tokenizer(folder)
    other = [data.Pair(p.id, p.target, q.source, p.answer) for p, q in zip(PAIRS, PAIRS[1:] + PAIRS[:1])]
    with torch.no_grad():
        scores = train.label_logprobs(model, tok, TASK, PAIRS, "flare", run_args(), CPU)
        mismatched = train.label_logprobs(model, tok, TASK, other, "flare", run_args(), CPU)
    assert (scores - mismatched).abs().min() > 1e-3


@pytest.mark.parametrize("fusion", ["matmul", "cross_attention"])
def test_position_mixing_fusions_score_each_label_over_the_whole_sequence(folder, fusion):
    """They read every earlier position, which a KV cache does not keep: scored over a cached prompt (as the
    per-position fusions are) the label scores would come out wrong, so these keep a forward per label."""
    model, tok = pipeline_model(folder, fusion).eval(), load_tokenizer(folder)
    with torch.no_grad():
        expected = per_label_logprobs(model, tok, "flare", run_args(fusion))
        scores = train.label_logprobs(model, tok, TASK, PAIRS, "flare", run_args(fusion), CPU)
        cached = train.label_logprobs(model, tok, TASK, PAIRS, "flare", run_args("add_relu"), CPU)  # the cache path
    close(scores, expected)
    assert (cached - expected).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ validation cadence

def test_validation_runs_every_tenth_of_the_run_without_eval_every(tmp_path):
    """20 steps (20 items, batch 1, one epoch) without --eval-every: validation every 2 steps. (--eval-every
    overrides it: test_train.py's runs set it.)"""
    args = train.parse_args(["--model", "llama3.1-8b", "--methods", "lora", "--batch-size", "1", "--epochs", "1"])
    assert args.eval_every is None
    folder = save_tiny_tokenizer(save_tiny(tiny_hf_model("llama"), tmp_path / "model"))
    train.train_adapter(pipeline_model(folder, None), load_tokenizer(folder), TASK, PAIRS * 5, PAIRS[:2], "lora",
                        "transfer", 1e-3, str(tmp_path / "lora"), args, CPU)

    log = [json.loads(line) for line in (tmp_path / "lora" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 21))
    assert [r["step"] for r in log if "val_accuracy" in r] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
