"""The batched decoder: the same tokens as transformers' generate(), for several users at
once, each with their own adapter, joining and leaving between steps."""


import collections

import pytest
import torch

from serving.decoding import BatchingEngine, DecodeRequest, StaticDecoder


def with_two_adapters(tiny_model_dir, device: str = "cpu"):
    """The tiny Qwen3 with two LoRA adapters whose weights are not zero (fresh ones are)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).to(device)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
                           adapter_name="finance")
    model.add_adapter("hr", LoraConfig(r=8, lora_alpha=8, target_modules=["k_proj", "o_proj", "gate_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(std=0.3)
    model.eval()
    return model


@pytest.fixture(scope="module")
def two_adapter_model(tiny_model_dir):
    return with_two_adapters(tiny_model_dir)


def reference(model, prompt, adapter, new_tokens, device: str = "cpu"):
    ids = torch.tensor([prompt], device=device)
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                  pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, adapter_names=[adapter or "__base__"], **kwargs)
    return out[0, len(prompt):].tolist()


def run_all(engine, requests):
    return [request.collect(timeout=60) for request in requests]


def serve(decoder, prompts, adapters, new_tokens):
    """All prompts submitted at once to an engine over `decoder`; each one's tokens."""
    engine = BatchingEngine(decoder)
    try:
        return run_all(engine, [engine.submit(DecodeRequest(p, max_new_tokens=new_tokens, adapter=a))
                                for p, a in zip(prompts, adapters)])
    finally:
        engine.close()


def test_batched_rows_with_different_adapters_match_generate(two_adapter_model):
    model = two_adapter_model
    decoder = StaticDecoder(model, max_batch=4, max_len=96)
    assert decoder.adapter_index == {"finance": 0, "hr": 1}
    engine = BatchingEngine(decoder)
    prompts = [[5, 17, 42, 8, 99, 3], [7, 7, 7, 120, 64], [11, 23, 5, 6, 2, 90, 33, 4], [9, 100]]
    adapters = ["finance", "hr", None, "finance"]
    try:
        requests = [engine.submit(DecodeRequest(p, max_new_tokens=12, adapter=a)) for p, a in zip(prompts, adapters)]
        outputs = run_all(engine, requests)
    finally:
        engine.close()
    expected = [reference(model, p, a, 12) for p, a in zip(prompts, adapters)]
    assert outputs == expected
    # the adapters matter: the same prompt differs between them, so the check has teeth
    assert reference(model, prompts[0], "hr", 12) != expected[0] != reference(model, prompts[0], None, 12)
    assert all(r.finish_reason == "length" for r in requests)


def test_rows_read_their_own_pages_across_page_boundaries_and_give_the_same_tokens(two_adapter_model):
    """Pages of 4 tokens: every row crosses several page boundaries mid-answer, its pages lie
    between other rows' in the pool (given as each row was admitted and grew), and each row
    must still see every earlier token of its own and nothing of the others'."""
    model = two_adapter_model
    decoder = StaticDecoder(model, max_batch=4, max_len=96, page_size=4)
    prompts = [[5, 17, 42, 8, 99, 3], [11, 23, 5, 6, 2, 90, 33], [9, 100]]
    adapters = ["finance", "hr", None]
    outputs = serve(decoder, prompts, adapters, 14)  # the longest row reaches position 20
    assert outputs == [reference(model, p, a, 14) for p, a in zip(prompts, adapters)]


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_keep_decoding(two_adapter_model):
    """A 150-token prompt (an attached report) arrives while two users are answered: it is
    prefilled 32 tokens at a time, a decode step of the others between every two chunks, so
    they keep receiving tokens; users join and leave around it; every answer is generate()'s."""
    model = two_adapter_model
    decoder = StaticDecoder(model, max_batch=3, max_len=256, page_size=8)
    engine = BatchingEngine(decoder, prefill_chunk=32)
    events = []
    engine.on_step = lambda rows: events.append(("step", rows))
    prefill = decoder.prefill

    def logged(slot, prompt_ids, adapter, done=0, limit=None):
        events.append(("prefill", len(prompt_ids), done))
        return prefill(slot, prompt_ids, adapter, done, limit)

    decoder.prefill = logged
    report = [(7 * i + 3) % 150 + 2 for i in range(150)]
    short = [[5, 17, 42, 8, 99, 3], [9, 100, 7], [11, 23, 5, 6]]
    try:
        first = [engine.submit(DecodeRequest(short[0], max_new_tokens=30, adapter="finance")),
                 engine.submit(DecodeRequest(short[1], max_new_tokens=6, adapter="hr"))]
        assert first[0].tokens.get(timeout=60) is not None  # both are being answered
        long = engine.submit(DecodeRequest(report, max_new_tokens=12, adapter="hr"))
        joined = engine.submit(DecodeRequest(short[2], max_new_tokens=8))  # waits for a slot
        outputs = run_all(engine, [*first, long, joined])
    finally:
        engine.close()
    outputs[0] = [reference(model, short[0], "finance", 30)[0]] + outputs[0]  # its first token was taken above
    assert outputs == [reference(model, short[0], "finance", 30), reference(model, short[1], "hr", 6),
                       reference(model, report, "hr", 12), reference(model, short[2], None, 8)]
    chunks = [i for i, e in enumerate(events) if e[:2] == ("prefill", 150)]
    assert [events[i][2] for i in chunks] == [0, 32, 64, 96, 128]
    assert all(("step", 1) in events[a:b] or ("step", 2) in events[a:b] for a, b in zip(chunks, chunks[1:]))


