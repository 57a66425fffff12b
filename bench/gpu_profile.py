"""Where a decode step's GPU time goes, at Qwen3-14B scale in 4 bits: hangjia's decoder
(fused NF4 layers, two LoRA adapters) profiled over eager steps at batch 1 and 8, with the
tensor-core NF4 kernel and with bitsandbytes', kernel time summed per kind. A CUDA graph
replays the same kernels without the launch gaps, so these sums are what the graphed step costs.

    python bench/gpu_profile.py --model Qwen/Qwen3-14B
    python bench/gpu_profile.py --random-weights --ckpt /mnt/q14b
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_train import add_model_arguments, model_path  # noqa: E402 (bench/ on the path first)

KINDS = (  # first match wins: kernel name fragment -> kind
    ("nf4_small_m", "4-bit product (hangjia's tensor-core kernel)"),
    ("gemv_4bit", "4-bit GEMV (bitsandbytes)"), ("kgemm_4bit", "4-bit GEMV (bitsandbytes)"),
    ("dequantize", "4-bit dequantize (bitsandbytes)"), ("flash", "attention"), ("fmha", "attention"),
    ("attention", "attention"), ("gemm", "bf16 GEMM (LoRA, head, dequantized weights)"),
    ("gemv", "bf16 GEMM (LoRA, head, dequantized weights)"), ("cutlass", "bf16 GEMM (LoRA, head, dequantized weights)"),
    ("nvjet", "bf16 GEMM (LoRA, head, dequantized weights)"),
    ("index", "KV cache writes / indexing"), ("scatter", "KV cache writes / indexing"),
    ("reduce", "norms and reductions"), ("triton", "compiled norms/rope"),
)


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for fragment, kind in KINDS if fragment in lowered), "other elementwise")


def _on_gpu(event) -> bool:
    return str(event.device_type()).endswith("CUDA")


def _innermost(intervals: list, starts: list[int], t: int):
    """The innermost of nested (start, end, name) intervals containing t: the latest start."""
    import bisect

    for index in range(bisect.bisect_right(starts, t) - 1, max(-1, bisect.bisect_right(starts, t) - 4000), -1):
        if intervals[index][1] >= t:
            return intervals[index][2]
    return None


def host_gaps(events, min_gap_us: float = 20.0, top: int = 12) -> dict:
    """Where the GPU waited, from a profile with CPU and CUDA activities (kineto events:
    `prof.profiler.kineto_results.events()`). A gap is time between one GPU operation's end
    and the next one's start. It is the host's when the next one was launched after the gap
    began (the GPU had nothing queued); each such gap is put on the innermost CPU operation
    that launched it and the innermost record_function label around that moment. Host time
    blocked in synchronizing calls is summed the same way."""
    gpu = sorted((e for e in events if _on_gpu(e) and e.duration_ns() > 0 and not e.is_user_annotation()),
                 key=lambda e: e.start_ns())
    if not gpu:
        return {}
    runtime = {e.correlation_id(): e for e in events
               if not _on_gpu(e) and e.correlation_id() and e.name().startswith(("cuda", "cu"))}
    per_thread: dict[int, list] = collections.defaultdict(list)
    labels = []
    for e in events:
        if _on_gpu(e) or e.name().startswith(("cuda", "cu")):
            continue
        interval = (e.start_ns(), e.end_ns(), e.name())
        (labels if e.is_user_annotation() else per_thread[e.start_thread_id()]).append(interval)
    for intervals in per_thread.values():
        intervals.sort()
    labels.sort()
    starts = {thread: [i[0] for i in intervals] for thread, intervals in per_thread.items()}
    label_starts = [i[0] for i in labels]

    def site(launch) -> tuple[str, str]:
        thread = launch.start_thread_id()
        op = _innermost(per_thread.get(thread, []), starts.get(thread, []), launch.start_ns()) or launch.name()
        return _innermost(labels, label_starts, launch.start_ns()) or "-", op[:60]

    by_site: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0, 0.0])
    largest = []
    busy_end = gpu[0].start_ns()
    total = host = 0.0
    for event in gpu:
        gap_us = (event.start_ns() - busy_end) / 1000
        if gap_us >= min_gap_us:
            total += gap_us
            launch = runtime.get(event.correlation_id()) or runtime.get(event.linked_correlation_id())
            if launch is not None and launch.start_ns() > busy_end:  # nothing was queued: the host's
                host += gap_us
                where = site(launch)
                by_site[where][0] += 1
                by_site[where][1] += gap_us
                largest.append((round(gap_us), *where, event.name()[:50]))
        busy_end = max(busy_end, event.end_ns())
    syncs: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for launch in runtime.values():
        if "Synchronize" in launch.name() or launch.name() in ("cudaMemcpy", "cudaStreamWaitEvent"):
            where = site(launch)
            syncs[where][0] += 1
            syncs[where][1] += launch.duration_ns() / 1000
    ranked = sorted(by_site.items(), key=lambda kv: -kv[1][1])[:top]
    return {"gpu_span_ms": round((busy_end - gpu[0].start_ns()) / 1e6, 1), "gaps_ms": round(total / 1000, 1),
            "host_gaps_ms": round(host / 1000, 1),
            "host_gaps_by_site": [{"label": k[0], "op": k[1], "gaps": n, "ms": round(us / 1000, 2)}
                                  for k, (n, us) in ranked],
            "largest_host_gaps_us": sorted(largest, reverse=True)[:top],
            "syncs": [{"label": k[0], "op": k[1], "calls": n, "ms": round(us / 1000, 2)}
                      for k, (n, us) in sorted(syncs.items(), key=lambda kv: -kv[1][1])[:top]]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    import torch
    from gpu_serve import add_adapters, on_bitsandbytes
    from gpu_train import load_4bit
    from torch.profiler import ProfilerActivity, profile

    from serving.decoding import StaticDecoder

    model = add_adapters(load_4bit(model_path(args)), 64)
    out = Path(os.environ.get("OUT", "bench/results")) / "gpu_profile.jsonl"
    for nf4_kernel, batch in (("mma", 1), ("mma", 8), ("bitsandbytes", 1), ("bitsandbytes", 8)):
        decoder = StaticDecoder(model, max_batch=8, max_len=1024)
        decoder.use_graphs = False  # each kernel of a step seen by the profiler, not one graph replay
        if nf4_kernel == "bitsandbytes":
            on_bitsandbytes(decoder)
        for row in range(batch):
            decoder.set_row_adapter(row, ["finance", "hr", None][row % 3])
        tokens, positions = [11] * batch, [600 + row for row in range(batch)]
        for _ in range(3):
            decoder.decode(tokens, positions)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                decoder.decode(tokens, positions)
            torch.cuda.synchronize()
        totals: dict[str, float] = collections.defaultdict(float)
        kernels = 0
        for event in prof.key_averages():
            cuda_us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
            if cuda_us:
                totals[kind_of(event.key)] += cuda_us / args.steps / 1000
                kernels += event.count
        row = {"batch": batch, "nf4_kernel": nf4_kernel, "kernels_per_step": round(kernels / args.steps),
               "gpu_ms_per_step": round(sum(totals.values()), 2),
               "by_kind_ms": {k: round(v, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
               "top_kernels": [(e.key[:80], round((getattr(e, "self_device_time_total", 0) or 0) / args.steps / 1000, 3))
                               for e in sorted(prof.key_averages(),
                                               key=lambda e: -(getattr(e, "self_device_time_total", 0) or 0))[:8]]}
        print("RESULT", json.dumps(row), flush=True)
        with open(out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        del decoder
    return 0


if __name__ == "__main__":
    sys.exit(main())
