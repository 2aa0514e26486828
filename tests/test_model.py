"""model.py against transformers, on tiny random checkpoints that transformers builds and saves (see conftest.py).

Every comparison runs transformers with eager attention and an explicit dtype. The Llama models have grouped-query
attention, head_dim * heads != hidden and llama3 rope scaling; the Gemma 2 model also has sequences longer than
its sliding window and weights large enough that both soft-caps bite (checked below, so the comparison means it).
The Gemma 3 models have q_norm/k_norm, both RoPE tables (and linear scaling, and a final soft-cap, in one variant);
test_gemma3.py checks that they would catch what Gemma 3 changes, and loads its multimodal layout.
"""
import dataclasses
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import model
from conftest import BOS, GEMMA3_LINEAR, SENTENCES, VOCAB, save_tiny, save_tiny_tokenizer, tiny_hf_model

T = 24  # tokens per test sequence: longer than Gemma's sliding window (6)
VARIANTS = [pytest.param("llama", {}, id="llama-untied"),
            pytest.param("llama", {"tie_word_embeddings": True}, id="llama-tied"),
            pytest.param("gemma2", {}, id="gemma2"),
            pytest.param("gemma3", {}, id="gemma3"),
            pytest.param("gemma3", GEMMA3_LINEAR, id="gemma3-linear-rope")]
FAMILIES = ["llama", "gemma2", "gemma3"]
# fp32 tolerances. Against transformers, whose operations we repeat in the same order: absolute. Between a padded
# or cached run and a plain one, which sum in a different order: a fraction of the largest logit, because Gemma's
# saturated attention (scores near +-50 into a softmax) amplifies rounding to a few 1e-6 of it.
FP32_ATOL = 1e-5
REORDERED = 3e-5
# Gemma 3 has no attention soft-cap, so ours runs SDPA, which sums in another order than transformers' eager
# attention: about 1e-6 of the largest logit (against transformers' SDPA ours is bit-identical).
SDPA_VS_EAGER = 5e-6


def random_tokens(batch, length, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded(lengths, pad_id=2, seed=0):
    """A left-padded batch of random sequences of the given lengths: (ids, attention_mask)."""
    ids = random_tokens(len(lengths), max(lengths), seed)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, :-n], mask[b, -n:] = pad_id, 1
    return ids, mask


@torch.no_grad()
def hf_logits(hf, ids, mask=None):
    return hf(input_ids=ids, attention_mask=mask).logits.float()


@torch.no_grad()
def our_logits(ours, ids, mask=None):
    return ours(ids, mask)


def assert_close_to_scale(actual, expected, fraction):
    """Equal to within fraction of the largest expected logit."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=fraction * expected.abs().max().item())


def assert_matches_transformers(family, actual, expected):
    """fp32 logits equal to transformers' eager ones: to FP32_ATOL, or for Gemma 3 to SDPA_VS_EAGER of the scale."""
    if family == "gemma3":
        assert_close_to_scale(actual, expected, SDPA_VS_EAGER)
    else:
        torch.testing.assert_close(actual, expected, rtol=0, atol=FP32_ATOL)


def rewrite_config(folder, edit):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    edit(config)
    with open(path, "w") as f:
        json.dump(config, f)


