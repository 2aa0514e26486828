"""The CPU demo: a synthetic language pair, the "synth" task's pairs, and a tiny model pretrained on it.

The method itself lives in model.py, flare.py, data.py and train.py; this file only makes something for them to run
on without a download or a GPU: `python train.py --model tiny --task synth` (see the README, "The CPU demo").
synth_pairs gives the task's Pairs (train.main asks for them instead of data.load_pairs), write_synth_tokenizer a
word-level tokenizer for both languages, and pretrain_tiny a 4-layer Llama-architecture model trained from scratch
on synth_corpus, saved like a Hub checkpoint so that it loads through model.load_model like a real one.

"English" is a small grammar over the words below. A review has one to three clauses joined by and/but/then and
ends in ".". Exactly one clause is polar: "DET NOUN COP [not] [ADV] ADJ" with a good or bad adjective; the others
are neutral: the same shape with a plain adjective, or "PRON VERB DET NOUN [TIME]". The label is "positive" when
the polar adjective is good, flipped by "not". The target language "syn" is derived from it:
  - a bijective word substitution into made-up words (consonant-vowel syllables, fixed, not seeded), disjoint from
    the English words except eight loanwords (ANCHORS) and "." that both languages share;
  - about a third of the nouns, verbs and adjectives are two tokens, a stem and a suffix (-na -ri -ko -tu);
  - other word orders: the determiner follows the noun, the copula clause is "NOUN DET wa [ADV] ADJ [not] COP"
    (negation after the adjective, verb-final), the event clause "PRON wa NOUN DET o [TIME] VERB", and every review
    ends in "de .": particles wa (topic), o (object) and de (final) have no English counterpart.
So a syn review is longer than its English original and only roughly position-aligned with it.
Translation is imperfect, as real MT is: with probability `noise` per copula clause the translation drops a "not"
or swaps the adjective for a random one. The translated side is the target in train (like XNLI's machine-translated
train, labelled by the English original) and the English source in validation and test (the "MT" of target text).
Items are split by a hash of their English text (0 mod 10 test, 1 validation, else train), so splits never share a
review and the first n items of a split for a seed do not depend on the other splits' sizes.
"""
import contextlib
import json
import os
import random
import sys
import zlib

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from data import TASKS, Pair, check_task
from flare import atomic_write, write_json
from model import Config, Transformer, load_tokenizer

PRETRAIN_STEPS = 400  # the tiny model's pretraining, in batches of 64 reviews (pretrain_tiny)


# ----------------------------------------------------------------------------------------------------------------
# The two languages: words, lexicon, reviews, and from them the task's pairs and the pretraining corpus

SYNTH_WORDS = {
    "det": "the this my our their", "pron": "i we they she he", "cop": "is was", "conj": "and but then",
    "adv": "very really quite so rather truly",
    "time": "today yesterday again twice recently tonight once early late finally",
    "good": "good great excellent tasty friendly clean lovely perfect amazing wonderful pleasant helpful fresh "
            "comfortable delicious nice superb brilliant charming fantastic cozy beautiful polite reliable fast "
            "enjoyable impressive warm generous fun",
    "bad": "bad awful terrible dirty rude horrible boring noisy slow broken poor stale bland greasy smelly unhelpful "
           "disappointing overpriced uncomfortable cramped dull nasty unreliable careless messy weak mediocre useless "
           "annoying disgusting",
    "plain": "big small new old red blue green white black long short round tall wooden plastic local modern square "
             "yellow brown heavy wide narrow open simple metal tiny large dark grey",
    "noun": "food soup room staff service waiter bed view pool coffee tea bread cake rice chicken fish salad noodles "
            "beer wine phone screen battery camera laptop app keyboard charger movie book story ending actor song "
            "album show game hotel pizza taxi radio menu cafe wifi bus train flight seat driver guide tour beach park "
            "museum shop market price bill shower kitchen garden lobby bathroom window door car bike shoes jacket bag "
            "watch lamp chair table sofa printer speaker course teacher",
    "verb": "visited ordered bought tried used found watched read booked saw rented cooked shared took checked opened "
            "returned picked paid carried cleaned fixed tested borrowed sold painted packed delivered chose washed "
            "heard played reviewed wanted needed mentioned noticed moved called ate",
}
W = {kind: words.split() for kind, words in SYNTH_WORDS.items()}
ANCHORS = ("hotel", "pizza", "taxi", "radio", "menu", "cafe", "wifi", "bus")
PARTICLES = ("wa", "o", "de")
SUFFIXES = ("-na", "-ri", "-ko", "-tu")
SYNTH_SIZES = {"train": 2000, "validation": 500, "test": 1000}


