"""Tasks, prompts, English-target pairs, token batches and metrics (the paper's tasks: arXiv 2501.06892, section 4).

A task turns (language, split) into Pairs: an item in the target language, the same item in English, and its gold
answer. XNLI and NusaX are parallel by construction; TyDiQA is not and takes its English side from a translations
file; "synth" is the CPU demo's artificial language pair, generated in synth.py with no download.

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
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import LocalEntryNotFoundError

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
    # The CPU demo's task (README, "The CPU demo"): a task like the others here, its pairs generated in synth.py.
    "synth": Task("synth", ("syn",), ("negative", "positive"), "{text}\nSentiment: ", "text", 128, "accuracy"),
}
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Pair:
    id: str
    target: dict   # the target-language fields of the item, e.g. {"premise": ..., "hypothesis": ...}
    source: dict   # the English fields of the same item (TyDiQA adds "answer", the span in the English context)
    answer: str    # gold answer: a label word or the answer text (no EOS)
    more_answers: tuple = ()  # TyDiQA's test items: the other annotators' answers, for the SQuAD-style scores


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
                          "answer": r["answers"]["text"][0], "answer_start": r["answers"]["answer_start"][0],
                          "more_answers": tuple(r["answers"]["text"][1:])})
    return items


READERS = {"xnli": _xnli, "nusax": _nusax, "tydiqa": _tydiqa}


def check_task(task: str, lang: str, split: str) -> Task:
    """The task's Task, once task, language and split are known to exist (an error lists the valid ones)."""
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
    source). limit with seed takes a random subset. TyDiQA needs `translations` and drops the items whose answer
    was lost in translation (so it may return fewer than limit). data_dir: a local copy of the dataset repos (see
    _download), else the Hub cache (cache_dir or the default). "synth" has no files: synth.synth_pairs makes it."""
    spec = check_task(task, lang, split)
    if translations is not None and task != "tydiqa":
        raise UsageError(f"{task} is parallel by construction; translations is for tydiqa only: leave it out.")
    if task not in READERS:
        raise UsageError(f"{task} is generated, not read from files: take its pairs from "
                         f"synth.synth_pairs({lang!r}, {split!r}, n=..., seed=...).")
    items = _items(task, lang, split, limit, seed, cache_dir, data_dir)
    fields = lambda item: {k: item[k] for k in spec.fields}
    if lang == "en":
        return [Pair(it["id"], fields(it), fields(it), it["answer"], it.get("more_answers", ())) for it in items]
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
    pairs = [Pair(it["id"], {"context": it["context"], "question": it["question"]}, records[it["id"]], it["answer"],
                  it["more_answers"]) for it in items if _answer_kept(records[it["id"]])]
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
    check_task("tydiqa", lang, split)
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
# Token batches

@dataclass
class Batch:
    input_ids: torch.Tensor             # (B, T) prompt left-padded to P, then answer + EOS right-padded with pad_id
    attention_mask: torch.Tensor        # (B, T) 1 on real tokens
    labels: torch.Tensor                # (B, T) -100 except on answer + EOS; aligned with input_ids, not shifted
    source_ids: torch.Tensor | None     # (B, P) English prompt left-padded to the same P
    source_mask: torch.Tensor | None    # (B, P)
    prompt_len: int                     # P

    def map(self, fn):
        """The batch with fn applied to each of its tensors: .to(device), a slice of rows."""
        return replace(self, **{k: fn(v) for k, v in vars(self).items() if isinstance(v, torch.Tensor)})


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


def metrics(task: Task, pred: list[str], gold: list[str], more_gold: list[tuple] | None = None) -> dict[str, float]:
    """Every metric of the task; task.metric names the headline one. QA is scored against the first gold answer,
    as the paper's code scores it, and also as SQuAD's script scores it, by the best over all gold answers
    (more_gold: each item's further answers; TyDiQA's test items have up to three)."""
    if task.labels is not None:
        return {"accuracy": accuracy(pred, gold), "macro_f1": macro_f1(pred, gold, task.labels)}
    _same_length(pred, gold)
    first, every = [(g,) for g in gold], [(g, *more) for g, more in zip(gold, more_gold or [()] * len(gold))]
    best = lambda score, golds: sum(max(score(p, g) for g in gs) for p, gs in zip(pred, golds)) / len(gold)
    return {"exact_match": best(exact_match, first), "token_f1": best(token_f1, first),
            "exact_match_squad": best(exact_match, every), "token_f1_squad": best(token_f1, every)}
