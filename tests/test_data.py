import numpy as np
import pandas as pd
import pytest
import torch

from helpers.data import (
    AG_NEWS_CSV,
    DataError,
    balanced_split,
    class_weights,
    imbalanced_subset,
    load_ag_news,
    make_text,
    read_text_csv,
    token_length_stats,
    tokenize,
)


@pytest.fixture(scope="module")
def ag_news():
    return load_ag_news("local")


def test_bundled_data_is_balanced_ag_news(ag_news):
    assert len(ag_news) == 6000
    assert ag_news["label"].value_counts().sort_index().tolist() == [1500] * 4
    assert "\\" not in " ".join(ag_news["text"].head(50))
    assert make_text("Title", "First\\second") == "Title. First second"


def test_split_is_balanced_disjoint_and_reproducible(ag_news):
    splits = balanced_split(ag_news, 10, 3, 5, seed=1)
    assert {k: len(v) for k, v in splits.items()} == {"train": 40, "val": 12, "test": 20}
    for name, per_class in (("train", 10), ("val", 3), ("test", 5)):
        assert splits[name]["label"].value_counts().tolist() == [per_class] * 4
    texts = [set(df["text"]) for df in splits.values()]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    again = balanced_split(ag_news, 10, 3, 5, seed=1)
    assert all(splits[k].equals(again[k]) for k in splits)
    assert not splits["train"].equals(balanced_split(ag_news, 10, 3, 5, seed=2)["train"])


def test_split_drops_duplicates_and_refuses_too_many(ag_news):
    doubled = pd.concat([ag_news, ag_news])
    splits = balanced_split(doubled, 700, 50, 700)
    assert not set(splits["train"]["text"]) & set(splits["test"]["text"])
    with pytest.raises(DataError, match="Lower the per-class counts"):
        balanced_split(ag_news, 1000, 300, 300)
    with pytest.raises(DataError, match="no `label` column"):
        balanced_split(ag_news[["text"]], 1, 1, 1)


def test_class_weights_are_normalised_inverse_frequency():
    assert torch.allclose(class_weights([0, 1, 2, 3] * 5, 4), torch.ones(4))
    weights = class_weights([0] * 80 + [1] * 10 + [2] * 5 + [3] * 5, 4)
    inverse = np.array([1 / 80, 1 / 10, 1 / 5, 1 / 5])
    assert torch.allclose(weights, torch.tensor(inverse / inverse.mean(), dtype=torch.float32))
    assert (
        weights.mean().item() == pytest.approx(1.0)
        and weights[3] == weights[2] > weights[1] > weights[0]
    )
    with pytest.raises(DataError, match=r"Class\(es\) \[2\] have no training examples"):
        class_weights([0, 1, 3], 4)


def test_imbalanced_subset_keeps_the_asked_counts(ag_news):
    subset = imbalanced_subset(ag_news, [100, 50, 20, 10], seed=0)
    assert subset["label"].value_counts().sort_index().tolist() == [100, 50, 20, 10]
    with pytest.raises(DataError, match="cannot keep 2000"):
        imbalanced_subset(ag_news, [2000, 1, 1, 1])


def test_read_text_csv_layouts_and_errors(tmp_path):
    (tmp_path / "h.csv").write_text("text,label\nStocks fell,Business\nA goal,1\n")
    df = read_text_csv(tmp_path / "h.csv")
    assert df["label"].tolist() == [2, 1]
    (tmp_path / "t.csv").write_text("text\nonly text\n")
    assert list(read_text_csv(tmp_path / "t.csv").columns) == ["text"]
    (tmp_path / "nocol.csv").write_text("headline,label\nx,1\n")
    with pytest.raises(DataError, match="`text` column"):
        read_text_csv(tmp_path / "nocol.csv")
    (tmp_path / "range.csv").write_text('"5","t","d"\n')
    with pytest.raises(DataError, match="outside the label set"):
        read_text_csv(tmp_path / "range.csv")
    (tmp_path / "word.csv").write_text("text,label\nx,Weather\n")
    with pytest.raises(DataError, match="neither an integer nor one of"):
        read_text_csv(tmp_path / "word.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="is empty"):
        read_text_csv(tmp_path / "empty.csv")
    with pytest.raises(DataError, match="does not exist"):
        read_text_csv(tmp_path / "nope.csv")
    assert len(read_text_csv(AG_NEWS_CSV)) == 6000


def test_tokenize_truncates_and_reports_lengths(ag_news, cpu_config):
    from helpers.modeling import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(cpu_config.model_name))
    sample = ag_news.head(64)
    dataset = tokenize(sample, tokenizer, max_length=16)
    assert set(dataset.column_names) == {"labels", "input_ids", "attention_mask"}
    assert max(len(ids) for ids in dataset["input_ids"]) == 16
    assert dataset["labels"] == sample["label"].tolist()
    stats = token_length_stats(sample["text"], tokenizer)
    assert 16 < stats["median"] <= stats["p95"] <= stats["p99"] <= stats["max"]


def test_course_splits_follow_the_config(cpu_config):
    from helpers.data import course_splits

    splits = course_splits(
        cpu_config.replace(train_per_class=7, val_per_class=2, test_per_class=3, seed=5)
    )
    assert {k: len(v) for k, v in splits.items()} == {"train": 28, "val": 8, "test": 12}
    assert splits["test"].equals(balanced_split(load_ag_news(), 7, 2, 3, seed=5)["test"])