def test_memory_is_given_by_need_and_a_request_waits_for_pages(two_adapter_model):
    """A cache of 96 tokens for 3 users: a 70-token turn fits (a fixed share would be 32), the
    short ones beside it; a turn that needs pages still held waits for them, then runs; one
    larger than the whole cache is refused (the app answers it with generate())."""
    model = two_adapter_model
    decoder = StaticDecoder(model, max_batch=3, max_len=128, kv_tokens=96, page_size=8)
    engine = BatchingEngine(decoder)
    steps = []
    engine.on_step = steps.append
    assert engine.fits(60, 10) and not engine.fits(90, 10)
    big = [(3 * i + 1) % 150 + 2 for i in range(60)]
    small = [[5, 17, 42, 8], [9, 100, 7]]
    try:
        requests = [engine.submit(DecodeRequest(big, max_new_tokens=10, adapter="finance")),
                    engine.submit(DecodeRequest(small[0], max_new_tokens=8, adapter="hr")),
                    engine.submit(DecodeRequest(big[:50], max_new_tokens=10)),  # 8 pages: waits for the first
                    engine.submit(DecodeRequest(small[1], max_new_tokens=8))]
        outputs = run_all(engine, requests)
        assert outputs == [reference(model, big, "finance", 10), reference(model, small[0], "hr", 8),
                           reference(model, big[:50], None, 10), reference(model, small[1], None, 8)]
        # three slots, but never three users at once: the third waited for the first's pages
        # (and the fourth, which would fit, behind it: it is not passed)
        assert max(steps) == 2
    finally:
        engine.close()
    with pytest.raises(ValueError, match="does not fit"):
        engine.submit(DecodeRequest(list(range(90)), max_new_tokens=10))


def test_a_shared_prompt_start_is_reused_per_adapter_and_gives_the_same_tokens(two_adapter_model):
    """A department's system prompt and tool schemas, computed once per adapter: later prompts
    copy that start from the slot that has it, and their answers are generate()'s."""
    model = two_adapter_model
    shared = [(7 * i + 3) % 150 + 2 for i in range(40)]
    prompts = [shared + [5, 17, 42], shared + [9, 100, 11, 23], shared[:30] + [64, 64], shared + [5, 17, 42]]
    adapters = ["finance", "finance", "finance", "hr"]
    decoder = StaticDecoder(model, max_batch=2, max_len=96)
    engine = BatchingEngine(decoder)
    try:
        outputs = [engine.submit(DecodeRequest(p, max_new_tokens=10, adapter=a)).collect(timeout=60)
                   for p, a in zip(prompts, adapters)]
    finally:
        engine.close()
    assert outputs == [reference(model, p, a, 10) for p, a in zip(prompts, adapters)]
    # the second prompt reused all 40 shared tokens, the third its 30; the hr prompt none
    assert decoder.reused_tokens == 40 + 30
    decoder.refresh_adapters()  # new weights: nothing cached may be reused
    assert decoder._reusable_prefix(prompts[0], "finance") == (0, None)


