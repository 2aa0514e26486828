"""FLARE's LoRA layer, fusion and adapters, checked against their definitions (the method: arXiv 2501.06892,
section 3; the README's "What is here"), against peft, and against the public reference code's mistakes (fusion
lost under checkpointing).

Every comparison runs in fp32 on a tiny random Llama from conftest.py; every trained adapter gets a non-zero B,
because with B = 0 (LoRA's init) the adapter, and with it the fusion, contributes nothing.
"""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import flare
from conftest import VOCAB, save_tiny, tiny_hf_model
from model import KVCache, load_model

FUSIONS = ["add", "mul", "matmul", "add_relu", "matmul_relu", "cross_attention"]


# ------------------------------------------------------------------------------------------ helpers

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Folder of a tiny random Llama 3 checkpoint (config.json + model.safetensors)."""
    return save_tiny(tiny_hf_model("llama"), tmp_path_factory.mktemp("llama"))


def hf_llama(folder):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()


def randomize_B(model, name, seed):
    """LoRA starts with B = 0; give adapter `name` a B that makes its update, and its fusion, visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in flare.adapters(model, name):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def stage2(folder, fusion="add_relu", name="flare"):
    """The FLARE setting: a frozen stage-1 adapter "task" on the base, the fused adapter `name` on top."""
    torch.manual_seed(0)
    model = load_model(folder, dtype=torch.float32)
    flare.add_lora(model, "task")
    randomize_B(model, "task", seed=1)
    flare.add_lora(model, name, fusion=fusion)
    randomize_B(model, name, seed=2)
    return model.train()


