"""dpo.py: Equation 7 of Rafailov et al. (2023) on hand-picked numbers, and end-to-end runs on the toy task."""

import json
import math
import os

import pytest
import torch
from conftest import run_script

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


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _flags(toy):
    return [*toy.rl_flags, "--query_dataset", toy.preference, "--eval_dataset", toy.tldr]


def test_end_to_end_with_tracking(toy, tmp_path):
    import pandas as pd
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, run = str(tmp_path / "out"), str(tmp_path / "run")
    run_script("dpo.py", *_flags(toy), "--track", "--output_dir", out, "--run_dir", run, cwd=str(tmp_path))
    rows = _metrics(run)
    assert [r["update"] for r in rows] == [1, 2]
    assert rows[0]["loss/policy"] == pytest.approx(math.log(2), abs=1e-5)  # the first step starts at the reference
    for key in ("objective/implicit_accuracy", "time/update", "memory/peak_gb"):
        assert key in rows[0], key
    table = pd.read_csv(tmp_path / "run" / "eval_000002.csv")
    assert {"query", "postprocessed_response", "reference_response", "score", "reference_score", "kl"} <= set(table)
    assert len(table) == 8
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy.sft), out)  # the saved adapter loads
    assert os.path.isdir(tmp_path / "wandb")  # offline run written next to where it was launched


def test_help():
    out = run_script("dpo.py", "--help").stdout
    assert "--beta" in out and "--eval_dataset" in out and "--chosen_column" in out


def test_torchrun_two_ranks_stay_in_sync(toy, tmp_path):
    run_script("dpo.py", *_flags(toy), "--output_dir", "", "--run_dir", str(tmp_path / "run"), torchrun=2)
    rows = _metrics(tmp_path / "run")
    assert rows[-1]["ddp/max_param_diff_across_ranks"] == 0.0
    assert [r["update"] for r in rows[:-1]] == [1, 2]


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
    proc = run_script("dpo.py", *_flags(toy), *flags, "--output_dir", "", "--run_dir", str(tmp_path), check=False)
    assert proc.returncode != 0
    assert message in proc.stdout
