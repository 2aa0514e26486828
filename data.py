"""Tasks, prompts, English-target pairs, token batches and metrics (the paper's tasks: arXiv 2501.06892, section 4).

A task turns (language, split) into Pairs: an item in the target language, the same item in English, and its gold
answer. XNLI and NusaX are parallel by construction; TyDiQA is not and takes its English side from a translations
file; "synth" is an artificial language pair built here, with no download.

Files come from the dataset repos below at a pinned revision (`_download`, the one function the tests replace): from a
local copy with data_dir (DIR/<owner>/<repo>/<file>, as `hf download <repo> --repo-type dataset --revision <revision>
--local-dir DIR/<repo>` leaves it), else through huggingface_hub into the usual Hub cache (offline with
HF_HUB_OFFLINE=1 once the cache holds them). Small readers below parse each dataset's own file format:
  facebook/xnli                    {lang}/{split}-00000-of-00001.parquet   premise, hypothesis, label (0 entailment,
                                   1 neutral, 2 contradiction); row i of a language folder is row i of "en".
  indonlp/NusaX-senti              {lang}/nusa_x-senti-{split}.parquet     id, text, lang, label (0 negative, 1 neutral,
                                   2 positive); parallel by id with the English folder "eng". These are the Hub's
                                   parquet conversion (refs/convert/parquet): the main branch holds a loading script.
  google-research-datasets/tydiqa  secondary_task/{train,validation}-00000-of-00001.parquet   id ("swahili-..."),
                                   title, context, question, answers {text: [...], answer_start: [...]}.
TyDiQA-GoldP has no test split: "test" is the validation file, and "validation" is the tenth of the train file whose
ids hash (crc32) to 0 mod 10, left out of "train".

TyDiQA translations file (JSONL, one object per line, keyed by item id, any splits mixed):
  {"id": "swahili-123-0", "question": "<English question>", "context": "<English context>", "answer": "<English span>"}
"answer" is the answer span as it reads in the English context, or "" where the translation lost it. translate_tydiqa
writes this file with the loaded model; load_pairs drops (and counts) the items whose answer is "" or not in context.
"""

import json
import os
import random
import re
import string
import sys
import unicodedata
import zlib
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import LocalEntryNotFoundError
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from model import MissingFile, UsageError


@dataclass(frozen=True)
class Task:
    name: str
    languages: tuple[str, ...]       # target languages; "en" (the English data itself) is accepted as well
    labels: tuple[str, ...] | None   # label words of a classification task, None for QA
    prompt: str                      # filled with the item's fields; the answer and EOS follow it in training
    long_field: str                  # the one field cut when a prompt is too long (never the question or the cue)
    max_length: int                  # prompt tokens, BOS included; the answer comes on top
    metric: str                      # headline metric: "accuracy" | "macro_f1" | "exact_match"

    @property
    def fields(self) -> list[str]:
        return [name for _, name, _, _ in string.Formatter().parse(self.prompt) if name]

    def render(self, fields: dict) -> str:
        return self.prompt.format(**fields)


TASKS = {
    "xnli": Task("xnli", tuple("ar bg de el es fr hi ru sw th tr ur vi zh".split()),
                 ("entailment", "neutral", "contradiction"),
                 "Premise: {premise}\nHypothesis: {hypothesis}\nLabel: ", "premise", 128, "accuracy"),
    "nusax": Task("nusax", tuple("ace ban bbc bjn bug ind jav mad min nij sun".split()),
                  ("negative", "neutral", "positive"), "{text}\nSentiment: ", "text", 128, "macro_f1"),
    "tydiqa": Task("tydiqa", tuple("ar bn fi id ko ru sw te".split()), None,
                   "Context: {context}\nQuestion: {question}\nAnswer: ", "context", 512, "exact_match"),
    "synth": Task("synth", ("syn",), ("negative", "positive"), "{text}\nSentiment: ", "text", 128, "accuracy"),
}
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Pair:
    id: str
    target: dict   # the target-language fields of the item, e.g. {"premise": ..., "hypothesis": ...}
    source: dict   # the English fields of the same item (TyDiQA adds "answer", the span in the English context)
    answer: str    # gold answer: a label word or the answer text (no EOS)


