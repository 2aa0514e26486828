"""torchrun on GPUs: train.py's step on random weights at a real shape, over NCCL, with the peak memory of each GPU
next to the cost model's estimate (bench.fsdp_per_gpu for --fsdp). Not yet run: no GPU was available to us.

    torchrun --nproc_per_node 8 bench/check_torchrun_cuda.py                                  # Llama 3.1 70B, --fsdp
    torchrun --nproc_per_node 2 bench/check_torchrun_cuda.py --model llama3.1-8b --no-fsdp    # data parallel only
    torchrun --nproc_per_node 2 bench/check_torchrun_cuda.py --model gemma3-270m --layers 2   # a smoke run (CPU too)

The model is built on the meta device, sharded as train.py --fsdp shards it (train.shard_per_layer), materialised on
each process's device with random bf16 weights (bench.random_model: no download), given the stage-1 and a transfer
adapter as train.py does, and trained for a few steps at XNLI's global batch (32 x 131), each process on its rows
(train.batch_rows), the adapters sharded by FSDP2 too (or DDP over them with --no-fsdp: train.parallel), bf16
autocast. Rank 0 prints, per rank: the median step time, the peak CUDA memory and the estimate; then PASS if every
process ends with the same adapter (gathered whole from its shards under FSDP), FAIL if not.
"""
import argparse
import dataclasses
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import bench  # noqa: E402
import flare  # noqa: E402
import train  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama3.1-70b", choices=list(bench.HUB_CONFIGS))
    p.add_argument("--method", default="flare", choices=bench.COST_METHODS)
    p.add_argument("--layers", type=int, help="cut the model to this many decoder layers (a smoke run)")
    p.add_argument("--no-fsdp", action="store_true", help="data parallel only: the base whole on every GPU")
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    device = train.start_processes()
    world, rank = train.world()
    config = bench.real_config(a.model)
    config = dataclasses.replace(config, num_layers=a.layers) if a.layers else config
    checkpointing, fsdp = not a.no_checkpointing, not a.no_fsdp
    m = bench.random_model(config, a.method, device, shard=train.shard_per_layer if fsdp else None)
    net = train.parallel(m, device, fsdp)  # first: FSDP2 replaces the parameters
    params = flare.adapter_parameters(m, "transfer")
    opt = torch.optim.AdamW(params, lr=bench.LR)
    args = bench.step_args("xnli", checkpointing, "bf16")
    b = bench.task_batch(a.method, "xnli", config.vocab_size)
    b, weight = train.batch_rows(b.map(lambda t: t.to(device)))
    positions, targets = train.next_token_targets(b.labels)
    times = []
    for _ in range(a.steps):
        start = time.perf_counter()
        with train.autocast(device, args):
            loss = weight * train.lm_loss(train.batch_forward(net, b, a.method, args, logits_at=positions), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bench.sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    adapter = sum(float(t.double().sum()) for t in flare.adapter_state(m, "transfer").values())  # the same on all
    rows = [(rank, bench.median(times[1:] or times), peak, adapter)] * world
    if world > 1:  # one process starts no process group (train.start_processes)
        dist.all_gather_object(rows, rows[0])
    if rank == 0:
        est = None if a.layers else bench.fsdp_per_gpu(a.model, "xnli", a.method, checkpointing, gpus=world)[
            "peak_gb"] if fsdp else bench.estimate_by_depth(config, a.method, "xnli", checkpointing,
                                                             batch=b.input_ids.shape[0])["peak_bytes"] / 1e9
        print(f"{a.model}{f' ({a.layers} layers)' if a.layers else ''} {a.method}, {world} processes, "
              f"{'--fsdp' if fsdp else 'data parallel'}{', --checkpointing' if checkpointing else ''}, "
              f"{b.input_ids.shape[0]} rows per process; estimate per GPU: {est and f'{est:.1f} GB'}")
        for r, step_s, gb, _ in rows:
            print(f"rank {r}: step {step_s * 1e3:.0f} ms, peak CUDA memory {gb and f'{gb:.1f} GB'}")
        print("PASS" if len({round(x[3], 6) for x in rows}) == 1 else "FAIL: the adapters differ between processes")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
