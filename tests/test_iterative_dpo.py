"""iterative_dpo.py: Equation (20) on hand-picked numbers (sign labels, ties), the reward and its reference in a real
run, the helpers shared with rebel.py, and end-to-end runs on the toy task."""

import math

import pytest
import torch
from conftest import check_end_to_end, check_fails_with, check_ranks_in_sync, run_script
from rl_checks import check_reference_logprobs_are_sft, check_reward_composition, run_in_process

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


@pytest.fixture(scope="module")
def last_update(toy, tmp_path_factory):
    """Two updates in this process, with a KL penalty and a learning rate large enough to matter."""
    run_dir = tmp_path_factory.mktemp("iterative_dpo_in_process")
    flags = ["--lr", "1e-2", "--kl_coef", "1.0", "--penalty_reward_value", "-5"]
    return run_in_process("iterative_dpo.py", [*toy.rl_flags, *flags, "--output_dir", "", "--run_dir", str(run_dir)])


def test_reward_is_score_minus_kl_penalty(last_update):
    check_reward_composition(last_update)


def test_kl_reference_is_the_sft_policy(toy, last_update):
    check_reference_logprobs_are_sft(last_update, toy.sft)


def test_end_to_end_with_tracking(toy, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    check_end_to_end("iterative_dpo.py", toy.rl_flags, tmp_path, ("objective/tie_rate", "objective/kl"))
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy.sft), str(tmp_path / "out"))  # adapter loads


def test_help():
    out = run_script("iterative_dpo.py", "--help").stdout
    assert "--beta" in out and "Equation (20)" in out


def test_torchrun_two_ranks_stay_in_sync(toy, tmp_path):
    check_ranks_in_sync("iterative_dpo.py", toy.rl_flags, tmp_path / "run")


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
    check_fails_with("iterative_dpo.py", [*toy.rl_flags, *flags], message, tmp_path)
