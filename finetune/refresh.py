"""One refresh of one department's adapter, as the nightly job, the admin's "Retrain now"
and `python -m finetune refresh` all run it:

threshold -> dataset files -> recipe subprocess (progress, cancel) -> candidate version
-> evaluation against the active adapter -> gate -> promotion by policy.

The app keeps the database; the subprocess gets files and reports through a file.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

from finetune.augment import Vocabulary, slot_variants, wrapped
from finetune.evaluate import case_from_sample, gate, load_functional_set, per_case_scores, score, worse_cases
from finetune.recipe import Hyperparameters, RecipeConfig, recipe_command
from finetune.samples import last_question, normalize_question
from serving.chat_format import passages_moved_to_the_question, system_message, with_passages
from storage import adapters as registry
from storage import reviews
from storage.db import Database

log = logging.getLogger(__name__)


TWINS_PER_PASSAGES = 8  # twins trained with one and the same set of passages, at most


@dataclass(kw_only=True)
class RefreshSettings(Hyperparameters):
    min_new_samples: int = 20  # below this many new approved samples, the nightly run is skipped
    general_replay: int = 90  # general samples mixed in against forgetting (the whole file)
    augment_variants: int = 4  # slot-swap copies per reviewed tool call (finetune/augment.py)
    wrapped_share: float = 0.5  # of those copies, the share asked inside chat context (augment.wrapped)
    replay_share: float = 0.4  # general replay repeated until it is at least this share of the mix
    start_from_active: bool = True
    auto_promote: bool = True  # promote when the gate passes; else wait for the admin
    gate_margin: float = 0.02
    gate_tolerance: float = 0.02
    system_prompt: str = ""
    train_gpus: int = 1  # more: the recipe runs data parallel, one process per GPU (torchrun)


GENERAL_REPLAY = Path(__file__).with_name("data") / "general_replay.jsonl"
CHAT_WRAPPERS = Path(__file__).with_name("data") / "chat_wrappers.json"


class RefreshBusy(RuntimeError):
    """A refresh of this adapter is already running."""


@dataclass
class RefreshOutcome:
    run_id: int
    status: str  # succeeded / failed / cancelled / skipped
    reason: str | None = None
    version: str | None = None
    gate: dict[str, Any] | None = None
    promoted: bool = False


def _die_with_parent() -> None:
    """In the training process, before it starts (Linux): SIGKILL when the app dies, so a
    killed app leaves no trainer running, holding the GPU or writing an adapter later."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the run is still marked failed at the next start
        pass


