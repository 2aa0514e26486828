"""train.cli as torchrun starts it, for tests/test_distributed.py, with three test hooks set from the environment:
FLARE_TEST_STOP_AT=n raises Ctrl-C's KeyboardInterrupt in every process at the n-th training step of the run (all
stages counted), FLARE_TEST_PRETRAIN_STEPS=n shortens the tiny model's pretraining, and every process reports, one
line each in its own file FLARE_TEST_REPORTS/rank<r>.txt (on one shared stderr the two processes' lines can merge),
whether it pretrained, how many of the base model's weights it holds, and of the adapters as it trains them."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from torch.distributed.tensor import DTensor  # noqa: E402

import synth  # noqa: E402
import train  # noqa: E402

RANK = os.environ.get("RANK", "0")
real_step_batches, real_pretrain, real_load, real_parallel = (train.step_batches, synth.pretrain_tiny, train.load_model,
                                                             train.parallel)
steps = []


def report(line):
    with open(os.path.join(os.environ["FLARE_TEST_REPORTS"], f"rank{RANK}.txt"), "a") as f:
        f.write(line + "\n")


def step_batches(*args):
    steps.append(args[1])
    if len(steps) == int(os.environ.get("FLARE_TEST_STOP_AT", 0)):
        raise KeyboardInterrupt
    return real_step_batches(*args)


def pretrain_tiny(*args):
    report(f"rank {RANK} pretrains")
    return real_pretrain(*args)


def held(params):
    params = list(params)
    return f"{sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)} of " \
           f"{sum(p.numel() for p in params)}"


def load_model(*args, **kwargs):
    model = real_load(*args, **kwargs)
    report(f"rank {RANK} holds {held(model.parameters())} base weights")
    return model


def parallel(model, *args):
    net = real_parallel(model, *args)
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    report(f"rank {RANK} holds {held(adapters)} adapter weights")
    return net


train.step_batches, synth.pretrain_tiny, train.load_model, train.parallel = (step_batches, pretrain_tiny, load_model,
                                                                             parallel)
synth.PRETRAIN_STEPS = int(os.environ.get("FLARE_TEST_PRETRAIN_STEPS", synth.PRETRAIN_STEPS))
train.cli()
