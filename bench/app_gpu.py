"""The whole product on one GPU, driven over HTTP the way people use it: `launch.py --model
<folder> --load-in-4bit` in its own process; 8 employees chatting at once through /v1
(streaming), through Gradio's own HTTP API (/gradio_api/call/chat and its event stream) and
through the gradio_client library (which polls its queues every 1-50 ms); then a reviewer imports ~200 samples (tool round trips
and multi-turn among them) and an admin presses Retrain while the 8 keep chatting; the admin
promotes the candidate, the next answer carries its version, and a rollback works the same way.

    python bench/app_gpu.py --model /path/to/Qwen3-14B            # a model folder with its tokenizer
    TINY=1 python bench/app_gpu.py --model <tiny folder>           # a dry run on CPU, small settings

Answers are greedy and up to --new-tokens long (random weights seldom stop earlier). Rows go to
$OUT/app_gpu.jsonl and a table is printed; compare it with bench/gpu_serve.py's engine figures
run in the same call (bench/gpu_run.sh app).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PASSWORD = "hangjia-demo"
TINY = bool(os.environ.get("TINY"))


class GpuMemory:
    """Peak memory used on the GPU by every process (the app and its trainer), polled."""

    def __init__(self, period_s: float = 0.25):
        self.peak_mib, self.period_s, self._stop = 0, period_s, threading.Event()

    def _poll(self):
        while not self._stop.is_set():
            try:
                used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                      capture_output=True, text=True, timeout=5).stdout.split()
                self.peak_mib = max(self.peak_mib, int(used[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return  # no GPU: nothing to report
            self._stop.wait(self.period_s)

    def __enter__(self):
        self.peak_mib = 0
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._stop.clear()


def prepare_data_dir(data_dir: Path, usernames: list[str]) -> dict[str, str]:
    """The demo company in a fresh data dir, and an API key per user for /v1 (made before the
    app owns the database: DuckDB allows one writing process)."""
    from storage.db import Database
    from storage.migrations import migrate
    from webapp.auth import Auth
    from webapp.demo import seed_demo_company

    data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(data_dir / "hangjia.duckdb")
    try:
        migrate(db)
        auth = Auth(db)
        seed_demo_company(db, auth)
        return {name: auth.create_api_key(auth.current_user(name), "bench")[1] for name in usernames}
    finally:
        db.close()


def start_app(model: str, data_dir: Path, port: int, new_tokens: int, log_path: Path,
              knowledge: bool = True, stacks: Path | None = None) -> subprocess.Popen:
    # launch.py as a user starts it; with `stacks`, under bench/stack_sampler.py
    sampler = [] if stacks is None else ["bench/stack_sampler.py", str(stacks)]
    command = [sys.executable, *sampler, "launch.py", "--model", model, "--demo", "--no-demo-feedback", "--data-dir", str(data_dir),
               "--port", str(port), "--temperature", "0", "--max-new-tokens", str(new_tokens),
               "--generation-concurrency", "8", "--no-scheduler", "--min-new-samples", "1",
               "--general-replay", "8", "--augment-variants", "0", "--epochs", "1", "--eval-max-new-tokens", "16",
               "--no-auto-promote"]
    if not TINY:
        command += ["--load-in-4bit"]
    if not knowledge:  # e.g. where the embedding model's package is not installed
        command += ["--no-knowledge"]
    log = open(log_path, "w")
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited ({process.returncode}); see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(2)
    process.kill()
    raise RuntimeError("the app did not start within 15 minutes")


def v1_user(url: str, key: str, question: str, out: dict) -> None:
    """One streamed answer through /v1: time to first token, tokens, decode rate."""
    started = time.perf_counter()
    first = None
    usage = {}
    body = {"model": "hangjia", "stream": True, "messages": [{"role": "user", "content": question}]}
    with httpx.stream("POST", url + "v1/chat/completions", json=body, timeout=900,
                      headers={"Authorization": f"Bearer {key}"}) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            delta = (chunk.get("choices") or [{}])[0].get("delta", {})
            if first is None and delta.get("content"):
                first = time.perf_counter()
            usage = chunk.get("usage") or usage
    ended = time.perf_counter()
    tokens = int(usage.get("completion_tokens") or 0)
    out.update(ttft=(first or ended) - started, tokens=tokens, seconds=ended - started,
               rate=tokens / max(ended - (first or started), 1e-9), prompt_tokens=usage.get("prompt_tokens"))


def gradio_user(client, question: str, out: dict) -> None:
    """One answer through gradio_client's /chat (the browser's path), streamed, by a user who
    logged in before (a browser session: the login and the app's config are not per question)."""
    started = time.perf_counter()
    first = None
    job = client.submit(question, None, True, api_name="/chat")  # fresh: the model, never the cache
    for update in job:
        if first is None and update.get("answer"):
            first = time.perf_counter()
    final = job.result()
    ended = time.perf_counter()
    tokens = final["completion_tokens"]  # hidden thinking and markup included, as /v1 counts them
    out.update(ttft=(first or ended) - started, tokens=tokens, seconds=ended - started,
               rate=tokens / max(ended - (first or started), 1e-9), version=final.get("adapter_version"))


def gradio_http_user(client, url: str, question: str, out: dict) -> None:
    """One answer through Gradio's own HTTP API (POST /gradio_api/call/chat, then its event
    stream), as curl or any HTTP client sends it, by a user logged in before."""
    started = time.perf_counter()
    first, final = None, {}
    response = client.post(url + "gradio_api/call/chat", json={"data": [question, None, True]})
    response.raise_for_status()
    with client.stream("GET", url + f"gradio_api/call/chat/{response.json()['event_id']}", timeout=900) as events:
        for line in events.iter_lines():
            if not line.startswith("data:") or line[5:].strip() in ("", "null"):
                continue
            final = json.loads(line[5:])[0]
            if first is None and final.get("answer"):
                first = time.perf_counter()
    ended = time.perf_counter()
    tokens = int(final.get("completion_tokens") or 0)
    out.update(ttft=(first or ended) - started, tokens=tokens, seconds=ended - started,
               rate=tokens / max(ended - (first or started), 1e-9), version=final.get("adapter_version"))


def round_of_users(url, keys, usernames, via: str, tag: str) -> list[dict]:
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client

    results = [{} for _ in usernames]
    def http_session(name: str) -> httpx.Client:
        client = httpx.Client(timeout=60)
        client.post(url + "login", data={"username": name, "password": PASSWORD}).raise_for_status()
        return client

    if via in ("gradio", "gradio-http"):  # one session per user, opened before the clock starts
        login = http_session if via == "gradio-http" else lambda name: Client(url, auth=(name, PASSWORD), verbose=False)
        with ThreadPoolExecutor(len(usernames)) as pool:
            clients = list(pool.map(login, usernames))
    threads = []
    for i, name in enumerate(usernames):
        question = f"[{tag} {i}] 上季度华东区的销售额是多少？请详细说明。"
        if via == "v1":
            target = (v1_user, (url, keys[name], question, results[i]))
        elif via == "gradio-http":
            target = (gradio_http_user, (clients[i], url, question, results[i]))
        else:
            target = (gradio_user, (clients[i], question, results[i]))
        threads.append(threading.Thread(target=target[0], args=target[1]))
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    for r in results:
        r["wall"] = wall
    return results


def summary(name: str, results: list[dict], wall: float | None = None) -> dict:
    """Per-user medians and all users' tokens over `wall` (default: the one round's wall time)."""
    done = [r for r in results if "tokens" in r]
    wall = wall or max(r["wall"] for r in results)
    return {"row": name, "users": len(results), "answered": len(done),
            "tok_s_per_user": round(statistics.median(r["rate"] for r in done), 1) if done else None,
            "tok_s_all": round(sum(r["tokens"] for r in done) / wall, 1),
            "ttft_p50_s": round(statistics.median(r["ttft"] for r in done), 3) if done else None,
            "ttft_max_s": round(max(r["ttft"] for r in done), 3) if done else None,
            "tokens_per_answer": round(statistics.mean(r["tokens"] for r in done), 1) if done else None,
            "prompt_tokens": done[0].get("prompt_tokens") if done else None}


def training_samples(count: int) -> str:
    """Samples as a reviewer would import them: tool round trips, multi-turn, plain answers."""
    from finetune.samples import tool_call_message

    system = {"role": "system", "content": "You are hangjia, the company's assistant."}
    regions, periods = ["华东", "华北", "华南", "华中", "西南"], ["last_quarter", "this_quarter", "2026-Q1", "2026-Q2"]
    lines = []
    for i in range(count):
        region, period = regions[i % len(regions)], periods[(i // len(regions)) % len(periods)]
        call = tool_call_message("query_sales", {"region": region, "period": period}, f"c{i}")
        result = {"role": "tool", "tool_call_id": f"c{i}",
                  "content": json.dumps({"region": region, "period": period, "value": 1_000_000 + i * 7919})}
        kind = i % 3
        if kind == 0:  # a tool round trip
            messages = [system, {"role": "user", "content": f"{region}{period}的销售额是多少？（{i}）"}, call, result,
                        {"role": "assistant", "content": f"{region} {period} 销售额为 {1_000_000 + i * 7919:,} 元。"}]
        elif kind == 1:  # multi-turn: an earlier exchange, then the call
            messages = [system, {"role": "user", "content": f"What does EBITDA mean? ({i})"},
                        {"role": "assistant", "content": "Earnings before interest, taxes, depreciation and amortisation."},
                        {"role": "user", "content": f"And {region}'s sales for {period}?"}, call]
        else:  # a plain answer
            messages = [system, {"role": "user", "content": f"年假可以跨年使用吗？（{i}）"},
                        {"role": "assistant", "content": "可以，未休年假最多顺延到次年3月31日。"}]
        lines.append(json.dumps({"messages": messages}, ensure_ascii=False))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder (weights, config, tokenizer)")
    parser.add_argument("--port", type=int, default=7861)
    parser.add_argument("--new-tokens", type=int, default=16 if TINY else 256)
    parser.add_argument("--samples", type=int, default=12 if TINY else 200)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("APP_DATA", "/tmp/hangjia-app-bench")))
    parser.add_argument("--phases", default="serve,refresh")
    parser.add_argument("--label", default="", help="added to each row's name, e.g. the settings varied")
    parser.add_argument("--sample-stacks", action="store_true",
                        help="sample the app's thread stacks during the 8-user /v1 round (OUT/stacks/stacks.json)")
    parser.add_argument("--knowledge", action=argparse.BooleanOptionalAction, default=True,
                        help="serve with the knowledge base (needs the embedding model's package)")
    args = parser.parse_args(argv)
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "app_gpu.jsonl"
    import shutil

    shutil.rmtree(args.data_dir, ignore_errors=True)
    users = ["finance-employee", "hr-employee"] * 4
    keys = prepare_data_dir(args.data_dir, sorted(set(users)))
    url = f"http://127.0.0.1:{args.port}/"
    rows = []

    def emit(row):
        row = {**row, "date": time.strftime("%Y-%m-%d"), "model": args.model}
        rows.append(row)
        with rows_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print("RESULT", json.dumps(row), flush=True)

    with GpuMemory() as load_memory:
        started = time.perf_counter()
        app = start_app(args.model, args.data_dir, args.port, args.new_tokens, out / "app-server.log", args.knowledge,
                        out / "stacks" if args.sample_stacks else None)
        emit({"row": "app start", "seconds": round(time.perf_counter() - started, 1),
              "gpu_peak_mib": load_memory.peak_mib})
    try:
        if "serve" in args.phases:
            # warm-up at the measured batch size: the decoder captures a graph per batch size
            round_of_users(url, keys, users, "v1", "warm-up")
            for via in ("v1", "gradio-http", "gradio"):
                flag = out / "stacks" / "sampling"
                if args.sample_stacks:
                    flag.write_text(via + args.label)
                with GpuMemory() as memory:
                    results = round_of_users(url, keys, users, via, f"alone-{via}")
                flag.unlink(missing_ok=True)
                emit({**summary(f"8 users, {via}{args.label}", results), "gpu_peak_mib": memory.peak_mib})
        if "refresh" in args.phases:
            from gradio_client import Client

            reviewer = Client(url, auth=("finance-reviewer", PASSWORD), verbose=False)
            imported = reviewer.predict(training_samples(args.samples), "finance", api_name="/samples_import")
            admin = Client(url, auth=("finance-admin", PASSWORD), verbose=False)
            outcome: dict = {}

            def retrain():
                began = time.perf_counter()
                outcome.update(admin.predict("finance", True, api_name="/retrain"))
                outcome["wall_s"] = time.perf_counter() - began

            with GpuMemory() as memory:
                trainer = threading.Thread(target=retrain)
                trainer.start()
                during: list[dict] = []
                rounds, began = 0, time.perf_counter()
                while trainer.is_alive():
                    during += round_of_users(url, keys, users, "v1", f"training-{rounds}")
                    rounds += 1
                trainer.join()
                during_wall = time.perf_counter() - began
            progress = sorted(args.data_dir.glob("runs/run-*/progress.jsonl"))[-1]
            done = next((json.loads(line) for line in progress.read_text().splitlines() if '"done"' in line), {})
            skipped = sum('"sample_skipped"' in line for line in progress.read_text().splitlines())
            emit({**summary("8 users, v1, while the refresh trains", during, during_wall), "rounds": rounds,
                  "gpu_peak_mib": memory.peak_mib})
            emit({"row": "refresh", "imported": imported.get("imported"), "status": outcome.get("status"),
                  "version": outcome.get("version"), "wall_s": round(outcome.get("wall_s", 0), 1),
                  "train_s": done.get("train_seconds"), "trained_tokens": done.get("trained_tokens"),
                  "train_tok_s": round(done["trained_tokens"] / done["train_seconds"], 1) if done.get(
                      "train_seconds") else None, "trainer_peak_reserved_gib": done.get("peak_reserved_gib"),
                  "samples_skipped": skipped, "app_and_trainer_gpu_peak_mib": memory.peak_mib})
            version = outcome.get("version")
            if version:
                admin.predict("finance", version, api_name="/promote")
                promoted = round_of_users(url, keys, ["finance-employee"], "gradio", "promoted")
                admin.predict("finance", "base", api_name="/promote")  # roll back past the first version
                rolled_back = round_of_users(url, keys, ["finance-employee"], "gradio", "rolled back")
                emit({"row": "promote and roll back", "version": version,
                      "answered_with_after_promote": promoted[0].get("version"),
                      "answered_with_after_rollback": rolled_back[0].get("version") or "base"})
    finally:
        app.terminate()
        try:
            app.wait(timeout=60)
        except subprocess.TimeoutExpired:
            app.kill()
    print("\n| row | users | tok/s per user | tok/s all | TTFT p50 | TTFT max | tokens/answer | GPU peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "users" in r:
            print(f"| {r['row']} | {r['users']} | {r['tok_s_per_user']} | {r['tok_s_all']} | {r['ttft_p50_s']} s | "
                  f"{r['ttft_max_s']} s | {r['tokens_per_answer']} | {r.get('gpu_peak_mib')} |")
    for r in rows:
        if "users" not in r:
            print("|", json.dumps(r, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