def assert_pages_accounted(decoder):
    """Every page is free or listed by slots, as many as _refs says; none is both or lost."""
    listed = collections.Counter(page for pages in decoder._row_pages for page in pages)
    assert all(decoder._refs[page] == count for page, count in listed.items())
    assert not set(decoder._free) & set(listed) and len(set(decoder._free)) == len(decoder._free)
    assert set(decoder._free) | set(listed) == set(range(1, decoder.total_pages + 1))


def assert_shared_starts_listed_and_answered(model, device="cpu", **decoder_options):
    """Four finance requests and one hr request start with the same 80 tokens (5 pages of 16),
    all at once: the finance ones after the first list its 5 pages instead of computing or
    copying them (the hr one computes its own: other weights), decode side by side reading
    them once, and give generate()'s tokens; the pool's count of pages holds throughout."""
    shared = [(7 * i + 3) % 150 + 2 for i in range(80)]
    prompts = [shared + [5, 17, 42], shared + [9, 100, 11, 23], shared + [64], shared[:40] + [1, 2, 3],
               shared + [5, 17, 42]]
    adapters = ["finance", "finance", "finance", "finance", "hr"]
    decoder = StaticDecoder(model, max_batch=5, max_len=128, page_size=16, **decoder_options)
    engine = BatchingEngine(decoder)
    tables = []
    engine.on_step = lambda rows: tables.append([list(pages) for pages in decoder._row_pages])
    try:
        outputs = run_all(engine, [engine.submit(DecodeRequest(p, max_new_tokens=12, adapter=a))
                                   for p, a in zip(prompts, adapters)])
    finally:
        engine.close()
    assert outputs == [reference(model, p, a, 12, device) for p, a in zip(prompts, adapters)]
    assert decoder.reused_tokens == 80 + 80 + 40
    # once all five were in: three slots listed the same first five pages, the hr slot others
    together = [t for t in tables if all(t)]
    assert together
    starts = collections.Counter(tuple(pages[:5]) for pages in together[-1])
    assert sorted(starts.values()) == [1, 1, 3]
    assert_pages_accounted(decoder)


def test_requests_sharing_a_prompt_start_list_its_pages_and_give_the_tokens_of_generate(two_adapter_model):
    assert_shared_starts_listed_and_answered(two_adapter_model)


@pytest.mark.gpu
def test_shared_prompt_starts_on_gpu_are_read_through_the_table_and_give_the_tokens_of_generate(tiny_model_dir):
    """The same on a GPU: decode steps replayed as CUDA graphs, the Triton kernels reading the
    shared pages through each row's table (prefills eager: a graphed prefill computes its
    whole prompt, so only prompts longer than every graph length share a start there)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    assert_shared_starts_listed_and_answered(with_two_adapters(tiny_model_dir, "cuda"), "cuda", graph_prefill=False)


def test_a_pool_too_small_for_every_copy_serves_shared_starts_and_takes_pages_back(two_adapter_model):
    """A cache of 16 pages of 8 for requests of 7 pages that share 5: a request is given its
    7 pages, lists the 5 shared ones of a slot that has them and gives its own back, so three
    run at once where copies would fit two; pages are parked and taken back (a page only when
    no slot lists it) while requests wait. Every answer is generate()'s and no page is lost."""
    model = two_adapter_model
    shared = [(5 * i + 1) % 150 + 2 for i in range(40)]
    prompts = [shared + [3 + i, 40 + i] for i in range(6)] + [[9, 100, 7] * 14]
    adapters = ["finance", "finance", "hr", "finance", "finance", "hr", None]
    decoder = StaticDecoder(model, max_batch=3, max_len=96, kv_tokens=128, page_size=8)
    engine = BatchingEngine(decoder)
    seen = []
    engine.on_step = lambda rows: seen.append((rows, max(decoder._refs)))
    try:
        outputs = run_all(engine, [engine.submit(DecodeRequest(p, max_new_tokens=10, adapter=a))
                                   for p, a in zip(prompts, adapters)])
    finally:
        engine.close()
    assert outputs == [reference(model, p, a, 10) for p, a in zip(prompts, adapters)]
    assert max(refs for _, refs in seen) >= 2 and max(rows for rows, _ in seen) == 3
    assert decoder.reused_tokens >= 2 * 40
    assert_pages_accounted(decoder)


