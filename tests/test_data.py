"""data.py: pairs from each dataset's real file format, prompts, batches, metrics and errors (the synthetic task:
test_synth.py).

Fixtures in tests/fixtures/ have the Hub's file layout and format (tests/fixtures/make_fixtures.py wrote them); only
data._download is replaced, so everything after the download runs as it does on real files.
"""
import json
import os
import re
import shutil

import pytest
import torch

import data

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TRANSLATIONS = os.path.join(FIXTURES, "tydiqa", "translations-sw.jsonl")


@pytest.fixture(autouse=True)
def hub_files(monkeypatch):
    """Serve every download from tests/fixtures/<task>/<path in the Hub repo>."""
    def download(task, filename, cache_dir, data_dir):
        path = os.path.join(FIXTURES, task, filename)
        if not os.path.exists(path):
            raise FileNotFoundError(path)
        return path
    monkeypatch.setattr(data, "_download", download)


class CharTokenizer:
    """One token per character (id = code point + 3), so prompt lengths can be counted by hand."""
    pad_id, bos_id, eos_id = 0, 1, 2

    def encode(self, text, bos=True):
        return [self.bos_id] * bos + [ord(c) + 3 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i > 2)


# ---- pairs from the dataset files ----

def test_xnli_target_rows_pair_with_english_rows_of_the_same_index():
    pairs = data.load_pairs("xnli", "sw", "test")
    assert len(pairs) == 6
    assert pairs[1] == data.Pair("test-1", {"premise": "Basi lilifika kwa kuchelewa kwa sababu ya mvua.",
                                            "hypothesis": "Basi lilifika kwa wakati."},
                                 {"premise": "The bus arrived late because of the rain.",
                                  "hypothesis": "The bus was on time."}, "contradiction")
    assert [p.answer for p in pairs] == ["entailment", "contradiction", "neutral"] * 2


def test_english_pairs_have_the_english_fields_on_both_sides():
    pairs = data.load_pairs("xnli", "en", "train")
    assert all(p.target == p.source for p in pairs)
    assert pairs[0].target["premise"] == "The man is playing a guitar on the street."


def test_nusax_pairs_align_by_id_not_by_row_order():
    pairs = data.load_pairs("nusax", "ind", "train")
    assert [p.id for p in pairs] == ["63", "58", "42", "37", "24", "11"]  # the ind file's order
    by_id = {p.id: p for p in pairs}
    assert by_id["42"].target == {"text": 'Pelayanannya lambat, saya menunggu satu jam untuk roti "segar".'}
    assert by_id["42"].source == {"text": 'Service was slow, I waited an hour for "fresh" bread.'}
    assert by_id["42"].answer == "negative"


def test_tydiqa_pairs_take_the_english_side_from_the_translations_file_and_drop_lost_answers(capsys):
    pairs = data.load_pairs("tydiqa", "sw", "train", translations=TRANSLATIONS)
    # seven Swahili items in the train file: one held out for validation, one lost its answer in translation
    assert [p.id for p in pairs] == ["swahili-10001729-0", "swahili-10011729-0", "swahili-10041729-0",
                                     "swahili-10051729-0", "swahili-10061729-0"]
    assert pairs[0].target == {"context": "Nairobi ni mji mkuu wa Kenya na mji mkubwa zaidi nchini humo.",
                               "question": "Mji mkuu wa Kenya ni upi?"}
    assert pairs[0].source["question"] == "What is the capital of Kenya?"
    assert pairs[0].source["answer"] == "Nairobi"
    assert pairs[0].answer == "Nairobi"  # the gold answer stays in the target language
    assert "dropped 1 of 6 items whose answer was lost in translation" in capsys.readouterr().err


def test_tydiqa_validation_is_a_held_out_tenth_of_train_and_test_is_the_validation_file():
    validation = data.load_pairs("tydiqa", "sw", "validation", translations=TRANSLATIONS)
    test = data.load_pairs("tydiqa", "sw", "test", translations=TRANSLATIONS)
    assert [p.id for p in validation] == ["swahili-10031729-0"]
    assert [p.id for p in test] == ["swahili-40001729-0", "swahili-40011729-0", "swahili-40021729-0"]
    assert test[1].answer == "pwani ya Kenya"  # the first gold answer


