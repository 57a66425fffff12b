"""A training step on a night's own samples, the way the recipe runs it on CPU, beside the
previous way, alternating on the same micro-batches in one process:

- "rows by cost": suffixes over the shared prefix in the rows suffix_rows lays out, the
  prefix run without gradient and without dropout (the recipe now);
- "one row": every suffix packed in one row with a block-diagonal mask, prefix as above;
- "one row, prefix with dropout": as before, the prefix also running LoRA's dropout.

    .venv/bin/python bench/train_step.py DATA_DIR [--batches 8]

DATA_DIR is a data dir a night left (bench/feedback_loop.py --keep-data): its first run's
train.jsonl and its base model. Replay samples train on the file's answers here (the night
trains on the model's own); the layout and the cost per token are the same.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).with_name("results") / "train_step.jsonl"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--batches", type=int, default=8)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from provenance import append, commit, cpu_device
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune import recipe

    code = commit()

    run = sorted((args.data_dir / "runs").glob("run-*"))[0]
    config = json.loads((run / "run.json").read_text())
    base = config["base_model"]
    tokenizer = AutoTokenizer.from_pretrained(base)
    samples = [json.loads(line) for line in (run / "train.jsonl").read_text(encoding="utf-8").splitlines() if line]
    examples = [e for sample in samples for e in recipe.tokenize_sample(tokenizer, sample, config["max_seq_len"])]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = recipe.with_lora_defaults(recipe.Hyperparameters(), sum(p.numel() for p in model.parameters()))
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                             target_modules=cfg.target_modules, task_type="CAUSAL_LM"))
    model.train()
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    chosen = recipe.suffix_rows

    def one_row(lengths, prefix, cost):
        return [list(range(len(lengths)))]

    def sticky_train(self, mode=True):  # the previous recipe: dropout on in the prefix too
        return self

    variants = {"rows by cost": (chosen, False), "one row": (one_row, False),
                "one row, prefix with dropout": (one_row, True)}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.cpu_has_bf16())
    random.seed(0)
    order = list(range(len(examples)))
    random.shuffle(order)
    batches = [[examples[i] for i in order[n * 8:(n + 1) * 8]] for n in range(args.batches + 1)]

    def step(batch, variant) -> float:
        layout, sticky = variants[variant]
        recipe.suffix_rows = layout
        for module in dropouts:
            if sticky:
                module.train = sticky_train.__get__(module)
            else:
                module.__dict__.pop("train", None)
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        with autocast:
            recipe.backward_micro_batch(model, batch, "cpu", detach_prefix=True)
        return time.perf_counter() - started

    step(batches[0], "rows by cost")  # warm-up
    seconds = {variant: 0.0 for variant in variants}
    for number, batch in enumerate(batches[1:]):
        names = list(variants)
        for variant in names[number % len(names):] + names[:number % len(names)]:  # each goes first in turn
            seconds[variant] += step(batch, variant)
        print(f"micro-batch {number + 1}/{args.batches}: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()),
              flush=True)
    recipe.suffix_rows = chosen
    tokens = sum(len(e["input_ids"]) for batch in batches[1:] for e in batch)
    baseline = seconds["one row, prefix with dropout"]
    row = append(RESULTS, "bench/train_step.py", cpu_device(), code, model=Path(base).name,
                 micro_batches=args.batches, samples_per_micro_batch=8, tokens=tokens,
                 seconds={k: round(v, 1) for k, v in seconds.items()},
                 against_previous={k: round(v / baseline, 3) for k, v in seconds.items()})
    print(json.dumps(row, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