def test_a_prefill_padded_to_a_graph_length_gives_the_same_tokens(two_adapter_model):
    """On a GPU a prompt's prefill is a CUDA graph of a fixed length, the prompt padded to it;
    here the same padded code runs without the graph. Padding must change no token: not the
    first (read at the prompt's last position), not later ones (the padding's keys never seen)."""
    model = two_adapter_model
    prompts = [[5, 17, 42, 8, 99, 3], [7, 7, 7, 120, 64, 9, 9, 31, 2, 44, 8], [9, 100],
               [(5 * i + 1) % 150 + 2 for i in range(20)]]  # 6, 11, 2 tokens padded; 20 past the lengths: eager
    adapters = ["finance", "hr", None, "hr"]
    decoder = StaticDecoder(model, max_batch=2, max_len=64, graph_prefill=True, prefill_lengths=(8, 16))
    outputs = serve(decoder, prompts, adapters, 10)
    assert outputs == [reference(model, p, a, 10) for p, a in zip(prompts, adapters)]
    assert sorted(decoder._prefill_runs) == [8, 16]  # the 20-token prompt ran eagerly


def test_requests_join_and_leave_between_steps_and_stop_at_their_stop_token(two_adapter_model):
    model = two_adapter_model
    decoder = StaticDecoder(model, max_batch=2, max_len=64)
    engine = BatchingEngine(decoder)
    steps = []
    engine.on_step = steps.append
    long_prompt, short_prompt = [3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8]
    expected_long = reference(model, long_prompt, "hr", 30)
    stop = expected_long[5]
    try:
        first = engine.submit(DecodeRequest(long_prompt, max_new_tokens=30, adapter="hr",
                                            stop_ids=frozenset({stop})))
        # three more than there are slots: they wait for one to free up
        later = [engine.submit(DecodeRequest(short_prompt, max_new_tokens=6 + i, adapter="finance"))
                 for i in range(3)]
        outputs = run_all(engine, [first, *later])
    finally:
        engine.close()
    assert outputs[0] == expected_long[:expected_long.index(stop)] and first.finish_reason == "stop"
    for i, tokens in enumerate(outputs[1:]):
        assert tokens == reference(model, short_prompt, "finance", 6 + i)
    assert max(steps) == 2  # two users shared steps


def test_a_cancelled_request_frees_its_slot(two_adapter_model):
    engine = BatchingEngine(StaticDecoder(two_adapter_model, max_batch=1, max_len=64))
    try:
        first = engine.submit(DecodeRequest([1, 2, 3], max_new_tokens=50))
        assert first.tokens.get(timeout=30) is not None
        first.cancelled.set()
        second = engine.submit(DecodeRequest([4, 5, 6], max_new_tokens=3))
        assert len(run_all(engine, [second])[0]) == 3
        while first.tokens.get(timeout=30) is not None:
            pass
        assert first.finish_reason == "cancelled"
    finally:
        engine.close()
    with pytest.raises(ValueError, match="does not fit"):
        engine.submit(DecodeRequest(list(range(60)), max_new_tokens=10))


def test_many_first_requests_at_once_start_one_engine(two_adapter_model):
    """Users arriving together must not start two engine threads that share the slots."""
    import concurrent.futures
    import threading

    engine = BatchingEngine(StaticDecoder(two_adapter_model, max_batch=2, max_len=64))
    barrier = threading.Barrier(6)

    def user(i):
        barrier.wait()
        request = engine.submit(DecodeRequest([1 + i, 2, 3], max_new_tokens=5))
        return run_all(engine, [request])[0]

    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            outputs = list(pool.map(user, range(6)))
        assert [len(o) for o in outputs] == [5] * 6
        assert sum(t.name == "batching-engine" for t in threading.enumerate()) == 1
    finally:
        engine.close()