def test_tydiqa_english_needs_no_translations():
    pairs = data.load_pairs("tydiqa", "en", "train")
    assert [p.answer for p in pairs] == ["Paris", "The Amazon River", "8,849 metres"]
    assert all(p.target == p.source for p in pairs)


def test_limit_takes_the_same_random_subset_for_a_seed():
    a = data.load_pairs("xnli", "sw", "train", limit=3, seed=1)
    assert [p.id for p in a] == [p.id for p in data.load_pairs("xnli", "sw", "train", limit=3, seed=1)]
    assert len(a) == 3 and [p.id for p in a] == sorted(p.id for p in a)  # file order kept
    assert any([p.id for p in data.load_pairs("xnli", "sw", "train", limit=3, seed=s)] != [p.id for p in a]
               for s in range(2, 6))


# ---- prompts and batches ----

def test_prompts_are_the_strings_of_flare_md():
    assert data.TASKS["xnli"].render({"premise": "P", "hypothesis": "H"}) == "Premise: P\nHypothesis: H\nLabel: "
    assert data.TASKS["nusax"].render({"text": "T"}) == "T\nSentiment: "
    assert data.TASKS["tydiqa"].render({"context": "C", "question": "Q"}) == "Context: C\nQuestion: Q\nAnswer: "
    assert data.TASKS["synth"].render({"text": "T"}) == "T\nSentiment: "


def test_every_language_of_flare_md_is_accepted():
    assert len(data.TASKS["xnli"].languages) == 14 and len(data.TASKS["nusax"].languages) == 11
    assert data.TASKS["tydiqa"].languages == ("ar", "bn", "fi", "id", "ko", "ru", "sw", "te")
    assert [data.TASKS[t].max_length for t in ("xnli", "nusax", "tydiqa", "synth")] == [128, 128, 512, 128]


def pair(target_text, source_text, answer):
    return data.Pair("x", {"text": target_text}, {"text": source_text}, answer)


def test_batch_left_pads_both_prompts_to_one_length_and_labels_only_answer_and_eos():
    tok, task = CharTokenizer(), data.TASKS["nusax"]
    batch = data.make_batch([pair("abc", "a", "no"), pair("a", "abcdef", "yes")], tok, task)
    suffix = "\nSentiment: "
    P = 1 + len("abcdef" + suffix)  # the longest prompt of either side, BOS included
    assert batch.prompt_len == P and batch.input_ids.shape == (2, P + 4) and batch.source_ids.shape == (2, P)
    row = batch.input_ids[0].tolist()
    prompt = tok.encode("abc" + suffix)
    assert row[:P - len(prompt)] == [0] * (P - len(prompt))
    assert row[P - len(prompt):] == prompt + tok.encode("no", bos=False) + [tok.eos_id, tok.pad_id]
    assert batch.attention_mask[0].tolist() == [0] * (P - len(prompt)) + [1] * (len(prompt) + 3) + [0]
    assert batch.labels[0].tolist() == [-100] * P + tok.encode("no", bos=False) + [tok.eos_id, -100]
    assert batch.labels[1].tolist() == [-100] * P + tok.encode("yes", bos=False) + [tok.eos_id]
    assert batch.source_ids[1].tolist() == tok.encode("abcdef" + suffix)
    assert batch.source_mask[0].tolist() == [0] * (P - 1 - len("a" + suffix)) + [1] * (1 + len("a" + suffix))


def test_batch_without_answers_is_prompts_only_and_given_answers_replace_the_gold_ones():
    tok, task = CharTokenizer(), data.TASKS["nusax"]
    pairs = [pair("abc", "a", "no"), pair("a", "abcdef", "yes")]
    prompts = data.make_batch(pairs, tok, task, answers=False)
    assert prompts.input_ids.shape == (2, prompts.prompt_len) and (prompts.labels == -100).all()
    scored = data.make_batch(pairs, tok, task, answers=["ok", "ok"])
    assert scored.labels[1, scored.prompt_len:].tolist() == tok.encode("ok", bos=False) + [tok.eos_id]


