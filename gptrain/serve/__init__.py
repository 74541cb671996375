"""`gptrain serve`: an OpenAI-compatible HTTP server (FastAPI + pydantic + uvicorn) over the continuous-batching
`gptrain.generate.Scheduler`, plus the web chat page. Modules: `config` (ServeConfig, importable without the
`serve` extra), `cli` (the command), `schemas` (the API's request and response models), `service` (requests to
prompts and sampling parameters, limits), `guard` (transport checks in front of the app), `metrics` (Prometheus),
`app` (routes, streaming, errors)."""
