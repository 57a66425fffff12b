"""The refresh loop on the tiny model: threshold, training subprocess, candidate, gate,
promotion by policy, rollback, a killed run, and the nightly trigger."""

import datetime as dt
import json
import os
import signal
from pathlib import Path

import pytest

from finetune.dataset import import_jsonl
from finetune.samples import tool_call_message
from storage import adapters as registry
from tests.conftest import make_settings
from webapp.scheduler import NightlyRefresh
from webapp.services import open_services

FAST = dict(lora_r=4, lora_alpha=8, epochs=1, gradient_accumulation=2, eval_max_new_tokens=4, general_replay=2,
            min_new_samples=3, learning_rate=1e-3, augment_variants=0)


@pytest.fixture
def refresh_services(tmp_path, tiny_model, embedder):
    def build(**overrides):
        svc = open_services(make_settings(tmp_path, **{**FAST, **overrides}), model=tiny_model, embedder=embedder)
        opened.append(svc)
        return svc
    opened = []
    yield build
    for svc in opened:
        svc.close()


def add_samples(services, count=6, department="finance"):
    lines = []
    for i in range(count):
        lines.append(json.dumps({"messages": [
            {"role": "system", "content": "You are hangjia."}, {"role": "user", "content": f"华东 {2020 + i} 年销售额？"},
            tool_call_message("query_sales", {"region": "华东", "period": str(2020 + i)}, "c")]}, ensure_ascii=False))
    import_jsonl(services.db, "\n".join(lines), department, None, eval_fraction=0.0)


def ask(services, username="finance-employee"):
    user = services.auth.current_user(username)
    return list(services.engine.turns.stream_turn(user, "hello"))[-1]


def test_too_few_new_samples_skip_the_night_with_the_reason(refresh_services):
    services = refresh_services()
    outcome = services.refresh.refresh("finance", "schedule")
    assert outcome.status == "skipped" and "0 new approved samples" in outcome.reason
    add_samples(services, 2)
    assert services.refresh.refresh("finance", "schedule").status == "skipped"
    assert [r["status"] for r in registry.runs(services.db)] == ["skipped", "skipped"]


@pytest.mark.slow
def test_a_refresh_trains_evaluates_gates_and_promotes_and_the_next_message_uses_it(refresh_services):
    services = refresh_services(gate_margin=-1.0, gate_tolerance=1.0)  # a gate the tiny model passes
    add_samples(services)
    events = []
    outcome = services.refresh.refresh("finance", "manual", on_progress=events.append)
    assert outcome.status == "succeeded" and outcome.version == "v1" and outcome.promoted, outcome
    kinds = [e["event"] for e in events]
    assert "step" in kinds and "eval" in kinds and kinds[-1] == "gate"
    run = registry.runs(services.db)[0]
    assert run["status"] == "succeeded" and run["samples"] == 6 and run["steps"] >= 1 and run["final_loss"] > 0
    assert "plain LoRA" in run["mode"]
    # the gate decodes again a call nothing the case's user said asks for, as serving does
    cases = [json.loads(line) for line in (services.settings.data_dir / "runs" / f"run-{outcome.run_id}" /
                                           "eval.jsonl").read_text(encoding="utf-8").splitlines()]
    unasked = {c["messages"][-1]["content"]: c["unasked_tools"] for c in cases}
    assert any(tools == ["query_sales"] for tools in unasked.values())  # a greeting, a definition
    assert all(c["expected_call"]["name"] not in c["unasked_tools"] for c in cases if c["kind"] == "tool")
    # and as its call an answer without one to a question spelling a whole call (华北区上个月的销售收入是多少)
    spelled = {c["messages"][-1]["content"]: c["spelled_tool"] for c in cases}
    assert any(tool == "query_sales" for tool in spelled.values())
    assert all(tool is None for question, tool in spelled.items() if unasked[question])
    version = registry.get_version(services.db, "finance", "v1")
    assert version["status"] == "active" and json.loads(version["gate"])["passed"]
    assert json.loads(version["metrics"])["against"] == "base"
    # promoted without a restart: the next finance message is answered by v1, hr's by the base
    assert (ask(services).adapter, ask(services).adapter_version) == ("finance", "v1")
    assert ask(services, "hr-employee").adapter is None


