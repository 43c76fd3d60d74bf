"""Tests for rebel_lcm.py: offline, CPU, tiny models built from configs."""

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from conftest import TORCHRUN_ENV, check_gloo_threads_joined  # noqa: E402

import rebel_lcm as R  # noqa: E402

# One thread per process: on a shared 2-core machine torch's thread pool otherwise spins and runs ~10x slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
# A few-second iteration: 2 prompts (REBEL: 2 pairs), 3 denoising steps.
SMALL = ["--tiny", "--sample-batch-size", "2", "--gradient-accumulation-steps", "2", "--num-steps", "3"]


def run_script(args, tmp_path, launcher=(sys.executable,), timeout=300, env=ENV):
    cmd = [*launcher, str(ROOT / "rebel_lcm.py"), *args, "--output-dir", str(tmp_path / "runs")]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def read_progress(tmp_path):
    (run_dir,) = list((tmp_path / "runs").iterdir())
    with open(run_dir / "progress.csv") as f:
        return run_dir, list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny():
    """Tiny LCM parts, a small config and the step coefficients, shared by the unit tests."""
    torch.set_num_threads(1)
    args = R.resolve_args(R.Args(tiny=True, num_steps=4, reward="compressibility"))
    tokenizer, text_encoder, unet, vae, scheduler = R.build_lcm(args)
    coef = R.lcm_coefficients(scheduler, args, "cpu")
    embeds = R.encode_prompts(tokenizer, text_encoder, ["cat", "hedgehog"], "cpu")
    w_emb = R.guidance_embedding(torch.full((2,), args.guidance_scale - 1), unet.config.time_cond_proj_dim)
    return dict(args=args, unet=unet, vae=vae, scheduler=scheduler, coef=coef, embeds=embeds, w_emb=w_emb)


def test_step_log_prob_is_the_gaussian_density_and_recomputes_to_ratio_one(tiny):
    args, unet, coef, embeds, w_emb = tiny["args"], tiny["unet"], tiny["coef"], tiny["embeds"], tiny["w_emb"]
    torch.manual_seed(0)
    noise = torch.randn(2, 4, 16, 16)
    states, next_states, log_probs, final = R.sample_trajectories(unet, coef, embeds, w_emb, noise, args, torch.float32)
    assert states.shape == (2, 3, 4, 16, 16) and log_probs.shape == (2, 3)  # the last step is deterministic
    scheduler = tiny["scheduler"]
    for i in range(3):
        t = int(coef["t"][i])
        with torch.no_grad():
            eps = unet(states[:, i], t, encoder_hidden_states=embeds, timestep_cond=w_emb).sample
        # diffusers' own LCMScheduler.step gives the consistency output ("denoised") independently of our code.
        scheduler._step_index = i
        denoised = scheduler.step(eps, t, states[:, i], return_dict=True).denoised
        alpha_next = scheduler.alphas_cumprod[int(coef["t"][i + 1])]
        normal = torch.distributions.Normal(alpha_next.sqrt() * denoised, (1 - alpha_next).sqrt())
        expected = normal.log_prob(next_states[:, i]).mean(dim=(1, 2, 3))
        torch.testing.assert_close(log_probs[:, i], expected, rtol=1e-5, atol=1e-5)
    # Recomputing with unchanged parameters (one batched UNet call) reproduces the sampler: ratio 1.
    with torch.no_grad():
        recomputed = R.trajectory_log_probs(unet, coef, states, next_states, embeds, w_emb, args, torch.float32)
    torch.testing.assert_close(torch.exp(recomputed - log_probs), torch.ones(2, 3), rtol=0, atol=1e-5)


def test_summed_log_prob_is_the_exact_density():
    x, mean, std = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor(0.7)
    expected = torch.distributions.Normal(mean, std).log_prob(x).sum(dim=(1, 2, 3))
    torch.testing.assert_close(R.gaussian_log_prob(x, mean, std, per_dim=False), expected)


def test_final_step_logprob_follows_the_reference(tiny):
    args = R.resolve_args(R.Args(tiny=True, num_steps=4, final_step_logprob=True))
    coef = R.lcm_coefficients(tiny["scheduler"], args, "cpu")
    # The reference steps from the last timestep to itself: noise with variance 1 - alpha-bar(t_last).
    assert coef["alpha_next"][-1] == coef["alpha"][-1] < 1
    assert R.lcm_coefficients(tiny["scheduler"], tiny["args"], "cpu")["alpha_next"][-1] == 1
    noise = torch.randn(2, 4, 16, 16)
    _, _, log_probs, _ = R.sample_trajectories(
        tiny["unet"], coef, tiny["embeds"], tiny["w_emb"], noise, args, torch.float32
    )
    assert log_probs.shape == (2, 4)  # all 4 steps carry a log-prob


