"""Schemathesis against the OpenAPI document the server publishes (benchmarks/serve_fuzz.py, bounded here to a few
seconds): requests generated to fit the schema and to break it must never get a 500, every answer must match the
documented status codes, content types and schemas, invalid requests must be refused, and afterwards the server
answers a normal request with no error in its log."""

import logging
import sys

import pytest
import torch

pytest.importorskip("schemathesis", reason="the API fuzz test needs schemathesis (pip install 'gptrain[dev]')")
pytest.importorskip("fastapi", reason="gptrain serve needs the serve extra (pip install 'gptrain[serve]')")

from conftest import ROOT  # noqa: E402
from gptrain.model import GPT, GPTConfig  # noqa: E402
from gptrain.serve.app import BackgroundServer, create_app  # noqa: E402
from gptrain.serve.config import ServeConfig  # noqa: E402
from gptrain.serve.service import Service  # noqa: E402

KEY = "fuzz-key"


class Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.seen = []

    def emit(self, record):
        if record.levelno >= logging.ERROR or record.exc_info:
            self.seen.append(f"{record.name}: {record.getMessage()}")


def test_schema_fuzz_gets_no_500_and_the_server_stays_clean():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serve_fuzz import alive, fuzz
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50261, n_layer=1, n_head=2, n_embd=32))
    errors = Errors()
    logging.getLogger().addHandler(errors)
    try:
        cfg = ServeConfig(api_key=KEY, max_tokens_limit=2, max_batch=2, max_queue=4, request_timeout=2)
        with BackgroundServer(create_app(Service(model, "fuzz", cfg))) as srv:
            res = fuzz(srv.url, KEY, examples=12)
            assert alive(srv.url, KEY)
    finally:
        logging.getLogger().removeHandler(errors)
    assert res["failures"] == []
    assert res["requests"] >= 60 and 500 not in res["codes"] and {200, 400} <= set(res["codes"])
    assert errors.seen == []