# ----------------------------------------------------------------------------------------------------------------
# Files from the Hub

HUB = {  # task: (dataset repo, pinned revision)
    "xnli": ("facebook/xnli", "b8dd5d7af51114dbda02c0e3f6133f332186418e"),  # "Convert dataset to Parquet (#10)"
    "nusax": ("indonlp/NusaX-senti", "bfe4c9714f3d45020c9bf31719fce014c48b2c87"),  # a refs/convert/parquet commit
    "tydiqa": ("google-research-datasets/tydiqa", "da78f23f9119363459acbaf46bf89426ff26c259"),  # Parquet (#3)
}
TYDIQA_LANGUAGES = {"ar": "arabic", "bn": "bengali", "fi": "finnish", "id": "indonesian", "ko": "korean",
                    "ru": "russian", "sw": "swahili", "te": "telugu", "en": "english"}


def _download(task: str, filename: str, cache_dir: str | None, data_dir: str | None) -> str:
    """The local path of one file of the task's dataset repo at its pinned revision: in data_dir's copy of the repo,
    or else in the Hub cache (downloaded into it when the Hub can be reached)."""
    repo, revision = HUB[task]
    fetch = f"hf download {repo} {filename} --repo-type dataset --revision {revision}"
    if data_dir is not None:
        path = os.path.join(data_dir, repo, filename)
        if not os.path.isfile(path):
            raise MissingFile(f"{path} is missing from the local copy of {repo} in {data_dir}; fetch it with "
                              f"`{fetch} --local-dir {os.path.join(data_dir, repo)}`.")
        return path
    try:
        return hf_hub_download(repo, filename, repo_type="dataset", revision=revision, cache_dir=cache_dir)
    except LocalEntryNotFoundError as e:  # offline (HF_HUB_OFFLINE=1, or no network) and not in the cache
        raise MissingFile(f"{repo}/{filename} at revision {revision} is not in the Hub cache "
                          f"({cache_dir or constants.HF_HUB_CACHE}) and the Hub cannot be reached; fetch it "
                          f"with `{fetch}` where the Hub can be reached, or point --data-dir to a local copy "
                          f"of the dataset repos.") from e


def _read_parquet(path: str, columns: tuple[str, ...]) -> list[dict]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise UsageError(f"{path} is not a readable parquet file ({e}): the download was cut short or the file is "
                         f"damaged; delete it from the cache and run again to download it again.") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise UsageError(f"{path} has no column {missing} (it has {table.column_names}); the file is not the "
                         f"expected dataset version: delete it (from the Hub cache or the --data-dir copy) and fetch "
                         f"it again.")
    return table.select(list(columns)).to_pylist()


def _xnli(lang: str, split: str, cache_dir: str | None, data_dir: str | None) -> list[dict]:
    path = _download("xnli", f"{lang}/{split}-00000-of-00001.parquet", cache_dir, data_dir)
    rows = _read_parquet(path, ("premise", "hypothesis", "label"))
    labels = TASKS["xnli"].labels
    for i, r in enumerate(rows):
        if r["label"] not in range(len(labels)):
            raise UsageError(f"{path}: row {i} has label {r['label']}, expected 0, 1 or 2 ({', '.join(labels)}).")
    return [{"id": f"{split}-{i}", "premise": r["premise"], "hypothesis": r["hypothesis"], "answer": labels[r["label"]]}
            for i, r in enumerate(rows)]


def _nusax(lang: str, split: str, cache_dir: str | None, data_dir: str | None) -> list[dict]:
    path = _download("nusax", f"{'eng' if lang == 'en' else lang}/nusa_x-senti-{split}.parquet", cache_dir, data_dir)
    labels = TASKS["nusax"].labels
    rows = _read_parquet(path, ("id", "text", "label"))
    for r in rows:
        if r["label"] not in range(len(labels)):
            raise UsageError(f"{path}: item {r['id']} has label {r['label']}, expected 0, 1 or 2 "
                             f"({', '.join(labels)}).")
    return [{"id": str(r["id"]), "text": r["text"], "answer": labels[r["label"]]} for r in rows]


