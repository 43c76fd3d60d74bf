"""ppo.py: the pure helpers (per-token rewards, GAE, whitening, clipped losses) against hand computations, then
end-to-end runs on the toy."""

import os

import pytest
import torch
from conftest import (
    ROOT,
    check_end_to_end,
    check_fails_with,
    check_ranks_in_sync,
    check_reference_is_sft,
    run_script,
)
from rl_checks import bad_input_message, run_in_process, sequence_logprob
from transformers import AutoModelForCausalLM

from ppo import (
    clipped_policy_loss,
    clipped_value_loss,
    compute_gae,
    load_critic,
    load_reward_model,
    token_rewards,
    whiten,
)


def test_token_rewards_by_hand():
    """The KL penalty is subtracted at every valid token; the score, or the no-EOS penalty, is added at the last one."""
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5, 0.0], [-2.0, -1.0, -3.0, -1.0]])
    masks = torch.tensor([[True, True, True, False], [True, True, True, True]])  # row 0 ends at EOS, row 1 has none
    logprobs, ref_logprobs = logprobs * masks, ref_logprobs * masks  # as ppo_rollout returns them
    scores, has_eos, penalty, kl_coef = torch.tensor([2.0, 5.0]), torch.tensor([True, False]), -1.0, 0.1
    scores = torch.where(has_eos, scores, penalty)  # as ppo_rollout returns them
    kl, rewards = token_rewards(scores, logprobs, ref_logprobs, masks, kl_coef)
    # log pi_old - log pi_ref: row 0 (0.5, -1, 0, pad), row 1 (1, 0, 2, 0).
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0], [1.0, 0.0, 2.0, 0.0]]))
    expected = torch.tensor([[-0.05, 0.1, 0.0 + 2.0, 0.0], [-0.1, 0.0, -0.2, 0.0 - 1.0]])
    torch.testing.assert_close(rewards, expected)
    # The sign: a response more likely under pi_old than under the reference is penalised.
    assert rewards[0, 0] < 0 and rewards[0, 1] > 0


def gae_loop(rewards, values, lengths, gamma, lam):
    """Plain Python GAE, one episode of `length` tokens per row; the value after the last token is 0."""
    adv, ret = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for b, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t] = last
            ret[b, t] = last + values[b, t].item()
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_matches_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    B, T = 5, 7
    rewards, values = (
        torch.randn(B, T, generator=g, dtype=torch.float64),
        torch.randn(B, T, generator=g, dtype=torch.float64),
    )
    lengths = [7, 3, 1, 5, 0]
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).double()
    # Garbage after the end must not leak into the valid tokens.
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    adv_ref, ret_ref = gae_loop(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, adv_ref)
    torch.testing.assert_close(ret, ret_ref)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_by_hand():
    # gamma = lam = 1: A_t = sum of future rewards - V(s_t).
    rewards, values, mask = (
        torch.tensor([[0.0, 0.0, 1.0, 9.0]]),
        torch.tensor([[0.5, 0.2, 0.1, 7.0]]),
        torch.tensor([[1.0, 1, 1, 0]]),
    )
    adv, ret = compute_gae(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.8, 0.9, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))


def test_whiten_over_valid_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, -50.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    w = whiten(x, mask)
    valid = torch.tensor([1.0, 2, 3, 4, 5])
    expected = (valid - valid.mean()) / valid.std()  # unbiased, as in the official masked_whiten
    torch.testing.assert_close(w[mask.bool()], expected, atol=1e-6, rtol=1e-6)
    assert (w[mask == 0] == 0).all()


