"""Bad input fails at start with one line that names the problem and the fix: the cases of docs/bad_inputs.md that
are not tested beside their feature (resume and the NaN guard: test_resume.py; the judge: test_eval_winrate.py).
The scripts run in this process, so each case costs no interpreter start."""

import pytest
from conftest import check_fails_with
from rl_checks import bad_input_message


@pytest.fixture
def bad(tmp_path):
    """An empty JSONL, a file and a directory that are not models, and a file where a directory is expected."""
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "a_file").write_text("{}")
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "notes.txt").write_text("")
    return tmp_path


def rl(toy, *flags):
    return [*toy.rl_flags, *flags]


CASES = {
    "lr 0": ("rebel.py", lambda t, b: rl(t, "--lr", "0"), "--lr must be > 0; got 0.0"),
    "negative lr": ("ppo.py", lambda t, b: rl(t, "--lr", "-1e-2"), "--lr must be > 0; got -0.01"),
    "response length 0": ("rloo.py", lambda t, b: rl(t, "--response_length", "0"), "must be >= 1"),
    "query length 1": ("rebel.py", lambda t, b: rl(t, "--query_length", "1"), "longer than --query_length 1"),
    "split smaller than a batch (rebel)": (
        "rebel.py", lambda t, b: rl(t, "--batch_size", "512", "--total_episodes", "1024"),
        "the train split has 256 examples, fewer than one --batch_size 512",
    ),
    "split smaller than a batch (rloo)": (
        "rloo.py", lambda t, b: rl(t, "--batch_size", "512", "--total_episodes", "1024"), "fewer than one --batch_size",
    ),
    "empty JSONL": ("rebel.py", lambda t, b: rl(t, "--query_dataset", str(b / "empty.jsonl")), "is empty"),
    "missing data file": (
        "iterative_dpo.py", lambda t, b: rl(t, "--query_dataset", str(b / "gone.jsonl")), "no such file or directory",
    ),
    "empty preference file": (
        "dpo.py", lambda t, b: rl(t, "--preference_dataset", str(b / "empty.jsonl")), "is empty",
    ),
    "policy path is not a model": (
        "rebel.py", lambda t, b: rl(t, "--sft_model_path", str(b / "not_a_model")), "holds no model: no config.json",
    ),
    "policy path is a file": ("rloo.py", lambda t, b: rl(t, "--sft_model_path", str(b / "a_file")), "is a file"),
    "reward model path is not a model": (
        "ppo.py", lambda t, b: rl(t, "--reward_model_path", str(b / "not_a_model")), "holds no model",
    ),
    "output_dir is a file": (
        "rebel.py", lambda t, b: rl(t, "--output_dir", str(b / "a_file")), "is a file, not a directory",
    ),
    "sft base is not a model": (
        "sft.py", lambda t, b: ["--query_dataset", t.tldr, "--base_model", str(b / "not_a_model")], "holds no model",
    ),
    "reward model data missing": (
        "reward.py", lambda t, b: ["--query_dataset", t.tldr, "--sft_model_path", t.sft, "--preference_dataset",
                                   str(b / "gone")], "no such file or directory",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_at_start_naming_the_fix(toy, bad, case):
    script, flags, message = CASES[case]
    run = bad / "run"
    assert message in bad_input_message(script, [*flags(toy, bad), "--run_dir", str(run)])
    assert not (run / "metrics.jsonl").exists(), "no update may run on bad input"


def test_the_error_is_one_line_without_a_traceback(toy, bad):
    check_fails_with("rebel.py", [*toy.rl_flags, "--lr", "0"], "error: --lr must be > 0", bad / "run")
