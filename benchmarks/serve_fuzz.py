"""Fuzz a gptrain server from its own OpenAPI document with Schemathesis: for every operation, requests generated
to fit the schema (positive) and to break it (negative), sent over HTTP; every answer is checked by Schemathesis
(no 500, documented status code, content type and response schema, invalid data refused). Valid requests may
still be refused (positive_data_acceptance is not checked): the server turns away what it cannot serve (max_tokens
over its limit, prompts over the context window, a full queue) by design. Prints requests tried, status codes seen
and any failure; afterwards the server must answer a normal request and (when started here) its log must hold no
traceback.

    python benchmarks/serve_fuzz.py                    # starts gptrain serve on a small random chat model
    python benchmarks/serve_fuzz.py http://127.0.0.1:8000 --api-key KEY --examples 200
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_spawn import random_model, spawned_server  # noqa: E402


def fuzz(url: str, key: str | None, *, examples: int = 30, seed: int = 0) -> dict:
    """Run every operation × (positive, negative) for `examples` generated cases each; returns the counts."""
    import schemathesis
    from hypothesis import HealthCheck, given, seed as hyp_seed, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    codes, per_op, failures = collections.Counter(), collections.Counter(), []
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @hyp_seed(seed)
            @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def one(case):
                response = case.call(base_url=url, headers=headers, timeout=60)
                codes[response.status_code] += 1
                per_op[(op.label, str(mode), response.status_code)] += 1
                try:
                    case.validate_response(response, excluded_checks=[positive_data_acceptance], headers=headers)
                except Exception as e:  # noqa: BLE001 -- record every failure and go on
                    failures.append(f"{op.label} ({mode}): {response.status_code}: {str(e).strip()[:500]}")
            try:
                one()
            except Unsatisfiable:  # nothing can break this operation's schema (a GET without parameters)
                pass
    return {"requests": sum(codes.values()), "codes": codes, "per_operation": per_op, "failures": failures}


def report(res: dict, seconds: float) -> str:
    lines = [f"{res['requests']} requests in {seconds:.1f} s; status codes: "
             + ", ".join(f"{c}: {n}" for c, n in sorted(res["codes"].items())), "",
             "| operation | mode | status codes |", "|---|---|---|"]
    rows = collections.defaultdict(collections.Counter)
    for (op, mode, code), n in res["per_operation"].items():
        rows[(op, mode)][code] += n
    for (op, mode), c in sorted(rows.items()):
        lines.append(f"| {op} | {mode} | " + ", ".join(f"{k}: {v}" for k, v in sorted(c.items())) + " |")
    lines.append("")
    lines.append("PASS: no 500, every answer as documented" if not res["failures"] else
                 f"FAIL ({len(res['failures'])}):\n  " + "\n  ".join(res["failures"][:20]))
    return "\n".join(lines)


def alive(url: str, key: str | None) -> bool:
    import httpx
    r = httpx.post(url + "/v1/completions", json={"prompt": "still there?", "max_tokens": 2}, timeout=30,
                   headers={"Authorization": f"Bearer {key}"} if key else {})
    return r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url", nargs="?", help="a running server (default: start gptrain serve on a random model)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--examples", type=int, default=200, help="generated cases per operation and mode")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    problems = []
    if args.url:
        res = fuzz(args.url, args.api_key, examples=args.examples, seed=args.seed)
        ok = alive(args.url, args.api_key)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            model = random_model(Path(tmp) / "model", block_size=128, n_layer=2, n_head=2, n_embd=64)
            key = "fuzz-run-key"
            with spawned_server(model, Path(tmp) / "serve.log", "--api-key", key, "--max-tokens-limit", "16",
                                "--max-batch", "8", "--max-queue", "32", "--request-timeout", "5", "--dtype",
                                "float32", "--no-access-log") as srv:
                res = fuzz(srv.url, key, examples=args.examples, seed=args.seed)
                ok = alive(srv.url, key)
                log = srv.log_text()
            problems += [f"the server's log has {bad!r}" for bad in ("Traceback", "Exception in ASGI") if bad in log]
    print(report(res, time.perf_counter() - t0))
    if not ok:
        problems.append("the server did not answer a normal request afterwards")
    print("\n".join(problems) or "server alive and answering afterwards" + (", log clean" if not args.url else ""))
    print(json.dumps({"requests": res["requests"], "codes": dict(res["codes"])}))
    return 1 if res["failures"] or problems else 0


if __name__ == "__main__":
    sys.exit(main())
