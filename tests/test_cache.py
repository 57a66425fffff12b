"""The response cache: exact and paraphrase hits, and every way a hit would be wrong is a
miss: other region, period, number, negation, reversed comparison, department, adapter
version, knowledge-base version, a follow-up turn. Thumbs-down evicts; TTL expires."""

import datetime as dt

import pytest

from storage import adapters as adapter_registry
from storage import cache as cache_store

ANSWER = "华东区上季度销售额为1,234万元。"


@pytest.fixture
def ask(services, script):
    """Ask as a user; the scripted model answers ANSWER (finish 'stop', so it is cacheable).
    The semantic layer is on here (an admin's choice; off by default), so its paths are tested."""
    model = script(*[ANSWER] * 20)
    services.cache.configure(True, True, 0.8)

    def run(text, username="finance-employee", conversation_id=None, fresh=False):
        user = services.auth.current_user(username)
        return list(services.engine.turns.stream_turn(user, text, conversation_id, fresh=fresh))[-1]
    run.model = model
    return run


def test_an_exact_repeat_and_a_paraphrase_are_answered_from_the_cache_and_logged(services, ask):
    first = ask("上季度华东区销售额是多少？")
    assert not first.cached and len(ask.model.prompts) == 1
    again = ask("上季度华东区销售额是多少")  # punctuation and width do not matter
    assert again.cached and again.answer == ANSWER and len(ask.model.prompts) == 1
    cached_item = [i for i in again.items if i["type"] == "text"][0]["cached"]
    assert cached_item["layer"] == "exact"
    paraphrase = ask("上季度华东区的销售额有多少？")
    assert paraphrase.cached and [i for i in paraphrase.items if i["type"] == "text"][0]["cached"]["layer"] == "semantic"
    english = ask("What was revenue in East China last quarter?")
    assert not english.cached  # another language is another question to the lexical layer
    assert ask("What was last quarter's revenue in East China?").cached
    row = services.db.query_one("SELECT cache_entry_id, finish_reason FROM messages WHERE id = ?", [again.message_id])
    assert row["cache_entry_id"] == cached_item["entry_id"] and row["finish_reason"] == "cached"
    stats = {r["department_id"]: r for r in services.cache.stats()}["finance"]
    assert (stats["exact_hits"], stats["semantic_hits"], stats["lookups"]) == (1, 2, 5)
    # asking afresh goes to the model even though the cache has it
    fresh = ask("上季度华东区销售额是多少？", fresh=True)
    assert not fresh.cached and len(ask.model.prompts) == 3


@pytest.mark.parametrize("near_miss", [
    "上季度华南区销售额是多少？",        # another region
    "去年华东区销售额是多少？",          # another period
    "2025年华东区销售额是多少？",        # a number
    "上季度华东区销售额不是多少？",      # negation
])
def test_a_near_miss_is_never_served_the_cached_answer(services, ask, near_miss):
    ask("上季度华东区销售额是多少？")
    assert not ask(near_miss).cached


def test_a_reversed_comparison_misses(services, ask):
    ask("Is the current ratio higher than the quick ratio?")
    assert ask("Is the current ratio higher than the quick ratio").cached
    assert not ask("Is the quick ratio higher than the current ratio?").cached
    ask("华东区销售额比华南区高吗？")
    assert not ask("华南区销售额比华东区高吗？").cached


def test_scopes_departments_follow_ups_promotions_and_document_changes(services, ask, tmp_path):
    from tests.conftest import make_lora_adapter

    first = ask("How do I calculate gross margin?")
    assert not ask("How do I calculate gross margin?", username="hr-employee").cached  # another department
    assert not ask("How do I calculate gross margin?", conversation_id=first.conversation_id).cached  # follow-up
    assert ask("How do I calculate gross margin?").cached
    # a change to the documents starts a new scope
    services.knowledge.add_files([("margin.txt", b"Gross margin is revenue minus cost, over revenue.")],
                                 ["finance"], company_wide=False)
    assert not ask("How do I calculate gross margin?").cached
    assert ask("How do I calculate gross margin?").cached
    # so does a promotion
    adapter_dir = services.settings.resolved_adapters_dir / "finance" / "v1"
    make_lora_adapter(services.model.path, adapter_dir, seed=1)
    adapter_registry.add_version(services.db, "finance", "v1", str(adapter_dir), services.model.path, None)
    services.adapters.activate("finance", "v1")
    assert not ask("How do I calculate gross margin?").cached


