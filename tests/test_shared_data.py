"""The real benchmark files in ../shared/data (next to the repository), read through --data-dir / data_dir.

That folder holds local copies of the Hub dataset repos in their own layout (its README gives sources and licences):
NusaX-senti complete, XNLI validation and test without the train split, TyDiQA-GoldP validation complete and train
for english, korean and swahili only. The expected sizes below are the datasets' published ones, as that README lists
them. Every test skips where the folder is absent (a user's clone); CI has it. Nothing of it is copied into the
repository: the pipeline runs write to pytest's temporary folders.
"""
import json
import pathlib
from collections import Counter

import pyarrow.parquet as pq
import pytest

import data
import train
from conftest import save_tiny, save_tiny_tokenizer, tiny_hf_model

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason=f"no real data at {SHARED} (../shared/data next to the "
                                                            f"repository); these tests run where it is, as in CI")
NUSAX = SHARED / "indonlp" / "NusaX-senti"
XNLI = SHARED / "facebook" / "xnli"


def block_hub(mp):
    """With data_dir every file comes from the local copy: asking the Hub is a failure."""
    def hub(*args, **kwargs):
        raise AssertionError(f"the Hub was asked for {args} {kwargs}")
    mp.setattr(data, "hf_hub_download", hub)


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    block_hub(monkeypatch)


def file_rows(path):
    return pq.read_table(path).to_pylist()


# ------------------------------------------------------------------------------------------ sizes and alignment

@pytest.mark.parametrize("split, size", [("train", 500), ("validation", 100), ("test", 400)])
def test_nusax_every_language_has_the_split_size_and_the_english_ids_and_labels(split, size):
    english = data.load_pairs("nusax", "en", split, data_dir=str(SHARED))
    assert len(english) == size and len({p.id for p in english}) == size
    for lang in data.TASKS["nusax"].languages:
        pairs = data.load_pairs("nusax", lang, split, data_dir=str(SHARED))
        assert [p.id for p in pairs] == [p.id for p in english], lang
        assert [p.answer for p in pairs] == [p.answer for p in english], lang
        assert [p.source for p in pairs] == [p.target for p in english], lang
        assert all(p.target != p.source for p in pairs[:20]), lang  # a translation, not the English text again


def test_nusax_pairs_hold_the_file_text_and_its_label_word():
    rows = file_rows(NUSAX / "jav" / "nusa_x-senti-test.parquet")
    pairs = data.load_pairs("nusax", "jav", "test", data_dir=str(SHARED))
    assert [p.target["text"] for p in pairs] == [r["text"] for r in rows]
    assert [p.answer for p in pairs] == [("negative", "neutral", "positive")[r["label"]] for r in rows]
    assert {r["lang"] for r in rows} == {"jav"}


