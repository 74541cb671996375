"""gptrain models in EleutherAI's lm-evaluation-harness (0.4.x), registered as model type `gptrain`.

`GptrainLM` builds on the harness's `TemplateLM`, so requests are tokenized exactly as its `hf` model tokenizes
them (trailing context spaces move to the continuation; an empty context is scored after <|endoftext|>); the
token-level scoring is gptrain's batched scorer, which cuts over-long requests from the left to the model's context
window (1024, or 2048 for GPT-3 shapes) as `hf` does. Any `--model SRC` loads (`gptrain.hf.load_model`): a raw
training run or checkpoint works without export. Also usable from lm-eval itself after `import gptrain.eval.harness`:
`lm_eval --model gptrain --model_args pretrained=RUN_DIR ...`.
"""

from __future__ import annotations

import os
import subprocess
from unittest import mock

from gptrain.errors import GptrainError, require

lm_eval = require("lm_eval", "gptrain eval lm-eval")

import lm_eval.models  # noqa: E402,F401  (lm-eval fills its model registry lazily, only while it is empty:
import lm_eval.utils  # noqa: E402       registering ours first would hide `hf` and the other built-in models)
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402

from gptrain.eval.scoring import Progress, score_continuations  # noqa: E402
from gptrain.tokenizer import tokenizer_for_vocab  # noqa: E402


@register_model("gptrain")
class GptrainLM(TemplateLM):
    def __init__(self, pretrained: str | None = None, model=None, batch_size: int | str = 32, device: str | None = None,
                 max_gen_toks: int = 256, **_ignored):
        super().__init__()
        if model is None:
            if not pretrained:
                raise GptrainError("the gptrain lm-eval model needs pretrained=SRC (a run, checkpoint or HF directory)")
            from gptrain.hf import load_model
            model = load_model(str(pretrained), flag="pretrained=")
        if device:
            model = model.to(device)
        self.model = model.eval()
        self.tok = tokenizer_for_vocab(model.config.vocab_size)
        self.max_length = model.config.block_size
        self.max_gen_toks = int(max_gen_toks)
        # lm-eval passes its own --batch_size through ("auto" and "auto:N" too): those get the default
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 32

    @property
    def eot_token_id(self) -> int:
        return self.tok.eot

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tok.decode(tokens)

    def _score(self, requests: list[tuple[list[int], list[int]]], desc: str, disable_tqdm: bool) -> list:
        bar = Progress(len(requests), desc, "requests", enabled=not disable_tqdm)
        return score_continuations(self.model, requests, batch_size=self.batch_size, progress=bar)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        scores = self._score([(ctx, cont) for _, ctx, cont in requests], "loglikelihood", disable_tqdm)
        results = []
        for (key, _, _), s in zip(requests, scores):
            answer = (-s.nll, s.greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            results.append(answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood over disjoint windows of the context length (perplexity tasks)."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_eval.utils.make_disjoint_window, lm_eval.utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, s in zip(owner, self._score(windows, "loglikelihood_rolling", disable_tqdm)):
            totals[i] -= s.nll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, if the task asks) continuations, cut before the first `until` string."""
        from gptrain.generate import Engine, SamplingParams
        engine = Engine(self.model, self.tok)
        bar = Progress(len(requests), "generate_until", "requests", enabled=not disable_tqdm)
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or [self.tok.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            sample = bool(kwargs.get("do_sample", False)) and float(kwargs.get("temperature", 0.0)) > 0
            prompt = (self.tok_encode(context) or [self.eot_token_id])[-max(1, self.max_length - max_new):]
            params = SamplingParams(max_new_tokens=max_new, temperature=float(kwargs["temperature"]) if sample else 0.0,
                                    top_k=None, top_p=kwargs.get("top_p") if sample else None, context="slide",
                                    stop=tuple(until))
            gen = engine.generate([prompt], params)
            for _ in gen:
                pass
            out.append(gen.texts[0])
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), gen.texts[0])
            bar.update(1)
        return out


def evaluate(model, tasks: list[str], *, include_path: str | None = None, limit: int | None = None,
             batch_size: int = 32, device: str | None = None) -> dict:
    """lm-eval's results dict for `tasks` (names, tags or groups; local task YAMLs under `include_path`)."""
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager
    manager = None
    if include_path:  # indexing lm-eval's own thousands of task YAMLs takes ~10 s: skip it when the local ones suffice
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if not all(manager.match_tasks([t]) for t in tasks):
            manager = None
    manager = manager or TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise GptrainError(f"--tasks {','.join(unknown)}: unknown to lm-eval"
                           f"{f' and to --include-path {include_path}' if include_path else ''}; "
                           "see `lm_eval ls tasks` or add a task YAML under --include-path")
    lm = GptrainLM(model=model, batch_size=batch_size, device=device)
    try:
        with mock.patch.object(evaluator, "get_git_commit_hash", _git_commit_hash):
            return evaluator.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                             batch_size=batch_size, log_samples=False)
    except OSError as e:  # datasets' ConnectionError (hub unreachable), missing local data_files, ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GptrainError(f"lm-eval could not load the data of --tasks {','.join(tasks)} ({msg}); offline, use task "
                           "YAMLs that read local files (dataset_path: json + data_files) via --include-path") from None


def _git_commit_hash() -> str | None:
    """lm-eval's `get_git_commit_hash` (the working directory's commit, recorded in its results) without the
    "fatal: not a git repository" that its `git describe` leaves on the terminal outside a repository."""
    try:
        return subprocess.run(["git", "describe", "--always"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):  # lm-eval's fallback: read ./.git itself
        from lm_eval.loggers.utils import get_commit_from_path
        return get_commit_from_path(os.getcwd())
