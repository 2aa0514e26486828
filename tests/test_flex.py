"""Gemma's attention through flex_attention (the CUDA path of model.Attention) against the eager math.

flex_attention has no backward on CPU, so here the forward is compared, with torch's unfused flex_attention;
bench/check_flex_cuda.py compares forward and backward with the compiled kernel on a GPU. The sequences are longer
than one 128-position block of the block mask, with sliding windows that cross block boundaries and a row whose
first block is all padding, and the tiny Gemma 2 reaches both soft-caps (tests/test_model.py checks that).
"""
import dataclasses

import pytest
import torch

import model
from conftest import save_tiny, tiny_hf_model

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
LENGTHS = [140, 133, 9]  # the last row: 131 positions of padding, more than one whole block


def left_padded(lengths, seed=0):
    ids = torch.randint(3, 320, (len(lengths), max(lengths)), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, :-n], mask[b, -n:] = 2, 1
    return ids, mask


def flex_forced(monkeypatch):
    """Takes the flex path on CPU (it is chosen on CUDA only); returns the list of flex calls made."""
    calls, flex = [], model.flex
    monkeypatch.setattr(model, "uses_flex", lambda device, config, cache: cache is None)
    monkeypatch.setattr(model, "flex", lambda *a: calls.append(a[3]) or flex(*a))
    return calls


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    hf = tiny_hf_model("gemma2")
    return hf, model.load_model(save_tiny(hf, tmp_path_factory.mktemp("gemma2")), dtype=torch.float32)


def test_flex_forward_matches_the_eager_math_on_a_left_padded_gemma2_batch(gemma2, monkeypatch):
    _, ours = gemma2
    ids, mask = left_padded(LENGTHS)
    with torch.no_grad():
        eager = ours(ids, mask)
        calls = flex_forced(monkeypatch)
        flexed = ours(ids, mask)
    assert calls == [ours.config.attn_softcap] * ours.config.num_layers  # every layer, with the cap
    # Different summation order (and flex's -inf for masked scores): a fraction of the largest logit.
    torch.testing.assert_close(flexed, eager, rtol=0, atol=3e-5 * eager.abs().max().item())


def test_flex_forward_matches_transformers(gemma2, monkeypatch):
    hf, ours = gemma2
    ids, _ = left_padded([140, 140], seed=1)
    flex_forced(monkeypatch)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.float()
        flexed = ours(ids)
    torch.testing.assert_close(flexed, ref, rtol=0, atol=3e-5 * ref.abs().max().item())


def test_flex_without_softcap_matches_sdpa(gemma2, monkeypatch):
    """No soft-cap (Gemma 3's attention): the eager path is SDPA with the boolean masks, flex has no score_mod."""
    _, ours = gemma2
    monkeypatch.setattr(ours.config, "attn_softcap", None)
    for layer in ours.model.layers:
        monkeypatch.setattr(layer.self_attn, "softcap", None)
    ids, mask = left_padded(LENGTHS, seed=2)
    with torch.no_grad():
        sdpa = ours(ids, mask)
        calls = flex_forced(monkeypatch)
        flexed = ours(ids, mask)
    assert calls == [None] * ours.config.num_layers
    torch.testing.assert_close(flexed, sdpa, rtol=0, atol=3e-5 * sdpa.abs().max().item())


def test_flex_path_is_chosen_for_gemma_on_cuda_only_and_never_with_a_cache():
    gemma = model.Config.from_hf(tiny_hf_model("gemma2").config.to_dict())
    llama = model.Config.from_hf(tiny_hf_model("llama").config.to_dict())
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert model.uses_flex(cuda, gemma, None)
    assert model.uses_flex(cuda, dataclasses.replace(gemma, attn_softcap=None), None)  # sliding windows alone
    assert not model.uses_flex(cpu, gemma, None)
    assert not model.uses_flex(cuda, gemma, cache=object())
    assert not model.uses_flex(cuda, llama, None)
