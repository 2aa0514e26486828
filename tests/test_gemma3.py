"""Gemma 3 beyond test_model.py's shared comparisons: the multimodal checkpoints' layout and sparse config, the
defaults, the layer pattern, the two RoPE tables, and proof that the comparisons catch what Gemma 3 changes.

transformers builds and saves every model (eager attention, fp32, every weight random, see conftest.py).
"""
import dataclasses
import json
import os
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import Gemma3Config, Gemma3TextConfig

import flare
import model
from conftest import GEMMA3, GEMMA3_LINEAR, save_tiny, tiny_hf_model, tiny_hf_multimodal
from test_model import (SDPA_VS_EAGER, T, assert_close_to_scale, fake_snapshot_download, hf_logits, our_logits,
                        random_tokens, rewrite_config, to_hub_shape)


@pytest.fixture(scope="module")
def linear(tmp_path_factory):
    """A tiny Gemma 3 with every switch on (GEMMA3_LINEAR) and the folder it is saved in."""
    hf = tiny_hf_model("gemma3", **GEMMA3_LINEAR)
    return hf, save_tiny(hf, tmp_path_factory.mktemp("gemma3"))


# ------------------------------------------------------------------------------------ the multimodal checkpoints

def to_sparse_hub_text_config(config):
    """The Hub's gemma-3-4b-pt shape: the text_config in the Hub's config.json shape, and only the fields that
    differ from Gemma3TextConfig's defaults (the 4B's holds six)."""
    text = config["text_config"]
    text["dtype"] = config["dtype"]  # to_hub_shape renames it
    to_hub_shape(text)
    defaults = Gemma3TextConfig().to_dict()
    defaults.update(rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, sliding_window_pattern=6)
    config["text_config"] = {k: v for k, v in text.items() if k not in defaults or defaults[k] != v}
    assert "rope_theta" not in config["text_config"] and "rms_norm_eps" not in config["text_config"]  # defaulted


def to_model_language_model_layout(folder):
    """Some fine-tunes store the text decoder under model.language_model.* and the vision tower under model.*."""
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    renamed = {re.sub(r"^language_model\.model\.", "model.language_model.", re.sub(
        r"^(vision_tower|multi_modal_projector)\.", r"model.\1.", name)): t for name, t in tensors.items()}
    save_file(renamed, path, metadata={"format": "pt"})


MULTIMODAL = [pytest.param(None, None, None, id="transformers5-config"),
              pytest.param(to_sparse_hub_text_config, None, "40KB", id="sparse-hub-config-sharded"),
              pytest.param(None, to_model_language_model_layout, None, id="model.language_model-layout")]


@pytest.mark.parametrize("edit_config, edit_tensors, max_shard_size", MULTIMODAL)
def test_multimodal_checkpoint_text_logits_match_transformers(tmp_path, capsys, edit_config, edit_tensors,
                                                              max_shard_size):
    """The 4B+ layout: a Gemma3ForConditionalGeneration (linear RoPE scaling, as theirs), loaded by us as its text
    decoder, the vision tensors skipped and each family of them named once; text-only logits as transformers'.
    (No final soft-cap, as in theirs: Gemma3ForConditionalGeneration would not apply one.)"""
    hf = tiny_hf_multimodal(rope_parameters=GEMMA3_LINEAR["rope_parameters"])
    folder = save_tiny(hf, tmp_path, max_shard_size=max_shard_size)
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["model_type"] == "gemma3"
    if edit_config:
        rewrite_config(folder, edit_config)
    if edit_tensors:
        edit_tensors(folder)
    capsys.readouterr()
    ours = model.load_model(folder, dtype=torch.float32)
    log = capsys.readouterr().err
    prefix = "model." if edit_tensors else ""
    vision = sum(name.startswith("model.vision_tower.") for name in hf.state_dict())
    skipped = f"skipped {prefix}multi_modal_projector.* (2 tensors), {prefix}vision_tower.* ({vision} tensors)"
    assert log.endswith(skipped + "\n")
    assert log.count("\n") == 1, log
    ids = random_tokens(2, T)
    assert_close_to_scale(our_logits(ours, ids), hf_logits(hf, ids), SDPA_VS_EAGER)


def test_vision_tensors_in_a_text_checkpoint_are_unexpected(tmp_path):
    """Only a multimodal config.json makes vision tensors skippable: in a gemma3_text checkpoint they are an error."""
    folder = save_tiny(tiny_hf_model("gemma3"), tmp_path)
    path = os.path.join(folder, "model.safetensors")
    save_file({**load_file(path), "vision_tower.probe": torch.zeros(1)}, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape("unexpected tensors ['vision_tower.probe']")):
        model.load_model(folder)


# ---------------------------------------------------------------------------------------------------- config

def test_empty_text_config_takes_transformers_defaults():
    """A multimodal config with an empty text_config reads as transformers' default Gemma 3 text config."""
    assert model.Config.from_hf({"model_type": "gemma3", "text_config": {}}) == \
           model.Config.from_hf(Gemma3TextConfig().to_dict())
    assert model.Config.from_hf(Gemma3Config().to_dict()) == model.Config.from_hf(Gemma3TextConfig().to_dict())


@pytest.mark.parametrize("layers, pattern", [(12, 6), (7, 3), (4, 1)])
def test_full_layers_follow_sliding_window_pattern_as_in_transformers(layers, pattern):
    hf = Gemma3TextConfig(num_hidden_layers=layers, sliding_window_pattern=pattern).to_dict()
    expected = tuple(i for i, t in enumerate(hf.pop("layer_types")) if t == "sliding_attention")
    assert model.Config.from_hf(hf).sliding_layers == expected