class RefreshRunner:
    """Runs refreshes; at most one per adapter at a time."""

    def __init__(self, db: Database, settings: RefreshSettings, base_model: Callable[[], str], adapters_dir: Path,
                 runs_dir: Path, tools_for_department: Callable[[str], list[dict]],
                 promote: Callable[[str, str], None],
                 vocabulary_for_department: Callable[[str], Vocabulary] = lambda department: {},
                 passages_for: Callable[[str, str], list[dict]] = lambda department, question: [],
                 unasked_tools_for: Callable[[str, list[str]], list[str]] = lambda department, said: [],
                 spelled_tool_for: Callable[[str, str], str | None] = lambda department, question: None):
        self.db = db
        self.settings = settings
        self.base_model = base_model  # the folder the app serves (the embedded model is converted lazily)
        self.adapters_dir = adapters_dir
        self.runs_dir = runs_dir
        self.tools_for_department = tools_for_department
        self.promote = promote
        self.vocabulary_for_department = vocabulary_for_department
        self.passages_for = passages_for  # (department, question) -> the passages the app would give it
        # (department, the user's last two messages) -> the offered tools they do not ask a call of
        self.unasked_tools_for = unasked_tools_for
        self.spelled_tool_for = spelled_tool_for
        self._running: dict[str, threading.Event] = {}  # department -> cancel event
        self._guard = threading.Lock()

    def running(self) -> dict[str, bool]:
        return {department: True for department in self._running}

    def cancel(self, department_id: str) -> bool:
        event = self._running.get(department_id)
        if event:
            event.set()
        return event is not None

    def refresh(self, department_id: str, trigger: str, force: bool = False,
                on_progress: Callable[[dict[str, Any]], None] | None = None) -> RefreshOutcome:
        with self._guard:
            if department_id in self._running:
                raise RefreshBusy(f"The {department_id} adapter is already being refreshed.")
            cancel = self._running[department_id] = threading.Event()
        try:
            return self._refresh(department_id, trigger, force, cancel, on_progress or (lambda event: None))
        finally:
            with self._guard:
                self._running.pop(department_id, None)

    def _refresh(self, department_id: str, trigger: str, force: bool, cancel: threading.Event,
                 on_progress: Callable[[dict[str, Any]], None]) -> RefreshOutcome:
        s = self.settings
        last = registry.last_successful_run(self.db, department_id)
        new, last_sample_id = registry.count_train_samples(self.db, department_id, last["last_sample_id"] if last else 0)
        if new < s.min_new_samples and not force:
            reason = f"{new} new approved samples since the last refresh; {s.min_new_samples} are needed"
            run_id = registry.start_run(self.db, department_id, trigger, status="skipped", reason=reason,
                                        new_samples=new, last_sample_id=last_sample_id)
            registry.finish_run(self.db, run_id, "skipped")
            return RefreshOutcome(run_id, "skipped", reason)

        train = reviews.list_samples(self.db, department_id, "train")
        if not train:
            run_id = registry.start_run(self.db, department_id, trigger, status="skipped",
                                        reason="no approved training samples yet", new_samples=0)
            registry.finish_run(self.db, run_id, "skipped")
            return RefreshOutcome(run_id, "skipped", "no approved training samples yet")
        run_id = registry.start_run(self.db, department_id, trigger, samples=len(train), new_samples=new,
                                    last_sample_id=last_sample_id)
        run_dir = self.runs_dir / f"run-{run_id}"
        run_dir.mkdir(parents=True, exist_ok=True)
        progress = run_dir / "progress.jsonl"

        # The dataset: every approved train sample of the adapter (earlier ones replay) plus
        # general samples against forgetting.
        reviewed = [{"messages": passages_moved_to_the_question(json.loads(r["messages"])),
                     **({"tools": json.loads(r["tools"])} if r["tools"] else {})} for r in train]
        eval_rows = reviews.list_samples(self.db, department_id, "eval")
        variants = self._variants(department_id, reviewed, eval_rows)
        if variants:
            on_progress({"event": "augmented", "samples": len(reviewed), "variants": len(variants),
                         "with_passages": sum(1 for v in variants if _has_passages(v["messages"]))})
        lines = [json.dumps(sample, ensure_ascii=False) for sample in reviewed + variants]
        tools = self.tools_for_department(department_id)
        general = [json.loads(line) for line in GENERAL_REPLAY.read_text(encoding="utf-8").splitlines() if line.strip()]
        # Served with the app's system prompt and the department's tools, so trained with
        # them too: replay without the tools taught "tools in the prompt -> call one", and
        # the adapter called tools for greetings and definitions.
        # Some carry document passages, rendered as the engine renders retrieved ones: questions
        # with numbers in them ("how many days ...") answered from a policy, not by a tool.
        replay = [json.dumps({"messages": [system_message(s.system_prompt),
                                           *with_passages(g["messages"], g.get("passages", ()))],
                              **({"tools": tools} if tools else {}), "replay": True}, ensure_ascii=False)
                  for g in general[: s.general_replay]]
        if replay and s.replay_share > 0:  # cycled: many tool-call samples against few replay ones taught calling always
            wanted = math.ceil(s.replay_share * len(lines) / (1 - s.replay_share))
            replay = [replay[i % len(replay)] for i in range(max(wanted, len(replay)))]
        lines += replay
        (run_dir / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        cases = [c for c in (case_from_sample({"messages": json.loads(r["messages"]),
                                               "tools": json.loads(r["tools"]) if r["tools"] else None})
                             for r in eval_rows) if c]
        cases += load_functional_set(tools, s.system_prompt)
        for case in cases:  # as serving reads them: the question and the user's message before it
            said = [m.get("content") or "" for m in case.messages if m["role"] == "user"][-2:]
            case.unasked_tools = self.unasked_tools_for(department_id, said)
            case.spelled_tool = self.spelled_tool_for(department_id, said[-1]) if said else None
        (run_dir / "eval.jsonl").write_text("\n".join(json.dumps(c.to_json(), ensure_ascii=False) for c in cases),
                                            encoding="utf-8")
        version = registry.next_version(self.db, department_id)
        # a run killed with the app may have left its folder: never write into one
        while any((self.adapters_dir / department_id / name).exists() for name in (version, version + ".partial")):
            version = f"v{int(version[1:]) + 1}"
        output_dir = self.adapters_dir / department_id / version
        active = registry.active_version(self.db, department_id)
        base_model = self.base_model()
        config = RecipeConfig(
            **{f.name: getattr(s, f.name) for f in fields(Hyperparameters)},
            base_model=base_model, dataset=str(run_dir / "train.jsonl"), output_dir=str(output_dir),
            progress_file=str(progress),
            init_adapter=active["path"] if active and s.start_from_active else None,
            eval_cases=str(run_dir / "eval.jsonl"), active_adapter=active["path"] if active else None)
        (run_dir / "run.json").write_text(json.dumps(asdict(config), ensure_ascii=False, indent=1))

        status, reason, events = self._run_recipe(run_dir, progress, cancel, on_progress)
        steps = [e for e in events if e["event"] == "step"]
        mode = next((e["mode"] for e in events if e["event"] == "mode"), None)
        summary = dict(steps=len(steps), final_loss=steps[-1]["loss"] if steps else None,
                       losses=json.dumps([e["loss"] for e in steps]), mode=mode, log_path=str(run_dir / "recipe.log"))
        if status != "succeeded":
            registry.finish_run(self.db, run_id, status, reason=reason, **summary)
            return RefreshOutcome(run_id, status, reason)

        registry.add_version(self.db, department_id, version, str(output_dir), base_model, run_id)
        evaluation = next((e for e in events if e["event"] == "eval"), None)
        candidate_metrics = score(cases, evaluation["candidate"])
        active_metrics = score(cases, evaluation["active"])
        decision = gate(candidate_metrics, active_metrics, s.gate_margin, s.gate_tolerance,
                        worse_cases(cases, evaluation["active"], evaluation["candidate"]),
                        (per_case_scores(cases, evaluation["active"]), per_case_scores(cases, evaluation["candidate"])))
        registry.record_evaluation(self.db, department_id, version,
                                   {"candidate": candidate_metrics, "active": active_metrics,
                                    "against": active["version"] if active else "base"}, decision)
        registry.finish_run(self.db, run_id, "succeeded", version=version, **summary)
        promoted = False
        if not decision["passed"]:
            registry.set_status(self.db, department_id, version, "rejected")
        elif s.auto_promote:
            self.promote(department_id, version)
            promoted = True
        on_progress({"event": "gate", **decision, "version": version, "promoted": promoted})
        return RefreshOutcome(run_id, "succeeded", None, version, decision, promoted)

    def _variants(self, department_id: str, reviewed: list[dict], eval_rows: list[dict]) -> list[dict]:
        """Slot-swap copies of the reviewed tool calls; never one of the evaluation questions
        (the gate would score what was trained) nor a reviewed question itself."""
        count = self.settings.augment_variants
        vocabulary = self.vocabulary_for_department(department_id) if count else {}
        if not vocabulary:
            return []
        avoid = {normalize_question(last_question(json.loads(r["messages"]))) for r in eval_rows}
        avoid |= {normalize_question(last_question(sample["messages"])) for sample in reviewed}
        rng = random.Random(self.settings.seed)
        variants: list[dict] = []
        for sample in reviewed:
            made = slot_variants(sample, vocabulary, count, rng, avoid)
            avoid |= {normalize_question(last_question(v["messages"])) for v in made}
            variants += made
        # a share of them asked the way employees write, inside chat context
        wrappers = json.loads(CHAT_WRAPPERS.read_text(encoding="utf-8"))
        for variant in rng.sample(variants, round(self.settings.wrapped_share * len(variants))):
            user = max(i for i, m in enumerate(variant["messages"]) if m["role"] == "user")
            variant["messages"][user]["content"] = wrapped(variant["messages"][user]["content"], wrappers, rng)
        # Each variant carries the passages the app would retrieve for its question today, as
        # a live question does: a correction reviewed without passages otherwise teaches the call
        # only for prompts without them, and a live sales question that draws a loosely related
        # passage is answered by continuing the passage list instead of calling the tool. One set
        # of passages teaches that in a few twins; on every twin that draws it, it lengthens the
        # night by half (a loosely related passage drew 48 of 100 twins).
        taught: dict[str, int] = {}
        for variant in variants:
            if not _has_passages(variant["messages"]):
                try:
                    found = self.passages_for(department_id, last_question(variant["messages"]))
                except Exception:  # retrieval failing costs the twins their passages, not the night
                    log.exception("could not retrieve passages for the twins; they train without")
                    break
                key = json.dumps(found, ensure_ascii=False, sort_keys=True)
                if found and taught.get(key, 0) < TWINS_PER_PASSAGES:
                    taught[key] = taught.get(key, 0) + 1
                    variant["messages"] = with_passages(variant["messages"], found)
        return variants

    def _run_recipe(self, run_dir: Path, progress: Path, cancel: threading.Event,
                    on_progress: Callable[[dict[str, Any]], None]) -> tuple[str, str | None, list[dict]]:
        events: list[dict] = []
        with open(run_dir / "recipe.log", "w", encoding="utf-8") as log_file:
            process = subprocess.Popen(recipe_command(run_dir / "run.json", self.settings.train_gpus),
                                       stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
            position = 0
            while True:
                finished = process.poll() is not None
                if progress.exists():
                    with open(progress, encoding="utf-8") as fh:
                        fh.seek(position)
                        chunk = fh.read()
                    complete = chunk[: chunk.rfind("\n") + 1]  # only whole lines
                    position += len(complete.encode("utf-8"))
                    for line in complete.splitlines():
                        event = json.loads(line)
                        events.append(event)
                        on_progress(event)
                if finished:
                    break
                if cancel.is_set():
                    process.terminate()
                    try:
                        process.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        process.kill()
                    return "cancelled", "cancelled by an admin", events
                time.sleep(0.2)
        if process.returncode != 0:
            failure = next((e["error"] for e in events if e["event"] == "failed"), None)
            tail = (run_dir / "recipe.log").read_text(encoding="utf-8", errors="replace")[-600:]
            return "failed", failure or f"the training process exited with code {process.returncode}: {tail}", events
        if not any(e["event"] == "eval" for e in events):
            return "failed", "the training process ended without an evaluation", events
        return "succeeded", None, events


def _has_passages(messages: list[dict]) -> bool:
    return any(m.get("passages") for m in messages)
