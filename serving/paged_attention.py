"""A decode step's attention over a paged KV cache: each row's one new query token against the
pages its own table lists, up to its own length.

On CUDA two Triton kernels do it, as flash-decoding does: the first splits each row's pages
into SPLITS ranges and scores each range on its own (a running max, sum and weighted values per
range), the second joins a row's ranges under their highest score. A step then reads only the
pages its rows have written, with no padding up to the longest row and no copy of the pages,
in two kernels per layer (each (row, page) pair scored in plain PyTorch took ~20 small kernels a
layer: 10.1 ms per decode step for one user, 12.9 for eight, on an H100).
Elsewhere (CPU) the pages are gathered and attended with scaled_dot_product_attention: the
reference the kernels are checked against (bench/paged_attention.py, tests/test_paged_attention.py);
rows that share a prompt start's pages read them once (cpu_paged_attention).
"""

from __future__ import annotations

import torch

SPLITS = 16  # page ranges per row and kv head: a 32k-token row is read by 16 x kv_heads programs


def paged_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor,
                    lengths: torch.Tensor) -> torch.Tensor:
    """q: (rows, heads, dim), one token per row; keys/values: (pages, kv heads, page size, dim);
    table: (rows, width) int32, each row's pages in order; lengths: (rows,) how many positions
    each row sees (its token's position + 1). Returns (rows, heads, dim) in q's dtype."""
    if q.is_cuda:
        return triton_paged_attention(q, keys, values, table, lengths)
    return cpu_paged_attention(q, keys, values, table, lengths)


# A shared start shorter than this many pages is read per row: the join would not pay.
MIN_SHARED_PAGES = 2


def cpu_paged_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor,
                        lengths: torch.Tensor) -> torch.Tensor:
    """On CPU, rows whose tables start with the same pages (a prompt start the decoder shares
    among them: a department's system prompt and tool schemas) read those pages once, as one
    product for all their queries, and then their own pages; the two parts are joined under
    their highest score, as flash-decoding joins its splits. Gathering every row's copy of a
    1,100-token start was 46% of a 16-row step on 2 cores, attending over it 17% more. Other
    rows: the reference."""
    rows, size = q.shape[0], keys.shape[2]
    if rows < 2:
        return reference_paged_attention(q, keys, values, table, lengths)
    pages, seen = table.tolist(), lengths.tolist()
    # by their first MIN_SHARED_PAGES pages; a row too short to share that many before its own
    # token (an idle row, a parked slot's) is read alone and cuts no group short
    by_start: dict[tuple[int, ...], list[int]] = {}
    alone: list[int] = []
    for row in range(rows):
        if (seen[row] - 1) // size < MIN_SHARED_PAGES:
            alone.append(row)
        else:
            by_start.setdefault(tuple(pages[row][:MIN_SHARED_PAGES]), []).append(row)
    out = torch.empty_like(q)
    for members in by_start.values():
        shared = 0
        if len(members) > 1:  # full pages before every member's own token: never written again
            limit, first = (min(seen[row] for row in members) - 1) // size, pages[members[0]]
            while shared < limit and all(pages[row][shared] == first[shared] for row in members):
                shared += 1
        if shared < MIN_SHARED_PAGES:
            alone.extend(members)
            continue
        out[members] = _shared_start_attention(q[members], keys, values, table[members], lengths[members], shared)
    if alone:
        out[alone] = reference_paged_attention(q[alone], keys, values, table[alone], lengths[alone])
    return out


