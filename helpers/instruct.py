"""Instruction tuning for classification: Alpaca records, prompts, the masked loss, generation and
label scoring.

Taught in notebook 08 (instruction tuning); used by ``python -m helpers.train --task instruct``,
``helpers.merging`` and ``helpers.predict``.

An Alpaca record has ``instruction``, ``input`` and ``output``. The model sees the prompt (the
template filled with instruction and input) and learns to continue it with ``output`` and the
end-of-text token; the prompt's tokens carry no loss. A trained model classifies two ways: by
parsing its greedy answer, or by scoring each label's log-likelihood after the prompt, which always
picks a valid label.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from helpers.config import ConfigError, CourseConfig
from helpers.data import DataError
from helpers.evaluation import classification_metrics
from helpers.training import CourseTrainer

# the Stanford Alpaca template (github.com/tatsu-lab/stanford_alpaca), with and without an input
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_HUB_DATASET = "yahma/alpaca-cleaned"
IGNORE_INDEX = -100  # label of a token that carries no loss (the Trainer's cross-entropy skips it)
# the longest general Alpaca record mixed into training (prompt, answer and EOS): the classification
# prompts are far shorter, and an unbounded record would set the memory of its whole batch
GENERAL_MAX_TOKENS = 512


def classification_instruction(labels: Sequence[str]) -> str:
    return f"Classify this news article into one of: {', '.join(labels)}."


def truncate_text(texts: Sequence[str], tokenizer: Any, max_tokens: int) -> list[str]:
    """Each text cut to its first ``max_tokens`` tokens, so the prompt never hides the answer."""
    out = []
    for text, ids in zip(
        texts, tokenizer(list(texts), add_special_tokens=False)["input_ids"], strict=True
    ):
        out.append(text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens]))
    return out


def to_alpaca(
    df: pd.DataFrame,
    labels: Sequence[str],
    tokenizer: Any | None = None,
    max_tokens: int | None = None,
) -> pd.DataFrame:
    """Alpaca records from a ``text``/``label`` split: the same instruction, the article as input,
    the label name as output.

    With a tokenizer and ``max_tokens``, articles are truncated as the head course truncates them.
    """
    for column in ("text", "label"):
        if column not in df.columns:
            raise DataError(
                f"to_alpaca needs a `{column}` column (columns: {list(df.columns)}). Pass a split "
                "from helpers.data.course_splits."
            )
    texts = df["text"].astype(str).tolist()
    if tokenizer is not None and max_tokens is not None:
        texts = truncate_text(texts, tokenizer, max_tokens)
    return pd.DataFrame(
        {
            "instruction": classification_instruction(labels),
            "input": texts,
            "output": [labels[int(i)] for i in df["label"]],
        }
    )


def general_alpaca_records(rows: int, seed: int = 42) -> pd.DataFrame:
    """``rows`` general instruction records from the Hub's yahma/alpaca-cleaned (empty when it
    cannot be reached)."""
    if rows <= 0:
        return pd.DataFrame(columns=["instruction", "input", "output"])
    try:
        from datasets import load_dataset

        data = (
            load_dataset(ALPACA_HUB_DATASET, split="train").shuffle(seed=seed).select(range(rows))
        )
    except Exception as error:  # no network or no cache: train on the classification records alone
        print(
            f"Could not load {ALPACA_HUB_DATASET} from the Hub ({type(error).__name__}); no "
            "general records mixed in."
        )
        return pd.DataFrame(columns=["instruction", "input", "output"])
    return pd.DataFrame({name: data[name] for name in ("instruction", "input", "output")})


def format_prompt(
    instruction: str, input_text: str = "", style: str = "alpaca", tokenizer: Any | None = None
) -> str:
    """The prompt the model continues: the Alpaca template, or the tokenizer's own chat template
    (``style="chat"``)."""
    if style == "alpaca":
        if input_text:
            return ALPACA_PROMPT.format(instruction=instruction, input=input_text)
        return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    if style == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "prompt_style='chat' needs a tokenizer with a chat template; this model has none "
                "(base models such as Meta-Llama-3-8B). Use prompt_style='alpaca'."
            )
        content = f"{instruction}\n\n{input_text}" if input_text else instruction
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    raise ConfigError(f"Unknown prompt_style {style!r}. Use 'alpaca' or 'chat'.")


def prompts(
    records: pd.DataFrame, style: str = "alpaca", tokenizer: Any | None = None
) -> list[str]:
    return [
        format_prompt(i, x, style, tokenizer)
        for i, x in zip(records["instruction"], records["input"], strict=True)
    ]


def article_prompts(texts: Sequence[str], config: CourseConfig, tokenizer: Any) -> list[str]:
    """The prompts a trained model classifies: each article, cut to ``max_length`` tokens, in the
    config's style."""
    records = to_alpaca(
        pd.DataFrame({"text": list(texts), "label": 0}), config.labels, tokenizer, config.max_length
    )
    return prompts(records, config.prompt_style, tokenizer)


