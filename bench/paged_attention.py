"""One layer's decode attention at Qwen3-14B's shapes (40 query heads, 8 kv heads, head dim 128,
bf16) over 128-token pages: hangjia's Triton kernels (serving/paged_attention.py) against the
reference that gathers the pages and runs scaled_dot_product_attention, and against SDPA over a
contiguous cache (the fixed-slot layout: every row as long as the longest).

    python bench/paged_attention.py          # on a GPU
    python bench/paged_attention.py --cpu    # a dry run of the reference on CPU

Cases: 8 rows of 768 positions (8 users chatting), and 7 of 768 beside one of 32,768. Each is
checked against the reference (largest difference) and timed as the median of CUDA-event timed
repeats, called from Python and replayed in a CUDA graph (as the engine runs a decode step). Rows go to bench/results/paged_attention.jsonl ($OUT/... where OUT is set).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()

    import torch
    from provenance import append, commit, cpu_device, gpu_device

    from serving.paged_attention import reference_paged_attention, triton_paged_attention

    code = commit()
    cuda = torch.cuda.is_available() and not args.cpu
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    heads, kv_heads, dim, size = 40, 8, 128, 128
    out = Path(os.environ.get("OUT", Path(__file__).resolve().parent / "results")) / "paged_attention.jsonl"
    cases = {"8 rows x 768": [768] * 8, "7 rows x 768 + 1 x 32768": [768] * 7 + [32768]}
    if not cuda:
        cases = {"4 rows x 96": [96] * 4, "3 rows x 96 + 1 x 1024": [96] * 3 + [1024]}

    def timed(fn) -> float:
        """Median ms of one call."""
        if not cuda:
            import time

            times = []
            for _ in range(5):
                started = time.perf_counter()
                fn()
                times.append(1000 * (time.perf_counter() - started))
            return statistics.median(times)
        for _ in range(3):
            fn()
        times = []
        for _ in range(args.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    for label, lengths in cases.items():
        generator = torch.Generator().manual_seed(5)
        width = -(-max(lengths) // size)
        pages = sum(-(-n // size) for n in lengths) + 1
        keys = torch.randn(pages, kv_heads, size, dim, generator=generator).to(device, dtype)
        values = torch.randn(pages, kv_heads, size, dim, generator=generator).to(device, dtype)
        order = (torch.randperm(pages - 1, generator=generator) + 1).tolist()
        table = torch.zeros(len(lengths), width, dtype=torch.int32)
        for row, n in enumerate(lengths):
            mine = [order.pop() for _ in range(-(-n // size))]
            table[row, :len(mine)] = torch.tensor(mine)
        table = table.to(device)
        q = torch.randn(len(lengths), heads, dim, generator=generator).to(device, dtype)
        lengths_t = torch.tensor(lengths, device=device)
        expected = reference_paged_attention(q.float(), keys.float(), values.float(), table, lengths_t)
        # the fixed-slot layout: each row's positions contiguous, every row as long as the longest
        contiguous_k = keys[table.long()].transpose(1, 2).reshape(len(lengths), kv_heads, width * size, dim)
        contiguous_v = values[table.long()].transpose(1, 2).reshape(len(lengths), kv_heads, width * size, dim)
        visible = (torch.arange(width * size, device=device)[None, :] < lengths_t[:, None])[:, None, None, :]
        grouped = q.reshape(len(lengths), kv_heads, heads // kv_heads, dim)

        def fixed_slots():
            return torch.nn.functional.scaled_dot_product_attention(grouped, contiguous_k, contiguous_v,
                                                                    attn_mask=visible)

        variants = {"reference: pages gathered + SDPA": lambda: reference_paged_attention(q, keys, values, table,
                                                                                          lengths_t),
                    "fixed slots: SDPA over a contiguous cache": fixed_slots}
        if cuda:
            variants = {"hangjia: Triton paged kernels": lambda: triton_paged_attention(q, keys, values, table,
                                                                                        lengths_t), **variants}
        for name, fn in variants.items():
            got = fn().reshape(len(lengths), heads, dim).float()
            row = dict(variant=name, case=label, rows=len(lengths), positions=sum(lengths),
                       ms_per_layer=round(timed(fn), 4), max_abs_diff=round(float((got - expected).abs().max()), 5))
            if cuda:  # as the engine runs it: replayed in a CUDA graph, no Python launch per kernel
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    fn()
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                row["ms_per_layer_in_a_graph"] = round(timed(graph.replay), 4)
            append(out, "bench/paged_attention.py", gpu_device() if cuda else cpu_device(), code, **row)
            print("RESULT", row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
