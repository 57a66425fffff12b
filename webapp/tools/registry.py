"""Tool definitions: loaded from TOML files (data, not code), each with its JSON-schema
parameters, who may call it, and how it runs.

    [[tool]]
    name = "get_invoice"
    description = "Look up an invoice in the ERP by its number."
    kind = "http"                      # or "builtin" with handler = "query_sales"
    method = "GET"
    url = "https://erp.example.com/api/invoices/{invoice_id}"
    headers = { Authorization = "Bearer ${ERP_TOKEN}" }   # ${VAR} read from the environment
    roles = ["employee", "reviewer", "admin"]             # default: every role
    departments = ["finance"]                             # default: every department
    side_effect = false                # true: the user approves each call in the chat first
    timeout_s = 10
    retries = 2                        # extra attempts on transient failures only
    backoff_s = 0.5                    # doubled before each retry
    [tool.parameters]                  # JSON schema of the arguments
    type = "object"
    required = ["invoice_id"]
    [tool.parameters.properties.invoice_id]
    type = "string"
    [tool.aliases.region]              # optional: values normalised before validation
    "East China" = "华东"
    ground = ["region"]                # optional: closed parameters the user's own words hold
                                       # (webapp/tools/grounding.py)
    [tool.spellings.metric]            # optional: words of questions that name a closed value,
    "销量" = "units"                    # read by grounding in place of the aliases (which are what
                                       # a model may write: "sales" is also in "unit sales"); an
                                       # optional parameter is grounded only with spellings
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import tomllib
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from storage.accounts import ROLES, User

NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]{0,63}$")
_KEYS = {
    "name", "description", "kind", "handler", "method", "url", "headers", "parameters", "roles",
    "departments", "side_effect", "timeout_s", "retries", "backoff_s", "aliases", "ground", "spellings",
}
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
DEMO_TOOLS_FILE = Path(__file__).with_name("demo_tools.toml")


class ToolConfigError(ValueError):
    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("Invalid tool definitions:\n" + "\n".join(f"  - {p}" for p in self.problems))


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]
    run: Callable[[dict[str, Any], Any], Any] = field(repr=False, compare=False)
    roles: frozenset[str] = frozenset(ROLES)
    departments: frozenset[str] | None = None  # None: every department
    side_effect: bool = False
    timeout_s: float = 10.0
    retries: int = 2
    backoff_s: float = 0.5
    aliases: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    ground: frozenset[str] = frozenset()  # parameters whose value the user's own words hold
    spellings: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # question words -> closed value
    validator: Draft202012Validator | None = field(default=None, repr=False, compare=False)

    def allows(self, user: User) -> bool:
        """Decided from the user's row in the database only; nothing in a conversation
        can widen it."""
        if user.disabled or user.role not in self.roles:
            return False
        return self.departments is None or user.department_id in self.departments

    def function_schema(self) -> dict[str, Any]:
        """The OpenAI/Qwen `tools=` entry the chat template renders."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description, "parameters": self.parameters}}


class ToolRegistry:
    def __init__(self, specs: Sequence[ToolSpec] = ()):
        self._specs: dict[str, ToolSpec] = {}
        for spec in specs:
            self.add(spec)

    def add(self, spec: ToolSpec) -> None:
        if spec.validator is None:
            Draft202012Validator.check_schema(spec.parameters)
            spec = _with_validator(spec)
        self._specs[spec.name] = spec

    def get(self, name: str) -> ToolSpec | None:
        return self._specs.get(name)

    def names(self) -> list[str]:
        return sorted(self._specs)

    def vocabulary(self) -> dict[str, str]:
        """Every spelling of every closed value (enums and their aliases) -> canonical value:
        the regions, product lines ... that make two questions different."""
        out: dict[str, str] = {}
        for spec in self._specs.values():
            for prop in spec.parameters.get("properties", {}).values():
                for value in prop.get("enum", ()):
                    if isinstance(value, str) and len(value) > 1:
                        out[value] = value
            for mapping in spec.aliases.values():
                out.update({alias: canonical for alias, canonical in mapping.items() if len(alias) > 1})
        return out

    def for_user(self, user: User) -> list[ToolSpec]:
        return [spec for name, spec in sorted(self._specs.items()) if spec.allows(user)]


def _with_validator(spec: ToolSpec) -> ToolSpec:
    from dataclasses import replace

    return replace(spec, validator=Draft202012Validator(spec.parameters))


def _expand_env(value: str, environ: Mapping[str, str], where: str, problems: list[str]) -> str:
    def substitute(match: re.Match) -> str:
        name = match.group(1)
        if name not in environ:
            problems.append(f"{where}: environment variable {name} is not set.")
            return ""
        return environ[name]

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", substitute, value)


