"""The `serve` command: load a model, check the address and key, and run the app under uvicorn in the foreground.
FastAPI, uvicorn and prometheus_client come from the `serve` extra and are imported only here, in `main`."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from gptrain.config import add_dataclass_args, overrides_from_args
from gptrain.errors import GptrainError, require
from gptrain.serve.config import LOOPBACK, ServeConfig

MIN_KEY_LENGTH = 16  # beyond loopback: guessing one of 64^16 keys over HTTP is out of reach


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="SRC",
                        help="a gptrain run or checkpoint, HF directory or llm.c .bin: any model answers "
                             "/v1/completions, chat models (gptrain sft) also /v1/chat/completions and the chat page")
    parser.add_argument("--name", default=None, help="model name reported by the API (default: SRC's last component)")
    add_dataclass_args(parser, ServeConfig)


def resolve(args) -> ServeConfig:
    """The options, the key taken from $GPTRAIN_API_KEY when not given; refuses to expose the API without a key."""
    cfg = ServeConfig(**overrides_from_args(args, ServeConfig))
    cfg.api_key = cfg.api_key if cfg.api_key is not None else os.environ.get("GPTRAIN_API_KEY")
    cfg.api_key = cfg.api_key or None
    if cfg.api_key is not None and not cfg.keys:
        raise GptrainError(f"--api-key {cfg.api_key!r} has no key in it (only spaces and commas); give a key, "
                           "or leave --api-key and GPTRAIN_API_KEY unset for no key")
    if cfg.host not in LOOPBACK:
        if cfg.api_key is None and not cfg.insecure_no_auth:
            raise GptrainError(f"--host {cfg.host} would let other machines use the API without a key; pass "
                               "--api-key KEY (or set GPTRAIN_API_KEY), or --insecure-no-auth to serve it open")
        short = next((k for k in cfg.keys if len(k) < MIN_KEY_LENGTH), None)
        if short is not None:
            raise GptrainError(f"--api-key: a key of {len(short)} characters is too easy to guess for --host "
                               f"{cfg.host}; use at least {MIN_KEY_LENGTH}, e.g. "
                               "$(python -c 'import secrets; print(secrets.token_urlsafe(24))')")
    return cfg


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as e:
        sock.close()
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise GptrainError(f"cannot listen on {host}:{port} ({why}); pick another --port or --host") from None
    return sock


def main(args) -> int:
    cfg = resolve(args)
    for module in ("fastapi", "uvicorn", "prometheus_client"):
        require(module, "gptrain serve")

    import torch

    # Only the scheduler's threads decode on several torch threads; this one loads the model and then runs the event
    # loop on one. A second OpenMP team here would leave more OpenMP threads than cores, and libgomp's waiting
    # threads then sleep at every barrier of a decode step (gptrain/scheduler.py).
    threads = torch.get_num_threads()
    cfg.threads = cfg.threads or threads
    torch.set_num_threads(1)
    try:
        return _serve(args, cfg)
    finally:
        torch.set_num_threads(threads)  # as it was, for a caller in this process


def _serve(args, cfg: ServeConfig) -> int:
    import uvicorn

    from gptrain.devices import inference_dtype
    from gptrain.hf import load_model
    from gptrain.serve.app import create_app, uvicorn_config
    from gptrain.serve.service import Service
    from gptrain.train.distributed import choose_device

    device = choose_device(cfg.device)
    model = load_model(args.model, device=device).to(inference_dtype(device, cfg.dtype))
    service = Service(model, args.name or Path(args.model).name or args.model, cfg)
    app = create_app(service)
    sock = listen(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    shown = "<this machine's address>" if host in ("0.0.0.0", "::") else f"[{host}]" if ":" in host else host
    base = f"http://{shown}:{port}"
    if cfg.host not in LOOPBACK:
        print(f"warning: listening on {host}, reachable from other machines"
              f"{'; the API has NO key (--insecure-no-auth)' if cfg.api_key is None else ''}", flush=True)
    pools = service.scheduler.stats()["pools"]
    if pools < cfg.pools:
        print(f"note: --pools {cfg.pools} is more than --max-batch {service.cfg.max_batch}: {pools} pool(s) of one "
              "row each", flush=True)
    routes = "chat/completions, completions, models" if service.kind == "chat" else "completions, models"
    print(f"gptrain serve: {service.name} ({service.kind} model) on {service.device}, {service.dtype}, context "
          f"{service.context} tokens, batch {service.cfg.max_batch} in {pools} pool(s) of "
          f"{service.scheduler.threads} thread(s), "
          f"queue {cfg.max_queue}\n"
          + (f"  chat page: {base}/\n" if service.kind == "chat" else "")
          + f"  API:       {base}/v1 ({routes}){'  key required' if cfg.api_key else ''}\n"
          f"  docs:      {base}/docs   health: {base}/health   metrics: {base}/metrics\n"
          "Ctrl-C stops the server.", flush=True)
    server = uvicorn.Server(uvicorn_config(app, log_level="info", access_log=cfg.access_log,
                                           timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
    return 0