def test_ppo_losses_by_hand():
    eps, eps_v = 0.2, 0.2
    # Token 0: ratio e^0.5 = 1.6487 > 1.2 with A = +1 -> clipped: loss -1.2. Token 1: ratio e^-0.5 = 0.6065 with A = +2
    # -> unclipped side is larger: loss -2 * 0.6065. Token 2: ratio 1, A = -1 -> loss 1. Token 3 is padding.
    old = torch.zeros(1, 4)
    new = torch.tensor([[0.5, -0.5, 0.0, 5.0]])
    adv = torch.tensor([[1.0, 2.0, -1.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # Values: old 0 everywhere, returns 1. Token 0: vpred 0.5 -> clipped 0.2, max((0.5)^2, (0.8)^2) = 0.64.
    # Token 1: vpred -0.1 (inside the clip) -> 1.21. Token 2: vpred 1.0 -> clipped 0.2 -> max(0, 0.64) = 0.64.
    vpred = torch.tensor([[0.5, -0.1, 1.0, 50.0]])
    old_v, returns = torch.zeros(1, 4), torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    pg, stats = clipped_policy_loss(new, old, adv, mask, eps)
    vf, vf_stats = clipped_value_loss(vpred, old_v, returns, mask, eps_v)
    expected_pg = (-1.2 - 2 * torch.exp(torch.tensor(-0.5)) + 1.0) / 3
    torch.testing.assert_close(pg, expected_pg)
    torch.testing.assert_close(vf, torch.tensor(0.5 * (0.64 + 1.21 + 0.64) / 3))
    torch.testing.assert_close(stats["policy/clipfrac"], torch.tensor(1 / 3))
    torch.testing.assert_close(vf_stats["loss/value_clipfrac"], torch.tensor(2 / 3))
    torch.testing.assert_close(stats["policy/approxkl"], torch.tensor(0.5 * (0.25 + 0.25) / 3))


def test_ppo_loss_gradient_zero_when_clipped():
    # A > 0 and ratio above 1 + eps: the clipped branch is taken and the policy gets no gradient (Eq. 7).
    new = torch.tensor([[0.5]], requires_grad=True)
    zero, one = torch.zeros(1, 1), torch.ones(1, 1)
    pg, _ = clipped_policy_loss(new, zero, one, one, 0.2)
    pg.backward()
    assert new.grad.abs().item() == 0.0


def test_ppo_end_to_end(toy, tmp_path):
    keys = ("objective/scores", "objective/kl", "loss/value", "policy/approxkl", "policy/clipfrac", "time/value")
    check_end_to_end("ppo.py", toy.rl_flags, tmp_path, keys)
    check_reference_is_sft(tmp_path / "run")
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "run"))
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[:2] == (1, 3)
    # The critic comes back as a reward model: trained (it differs from the RM it started from) and loadable.
    critic = load_reward_model(str(tmp_path / "out" / "critic"), torch.float32)
    rm = load_reward_model(toy.rm, torch.float32)
    x = torch.tensor([[5, 6, 7, 8]])
    assert critic(x, pad_id=0).shape == (1,)
    assert critic(x, pad_id=0).item() != pytest.approx(rm(x, pad_id=0).item(), abs=1e-7)


def test_ppo_full_finetune_critic_lora_reference_is_sft(toy, tmp_path):
    """--no-lora: a full fine-tune of the policy against a frozen reference copy, with a LoRA critic. Run in this process
    to check the last update's tensors: the reference's log-probs are those of the SFT checkpoint loaded on its own (not
    the current policy's), and the reward is -kl_coef * KL per token plus the score (or the no-EOS penalty) at the end."""
    from transformers import AutoModelForCausalLM

    out, run = tmp_path / "ppo", tmp_path / "r"
    flags = ["--no-lora", "--critic_lora", "True", "--lr", "1e-4", "--output_dir", str(out), "--run_dir", str(run)]
    g = run_in_process("ppo.py", [*toy.rl_flags, *flags])
    qr, masks, args, pad = g["query_responses"], g["masks"], g["args"], g["pad"]
    sft = AutoModelForCausalLM.from_pretrained(toy.sft).eval()
    ctx = g["context_length"]  # the batch's longest prompt, rounded up to --pad_multiple
    sft_logprobs = [sequence_logprob(sft, row, ctx, pad, args.temperature) for row in qr]
    torch.testing.assert_close(g["ref_logprobs"].sum(1), torch.tensor(sft_logprobs), atol=2e-3, rtol=1e-4)
    trained = [sequence_logprob(g["raw_policy"], row, ctx, pad, args.temperature) for row in qr]
    assert (torch.tensor(trained) - g["ref_logprobs"].sum(1)).abs().max() > 0.05, "the policy did not move"
    # Step 2 of the loop, recomputed from the reward model's raw scores.
    with torch.no_grad():
        raw_scores = g["reward"].model(qr, pad).float()
    scores = torch.where(g["has_eos"], raw_scores, args.penalty_reward_value)
    kl = (g["logprobs"] - g["ref_logprobs"]) * masks
    expected = -args.kl_coef * kl
    expected[torch.arange(len(qr)), masks.sum(1) - 1] += scores
    torch.testing.assert_close(g["rewards"], expected, atol=1e-5, rtol=1e-5)
    check_reference_is_sft(run)
    AutoModelForCausalLM.from_pretrained(str(out))
    load_reward_model(str(out / "critic"), torch.float32)  # the LoRA critic is saved merged


def test_help():
    proc = run_script("ppo.py", "--help")
    for flag in ("--cliprange", "--vf_coef", "--kl_coef", "--critic_lora", "--lam"):
        assert flag in proc.stdout


def test_ddp_two_ranks_in_sync(toy, tmp_path):
    check_ranks_in_sync("ppo.py", toy.rl_flags, tmp_path / "run")


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--kl_coef", "-0.1"], "--kl_coef must be >= 0"),
        (["--cliprange", "0"], "--cliprange must be > 0"),
        (["--batch_size", "6", "--per_device_train_batch_size", "4"], "is not divisible by 4"),
    ],
)
def test_bad_input(toy, tmp_path, flags, message):
    check_fails_with("ppo.py", [*toy.rl_flags, *flags], message, tmp_path)


