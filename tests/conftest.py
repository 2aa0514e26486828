"""Tiny random checkpoints built by transformers, shared by the model and FLARE tests.

tiny_hf_model builds a Llama 3, Gemma 2 or Gemma 3 with transformers and randomises every weight, norms included
(Gemma's zero-initialised norms would hide a missing 1 + w); tiny_hf_multimodal a Gemma 3 with a vision tower.
save_tiny writes either as the Hub does (config.json and safetensors, optionally sharded); save_tiny_tokenizer
writes a byte-level BPE tokenizer.json for the same vocab.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: model.py, ...

VOCAB = 320  # the tokenizer's vocab: 256 byte symbols, 3 special tokens, the rest merges
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<pad>"

# Small, but with every switch on: grouped-query attention (4 heads, 2 kv heads), head_dim * heads != hidden,
# Llama 3.1's rope scaling with original_max_position_embeddings small enough that the scaled frequencies turn
# within a few dozen positions, and a Gemma sliding window shorter than the test sequences.
COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
              pad_token_id=2)
LLAMA = dict(COMMON, rms_norm_eps=1e-5, tie_word_embeddings=False,
             rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                  high_freq_factor=4.0, original_max_position_embeddings=64))
GEMMA2 = dict(COMMON, rms_norm_eps=1e-6, query_pre_attn_scalar=24, sliding_window=6, attn_logit_softcapping=50.0,
              final_logit_softcapping=30.0, rope_parameters=dict(rope_type="default", rope_theta=10000.0))
# Gemma 3: three layers, sliding, sliding, full (sliding_window_pattern 3, which Gemma 2's alternation would get
# wrong), the real models' two RoPE tables (sliding layers theta 10,000, full ones 1,000,000; GEMMA3_LINEAR adds the
# 4B+ linear scaling of the full ones, and a final soft-cap), and an attention soft-cap in the config, which Gemma 3
# ignores (so does transformers: the comparisons fail if we applied it).
GEMMA3 = dict(COMMON, num_hidden_layers=3, rms_norm_eps=1e-6, query_pre_attn_scalar=24, sliding_window=6,
              sliding_window_pattern=3, attn_logit_softcapping=50.0,
              rope_parameters=dict(full_attention=dict(rope_type="default", rope_theta=1_000_000.0),
                                   sliding_attention=dict(rope_type="default", rope_theta=10_000.0)))
GEMMA3_LINEAR = dict(final_logit_softcapping=30.0, rope_parameters=dict(
    full_attention=dict(rope_type="linear", factor=8.0, rope_theta=1_000_000.0),
    sliding_attention=dict(rope_type="default", rope_theta=10_000.0)))
# Random weights: (std of the embeddings, std of the other matrices, range of the final norm's weights); every
# other norm weight is U(0.5, 1.5). Gemma's large matrices and final norm make both soft-caps bite (test_model.py
# checks that they do); its embeddings stay small, as large tied ones make a random model repeat its last token.
INIT = {"llama": (0.2, 0.2, (0.5, 1.5)), "gemma2": (0.1, 0.6, (15.0, 20.0)), "gemma3": (0.1, 0.6, (15.0, 20.0))}


def tiny_hf_model(family, dtype=torch.float32, seed=0, **overrides):
    """A transformers LlamaForCausalLM ("llama"), Gemma2ForCausalLM ("gemma2") or Gemma3ForCausalLM ("gemma3") with
    eager attention and every weight random (see INIT). overrides replace config fields."""
    from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig,
                              LlamaForCausalLM)
    config_class, model_class, fields = {"llama": (LlamaConfig, LlamaForCausalLM, LLAMA),
                                         "gemma2": (Gemma2Config, Gemma2ForCausalLM, GEMMA2),
                                         "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, GEMMA3)}[family]
    config = config_class(**{**fields, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomise(model_class(config), family).to(dtype).eval()


def tiny_hf_multimodal(dtype=torch.float32, seed=0, **overrides):
    """A transformers Gemma3ForConditionalGeneration: GEMMA3's text decoder (overrides replace its fields) and a
    one-layer SigLIP vision tower, eager attention, every weight random."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=7)
    config = Gemma3Config(text_config=Gemma3TextConfig(**{**GEMMA3, **overrides}), vision_config=vision,
                          mm_tokens_per_image=4)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomise(Gemma3ForConditionalGeneration(config), "gemma3").to(dtype).eval()


def randomise(model, family):
    embed_std, std, (low, high) = INIT[family]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ("model.norm.weight", "model.language_model.norm.weight"):  # the final norm
                p.uniform_(low, high)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, embed_std if "embed_tokens" in name else std)
    return model


def save_tiny(hf_model, folder, max_shard_size=None):
    """Writes config.json and model.safetensors (or shards and model.safetensors.index.json); returns folder."""
    hf_model.save_pretrained(folder, **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))
    return str(folder)


SENTENCES = ["The quick brown fox jumps over the lazy dog.", "A model reads a sentence and predicts the next word.",
             "Der schnelle braune Fuchs springt über den faulen Hund.", "Le renard brun saute par-dessus le chien.",
             "Быстрая коричневая лиса прыгает через ленивую собаку.", "敏捷的棕色狐狸跳过了懒狗。"]


def save_tiny_tokenizer(folder):
    """A byte-level BPE tokenizer.json trained on a few sentences, whose post-processor adds BOS (as Llama 3's
    does), and a tokenizer_config.json naming BOS, EOS and PAD; ids match COMMON's. Returns folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
                   "pad_token": PAD}, f)
    return str(folder)