def _shared_start_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor,
                            lengths: torch.Tensor, shared: int) -> torch.Tensor:
    """Rows whose first `shared` pages are the same pages: those read once for all of them."""
    rows, heads, dim = q.shape
    kv_heads, size = keys.shape[1], keys.shape[2]
    groups, scale = heads // kv_heads, dim ** -0.5
    queries = q.float().reshape(rows, kv_heads, groups, dim)

    def part(scores: torch.Tensor, pool_values: torch.Tensor):  # softmax pieces: peak, sum, weighted values
        peak = scores.amax(-1, keepdim=True)
        weights = torch.exp(scores - peak)
        return peak, weights.sum(-1, keepdim=True), torch.matmul(weights, pool_values)

    # the shared start: (kv heads, rows x groups, dim) against (kv heads, its positions, dim)
    start = table[0, :shared].long()
    shared_keys, shared_values = gathered_pages(keys, start).float(), gathered_pages(values, start).float()
    stacked = queries.transpose(0, 1).reshape(kv_heads, rows * groups, dim)
    peak1, sum1, out1 = (t.reshape(kv_heads, rows, groups, -1).transpose(0, 1)
                         for t in part(torch.matmul(stacked, shared_keys.transpose(1, 2)) * scale, shared_values))
    # each row's own pages after it, up to its length (its own token among them: never empty)
    count = -(-int(lengths.max()) // size) - shared
    own = table[:, shared:shared + count].long()
    own_keys, own_values = gathered_pages(keys, own).float(), gathered_pages(values, own).float()
    scores = torch.matmul(queries, own_keys.transpose(2, 3)) * scale
    visible = shared * size + torch.arange(count * size, device=q.device)[None, :] < lengths[:, None]
    peak2, sum2, out2 = part(scores.masked_fill(~visible[:, None, None, :], float("-inf")), own_values)
    peak = torch.maximum(peak1, peak2)
    first, second = torch.exp(peak1 - peak), torch.exp(peak2 - peak)
    out = (out1 * first + out2 * second) / (sum1 * first + sum2 * second)
    return out.reshape(rows, heads, dim).to(q.dtype)


def gathered_pages(pool: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The pages `chosen` (..., pages) of a pool (pages, kv heads, page size, dim), end to end
    per kv head: (..., kv heads, pages x page size, dim). index_select, not pool[chosen]: on
    CPU the advanced index took 3x as long for a decode step's pages."""
    picked = pool.index_select(0, chosen.reshape(-1)).view(*chosen.shape, *pool.shape[1:]).transpose(-4, -3)
    return picked.reshape(*picked.shape[:-3], -1, picked.shape[-1])


def reference_paged_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor,
                              lengths: torch.Tensor) -> torch.Tensor:
    rows, heads, dim = q.shape
    kv_heads, size = keys.shape[1], keys.shape[2]
    pages = -(-int(lengths.max()) // size)
    chosen = table[:, :pages].long()
    visible = torch.arange(pages * size, device=q.device)[None, :] < lengths[:, None]
    # grouped-query attention without copying keys: a kv head's query heads take the place of the query length
    out = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(rows, kv_heads, heads // kv_heads, dim), gathered_pages(keys, chosen), gathered_pages(values, chosen),
        attn_mask=visible[:, None, None, :])
    return out.reshape(rows, heads, dim)


def triton_paged_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor,
                           lengths: torch.Tensor) -> torch.Tensor:
    import triton

    split_kernel, join_kernel = _kernels()
    rows, heads, dim = q.shape
    kv_heads, size = keys.shape[1], keys.shape[2]
    groups = heads // kv_heads
    padded_groups, padded_dim = max(16, triton.next_power_of_2(groups)), max(16, triton.next_power_of_2(dim))
    if keys.stride(3) != 1 or q.stride(2) != 1 or size < 16 or size & (size - 1):
        raise ValueError("paged attention on CUDA takes pages of 16, 32, 64, ... tokens with contiguous heads")
    peaks = torch.empty(rows, kv_heads, SPLITS, padded_groups, dtype=torch.float32, device=q.device)
    sums = torch.empty_like(peaks)
    partial = torch.empty(rows, kv_heads, SPLITS, padded_groups, padded_dim, dtype=torch.float32, device=q.device)
    out = torch.empty(rows, heads, dim, dtype=q.dtype, device=q.device)
    split_kernel[(rows, kv_heads, SPLITS)](
        q, keys, values, table, lengths, peaks, sums, partial,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2), table.stride(0), dim ** -0.5,
        G=groups, GP=padded_groups, P=size, D=dim, DP=padded_dim, SPLITS=SPLITS, IEEE=q.dtype == torch.float32)
    join_kernel[(rows, kv_heads)](
        peaks, sums, partial, out, out.stride(0), out.stride(1),
        G=groups, GP=padded_groups, D=dim, DP=padded_dim, SPLITS=SPLITS)
    return out