GOLD = os.path.join(ROOT, "toy", "tldr.py") + ":gold_reward"  # the toy task's gold score as --reward_fn


def test_with_a_reward_function_the_critic_still_needs_a_model_to_start_from(toy, tmp_path):
    """--reward_fn replaces the reward model as the reward, not as the critic's starting point: without a reward model
    that loads, the error says so and offers the policy with a fresh head."""
    (tmp_path / "no_model").mkdir()
    flags = [*toy.rl_flags, "--reward_fn", GOLD, "--reward_model_path", str(tmp_path / "no_model")]
    message = bad_input_message("ppo.py", [*flags, "--output_dir", "", "--run_dir", str(tmp_path / "run")])
    assert "PPO's critic needs a model to start from" in message and "--critic_init policy" in message, message


def test_a_critic_started_from_the_policy(toy, tmp_path):
    """--critic_init policy: the SFT policy's backbone under a zero scalar head (V = 0 everywhere at the start), so PPO
    runs with --reward_fn and no reward model at all; the trained critic is saved as a reward model."""
    critic = load_critic(toy.sft, torch.float32, None, "policy")
    sft = AutoModelForCausalLM.from_pretrained(toy.sft)
    assert all(torch.equal(v, sft.base_model.state_dict()[k]) for k, v in critic.backbone.state_dict().items())
    x = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    assert torch.equal(critic(x, pad_id=0), torch.zeros(2, 4))
    (tmp_path / "no_model").mkdir()
    flags = [*toy.rl_flags, "--reward_fn", GOLD, "--reward_model_path", str(tmp_path / "no_model")]
    check_end_to_end("ppo.py", [*flags, "--critic_init", "policy"], tmp_path, ("loss/value",), track=False)
    trained = load_reward_model(str(tmp_path / "out" / "critic"), torch.float32)
    assert trained.head.weight.abs().max() > 0  # the head learnt from its zeros
