"""Chat path vs plain model.generate on the same model, in the same run.

Measures, for the same prompts with greedy decoding (so both produce the same tokens):
  - baseline: `model.generate` on the rendered prompt (time to first token = a 1-token
    generate; tokens/s over the whole answer)
  - engine:   hangjia's TurnRunner.stream_turn (storage, prompt building, streaming, logging)
  - http:     the launched Gradio app's /chat endpoint through gradio_client, as programs use it
and prints the figures, the ratios against the baseline (target >= 0.95) and memory.

    .venv/bin/python bench/chat_path.py [--model embedded] [--max-new-tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = [
    "What is a balance sheet? Explain it to a new employee.",
    "Write a short, polite email asking a colleague for the Q3 sales report.",
    "List five things to check before approving an expense claim.",
    "Explain the difference between revenue and profit.",
]


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def bench_baseline(model_service, prompt: str, max_new_tokens: int) -> tuple[float, float, int]:
    import torch

    tok = model_service.tokenizer
    inputs = tok(prompt, return_tensors="pt", add_special_tokens=False)
    common = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model_service.model.generate(**inputs, max_new_tokens=1, **common)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model_service.model.generate(**inputs, max_new_tokens=max_new_tokens, **common)
        total = time.perf_counter() - t0
    n = int(out.shape[1] - inputs["input_ids"].shape[1])
    return ttft * 1000, n / total, n


def bench_engine(services, user, text: str) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    final = None
    for update in services.engine.turns.stream_turn(user, text):
        final = update
    total = time.perf_counter() - t0
    row = services.db.query_one(
        "SELECT ttft_ms, completion_tokens FROM messages WHERE id = ?", [final.message_id]
    )
    return row["ttft_ms"], row["completion_tokens"] / total, row["completion_tokens"]


HTTP_CLIENT = """
import json, sys, time
from gradio_client import Client
url, max_rounds = sys.argv[1], None
client = Client(url, auth=("finance-employee", "hangjia-demo"), verbose=False)
for line in sys.stdin:
    text = json.loads(line)
    t0 = time.perf_counter(); ttft = None
    job = client.submit(text, None, api_name="/chat")
    for update in job:
        if ttft is None and update["answer"]:
            ttft = (time.perf_counter() - t0) * 1000
    final = job.result()
    print(json.dumps({"ttft_ms": ttft, "seconds": time.perf_counter() - t0, "message_id": final["message_id"]}), flush=True)
"""


class HttpClient:
    """A gradio_client in its own process, like a browser: it does not share the GIL or
    the CPU threads of the server process being measured."""

    def __init__(self, url: str):
        import subprocess

        self.proc = subprocess.Popen([sys.executable, "-c", HTTP_CLIENT, url], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def ask(self, services, text: str) -> tuple[float, float, int]:
        import json

        self.proc.stdin.write(json.dumps(text) + "\n")
        self.proc.stdin.flush()
        result = json.loads(self.proc.stdout.readline())
        n = services.db.scalar("SELECT completion_tokens FROM messages WHERE id = ?", [result["message_id"]])
        return result["ttft_ms"], n / result["seconds"], n

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models-dir", type=Path, default=Path("hangjia-data/models"),
                        help="where the embedded model is (or gets) converted")
    args = parser.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    import torch

    from webapp.app import build_app, launch_options
    from webapp.models import ModelSpec, load_model_service
    from webapp.services import open_services
    from webapp.settings import Settings

    torch.manual_seed(0)
    rss_start = rss_mib()
    model = load_model_service(ModelSpec(args.model), args.models_dir)
    rss_model = rss_mib()
    data_dir = Path(tempfile.mkdtemp(prefix="hangjia-bench-"))
    settings = Settings(data_dir=data_dir, demo=True, model=args.model, temperature=0.0,
                        max_new_tokens=args.max_new_tokens, port=7891)
    services = open_services(settings, model=model)
    user = services.auth.current_user("finance-employee")
    app = build_app(services)
    app.queue().launch(server_name="127.0.0.1", server_port=settings.port, prevent_thread_lock=True,
                       quiet=True, **launch_options(services))
    client = HttpClient(f"http://127.0.0.1:{settings.port}/")

    tools = [spec.function_schema() for spec in services.tools.tools_for(user)]

    def render(text):
        # exactly the prompt the app builds for this user: system prompt and the tools offered
        return model.render_prompt([{"role": "system", "content": settings.system_prompt},
                                    {"role": "user", "content": text}], tools)

    # warm-up: first calls pay one-off costs (allocator, kernels, HTTP session)
    bench_baseline(model, render(PROMPTS[0]), 8)
    bench_engine(services, user, PROMPTS[0])
    client.ask(services, PROMPTS[0])

    rows = {"baseline generate": [], "engine stream_turn": [], "http /chat": []}
    for _ in range(args.repeats):
        for text in PROMPTS:
            # interleaved, so drift of the machine hits all three alike
            rows["baseline generate"].append(bench_baseline(model, render(text), args.max_new_tokens))
            rows["engine stream_turn"].append(bench_engine(services, user, text))
            rows["http /chat"].append(client.ask(services, text))

    base_tps = statistics.median(r[1] for r in rows["baseline generate"])
    base_ttft = statistics.median(r[0] for r in rows["baseline generate"])
    print(f"\nmodel {model.name} on {model.device} ({model.model.dtype}), torch threads {torch.get_num_threads()}, "
          f"greedy, max_new_tokens {args.max_new_tokens}, {len(PROMPTS)} prompts x {args.repeats}, "
          f"prompt {model.count_tokens(render(PROMPTS[0]))} tokens with {len(tools)} tools")
    print(f"{'path':<22}{'TTFT ms (median)':>18}{'tok/s (median)':>16}{'tokens':>8}{'tok/s vs base':>15}")
    for name, results in rows.items():
        ttft = statistics.median(r[0] for r in results)
        tps = statistics.median(r[1] for r in results)
        tokens = sum(r[2] for r in results)
        print(f"{name:<22}{ttft:>18.1f}{tps:>16.2f}{tokens:>8}{tps / base_tps:>15.3f}")
    print(f"TTFT ratio engine/base: {statistics.median(r[0] for r in rows['engine stream_turn']) / base_ttft:.2f}")
    print(f"RSS: start {rss_start:.0f} MiB, model loaded {rss_model:.0f} MiB, end {rss_mib():.0f} MiB, "
          f"peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    client.close()
    app.close()
    services.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
