import numpy as np
import pytest
import torch
from transformers import DataCollatorWithPadding

from helpers.data import balanced_split, load_ag_news, tokenize
from helpers.evaluation import classification_metrics
from helpers.hardware import mixed_precision, peak_memory_mb
from helpers.modeling import add_lora, load_classifier
from helpers.training import WeightedLossTrainer, compute_metrics, training_arguments


def test_metrics_on_known_predictions():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 3])
    predictions = np.array([0, 0, 0, 0, 0, 0, 2, 3])
    metrics = classification_metrics(labels, predictions)
    assert metrics["accuracy"] == pytest.approx(6 / 8)
    assert metrics["balanced_accuracy"] == pytest.approx((1 + 0 + 1 + 1) / 4)
    assert metrics["macro_f1"] == pytest.approx((2 * 4 / 6 / (4 / 6 + 1) + 0 + 1 + 1) / 4)
    logits = np.eye(4)[predictions]
    assert compute_metrics((logits, labels)) == metrics


def test_training_arguments_group_by_length_and_follow_hardware(cpu_config, tmp_path):
    args = training_arguments(cpu_config, tmp_path)
    assert args.train_sampling_strategy == "group_by_length"
    assert (args.seed, args.per_device_train_batch_size, args.learning_rate) == (42, 8, 1e-3)
    # the CPU: bf16 autocast where bf16 is native (AVX512-BF16 or AMX), never fp16
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert (
        mixed_precision().value == {"bf16": native, "fp16": False}
        and args.bf16 == native
        and not args.fp16
    )
    assert args.report_to in ([], "none", ["none"]) or not args.report_to


@pytest.fixture(scope="module")
def tiny_trainer(cpu_config, tmp_path_factory):
    config = cpu_config.replace(
        train_per_class=4, val_per_class=1, test_per_class=1, max_length=32, logging_steps=1
    )
    splits = balanced_split(load_ag_news(), 4, 1, 1, seed=0)
    model, tokenizer = load_classifier(config)
    model = add_lora(model, config)
    weights = torch.tensor([4.0, 1.0, 0.5, 0.25])
    trainer = WeightedLossTrainer(
        model=model,
        args=training_arguments(
            config, tmp_path_factory.mktemp("tiny"), max_steps=2, eval_strategy="no"
        ),
        train_dataset=tokenize(splits["train"], tokenizer, config.max_length),
        data_collator=DataCollatorWithPadding(tokenizer),
        class_weights=weights,
    )
    return trainer, tokenizer, splits, weights


def test_weighted_loss_matches_cross_entropy_by_hand(tiny_trainer):
    trainer, tokenizer, splits, weights = tiny_trainer
    batch = tokenizer(splits["train"]["text"].tolist()[:6], padding=True, return_tensors="pt")
    labels = torch.tensor(splits["train"]["label"].tolist()[:6])
    trainer.model.eval()
    with torch.no_grad():
        loss, outputs = trainer.compute_loss(
            trainer.model, {**batch, "labels": labels}, return_outputs=True, num_items_in_batch=6
        )
    log_probs = torch.log_softmax(outputs.logits.float(), dim=-1)
    picked = -log_probs[torch.arange(6), labels]
    by_hand = (weights[labels] * picked).sum() / weights[labels].sum()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    unweighted = torch.nn.functional.cross_entropy(outputs.logits.float(), labels)
    assert abs(loss.item() - unweighted.item()) > 1e-4  # the weights change the loss


def test_a_4bit_lora_step_updates_adapters_and_head(tiny_trainer):
    trainer, *_ = tiny_trainer
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = [n for n, p in before.items() if not torch.equal(p, after[n].detach())]
    assert any("score" in n for n in changed) and any("lora_B" in n for n in changed)
    assert any("loss" in row for row in trainer.state.log_history)
    assert peak_memory_mb() > 100
    # trained under the hardware's mixed precision; afterwards the model runs in its own precision
    assert trainer.args.bf16 == mixed_precision().value["bf16"]
    assert "_original_forward" not in trainer.model.__dict__ and not hasattr(
        trainer.model.forward, "__wrapped__"
    )