def _prompt_ids(tokenizer: Any, prompt: str, style: str) -> list[int]:
    # the chat template already holds the special tokens it needs; the Alpaca prompt gets the
    # tokenizer's BOS
    return tokenizer(prompt, add_special_tokens=style != "chat")["input_ids"]


def encode_example(
    tokenizer: Any, prompt: str, response: str, style: str = "alpaca"
) -> dict[str, list[int]]:
    """input_ids = prompt + response + EOS; labels = IGNORE_INDEX on the prompt, the ids on response
    and EOS."""
    prompt_ids = _prompt_ids(tokenizer, prompt, style)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    return {
        "input_ids": prompt_ids + response_ids,
        "attention_mask": [1] * (len(prompt_ids) + len(response_ids)),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
    }


def instruct_dataset(records: pd.DataFrame, tokenizer: Any, style: str = "alpaca") -> Any:
    """A ``datasets.Dataset`` of encoded records, unpadded (DataCollatorForSeq2Seq pads them)."""
    from datasets import Dataset

    encoded = [
        encode_example(tokenizer, p, o, style)
        for p, o in zip(prompts(records, style, tokenizer), records["output"], strict=True)
    ]
    return Dataset.from_list(encoded)


# ---------------------------------------------------------------- classifying with a causal LM
def _batches(tokenizer: Any, texts: list[str], batch_size: int, style: str) -> Any:
    """Prompts sorted by length, left-padded in batches: yields (indices, input_ids,
    attention_mask)."""
    encoded = [_prompt_ids(tokenizer, t, style) for t in texts]
    order = np.argsort([len(ids) for ids in encoded], kind="stable")
    pad = tokenizer.pad_token_id
    for start in range(0, len(texts), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):  # left padding: every prompt ends at the last column
            ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]) :] = 1
        yield chunk, ids, mask


def _generate(
    model: Any,
    tokenizer: Any,
    prompt_texts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    style: str,
) -> Any:
    """Greedy ``generate`` over length-sorted, left-padded batches (eval mode, ``inference_mode``).

    Yields (indices, input_ids, attention_mask, output with logits and the key-value cache)."""
    target = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for chunk, ids, mask in _batches(tokenizer, list(prompt_texts), batch_size, style):
            ids, mask = ids.to(target), mask.to(target)
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                return_dict_in_generate=True,
                output_logits=True,
                use_cache=True,  # scoring reuses the cache, whatever the config says
            )
            yield chunk, ids, mask, out
    model.train(was_training)


def _answers(
    tokenizer: Any, chunk: np.ndarray, ids: torch.Tensor, out: Any, answers: list[str]
) -> None:
    for row, i in enumerate(chunk):  # the new tokens after each (left-padded) prompt
        answers[i] = tokenizer.decode(
            out.sequences[row, ids.shape[1] :], skip_special_tokens=True
        ).strip()


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompt_texts: Sequence[str],
    max_new_tokens: int = 8,
    batch_size: int = 16,
    style: str = "alpaca",
) -> list[str]:
    """Greedy answers (decoded new tokens, stripped), in the input order."""
    answers: list[str] = [""] * len(prompt_texts)
    for chunk, ids, _, out in _generate(
        model, tokenizer, prompt_texts, max_new_tokens, batch_size, style
    ):
        _answers(tokenizer, chunk, ids, out, answers)
    return answers