def test_rebel_loss_matches_hand_computed_values():
    t = lambda *v: torch.tensor(v)  # noqa: E731
    # ((1.0 - 0.5) - (0.2 - 0.4)) / 0.5 - (1 - 0) = 0.4, squared 0.16
    loss = R.rebel_loss(t(1.0), t(0.5), t(0.2), t(0.4), t(1.0), t(0.0), eta=0.5)
    assert math.isclose(loss.item(), 0.16, rel_tol=1e-6)
    # two pairs: residuals 0.4 and (0 - 0) / 1 ... with eta 0.5: (0.3 - 0.1)/0.5 - (2 - 1) = -0.6; mean(0.16, 0.36)
    loss = R.rebel_loss(t(1.0, 0.3), t(0.5, 0.0), t(0.2, 0.1), t(0.4, 0.0), t(1.0, 2.0), t(0.0, 1.0), eta=0.5)
    assert math.isclose(loss.item(), (0.16 + 0.36) / 2, rel_tol=1e-6)


def test_rebel_pairs_are_never_mixed():
    """The reference implementation sums log-probs over the whole train batch; each pair must stand alone."""
    torch.manual_seed(0)
    logp_y, old_y, logp_yp, old_yp, r_y, r_yp = (torch.randn(4) for _ in range(6))
    logp_y.requires_grad_(True)
    loss = R.rebel_loss(logp_y, old_y, logp_yp, old_yp, r_y, r_yp, eta=1.0)
    (grad,) = torch.autograd.grad(loss, logp_y)
    residual = (logp_y - old_y) - (logp_yp - old_yp) - (r_y - r_yp)
    torch.testing.assert_close(grad, 2 * residual.detach() / 4)  # pair b's gradient sees only pair b
    mixed = ((residual.sum()) ** 2).mean()  # what summing over the batch would give
    assert not torch.isclose(loss, mixed)
    perm = torch.tensor([2, 0, 3, 1])  # shuffling whole pairs changes nothing
    shuffled = R.rebel_loss(*(v[perm] for v in (logp_y, old_y, logp_yp, old_yp, r_y, r_yp)), eta=1.0)
    torch.testing.assert_close(loss, shuffled)


def test_ppo_loss_at_ratio_one_and_clipping():
    logp = torch.zeros(2, 3)
    loss, clipfrac = R.ppo_loss(logp, logp, torch.tensor([1.0, -3.0]), clip_range=1e-4)
    assert math.isclose(loss.item(), 1.0) and clipfrac.item() == 0  # -mean(advantage) at ratio 1
    loss, clipfrac = R.ppo_loss(logp + 0.1, logp, torch.tensor([1.0, 1.0]), clip_range=1e-4)
    assert math.isclose(loss.item(), -(1 + 1e-4), rel_tol=1e-6) and clipfrac.item() == 1


def test_per_prompt_stat_tracker_uses_batch_statistics_until_min_count():
    import numpy as np

    tracker = R.PerPromptStatTracker(buffer_size=4, min_count=3)
    ids, rewards = np.array([0, 0, 1, 1]), np.array([1.0, 3.0, 10.0, 30.0])
    expected = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    np.testing.assert_allclose(tracker.update(ids, rewards), expected)
    adv = tracker.update(np.array([0]), np.array([2.0]))  # prompt 0 now has 3 rewards: its own statistics
    np.testing.assert_allclose(adv, (2.0 - 2.0) / (np.std([1, 3, 2]) + 1e-6))