def test_english_only_and_input_fusion_batches_have_no_source():
    tok, task = CharTokenizer(), data.TASKS["nusax"]
    p = pair("tgt", "src", "no")
    english = data.make_batch([p], tok, task, english_only=True)
    assert english.source_ids is None and english.input_ids[0, :english.prompt_len].tolist() == \
        tok.encode("src\nSentiment: ")
    fused = data.make_batch([p], tok, task, input_fusion=True)
    assert fused.source_ids is None
    assert fused.input_ids[0, :fused.prompt_len].tolist() == tok.encode("src\nSentiment: tgt\nSentiment: ")
    plain = data.make_batch([p], tok, task, source=False)
    assert plain.source_ids is None and plain.source_mask is None


def test_truncation_cuts_only_the_long_field():
    tok, task = CharTokenizer(), data.TASKS["tydiqa"]
    fields = {"context": "x" * 1000, "question": "What is kept whole?"}
    ids = data.prompt_ids(task, fields, tok)
    assert len(ids) == task.max_length
    kept = task.max_length - len(tok.encode(task.render({"context": "", "question": fields["question"]})))
    assert tok.decode(ids) == task.render({"context": "x" * kept, "question": "What is kept whole?"})


def test_answer_logprob_sums_the_log_likelihood_of_the_labelled_tokens():
    logits = torch.zeros(1, 3, 4)
    logits[0, 1, 2] = 2.0  # position 1 predicts token 2
    labels = torch.tensor([[-100, -100, 2]])
    expected = 2.0 - torch.log(torch.tensor(torch.e ** 2 + 3.0))
    assert torch.allclose(data.answer_logprob(logits, labels), expected.reshape(1))


def test_pick_label_takes_the_highest_log_likelihood():
    assert data.pick_label({"entailment": -3.2, "neutral": -1.5, "contradiction": -7.0}) == "neutral"


# ---- metrics ----

def test_accuracy_and_macro_f1_equal_hand_computed_values():
    gold = ["pos", "pos", "neg", "neu", "neg"]
    pred = ["pos", "neg", "neg", "neu", "pos"]
    assert data.accuracy(pred, gold) == 3 / 5
    # pos: tp 1, fp 1, fn 1 -> 1/2; neg: tp 1, fp 1, fn 1 -> 1/2; neu: tp 1 -> 1
    assert data.macro_f1(pred, gold, ("neg", "neu", "pos")) == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert data.macro_f1(["a", "a"], ["a", "a"], ("a", "b")) == 0.5  # a label never seen counts as 0


@pytest.mark.parametrize("text, normalized", [
    ("The Eiffel Tower", "eiffel tower"),
    ("an apple, a pear and the end.", "apple pear and end"),
    ("  many   spaces\there\n", "many spaces here"),
    ("Theory of an Ant", "theory of ant"),  # articles are whole words only
    ("«Dodoma»", "dodoma"),
    ("don't", "dont"),
    ("القاهرة، مصر؟", "القاهرة مصر"),
    ("東京。", "東京"),
    ("ঢাকা।", "ঢাকা"),
    ("Москва — столица", "москва столица"),
])
def test_normalize_answer_follows_squad(text, normalized):
    assert data.normalize_answer(text) == normalized


def test_exact_match_and_token_f1_equal_hand_computed_values():
    assert data.exact_match("The Nile.", "nile") == 1.0
    assert data.exact_match("Nile river", "nile") == 0.0
    # pred "coast kenya" vs gold "on coast of kenya": 2 common, precision 1, recall 1/2 -> f1 2/3
    assert data.token_f1("the coast, Kenya", "on the coast of Kenya") == pytest.approx(2 / 3)
    assert data.token_f1("Paris", "London") == 0.0
    assert data.token_f1("the", "a") == 1.0  # both empty after normalisation
    scores = data.metrics(data.TASKS["tydiqa"], ["The Nile.", "Paris"], ["nile", "London"])
    assert scores == {"exact_match": 0.5, "token_f1": 0.5, "exact_match_squad": 0.5, "token_f1_squad": 0.5}


