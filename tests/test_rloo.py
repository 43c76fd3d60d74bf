"""rloo.py: the leave-one-out advantage against its definition, and end-to-end runs on the micro toy task."""

import json
import os

import pytest
import torch
from conftest import run_script

from rloo import policy_gradient_loss, rloo_advantages


@pytest.mark.parametrize("k", [2, 4])
def test_rloo_advantage_matches_definition(k):
    rewards = torch.randn(5, k, dtype=torch.float64)
    expected = torch.empty_like(rewards)
    for b in range(5):
        for i in range(k):
            others = [rewards[b, j] for j in range(k) if j != i]
            expected[b, i] = rewards[b, i] - sum(others) / (k - 1)
    torch.testing.assert_close(rloo_advantages(rewards), expected)


def test_rloo_k2_hand_values():
    # k = 2: each sample's baseline is the other one, so A = (r - r', r' - r) -- REBEL's gradient at theta_t.
    rewards = torch.tensor([[1.0, 3.0], [0.5, 0.5]])
    torch.testing.assert_close(rloo_advantages(rewards), torch.tensor([[-2.0, 2.0], [0.0, 0.0]]))


def test_reinforce_advantage_is_reward():
    rewards = torch.tensor([[1.5], [-0.25]])
    torch.testing.assert_close(rloo_advantages(rewards, reinforce=True), rewards)


def test_policy_gradient_loss_and_gradient():
    logprobs = torch.tensor([[-2.0, -1.0], [-3.0, -4.0]], requires_grad=True)
    advantages = torch.tensor([[1.0, -1.0], [2.0, 0.5]], requires_grad=True)
    loss = policy_gradient_loss(logprobs, advantages)
    assert loss.item() == pytest.approx(-(-2.0 + 1.0 - 6.0 - 2.0) / 4)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, -advantages.detach() / 4)
    assert advantages.grad is None or advantages.grad.abs().sum() == 0  # the advantage is a constant


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("extra", [["--rloo_k", "4"], ["--reinforce", "--track"]], ids=["k4", "reinforce_track"])
def test_end_to_end(toy, tmp_path, extra):
    from transformers import AutoModelForCausalLM

    out, run = str(tmp_path / "out"), str(tmp_path / "run")
    run_script("rloo.py", *toy.rl_flags, *extra, "--output_dir", out, "--run_dir", run, cwd=str(tmp_path))
    rows = _metrics(tmp_path / "run")
    assert [r["update"] for r in rows] == [1, 2]
    for key in (
        "loss/policy",
        "objective/kl",
        "objective/advantage_std",
        "time/generation",
        "time/update",
        "memory/peak_gb",
    ):
        assert key in rows[0], key
    assert os.path.isfile(tmp_path / "run" / "eval_000000.csv") and os.path.isfile(tmp_path / "run" / "eval_000002.csv")
    from peft import PeftModel

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy.sft), out)  # the saved adapter loads
    if "--track" in extra:
        assert os.path.isdir(tmp_path / "wandb")  # offline run written next to where it was launched


def test_help():
    out = run_script("rloo.py", "--help").stdout
    assert "--rloo_k" in out and "--reinforce" in out and "responses sampled per prompt" in out


def test_torchrun_two_ranks_stay_in_sync(toy, tmp_path):
    run_script("rloo.py", *toy.rl_flags, "--output_dir", "", "--run_dir", str(tmp_path / "run"), torchrun=2)
    rows = _metrics(tmp_path / "run")
    assert rows[-1]["ddp/max_param_diff_across_ranks"] == 0.0
    assert [r["update"] for r in rows[:-1]] == [1, 2]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch_size", "6"], "is not divisible by"),
        (["--rloo_k", "1"], "--rloo_k must be >= 2"),
        (["--query_column", "nope"], "has no column 'nope'"),
    ],
    ids=["batch", "rloo_k", "column"],
)
def test_bad_input(toy, tmp_path, flags, message):
    proc = run_script("rloo.py", *toy.rl_flags, *flags, "--output_dir", "", "--run_dir", str(tmp_path), check=False)
    assert proc.returncode != 0
    assert message in proc.stdout