def test_help():
    out = subprocess.run(
        [sys.executable, str(ROOT / "rebel_lcm.py"), "--help"], env=ENV, capture_output=True, text=True
    )
    assert out.returncode == 0 and "--eta" in out.stdout and "--final-step-logprob" in out.stdout


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--reward", "beauty"], "--reward 'beauty' is unknown: use one of aesthetic"),
        (["--sample-batch-size", "8", "--gradient-accumulation-steps", "3"], "must be a positive multiple"),
        (["--eta", "0"], "--eta 0.0 must be > 0"),
    ],
)
def test_bad_input_gives_a_clear_error(flags, message, tmp_path):
    out = run_script(["--tiny", *flags], tmp_path, timeout=60)
    assert out.returncode != 0
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_rebel_iteration_end_to_end_with_wandb_offline(tmp_path):
    # Two pairs per micro-batch: the path on which the reference implementation mixes pairs.
    flags = [*SMALL, "--train-batch-size", "2", "--gradient-accumulation-steps", "1", "--reward", "compressibility"]
    out = run_script([*flags, "--num-iterations", "2", "--track"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir, rows = read_progress(tmp_path)
    assert [int(r["reward_queries"]) for r in rows] == [4, 8]  # two queries per pair, 2 pairs per iteration
    assert (run_dir / "lora.safetensors").exists() and list(run_dir.glob("events.out.tfevents*"))
    assert json.loads((run_dir / "progress.json").read_text())["history"][-1]["reward_queries"] == 8
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_ppo_iteration_end_to_end(tmp_path):
    flags = [*SMALL, "--algo", "ppo", "--reward", "aesthetic", "--num-iterations", "1", "--train-batch-size", "1"]
    out = run_script(flags, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    _, rows = read_progress(tmp_path)
    assert [int(r["reward_queries"]) for r in rows] == [2]  # one query per sample


def test_torchrun_two_processes_keep_lora_identical(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    env = {**TORCHRUN_ENV, "HF_HUB_OFFLINE": "1"}
    out = run_script([*SMALL, "--reward", "aesthetic", "--num-iterations", "2"], tmp_path, launcher, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    check_gloo_threads_joined(out.stdout, ranks=2)
    pattern = r"across ranks (\S+) \(max \|change\| since init (\S+)\), first-noise sums per rank \[(\S+), (\S+)\]"
    match = re.search(pattern, out.stdout)
    assert match, out.stdout
    assert float(match.group(1)) == 0.0 and float(match.group(2)) > 0  # trained, and still identical on both ranks
    assert match.group(3) != match.group(4)  # each rank drew its own noise
    _, rows = read_progress(tmp_path)
    assert int(rows[-1]["reward_queries"]) == 2 * 2 * 2 * 2  # ranks x prompts x pair x iterations


# Measured on seeds 1-5 (docs/rebel_lcm.md): the mean of iterations 8-10 is 0.22 to 0.41 kB above the mean of
# iterations 1-3 (about -1.59), while batch-to-batch noise at the start is about 0.005. A random tiny UNet needs LoRA
# on conv_out too (see --lora-targets) and a large step size.
LEARN = ["--tiny", "--sample-batch-size", "4", "--gradient-accumulation-steps", "4", "--num-steps", "4",
         "--learning-rate", "3e-2", "--lora-alpha", "64", "--lora-targets", "to_q", "to_k", "to_v", "to_out.0", "conv_out",
         "--reward", "compressibility", "--num-iterations", "10", "--eval-every", "100"]  # fmt: skip


@pytest.mark.parametrize("seed", [1, pytest.param(2, marks=pytest.mark.slow)])  # -m "not slow" keeps one seed
def test_rebel_raises_compressibility_in_tiny_mode(seed, tmp_path):
    out = run_script([*LEARN, "--seed", str(seed)], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    _, rows = read_progress(tmp_path)
    rewards = [float(r["reward_mean"]) for r in rows]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.1, rewards


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tiny_iteration_on_cuda_bf16(tmp_path):
    out = run_script([*SMALL, "--reward", "compressibility", "--num-iterations", "1"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]


def test_plot_lcm_draws_iqm_with_bootstrap_ci(tmp_path):
    import numpy as np

    sys.path.insert(0, str(ROOT / "eval"))
    import plot_lcm

    rng = np.random.default_rng(0)
    for algo, queries_per_iter in (("rebel", 16), ("ppo", 8)):
        for seed in range(3):
            history = [
                dict(iteration=i, reward_queries=i * queries_per_iter, reward_mean=5 + 0.01 * i + 0.1 * rng.normal())
                for i in range(1, 41)
            ]
            run = tmp_path / "runs" / f"{algo}_{seed}"
            run.mkdir(parents=True)
            (run / "progress.json").write_text(json.dumps(dict(args=dict(algo=algo, seed=seed), history=history)))
    runs = plot_lcm.load_runs(tmp_path / "runs")
    grid, mean, low, high = plot_lcm.iqm_curve(runs["ppo"])
    assert grid[-1] == 320 and np.all(low <= mean + 1e-9) and np.all(mean <= high + 1e-9)
    out = subprocess.run(
        [sys.executable, str(ROOT / "eval" / "plot_lcm.py"), "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "f.png")],
        env=ENV, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "f.png").stat().st_size > 10_000