def test_squad_scores_take_the_best_gold_answer_and_the_headline_scores_the_first():
    # item 1: the second gold matches exactly; item 2: "in the north" vs "north" (f1 2/3) beats "south" (0)
    scores = data.metrics(data.TASKS["tydiqa"], ["Pierre Curie", "in the north"], ["Marie Curie", "south"],
                          [("Pierre Curie", "Curie"), ("north",)])
    assert scores["exact_match"] == 0.0 and scores["exact_match_squad"] == 0.5
    assert scores["token_f1"] == pytest.approx((0.5 + 0.0) / 2)
    assert scores["token_f1_squad"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert data.metrics(data.TASKS["nusax"], ["positive"], ["positive"])["macro_f1"] == pytest.approx(1 / 3)


# ---- errors ----

def test_unknown_task_language_and_split_list_the_valid_ones():
    with pytest.raises(ValueError, match="unknown task 'xnlii': use one of xnli, nusax, tydiqa, synth"):
        data.load_pairs("xnlii", "sw", "test")
    with pytest.raises(ValueError, match="nusax has no language 'sw': use one of en, ace, ban"):
        data.load_pairs("nusax", "sw", "test")
    with pytest.raises(ValueError, match="unknown split 'dev': use one of train, validation, test"):
        data.load_pairs("xnli", "sw", "dev")


def test_tydiqa_without_translations_says_how_to_get_them():
    with pytest.raises(ValueError, match="pass translations=<file.jsonl>.*translate_tydiqa"):
        data.load_pairs("tydiqa", "sw", "test")


def test_translations_file_missing_items_says_how_many_and_which_file(tmp_path):
    path = tmp_path / "partial.jsonl"
    path.write_text("".join(open(TRANSLATIONS).readlines()[-2:]))  # only two of the three test items
    with pytest.raises(ValueError, match=f"{path} misses translations for 1 of 3 tydiqa sw test items"):
        data.load_pairs("tydiqa", "sw", "test", translations=str(path))


def test_malformed_translations_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(open(TRANSLATIONS).readline() + '{"id": "swahili-1", "question": \n')
    with pytest.raises(ValueError, match=f"{path}:2: malformed line"):
        data.load_pairs("tydiqa", "sw", "test", translations=str(path))


def test_nusax_label_outside_the_three_classes_names_file_and_item(tmp_path, monkeypatch):
    import pyarrow as pa, pyarrow.parquet as pq
    path = tmp_path / "nusa_x-senti-train.parquet"
    pq.write_table(pa.table({"id": ["7"], "text": ["t"], "lang": ["ind"], "label": [3]}), path)
    monkeypatch.setattr(data, "_download", lambda task, filename, cache_dir, data_dir: str(path))
    with pytest.raises(ValueError, match=f"{path}: item 7 has label 3, expected 0, 1 or 2"):
        data.load_pairs("nusax", "ind", "train")


def test_empty_split_is_an_error():
    with pytest.raises(ValueError, match="tydiqa fi test is empty"):  # the fixture has no Finnish items
        data.load_pairs("tydiqa", "fi", "test")


# ---- translating TyDiQA with the model ----

def fake_model(prompts, max_new_tokens):
    """Translates the fixture's Swahili "by heart", keeping the quotes; loses the quotes around 'Dodoma'."""
    english = {"Dodoma\" ni mji mkuu": "Dodoma is the official capital of Tanzania.",
               "Mombasa ni mji": "Mombasa is a port city on the “coast of Kenya”.",
               "Simba ni mnyama": "The lion is an animal that lives \"in the savanna\".\nSwahili: more"}
    outputs = []
    for prompt in prompts:
        text = prompt.rsplit("Swahili: ", 1)[1]
        outputs.append(" " + next((v for k, v in english.items() if k in text), "A question?"))
    fake_model.calls += 1
    return outputs


def test_translate_tydiqa_marks_the_answer_caches_and_counts_lost_answers(tmp_path):
    path = str(tmp_path / "sw.jsonl")
    fake_model.calls = 0
    assert data.translate_tydiqa("sw", "test", fake_model, path, batch_size=2) == 1  # Dodoma lost its quotes
    records = [json.loads(line) for line in open(path)]
    assert [r["id"] for r in records] == ["swahili-40001729-0", "swahili-40011729-0", "swahili-40021729-0"]
    assert records[1]["context"] == "Mombasa is a port city on the coast of Kenya." and \
        records[1]["answer"] == "coast of Kenya"
    assert records[2]["context"] == "The lion is an animal that lives in the savanna."  # first line only
    assert records[0]["answer"] == ""
    calls = fake_model.calls
    assert data.translate_tydiqa("sw", "test", fake_model, path) == 1 and fake_model.calls == calls  # cached
    assert [p.id for p in data.load_pairs("tydiqa", "sw", "test", translations=path)] == \
        ["swahili-40011729-0", "swahili-40021729-0"]


def test_translate_tydiqa_without_write_reads_the_cache_translates_the_rest_and_writes_nothing(tmp_path):
    """What the other processes of a torchrun job do while rank 0 writes: the same calls, the same count."""
    path = tmp_path / "sw.jsonl"
    data.translate_tydiqa("sw", "test", fake_model, str(path), batch_size=2)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[1][:20])  # one record cached, one cut mid-line by a crash
    fake_model.calls = 0
    assert data.translate_tydiqa("sw", "test", fake_model, str(path), batch_size=2, write=False) == 1
    assert fake_model.calls == 2 and path.read_text() == lines[0] + lines[1][:20]  # two items, one batch of two


