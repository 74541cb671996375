"""Bad command lines: every value is checked against its field's range before any work, with one line on stderr
(exit 2, no traceback); typos get a suggestion; help shows the preset. Includes a property-based fuzz of every
numeric option of prepare, train, sft, eval, sample, chat and serve."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptrain.cli import build_parser, main
from gptrain.config import runtime_fields
from gptrain.data.shards import write_shard
from gptrain.train.config import TrainConfig


def run(argv):
    """(exit code, stdout, stderr) of `gptrain ARGV` in this process; any exception but SystemExit escapes."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code, err, *needles):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("gptrain: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


@pytest.fixture
def data(small_shards):
    """Real shards (the old code would have trained on them): a bad value must stop before that."""
    return small_shards


TRAIN = ["--preset", "tiny", "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--seq-len", "16",
         "--micro-batch-size", "2", "--total-batch-size", "32", "--max-steps", "2", "--eval-every", "0",
         "--sample-every", "0", "--threads", "1"]


@pytest.mark.parametrize("flags, needle", [
    (["--micro-batch-size", "0"], "--micro-batch-size 0 is out of range: it must be >= 1"),  # was ZeroDivisionError
    (["--seq-len", "0"], "--seq-len 0 is out of range: it must be >= 1"),
    (["--lr", "-1"], "--lr -1 is out of range: it must be > 0 and <= 1"),  # were optimizer ValueErrors
    (["--lr", "nan"], "--lr nan is not a finite number"),
    (["--beta1", "2"], "--beta1 2 is out of range: it must be >= 0 and < 1"),
    (["--lr", "1e30"], "--lr 1e+30 is out of range"),  # were accepted silently
    (["--lr", "inf"], "--lr inf is not a finite number"),
    (["--warmup-steps", "-1"], "--warmup-steps -1 is out of range: it must be >= 0"),
    (["--epochs", "-1"], "--epochs -1 is out of range"),
    (["--threads", "-2"], "--threads -2 is out of range"),
    (["--grad-clip", "-1"], "--grad-clip -1 is out of range"),
    (["--save-every", "-1"], "--save-every -1 is out of range"),
    (["--keep-last", "-1"], "--keep-last -1 is out of range"),
    (["--val-tokens", "-1"], "--val-tokens -1 is out of range"),
    (["--num-samples", "0"], "--num-samples 0 is out of range: it must be >= 1"),  # were checked after a step
    (["--sample-tokens", "-5"], "--sample-tokens -5 is out of range: it must be >= 1"),
    (["--hellaswag-data", "MISSING"], "--hellaswag-data MISSING: no such file"),  # was reported under --data
    (["--schedule", "step"], "--schedule 'step' is not one of the choices: cosine, linear, wsd"),
    (["--max-steps", "1.5"], "--max-steps expects a whole number, got '1.5'"),
])
def test_bad_train_flags_stop_before_any_work(data, tmp_path, flags, needle):
    code, out, err = run(["train", "--data", str(data), "--out", str(tmp_path / "run"), *TRAIN, *flags])
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "run").exists()  # nothing started