def _make_lexicon() -> dict[str, str]:
    rng = random.Random("flare-synth-lexicon")  # the language is fixed; seeds only pick the items
    english = sorted({w for words in W.values() for w in words} | {"not"})
    content = set(W["noun"] + W["verb"] + W["good"] + W["bad"] + W["plain"])
    taken, lexicon = set(english), {".": "."}
    for w in english:
        if w in ANCHORS:
            lexicon[w] = w
            continue
        word = w
        while word in taken:
            word = "".join(rng.choice("ptkmnslrbdg") + rng.choice("aeiou") for _ in range(rng.choice((2, 3))))
        taken.add(word)
        lexicon[w] = f"{word} {rng.choice(SUFFIXES)}" if w in content and rng.random() < 0.35 else word
    return lexicon


LEXICON = _make_lexicon()


def _review(rng: random.Random) -> tuple[list[dict], list[str]]:
    n = rng.randint(1, 3)
    polar_at = rng.randrange(n)
    clauses = []
    for i in range(n):
        if i == polar_at or rng.random() < 0.5:
            adjectives = W["good"] + W["bad"] if i == polar_at else W["plain"]
            clauses.append({"det": rng.choice(W["det"]), "noun": rng.choice(W["noun"]), "cop": rng.choice(W["cop"]),
                            "neg": rng.random() < 0.3, "adv": rng.choice(W["adv"]) if rng.random() < 0.4 else "",
                            "adj": rng.choice(adjectives)})
        else:
            clauses.append({"pron": rng.choice(W["pron"]), "verb": rng.choice(W["verb"]), "det": rng.choice(W["det"]),
                            "noun": rng.choice(W["noun"]), "time": rng.choice(W["time"]) if rng.random() < 0.3 else ""})
    return clauses, [rng.choice(W["conj"]) for _ in range(n - 1)]


def _render(clauses: list[dict], conjs: list[str], lang: str) -> str:
    words = []
    for i, c in enumerate(clauses):
        if i:
            words.append(conjs[i - 1])
        neg = "not" if c.get("neg") else ""
        if "adj" in c and lang == "en":
            words += [c["det"], c["noun"], c["cop"], neg, c["adv"], c["adj"]]
        elif "adj" in c:
            words += [c["noun"], c["det"], "wa", c["adv"], c["adj"], neg, c["cop"]]
        elif lang == "en":
            words += [c["pron"], c["verb"], c["det"], c["noun"], c["time"]]
        else:
            words += [c["pron"], "wa", c["noun"], c["det"], "o", c["time"], c["verb"]]
    words = [w for w in words if w] + ([] if lang == "en" else ["de"]) + ["."]
    return " ".join(words if lang == "en" else [LEXICON.get(w, w) for w in words])


def _mistranslate(clauses: list[dict], rng: random.Random, noise: float) -> list[dict]:
    out = []
    for c in clauses:
        if "adj" in c and rng.random() < noise:
            c = {**c, "neg": False} if c["neg"] and rng.random() < 0.5 else \
                {**c, "adj": rng.choice(W["good"] + W["bad"] + W["plain"])}
        out.append(c)
    return out


def _synth_split(english: str) -> str:
    bucket = zlib.crc32(english.encode()) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def synth_pairs(lang: str, split: str, *, n: int | None = None, seed: int = 100, noise: float = 0.05) -> list[Pair]:
    """The first n items (default SYNTH_SIZES[split]) of a synthetic split for a seed; lang "syn" or "en"."""
    check_task("synth", lang, split)
    rng, pairs = random.Random(f"flare-synth/{seed}"), []
    while len(pairs) < (n or SYNTH_SIZES[split]):
        clauses, conjs = _review(rng)
        translated = _mistranslate(clauses, rng, noise)  # drawn for "en" too, so both languages see the same items
        english = _render(clauses, conjs, "en")
        if _synth_split(english) != split:
            continue
        answer = _sentiment(clauses)
        if lang == "en":
            target, source = english, english
        elif split == "train":
            target, source = _render(translated, conjs, "syn"), english
        else:
            target, source = _render(clauses, conjs, "syn"), _render(translated, conjs, "en")
        pairs.append(Pair(f"synth-{split}-{len(pairs)}", {"text": target}, {"text": source}, answer))
    return pairs


def _sentiment(clauses: list[dict]) -> str:
    polar = next(c for c in clauses if c.get("adj") in W["good"] + W["bad"])
    return "positive" if (polar["adj"] in W["good"]) != polar["neg"] else "negative"