def test_fused_4bit_layers_give_the_unfused_tokens(tiny_model_dir):
    """q/k/v and gate/up joined into one 4-bit weight each (finetune/nf4.py) must split back
    into the right layers, with each layer's LoRA added: the same tokens and logits as the
    layer-by-layer path on the same 4-bit model (here on CPU; the GPU kernel is checked in
    tests/test_nf4.py and bench/nf4_kernel.py). A joined product's LoRA as one block-diagonal
    pair of matmuls (q and v adapted, k not; gate and up both) gives them too."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def four_bit_model():
        torch.manual_seed(6)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, torch.nn.Linear):
                        quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                                      quant_type="nf4", compress_statistics=False,
                                                      compute_dtype=torch.float32)
                        quantized.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False,
                                                             quant_type="nf4", compress_statistics=False)
                        setattr(parent, name, quantized.to("cpu"))
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"]),
                               adapter_name="finance")
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.3)
        return model.eval()

    prompts, adapters = [[5, 17, 42, 8, 99, 3], [7, 7, 7, 120, 64]], ["finance", None]

    def answers(fused: bool, join_lora: bool = False):
        # a model of its own each: bitsandbytes repacks a 4-bit layer for its CPU kernel on
        # the first call, after which the layout is no longer NF4's (fusing then refuses)
        decoder = StaticDecoder(four_bit_model(), max_batch=2, max_len=48, fused_nf4=fused, join_lora=join_lora)
        assert bool(decoder._fused) == fused
        assert sorted({group for _, group in decoder._group_stacks}) == (["gate_up", "qkv"] if join_lora else [])
        outputs = serve(decoder, prompts, adapters, 10)
        assert decoder.reserve(0, len(prompts[0]))
        return outputs, decoder.prefill(0, prompts[0], "finance")[1]

    plain, plain_logits = answers(False)
    for join_lora in (False, True):
        fused, fused_logits = answers(True, join_lora)
        assert fused == plain, f"join_lora={join_lora}"
        # bitsandbytes' CPU kernel multiplies in fp32, the fused path dequantizes to bf16 first;
        # a layer mixed up (q for k, gate for up) or a LoRA block misplaced differs by ~0.7 here
        torch.testing.assert_close(fused_logits, plain_logits, rtol=0, atol=1e-2)


@pytest.mark.gpu
def test_graphed_prefill_and_decode_on_gpu_give_the_tokens_of_generate(tiny_model_dir):
    """The serving path on a GPU: prefill and decode steps replayed as CUDA graphs, two
    adapters, prompts of several lengths (padded to different graph lengths, one longer than
    all of them), slots used twice; the tokens are generate()'s."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = with_two_adapters(tiny_model_dir, "cuda")
    prompts = [[5, 17, 42, 8, 99, 3], [7, 7, 7, 120, 64, 9, 9, 31, 2, 44, 8], [9, 100],
               [(5 * i + 1) % 150 + 2 for i in range(40)], [3, 1, 4, 1, 5, 9, 2, 6]]
    adapters = ["finance", "hr", None, "hr", "finance"]
    decoder = StaticDecoder(model, max_batch=2, max_len=96, prefill_lengths=(8, 16, 32))
    assert decoder.use_graphs and decoder.graph_prefill
    outputs = serve(decoder, prompts, adapters, 10)

    assert outputs == [reference(model, p, a, 10, "cuda") for p, a in zip(prompts, adapters)]
    assert sorted(decoder._prefill_runs) == [8, 16]  # the 40-token prompt ran eagerly; nothing needed 32