def test_out_naming_a_file_is_refused_and_the_file_kept(data, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    for argv in (["train", "--data", str(data), *TRAIN], ["prepare", "shakespeare"]):
        code, _, err = run([*argv, "--out", str(f)])
        assert_one_line_error(code, err, f"--out {f} is a file, not a directory")
    code, _, err = run(["train", "--data", str(data), *TRAIN, "--out", str(f / "run")])
    assert_one_line_error(code, err, f"is below {f}, which is a file")
    assert f.read_text() == "mine"


def test_other_commands_check_their_values(tmp_path):
    for argv, needle in [
        (["prepare", "shakespeare", "--out", str(tmp_path / "p"), "--val-tokens", "-1"], "--val-tokens -1"),
        (["prepare", "shakespeare", "--out", str(tmp_path / "p"), "--shard-tokens", "0"], "--shard-tokens 0"),
        (["eval", "val", "--model", "m", "--data", "d", "--batch-size", "0"], "--batch-size 0 is out of range"),
        (["eval", "hellaswag", "--model", "m", "--limit", "-3"], "--limit -3 is out of range"),
        (["sft", "--model", "m", "--data", "d", "--out", str(tmp_path / "s"), "--val-fraction", "1"],
         "--val-fraction 1 is out of range: it must be >= 0 and < 1"),
        (["sft", "--model", "m", "--data", "d", "--out", str(tmp_path / "s"), "--lr", "nan"], "--lr nan"),
        (["sample", "--model", "m", "--top-p", "nan"], "--top-p"),
    ]:
        code, _, err = run(argv)
        assert_one_line_error(code, err, needle)
    assert not (tmp_path / "p").exists()


def test_help_shows_ranges_and_the_presets_values():
    code, out, _ = run(["train", "--help"])
    assert code == 0 and "(default: 1024; >= 1)" in out and "(default: 0.0006; > 0 and <= 1)" in out
    code, out, _ = run(["train", "--preset", "tiny", "--help"])
    flat = " ".join(out.split())
    assert code == 0 and "tokens per sequence (T) (default: 128; >= 1)" in flat
    assert "maximum learning rate (default: 0.002;" in flat and "(default: 500; >= 0)" in flat
    assert "The defaults shown are --preset tiny's values." in flat
    code, out, _ = run(["train", "--help", "--preset=gpt2-350m"])  # either order
    assert "maximum learning rate (default: 0.0003;" in " ".join(out.split())
    code, out, _ = run(["sft", "--help"])
    assert code == 0 and "maximum learning rate (default: half the pretraining peak LR of a gptrain run" in " ".join(
        out.split())  # sft's own default, not pretraining's


def test_help_states_each_default_once():
    """A required value has no 'default: ' in its help; one whose text states its default is not repeated."""
    flat = lambda argv: " ".join(run(argv)[1].split())  # noqa: E731
    prepare = flat(["prepare", "--help"])
    assert "manifest.json (required)" in prepare and "(default: )" not in prepare
    serve = flat(["serve", "--help"])
    assert "(default: $GPTRAIN_API_KEY; none: no key;" in serve and "(default: None)" not in serve.split("--api-key API_KEY", 2)[-1].split("--metrics-public")[0]


def test_mistyped_and_abbreviated_flags_get_the_commands_usage_and_a_suggestion():
    for typo in ("--max-stesp", "--max-step"):  # a typo, and a prefix argparse would have accepted
        code, out, err = run(["train", typo, "3"])
        assert code == 2 and not out
        usage, message = err.strip().splitlines()
        assert usage.startswith("usage: gptrain train ")
        assert message == f"gptrain train: error: unrecognized arguments: {typo} 3 (did you mean --max-steps?)"
    code, _, err = run(["eval", "val", "--model", "m", "--data", "d", "--batch-sise", "2"])
    assert code == 2 and "usage: gptrain eval val --model SRC [OPTIONS]" in err and "did you mean --batch-size?" in err


def test_a_typo_that_leaves_a_required_flag_missing_is_named_too():
    code, _, err = run(["prepare", "x", "--ot", "data/x"])
    assert code == 2 and err.strip().splitlines()[-1] == (
        "gptrain prepare: error: unrecognized arguments: --ot (did you mean --out?); the following arguments are "
        "required: --out")


# ---------------------------------------------------------------- the fuzz

ENDS_FAST = {  # arguments that make every valid value end quickly with a one-line error (nothing to read)
    "prepare": ["prepare", "/nonexistent/corpus.txt", "--out", "{tmp}/p"],
    "train": ["train", "--data", "/nonexistent/data", "--out", "{tmp}/t"],
    "sft": ["sft", "--model", "/nonexistent/model", "--data", "/nonexistent/chats.jsonl", "--out", "{tmp}/s"],
    "eval val": ["eval", "val", "--model", "/nonexistent/model", "--data", "/nonexistent/data"],
    "eval hellaswag": ["eval", "hellaswag", "--model", "/nonexistent/model", "--data", "/nonexistent/h.jsonl"],
    "eval lm-eval": ["eval", "lm-eval", "--model", "/nonexistent/model", "--tasks", "hellaswag"],
    "sample": ["sample", "--model", "/nonexistent/model"],
    "chat": ["chat", "--model", "/nonexistent/model"],
    "serve": ["serve", "--model", "/nonexistent/model"],
}


def numeric_options(command: str) -> list[str]:
    """Every option of `command` (e.g. "eval val") that takes a number."""
    words = command.split()
    parser = build_parser(words[0])
    for word in words:
        sub = next(a for a in parser._actions if a.dest in ("command", "benchmark"))
        parser = sub.choices[word]
    return [a.option_strings[-1] for a in parser._actions if a.option_strings and a.type is not None
            and (getattr(a.type, "numeric", None) or a.type in (int, float))]


OPTIONS = [(c, o) for c in ENDS_FAST for o in numeric_options(c)]
SPECIAL = ["0", "-1", "nan", "-inf", "1e308", "99999999999999999999999999999"]


def check_command_line(argv):
    code, out, err = run(argv)
    lines = err.strip().splitlines()
    assert "Traceback" not in err and code in (0, 2), (argv, code, err)
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("gptrain: error: "), (argv, err)


def test_every_numeric_option_has_a_range_or_a_type():
    assert len(OPTIONS) > 60 and ("train", "--lr") in OPTIONS and ("serve", "--port") in OPTIONS
    assert ("eval val", "--val-tokens") in OPTIONS and ("prepare", "--workers") in OPTIONS


def test_special_values_of_every_numeric_option(tmp_path):
    threads = torch.get_num_threads()
    for command, option in OPTIONS:
        for value in SPECIAL:
            check_command_line([a.format(tmp=tmp_path) for a in ENDS_FAST[command]] + [option, value])
    assert torch.get_num_threads() == threads  # no command did work before failing


NUMBERS = st.one_of(st.integers(min_value=-10**30, max_value=10**30).map(str),
                    st.floats(allow_nan=True, allow_infinity=True).map(repr),
                    st.sampled_from(SPECIAL))


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(OPTIONS), NUMBERS)
def test_fuzzed_numbers_exit_0_or_2_with_one_line(tmp_path, option, value):
    command, flag = option
    check_command_line([a.format(tmp=tmp_path) for a in ENDS_FAST[command]] + [flag, value])


