"""iterative_dpo.py: Equation (20) on hand-picked numbers (sign labels, ties), and end-to-end runs on the toy task."""

import json
import math
import os

import pytest
import torch
from conftest import run_script

from iterative_dpo import iterative_dpo_loss


def test_sign_labelling_hand_values():
    logprobs = torch.tensor([[-1.0, -2.0], [-1.0, -2.0]])
    old_logprobs = torch.tensor([[-1.5, -1.5], [-1.5, -1.5]])  # log-ratios (0.5, -0.5): difference 1.0
    rewards = torch.tensor([[2.0, 1.0], [-3.0, 0.5]])  # first pair prefers y, second prefers y'
    loss = iterative_dpo_loss(logprobs, old_logprobs, rewards, beta=0.05)
    # -ln sigmoid(z) = ln(1 + exp(-z)); z = +0.05 for the first pair and -0.05 for the second
    expected = (math.log1p(math.exp(-0.05)) + math.log1p(math.exp(0.05))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_only_the_sign_of_the_reward_difference_matters():
    logprobs, old = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.2, -1.7]])
    a = iterative_dpo_loss(logprobs, old, torch.tensor([[0.1, 0.0]]), beta=0.5)
    b = iterative_dpo_loss(logprobs, old, torch.tensor([[100.0, -5.0]]), beta=0.5)
    torch.testing.assert_close(a, b)


def test_ties_contribute_nothing():
    logprobs = torch.tensor([[-1.0, -2.0], [-0.3, -4.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -1.5], [-1.0, -1.0]])
    rewards = torch.tensor([[1.0, 0.0], [0.7, 0.7]])  # the second pair is a tie
    loss = iterative_dpo_loss(logprobs, old, rewards, beta=0.05)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.05)) / 2, rel=1e-6)  # the tie adds 0, not ln 2
    loss.backward()
    assert logprobs.grad[1].abs().sum() == 0 and logprobs.grad[0].abs().sum() > 0


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_end_to_end_with_tracking(toy, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, run = str(tmp_path / "out"), str(tmp_path / "run")
    run_script("iterative_dpo.py", *toy.rl_flags, "--track", "--output_dir", out, "--run_dir", run, cwd=str(tmp_path))
    rows = _metrics(run)
    assert [r["update"] for r in rows] == [1, 2]
    for key in ("loss/policy", "objective/tie_rate", "objective/kl", "time/update", "memory/peak_gb"):
        assert key in rows[0], key
    assert os.path.isfile(tmp_path / "run" / "eval_000000.csv") and os.path.isfile(tmp_path / "run" / "eval_000002.csv")
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy.sft), out)  # the saved adapter loads
    assert os.path.isdir(tmp_path / "wandb")  # offline run written next to where it was launched


def test_help():
    out = run_script("iterative_dpo.py", "--help").stdout
    assert "--beta" in out and "Equation (20)" in out


def test_torchrun_two_ranks_stay_in_sync(toy, tmp_path):
    run_script("iterative_dpo.py", *toy.rl_flags, "--output_dir", "", "--run_dir", str(tmp_path / "run"), torchrun=2)
    rows = _metrics(tmp_path / "run")
    assert rows[-1]["ddp/max_param_diff_across_ranks"] == 0.0
    assert [r["update"] for r in rows[:-1]] == [1, 2]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch_size", "6"], "is not divisible by"),
        (["--beta", "0"], "--beta must be > 0"),
        (["--reference_column", "nope"], "has no column 'nope'"),
    ],
    ids=["batch", "beta", "column"],
)
def test_bad_input(toy, tmp_path, flags, message):
    proc = run_script(
        "iterative_dpo.py", *toy.rl_flags, *flags, "--output_dir", "", "--run_dir", str(tmp_path), check=False
    )
    assert proc.returncode != 0
    assert message in proc.stdout