def tokens(seed, batch=2, length=7, pad=(0, 2)):
    """Random ids (batch, length) and a mask with pad[b] left-padding positions in row b."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, n in enumerate(pad):
        mask[b, :n] = 0
    return ids, mask


def lm_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def trainable_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def training_step(model, ids, mask, source_ids, source_mask, checkpoint=False):
    """One FLARE training forward and backward; returns the loss and the gradients of the trainable parameters."""
    model.zero_grad(set_to_none=True)
    source = flare.source_representations(model, source_ids, source_mask)
    loss = lm_loss(model(ids, mask, source=source, checkpoint=checkpoint), ids)
    loss.backward()
    return loss.detach(), trainable_grads(model)


# ------------------------------------------------------------------------------------------ the fused layer

def closed_form_phi(fusion, S, T, real, cross=None):
    """phi(S, T) of the paper's fusion functions (arXiv 2501.06892, section 3), position by position. The
    position-mixing fusions read target positions j <= i that are real, and always j = i:
    phi_i = sum_j (S_i . T_j) T_j for matmul, softmax attention over the same j for cross_attention."""
    B, L, r = T.shape
    rows = []
    for b in range(B):
        for i in range(L):
            js = [j for j in range(L) if j == i or (j <= i and real[b, j])]
            s, ts = S[b, i], [T[b, j] for j in js]
            if fusion == "add":
                rows.append(s + T[b, i])
            elif fusion == "mul":
                rows.append(s * T[b, i])
            elif fusion == "add_relu":
                rows.append(torch.relu(s) + torch.relu(T[b, i]))
            elif fusion == "matmul":
                rows.append(sum(torch.dot(s, t) * t for t in ts))
            elif fusion == "matmul_relu":
                rows.append(sum(torch.dot(torch.relu(s), torch.relu(t)) * torch.relu(t) for t in ts))
            elif fusion == "cross_attention":
                q = cross.q.weight @ s + cross.q.bias
                keys = [cross.k.weight @ t + cross.k.bias for t in ts]
                values = [cross.v.weight @ t + cross.v.bias for t in ts]
                weights = torch.softmax(torch.stack([torch.dot(q, k) for k in keys]) / math.sqrt(r), 0)
                rows.append(sum(w * v for w, v in zip(weights, values)))
    return torch.stack(rows).view(B, L, r)


def fused_layer(fusion, d_in=12, d_out=10, r=4, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
    layer = flare.LoRA(base, "flare", r=r, alpha=8, fusion=fusion)
    nn.init.normal_(layer.lora_B.weight)
    x_t, x_s = torch.randn(2, 6, d_in), torch.randn(2, 6, d_in)
    real = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    return layer, x_t, x_s, real


def closed_form_layer(layer, x_t, x_s, real, A_source):
    """y = W x_t + s * B phi(A x_s, A x_t), with A_source the A that projects the source."""
    A = layer.lora_A.weight
    phi = closed_form_phi(layer.fusion, x_s @ A_source.T, x_t @ A.T, real, layer.cross)
    return x_t @ layer.base.weight.T + layer.scale * phi @ layer.lora_B.weight.T


@pytest.mark.parametrize("fusion", FUSIONS)
def test_fused_layer_equals_its_closed_form(fusion):
    layer, x_t, x_s, real = fused_layer(fusion)
    with torch.no_grad():
        expected = closed_form_layer(layer, x_t, x_s, real, layer.lora_A.weight)
        torch.testing.assert_close(layer(x_t, (x_s, real)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_A_learns_from_both_the_source_and_the_target_branch(fusion):
    layer, x_t, x_s, real = fused_layer(fusion)
    A = layer.lora_A.weight
    upstream = torch.randn(2, 6, layer.out_features)
    (layer(x_t, (x_s, real)) * upstream).sum().backward()
    both, = torch.autograd.grad((closed_form_layer(layer, x_t, x_s, real, A) * upstream).sum(), A)
    target_only, = torch.autograd.grad((closed_form_layer(layer, x_t, x_s, real, A.detach()) * upstream).sum(), A)
    torch.testing.assert_close(A.grad, both, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(A.grad, target_only, rtol=1e-3, atol=1e-4), "no gradient came through the source"


def test_add_relu_without_a_source_is_plain_lora_not_a_zero_source():
    layer, x_t, _, real = fused_layer("add_relu")
    A, B, W = layer.lora_A.weight, layer.lora_B.weight, layer.base.weight
    with torch.no_grad():
        plain = x_t @ W.T + layer.scale * (x_t @ A.T) @ B.T  # B A x, no relu
        torch.testing.assert_close(layer(x_t), plain, rtol=1e-5, atol=1e-5)
        zero_source = layer(x_t, (torch.zeros_like(x_t), real))
        assert not torch.allclose(zero_source, plain, atol=1e-3)


# ------------------------------------------------------------------------------------------ plain LoRA vs peft

def test_plain_lora_equals_peft_lora_with_the_same_A_and_B(llama):
    from peft import LoraConfig, get_peft_model
    ours = load_model(llama, dtype=torch.float32)
    flare.add_lora(ours, "task")
    randomize_B(ours, "task", seed=1)
    theirs = get_peft_model(hf_llama(llama), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                        target_modules=list(flare.LINEARS)))
    with torch.no_grad():
        for path, m in flare.adapters(ours, "task"):
            peft_layer = theirs.get_submodule("base_model.model." + path)
            peft_layer.lora_A["default"].weight.copy_(m.lora_A.weight)
            peft_layer.lora_B["default"].weight.copy_(m.lora_B.weight)
        ids, mask = tokens(0, pad=(0, 0))  # no padding: transformers counts positions differently under it
        expected = theirs(input_ids=ids, attention_mask=mask).logits
        base_only = load_model(llama, dtype=torch.float32)(ids, mask)
        assert not torch.allclose(expected, base_only, atol=1e-3), "the adapters change nothing: B is zero"
        torch.testing.assert_close(ours(ids, mask), expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ fusion in training

@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpointed"])
def test_a_different_source_changes_the_loss_and_the_gradients(llama, checkpoint):
    model = stage2(llama)
    ids, mask = tokens(0)
    src_a, src_mask = tokens(1, length=5, pad=(1, 0))
    src_b, _ = tokens(2, length=5, pad=(1, 0))
    loss_a, grads_a = training_step(model, ids, mask, src_a, src_mask, checkpoint)
    loss_b, grads_b = training_step(model, ids, mask, src_b, src_mask, checkpoint)
    assert not torch.allclose(loss_a, loss_b, rtol=1e-4, atol=1e-6)
    for name in grads_a:
        assert not torch.allclose(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-7), name


@pytest.mark.parametrize("fusion", FUSIONS)
def test_checkpointing_gives_the_same_loss_and_gradients(llama, fusion):
    model = stage2(llama, fusion)
    ids, mask = tokens(0)
    src, src_mask = tokens(1, length=5, pad=(1, 0))
    loss, grads = training_step(model, ids, mask, src, src_mask, checkpoint=False)
    loss_ckpt, grads_ckpt = training_step(model, ids, mask, src, src_mask, checkpoint=True)
    torch.testing.assert_close(loss_ckpt, loss)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("fusion", ["add_relu", "cross_attention"])
def test_only_the_flare_adapter_trains(llama, fusion):
    model = stage2(llama, fusion)
    # the FLARE adapter is the outer one: model.layers.i.self_attn.q_proj.lora_A (the stage-1 one sits in .base)
    expected = {f"model.layers.{i}.{parent}.{linear}.{ab}.weight" for i in range(len(model.model.layers))
                for parent, linears in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                        ("mlp", ("gate_proj", "up_proj", "down_proj")))
                for linear in linears for ab in ("lora_A", "lora_B")}
    if fusion == "cross_attention":
        expected |= {f"model.layers.{i}.self_attn.{linear}.cross.{proj}.{wb}" for i in range(len(model.model.layers))
                     for linear in flare.FUSED for proj in "qkv" for wb in ("weight", "bias")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert {id(p) for p in flare.adapter_parameters(model, "flare")} == \
           {id(p) for p in model.parameters() if p.requires_grad}  # what the optimizer is given
    ids, mask = tokens(0)
    src, src_mask = tokens(1, length=5)
    training_step(model, ids, mask, src, src_mask)
    for name, p in model.named_parameters():
        if name in expected:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, f"{name} got a gradient"


# ------------------------------------------------------------------------------------------ the source

def layer_inputs_of(model, ids, mask, kind):
    """Each decoder layer's input h_i ("residual") or input_layernorm(h_i) ("normed"), caught by hooks."""
    caught, handles = [], []
    for layer in model.model.layers:
        if kind == "residual":
            handles.append(layer.register_forward_pre_hook(lambda mod, args: caught.append(args[0])))
        else:
            handles.append(layer.input_layernorm.register_forward_hook(lambda mod, args, out: caught.append(out)))
    with torch.no_grad():
        model(ids, mask)
    for h in handles:
        h.remove()
    return caught


