"""dpo.py: Equation 7 of Rafailov et al. (2023) on hand-picked numbers, and end-to-end runs on the toy task."""

import math

import pytest
import torch
from conftest import check_end_to_end, check_fails_with, check_ranks_in_sync, run_script

from dpo import dpo_loss


def test_dpo_loss_closed_form():
    logprobs = torch.tensor([[-1.0, -3.0], [-2.0, -1.0]])  # chosen, rejected
    ref_logprobs = torch.tensor([[-2.0, -2.0], [-2.0, -2.0]])
    # log-ratio margins: (1 - (-1)) = 2 and (0 - 1) = -1; -ln sigmoid(z) = ln(1 + exp(-z))
    expected = (math.log1p(math.exp(-0.05 * 2)) + math.log1p(math.exp(0.05 * 1))) / 2
    assert dpo_loss(logprobs, ref_logprobs, beta=0.05).item() == pytest.approx(expected, rel=1e-6)


def test_dpo_loss_at_the_reference_is_ln2_and_pushes_chosen_up():
    logprobs = torch.tensor([[-4.0, -5.0]], requires_grad=True)
    loss = dpo_loss(logprobs, logprobs.detach(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.05, 0.05]]))  # -beta * sigmoid(0) * (+1, -1)


def _flags(toy):
    return [*toy.rl_flags, "--query_dataset", toy.preference, "--eval_dataset", toy.tldr]


def test_end_to_end_with_tracking(toy, tmp_path):
    import pandas as pd
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rows = check_end_to_end("dpo.py", _flags(toy), tmp_path, ("objective/implicit_accuracy",))
    assert rows[0]["loss/policy"] == pytest.approx(math.log(2), abs=1e-5)  # the first step starts at the reference
    table = pd.read_csv(tmp_path / "run" / "eval_000002.csv")
    assert {"query", "postprocessed_response", "reference_response", "score", "reference_score", "kl"} <= set(table)
    assert len(table) == 8
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy.sft), str(tmp_path / "out"))  # adapter loads


def test_help():
    out = run_script("dpo.py", "--help").stdout
    assert "--beta" in out and "--eval_dataset" in out and "--chosen_column" in out


def test_torchrun_two_ranks_stay_in_sync(toy, tmp_path):
    check_ranks_in_sync("dpo.py", _flags(toy), tmp_path / "run")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch_size", "6"], "is not divisible by"),
        (["--beta", "-1"], "--beta must be > 0"),
        (["--chosen_column", "nope"], "has no column 'nope'"),
    ],
    ids=["batch", "beta", "column"],
)
def test_bad_input(toy, tmp_path, flags, message):
    check_fails_with("dpo.py", [*_flags(toy), *flags], message, tmp_path)
