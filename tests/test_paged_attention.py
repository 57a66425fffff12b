"""A decode step's attention over pages (serving/paged_attention.py): each row sees its own pages,
in its table's order, up to its own length, and nothing of the other rows'."""

import importlib.util
import os

import pytest
import torch

from serving.paged_attention import cpu_paged_attention, reference_paged_attention, triton_paged_attention


def case(dtype=torch.float32, device="cpu", size=16, dim=16, heads=8, kv_heads=2, lengths=(1, 17, 100, 48)):
    """Rows of different lengths whose pages are scattered over the pool in shuffled order."""
    generator = torch.Generator().manual_seed(3)
    width = -(-max(lengths) // size)
    pool = 1 + len(lengths) * width
    keys = torch.randn(pool, kv_heads, size, dim, generator=generator).to(device, dtype)
    values = torch.randn(pool, kv_heads, size, dim, generator=generator).to(device, dtype)
    order = torch.randperm(pool - 1, generator=generator) + 1
    table = order[:len(lengths) * width].view(len(lengths), width).to(device, torch.int32)
    q = torch.randn(len(lengths), heads, dim, generator=generator).to(device, dtype)
    return q, keys, values, table, torch.tensor(lengths, device=device)


def one_by_one(q, keys, values, table, lengths):
    """Each row's own keys laid end to end, attended with a plain softmax."""
    rows, heads, dim = q.shape
    kv_heads, size = keys.shape[1], keys.shape[2]
    out = []
    for row in range(rows):
        n = int(lengths[row])
        pages = table[row, :-(-n // size)].long()
        k = keys[pages].transpose(0, 1).reshape(kv_heads, -1, dim)[:, :n].repeat_interleave(heads // kv_heads, 0)
        v = values[pages].transpose(0, 1).reshape(kv_heads, -1, dim)[:, :n].repeat_interleave(heads // kv_heads, 0)
        weights = torch.softmax((q[row][:, None, :] @ k.transpose(1, 2)).squeeze(1) / dim ** 0.5, -1)
        out.append((weights[:, None, :] @ v).squeeze(1))
    return torch.stack(out)


def test_each_row_attends_over_its_own_pages_up_to_its_length():
    q, keys, values, table, lengths = case()
    expected = one_by_one(q, keys, values, table, lengths)
    torch.testing.assert_close(reference_paged_attention(q, keys, values, table, lengths), expected)
    # the other rows' pages and the positions past a row's length change nothing of it
    keys[table[0, 1:].long()] = 1e4
    values[table[0, 1:].long()] = 1e4
    torch.testing.assert_close(reference_paged_attention(q, keys, values, table, lengths)[0], expected[0])


def test_rows_sharing_a_prompt_starts_pages_read_them_once_and_attend_as_each_row_alone(monkeypatch):
    """Rows 0, 1, 3 list the same first three pages (a shared system prompt; row 1's own token
    right after them), row 2 the same first page only, row 4 is idle (page 0, one position),
    row 5 its own pages: on CPU the three read the start once and join it with their own pages,
    the others are read alone; every row's result is its own attention."""
    from serving import paged_attention

    joined = []
    join = paged_attention._shared_start_attention
    monkeypatch.setattr(paged_attention, "_shared_start_attention",
                        lambda q, *rest: joined.append(q.shape[0]) or join(q, *rest))
    q, keys, values, table, lengths = case(lengths=(70, 49, 60, 90, 1, 40), heads=6, kv_heads=2)
    table[[1, 3], :3] = table[0, :3]
    table[2, 0] = table[0, 0]
    table[4] = 0
    expected = one_by_one(q, keys, values, table, lengths)
    torch.testing.assert_close(cpu_paged_attention(q, keys, values, table, lengths), expected)
    assert joined == [3]
    # bf16 pages: joined in fp32, given back in bf16
    half = cpu_paged_attention(q.bfloat16(), keys.bfloat16(), values.bfloat16(), table, lengths)
    assert half.dtype == torch.bfloat16 and joined == [3, 3]
    torch.testing.assert_close(half.float(), expected, rtol=0, atol=3e-2)


triton_runs = importlib.util.find_spec("triton") is not None and (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.skipif(not triton_runs, reason="the Triton kernels run where a GPU serves (or under TRITON_INTERPRET=1)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_triton_kernels_give_the_reference(dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter multiplies bf16 wrongly (numpy has no bf16); a GPU checks it")
    # head_dim 8 (padded inside), 5 query heads per kv head as Qwen3-14B has, a row past 16 pages
    q, keys, values, table, lengths = case(dtype, device, size=16, dim=8, heads=10, kv_heads=2,
                                           lengths=(1, 300, 17, 16))
    expected = reference_paged_attention(q.float(), keys.float(), values.float(), table, lengths)
    tolerance = dict(rtol=0, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(triton_paged_attention(q, keys, values, table, lengths).float(), expected, **tolerance)