@pytest.mark.parametrize("kind", ["normed", "residual"])
@pytest.mark.parametrize("name", ["flare", "transfer"])
def test_source_pass_is_the_stage1_model_with_flare_off(llama, kind, name):
    model = stage2(llama, name=name)
    stage1 = load_model(llama, dtype=torch.float32)
    flare.add_lora(stage1, "task")
    flare.set_adapter_state(stage1, "task", flare.adapter_state(model, "task"))
    src, src_mask = tokens(1, length=5, pad=(2, 0))
    reps = flare.source_representations(model, src, src_mask, kind)
    expected = layer_inputs_of(stage1, src, src_mask, kind)
    assert len(reps) == len(expected) == len(model.model.layers)
    for rep, h in zip(reps, expected):
        assert not rep.requires_grad
        assert torch.all(rep[0, :2] == 0), "padded source positions must be zero"
        torch.testing.assert_close(rep, h * src_mask[..., None], rtol=1e-5, atol=1e-5)
    assert all(m.enabled for _, m in flare.adapters(model, name)), "the FLARE adapter stays off after the pass"


def test_positions_past_the_source_prompt_use_its_last_position(llama):
    model = stage2(llama).eval()
    ids, mask = tokens(0, length=8)
    src, src_mask = tokens(1, length=5, pad=(1, 0))
    with torch.no_grad():
        reps = flare.source_representations(model, src, src_mask)
        by_hand = [torch.cat([r, r[:, -1:].expand(-1, 8 - 5, -1)], 1) for r in reps]  # (B, 8, d): row 4 repeated
        torch.testing.assert_close(model(ids, mask, source=reps), model(ids, mask, source=by_hand))


def test_cached_decoding_fuses_like_the_full_forward(llama):
    """The same position rule at test time: a prompt pass plus one token at a time with a KV cache (the decoding
    path) gives the logits of one forward over the whole sequence."""
    model = stage2(llama).eval()
    ids, mask = tokens(0, length=8)
    src, src_mask = tokens(1, length=5, pad=(1, 0))
    with torch.no_grad():
        reps = flare.source_representations(model, src, src_mask)
        full = model(ids, mask, source=reps)
        cache = KVCache(model.config, 2, 8, torch.float32, "cpu")
        steps = [model(ids[:, :5], mask[:, :5], source=reps, cache=cache)]
        steps += [model(ids[:, t:t + 1], mask[:, :t + 1], source=reps, cache=cache) for t in range(5, 8)]
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ merge, save, export

def test_merge_gives_the_adapter_logits_and_unmerge_restores_the_base(llama):
    model = load_model(llama, dtype=torch.float32)
    base = {n: p.clone() for n, p in model.named_parameters()}
    flare.add_lora(model, "task")
    randomize_B(model, "task", seed=1)
    ids, mask = tokens(0)
    with torch.no_grad():
        adapted = model(ids, mask)
        flare.merge(model, "task")
        assert not torch.allclose(model.model.layers[0].self_attn.q_proj.base.weight,
                                  base["model.layers.0.self_attn.q_proj.weight"])
        torch.testing.assert_close(model(ids, mask), adapted, rtol=1e-4, atol=1e-4)
        flare.unmerge(model, "task")
        torch.testing.assert_close(model(ids, mask), adapted, rtol=1e-4, atol=1e-4)
    for path, m in flare.adapters(model, "task"):
        torch.testing.assert_close(m.innermost().weight, base[f"{path}.weight"], rtol=0, atol=1e-6)