def parse_label(answer: str, labels: Sequence[str]) -> int:
    """The label an answer names: an exact match (case and punctuation aside), else the first label
    it mentions; -1 if none."""
    cleaned = answer.strip().strip(".!\"' ").lower()
    lowered = [name.lower() for name in labels]
    if cleaned in lowered:
        return lowered.index(cleaned)
    hits = [
        (m.start(), i)
        for i, name in enumerate(lowered)
        for m in [re.search(re.escape(name), answer.lower())]
        if m
    ]
    return min(hits)[1] if hits else -1


def _label_tokens(tokenizer: Any, labels: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each label's token ids followed by EOS, right-padded: (ids, mask), both (num_labels,
    longest)."""
    candidates = [
        tokenizer(name, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for name in labels
    ]
    width = max(len(c) for c in candidates)
    ids = torch.full((len(labels), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(labels), width), dtype=torch.long)
    for k, tokens in enumerate(candidates):
        ids[k, : len(tokens)] = torch.tensor(tokens)
        mask[k, : len(tokens)] = 1
    return ids, mask


def classify_prompts(
    model: Any,
    tokenizer: Any,
    prompt_texts: Sequence[str],
    labels: Sequence[str],
    max_new_tokens: int = 8,
    batch_size: int = 16,
    style: str = "alpaca",
) -> tuple[np.ndarray, list[str]]:
    """Label log-likelihoods and greedy answers from ONE pass over each batch of prompts.

    Returns (scores, answers): ``scores[i, k]`` is log p(label k + EOS | prompt i); ``answers[i]``
    the greedy answer (at most ``max_new_tokens`` tokens; with ``max_new_tokens=0`` none are kept).
    ``generate`` reads the prompts once; its first step's logits give each label's first token, and
    its key-value cache, cut back to the prompt, is reused for the rest of every label, so scoring
    costs about one more step of generation.
    """
    label_ids, label_mask = _label_tokens(tokenizer, labels)
    num, width = label_ids.shape
    scores = np.zeros((len(prompt_texts), num), dtype=np.float64)
    answers: list[str] = [""] * len(prompt_texts)
    target = next(model.parameters()).device
    for chunk, ids, mask, out in _generate(
        model, tokenizer, prompt_texts, max(max_new_tokens, 1), batch_size, style
    ):
        with torch.inference_mode():
            if max_new_tokens > 0:
                _answers(tokenizer, chunk, ids, out, answers)
            # (batch, vocab): the token after the prompt
            first_logp = torch.log_softmax(out.logits[0].float(), dim=-1)
            cache = out.past_key_values
            cache.crop(-(cache.get_seq_length() - ids.shape[1]))  # back to the prompt alone
            cache.batch_repeat_interleave(num)  # each prompt's cache once per label
            rows = len(chunk)
            cont = label_ids.repeat(rows, 1).to(target)  # (batch * labels, width)
            cont_mask = label_mask.repeat(rows, 1).to(target)
            full_mask = torch.cat([mask.repeat_interleave(num, 0), cont_mask], dim=1)
            # positions continue from each prompt's own length (left padding does not count)
            cont_pos = mask.sum(dim=1, keepdim=True).repeat_interleave(num, 0) + torch.arange(
                width, device=target
            )
            later = model(
                input_ids=cont,
                attention_mask=full_mask,
                position_ids=cont_pos,
                past_key_values=cache,
            )
            # (batch * labels, width, vocab)
            later_logp = torch.log_softmax(later.logits.float(), dim=-1)
            # token j of a label is predicted after the prompt (j = 0) or after the label's token j
            # - 1
            token_logp = torch.cat(
                [
                    first_logp.repeat_interleave(num, 0).gather(1, cont[:, :1]),
                    later_logp[:, :-1].gather(2, cont[:, 1:, None]).squeeze(-1),
                ],
                dim=1,
            )
            scores[chunk] = (
                (token_logp * cont_mask).sum(dim=1).view(rows, num).double().cpu().numpy()
            )
    return scores, answers


def label_log_likelihoods(
    model: Any,
    tokenizer: Any,
    prompt_texts: Sequence[str],
    labels: Sequence[str],
    batch_size: int = 16,
    style: str = "alpaca",
) -> np.ndarray:
    """log p(label + EOS | prompt) for every prompt and label: an (n, num_labels) array, in the
    input order.

    The highest-scoring label is always a valid answer, whatever the model would have generated.
    """
    return classify_prompts(model, tokenizer, prompt_texts, labels, 0, batch_size, style)[0]


def evaluate_generative(
    model: Any,
    tokenizer: Any,
    df: pd.DataFrame,
    config: CourseConfig,
    parse: bool = True,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Accuracy on a ``text``/``label`` split two ways: label scoring, and (``parse``) greedy
    answers parsed.

    Returns {"scored": metrics, "generated": metrics, "valid_answers": share, "answers": [...],
    "parsed": array, "scores": array, "samples_per_second": float}.
    """
    batch_size = batch_size or config.eval_batch_size
    texts = article_prompts(df["text"].tolist(), config, tokenizer)
    labels = df["label"].to_numpy()
    start = time.perf_counter()
    scores, answers = classify_prompts(
        model,
        tokenizer,
        texts,
        config.labels,
        config.max_new_tokens if parse else 0,
        batch_size,
        config.prompt_style,
    )
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {
        "scored": classification_metrics(labels, scores.argmax(axis=1)),
        "scores": scores,
        "samples_per_second": len(texts) / seconds,  # scoring, plus generating when parse
    }
    if parse:
        parsed = np.array([parse_label(a, config.labels) for a in answers])
        result.update(
            {
                # an answer that names no label counts as wrong (its class -1 matches no true label)
                "generated": classification_metrics(labels, parsed),
                "valid_answers": float((parsed >= 0).mean()),
                "answers": answers,
                "parsed": parsed,
            }
        )
    return result


