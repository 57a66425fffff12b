"""The refresh recipe at Qwen3-14B scale on one GPU: hangjia's levers, one at a time, on the
same data and LoRA settings as the stock recipe (the stock transformers/peft/bitsandbytes
baseline scripts, given to bench/gpu_run.sh as BASELINE: Trainer +
prepare_model_for_kbit_training, batch 1 x accumulation 8, seq 2048, r=64 alpha=16 q/k/v).

    python bench/gpu_train.py --model Qwen/Qwen3-14B            # real weights
    python bench/gpu_train.py --random-weights --ckpt /mnt/q14b  # the architecture, random weights
    TINY=1 python bench/gpu_train.py --random-weights --ckpt /tmp/tiny   # dry run on CPU

Every variant trains 8 samples of --seq random tokens per optimizer step (labels = inputs,
like the stock run), from the same LoRA initialisation, and reports tokens/s over the steps
after --warmup, peak allocated/reserved GiB, and its losses. Speed and memory do not depend
on the weight values. One JSON row per variant is appended to bench/results/gpu_train.jsonl
($OUT/gpu_train.jsonl where OUT is set), and a table is printed last.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

GiB = 1024**3
VARIANTS = {
    # name: samples per forward, checkpointing, loss, embedding on host (and optimizer, below)
    "hangjia": dict(per_forward=2, checkpointing=True, loss="chunked", host_embedding=False),
    "1-per-forward": dict(per_forward=1, checkpointing=True, loss="chunked", host_embedding=False),
    "4-per-forward": dict(per_forward=4, checkpointing=True, loss="chunked", host_embedding=False),
    "full-logits": dict(per_forward=2, checkpointing=True, loss="full", host_embedding=False),
    "liger": dict(per_forward=2, checkpointing=True, loss="liger", host_embedding=False),
    "no-checkpointing": dict(per_forward=1, checkpointing=False, loss="chunked", host_embedding=False),
    "host-embedding": dict(per_forward=4, checkpointing=True, loss="chunked", host_embedding=True),
    # the lean recipe: embedding on the host and 8-bit AdamW states (as the stock run's adamw_8bit);
    # these move the embedding for good, so they run last
    "lean": dict(per_forward=1, checkpointing=True, loss="chunked", host_embedding=True, optimizer="adamw8bit"),
    "lean-4": dict(per_forward=4, checkpointing=True, loss="chunked", host_embedding=True, optimizer="adamw8bit"),
    "lean-8": dict(per_forward=8, checkpointing=True, loss="chunked", host_embedding=True, optimizer="adamw8bit"),
    # the lean recipe with every decoder layer compiled (norms, rotation, activation and LoRA fused);
    # compiling cannot be undone, so these run last. "module": nn.Module.compile() under transformers'
    # own checkpointing (which the compiled layer escapes: nothing is recomputed, memory grows);
    # "outside": finetune.training.compile_decoder_layers, an eager checkpoint around the compiled
    # layer. "autocast": LoRA's products in bf16 (its weights stay fp32),
    # as the stock Trainer's bf16=True does; "sync": "step" reads the loss once per optimizer step
    # instead of after every forward, so the host queues the next forward while the GPU works
    "lean-compiled": dict(per_forward=1, checkpointing=True, loss="chunked", host_embedding=True, optimizer="adamw8bit",
                          compile_layers="module"),
    "lean-compiled-outside": dict(per_forward=1, checkpointing=False, loss="chunked", host_embedding=True,
                                  optimizer="adamw8bit", compile_layers="outside"),
    "lean-compiled-outside-bf16": dict(per_forward=1, checkpointing=False, loss="chunked", host_embedding=True,
                                       optimizer="adamw8bit", compile_layers="outside", autocast=True),
    "lean-compiled-outside-bf16-async": dict(per_forward=1, checkpointing=False, loss="chunked", host_embedding=True,
                                             optimizer="adamw8bit", compile_layers="outside", autocast=True,
                                             sync="step"),
    # ... and the 4-bit layers dequantized by torch operations the compiler fuses, not bitsandbytes' ops
    "lean-compiled-outside-nf4": dict(per_forward=1, checkpointing=False, loss="chunked", host_embedding=True,
                                      optimizer="adamw8bit", compile_layers="outside", autocast=True, sync="step",
                                      nf4="torch"),
    # ... and the frozen down projection after the checkpointed part, so backward does not compute it again
    # (the eager checkpoint's early stop already skips it; a compiled layer is one node to recompute)
    "lean-compiled-outside-nf4-down": dict(per_forward=1, checkpointing=False, loss="chunked", host_embedding=True,
                                           optimizer="adamw8bit", compile_layers="outside", autocast=True,
                                           sync="step", nf4="torch", down_outside=True),
    # ... and one sample per row (padded; no mask, so SDPA's flash kernel) with no host waits for
    # the GPU in building a forward's tensors (the recipe on CUDA now); "rows2": two rows per forward
    "lean-compiled-outside-nf4-rows": dict(per_forward=1, checkpointing=False, loss="chunked", host_embedding=True,
                                           optimizer="adamw8bit", compile_layers="outside", autocast=True,
                                           sync="step", nf4="torch", layout="rows"),
    "lean-compiled-outside-nf4-rows2": dict(per_forward=2, checkpointing=False, loss="chunked", host_embedding=True,
                                            optimizer="adamw8bit", compile_layers="outside", autocast=True,
                                            sync="step", nf4="torch", layout="rows"),
    "lean-compiled-outside-nf4-down-rows": dict(per_forward=1, checkpointing=False, loss="chunked",
                                                host_embedding=True, optimizer="adamw8bit", compile_layers="outside",
                                                autocast=True, sync="step", nf4="torch", down_outside=True,
                                                layout="rows"),
    "lean-compiled-outside-nf4-down-rows2": dict(per_forward=2, checkpointing=False, loss="chunked",
                                                 host_embedding=True, optimizer="adamw8bit",
                                                 compile_layers="outside", autocast=True, sync="step", nf4="torch",
                                                 down_outside=True, layout="rows"),
    # ... and the loss's gradient computed in its forward (no vocabulary projection in backward):
    # the recipe on CUDA without fp8 tensor cores (before compute capability 8.9), or with --no-fp8-backward
    "lean-compiled-outside-nf4-down-rows2-fused": dict(per_forward=2, checkpointing=False, loss="fused",
                                                       host_embedding=True, optimizer="adamw8bit",
                                                       compile_layers="outside", autocast=True, sync="step",
                                                       nf4="torch", down_outside=True, layout="rows"),
    # ... and the 4-bit products' input gradients from fp8 products (the forward and the recompute
    # stay bf16; training._nf4_product): +1.8% (6,738 against 6,616 tok/s in one run)
    "lean-compiled-outside-nf4-down-rows2-fused-fp8grad": dict(per_forward=2, checkpointing=False, loss="fused",
                                                               host_embedding=True, optimizer="adamw8bit",
                                                               compile_layers="outside", autocast=True, sync="step",
                                                               nf4="torch", down_outside=True, layout="rows",
                                                               fp8_input_gradients=True),
    # ... each 4-bit product one operator (nf4.linear_op) that decodes in a Triton kernel at memory
    # speed, instead of the compiler's fused decode (0.097 against 0.272 ms for gate/up, bench/fp8_weights.py)
    "lean-compiled-outside-kernel-down-rows2-fused": dict(per_forward=2, checkpointing=False, loss="fused",
                                                          host_embedding=True, optimizer="adamw8bit",
                                                          compile_layers="outside", autocast=True, sync="step",
                                                          nf4="kernel", down_outside=True, layout="rows"),
    # ... and the checkpoint's recompute in fp8: the operator multiplies in fp8 when autograd runs
    # it, so the forward and the recompute stay one compiled graph
    "lean-compiled-outside-kernel-down-rows2-fused-fp8recompute": dict(
        per_forward=2, checkpointing=False, loss="fused", host_embedding=True, optimizer="adamw8bit",
        compile_layers="outside", autocast=True, sync="step", nf4="kernel", down_outside=True, layout="rows",
        fp8_recompute=True),
    # ... and the input gradients in fp8 too: all of backward's 4-bit products in fp8. The recipe on
    # CUDA with fp8 tensor cores (H100, H200, Ada); the down
    # projection after the checkpoint is the same product (so its input gradient is fp8 too)
    "lean-compiled-outside-kernel-down-rows2-fused-fp8": dict(
        per_forward=2, checkpointing=False, loss="fused", host_embedding=True, optimizer="adamw8bit",
        compile_layers="outside", autocast=True, sync="step", nf4="kernel", down_outside=True, layout="rows",
        fp8_recompute=True, fp8_input_gradients=True),
    # the recipe's 4,096 tokens per forward at 512-token samples: eight rows
    "lean-compiled-outside-nf4-down-rows8-fused": dict(per_forward=8, checkpointing=False, loss="fused",
                                                       host_embedding=True, optimizer="adamw8bit",
                                                       compile_layers="outside", autocast=True, sync="step",
                                                       nf4="torch", down_outside=True, layout="rows"),
}


def qwen3_14b_config(tiny: bool):
    import torch
    from transformers import Qwen3Config

    kw = dict(vocab_size=151936, hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
              num_attention_heads=40, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
              rope_theta=1000000, rms_norm_eps=1e-6, tie_word_embeddings=False, dtype=torch.bfloat16,
              bos_token_id=151643, eos_token_id=151645, use_sliding_window=False, attention_bias=False)
    if tiny:
        kw.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16)
    return Qwen3Config(**kw)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, or --random-weights written to --ckpt: the model every GPU bench runs on."""
    parser.add_argument("--model", help="a local folder or hub id of a Qwen3 model")
    parser.add_argument("--random-weights", action="store_true", help="Qwen3-14B architecture, random weights")
    parser.add_argument("--ckpt", default="/tmp/hangjia-random-ckpt", help="where --random-weights writes its checkpoint")