def test_thumbs_down_evicts_and_ttl_expires(services, ask):
    first = ask("What is the hotel limit abroad?")
    hit = ask("What is the hotel limit abroad?")
    assert hit.cached
    services.engine.conversations.rate(services.auth.current_user("finance-employee"), hit.message_id, -1, "wrong limit")
    assert not ask("What is the hotel limit abroad?").cached  # evicted: asked the model again
    # a thumbs-down on the answer an entry replays evicts it too
    assert ask("What is the hotel limit abroad?").cached
    newest = services.db.scalar("SELECT max(source_message_id) FROM cache_entries WHERE evicted_at IS NULL")
    services.engine.conversations.rate(services.auth.current_user("finance-employee"), newest, -1, None)
    assert not ask("What is the hotel limit abroad?").cached
    assert first.message_id
    # TTL: the clock moves past the entry's life
    services.cache._clock = lambda: dt.datetime.now() + dt.timedelta(hours=services.settings.cache_ttl_hours + 1)
    assert not ask("What is the hotel limit abroad?").cached


def test_answers_from_live_tools_are_not_cached_and_admins_control_the_cache(services, script):
    import json

    call = "<tool_call>\n" + json.dumps({"name": "query_sales", "arguments": {"region": "华东", "period": "2026"}}) \
        + "\n</tool_call>"
    script(call, "华东区2026年销售额如上。", call, "again")
    user = services.auth.current_user("finance-employee")
    list(services.engine.turns.stream_turn(user, "华东区2026年销售额"))
    assert not list(services.engine.turns.stream_turn(user, "华东区2026年销售额"))[-1].cached
    assert services.db.scalar("SELECT count(*) FROM cache_entries") == 0

    services.cache.configure(True, False, 0.9)  # semantic layer off
    assert services.cache.settings() == {"enabled": True, "semantic": False, "threshold": 0.9}
    with pytest.raises(ValueError):
        services.cache.configure(True, True, 0.2)


def test_clearing_and_the_admin_api(running_app):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from webapp.demo import DEMO_PASSWORD

    url, services = running_app
    entry = cache_store.add_entry(
        services.db, scope="s", department_id="finance", question="q", normalized="q", embedding=None, answer="a",
        sources=None, source_message_id=1, generation_ms=1.0, completion_tokens=1, live_tools=False,
        expires_at=dt.datetime.now() + dt.timedelta(hours=1))
    admin = Client(url, auth=("finance-admin", DEMO_PASSWORD), verbose=False)
    assert admin.predict(api_name="/cache_stats")["departments"][0]["entries"] == 1
    with pytest.raises(AppError):
        Client(url, auth=("finance-employee", DEMO_PASSWORD), verbose=False).predict(api_name="/cache_stats")
    assert admin.predict("", api_name="/cache_clear") == 1
    assert cache_store.get_entry(services.db, entry)["evicted_at"] is not None


def test_old_lookups_become_daily_totals_at_night_and_no_figure_changes(services, ask):
    """The log of every lookup is pruned nightly after --cache-lookups-kept-days: the days before
    are kept as totals, so the cache stats, the monitoring's days and the /metrics counters read
    the same before and after, and new lookups keep adding to them."""
    from storage import monitoring

    for question in ("上季度华东区销售额是多少？", "上季度华东区销售额是多少", "上季度华东区的销售额有多少？",
                     "去年华东区销售额是多少？"):
        ask(question)
    ask("上季度华南区销售额是多少？", username="hr-employee")
    # the first four lookups were made 100 and 120 days ago (the cache keeps 90 by default)
    now = dt.datetime.now()
    for offset, days in enumerate((100, 100, 120, 120)):
        services.db.write("UPDATE cache_lookups SET created_at = ? WHERE rowid = (SELECT min(rowid) + ? FROM"
                          " cache_lookups)", [now - dt.timedelta(days=days), offset])
    since = (now - dt.timedelta(days=200)).date()

    def figures():
        return (sorted(services.cache.stats(), key=lambda r: r["department_id"]),
                [{k: r[k] for k in ("day", "department_id", "cache_lookups", "cache_hits", "cache_hit_rate")}
                 for r in monitoring.daily(services.db, since) if r["cache_lookups"]],
                {(r["department_id"], r["label"]): r["n"] for r in monitoring.totals(services.db)
                 if r["family"] == "cache_lookups"})

    before = figures()
    assert sum(r["lookups"] for r in before[0]) == 5 and before[0][0]["saved_s"] >= 0
    assert len(before[1]) == 3  # 120 and 100 days ago (finance), today (hr)
    outcomes = services.nightly.run_nightly()  # the refreshes skip (no samples), then the chores run
    assert [o.status for o in outcomes] == ["skipped", "skipped"]
    assert services.db.query_one("SELECT count(*) AS n FROM cache_lookups")["n"] == 1  # today's only
    assert services.db.query_one("SELECT sum(lookups) AS n FROM cache_lookup_days")["n"] == 4
    assert figures() == before
    assert services.cache.prune_lookups() == 0  # nothing left to fold; running again changes nothing
    assert figures() == before
    ask("上季度华东区销售额是多少？")  # a hit today adds to the totals as before
    after = figures()
    assert sum(n for (_, outcome), n in after[2].items() if outcome == "exact") == \
        sum(n for (_, outcome), n in before[2].items() if outcome == "exact") + 1
