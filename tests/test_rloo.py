"""rloo.py: the leave-one-out advantage against its definition, the reward and its reference in a real run, the
helpers shared with rebel.py, and end-to-end runs on the micro toy task."""

import pytest
import torch
from conftest import check_end_to_end, check_fails_with, check_ranks_in_sync, read_metrics, run_script
from rl_checks import check_reference_logprobs_are_sft, check_reward_composition, run_in_process

from rloo import policy_gradient_loss, reinforce_baseline, rloo_advantages


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


def test_reinforce_baseline_is_the_running_mean_of_every_reward():
    """b_MA after two updates is the mean of both updates' rewards (not the last update's, nor a mean of means), kept
    in `totals` (the checkpoint's record); 'none' is 0 and keeps nothing."""
    totals, device = {}, torch.device("cpu")
    assert reinforce_baseline(torch.tensor([[1.0], [3.0]]), "moving_average", totals, device) == 2.0
    assert reinforce_baseline(torch.tensor([[-4.0], [0.0], [2.0], [4.0]]), "moving_average", totals, device) == 1.0
    assert totals == {"reward_sum": 6.0, "reward_count": 6}
    assert reinforce_baseline(torch.tensor([[5.0]]), "none", {}, device) == 0.0


def test_policy_gradient_loss_and_gradient():
    logprobs = torch.tensor([[-2.0, -1.0], [-3.0, -4.0]], requires_grad=True)
    advantages = torch.tensor([[1.0, -1.0], [2.0, 0.5]], requires_grad=True)
    loss = policy_gradient_loss(logprobs, advantages)
    assert loss.item() == pytest.approx(-(-2.0 + 1.0 - 6.0 - 2.0) / 4)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, -advantages.detach() / 4)
    assert advantages.grad is None or advantages.grad.abs().sum() == 0  # the advantage is a constant


@pytest.fixture(scope="module")
def last_update(toy, tmp_path_factory):
    """Two updates of RLOO (k = 3) in this process, with a KL penalty and a learning rate large enough to matter."""
    run_dir = tmp_path_factory.mktemp("rloo_in_process")
    flags = ["--rloo_k", "3", "--lr", "1e-2", "--kl_coef", "1.0", "--penalty_reward_value", "-5"]
    return run_in_process("rloo.py", [*toy.rl_flags, *flags, "--output_dir", "", "--run_dir", str(run_dir)])


def test_reward_is_score_minus_kl_penalty(last_update):
    check_reward_composition(last_update)


def test_kl_reference_is_the_sft_policy(toy, last_update):
    check_reference_logprobs_are_sft(last_update, toy.sft)


@pytest.mark.parametrize(
    "extra", [["--rloo_k", "4"], pytest.param(["--reinforce"], marks=pytest.mark.slow)], ids=["k4", "reinforce"]
)
def test_end_to_end(toy, tmp_path, extra):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    keys = ("objective/kl", "objective/advantage_std", "time/generation")
    check_end_to_end("rloo.py", [*toy.rl_flags, *extra], tmp_path, keys, track="--reinforce" in extra)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy.sft), str(tmp_path / "out"))  # adapter loads


@pytest.mark.slow
def test_reinforce_baseline_is_the_mean_of_every_reward_so_far_and_resumes(toy, tmp_path):
    """Ahmadian et al.'s b_MA: at update 2, the mean of both updates' rewards (8 each); a run resumed from update 1's
    checkpoint carries the running sum on, so its update 2 is the uninterrupted run's."""
    run, flags = tmp_path / "run", [*toy.rl_flags, "--reinforce", "--save_freq", "1", "--output_dir", ""]
    run_script("rloo.py", *flags, "--run_dir", str(run))
    rows = [r for r in read_metrics(run) if "update" in r]
    first, second = (r["objective/rlhf_reward"] for r in rows)
    assert rows[0]["objective/baseline"] == pytest.approx(first) and first != pytest.approx(second)
    assert rows[1]["objective/baseline"] == pytest.approx((first + second) / 2)
    run_script("rloo.py", *flags, "--resume", str(run / "checkpoints" / "update_000001"))
    resumed = [r for r in read_metrics(run) if "update" in r][1]
    assert [resumed[k] for k in ("objective/baseline", "loss/policy")] == [
        rows[1][k] for k in ("objective/baseline", "loss/policy")
    ]


def test_help():
    out = run_script("rloo.py", "--help").stdout
    assert "--rloo_k" in out and "--reinforce" in out and "responses sampled per prompt" in out


def test_torchrun_two_ranks_stay_in_sync(toy, tmp_path):
    check_ranks_in_sync("rloo.py", toy.rl_flags, tmp_path / "run")


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
    check_fails_with("rloo.py", [*toy.rl_flags, *flags], message, tmp_path)