def model_path(args: argparse.Namespace) -> str:
    """The folder or hub id to load (TINY=1: a tiny random model, a dry run on CPU)."""
    return random_checkpoint(Path(args.ckpt), os.environ.get("TINY") == "1") if args.random_weights else args.model


def random_checkpoint(folder: Path, tiny: bool) -> str:
    """A Qwen3-14B-shaped checkpoint with transformers' own random init (written once)."""
    import torch
    from transformers import AutoModelForCausalLM

    target = folder / ("tiny" if tiny else "qwen3-14b-random")
    if (target / "COMPLETE").exists():
        return str(target)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(qwen3_14b_config(tiny), dtype=torch.bfloat16)
    model.save_pretrained(target, max_shard_size="5GB")
    (target / "COMPLETE").write_text("ok\n")
    del model
    return str(target)


def load_4bit(model_path: str):
    import torch
    from transformers import AutoModelForCausalLM

    from serving.quantization import nf4_config

    cuda = torch.cuda.is_available()
    return AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.bfloat16, attn_implementation="sdpa", device_map={"": 0} if cuda else None,
        quantization_config=nf4_config())


def memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"alloc_gib": round(torch.cuda.memory_allocated() / GiB, 3),
            "max_alloc_gib": round(torch.cuda.max_memory_allocated() / GiB, 3),
            "max_reserved_gib": round(torch.cuda.max_memory_reserved() / GiB, 3)}


