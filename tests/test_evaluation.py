import numpy as np
import pytest

from helpers.data import load_ag_news
from helpers.evaluation import confusion, evaluate_classifier, predict_logits, report, softmax
from helpers.modeling import load_classifier


@pytest.fixture(scope="module")
def model_and_tokenizer(cpu_config):
    return load_classifier(cpu_config, load_in_4bit=False)


def test_sorted_batches_return_logits_in_input_order(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    texts = load_ag_news()["text"].tolist()[:12]
    texts[3] = "Short."
    batched = predict_logits(model, tokenizer, texts, batch_size=5, max_length=96, progress=False)
    one_by_one = np.concatenate(
        [
            predict_logits(model, tokenizer, [t], batch_size=1, max_length=96, progress=False)
            for t in texts
        ]
    )
    assert batched.shape == (12, 4)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-4)
    assert model.training is False


def test_overlong_text_is_truncated_with_a_warning(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.warns(UserWarning, match="truncated"):
        logits = predict_logits(
            model, tokenizer, ["word " * 300, ""], max_length=32, progress=False
        )
    assert np.isfinite(logits).all() and logits.shape == (2, 4)


def test_evaluate_report_and_confusion(model_and_tokenizer, cpu_config):
    model, tokenizer = model_and_tokenizer
    df = load_ag_news().sample(16, random_state=0)
    result = evaluate_classifier(model, tokenizer, df, batch_size=8, max_length=64, progress=False)
    assert set(result["metrics"]) == {"accuracy", "balanced_accuracy", "macro_f1"}
    assert (result["predictions"] == result["logits"].argmax(1)).all()
    table = report(df["label"], result["predictions"], cpu_config.labels)
    assert (
        list(table.index[:4]) == cpu_config.labels
        and table.loc["Sports", "support"] == (df["label"] == 1).sum()
    )
    matrix = confusion(df["label"], result["predictions"], cpu_config.labels)
    assert matrix.shape == (4, 4) and matrix.to_numpy().sum() == 16
    np.testing.assert_allclose(softmax(result["logits"]).sum(1), 1.0, rtol=1e-6)