@pytest.mark.slow
def test_corrections_train_with_slot_swapped_twins_and_replay_keeps_its_share(refresh_services, monkeypatch):
    monkeypatch.setattr("finetune.refresh.TWINS_PER_PASSAGES", 2)
    services = refresh_services(augment_variants=2, replay_share=0.5, general_replay=2, gate_margin=-1.0,
                                gate_tolerance=1.0)
    add_samples(services, 3)  # 华东 2020..2022 年销售额？ -> query_sales(region=华东, period=year)
    held_out = {"messages": [{"role": "system", "content": "You are hangjia."},
                             {"role": "user", "content": "华南 2020 年销售额？"},
                             tool_call_message("query_sales", {"region": "华南", "period": "2020"}, "c")]}
    import_jsonl(services.db, json.dumps(held_out, ensure_ascii=False), "finance", None, eval_fraction=1.0)
    # what a finance question would be served with, and what finance must never see
    services.knowledge.add_files([("区域销售统计.md", "各区域年销售额由财务部按年统计：华东、华南、华北、华中。".encode())],
                                 ["finance"], False)
    services.knowledge.add_files([("人事销售奖金.md", "人事机密：各区域年销售额排名决定销售奖金。".encode())], ["hr"], False)
    events = []
    outcome = services.refresh.refresh("finance", "manual", force=True, on_progress=events.append)
    assert outcome.status == "succeeded", outcome
    augmented = next(e for e in events if e["event"] == "augmented")
    assert (augmented["samples"], augmented["variants"]) == (3, 6)
    lines = [json.loads(line) for line in (services.settings.data_dir / "runs" / f"run-{outcome.run_id}" /
                                           "train.jsonl").read_text(encoding="utf-8").splitlines()]
    tool_samples = [line for line in lines if any(m.get("tool_calls") for m in line["messages"])]
    assert len(tool_samples) == 9
    questions, wrapped = [], 0
    for sample in tool_samples:
        question = next(m["content"] for m in sample["messages"] if m["role"] == "user")
        arguments = json.loads(sample["messages"][-1]["tool_calls"][0]["function"]["arguments"])
        asked = f"{arguments['region']} {arguments['period']} 年销售额？"
        assert asked in question  # question and call agree, inside chat context or not
        wrapped += question != asked
        questions.append(asked)
    assert "华南 2020 年销售额？" not in questions  # the evaluation question is never trained
    assert len(set(questions)) == 9
    assert wrapped == 3  # half the twins are asked inside chat context; the reviewed samples as approved
    # the twins carry the passages a live question gets (the department's own only); the
    # reviewed samples stay as they were approved
    given = [" ".join(p["text"] for p in m["passages"]) for line in tool_samples for m in line["messages"]
             if m.get("passages")]
    assert augmented["with_passages"] == len(given) > 0
    assert all("由财务部按年统计" in text and "人事机密" not in text for text in given), given
    assert max(given.count(text) for text in given) <= 2  # one set of passages on two twins at most
    replay = len(lines) - len(tool_samples)
    assert replay == 9  # two general samples cycled up to half of the mix


@pytest.mark.slow
def test_without_auto_promote_the_admin_promotes_and_rolls_back(refresh_services):
    services = refresh_services(gate_margin=-1.0, gate_tolerance=1.0, auto_promote=False)
    add_samples(services)
    first = services.refresh.refresh("finance", "manual")
    assert first.version == "v1" and not first.promoted
    assert registry.get_version(services.db, "finance", "v1")["status"] == "candidate"
    assert ask(services).adapter is None
    services.adapters.activate("finance", "v1")
    add_samples(services, 3)
    second = services.refresh.refresh("finance", "manual")
    services.adapters.activate("finance", "v2")
    assert ask(services).adapter_version == "v2"
    services.adapters.activate("finance", "v1")  # roll back
    assert ask(services).adapter_version == "v1"
    assert {v["version"]: v["status"] for v in registry.versions(services.db, "finance")} == {"v1": "active", "v2": "retired"}
    assert json.loads(registry.get_version(services.db, "finance", "v2")["metrics"])["against"] == "v1"
    assert second.status == "succeeded"
    services.adapters.activate("finance", "base")  # past the first version: the base model
    assert ask(services).adapter is None
    assert all(v["status"] == "retired" for v in registry.versions(services.db, "finance"))
    services.adapters.activate("finance", "v2")
    assert ask(services).adapter_version == "v2"


@pytest.mark.slow
def test_a_failing_gate_never_promotes(refresh_services):
    services = refresh_services(gate_margin=5.0)  # no adapter can be 5 better
    add_samples(services)
    outcome = services.refresh.refresh("finance", "manual")
    assert outcome.status == "succeeded" and not outcome.gate["passed"] and not outcome.promoted
    assert registry.get_version(services.db, "finance", "v1")["status"] == "rejected"
    assert ask(services).adapter is None