def full_logits_loss(hidden, head, labels, weights):
    """What transformers does: every logit of the row at once, in fp32."""
    import torch

    logits = head(hidden).float()
    return (torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="none") * weights).sum()


def liger_loss(hidden, head, labels, weights):
    """liger-kernel's fused linear cross-entropy. Every sample here has the same number of
    learned tokens, so the per-token mean times the samples is the sum of per-sample means."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    samples = round(float(weights.sum()))
    return LigerFusedLinearCrossEntropyLoss(reduction="mean")(head.weight, hidden, labels) * samples


def micro_batch_loss(model, group, spec: dict, device):
    """One forward over the group's samples, packed in a row (or one per row with
    layout="rows", as the recipe on CUDA); the sum of their mean losses."""
    from finetune.training import pack, packed_loss, rows_loss

    fused = spec["loss"] == "fused"  # the loss's gradient in its forward (training.fused_lm_loss)
    if spec.get("layout") == "rows":
        return rows_loss(model, group, device, fused=fused)
    loss = {"chunked": None, "fused": None, "full": full_logits_loss, "liger": liger_loss}[spec["loss"]]
    return packed_loss(model, pack(group), device, loss=loss, fused=fused)


def run_variant(model, name: str, spec: dict, data, initial_lora: dict, steps: int, warmup: int, device) -> dict:
    import torch

    from finetune.training import keep_embedding_on_host

    base = model.get_base_model()
    if spec["checkpointing"]:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()
    freed = keep_embedding_on_host(model, device) if spec["host_embedding"] else 0
    if spec.get("compile_layers") == "module":
        for layer in base.model.layers:
            layer.compile()
    elif spec.get("compile_layers") == "outside":
        from finetune.training import compile_decoder_layers

        compile_decoder_layers(model, nf4=spec.get("nf4", "bitsandbytes"),
                               down_outside=spec.get("down_outside", False),
                               fp8_input_gradients=spec.get("fp8_input_gradients", False),
                               fp8_recompute=spec.get("fp8_recompute", False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in initial_lora:
                p.copy_(initial_lora[n])
    trainable = [p for p in model.parameters() if p.requires_grad]
    cuda = device.type == "cuda"
    if spec.get("optimizer") == "adamw8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(trainable, lr=2e-4, weight_decay=0.0)

    else:
        optimizer = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.0, fused=cuda)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    per_step = 8

    def train_step(samples) -> float:
        from torch.profiler import record_function

        total = 0.0
        for first in range(0, per_step, spec["per_forward"]):
            group = samples[first:first + spec["per_forward"]]
            with record_function("forward and loss"), torch.autocast(device.type, dtype=torch.bfloat16,
                                                                      enabled=spec.get("autocast", False)):
                loss = micro_batch_loss(model, group, spec, device) / per_step
            with record_function("backward"):
                loss.backward()
            total += loss.detach() if spec.get("sync") == "step" else loss.item()
        with record_function("read the loss"):
            total = float(total)
        with record_function("clip and optimizer step"):
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return total

    losses, times = [], []
    started = None
    try:
        for step in range(warmup + steps):
            if step == warmup:
                if cuda:
                    torch.cuda.synchronize()
                started = time.perf_counter()
            losses.append(round(train_step(data[step * per_step:(step + 1) * per_step]), 4))
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())
    except torch.OutOfMemoryError as exc:
        return {"variant": name, **spec, "error": f"out of memory: {str(exc)[:200]}", **memory()}
    elapsed = times[-1] - started
    tokens = steps * per_step * len(data[0]["input_ids"])
    by_kind = gaps = syncs = None
    if os.environ.get("PROFILE_TRAIN") and cuda:
        by_kind = profile_step(model, spec, data[:per_step], device)
        gaps = gap_profile(train_step, data[:per_step])
        syncs = sync_sites(train_step, data[:per_step])
    dynamo = {}
    if spec.get("compile_layers"):  # a graph break or a recompile limit would quietly run layers eagerly
        from torch._dynamo.utils import counters

        dynamo = {"dynamo": {"unique_graphs": counters["stats"]["unique_graphs"],
                             "graph_breaks": sum(counters["graph_break"].values())}}
    return {"variant": name, **spec, "tok_s": round(tokens / elapsed, 1), "s_per_step": round(elapsed / steps, 3),
            "losses": losses, "embedding_freed_gib": round(freed / GiB, 3), **memory(),
            **({"profile": by_kind} if by_kind else {}), **({"host_gaps": gaps} if gaps else {}),
            **({"sync_sites": syncs} if syncs is not None else {}), **dynamo}


def gap_profile(train_step, samples) -> dict:
    """One whole step (forwards, backwards, the update) under the profiler with CPU
    activities: where the GPU waited for the host (gpu_profile.host_gaps)."""
    import torch
    from gpu_profile import host_gaps
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        train_step(samples)
        torch.cuda.synchronize()
    return host_gaps(prof.profiler.kineto_results.events())


def sync_sites(train_step, samples) -> list:
    """One step with torch's sync debug mode: the Python lines whose operation made the host
    wait for the GPU (those on the autograd thread have no Python line and are not seen)."""
    import collections
    import warnings

    import torch

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_step(samples)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    sites = collections.Counter(f"{Path(w.filename).name}:{w.lineno} {str(w.message)[:40]}" for w in caught
                                if "synchroniz" in str(w.message))
    return sites.most_common(15)


def profile_step(model, spec: dict, samples, device) -> dict:
    """One optimizer step's forwards and backwards (no update) under the profiler: GPU time
    per kind of kernel, and the largest kernels."""
    import collections

    import torch
    from gpu_profile import kind_of
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for first in range(0, len(samples), spec["per_forward"]):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.get("autocast", False)):
                loss = micro_batch_loss(model, samples[first:first + spec["per_forward"]], spec, device)
            loss.backward()
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    totals: dict[str, float] = collections.defaultdict(float)
    events = prof.key_averages()
    for event in events:
        totals[kind_of(event.key)] += (getattr(event, "self_device_time_total", 0) or 0) / 1000
    top = sorted(events, key=lambda e: -(getattr(e, "self_device_time_total", 0) or 0))[:40]
    return {"gpu_ms_per_step": round(sum(totals.values()), 1),
            "by_kind_ms": {k: round(v, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
            "top_kernels": [(e.key[:70], round((getattr(e, "self_device_time_total", 0) or 0) / 1000, 1), e.count)
                            for e in top]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--variants", default="hangjia,1-per-forward,4-per-forward,full-logits,liger,no-checkpointing,host-embedding")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj")
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    from finetune.training import prepare_for_lora_training

    if os.environ.get("INDUCTOR_COMBO_KERNELS") == "1":  # independent small kernels launched as one
        import torch._inductor.config

        torch._inductor.config.combo_kernels = True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    model = load_4bit(model_path(args))
    load_s = time.perf_counter() - started
    after_load = memory()
    prepare_for_lora_training(model, checkpointing=True)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.05,
                                             target_modules=args.targets.split(","), bias="none",
                                             task_type="CAUSAL_LM"))
    model.train()
    initial_lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    generator = torch.Generator().manual_seed(0)  # the stock run's data: random ids, labels = ids
    ids = torch.randint(0, 151643, ((args.steps + args.warmup) * 8, args.seq), generator=generator)
    data = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]

    # the chunked loss is transformers' loss: checked on the first sample before anything trains
    with torch.no_grad():
        reference = model(input_ids=ids[:1].to(device), labels=ids[:1].to(device)).loss.item()
        from finetune.training import pack, packed_loss

        ours = packed_loss(model, pack(data[:1]), device).item()
    out = Path(os.environ.get("OUT", "bench/results")) / "gpu_train.jsonl"
    rows = []
    with open(out, "a") as fh:
        fh.write(json.dumps({"setup": True, "load_s": round(load_s, 1), "after_load": after_load,
                             "loss_transformers": reference, "loss_chunked": ours,
                             "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if device.type == "cuda"
                             else "cpu"}) + "\n")
        print(f"load {load_s:.1f} s, {after_load}; first-sample loss transformers {reference:.4f} vs chunked {ours:.4f}",
              flush=True)
        for name in args.variants.split(","):
            spec = VARIANTS[name]
            if spec["loss"] == "liger":
                try:
                    import liger_kernel  # noqa: F401
                except ImportError:
                    continue
            try:
                row = run_variant(model, name, spec, data, initial_lora, args.steps, args.warmup, device)
            except Exception as exc:  # keep measuring the other variants
                import traceback

                traceback.print_exc()
                row = {"variant": name, **spec, "error": f"{type(exc).__name__}: {str(exc)[:300]}", **memory()}
                model.zero_grad(set_to_none=True)
            row["inductor_env"] = {k: os.environ[k] for k in ("INDUCTOR_COMBO_KERNELS", "TORCHINDUCTOR_MAX_AUTOTUNE_GEMM")
                                   if k in os.environ}
            rows.append(row)
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            print("RESULT", json.dumps(row), flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"\n| variant ({args.seq}-token samples, 8 per step) | tok/s | s/step | peak alloc GiB | peak reserved GiB "
          f"| mean loss |\n|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['variant']} | {row['error'][:60]} | | {row.get('max_alloc_gib')} | {row.get('max_reserved_gib')} | |")
            continue
        mean = sum(row["losses"]) / len(row["losses"])
        print(f"| {row['variant']} | {row['tok_s']:,.0f} | {row['s_per_step']} | {row.get('max_alloc_gib')} | "
              f"{row.get('max_reserved_gib')} | {mean:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