def _tydiqa(lang: str, split: str, cache_dir: str | None, data_dir: str | None) -> list[dict]:
    filename = f"secondary_task/{'validation' if split == 'test' else 'train'}-00000-of-00001.parquet"
    rows = _read_parquet(_download("tydiqa", filename, cache_dir, data_dir), ("id", "context", "question", "answers"))
    items = []
    for r in rows:
        held_out = zlib.crc32(r["id"].encode()) % 10 == 0
        in_split = split == "test" or held_out == (split == "validation")
        if r["id"].startswith(TYDIQA_LANGUAGES[lang] + "-") and in_split:
            items.append({"id": r["id"], "context": r["context"], "question": r["question"],
                          "answer": r["answers"]["text"][0], "answer_start": r["answers"]["answer_start"][0]})
    return items


READERS = {"xnli": _xnli, "nusax": _nusax, "tydiqa": _tydiqa}


def _check(task: str, lang: str, split: str) -> Task:
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}: use one of {', '.join(TASKS)}.")
    languages = ("en",) + TASKS[task].languages
    if lang not in languages:
        raise UsageError(f"{task} has no language {lang!r}: use one of {', '.join(languages)}.")
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}.")
    return TASKS[task]


def _items(task: str, lang: str, split: str, limit: int | None, seed: int, cache_dir: str | None,
           data_dir: str | None) -> list[dict]:
    """The split's target-language items; with a limit, a random subset of that size (in file order) for the seed."""
    items = READERS[task](lang, split, cache_dir, data_dir)
    if not items:
        raise UsageError(f"{task} {lang} {split} is empty: its file holds no items for it; check the language code "
                         f"and that the file is the one of the revision in data.HUB (a copy of TyDiQA's train file "
                         f"may hold only some languages).")
    if limit is None or limit >= len(items):
        return items
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), limit))]


def load_pairs(task: str, lang: str, split: str, *, limit: int | None = None, seed: int = 100,
               translations: str | None = None, cache_dir: str | None = None,
               data_dir: str | None = None) -> list[Pair]:
    """Items of (task, lang, split), each with its English counterpart; lang "en" gives English pairs (target ==
    source). limit with seed takes a random subset; for "synth" they pick the generated items. TyDiQA needs
    `translations` and drops the items whose answer was lost in translation (so it may return fewer than limit).
    data_dir: a local copy of the dataset repos (see _download), else the Hub cache (cache_dir or the default)."""
    spec = _check(task, lang, split)
    if translations is not None and task != "tydiqa":
        raise UsageError(f"{task} is parallel by construction; translations is for tydiqa only: leave it out.")
    if task == "synth":
        return synth_pairs(lang, split, n=limit, seed=seed)
    items = _items(task, lang, split, limit, seed, cache_dir, data_dir)
    fields = lambda item: {k: item[k] for k in spec.fields}
    if lang == "en":
        return [Pair(it["id"], fields(it), fields(it), it["answer"]) for it in items]
    if task == "tydiqa":
        if translations is None:
            raise UsageError(f"tydiqa is not parallel: pass translations=<file.jsonl> with the English side of "
                             f"{lang} {split} (translate_tydiqa writes it).")
        return _translated_pairs(items, translations, f"tydiqa {lang} {split}")
    english = {it["id"]: it for it in READERS[task]("en", split, cache_dir, data_dir)}
    unmatched = [it["id"] for it in items if it["id"] not in english]
    if unmatched:
        raise UsageError(f"{task} {lang} {split}: {len(unmatched)} items have no English counterpart "
                         f"(e.g. {unmatched[:3]}); the {lang} and English files are not parallel.")
    return [Pair(it["id"], fields(it), fields(english[it["id"]]), it["answer"]) for it in items]


# ----------------------------------------------------------------------------------------------------------------
# TyDiQA translations: read the JSONL file, or write it with the model itself