def synth_corpus(n: int = 20000, *, target_share: float = 0.05, labelled_share: float = 0.5,
                 seed: int = 100) -> list[str]:
    """Pretraining text: n reviews from the train bucket only, a `target_share` of them in syn, the rest English;
    a `labelled_share` of the English ones carry their label in the task's format ("...\nSentiment: positive"), as
    web text does for a real model: without it the label words are never seen, and their output embeddings stay at
    their random initialisation, which a LoRA adapter over a frozen lm_head cannot use."""
    rng, lines = random.Random(f"flare-synth-corpus/{seed}"), []
    while len(lines) < n:
        clauses, conjs = _review(rng)
        if _synth_split(_render(clauses, conjs, "en")) != "train":
            continue
        if rng.random() < target_share:
            lines.append(_render(clauses, conjs, "syn"))
        elif rng.random() < labelled_share:
            lines.append(TASKS["synth"].render({"text": _render(clauses, conjs, "en")}) + _sentiment(clauses))
        else:
            lines.append(_render(clauses, conjs, "en"))
    return lines


# ----------------------------------------------------------------------------------------------------------------
# The tiny model: its tokenizer, and its pretraining from scratch

def synth_vocab() -> list[str]:
    """Special tokens, then the English words (with the cue and label words), then the syn-only tokens."""
    english = sorted({w for words in W.values() for w in words} | {"not", "."}) + ["Sentiment:", "negative", "positive"]
    syn = sorted(({t for w in LEXICON.values() for t in w.split()} | set(PARTICLES)) - set(english))
    return ["<pad>", "<bos>", "<eos>", "<unk>"] + english + syn


def write_synth_tokenizer(folder: str) -> None:
    """Save a word-level tokenizer.json and tokenizer_config.json, so the synthetic model loads like a Hub model."""
    vocab = {w: i for i, w in enumerate(synth_vocab())}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tokenizer.add_special_tokens(["<pad>", "<bos>", "<eos>", "<unk>"])
    os.makedirs(folder, exist_ok=True)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}, f)


def pretrain_tiny(folder: str, seed: int, device: torch.device, autocast=contextlib.nullcontext()) -> None:
    """A 4-layer Llama-architecture model, pretrained from scratch on synth_corpus (mostly English, a little
    target language) and saved in folder like a Hub checkpoint (config.json, model.safetensors, tokenizer.json), so
    it loads through load_model like a real one; a folder that holds one already is left as it is. autocast: the
    context each forward runs in (train.autocast: bf16 on CUDA), by default none (fp32)."""
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return
    os.makedirs(folder, exist_ok=True)
    write_synth_tokenizer(folder)
    tok = load_tokenizer(folder)
    hf_config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": tok.tok.get_vocab_size(),
                 "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
                 "max_position_embeddings": 256, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                 "torch_dtype": "float32"}
    torch.manual_seed(seed)
    model = Transformer(Config.from_hf(hf_config)).to(device)
    for name, p in model.named_parameters():
        if "norm" not in name:
            torch.nn.init.normal_(p, std=0.02)
    corpus = synth_corpus(seed=seed)
    ids = [tok.encode(s) + [tok.eos_id] for s in corpus]
    # Weight decay matters here: without it the tiny model grows outsized activations that leave it near chance
    # on the English task and slow every LoRA on top (measured: English accuracy 46% without, 89% with).
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    steps, batch = PRETRAIN_STEPS, 64
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        rows = [ids[i] for i in torch.randint(len(ids), (batch,), generator=gen).tolist()]
        width = max(map(len, rows))
        x = torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        labels = x.masked_fill(mask == 0, -100)
        for g in opt.param_groups:
            g["lr"] = 3e-3 * min(1.0, (step + 1) / 50) * (1 - step / steps)
        with autocast:
            # The plain language-model loss: every position predicts the next token (padding ignored), so all the
            # logits are read, unlike train.lm_loss, which takes them only at the labelled answer positions.
            logits = model(x, mask)[:, :-1]
            loss = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0 or step + 1 == steps:
            print(f"pretrain tiny {step + 1}/{steps} loss {loss.item():.4f}", file=sys.stderr, flush=True)
    # The weights last, atomically: a model.safetensors in folder means a complete model (the check on top).
    write_json(hf_config, os.path.join(folder, "config.json"))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "inv_freq"}
    atomic_write(os.path.join(folder, "model.safetensors"), lambda tmp: save_file(state, tmp))
