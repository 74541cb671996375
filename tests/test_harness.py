"""gptrain's lm-eval model against lm-eval's own `hf` model on the exported directory, fully offline."""

import gzip
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's hf model needs it

from lm_eval.api.instance import Instance  # noqa: E402

from gptrain.cli import main as gptrain_main  # noqa: E402
from gptrain.eval import harness  # noqa: E402
from gptrain.hf import save_pretrained  # noqa: E402
from gptrain.model import GPT, GPTConfig  # noqa: E402

HELLASWAG = Path(__file__).resolve().parents[2] / "shared" / "data" / "hellaswag" / "hellaswag_val.jsonl.gz"


class _NoLoader:
    def state_dict(self):
        return {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny GPT saved as a raw training checkpoint and exported for transformers; lm-eval's `hf` model on it."""
    from gptrain.train.checkpoint import Checkpointer
    from lm_eval.models.huggingface import HFLM
    tmp = tmp_path_factory.mktemp("harness")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0, 1.0)  # decisive logits: no near-ties between the two models
    run = tmp / "run"
    Checkpointer(run, model=model, optimizer=torch.optim.AdamW(model.parameters()), loader=_NoLoader(),
                 config={}).save(step=1, tokens_seen=0)
    save_pretrained(model, tmp / "export")
    hf = HFLM(pretrained=str(tmp / "export"), device="cpu", batch_size=8, dtype="float32")
    return dict(tmp=tmp, model=model.eval(), run=run, export=tmp / "export", hf=hf)


def test_hellaswag_task_matches_lm_evals_hf_model(setup, tmp_path):
    """`gptrain eval lm-eval` on the raw checkpoint == lm-eval's `hf` on the export, on a local HellaSwag subset
    preprocessed by lm-eval's own hellaswag task (included; only the data source is replaced)."""
    if not HELLASWAG.is_file():
        pytest.skip(f"{HELLASWAG} is absent (it exists only on the project's own machines)")
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager
    import lm_eval
    subset = tmp_path / "hellaswag_subset.jsonl"
    with gzip.open(HELLASWAG, "rt") as f:
        subset.write_text("".join(next(f) for _ in range(12)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    builtin = Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "hellaswag.yaml"
    (tasks / "hellaswag_local.yaml").write_text(
        f"include: {builtin}\ntask: hellaswag_local\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {subset}\ntraining_split: null\n")

    out = tmp_path / "ours.json"
    assert gptrain_main(["eval", "lm-eval", "--model", str(setup["run"]), "--tasks", "hellaswag_local",
                         "--include-path", str(tasks), "--limit", "10", "--batch-size", "7", "--json", str(out)]) == 0
    ours = json.loads(out.read_text())["hellaswag_local"]

    ref = evaluator.simple_evaluate(model=setup["hf"], tasks=["hellaswag_local"], limit=10, log_samples=False,
                                    task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    theirs = ref["results"]["hellaswag_local"]
    assert ours["n"] == 10
    assert (ours["acc"], ours["acc_norm"]) == (theirs["acc,none"], theirs["acc_norm,none"])


def _requests(kind, args_list):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


def test_loglikelihoods_match_hf_including_left_truncation(setup):
    # built the way `lm_eval --model gptrain --model_args pretrained=RUN` builds it: from the raw checkpoint
    ours = harness.GptrainLM.create_from_arg_string(f"pretrained={setup['run']}",
                                                    {"batch_size": 3, "max_batch_size": None, "device": "cpu"})
    long_ctx = "The quick brown fox jumps over the lazy dog. " * 40  # ~400 tokens: cut from the left to 256
    # shared contexts (scored once per group) next to contexts of their own and over-long requests cut from the left
    pairs = [("The capital of France is", " Paris"), ("", "Hello world"), ("Numbers: 1, 2, 3,", " 4, 5"),
             ("trailing space ", "moves"), (long_ctx, " And then the end."), ("The capital of France is", " Rome"),
             ("Numbers: 1, 2, 3,", " 4"), ("The capital of France is", " a city on the Seine"), (long_ctx, " Fin.")]
    got = ours.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    want = setup["hf"].loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    for (a, ga), (b, gb) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-4) and ga == gb

    docs = [("A short document.",), ("Rolling windows over a document longer than the window. " * 30,)]
    got = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", docs), disable_tqdm=True)
    want = setup["hf"].loglikelihood_rolling(_requests("loglikelihood_rolling", docs), disable_tqdm=True)
    assert got == pytest.approx(want, rel=1e-5)


def test_generate_until_matches_hf_greedy(setup):
    ours = harness.GptrainLM(model=setup["model"])
    reqs = [("Once upon a time", {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}),
            ("Q: 2+2?\nA:", {"until": ["."], "max_gen_toks": 8})]
    got = ours.generate_until(_requests("generate_until", reqs), disable_tqdm=True)
    want = setup["hf"].generate_until(_requests("generate_until", reqs), disable_tqdm=True)
    assert got == want and all(isinstance(t, str) for t in got)


def test_missing_task_data_is_a_one_line_error(setup, tmp_path, capsys):
    import lm_eval
    builtin = Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "hellaswag.yaml"
    (tmp_path / "t.yaml").write_text(
        f"include: {builtin}\ntask: hellaswag_nodata\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {tmp_path / 'missing.jsonl'}\ntraining_split: null\n")
    assert gptrain_main(["eval", "lm-eval", "--model", str(setup["export"]), "--tasks", "hellaswag_nodata",
                         "--include-path", str(tmp_path), "--limit", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("gptrain: error: lm-eval could not load the data of --tasks hellaswag_nodata")
    assert "missing.jsonl" in err


def test_no_git_noise_outside_a_repository(setup, tmp_path, monkeypatch, capfd):
    """lm-eval records the working directory's git commit; outside a repository git's "fatal: not a git
    repository" must not reach the terminal (and the result still says there is no commit)."""
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": f"Question {i}:", "choices": [" yes", " no"], "label": i % 2}) + "\n"
                            for i in range(2)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "qa.yaml").write_text(
        f"task: qa_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # even if the temp directory sits inside a repo
    capfd.readouterr()
    out = harness.evaluate(setup["model"], ["qa_local"], include_path=str(tasks), batch_size=2, device="cpu")
    assert out["results"]["qa_local"]["acc,none"] in (0.0, 0.5, 1.0)
    assert out["git_hash"] is None and "not a git repository" not in capfd.readouterr().err