def _read_translations(path: str) -> dict[str, dict]:
    if not os.path.exists(path):
        return {}
    records = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip() or not line.endswith("\n"):  # the last, unfinished line of a crash: translated again
                continue
            try:
                record = json.loads(line)
                records[record["id"]] = {k: str(record[k]) for k in ("question", "context", "answer")}
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UsageError(f"{path}:{number}: malformed line ({e!r}); each line must be a JSON object with "
                                 f"id, question, context and answer. Fix or delete the line.") from None
    return records


def _drop_unfinished_line(path: str) -> None:
    """A crash while appending leaves a line without its newline at the end of the file: cut it off (its items are
    translated again), so that the file reads and the next record starts on a line of its own."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        text = f.read()
        if text and not text.endswith(b"\n"):
            f.truncate(text.rfind(b"\n") + 1)


def _answer_kept(english: dict) -> bool:
    return bool(english["answer"]) and english["answer"] in english["context"]


def _translated_pairs(items: list[dict], path: str, name: str) -> list[Pair]:
    records = _read_translations(path)
    missing = [it["id"] for it in items if it["id"] not in records]
    if missing:
        raise UsageError(f"{path} misses translations for {len(missing)} of {len(items)} {name} items (e.g. "
                         f"{missing[:3]}): run translate_tydiqa for them first.")
    pairs = [Pair(it["id"], {"context": it["context"], "question": it["question"]}, records[it["id"]], it["answer"])
             for it in items if _answer_kept(records[it["id"]])]
    if len(pairs) < len(items):
        print(f"{name}: dropped {len(items) - len(pairs)} of {len(items)} items whose answer was lost in translation",
              file=sys.stderr)
    return pairs


TRANSLATE_PROMPT = """Translate the text into English. Keep the part in "quotes" in quotes.

Indonesian: Ibu kota Indonesia adalah "Jakarta", kota terbesar di negara itu.
English: The capital of Indonesia is "Jakarta", the largest city in the country.

Swahili: Mlima Kilimanjaro una urefu wa mita "5,895" juu ya usawa wa bahari.
English: Mount Kilimanjaro is "5,895" metres above sea level.

