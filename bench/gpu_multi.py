"""The refresh recipe on one GPU and data parallel on several, side by side: the same
samples, the same settings (QLoRA r=64 alpha=16 q/k/v, 8 samples per optimizer step), the
recipe started as the nightly job starts it (finetune.recipe.recipe_command: torchrun with
one process per GPU when --train-gpus > 1). Prints training tokens/s and peak memory.

    python bench/gpu_multi.py --model Qwen/Qwen3-14B --gpus 2
    python bench/gpu_multi.py --model /mnt/q14b/ckpt --gpus 2     # random weights + a tokenizer
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = ("revenue margin region quarter customer invoice contract shipment forecast budget review "
         "华东 华南 销售额 利润 合同 发票 客户 预算 季度 报表").split()


def samples(count: int, words: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    text = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    return [{"messages": [{"role": "system", "content": "You are hangjia."},
                          {"role": "user", "content": "Summarise: " + text(words)},
                          {"role": "assistant", "content": text(words // 2)}]} for _ in range(count)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--words", type=int, default=240, help="words per question (~2 tokens each)")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from finetune.recipe import RecipeConfig, recipe_command, tokenize_sample

    work = Path(os.environ.get("OUT", "/tmp")) / "multi"
    work.mkdir(parents=True, exist_ok=True)
    data = samples(args.samples, args.words)
    dataset = work / "train.jsonl"
    dataset.write_text("\n".join(json.dumps(s, ensure_ascii=False) for s in data))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokens = sum(len(e["input_ids"]) for s in data for e in tokenize_sample(tokenizer, s, 2048))
    rows = []
    for gpus in (1, args.gpus):
        run = work / f"gpus-{gpus}"
        run.mkdir(exist_ok=True)
        cfg = RecipeConfig(base_model=args.model, dataset=str(dataset), output_dir=str(run / "adapter"),
                           progress_file=str(run / "progress.jsonl"), lora_r=64, lora_alpha=16, epochs=1,
                           gradient_accumulation=8, learning_rate=2e-4, max_seq_len=2048)
        (run / "run.json").write_text(json.dumps(cfg.__dict__))
        started = time.perf_counter()
        with open(run / "recipe.log", "w") as log:
            done = subprocess.run(recipe_command(run / "run.json", gpus), stdout=log, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - started
        events = [json.loads(line) for line in (run / "progress.jsonl").read_text().splitlines()] \
            if (run / "progress.jsonl").exists() else []
        steps = [e for e in events if e["event"] == "step"]
        finished = next((e for e in events if e["event"] == "done"), None)
        if done.returncode or not steps or not finished:
            print((run / "recipe.log").read_text()[-3000:])
            row = dict(gpus=gpus, error=f"exit {done.returncode}")
        else:
            # the first step includes warm-up (kernels, allocator): tokens/s over the steps after it
            later = steps[-1]["elapsed_s"] - steps[0]["elapsed_s"]
            row = dict(gpus=gpus, samples=args.samples, tokens=tokens, steps=len(steps),
                       train_s=steps[-1]["elapsed_s"], tok_s=round(tokens / steps[-1]["elapsed_s"], 1),
                       tok_s_after_first_step=round(tokens * (len(steps) - 1) / len(steps) / later, 1),
                       losses=[s["loss"] for s in steps], wall_s=round(wall, 1),
                       peak_reserved_gib_first_gpu=finished.get("peak_reserved_gib"), mode=events[1].get("mode"))
        rows.append(row)
        print("RESULT", json.dumps(row), flush=True)
        with open(Path(os.environ.get("OUT", "bench/results")) / "gpu_multi.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
    if all("tok_s" in r for r in rows):
        print(f"RESULT speed-up on {args.gpus} GPUs: {rows[1]['tok_s_after_first_step'] / rows[0]['tok_s_after_first_step']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
