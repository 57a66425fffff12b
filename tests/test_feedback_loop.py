"""The feedback loop end to end on the tiny model, through the launched app's API: questions,
thumbs-down, reviewer corrections, the nightly job, the gate, and a promoted adapter that
answers the next request. (The tiny random model cannot learn; bench/feedback_loop.py
measures learning on the embedded model with the same code.)"""

import pytest
from gradio_client import Client

from bench.feedback_loop import (
    HELD_OUT_FILES,
    HELD_OUT_TEMPLATES,
    TRAIN_TEMPLATES,
    held_out_questions,
    run_scenario,
    sales_questions,
)
from storage import adapters as registry
from tests.conftest import make_settings
from tests.test_refresh import FAST
from webapp.demo import DEMO_PASSWORD
from webapp.services import open_services

pytestmark = pytest.mark.slow  # trains in a subprocess


def test_a_night_of_feedback_trains_gates_and_the_promoted_adapter_answers(tmp_path, tiny_model, embedder):
    services = open_services(make_settings(tmp_path, **{**FAST, "min_new_samples": 3, "max_tool_rounds": 1}),
                             model=tiny_model, embedder=embedder)
    try:
        train = sales_questions(TRAIN_TEMPLATES, 4, seed=1)
        held_out = held_out_questions(HELD_OUT_FILES["held-out-3"])
        sets = {"dev": (sales_questions(HELD_OUT_TEMPLATES, 2, seed=2), ["你好", "What is a balance sheet?"]),
                "held-out": (held_out[0][:2], held_out[1][:1])}
        result = run_scenario(services, train, sets, log=lambda *_: None)
        db = services.db
        # every stage left its rows
        assert result["taught"] == {"asked": 4, "thumbs_down": 4, "corrected": 4}
        assert db.scalar("SELECT count(*) FROM feedback WHERE rating = -1") == 4
        assert db.scalar("SELECT count(*) FROM reviews WHERE decision = 'approved'") == 4
        assert db.scalar("SELECT count(*) FROM training_samples WHERE department_id = 'finance'") == 4
        run = result["run"]
        assert run["status"] == "succeeded" and run["trigger"] == "schedule" and run["steps"] >= 1
        version = registry.get_version(db, "finance", run["version"])
        assert version["metrics"] and version["gate"]  # the evaluation and the gate's decision are recorded
        assert set(result["after"]) == {"dev", "held-out"}
        assert 0 <= result["before"]["held-out"]["exact"] <= 1 and 0 <= result["after"]["dev"]["false_calls"] <= 1
        # promoted by policy, or (the tiny model rarely passes) by the admin: the next request uses it
        if version["status"] != "active":
            services.adapters.activate("finance", run["version"])
        app_url_services = services
        from bench.feedback_loop import launch

        app, url = launch(app_url_services)
        try:
            employee = Client(url, auth=("finance-employee", DEMO_PASSWORD), verbose=False)
            answer = employee.predict("上季度华东区销售额是多少？", None, True, api_name="/chat")
            assert answer["adapter"] == "finance" and answer["adapter_version"] == run["version"]
        finally:
            app.close()
    finally:
        services.close()