{language}: {text}
English:"""
QUOTED = re.compile(r'["“”«»„]([^"“”«»„]+)["“”«»„]')


def translate_tydiqa(lang: str, split: str, generate, path: str, *, limit: int | None = None, seed: int = 100,
                     cache_dir: str | None = None, data_dir: str | None = None, batch_size: int = 16,
                     max_new_tokens: int = 512, write: bool = True) -> int:
    """Translate the items load_pairs("tydiqa", lang, split, limit=limit, seed=seed) uses into English with
    generate(prompts: list[str], max_new_tokens: int) -> list[str] (greedy, few-shot), appending to the JSONL file
    at path; items already there are skipped. As in the paper, the answer span is put in quotes before translating
    the context and read back from the quotes after. Returns how many of the items lost their answer.
    write=False only reads path and translates what it lacks: the other processes of a torchrun job, which each
    translate a share of every batch (generate gathers them) while rank 0 writes."""
    _check("tydiqa", lang, split)
    items = _items("tydiqa", lang, split, limit, seed, cache_dir, data_dir)
    if write:
        _drop_unfinished_line(path)
    done = _read_translations(path)
    todo = [it for it in items if it["id"] not in done]
    language = TYDIQA_LANGUAGES[lang].capitalize()
    translate = lambda texts, n: [out.strip().split("\n")[0].strip() for out in generate(
        [TRANSLATE_PROMPT.format(language=language, text=" ".join(t.split())) for t in texts], n)]
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        marked = []
        for it in batch:
            s, answer = it["answer_start"], it["answer"]
            if it["context"][s:s + len(answer)] != answer:  # trust the text over a stale offset
                s = it["context"].find(answer)
            marked.append(it["context"][:s] + f'"{answer}"' + it["context"][s + len(answer):] if s >= 0 else "")
        contexts = translate(marked, max_new_tokens)
        questions = translate([it["question"] for it in batch], 64)
        records = []
        for it, context, question, was_marked in zip(batch, contexts, questions, marked):
            quoted = QUOTED.search(context) if was_marked else None
            answer = quoted.group(1).strip() if quoted else ""
            if quoted:  # drop the two marks, keep the span
                context = context[:quoted.start()] + quoted.group(1) + context[quoted.end():]
            records.append({"id": it["id"], "question": question, "context": context, "answer": answer})
        done |= {r["id"]: r for r in records}
        if write:
            with open(path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return sum(not _answer_kept(done[it["id"]]) for it in items)


# ----------------------------------------------------------------------------------------------------------------
# The synthetic task
#
# "English" is a small grammar over the words below. A review has one to three clauses joined by and/but/then and
# ends in ".". Exactly one clause is polar: "DET NOUN COP [not] [ADV] ADJ" with a good or bad adjective; the others
# are neutral: the same shape with a plain adjective, or "PRON VERB DET NOUN [TIME]". The label is "positive" when
# the polar adjective is good, flipped by "not". The target language "syn" is derived from it:
#   - a bijective word substitution into made-up words (consonant-vowel syllables, fixed, not seeded), disjoint from
#     the English words except eight loanwords (ANCHORS) and "." that both languages share;
#   - about a third of the nouns, verbs and adjectives are two tokens, a stem and a suffix (-na -ri -ko -tu);
#   - other word orders: the determiner follows the noun, the copula clause is "NOUN DET wa [ADV] ADJ [not] COP"
#     (negation after the adjective, verb-final), the event clause "PRON wa NOUN DET o [TIME] VERB", and every review
#     ends in "de .": particles wa (topic), o (object) and de (final) have no English counterpart.
# So a syn review is longer than its English original and only roughly position-aligned with it.
# Translation is imperfect, as real MT is: with probability `noise` per copula clause the translation drops a "not"
# or swaps the adjective for a random one. The translated side is the target in train (like XNLI's machine-translated
# train, labelled by the English original) and the English source in validation and test (the "MT" of target text).
# Items are split by a hash of their English text (0 mod 10 test, 1 validation, else train), so splits never share a
# review and the first n items of a split for a seed do not depend on the other splits' sizes.

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
    _check("synth", lang, split)
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


# ----------------------------------------------------------------------------------------------------------------
# Token batches

@dataclass
class Batch:
    input_ids: torch.Tensor             # (B, T) prompt left-padded to P, then answer + EOS right-padded with pad_id
    attention_mask: torch.Tensor        # (B, T) 1 on real tokens
    labels: torch.Tensor                # (B, T) -100 except on answer + EOS; aligned with input_ids, not shifted
    source_ids: torch.Tensor | None     # (B, P) English prompt left-padded to the same P
    source_mask: torch.Tensor | None    # (B, P)
    prompt_len: int                     # P


def prompt_ids(task: Task, fields: dict, tokenizer, bos: bool = True) -> list[int]:
    """The prompt's tokens, its long field cut (at the end) until they fit in task.max_length."""
    ids = tokenizer.encode(task.render(fields), bos=bos)
    while len(ids) > task.max_length:
        long = tokenizer.encode(fields[task.long_field], bos=False)
        keep = len(long) - (len(ids) - task.max_length)
        if keep <= 0:
            raise UsageError(f"a {task.name} prompt is {len(ids)} tokens with its {task.long_field} cut to nothing, "
                             f"more than max_length={task.max_length}; shorten the other fields.")
        fields = {**fields, task.long_field: tokenizer.decode(long[:keep])}
        ids = tokenizer.encode(task.render(fields), bos=bos)
    return ids


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The tokens that follow a prompt: the answer, then EOS."""
    return tokenizer.encode(answer, bos=False) + [tokenizer.eos_id]


def make_batch(pairs: list[Pair], tokenizer, task: Task, *, answers: list[str] | bool | None = None,
               source: bool = True, input_fusion: bool = False, english_only: bool = False) -> Batch:
    """Tokens for a list of pairs. answers: None appends each gold answer, a list appends those strings (to score
    candidate labels), False appends nothing (generation). The target prompt is the target fields, or with
    english_only the English fields (stage 1, translate-test), or with input_fusion the English prompt followed by
    the target prompt in one sequence; source (the English prompt, aligned to the same P) is built only in the
    first case."""
    if input_fusion and english_only:
        raise ValueError("input_fusion and english_only are two different baselines: pick one.")
    if input_fusion:
        prompts = [prompt_ids(task, p.source, tokenizer) + prompt_ids(task, p.target, tokenizer, bos=False)
                   for p in pairs]
    else:
        prompts = [prompt_ids(task, p.source if english_only else p.target, tokenizer) for p in pairs]
    sources = [prompt_ids(task, p.source, tokenizer) for p in pairs] \
        if source and not (input_fusion or english_only) else None
    if answers is None:
        answers = [p.answer for p in pairs]
    if answers is not False and len(answers) != len(pairs):
        raise ValueError(f"{len(answers)} answers for {len(pairs)} pairs; pass one per pair, or answers=False for "
                         f"prompts only.")
    answer_tokens = [[] for _ in pairs] if answers is False else [answer_ids(tokenizer, a) for a in answers]
    P = max(len(ids) for ids in prompts + (sources or []))
    T = P + max(len(ids) for ids in answer_tokens)
    input_ids = torch.full((len(pairs), T), tokenizer.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), T), dtype=torch.long)
    labels = torch.full((len(pairs), T), -100, dtype=torch.long)
    for i, (prompt, answer) in enumerate(zip(prompts, answer_tokens)):
        input_ids[i, P - len(prompt):P + len(answer)] = torch.tensor(prompt + answer, dtype=torch.long)
        attention_mask[i, P - len(prompt):P + len(answer)] = 1
        labels[i, P:P + len(answer)] = torch.tensor(answer, dtype=torch.long)
    source_ids = source_mask = None
    if sources is not None:
        source_ids = torch.full((len(pairs), P), tokenizer.pad_id, dtype=torch.long)
        source_mask = torch.zeros((len(pairs), P), dtype=torch.long)
        for i, ids in enumerate(sources):
            source_ids[i, P - len(ids):] = torch.tensor(ids, dtype=torch.long)
            source_mask[i, P - len(ids):] = 1
    return Batch(input_ids, attention_mask, labels, source_ids, source_mask, P)


# ----------------------------------------------------------------------------------------------------------------
# Scoring and metrics (fractions in [0, 1])

def answer_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-likelihood of each row's labelled tokens: logits (B, T, V) of input_ids, labels (B, T) -> (B,)."""
    logp = logits[:, :-1].float().log_softmax(-1)  # position t predicts token t + 1
    targets = labels[:, 1:]
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (targets != -100)).sum(-1)