def test_layer_types_override_the_pattern():
    hf = Gemma3TextConfig(num_hidden_layers=4, layer_types=["full_attention", "sliding_attention"] * 2).to_dict()
    assert model.Config.from_hf(hf).sliding_layers == (1, 3)


def test_attention_softcap_in_the_config_is_ignored_and_the_final_one_kept_only_if_set():
    config = model.Config.from_hf(Gemma3TextConfig(attn_logit_softcapping=50.0).to_dict())
    assert config.attn_softcap is None and config.final_softcap is None
    assert model.Config.from_hf(Gemma3TextConfig(final_logit_softcapping=30.0).to_dict()).final_softcap == 30.0


def test_bidirectional_attention_is_an_error_that_says_why():
    with pytest.raises(ValueError, match="use_bidirectional_attention is set: that is EmbeddingGemma"):
        model.Config.from_hf(Gemma3TextConfig(use_bidirectional_attention=True).to_dict())


def test_scaled_rope_on_the_sliding_layers_is_an_error():
    rope = dict(GEMMA3["rope_parameters"], sliding_attention=dict(rope_type="linear", factor=2.0, rope_theta=1e4))
    with pytest.raises(ValueError, match="sliding layers take unscaled RoPE"):
        model.Config.from_hf(Gemma3TextConfig(rope_parameters=rope).to_dict())


@pytest.mark.parametrize("alias, repo", [("gemma3-270m", "google/gemma-3-270m"), ("gemma3-1b", "google/gemma-3-1b-pt"),
                                         ("gemma3-4b", "google/gemma-3-4b-pt"), ("gemma3-12b", "google/gemma-3-12b-pt"),
                                         ("gemma3-27b", "google/gemma-3-27b-pt")])
def test_gemma3_alias_downloads_its_hub_repo(linear, tmp_path, monkeypatch, alias, repo):
    asked = fake_snapshot_download(monkeypatch, linear[1])
    monkeypatch.chdir(tmp_path)  # so that alias is no local folder
    assert model.load_model(alias, dtype=torch.float32).config.qk_norm
    assert asked == [repo]


# ------------------------------------------------------------------------------------------------ RoPE tables

def test_rope_tables_are_transformers_and_differ_within_the_sequence(linear):
    """Ours equal transformers' per layer type, and the tiny model's comparisons prove both: the sliding layers'
    table, the full layers' table and its linear scaling each turn some angle by over a radian within T positions
    differently from the others; the sliding layers see past their window, and one layer is full."""
    hf, folder = linear
    ours = model.load_model(folder, dtype=torch.float32)
    rotary = hf.model.rotary_emb
    assert torch.equal(ours.inv_freq, rotary.full_attention_inv_freq)
    assert torch.equal(ours.sliding_inv_freq, rotary.sliding_attention_inv_freq)
    unscaled = model.rope_frequencies(dataclasses.replace(ours.config, rope_scaling=None))
    for a, b in [(ours.inv_freq, ours.sliding_inv_freq), (ours.inv_freq, unscaled), (unscaled, ours.sliding_inv_freq)]:
        assert ((a - b).abs() * T > 1.0).any()
    c = ours.config
    assert c.sliding_layers == (0, 1) and c.num_layers == 3 and T > c.sliding_window


# ----------------------------------------------------------------------- the comparisons catch Gemma 3's changes

def apply_softcap(ours):
    for layer in ours.model.layers:
        layer.self_attn.softcap = 50.0


def drop_qk_norm_offset(ours):
    for layer in ours.model.layers:
        layer.self_attn.q_norm.offset = layer.self_attn.k_norm.offset = False


def one_rope_table(ours):
    ours.sliding_inv_freq = ours.inv_freq


def no_linear_scaling(ours):
    ours.inv_freq = model.rope_frequencies(dataclasses.replace(ours.config, rope_scaling=None))


def no_sliding_window(ours):
    ours.config = dataclasses.replace(ours.config, sliding_layers=())


@pytest.mark.parametrize("mistake", [apply_softcap, drop_qk_norm_offset, one_rope_table, no_linear_scaling,
                                     no_sliding_window])
def test_each_gemma3_mistake_breaks_the_comparison_with_transformers(linear, mistake):
    """The logits match transformers' (test_model.py), and each of these mistakes would make them not match."""
    hf, folder = linear
    ours = model.load_model(folder, dtype=torch.float32)
    ids = random_tokens(2, T)
    reference = hf_logits(hf, ids)
    assert_close_to_scale(our_logits(ours, ids), reference, SDPA_VS_EAGER)
    mistake(ours)
    with pytest.raises(AssertionError):
        assert_close_to_scale(our_logits(ours, ids), reference, SDPA_VS_EAGER)


# ------------------------------------------------------------------------------------------------------ FLARE

def test_flare_adapter_trains_on_gemma3_and_reads_the_source(linear):
    """add_lora on every linear (not q_norm/k_norm), then a FLARE forward and backward: the source changes the
    loss, and gradients reach the fused adapter."""
    torch.manual_seed(0)
    ours = model.load_model(linear[1], dtype=torch.float32)
    flare.add_lora(ours, "flare", fusion="add_relu")
    for _, m in flare.adapters(ours, "flare"):
        torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    assert len(list(flare.adapters(ours, "flare"))) == 7 * ours.config.num_layers
    ids, mask = random_tokens(2, T, seed=1), torch.ones(2, T, dtype=torch.long)
    losses = []
    for seed in (2, 3):
        source = flare.source_representations(ours, random_tokens(2, T, seed=seed), mask)
        logits = ours.train()(ids, mask, source=source)
        losses.append(F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()))
    assert abs(losses[0].item() - losses[1].item()) > 1e-4
    losses[0].backward()
    grads = [m.lora_A.weight.grad for name, m in flare.adapters(ours, "flare") if name.endswith("q_proj")]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
