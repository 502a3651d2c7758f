"""Fuzz `depthwave serve` from its own /openapi.json with schemathesis: for every endpoint, requests generated to
fit the schema (positive) and to break it (negative), seeded. Each response is checked: no 5xx; status, content
type and body as documented; a body that breaks the schema refused; every 4xx in OpenAI's error shape. Then the
server must still answer a normal request.

    python benchmarks/fuzz_serve.py                      # 400 cases per endpoint and mode, a fresh server
    python benchmarks/fuzz_serve.py --examples 50 --url http://127.0.0.1:8000

Prints the cases by endpoint and status, the failures, and saves it all as JSON (`--out`). The test suite runs the
same `fuzz` with a small budget (tests/test_serve_fuzz.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import schemathesis
from hypothesis import HealthCheck, Phase, given
from schemathesis import GenerationMode
from schemathesis.core.failures import FailureGroup

SERVER_FLAGS = ["--sampler", "static", "--num-steps", "4", "--max-num-seqs", "8", "--admission-delay", "0"]
"""The static sampler at 4 recurrences: generated completions are cheap, so the run covers more cases."""


@dataclass
class Report:
    cases: int = 0
    seconds: float = 0.0
    by_status: dict[str, int] = field(default_factory=dict)
    """"POST /v1/completions 400": count."""
    failures: list[dict[str, Any]] = field(default_factory=list)
    alive_after: bool = False

    @property
    def ok(self) -> bool:
        return not self.failures and self.alive_after


def checks() -> list[Any]:
    """No 5xx; statuses, content types and bodies as documented; bodies that break the schema refused."""
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi import checks as openapi

    return [
        not_a_server_error,
        openapi.status_code_conformance,
        openapi.content_type_conformance,
        openapi.response_schema_conformance,
        openapi.negative_data_rejection,
    ]


def openai_error_problem(response: Any) -> str | None:
    """Why a 4xx body is not in OpenAI's shape {"error": {"message", "type", "param", "code"}}, or None."""
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"not an OpenAI error body: {type(exc).__name__}: {response.text[:200]!r}"
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return f"error keys {sorted(error) if isinstance(error, dict) else error!r}"
    if not (isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)):
        return f"error message/type {error!r}"
    if error["param"] is not None and not isinstance(error["param"], str):
        return f"error param {error['param']!r}"
    return None


def run_case(case: Any, report: Report, timeout: float) -> None:
    label = f"{case.method} {case.path}"
    try:
        response = case.call(timeout=timeout)
    except Exception as exc:  # no answer at all: as bad as a 5xx
        report.failures.append({"operation": label, "problem": f"no response: {type(exc).__name__}: {exc}"})
        return
    report.cases += 1
    key = f"{label} {response.status_code}"
    report.by_status[key] = report.by_status.get(key, 0) + 1
    problems = []
    try:
        case.validate_response(response, checks=checks())
    except (AssertionError, FailureGroup) as exc:  # schemathesis's failures: one, or a group of them
        failures = exc.exceptions if isinstance(exc, FailureGroup) else (exc,)
        problems += [
            f"{type(f).__name__}: {str(f).strip().splitlines()[0] if str(f).strip() else ''}" for f in failures
        ]
    if 400 <= response.status_code < 500:
        problem = openai_error_problem(response)
        if problem:
            problems.append(problem)
    for problem in problems:
        report.failures.append(
            {"operation": label, "status": response.status_code, "problem": problem, "body": repr(case.body)[:4000]}
        )


def fuzz(url: str, examples: int, seed: int = 0, timeout: float = 120.0) -> Report:
    """`examples` generated cases per endpoint and mode (positive, negative) against the server at `url`."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    report = Report()
    began = time.perf_counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hypothesis.seed(seed)
            @hypothesis.settings(
                max_examples=examples,
                deadline=None,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def one(case: Any) -> None:
                run_case(case, report, timeout)

            try:
                one()
            except hypothesis.errors.Unsatisfiable:
                if mode is GenerationMode.POSITIVE:
                    raise
                # An endpoint that takes no input (GET /health) has nothing to break.
    report.seconds = time.perf_counter() - began
    # A chat request: the built-in model answers questions in its chat format (a raw prompt may end at once).
    body = {"messages": [{"role": "user", "content": "What is 3 + 4?"}], "max_tokens": 8, "temperature": 0}
    after = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)
    report.alive_after = after.status_code == 200 and bool(after.json()["choices"][0]["message"]["content"])
    return report


def table(report: Report) -> str:
    by_operation: dict[str, Counter[str]] = {}
    for key, count in report.by_status.items():
        method, path, status = key.split(" ")
        by_operation.setdefault(f"{method} {path}", Counter())[status] += count
    lines = ["| endpoint | cases | by status |", "|---|---|---|"]
    for operation, counts in sorted(by_operation.items()):
        shown = ", ".join(f"{s}: {n}" for s, n in sorted(counts.items()))
        lines.append(f"| {operation} | {sum(counts.values())} | {shown} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=400, help="Cases per endpoint and mode (positive, negative).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--url", help="Fuzz this server instead of starting `depthwave serve`.")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fuzz_serve.json"))
    args = parser.parse_args(argv)
    if args.url:
        report = fuzz(args.url, args.examples, args.seed)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_serve import local_server

        with local_server(SERVER_FLAGS) as (url, _):
            report = fuzz(url, args.examples, args.seed)
    print(table(report))
    print(
        f"{report.cases} cases in {report.seconds:.0f} s (seed {args.seed}, {args.examples} per endpoint and mode): "
        f"{len(report.failures)} failures; a normal request afterwards: {'ok' if report.alive_after else 'FAILED'}"
    )
    for failure in report.failures[:20]:
        print(" ", {**failure, "body": failure["body"][:300]})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seed": args.seed, "examples": args.examples, **asdict(report)}, indent=1))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