def test_rerunning_a_finished_run_changes_nothing(data, tmp_path):
    """The same command on a finished run (the demo run twice) trains nothing, re-evaluates nothing and cuts
    nothing: metrics.jsonl stays byte for byte, no metrics.jsonl.cut-* appears."""
    run_dir = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(run_dir), *TRAIN, "--eval-every", "1"]
    code, _, err = run(args)
    assert code == 0, err
    before = (run_dir / "metrics.jsonl").read_bytes()
    assert b"val_loss" in before.splitlines()[-1]  # the final evaluation follows the last checkpoint
    code, out, err = run(args)
    assert code == 0, err
    assert "finished at step 2/2: nothing to train (its final evaluation is in metrics.jsonl)" in out + err
    assert "2 steps, lr" not in out and "device cpu" not in out  # no header announcing steps it will not run
    assert (run_dir / "metrics.jsonl").read_bytes() == before
    assert not list(run_dir.glob("metrics.jsonl.cut-*"))
    code, out, err = run(args[:-2] + ["--eval-every", "1", "--max-steps", "3", "--resume", "auto"])  # longer: trains on
    assert code == 0, err
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train_loss" in r] == [0, 1, 2]
    code, out, err = run(args[:-2] + ["--eval-every", "0", "--max-steps", "3", "--resume", "auto"])
    assert code == 0, err  # without evaluations, the note does not point at one
    assert "finished at step 3/3: nothing to train; to train longer" in out + err


def test_a_run_of_many_epochs_says_so_before_training(tmp_path):
    """2 steps of 8 micro-batches on data with one micro-batch an epoch: 16 epochs, noted once with the hint; a run
    that asked for its epochs, or reads its data at most 10 times, gets no note."""
    rng = np.random.default_rng(0)
    write_shard(tmp_path / "t_train_000.bin", np.array([50256, *rng.integers(0, 500, 40)]))
    write_shard(tmp_path / "t_val_000.bin", np.array([50256, *rng.integers(0, 500, 40)]))
    args = ["train", "--data", str(tmp_path), *TRAIN, "--total-batch-size", "256", "--warmup-steps", "0"]
    code, out, err = run([*args, "--out", str(tmp_path / "r")])
    assert code == 0, err
    notes = [line for line in out.splitlines() if "epochs (passes" in line]
    assert notes == [f"note: 2 steps of 256 tokens make 16 epochs (passes over the 32 train tokens an epoch of "
                     f"{tmp_path} reads): text read that often is mostly memorised; for fewer passes prepare more "
                     "text, or pass --max-steps N or --epochs N"]
    assert out.index(notes[0]) < out.index("step      1/2")  # before training
    at = args.index("--max-steps")
    for i, argv in enumerate([[*args, "--total-batch-size", "160"], [*args[:at], *args[at + 2:], "--epochs", "20"]]):
        code, out, err = run([*argv, "--out", str(tmp_path / f"s{i}")])  # 10 epochs; 20 asked for
        assert code == 0 and "epochs (passes" not in out, err