def test_merging_a_fused_adapter_raises(llama):
    model = stage2(llama)
    with pytest.raises(ValueError, match="only plain LoRA merges"):
        flare.merge(model, "flare")


def test_saved_adapters_load_into_a_fresh_model_with_identical_logits(llama, tmp_path):
    model = stage2(llama, "cross_attention").eval()
    flare.save_adapter(model, "task", tmp_path / "task", base_model=llama)
    flare.save_adapter(model, "flare", tmp_path / "flare", base_model=llama)
    fresh = load_model(llama, dtype=torch.float32)
    flare.load_adapter(fresh, tmp_path / "task")
    cfg = flare.load_adapter(fresh, tmp_path / "flare")
    ids, mask = tokens(0)
    src, src_mask = tokens(1, length=5)
    with torch.no_grad():
        expected = model(ids, mask, source=flare.source_representations(model, src, src_mask))
        got = fresh(ids, mask, source=flare.source_representations(fresh, src, src_mask))
    assert torch.equal(got, expected)
    with open(tmp_path / "flare" / "adapter.json") as f:
        saved = json.load(f)
    assert saved == cfg
    assert (saved["r"], saved["alpha"], saved["fusion"], saved["base_model"]) == (8, 16, "cross_attention", llama)
    assert saved["targets"] == list(flare.LINEARS)


@pytest.mark.parametrize("other, message", [(dict(num_hidden_layers=3), "does not fit"),
                                            (dict(hidden_size=64), "saved shape")], ids=["deeper", "wider"])
def test_an_adapter_of_another_model_does_not_load(llama, tmp_path, other, message):
    donor = load_model(save_tiny(tiny_hf_model("llama", **other), tmp_path / "other"), dtype=torch.float32)
    flare.add_lora(donor, "task")
    flare.save_adapter(donor, "task", tmp_path / "task")
    model = load_model(llama, dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        flare.load_adapter(model, tmp_path / "task")
    assert not any(isinstance(m, flare.LoRA) for m in model.modules())  # the failed load left no empty adapter


@pytest.mark.parametrize("fusion", [None, "add_relu"])
def test_exported_peft_adapter_gives_our_logits(llama, tmp_path, fusion):
    from peft import PeftModel
    model = load_model(llama, dtype=torch.float32)
    flare.add_lora(model, "flare", fusion=fusion)
    randomize_B(model, "flare", seed=1)
    flare.export_peft(model, "flare", tmp_path / "peft", base_model=llama)
    theirs = PeftModel.from_pretrained(hf_llama(llama), tmp_path / "peft").eval()
    ids, mask = tokens(0, pad=(0, 0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids, attention_mask=mask).logits, model(ids, mask),
                                   rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ memory

def bytes_saved_for_backward(step):
    """Bytes of the distinct storages autograd keeps for the backward pass of step() (a tensor saved twice, or two
    views of one tensor, count once: that is the memory they hold)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values())


def test_flare_saves_only_the_source_beyond_plain_lora(llama):
    """FLARE's extra activation memory per step is the source representations plus a few (B, L, r) tensors per
    fused module (relu(S), relu(T)); never a copy of the source expanded to the target length."""
    ids, mask = tokens(0, length=16)
    src, src_mask = tokens(1, length=12)
    lora = load_model(llama, dtype=torch.float32).train()
    fused = load_model(llama, dtype=torch.float32).train()
    flare.add_lora(lora, "lora")
    flare.add_lora(fused, "flare", fusion="add_relu")
    randomize_B(lora, "lora", seed=1)
    flare.set_adapter_state(fused, "flare", flare.adapter_state(lora, "lora"))
    source = flare.source_representations(fused, src, src_mask)
    plain_bytes = bytes_saved_for_backward(lambda: lm_loss(lora(ids, mask), ids))
    flare_bytes = bytes_saved_for_backward(lambda: lm_loss(fused(ids, mask, source=source), ids))
    source_bytes = sum(r.numel() * r.element_size() for r in source)
    fused_modules = len(flare.FUSED) * len(fused.model.layers)
    r_term = ids.numel() * 8 * 4  # one (B, L, r) fp32 tensor
    assert flare_bytes - plain_bytes <= source_bytes + 3 * r_term * fused_modules, \
        f"LoRA saves {plain_bytes} bytes, FLARE {flare_bytes}, the source is {source_bytes}"