def test_translation_prompt_is_few_shot_with_the_answer_span_in_quotes(tmp_path):
    seen = []
    data.translate_tydiqa("sw", "test", lambda prompts, n: seen.extend(prompts) or ["x"] * len(prompts),
                          str(tmp_path / "t.jsonl"))
    prompt = seen[1]  # the second context of the first batch
    assert prompt.startswith('Translate the text into English. Keep the part in "quotes" in quotes.\n\nIndonesian: ')
    assert prompt.endswith('\n\nSwahili: Mombasa ni mji wa bandari ulioko "pwani ya Kenya".\nEnglish:')


# ---- local copies of the dataset repos (data_dir, --data-dir) and the Hub cache offline ----

HUB_DOWNLOAD = data._download  # the real one (hub_files replaces it in every test)


@pytest.fixture
def local_copy(tmp_path):
    """The fixtures laid out as `hf download <repo> --repo-type dataset --local-dir DIR/<repo>` leaves them."""
    for task, (repo, _) in data.HUB.items():
        shutil.copytree(os.path.join(FIXTURES, task), tmp_path / "copy" / repo)
    return tmp_path / "copy"


def real_download(monkeypatch, hub=False):
    """The real data._download back; the Hub itself (hf_hub_download) a failure unless hub."""
    monkeypatch.setattr(data, "_download", HUB_DOWNLOAD)
    if not hub:
        monkeypatch.setattr(data, "hf_hub_download", lambda *a, **kw: pytest.fail(f"the Hub was asked for {a}"))


@pytest.mark.parametrize("task, lang, split, translations", [
    ("xnli", "sw", "test", None), ("xnli", "en", "train", None), ("nusax", "ind", "train", None),
    ("tydiqa", "en", "train", None), ("tydiqa", "sw", "test", TRANSLATIONS)])
def test_data_dir_reads_each_repo_in_its_hub_layout_without_the_hub(local_copy, monkeypatch, task, lang, split,
                                                                     translations):
    served = data.load_pairs(task, lang, split, translations=translations)
    real_download(monkeypatch)
    assert data.load_pairs(task, lang, split, translations=translations, data_dir=str(local_copy)) == served