_KERNELS = None


def _kernels():
    """The two kernels, defined on first use: Triton is imported only where a GPU serves."""
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def split_kernel(q_ptr, k_ptr, v_ptr, table_ptr, length_ptr, peak_ptr, sum_ptr, partial_ptr,
                     q_row, q_head, k_page, k_head, k_pos, table_row, scale,
                     G: tl.constexpr, GP: tl.constexpr, P: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                     SPLITS: tl.constexpr, IEEE: tl.constexpr):
        row, head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        length = tl.load(length_ptr + row).to(tl.int64)
        pages = (length + P - 1) // P
        per = (pages + SPLITS - 1) // SPLITS
        first = split * per
        last = tl.minimum(first + per, pages)
        g, d, t = tl.arange(0, GP), tl.arange(0, DP), tl.arange(0, P)
        d_ok = d < D
        q = tl.load(q_ptr + row * q_row + (head * G + g)[:, None] * q_head + d[None, :],
                    mask=(g < G)[:, None] & d_ok[None, :], other=0.0)
        peak = tl.full([GP], float("-inf"), tl.float32)
        total = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DP], tl.float32)
        for i in range(first, last):
            page = tl.load(table_ptr + row * table_row + i).to(tl.int64)
            base = page * k_page + head * k_head + t[:, None] * k_pos + d[None, :]
            k = tl.load(k_ptr + base, mask=d_ok[None, :], other=0.0)
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                scores = tl.dot(q, tl.trans(k)) * scale
            scores = tl.where((i * P + t < length)[None, :], scores, float("-inf"))
            new_peak = tl.maximum(peak, tl.max(scores, 1))
            rescale = tl.exp(peak - new_peak)
            weights = tl.exp(scores - new_peak[:, None])
            total = total * rescale + tl.sum(weights, 1)
            v = tl.load(v_ptr + base, mask=d_ok[None, :], other=0.0)
            if IEEE:
                acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v)
            peak = new_peak
        slot = (row * tl.num_programs(1) + head) * SPLITS + split
        tl.store(peak_ptr + slot * GP + g, peak)
        tl.store(sum_ptr + slot * GP + g, total)
        tl.store(partial_ptr + (slot * GP + g)[:, None] * DP + d[None, :], acc)

    @triton.jit
    def join_kernel(peak_ptr, sum_ptr, partial_ptr, out_ptr, out_row, out_head,
                    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, SPLITS: tl.constexpr):
        row, head = tl.program_id(0), tl.program_id(1)
        g, d, s = tl.arange(0, GP), tl.arange(0, DP), tl.arange(0, SPLITS)
        first = (row * tl.num_programs(1) + head) * SPLITS
        peaks = tl.load(peak_ptr + (first + s)[:, None] * GP + g[None, :])  # ranges with no pages: -inf
        top = tl.max(peaks, 0)
        total = tl.sum(tl.load(sum_ptr + (first + s)[:, None] * GP + g[None, :]) * tl.exp(peaks - top[None, :]), 0)
        acc = tl.zeros([GP, DP], tl.float32)
        for j in tl.static_range(SPLITS):
            weight = tl.exp(tl.load(peak_ptr + (first + j) * GP + g) - top)
            acc += tl.load(partial_ptr + ((first + j) * GP + g)[:, None] * DP + d[None, :]) * weight[:, None]
        out = acc / total[:, None]
        tl.store(out_ptr + row * out_row + (head * G + g)[:, None] * out_head + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=(g < G)[:, None] & (d < D)[None, :])

    _KERNELS = split_kernel, join_kernel
    return _KERNELS