@pytest.mark.gpu
def test_a_promotion_between_graph_replays_gives_the_new_adapters_tokens_on_gpu(tiny_model_dir):
    """An adapter replaced while the decoder's graphs exist (an admin's promotion in a running
    app): every graph of the old pool goes, new ones are captured into a new pool, and the
    tokens are generate()'s with the new weights. Capturing into the released pool tripped
    PyTorch's allocator ("use_count > 0") at the first promotion on a GPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = with_two_adapters(tiny_model_dir, "cuda")
    prompts, adapters = [[5, 17, 42, 8, 99, 3], [9, 100, 7]], ["finance", "hr"]
    decoder = StaticDecoder(model, max_batch=2, max_len=96, prefill_lengths=(8, 16))
    assert serve(decoder, prompts, adapters, 8) == [reference(model, p, a, 8, "cuda") for p, a in zip(prompts, adapters)]
    with torch.no_grad():  # the promoted version: other LoRA weights under the same name
        for name, param in model.named_parameters():
            if "lora_B" in name and "finance" in name:
                param.mul_(-3.0)
    decoder.refresh_adapters()
    assert serve(decoder, prompts, adapters, 8) == [reference(model, p, a, 8, "cuda") for p, a in zip(prompts, adapters)]
    decoder.refresh_adapters()  # and again: each promotion starts a fresh pool
    assert serve(decoder, prompts[:1], adapters[:1], 8) == [reference(model, prompts[0], "finance", 8, "cuda")]


def test_idle_rows_of_a_batch_bucket_never_embed_garbage(two_adapter_model):
    """Three rows run in the bucket of four: the fourth is idle, but it is embedded too. Its token
    id must be a valid one whatever the staging buffer held before (it was torch.empty: the
    fresh-clone CI hit an out-of-vocabulary id there once)."""
    decoder = StaticDecoder(two_adapter_model, max_batch=4, max_len=32)
    decoder._staging.fill_(10**9)  # what uninitialised memory may hold
    for slot in range(3):
        assert decoder.reserve(slot, 8)
    logits = decoder.decode([5, 17, 42], [0, 0, 0])
    assert logits.shape[0] == 3 and torch.isfinite(logits).all()


def test_a_parked_prompt_cut_down_by_its_slots_next_request_is_reused_only_as_far_as_its_pages_go(two_adapter_model):
    """A finished 60-token prompt stays parked in slot 1; slot 1 is then given to a short
    request (2 pages kept, the rest given back) before a request sharing 50 tokens of that
    prompt is prefilled in slot 0. Slot 1 will write over what it kept, so none of it may be
    taken: slot 0's first token must be what a clean prefill gives (taking 50 tokens once
    read garbage pages, and sharing the 16 kept would be overwritten)."""
    model = two_adapter_model
    prompt = [(7 * i + 3) % 150 + 2 for i in range(60)]
    asking = prompt[:50] + [5, 17]

    def first_logits(decoder, slot):
        assert decoder.reserve(slot, len(asking) + 4)
        return decoder.prefill(slot, asking, "finance")[1]

    clean = first_logits(StaticDecoder(model, max_batch=2, max_len=96, page_size=8), 0)
    decoder = StaticDecoder(model, max_batch=2, max_len=96, page_size=8)
    assert decoder.reserve(1, 70)
    decoder.prefill(1, prompt, "finance")
    decoder.release(1)  # parked: a prompt start to copy
    assert decoder.reserve(1, 10)  # a short request takes slot 1: two of its pages stay
    torch.testing.assert_close(first_logits(decoder, 0), clean)
    assert decoder.reused_tokens == 0
    assert_pages_accounted(decoder)


def test_an_engine_that_fails_ends_every_request_once_and_the_next_one_is_served(two_adapter_model):
    """A request whose sampling cannot run kills the engine thread: it and the request queued
    behind it get the error (once; neither is decoded afterwards), and a request submitted
    next starts a new engine and gets its answer. close() ends what is still queued."""
    engine = BatchingEngine(StaticDecoder(two_adapter_model, max_batch=1, max_len=64))
    try:
        broken = engine.submit(DecodeRequest([1, 2, 3], max_new_tokens=5, temperature=1.0, top_p=-1.0))
        behind = engine.submit(DecodeRequest([4, 5, 6], max_new_tokens=5))
        for request in (broken, behind):
            with pytest.raises(RuntimeError):
                request.collect(timeout=30)
            assert request.tokens.empty() and request.finish_reason == "error"
        after = engine.submit(DecodeRequest([4, 5, 6], max_new_tokens=5))
        assert after.collect(timeout=30) == reference(two_adapter_model, [4, 5, 6], None, 5)
        long = engine.submit(DecodeRequest([7, 8, 9], max_new_tokens=50))
        waiting = engine.submit(DecodeRequest([1, 1, 1], max_new_tokens=5))
        assert long.tokens.get(timeout=30) is not None
    finally:
        engine.close()
    assert len(waiting.collect(timeout=10)) < 5 and waiting.finish_reason == "cancelled"
    long.collect(timeout=10)
    assert long.finish_reason == "cancelled"