def to_hub_shape(config):
    """The config.json shape of the Hub's Llama 3.1, Gemma 2 and Gemma 3 repos: rope_theta at the top, rope_scaling
    (null without scaling), torch_dtype, and no layer_types; Gemma 3's rope_local_base_freq for the sliding layers
    and sliding_window_pattern for where they are."""
    rope = config.pop("rope_parameters")
    if "full_attention" in rope:
        config["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        config.pop("_sliding_window_pattern")
        assert "sliding_window_pattern" in config
        rope = rope["full_attention"]
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope if rope["rope_type"] != "default" else None
    config["torch_dtype"] = config.pop("dtype")
    config.pop("layer_types", None)


# ------------------------------------------------------------------------------------ logits vs transformers

@pytest.mark.parametrize("family, overrides", VARIANTS)
def test_logits_match_transformers_in_fp32(tmp_path, family, overrides):
    hf = tiny_hf_model(family, **overrides)
    ours = model.load_model(save_tiny(hf, tmp_path), dtype=torch.float32)
    ids = random_tokens(2, T)
    assert_matches_transformers(family, our_logits(ours, ids), hf_logits(hf, ids))


@pytest.mark.parametrize("family, overrides", VARIANTS)
def test_sharded_checkpoint_matches_transformers(tmp_path, family, overrides):
    hf = tiny_hf_model(family, **overrides)
    folder = save_tiny(hf, tmp_path, max_shard_size="40KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours = model.load_model(folder, dtype=torch.float32)
    ids = random_tokens(2, T)
    assert_matches_transformers(family, our_logits(ours, ids), hf_logits(hf, ids))


@pytest.mark.parametrize("family, overrides", VARIANTS)
def test_hub_shaped_config_matches_transformers(tmp_path, family, overrides):
    hf = tiny_hf_model(family, **overrides)
    folder = save_tiny(hf, tmp_path)
    rewrite_config(folder, to_hub_shape)
    ours = model.load_model(folder, dtype=torch.float32)
    ids = random_tokens(2, T)
    assert_matches_transformers(family, our_logits(ours, ids), hf_logits(hf, ids))


@pytest.mark.parametrize("family, overrides", VARIANTS)
def test_logits_match_transformers_in_bf16(tmp_path, family, overrides):
    """Both in bf16 from the same fp32 weights. Rounding differs where Llama's attention differs (ours is SDPA, which
    accumulates in fp32; transformers' eager multiplies in bf16): about 2% of the largest logit, so the bound is 4%.
    Gemma 3's attention (SDPA too) is sharper: up to 6.5% (each side 4-7% from the fp32 logits), so 8%."""
    folder = save_tiny(tiny_hf_model(family, **overrides), tmp_path)
    ours = model.load_model(folder, dtype=torch.bfloat16)
    ids = random_tokens(2, T)
    hf_bf16 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="eager")
    reference = hf_logits(hf_bf16, ids)
    assert_close_to_scale(our_logits(ours, ids), reference, 0.08 if family == "gemma3" else 0.04)


def test_load_model_casts_weights_to_the_requested_dtype_and_keeps_rope_in_fp32(tmp_path):
    ours = model.load_model(save_tiny(tiny_hf_model("llama"), tmp_path), dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert ours.inv_freq.dtype == torch.float32


def test_a_change_to_weights_loaded_in_the_files_dtype_reaches_neither_the_file_nor_the_next_load(tmp_path):
    """The loaded weights are the model's own (safe_open maps the file): an in-place change (as flare.merge makes)
    must stay in this process."""
    folder = save_tiny(tiny_hf_model("llama"), tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    stored, before = load_file(path), path.read_bytes()
    ours = model.load_model(folder, dtype=torch.float32)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(1.0)
    assert path.read_bytes() == before
    again = dict(model.load_model(folder, dtype=torch.float32).named_parameters())
    for name, p in ours.named_parameters():
        assert torch.equal(again[name], stored[name]) and torch.equal(p, stored[name] + 1.0)


@pytest.mark.parametrize("offset", [False, True], ids=["llama", "gemma"])
def test_rms_norm_keeps_one_fp32_copy_of_a_bf16_input_for_backward(offset):
    norm = model.RMSNorm(64, 1e-6, offset).to(torch.bfloat16).requires_grad_(False)  # frozen, as in training
    x = torch.randn(4, 8, 64, dtype=torch.bfloat16, requires_grad=True)
    kept = {}  # storage -> bytes, of what autograd keeps for backward

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = norm(x)
    y.sum().backward()  # and backward still runs
    fp32_input, rows = 4 * x.numel(), 4 * 4 * 8  # one fp32 copy, and the fp32 rsqrt per row
    assert fp32_input <= sum(kept.values()) <= fp32_input + rows + 4 * 64 + 2 * 64  # + the weight, fp32 and bf16


def test_gemma2_test_model_reaches_both_softcaps(tmp_path, monkeypatch):
    """The Gemma 2 comparisons above prove the soft-caps only if scores and logits come near the caps."""
    hf = tiny_hf_model("gemma2")
    ours = model.load_model(save_tiny(hf, tmp_path), dtype=torch.float32)
    capped_scores, tanh = [], torch.tanh
    def spy(x):
        y = tanh(x)
        if y.dim() == 4:  # (B, nh, T, S): tanh(score / cap), the attention soft-cap
            capped_scores.append(y * hf.config.attn_logit_softcapping)
        return y
    monkeypatch.setattr(torch, "tanh", spy)
    logits = our_logits(ours, random_tokens(2, T))
    assert len(capped_scores) == hf.config.num_hidden_layers
    assert max(s.abs().max() for s in capped_scores) > 0.9 * hf.config.attn_logit_softcapping
    assert logits.abs().max() > 0.9 * hf.config.final_logit_softcapping


def test_llama_test_model_rope_scaling_changes_frequencies_that_turn_within_the_sequence():
    """The Llama comparisons prove llama3 rope scaling only if it changes angles within T positions."""
    config = model.Config.from_hf(tiny_hf_model("llama").config.to_dict())
    unscaled = dataclasses.replace(config, rope_scaling=None)
    changed = model.rope_frequencies(config) != model.rope_frequencies(unscaled)
    assert (model.rope_frequencies(unscaled)[changed] * T > 1.0).any()  # more than a radian over the sequence


# ---------------------------------------------------------------------------------- padding, cache, generation

@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_matches_each_sequence_alone(tmp_path, family):
    ours = model.load_model(save_tiny(tiny_hf_model(family), tmp_path), dtype=torch.float32)
    lengths = [7, 15, T]
    ids, mask = left_padded(lengths)
    batched = our_logits(ours, ids, mask)
    for b, n in enumerate(lengths):
        alone = our_logits(ours, ids[b:b + 1, -n:])
        assert_close_to_scale(batched[b:b + 1, -n:], alone, REORDERED)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cached_forward_matches_full_forward(tmp_path, family):
    """A left-padded prompt, then a chunk of 3 tokens, then one token at a time, past the sliding window."""
    ours = model.load_model(save_tiny(tiny_hf_model(family), tmp_path), dtype=torch.float32)
    ids, mask = left_padded([9, 14, 16], seed=1)
    ids = torch.cat([ids, random_tokens(3, 8, seed=2)], 1)
    mask = torch.cat([mask, torch.ones(3, 8, dtype=torch.long)], 1)
    full = our_logits(ours, ids, mask)
    cache = model.KVCache(ours.config, 3, ids.shape[1], torch.float32, "cpu")
    steps = [(0, 16), (16, 19)] + [(i, i + 1) for i in range(19, ids.shape[1])]
    with torch.no_grad():
        incremental = torch.cat([ours(ids[:, a:b], mask[:, :b], cache=cache) for a, b in steps], 1)
    assert_close_to_scale(incremental[:, 16:], full[:, 16:], REORDERED)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_greedy_generation_matches_transformers(tmp_path, family):
    """EOS is the 4th token the first sequence generates, so it stops while the others go on; transformers pads a
    finished sequence with pad_token_id, we continue it with EOS, hence pad_token_id = EOS."""
    hf = tiny_hf_model(family)
    ours = model.load_model(save_tiny(hf, tmp_path), dtype=torch.float32)
    ids, mask = left_padded([5, 9, 12], seed=3)
    def hf_generate(eos, max_new_tokens):
        return hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                           eos_token_id=eos, pad_token_id=eos)[:, ids.shape[1]:]
    eos = int(hf_generate(hf.config.eos_token_id, 4)[0, 3])
    reference = hf_generate(eos, 12)
    generated = ours.generate(ids, mask, max_new_tokens=12, eos_id=eos)
    assert torch.equal(generated, reference)
    assert (generated[0, 4:] == eos).all()  # the first sequence has stopped...
    assert (generated[1:] != eos).any()     # ...while the others went on


# ------------------------------------------------------------------------------------------ the source pass

@torch.no_grad()
def hf_layer_inputs(hf, ids, kind):
    """transformers' input of each decoder layer: with output_hidden_states, hidden_states[i] is the residual stream
    entering layer i (the last of its num_layers + 1 is the final norm's output, which no layer takes); "normed":
    what each layer's input_layernorm returns, caught by a hook."""
    if kind == "residual":
        return list(hf(input_ids=ids, output_hidden_states=True).hidden_states[:-1])
    caught = []
    handles = [layer.input_layernorm.register_forward_hook(lambda mod, args, out: caught.append(out))
               for layer in hf.model.layers]
    hf(input_ids=ids)
    for handle in handles:
        handle.remove()
    return caught


@pytest.mark.parametrize("kind", ["residual", "normed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_source_pass_gives_each_layer_input_that_transformers_computes(tmp_path, family, kind):
    hf = tiny_hf_model(family)
    ours = model.load_model(save_tiny(hf, tmp_path), dtype=torch.float32)
    ids = random_tokens(2, T)
    with torch.no_grad():
        got = ours.layer_inputs(ids, torch.ones_like(ids), kind)
    expected = hf_layer_inputs(hf, ids, kind)
    assert len(got) == len(expected) == ours.config.num_layers
    for rep, h in zip(got, expected):
        assert_matches_transformers(family, rep, h)


@pytest.mark.parametrize("family", FAMILIES)
def test_source_pass_runs_no_layer_past_the_last_input_it_reads(tmp_path, family):
    ours = model.load_model(save_tiny(tiny_hf_model(family), tmp_path), dtype=torch.float32)
    calls = []
    modules = {"norm": ours.model.norm, **{f"layer {i}": layer for i, layer in enumerate(ours.model.layers)}}
    for name, module in modules.items():
        module.register_forward_hook(lambda mod, args, out, name=name: calls.append(name))
    with torch.no_grad():
        ours.layer_inputs(random_tokens(2, T), kind="residual")
    assert calls == [f"layer {i}" for i in range(ours.config.num_layers - 1)]


def test_source_pass_rejects_an_unknown_representation(tmp_path):
    ours = model.load_model(save_tiny(tiny_hf_model("llama"), tmp_path), dtype=torch.float32)
    with pytest.raises(ValueError, match="'normed' or 'residual'"):
        ours.layer_inputs(random_tokens(1, 4), kind="hidden")


# ----------------------------------------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


TEXTS = [SENTENCES[0], "Grüße aus Köln, naïve café", "Быстрая лиса", "敏捷的棕色狐狸", "emoji 🙂 and tabs\t",
         "  two leading spaces", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_ids_match_transformers(tokenizer_folder, text):
    reference = AutoTokenizer.from_pretrained(tokenizer_folder)(text, add_special_tokens=True)["input_ids"]
    assert model.load_tokenizer(tokenizer_folder).encode(text) == reference


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_starts_with_bos_exactly_once(tokenizer_folder, text):
    tokenizer = model.load_tokenizer(tokenizer_folder)
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_id and ids.count(tokenizer.bos_id) == 1
    assert tokenizer.encode(text, bos=False) == ids[1:]


def test_tokenizer_special_ids_match_transformers(tokenizer_folder):
    reference = AutoTokenizer.from_pretrained(tokenizer_folder)
    tokenizer = model.load_tokenizer(tokenizer_folder)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == \
           (reference.bos_token_id, reference.eos_token_id, reference.pad_token_id)
    assert tokenizer.bos_id == reference.convert_tokens_to_ids(BOS)


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_decode_inverts_encode(tokenizer_folder, text):
    tokenizer = model.load_tokenizer(tokenizer_folder)
    assert tokenizer.decode(tokenizer.encode(text)) == text


# ------------------------------------------------------------------------------------- resolving and errors

def fake_snapshot_download(monkeypatch, result):
    """Replaces huggingface_hub.snapshot_download (model.resolve imports it when called); returns the repo ids
    it was asked for. result: the folder to return, or an exception to raise."""
    import huggingface_hub
    asked = []
    def snapshot_download(repo_id, **kwargs):
        asked.append(repo_id)
        if isinstance(result, Exception):
            raise result
        return result
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return asked


def hub_error(kind, repo):
    import httpx2  # huggingface_hub's HTTP client; its errors carry the response
    from huggingface_hub import errors
    request = httpx2.Request("GET", f"https://huggingface.co/api/models/{repo}")
    return getattr(errors, kind)(f"{kind} for {repo}", response=httpx2.Response(403, request=request))


@pytest.mark.parametrize("name, repo", [("llama3.2-1b", "meta-llama/Llama-3.2-1B"),
                                        ("someone/tiny-llama", "someone/tiny-llama")])
def test_alias_or_repo_id_downloads_its_hub_repo(tmp_path, monkeypatch, name, repo):
    asked = fake_snapshot_download(monkeypatch, save_tiny(tiny_hf_model("llama"), tmp_path))
    monkeypatch.chdir(tmp_path)  # so that name is no local folder
    assert isinstance(model.load_model(name, dtype=torch.float32), model.Transformer)
    assert asked == [repo]


def test_unknown_alias_is_an_error_that_lists_the_aliases(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"unknown model 'llama3-8b'.*llama3\.1-8b, .*gemma2-27b"):
        model.load_model("llama3-8b")


def test_gated_repo_says_to_accept_the_licence_and_log_in(monkeypatch):
    fake_snapshot_download(monkeypatch, hub_error("GatedRepoError", "meta-llama/Llama-3.1-8B"))
    with pytest.raises(PermissionError, match=r"meta-llama/Llama-3\.1-8B is gated: accept its licence.*log in"):
        model.load_model("llama3.1-8b")


def test_missing_repo_is_an_error_that_names_it(monkeypatch):
    fake_snapshot_download(monkeypatch, hub_error("RepositoryNotFoundError", "someone/no-such-model"))
    with pytest.raises(ValueError, match=r"someone/no-such-model was not found on the Hub"):
        model.load_model("someone/no-such-model")


def test_folder_without_config_json_is_an_error(tmp_path):
    folder = save_tiny(tiny_hf_model("llama"), tmp_path)
    os.remove(os.path.join(folder, "config.json"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        model.load_model(folder)


def test_folder_without_safetensors_is_an_error(tmp_path):
    folder = save_tiny(tiny_hf_model("llama"), tmp_path)
    os.remove(os.path.join(folder, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors in .*reads safetensors only"):
        model.load_model(folder)


def test_unsupported_architecture_is_an_error_that_names_it(tmp_path):
    folder = save_tiny(tiny_hf_model("llama"), tmp_path)
    rewrite_config(folder, lambda config: config.update(model_type="mistral"))
    with pytest.raises(ValueError, match=r"model_type 'mistral' is not supported; flare implements llama, gemma2"):
        model.load_model(folder)


def edit_checkpoint(folder, edit):
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_tensor_of_wrong_shape_is_an_error_with_name_and_both_shapes(tmp_path):
    folder = save_tiny(tiny_hf_model("llama"), tmp_path)
    edit_checkpoint(folder, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 48)}))
    with pytest.raises(ValueError, match=re.escape("model.layers.0.self_attn.q_proj.weight in ") +
                       r".*" + re.escape("has shape (32, 48), but config.json implies (64, 48)")):
        model.load_model(folder)


def test_missing_and_unexpected_tensors_are_an_error_that_names_them(tmp_path):
    folder = save_tiny(tiny_hf_model("llama"), tmp_path)
    def edit(tensors):
        tensors["model.layers.1.mlp.extra.weight"] = tensors.pop("model.layers.1.mlp.up_proj.weight")
    edit_checkpoint(folder, edit)
    with pytest.raises(ValueError, match=re.escape("missing tensors ['model.layers.1.mlp.up_proj.weight'], "
                                                   "unexpected tensors ['model.layers.1.mlp.extra.weight']")):
        model.load_model(folder)