def test_a_required_flag_shows_as_required():
    """prepare's --out: usage shows it without brackets, and leaving it out is argparse's one error."""
    code, out, _ = run(["prepare", "--help"])
    assert code == 0 and out.startswith("usage: gptrain prepare [-h] --out OUT ")
    code, _, err = run(["prepare", "shakespeare"])
    assert code == 2 and err.endswith("gptrain prepare: error: the following arguments are required: --out\n")


def test_epochs_and_max_steps_together_are_refused(data, tmp_path):
    """--epochs sets the step count; with --max-steps too, one of them would be ignored without a word."""
    code, _, err = run(["train", "--data", str(data), "--out", str(tmp_path / "r"), *TRAIN, "--epochs", "1"])
    assert_one_line_error(code, err, "--epochs 1 and --max-steps 2: pass one of them")
    assert not (tmp_path / "r").exists()


def test_a_run_shorter_than_its_warm_up_says_so(data, tmp_path):
    code, out, err = run(["train", "--data", str(data), "--out", str(tmp_path / "r"), *TRAIN, "--warmup-steps", "5"])
    assert code == 0, err
    assert ("note: --warmup-steps 5 is not below the run's 2 steps: the learning rate rises all run and never "
            "reaches --lr 0.002") in out
    code, out, err = run(["train", "--data", str(data), "--out", str(tmp_path / "s"), *TRAIN, "--warmup-steps", "1"])
    assert code == 0 and "--warmup-steps" not in out + err


def test_a_run_past_a_lowered_max_steps_says_so_and_settings_name_no_paths(data, tmp_path):
    """The demo's quick look after the full run: a run at step 3 asked for 2 steps trains nothing and says why
    (not 'finished at step 3/2'); the changed-settings warning lists what changed in training, not --out."""
    args = ["train", "--data", str(data), "--out", str(tmp_path / "r"), *TRAIN[:-8], "--eval-every", "0",
            "--sample-every", "0", "--threads", "1"]
    assert args.count("--max-steps") == 0
    code, _, err = run(args + ["--max-steps", "3"])
    assert code == 0, err
    code, out, err = run(args + ["--max-steps", "2", "--resume", "auto", "--eval-every", "5", "--threads", "0"])
    assert code == 0, err
    assert "is at step 3, past --max-steps 2: nothing to train" in out + err and "3/2" not in out + err
    # runtime settings that leave the arithmetic alone are not listed; a thread count is the machine's warning's,
    # by the count used (threads 1 -> torch's default)
    assert "gptrain: warning: settings changed since step_00000003: max_steps 3 -> 2\n" in err
    assert runtime_fields(TrainConfig, numerics=True) == {"device", "compile", "parallel", "fsdp_shard_size",
                                                          "deterministic", "reduce_scatter"}
    other = tmp_path / "elsewhere"
    code, out, err = run(args[:4] + [str(other)] + args[5:] + ["--max-steps", "4", "--resume",
                                                               str(tmp_path / "r" / "checkpoints" / "step_00000003")])
    assert code == 0, err
    changed = next(line for line in err.splitlines() if "settings changed" in line)
    assert "max_steps 3 -> 4" in changed and "out " not in changed


def test_under_torchrun_a_configuration_error_is_said_once_per_node(monkeypatch, tmp_path):
    """Every rank finds the same bad flag or file before any work: local rank 0 says it, the others only exit 2
    (after a pause that lets rank 0 print first: torchrun ends the other workers when one exits)."""
    import gptrain.output
    monkeypatch.setattr(gptrain.output, "QUIET_EXIT_DELAY_S", 0.0)
    for argv in (["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")],
                 ["train", "--max-stesp", "3"]):
        monkeypatch.setenv("LOCAL_RANK", "1")
        assert run(argv) == (2, "", "")
        monkeypatch.setenv("LOCAL_RANK", "0")
        code, _, err = run(argv)
        assert code == 2 and ("gptrain train: error: " in err or "gptrain: error: " in err)