@pytest.mark.parametrize("split, size", [("validation", 2490), ("test", 5010)])
def test_xnli_every_language_has_the_split_size_and_the_english_labels(split, size):
    english = data.load_pairs("xnli", "en", split, data_dir=str(SHARED))
    assert len(english) == size
    assert Counter(p.answer for p in english) == {label: size // 3 for label in data.TASKS["xnli"].labels}
    for lang in data.TASKS["xnli"].languages:
        pairs = data.load_pairs("xnli", lang, split, data_dir=str(SHARED))
        assert [p.answer for p in pairs] == [p.answer for p in english], lang
        assert [p.source for p in pairs] == [p.target for p in english], lang
        rows = file_rows(XNLI / lang / f"{split}-00000-of-00001.parquet")
        assert [p.target for p in pairs] == [{"premise": r["premise"], "hypothesis": r["hypothesis"]} for r in rows]


def test_xnli_train_split_is_absent_and_the_error_says_where_it_looked_and_how_to_fetch_it():
    path = XNLI / "sw" / "train-00000-of-00001.parquet"
    with pytest.raises(FileNotFoundError) as e:
        data.load_pairs("xnli", "sw", "train", data_dir=str(SHARED))
    assert str(path) in str(e.value)
    assert (f"`hf download facebook/xnli sw/train-00000-of-00001.parquet --repo-type dataset --revision "
            f"{data.HUB['xnli'][1]} --local-dir {XNLI}`") in str(e.value)


TYDIQA_TEST = {"ar": 921, "bn": 113, "en": 440, "fi": 782, "id": 565, "ko": 276, "ru": 812, "sw": 499, "te": 669}


def test_tydiqa_test_is_the_validation_file_with_every_language():
    counts = {lang: len(data.READERS["tydiqa"](lang, "test", None, str(SHARED))) for lang in TYDIQA_TEST}
    assert counts == TYDIQA_TEST
    assert sum(counts.values()) == pq.read_metadata(SHARED / "google-research-datasets" / "tydiqa" /
                                                     "secondary_task" / "validation-00000-of-00001.parquet").num_rows
    assert len(data.load_pairs("tydiqa", "en", "test", data_dir=str(SHARED))) == 440


def test_tydiqa_test_pairs_keep_every_annotators_answer_for_the_squad_scores():
    rows = pq.read_table(SHARED / "google-research-datasets" / "tydiqa" / "secondary_task" /
                         "validation-00000-of-00001.parquet").to_pylist()
    golds = {r["id"]: r["answers"]["text"] for r in rows if r["id"].startswith("english-")}
    pairs = data.load_pairs("tydiqa", "en", "test", data_dir=str(SHARED))
    assert {p.id: [p.answer, *p.more_answers] for p in pairs} == golds
    assert sum(len(set(g)) > 1 for g in golds.values()) > 50  # differing answers: the two scores can differ
    last = [(p.answer, *p.more_answers)[-1] for p in pairs]  # the last annotator's answer as the prediction
    scores = data.metrics(data.TASKS["tydiqa"], last, [p.answer for p in pairs], [p.more_answers for p in pairs])
    assert scores["exact_match_squad"] == 1.0 > scores["exact_match"]


@pytest.mark.parametrize("lang, size", [("en", 3696), ("ko", 1625), ("sw", 2755)])
def test_tydiqa_train_and_validation_split_the_train_file_of_the_languages_it_holds(lang, size):
    train_items, validation = (data.READERS["tydiqa"](lang, s, None, str(SHARED)) for s in ("train", "validation"))
    assert len(train_items) + len(validation) == size
    assert not {it["id"] for it in train_items} & {it["id"] for it in validation}
    assert 0.08 < len(validation) / size < 0.12  # a tenth, by a hash of the id
    if lang == "en":  # stage 1 of a TyDiQA run trains on these
        assert len(data.load_pairs("tydiqa", "en", "train", data_dir=str(SHARED))) == len(train_items)


def test_tydiqa_train_of_a_language_the_copy_lacks_is_an_error_not_an_empty_split():
    with pytest.raises(ValueError, match="tydiqa ar train is empty: its file holds no items for it"):
        data.load_pairs("tydiqa", "ar", "train", data_dir=str(SHARED))


# ------------------------------------------------------------------------------------------ pipeline runs

SMALL = ["--max-train", "16", "--stage1-max-train", "32", "--max-eval", "16", "--batch-size", "8", "--epochs", "1"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random transformers Llama with a byte-level tokenizer, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    save_tiny(tiny_hf_model("llama"), folder)
    return save_tiny_tokenizer(folder)


def spy_loads(mp):
    """Records what data.load_pairs returns to train.main: {(lang, split): pairs}."""
    real, loaded = data.load_pairs, {}

    def load_pairs(task, lang, split, **kwargs):
        loaded[lang, split] = real(task, lang, split, **kwargs)
        return loaded[lang, split]
    mp.setattr(data, "load_pairs", load_pairs)
    return loaded


@pytest.fixture(scope="module")
def nusax_run(tiny_folder, tmp_path_factory):
    """Every method on real NusaX Javanese at a toy size; returns (out folder, results, the pairs loaded)."""
    out = tmp_path_factory.mktemp("nusax-jav")
    with pytest.MonkeyPatch.context() as mp:
        block_hub(mp)
        loaded = spy_loads(mp)
        results = train.main(["--model", tiny_folder, "--task", "nusax", "--lang", "jav", "--data-dir", str(SHARED),
                              "--methods", ",".join(train.METHODS), "--out", str(out), *SMALL,
                              "--max-length", "64"])  # the tiny byte-level tokenizer: about one token per byte
    return out, results, loaded


def test_short_pipeline_on_real_nusax_reports_every_method(nusax_run):
    out, results, _ = nusax_run
    assert json.loads((out / "results.json").read_text()) == results
    assert list(results) == list(train.METHODS)
    for method, row in results.items():
        for key in ("accuracy", "macro_f1"):
            assert 0.0 <= row[key] <= 1.0, (method, key)
        assert row["accuracy"] * 16 == pytest.approx(round(row["accuracy"] * 16))  # a share of the 16 test items
    for method in ("flare", "lora", "input-fusion"):
        assert 0.0 <= results[method]["val_macro_f1"] <= 1.0
        assert (out / method / "adapter" / "adapter.safetensors").exists()
    assert 0.0 <= results["flare"]["mismatched_source_macro_f1"] <= 1.0


def test_short_pipeline_on_real_nusax_trains_and_tests_on_items_of_the_real_files(nusax_run):
    _, _, loaded = nusax_run
    assert {key: len(pairs) for key, pairs in loaded.items()} == {
        ("jav", "train"): 16, ("jav", "validation"): 16, ("jav", "test"): 16, ("en", "train"): 32,
        ("en", "validation"): 16}
    for (lang, split), pairs in loaded.items():
        rows = {r["id"]: r for r in file_rows(NUSAX / ("eng" if lang == "en" else lang) /
                                               f"nusa_x-senti-{split}.parquet")}
        english = {r["id"]: r for r in file_rows(NUSAX / "eng" / f"nusa_x-senti-{split}.parquet")}
        for p in pairs:
            assert p.target["text"] == rows[p.id]["text"] and p.source["text"] == english[p.id]["text"]
            assert p.answer == ("negative", "neutral", "positive")[rows[p.id]["label"]]


def test_eval_only_methods_on_real_xnli_read_no_train_split(nusax_run, tiny_folder, tmp_path, monkeypatch):
    stage1 = nusax_run[0] / "stage1" / "adapter"  # any stage-1 adapter of this model will do
    real, asked = data._download, []
    monkeypatch.setattr(data, "_download", lambda task, name, *where: asked.append(name) or real(task, name, *where))
    results = train.main(["--model", tiny_folder, "--task", "xnli", "--lang", "sw", "--data-dir", str(SHARED),
                          "--methods", "zero-shot,translate-test", "--stage1", str(stage1), "--out", str(tmp_path),
                          *SMALL])

    assert list(results) == ["zero-shot", "translate-test"]
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in results.values())
    assert set(asked) == {"sw/test-00000-of-00001.parquet", "en/test-00000-of-00001.parquet"}


def test_stage1_on_real_xnli_without_english_train_names_the_file_and_the_stage1_flag(tiny_folder, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        train.main(["--model", tiny_folder, "--task", "xnli", "--lang", "sw", "--data-dir", str(SHARED),
                    "--methods", "zero-shot", "--out", str(tmp_path), *SMALL])
    message = str(e.value)
    assert str(XNLI / "en" / "train-00000-of-00001.parquet") in message and "hf download facebook/xnli" in message
    assert "--stage1 <run>/stage1/adapter" in message