def load_tool_file(
    path: Path, builtins: Mapping[str, Callable], environ: Mapping[str, str] | None = None
) -> list[ToolSpec]:
    """Tool specs from one TOML file; every problem of the file is reported at once."""
    from webapp.tools.http_tool import make_http_runner

    environ = os.environ if environ is None else environ
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ToolConfigError([f"tools file {path} does not exist (--tools-file)."])
    except tomllib.TOMLDecodeError as exc:
        raise ToolConfigError([f"tools file {path} is not valid TOML: {exc}."])
    problems: list[str] = []
    specs: list[ToolSpec] = []
    entries = data.get("tool", [])
    extra = set(data) - {"tool"}
    if extra:
        problems.append(f"{path}: unknown top-level keys {sorted(extra)}; define tools as [[tool]] tables.")
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        name = entry.get("name", "")
        where = f"{path} tool #{index + 1}" + (f" ({name})" if name else "")
        before = len(problems)
        for key in sorted(set(entry) - _KEYS):
            close = difflib.get_close_matches(key, sorted(_KEYS), n=1)
            problems.append(f"{where}: unknown key {key!r}." + (f" Did you mean {close[0]!r}?" if close else ""))
        if not isinstance(name, str) or not NAME_RE.match(name):
            problems.append(f"{where}: name must be letters, digits and _ (got {name!r}).")
        elif name in seen:
            problems.append(f"{where}: a tool named {name!r} is defined twice.")
        seen.add(name)
        if not str(entry.get("description", "")).strip():
            problems.append(f"{where}: needs a description; the model chooses tools by it.")
        parameters = entry.get("parameters", {"type": "object", "properties": {}})
        try:
            Draft202012Validator.check_schema(parameters)
            if parameters.get("type") != "object":
                problems.append(f"{where}: parameters must be a JSON schema with type = \"object\".")
        except SchemaError as exc:
            problems.append(f"{where}: parameters are not a valid JSON schema: {exc.message}.")
        roles = entry.get("roles", list(ROLES))
        bad_roles = [r for r in roles if r not in ROLES]
        if bad_roles:
            problems.append(f"{where}: unknown roles {bad_roles}; valid roles: {', '.join(ROLES)}.")
        departments = entry.get("departments")
        kind = entry.get("kind", "builtin")
        run = None
        if kind == "builtin":
            handler = entry.get("handler", name)
            run = builtins.get(handler)
            if run is None:
                problems.append(f"{where}: no built-in handler {handler!r}; known: {', '.join(sorted(builtins))}.")
        elif kind == "http":
            method = str(entry.get("method", "GET")).upper()
            url = _expand_env(str(entry.get("url", "")), environ, where, problems)
            if method not in HTTP_METHODS:
                problems.append(f"{where}: method {method!r} is not one of {', '.join(HTTP_METHODS)}.")
            if not url.startswith(("http://", "https://")):
                problems.append(f"{where}: url must start with http:// or https:// (got {url!r}).")
            headers = {k: _expand_env(str(v), environ, where, problems) for k, v in entry.get("headers", {}).items()}
            run = make_http_runner(method, url, headers)
        else:
            problems.append(f"{where}: kind must be \"builtin\" or \"http\" (got {kind!r}).")
        timeout_s, retries, backoff_s = entry.get("timeout_s", 10), entry.get("retries", 2), entry.get("backoff_s", 0.5)
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            problems.append(f"{where}: timeout_s must be a positive number.")
        if not (isinstance(retries, int) and 0 <= retries <= 10):
            problems.append(f"{where}: retries must be an integer from 0 to 10.")
        ground, spellings = entry.get("ground", []), entry.get("spellings", {})
        properties = (parameters.get("properties") or {}) if isinstance(parameters, dict) else {}
        required = set(parameters.get("required") or ()) if isinstance(parameters, dict) else set()
        if not (isinstance(ground, list) and all(isinstance(g, str) and (g in required or g in spellings)
                                                 for g in ground)):
            problems.append(f"{where}: ground must list required parameters of the tool, or optional ones with "
                            f"[tool.spellings.<parameter>] (got {ground!r}).")
        for parameter, table in spellings.items() if isinstance(spellings, dict) else ():
            allowed = (properties.get(parameter) or {}).get("enum")
            if not allowed or not isinstance(table, dict) or any(v not in allowed for v in table.values()):
                problems.append(f"{where}: spellings.{parameter} must map words to values of the parameter's enum.")
        if len(problems) > before:
            continue
        specs.append(_with_validator(ToolSpec(
            name=name, description=entry["description"].strip(), parameters=parameters, run=run,
            roles=frozenset(roles), departments=frozenset(departments) if departments is not None else None,
            side_effect=bool(entry.get("side_effect", False)), timeout_s=float(timeout_s), retries=retries,
            backoff_s=float(backoff_s), aliases=entry.get("aliases", {}), ground=frozenset(ground),
            spellings=spellings,
        )))
    if problems:
        raise ToolConfigError(problems)
    return specs


def load_registry(paths: Sequence[Path], builtins: Mapping[str, Callable],
                  environ: Mapping[str, str] | None = None) -> ToolRegistry:
    problems: list[str] = []
    registry = ToolRegistry()
    for path in paths:
        try:
            for spec in load_tool_file(path, builtins, environ):
                if registry.get(spec.name):
                    problems.append(f"{path}: tool {spec.name!r} is already defined in another file.")
                registry.add(spec)
        except ToolConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ToolConfigError(problems)
    return registry
