"""Gemma 2 attention on CUDA: the compiled flex_attention path against the eager math, forward and backward.

    python bench/check_flex_cuda.py              # on a CUDA GPU; exits non-zero on FAIL
    python bench/check_flex_cuda.py --small      # a smaller shape (also runs on CPU, forward only there)

Two layers with Gemma 2 9B's attention (16 heads, 8 kv heads, head_dim 256, query scale 256^-0.5, soft-cap 50,
window 4096 on even layers), weights large enough that the soft-cap bites, a left-padded batch longer than the window.
The eager math of model.Attention is the reference (it is compared with transformers in tests/test_model.py).
fp32: flex must match it to 1e-3 of the largest value. bf16 (weights bf16, as load_model on CUDA): both paths
are compared with the fp32 eager result, and flex must be no further from it than 1.5x the eager bf16 math + 1e-3.
Also prints the peak memory and time of one forward + backward on each path.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import model  # noqa: E402

GEMMA2_9B_ATTENTION = dict(model_type="gemma2", vocab_size=1024, hidden_size=3584, intermediate_size=4096,
                           num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                           rms_norm_eps=1e-6, rope_theta=10000.0, query_pre_attn_scalar=256, sliding_window=4096,
                           attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
SMALL = dict(GEMMA2_9B_ATTENTION, hidden_size=256, intermediate_size=512, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64, sliding_window=100)


def build(hf_config, device):
    torch.manual_seed(0)
    m = model.Transformer(model.Config.from_hf(hf_config)).to(device)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:  # large q/k weights: scaled scores of a few tens, where the cap of 50 bends them
                std = 6.0 if "q_proj" in name or "k_proj" in name else 1.0
                p.normal_(0.0, 0.02 if "embed" in name else std / p.shape[-1] ** 0.5)
    return m


def run(m, ids, mask, flex, backward):
    """Logits and the gradients of the attention weights, on the flex path or the eager one."""
    real = model.uses_flex
    model.uses_flex = (lambda device, config, cache: cache is None) if flex else (lambda *a: False)
    try:
        m.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        if ids.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.set_grad_enabled(backward):
            logits = m(ids, mask)
            if backward:
                weights = torch.randn(logits.shape, generator=torch.Generator(logits.device).manual_seed(2),
                                      device=logits.device)
                ((logits * weights * mask[..., None]).sum() / mask.sum()).backward()
        if ids.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() if ids.device.type == "cuda" else 0
        grads = {n: p.grad.float().clone() for n, p in m.named_parameters()
                 if backward and "self_attn" in n and p.grad is not None}
        return logits.detach().float(), grads, seconds, peak
    finally:
        model.uses_flex = real


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="a smaller shape (a window of 100, 300 tokens)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: this check is for a GPU (--device cpu --small runs the forward only)")
    backward = device.type == "cuda"  # flex_attention has no backward on CPU
    hf_config = SMALL if args.small else GEMMA2_9B_ATTENTION
    B, T = 2, (300 if args.small else hf_config["sliding_window"] + 512)
    ids = torch.randint(3, hf_config["vocab_size"], (B, T), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    mask[1, : T // 3] = 0  # left padding: a third of the second row, more than one 128-block
    m = build(hf_config, device)
    results, failed = {}, False
    for dtype in (torch.float32, torch.bfloat16):
        m = m.to(dtype)
        for flex in (False, True):
            run(m, ids, mask, flex, backward)  # warm-up: compilation
            results[dtype, flex] = run(m, ids, mask, flex, backward)
    m = m.float()
    ref_logits, ref_grads = results[torch.float32, False][:2]
    for dtype in (torch.float32, torch.bfloat16):
        (e_logits, e_grads, e_s, e_peak), (f_logits, f_grads, f_s, f_peak) = results[dtype, False], results[dtype, True]
        checks = [("logits", f_logits, e_logits, ref_logits)]
        checks += [(f"grad {n}", f_grads[n], e_grads[n], ref_grads[n]) for n in ref_grads]
        for what, f, e, ref in checks:
            if dtype == torch.float32:
                err, bound = rel(f, e), 1e-3
                line = f"flex vs eager {err:.2e} (bound {bound:.0e})"
            else:
                err, eager_err = rel(f, ref), rel(e, ref)
                bound = 1.5 * eager_err + 1e-3
                line = f"vs fp32 eager: flex {err:.2e}, eager {eager_err:.2e} (bound {bound:.2e})"
            ok = err <= bound
            failed |= not ok
            print(f"{str(dtype).replace('torch.', ''):9} {what:45} {line} {'PASS' if ok else 'FAIL'}")
        if device.type == "cuda":
            print(f"{str(dtype).replace('torch.', ''):9} forward + backward: eager {e_s * 1e3:.1f} ms, peak "
                  f"{e_peak / 2**30:.2f} GiB; flex {f_s * 1e3:.1f} ms, peak {f_peak / 2**30:.2f} GiB")
    print("FAIL" if failed else "PASS")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