@pytest.mark.slow
def test_a_killed_training_process_fails_the_run_and_the_next_run_works(refresh_services):
    # enough work after the first step (more epochs, longer evaluation answers) that the
    # kill lands while the process still runs: the runner reads progress every 0.2 s
    services = refresh_services(gate_margin=-1.0, gate_tolerance=1.0, epochs=3, eval_max_new_tokens=64)
    add_samples(services)

    def kill_at_first_step(event):
        if event["event"] == "start":
            kill_at_first_step.pid = event["pid"]
        if event["event"] == "step" and event["step"] == 1:
            os.kill(kill_at_first_step.pid, signal.SIGKILL)

    outcome = services.refresh.refresh("finance", "manual", on_progress=kill_at_first_step)
    assert outcome.status == "failed" and "exited with code -9" in outcome.reason
    assert registry.versions(services.db, "finance") == [] and ask(services).adapter is None
    assert services.refresh.refresh("finance", "manual").status == "succeeded"


def test_nightly_trigger_and_a_missed_night(refresh_services):
    services = refresh_services()
    real_now = dt.datetime.now().replace(second=0, microsecond=0)
    hour_ago = real_now - dt.timedelta(hours=1)
    clock = {"now": real_now}
    nightly = NightlyRefresh(services.db, services.refresh, f"{hour_ago.minute} {hour_ago.hour} * * *",
                             now=lambda: clock["now"])
    assert nightly.previous_fire_time(clock["now"]) == hour_ago
    assert nightly.trigger.get_next_fire_time(None, real_now).replace(tzinfo=None) == hour_ago + dt.timedelta(days=1)
    assert not nightly.missed_night()  # the data dir is new: a first start has missed no night
    services.db.write("UPDATE schema_migrations SET applied_at = applied_at - INTERVAL 2 DAY")
    assert nightly.missed_night()  # it fired an hour ago, the app was down and nothing ran: run at start
    outcomes = nightly.run_nightly()
    assert [o.status for o in outcomes] == ["skipped", "skipped"]  # finance and hr: no samples yet
    assert not nightly.missed_night()
    clock["now"] = real_now + dt.timedelta(hours=7)
    assert not nightly.missed_night()  # a night older than the grace waits for the next one
    nightly.start()
    assert nightly.state()["next_run"].startswith((hour_ago + dt.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M"))
    nightly.stop()


@pytest.mark.slow
def test_headless_refresh_from_the_command_line(refresh_services, tiny_model_dir):
    import subprocess
    import sys

    services = refresh_services()
    add_samples(services)
    data_dir = services.settings.data_dir
    services.close()  # the CLI needs the database to itself, as when the app is stopped
    run = lambda *extra: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "finetune", "refresh", "--data-dir", str(data_dir), "--adapter", "finance",
         "--model", str(tiny_model_dir), *extra], capture_output=True, text=True, timeout=600)
    skipped = run("--min-new-samples", "100")
    assert skipped.returncode == 0 and "skipped: 6 new approved samples" in skipped.stdout
    done = run("--force")
    assert done.returncode == 0 and "succeeded; candidate v1" in done.stdout, done.stdout + done.stderr
    assert "plain LoRA" in done.stdout and "step 1/" in done.stdout


def test_the_general_replay_default_is_the_whole_shipped_file_and_renders_its_passages():
    """The default mixes in every shipped replay sample (a sample added to the file and not to
    the default would never be trained), and a sample with passages gets them before its
    question, as the engine serves retrieved ones."""
    from finetune.refresh import GENERAL_REPLAY, RefreshSettings
    from serving.chat_format import knowledge_block, with_passages

    lines = [json.loads(line) for line in GENERAL_REPLAY.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert RefreshSettings(system_prompt="sys").general_replay == len(lines)
    assert make_settings(Path("/tmp")).general_replay == len(lines)
    grounded = [g for g in lines if g.get("passages")]
    # each answers from its passage and cites it, or says the passage does not answer
    assert grounded and all("[1]" in g["messages"][-1]["content"] or "没有" in g["messages"][-1]["content"]
                            for g in grounded)
    question = with_passages(grounded[0]["messages"], grounded[0]["passages"])[-2]
    assert question["role"] == "user" and question["passages"] == grounded[0]["passages"]
    block = knowledge_block(grounded[0]["passages"])
    assert block.startswith("Passages from") and f"[1] {grounded[0]['passages'][0]['title']}" in block


@pytest.mark.slow
def test_a_knowledge_base_that_fails_costs_the_twins_their_passages_not_the_night(refresh_services):
    services = refresh_services(augment_variants=2, gate_margin=-1.0, gate_tolerance=1.0)
    add_samples(services, 3)

    def broken(department, question):
        raise RuntimeError("the embedder is gone")

    services.refresh.passages_for = broken
    events = []
    outcome = services.refresh.refresh("finance", "manual", force=True, on_progress=events.append)
    assert outcome.status == "succeeded", outcome
    augmented = next(e for e in events if e["event"] == "augmented")
    assert (augmented["variants"], augmented["with_passages"]) == (6, 0)