def pick_label(scores: dict[str, float]) -> str:
    """The label whose answer has the highest summed log-likelihood (ties: the first label)."""
    return max(scores, key=scores.get)


def _same_length(pred: list, gold: list) -> None:
    if len(pred) != len(gold) or not gold:
        raise ValueError(f"need as many predictions as gold answers, at least one: got {len(pred)} and {len(gold)}.")


def accuracy(pred: list[str], gold: list[str]) -> float:
    _same_length(pred, gold)
    return sum(p == g for p, g in zip(pred, gold)) / len(gold)


def macro_f1(pred: list[str], gold: list[str], labels) -> float:
    """Mean over the labels of F1 = 2 tp / (2 tp + fp + fn), 0 for a label never gold nor predicted (as sklearn)."""
    _same_length(pred, gold)
    f1s = []
    for label in labels:
        tp = sum(p == label and g == label for p, g in zip(pred, gold))
        wrong = sum((p == label) != (g == label) for p, g in zip(pred, gold))
        f1s.append(2 * tp / (2 * tp + wrong) if tp else 0.0)
    return sum(f1s) / len(f1s)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation (ASCII and Unicode), drop a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in string.punctuation and not unicodedata.category(ch).startswith("P"))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def exact_match(pred: str, gold: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(gold))


def token_f1(pred: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def metrics(task: Task, pred: list[str], gold: list[str]) -> dict[str, float]:
    """Every metric of the task; task.metric names the headline one."""
    if task.labels is not None:
        return {"accuracy": accuracy(pred, gold), "macro_f1": macro_f1(pred, gold, task.labels)}
    _same_length(pred, gold)
    return {"exact_match": sum(map(exact_match, pred, gold)) / len(gold),
            "token_f1": sum(map(token_f1, pred, gold)) / len(gold)}