def instruct_records(train: pd.DataFrame, config: CourseConfig, tokenizer: Any) -> pd.DataFrame:
    """The training records: the first ``instruct_train_per_class`` rows of each class of the split
    (0: all), as Alpaca records, plus ``alpaca_general_rows`` general records from the Hub, shuffled
    with the seed."""
    if config.instruct_train_per_class > 0:
        train = train.groupby("label", group_keys=False).head(config.instruct_train_per_class)
    records = to_alpaca(train, config.labels, tokenizer, config.max_length)
    if config.alpaca_general_rows > 0 and config.data_source == "hub":
        general = general_alpaca_records(config.alpaca_general_rows, config.seed)
        records = pd.concat(
            [records, within_length(general, tokenizer, GENERAL_MAX_TOKENS, config.prompt_style)]
        )
    return records.sample(frac=1.0, random_state=config.seed).reset_index(drop=True)


def within_length(
    records: pd.DataFrame, tokenizer: Any, max_tokens: int, style: str = "alpaca"
) -> pd.DataFrame:
    """The records whose prompt, answer and EOS fit ``max_tokens``; the longer ones are dropped
    (cutting them would teach truncated answers), so that no batch grows without bound."""
    lengths = [
        len(encode_example(tokenizer, prompt, output, style)["input_ids"])
        for prompt, output in zip(
            prompts(records, style, tokenizer), records["output"], strict=True
        )
    ]
    keep = [length <= max_tokens for length in lengths]
    if not all(keep):
        print(f"dropped {keep.count(False)} general records longer than {max_tokens} tokens")
    return records[keep]


class ResponseLossTrainer(CourseTrainer):
    """The Trainer, with the causal-LM loss computed where a label is counted (response and EOS) and
    nowhere else.

    The loss is the model's own next-token cross-entropy over the tokens whose label is not
    ``IGNORE_INDEX``. Only those few positions go through the LM head (``logits_to_keep`` as a mask)
    instead of every prompt token: a 49,152-word (SmolLM2) or 128,256-word (Llama 3) projection
    whose result the loss would throw away.
    """

    loss_is_scaled_for_ga = (
        False  # a per-batch mean: let the Trainer scale it for gradient accumulation
    )

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        labels = inputs.pop("labels")
        targets = labels[:, 1:]  # position t predicts token t + 1
        counted = torch.zeros_like(labels, dtype=torch.bool)
        counted[:, :-1] = targets != IGNORE_INDEX
        outputs = model(**inputs, logits_to_keep=counted)
        logits = outputs.logits.float()  # (counted tokens, vocab), row by row like targets[counted]
        loss = torch.nn.functional.cross_entropy(logits, targets[targets != IGNORE_INDEX])
        return (loss, outputs) if return_outputs else loss
