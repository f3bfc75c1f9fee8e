"""GPU smoke run: a Llama 3 8B-shaped model, random weights, through the course's own code.

    python scripts/gpu_smoke.py [--steps 5] [--batch-size 8] [--max-length 128] [--output FILE.json]
    python scripts/gpu_smoke.py --tiny   # the same path with a 2-layer model, on any machine
    python scripts/gpu_smoke.py --model-dir /tmp/llama3-shape --save-adapter /tmp/adapter
    python scripts/as_t4.py scripts/gpu_smoke.py ...   # as on a T4: fp16, 15 GB

``--model-dir`` keeps the random model (16 GB at the 8B shape) for the next run;
``--save-adapter`` saves the trained adapter as ``helpers.train`` does, for
``scripts/gpu_merge.py``.

No download: the model is built from Meta-Llama-3-8B's config (``helpers.memory.LLAMA3_8B_SHAPE``)
with random weights, saved once as safetensors, then loaded in 4-bit by
``helpers.modeling.load_classifier`` exactly as the ``llama3-8b`` profile does. A few QLoRA steps
with the course's ``WeightedLossTrainer`` and one evaluation batch follow; the script prints
tokens/s, peak memory and the memory estimate of ``helpers.memory``. The tokenizer is the bundled
SmolLM2 one (its ids fit the Llama 3 vocabulary); speed and memory do not depend on which.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    LlamaConfig,
    TrainerCallback,
    set_seed,
)

from helpers.config import load_config
from helpers.data import balanced_split, load_ag_news, tokenize
from helpers.evaluation import predict_logits
from helpers.hardware import compute_dtype, device, hardware_name, peak_memory_mb, reset_peak_memory
from helpers.memory import LLAMA3_8B_SHAPE, estimate_memory
from helpers.merging import save_adapter
from helpers.modeling import add_lora, load_classifier, load_tokenizer, resolve_model
from helpers.training import WeightedLossTrainer, training_arguments

TINY_SHAPE = {
    **LLAMA3_8B_SHAPE,
    "hidden_size": 128,
    "intermediate_size": 448,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "vocab_size": 49152,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


class StepTimes(TrainerCallback):
    """The wall time of each optimizer step (the first includes the warm-up)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._start)


def build_random_model(shape: dict, folder: Path, num_labels: int, tokenizer: str) -> Path:
    """Random weights of ``shape`` saved as a local model folder (built on the GPU when there is
    one)."""
    config = LlamaConfig(**shape, num_labels=num_labels, pad_token_id=2)
    torch.manual_seed(0)
    with device().value:
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    load_tokenizer(tokenizer).save_pretrained(folder)
    del model
    if device().value.type == "cuda":
        torch.cuda.empty_cache()
    return folder


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tiny", action="store_true", help="a 2-layer model of the same architecture (CPU test)"
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument(
        "--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True
    )
    parser.add_argument("--model-dir", help="build the random model here once, and reuse it")
    parser.add_argument(
        "--tokenizer", default="smollm2", help="tokenizer folder (default: the bundled SmolLM2's)"
    )
    parser.add_argument("--save-adapter", help="save the trained adapter to this folder")
    parser.add_argument("--output", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    shape = TINY_SHAPE if args.tiny else LLAMA3_8B_SHAPE
    config = load_config(
        "llama3-8b",
        model_name="unused",
        batch_size=args.batch_size,
        max_length=args.max_length,
        gradient_checkpointing=args.gradient_checkpointing,
        logging_steps=1,
    )
    set_seed(config.seed)
    with tempfile.TemporaryDirectory(prefix="llama3-shape-") as tmp:
        folder = Path(args.model_dir) if args.model_dir else Path(tmp) / "model"
        if not (folder / "config.json").is_file():
            start = time.perf_counter()
            build_random_model(shape, folder, config.num_labels, resolve_model(args.tokenizer))
            print(f"built and saved random weights in {time.perf_counter() - start:.0f} s")
        config = replace(config, model_name=str(folder))
        reset_peak_memory()
        start = time.perf_counter()
        # 4-bit NF4, as the llama3-8b profile
        model, tokenizer = load_classifier(config, name=str(folder))
        load_seconds = time.perf_counter() - start
        loaded_mb = peak_memory_mb()
        model = add_lora(model, config)
        rows = balanced_split(
            load_ag_news(), args.steps * args.batch_size // config.num_labels + 1, 1, 1, seed=0
        )
        trainer = WeightedLossTrainer(
            model=model,
            args=training_arguments(
                config,
                Path(tmp) / "trainer",
                max_steps=args.steps,
                eval_strategy="no",
                save_strategy="no",
            ),
            train_dataset=tokenize(rows["train"], tokenizer, config.max_length),
            data_collator=DataCollatorWithPadding(tokenizer),
            callbacks=[step_times := StepTimes()],
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        tokens = sum(
            min(len(ids), config.max_length)
            for ids in tokenizer(rows["train"]["text"].tolist())["input_ids"]
        )
        # the tokens of the steps taken
        tokens = tokens * args.steps * args.batch_size / len(rows["train"])
        logits = predict_logits(
            model,
            tokenizer,
            rows["train"]["text"].tolist()[:32],
            32,
            config.max_length,
            progress=False,
        )
        estimate = estimate_memory(config, shape, bits=4)
        if args.save_adapter:
            save_adapter(model, tokenizer, config, args.save_adapter)
    figures = {
        "hardware": hardware_name(),
        "shape": "tiny" if args.tiny else "Llama 3 8B",
        "compute_dtype": str(compute_dtype().value).removeprefix("torch."),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "gradient_checkpointing": args.gradient_checkpointing,
        "load_seconds": round(load_seconds, 1),
        "seconds_per_step": round(seconds / args.steps, 2),
        "train_tokens_per_second": round(tokens / seconds, 1),
        "first_step_seconds": round(step_times.seconds[0], 2),
        "steady_tokens_per_second": round(
            tokens / args.steps / statistics.median(step_times.seconds[1:] or step_times.seconds), 1
        ),
        "median_step_seconds_after_first": round(
            statistics.median(step_times.seconds[1:] or step_times.seconds), 3
        ),
        "loaded_peak_memory_mb": round(loaded_mb, 1),
        "train_peak_memory_mb": round(peak_memory_mb(), 1),
        "estimated_peak_memory_mb": round(estimate.training / 2**20, 1),
        "eval_logits_finite": bool(torch.isfinite(torch.as_tensor(logits)).all()),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(figures, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
