"""fp8 in the refresh's backward on a real model: does it train as bf16 does?

The embedded SmolLM2-135M-Instruct (from its PyPI wheel), its base in NF4 (bitsandbytes, double
quantized), LoRA r=64 alpha=16 on q/k/v with dropout 0.05, AdamW at 2e-4, trained on the general
replay samples (finetune/data/general_replay.jsonl: 40 to train, 4 per step, 2 epochs; the other
15 held out), with the recipe's compiled layers, three times from the same LoRA start:

- bf16: backward in bf16;
- fp8: backward's 4-bit products in fp8 (the recipe's fp8_backward);
- bf16, other masks: bf16 with another dropout seed. The compiler draws dropout masks in an order
  that depends on the whole graph, so bf16 and fp8 never share masks; this run is the noise any
  change of masks brings, to compare fp8's difference with.

Prints each step's loss side by side and the held-out loss after training.

    python bench/fp8_numerics.py                # CPU (about 6 minutes on 2 cores) or CUDA
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def train(model_dir: Path, samples: list[dict], held_out: list[dict], steps_per_epoch: int, epochs: int,
          fp8: bool, dropout_seed: int, device: str) -> dict:
    import torch
    import torch._dynamo
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune import training
    from finetune.recipe import tokenize_sample
    from serving.quantization import nf4_config

    torch._dynamo.reset()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                device_map={"": device} if device != "cpu" else None,
                                                quantization_config=nf4_config())
    torch.manual_seed(0)  # the same LoRA start in every run
    model = get_peft_model(base, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05,
                                            target_modules=["q_proj", "k_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.train()
    training.compile_decoder_layers(model, nf4="kernel", down_outside=True, fp8_recompute=fp8, fp8_input_gradients=fp8)
    examples = [e for s in samples for e in tokenize_sample(tokenizer, s, 2048)]
    held = [e for s in held_out for e in tokenize_sample(tokenizer, s, 2048)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16)
    torch.manual_seed(dropout_seed)
    losses, started = [], time.monotonic()
    batch = len(examples) // steps_per_epoch
    for epoch in range(epochs):
        for step in range(steps_per_epoch):
            group = examples[step * batch:(step + 1) * batch]
            with autocast:
                loss = training.packed_loss(model, training.pack(group), device) / len(group)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(round(loss.item(), 4))
    model.eval()
    with torch.no_grad(), autocast:
        held_loss = sum(training.packed_loss(model, training.pack([e]), device).item() for e in held) / len(held)
    return {"fp8": fp8, "dropout_seed": dropout_seed, "losses": losses, "held_out_loss": round(held_loss, 4),
            "seconds": round(time.monotonic() - started, 1)}


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="a model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--steps-per-epoch", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/fp8_numerics.jsonl"))
    args = parser.parse_args()
    model_dir = args.model
    if model_dir is None:
        from webapp.models import ensure_embedded_model

        model_dir = ensure_embedded_model(Path("/tmp/hangjia-bench-models"))
    rows = [json.loads(line) for line in (ROOT / "finetune/data/general_replay.jsonl").read_text().splitlines()
            if line.strip()]
    samples, held_out = rows[:40], rows[40:]
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    runs = {}
    for name, fp8, seed in (("bf16", False, 1), ("fp8", True, 1), ("bf16, other masks", False, 2)):
        runs[name] = train(model_dir, samples, held_out, args.steps_per_epoch, args.epochs, fp8, seed, device)
        with args.out.open("a") as out:
            out.write(json.dumps({"run": name, "device": device, **runs[name]}) + "\n")
        print(f"{name}: held-out loss {runs[name]['held_out_loss']} ({runs[name]['seconds']} s)", flush=True)
    names = list(runs)
    print("\n| step | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for step, losses in enumerate(zip(*(runs[n]["losses"] for n in names)), start=1):
        print(f"| {step} | " + " | ".join(f"{loss:.4f}" for loss in losses) + " |")
    print("| held out | " + " | ".join(f"{runs[n]['held_out_loss']:.4f}" for n in names) + " |")

    def largest_gap(a, b):
        return max(abs(x - y) for x, y in zip(runs[a]["losses"], runs[b]["losses"]))

    print(f"\nlargest step-loss gap: fp8 vs bf16 {largest_gap('fp8', 'bf16'):.4f}; "
          f"bf16 vs bf16 with other masks {largest_gap(names[2], 'bf16'):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
