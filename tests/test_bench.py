"""bench.py's cost model: the fake-tensor estimate against a real step, its depth extrapolation, the fused attention
stand-in against FlopCounterMode, the live-tensor tracker, and the --device cuda step code run on the CPU."""
import math

import pytest
import torch
from torch.utils import flop_counter

import bench
import model

LLAMA = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0,
             tie_word_embeddings=False)
GEMMA2 = dict(model_type="gemma2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6, rope_theta=10000.0,
              query_pre_attn_scalar=32, sliding_window=16, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)


@pytest.mark.parametrize("method, checkpointing", [("flare", False), ("flare", True), ("input-fusion", False)])
def test_estimated_peak_is_the_peak_of_the_same_step_on_real_tensors(method, checkpointing):
    config = model.Config.from_hf(LLAMA)
    est = bench.estimate_step(config, method, "xnli", checkpointing, torch.float32, "fp32", on_cuda=False, batch=2)
    measured = bench.measured_step(config, method, "xnli", 2, checkpointing)
    assert est["peak_bytes"] == pytest.approx(measured, rel=0.01)


def test_resident_bytes_are_weights_both_adapters_and_adamw_state():
    config = model.Config.from_hf(LLAMA)
    est = bench.estimate_step(config, "lora", "xnli", False, torch.bfloat16, "bf16", batch=2)
    h, i, kv, L, r = 64, 128, 32, 2, bench.RANK
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # (in, out) of q k v o gate up down
    weights = L * (sum(a * b for a, b in linears) + 2 * h) + 512 * h * 2 + h  # + norms, embedding, lm_head, norm
    adapter = L * sum(r * (a + b) for a, b in linears)
    inv_freq = (h // 4) // 2
    assert est["resident_bytes"] == 2 * weights + 4 * adapter * (2 + 2) + 4 * inv_freq  # task, transfer, 2 moments


@pytest.mark.parametrize("checkpointing", [False, True])
def test_depth_extrapolation_matches_the_estimate_at_full_depth(checkpointing):
    config = model.Config.from_hf({**LLAMA, "num_hidden_layers": 5, "hidden_size": 256, "intermediate_size": 1024})
    full = bench.estimate_step(config, "flare", "xnli", checkpointing, batch=2)
    by_depth = bench.estimate_by_depth(config, "flare", "xnli", checkpointing, batch=2)
    for key in ("flops", "resident_bytes", "peak_bytes"):
        assert by_depth[key] == full[key], key


def test_checkpointing_costs_one_more_forward_of_the_layers_and_less_memory():
    config = model.Config.from_hf({**LLAMA, "num_hidden_layers": 4})
    plain, ckpt = (bench.estimate_step(config, "lora", "tydiqa", c, batch=2) for c in (False, True))
    assert ckpt["peak_bytes"] < plain["peak_bytes"]
    assert plain["flops"] < ckpt["flops"] < 1.5 * plain["flops"]  # a forward is about a third of a step


def test_fused_attention_cost_counts_the_flops_flop_counter_counts_for_sdpa():
    q, k, v = (torch.randn(2, 4, 40, 16, requires_grad=True) for _ in range(3))
    bench.FusedAttentionCost.flops = 0
    bench.FusedAttentionCost.apply(q, k, v).sum().backward()
    shape = tuple(q.shape)
    expected = flop_counter.sdpa_flop_count(shape, shape, shape) + flop_counter.sdpa_backward_flop_count(*[shape] * 4)
    assert bench.FusedAttentionCost.flops == expected


def test_fused_attention_cost_keeps_what_flex_attention_keeps_not_the_scores():
    """Gemma 2 at 8 x 544 on the CUDA path: no (B, H, T, T) tensor is alive at the peak, so the peak grows about
    linearly with the sequence, not quadratically, while the CPU path's eager math keeps the scores."""
    config = model.Config.from_hf(GEMMA2)
    cuda = bench.estimate_step(config, "lora", "tydiqa", False, batch=2)["step_peak_bytes"]
    eager = bench.estimate_step(config, "lora", "tydiqa", False, batch=2, on_cuda=False)["step_peak_bytes"]
    scores = 2 * 4 * 544 * 544 * 2  # one (B, H, T, T) bf16 tensor per layer, at least
    assert eager - cuda > config.num_layers * scores


def test_live_tensor_bytes_counts_new_storages_once_and_not_views_of_existing_ones():
    w = torch.randn(100, 100)
    tracker = bench.LiveTensorBytes()
    with tracker:
        w.t(), w[:10], w.view(-1)
        assert tracker.peak == 0
        y = w @ w
        y.t(), y[:5]
        del y
        z = w + 1
    assert tracker.peak == 100 * 100 * 4 and tracker.now == z.nbytes


def test_real_shape_step_runs_on_the_cpu_at_a_tiny_shape():
    """The --device cuda code path (random real-shape model, train.py's step, MFU), at a tiny shape on the CPU."""
    config = model.Config.from_hf(GEMMA2)
    r = bench.real_shape_step(config, "flare", "xnli", True, torch.device("cpu"), repeats=1, batch=2)
    assert r["step_s"] > 0 and r["tokens_per_s"] == pytest.approx(2 * 131 / r["step_s"])
    assert r["mfu"] is None and r["peak_cuda_bytes"] is None  # no GPU: no peak FLOP/s to divide by
    assert r["flops"] == bench.estimate_step(config, "flare", "xnli", True, batch=2)["flops"]  # 2 layers: exact


def test_random_model_has_unit_norms_a_trained_stage1_adapter_and_a_zero_transfer_adapter():
    config = model.Config.from_hf(GEMMA2)
    m = bench.random_model(config, "flare", torch.device("cpu"))
    q = m.model.layers[0].self_attn.q_proj
    assert torch.all(m.model.norm.weight == 0)  # Gemma: (1 + w)
    assert torch.all(q.lora_B.weight == 0) and q.base.lora_B.weight.abs().sum() > 0
    assert all(math.isfinite(p.float().sum().item()) for p in m.parameters())
    assert m.inv_freq.dtype == torch.float32


def test_real_configs_are_read_as_the_models_they_name():
    c8 = bench.real_config("llama3.1-8b")
    assert (c8.num_layers, c8.hidden_size, c8.num_kv_heads, c8.rope_scaling["factor"]) == (32, 4096, 8, 8.0)
    c9 = bench.real_config("gemma2-9b")
    assert (c9.num_layers, c9.head_dim, c9.attn_softcap, c9.sliding_layers[:2]) == (42, 256, 50.0, (0, 2))
    c270 = bench.real_config("gemma3-270m")
    assert c270.sliding_layers == tuple(i for i in range(18) if (i + 1) % 6) and c270.attn_softcap is None
    assert c270.qk_norm and c270.sliding_rope_theta == 10_000.0


def test_fsdp_on_one_gpu_is_the_one_gpu_estimate_and_on_eight_holds_an_eighth_of_the_layers():
    one = bench.fsdp_per_gpu("gemma3-270m", "nusax", "flare", True, gpus=1)
    whole = bench.estimate_by_depth(bench.real_config("gemma3-270m"), "flare", "nusax", True)
    rope = sum(b.numel() * 4 for b in bench.adapted_model(bench.real_config("gemma3-270m"), "flare", "meta",
                                                           torch.bfloat16).buffers())  # fp32 RoPE tables
    assert one["peak_gb"] * 1e9 == pytest.approx(whole["peak_bytes"] - rope, rel=1e-6)  # which FSDP leaves out
    eight = bench.fsdp_per_gpu("gemma3-270m", "nusax", "flare", True, gpus=8)
    assert eight["base_shard_gb"] == pytest.approx(one["base_shard_gb"] / 8)
    assert eight["batch_per_gpu"][0] == one["batch_per_gpu"][0] // 8 and eight["step_gb"] < one["step_gb"]