def test_file_missing_from_data_dir_names_the_path_and_the_command_that_puts_it_there(local_copy, monkeypatch):
    real_download(monkeypatch)
    with pytest.raises(FileNotFoundError) as e:
        data.load_pairs("nusax", "ind", "validation", data_dir=str(local_copy))  # the fixtures have no validation

    path = local_copy / "indonlp" / "NusaX-senti" / "ind" / "nusa_x-senti-validation.parquet"
    assert str(e.value).startswith(f"{path} is missing")
    command = re.search(r"`hf download (\S+) (\S+) --repo-type dataset --revision (\S+) --local-dir (\S+)`",
                        str(e.value))
    assert command, str(e.value)
    repo, filename, revision, local_dir = command.groups()
    assert (repo, revision) == data.HUB["nusax"] and os.path.join(local_dir, filename) == str(path)


def hub_cache(folder, repo, revision, files):
    """A Hub cache holding files of a dataset repo at a revision, as hf_hub_download leaves it."""
    snapshot = folder / f"datasets--{repo.replace('/', '--')}" / "snapshots" / revision
    for source, name in files:
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, snapshot / name)
    return folder


def test_filled_hub_cache_serves_the_files_offline_and_a_missing_one_says_how_to_fetch_it(tmp_path, monkeypatch):
    import huggingface_hub.constants
    served = data.load_pairs("xnli", "sw", "test")
    names = [f"{lang}/test-00000-of-00001.parquet" for lang in ("sw", "en")]
    cache = hub_cache(tmp_path, *data.HUB["xnli"], [(os.path.join(FIXTURES, "xnli", n), n) for n in names])
    real_download(monkeypatch, hub=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1, read at import

    assert data.load_pairs("xnli", "sw", "test", cache_dir=str(cache)) == served
    with pytest.raises(FileNotFoundError) as e:
        data.load_pairs("xnli", "sw", "train", cache_dir=str(cache))
    revision = data.HUB["xnli"][1]
    assert f"facebook/xnli/sw/train-00000-of-00001.parquet at revision {revision} is not in the Hub cache ({cache})" \
        in str(e.value)
    assert f"`hf download facebook/xnli sw/train-00000-of-00001.parquet --repo-type dataset --revision {revision}`" \
        in str(e.value) and "--data-dir" in str(e.value)


@pytest.mark.parametrize("task, train_files, translations", [
    ("xnli", ["sw/train-00000-of-00001.parquet", "en/train-00000-of-00001.parquet"], None),
    ("tydiqa", ["secondary_task/train-00000-of-00001.parquet"], TRANSLATIONS)])  # its validation split is in there
def test_eval_only_methods_run_on_a_copy_without_train_files(local_copy, tmp_path, monkeypatch, task, train_files,
                                                              translations):
    import flare
    import model
    import train
    from conftest import save_tiny, save_tiny_tokenizer, tiny_hf_model
    for name in train_files:  # as in many local copies of XNLI (our fixtures have no validation files either)
        os.remove(local_copy / data.HUB[task][0] / name)
    folder = save_tiny_tokenizer(save_tiny(tiny_hf_model("llama"), tmp_path / "tiny"))
    tiny = model.load_model(folder, dtype=torch.float32)
    flare.add_lora(tiny, "task")
    flare.save_adapter(tiny, "task", str(tmp_path / "stage1"), base_model=folder)  # trained elsewhere, say
    real_download(monkeypatch)

    results = train.main(["--model", folder, "--task", task, "--lang", "sw", "--data-dir", str(local_copy),
                          "--methods", "zero-shot,translate-test", "--stage1", str(tmp_path / "stage1"),
                          "--batch-size", "4", "--out", str(tmp_path / "run")] +
                         (["--translations", translations] if translations else []))

    assert list(results) == ["zero-shot", "translate-test"]
    n = len(data.load_pairs(task, "sw", "test", translations=translations, data_dir=str(local_copy)))
    metric = data.TASKS[task].metric
    assert n > 0 and all(row[metric] * n == pytest.approx(round(row[metric] * n)) for row in results.values())
