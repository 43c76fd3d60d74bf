"""Tests for rebel_lcm.py: offline, CPU, tiny models built from configs."""

import filecmp
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from conftest import TORCHRUN_ENV, check_gloo_threads_joined  # noqa: E402

import rebel_lcm as R  # noqa: E402

# One thread per process: on a shared 2-core machine torch's thread pool otherwise spins and runs ~10x slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
# A few-second iteration: 2 prompts (REBEL: 2 pairs), 3 denoising steps, 32x32 images.
SMALL = ["--tiny", "--resolution", "32", "--sample_batch_size", "2", "--gradient_accumulation_steps", "2"]
SMALL += ["--num_steps", "3"]
# Runs the script as __main__ and then saves, per rank, what a test checks: the optimizer steps taken, the LoRA
# weights and the last rollout's noise (rank<RANK>.pt in the working directory).
RUN_AND_DUMP = """
import os, runpy, sys, torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from peft import get_peft_model_state_dict
steps = []
register_optimizer_step_post_hook(lambda *_: steps.append(1))
sys.argv = sys.argv[1:]
g = {}  # main's locals as it returns
sys.setprofile(lambda frame, event, arg: event == "return" and frame.f_code.co_name == "main"
               and frame.f_code.co_filename.endswith("rebel_lcm.py") and g.update(frame.f_locals))
runpy.run_path(sys.argv[0], run_name="__main__")
sys.setprofile(None)
dump = dict(steps=len(steps), lora=get_peft_model_state_dict(g["raw_unet"]), noise=g["noise"])
torch.save(dump, f"rank{os.environ.get('RANK', 0)}.pt")
"""


def sampling(args, dtype) -> dict:
    """sample_trajectories' settings as main() passes them."""
    return dict(dtype=dtype, final_step_logprob=args.final_step_logprob, per_dim=args.logprob_per_dim)


def run_script(args, tmp_path, launcher=(sys.executable,), timeout=300, env=ENV, dump=False):
    if dump:  # the launcher runs RUN_AND_DUMP, which runs rebel_lcm.py
        (tmp_path / "run_and_dump.py").write_text(RUN_AND_DUMP)
        launcher = [*launcher, str(tmp_path / "run_and_dump.py")]
    cmd = [*launcher, str(ROOT / "rebel_lcm.py"), *args, "--output_dir", str(tmp_path / "runs")]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def read_progress(tmp_path):
    """The run folder that --output_dir holds, and its per-iteration metrics."""
    (run_dir,) = list((tmp_path / "runs").iterdir())
    return run_dir, read_metrics(run_dir)


@pytest.fixture(scope="module")
def tiny():
    """Tiny LCM parts, a small config and the step coefficients, shared by the unit tests."""
    torch.set_num_threads(1)
    args = R.Args(tiny=True, num_steps=4, reward="compressibility")
    tokenizer, text_encoder, unet, vae, scheduler = R.build_lcm(args)
    coef = R.lcm_coefficients(scheduler, args.num_steps, args.lcm_origin_steps, args.final_step_logprob, "cpu")
    embeds = R.encode_prompts(tokenizer, text_encoder, ["cat", "hedgehog"], "cpu")
    w_emb = R.guidance_embedding(torch.full((2,), args.guidance_scale - 1), unet.config.time_cond_proj_dim)
    return dict(args=args, unet=unet, vae=vae, scheduler=scheduler, coef=coef, embeds=embeds, w_emb=w_emb)


def test_step_log_prob_is_the_gaussian_density_and_recomputes_to_ratio_one(tiny):
    args, unet, coef, embeds, w_emb = tiny["args"], tiny["unet"], tiny["coef"], tiny["embeds"], tiny["w_emb"]
    torch.manual_seed(0)
    noise = torch.randn(2, 4, 16, 16)
    states, next_states, log_probs, final = R.sample_trajectories(
        unet, coef, embeds, w_emb, noise, **sampling(args, torch.float32)
    )
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
        recomputed = R.trajectory_log_probs(
            unet, coef, states, next_states, embeds, w_emb, dtype=torch.float32, per_dim=True
        )
    torch.testing.assert_close(torch.exp(recomputed - log_probs), torch.ones(2, 3), rtol=0, atol=1e-5)


def test_summed_log_prob_is_the_exact_density():
    x, mean, std = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor(0.7)
    expected = torch.distributions.Normal(mean, std).log_prob(x).sum(dim=(1, 2, 3))
    torch.testing.assert_close(R.gaussian_log_prob(x, mean, std, per_dim=False), expected)


def test_final_step_logprob_follows_the_reference(tiny):
    args = R.Args(tiny=True, num_steps=4, final_step_logprob=True)
    coef = R.lcm_coefficients(tiny["scheduler"], 4, args.lcm_origin_steps, True, "cpu")
    # The reference steps from the last timestep to itself: noise with variance 1 - alpha-bar(t_last).
    assert coef["alpha_next"][-1] == coef["alpha"][-1] < 1
    assert R.lcm_coefficients(tiny["scheduler"], 4, args.lcm_origin_steps, False, "cpu")["alpha_next"][-1] == 1
    noise = torch.randn(2, 4, 16, 16)
    _, _, log_probs, _ = R.sample_trajectories(
        tiny["unet"], coef, tiny["embeds"], tiny["w_emb"], noise, **sampling(args, torch.float32)
    )
    assert log_probs.shape == (2, 4)  # all 4 steps carry a log-prob


def test_rebel_loss_matches_hand_computed_values():
    t = lambda *rows: torch.tensor(rows)  # noqa: E731  one (y, y') row per prompt
    # ((1.0 - 0.5) - (0.2 - 0.4)) / 0.5 - (1 - 0) = 0.4, squared 0.16
    loss = R.rebel_loss(t((1.0, 0.2)), t((0.5, 0.4)), t((1.0, 0.0)), eta=0.5)
    assert math.isclose(loss.item(), 0.16, rel_tol=1e-6)
    # a second pair: ((0.3 - 0.0) - (0.1 - 0.0)) / 0.5 - (2 - 1) = -0.6, squared 0.36; the loss is their mean
    loss = R.rebel_loss(t((1.0, 0.2), (0.3, 0.1)), t((0.5, 0.4), (0.0, 0.0)), t((1.0, 0.0), (2.0, 1.0)), eta=0.5)
    assert math.isclose(loss.item(), (0.16 + 0.36) / 2, rel_tol=1e-6)
    # scaling="official" multiplies by eta^2 (the official code's eta * log-ratio - reward form)
    official = R.rebel_loss(t((1.0, 0.2)), t((0.5, 0.4)), t((1.0, 0.0)), eta=0.5, scaling="official")
    assert math.isclose(official.item(), 0.25 * 0.16, rel_tol=1e-6)


def test_rebel_pairs_are_never_mixed():
    """The reference implementation sums log-probs over the whole train batch; each pair must stand alone."""
    torch.manual_seed(0)
    logp, old, r = (torch.randn(4, 2) for _ in range(3))
    logp.requires_grad_(True)
    loss = R.rebel_loss(logp, old, r, eta=1.0)
    (grad,) = torch.autograd.grad(loss, logp)
    residual = (logp - old)[:, 0] - (logp - old)[:, 1] - (r[:, 0] - r[:, 1])
    torch.testing.assert_close(grad[:, 0], 2 * residual.detach() / 4)  # pair b's gradient sees only pair b
    torch.testing.assert_close(grad[:, 1], -2 * residual.detach() / 4)
    mixed = ((residual.sum()) ** 2).mean()  # what summing over the batch would give
    assert not torch.isclose(loss, mixed)
    perm = torch.tensor([2, 0, 3, 1])  # shuffling whole pairs changes nothing
    torch.testing.assert_close(loss, R.rebel_loss(logp[perm], old[perm], r[perm], eta=1.0))


def test_bf16_frozen_weights_on_cpu():
    """The CUDA set-up on CPU: frozen LCM in bf16, fp32 LoRA and a fp32 w-embedding as __main__ builds them; one
    rollout, reward and REBEL loss step. Before the fix the UNet's bf16 cond_proj met the fp32 w-embedding."""
    from peft import LoraConfig

    args, bf16 = R.Args(tiny=True, num_steps=3), torch.bfloat16
    tokenizer, text_encoder, unet, vae, scheduler = R.build_lcm(args)
    for module in (text_encoder, unet, vae):
        module.requires_grad_(False).to(dtype=bf16)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(args.lora_targets)))
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    for p in lora_params:
        p.data = p.data.float()
    coef = R.lcm_coefficients(scheduler, args.num_steps, args.lcm_origin_steps, args.final_step_logprob, "cpu")
    embeds = R.encode_prompts(tokenizer, text_encoder, ["cat", "dog"], "cpu").repeat(2, 1, 1)  # rows y, y'
    w_emb = R.guidance_embedding(torch.full((1,), args.guidance_scale - 1), unet.config.time_cond_proj_dim)
    assert embeds.dtype == bf16 and w_emb.dtype == torch.float32
    torch.manual_seed(0)
    states, next_states, old_log_probs, final = R.sample_trajectories(
        unet, coef, embeds, w_emb, torch.randn(4, 4, 16, 16), **sampling(args, bf16)
    )
    rewards = -R.jpeg_kilobytes(R.decode(vae, final, bf16))
    log_probs = R.trajectory_log_probs(unet, coef, states, next_states, embeds, w_emb, dtype=bf16, per_dim=True)
    pair = lambda v: v.view(2, 2).T  # noqa: E731
    loss = R.rebel_loss(pair(log_probs.sum(1)), pair(old_log_probs.sum(1)), pair(rewards), eta=1.0)
    loss.backward()
    assert old_log_probs.dtype == log_probs.dtype == torch.float32 and torch.isfinite(loss)
    grads = torch.cat([p.grad.flatten() for p in lora_params])
    assert torch.isfinite(grads).all() and grads.abs().max() > 0


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
    assert out.returncode == 0 and "--eta" in out.stdout and "--final_step_logprob" in out.stdout
    assert "--lr FLOAT" in out.stdout and "--sample-batch-size" not in out.stdout  # snake_case, as the siblings


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--reward", "beauty"], "invalid choice 'beauty' for argument '--reward'"),
        (["--algo", "dpo"], "invalid choice 'dpo' for argument '--algo'"),
        (["--sample_batch_size", "8", "--gradient_accumulation_steps", "3"], "must be a positive multiple"),
        (["--eta", "0"], "--eta 0.0 must be > 0"),
        (["--lr", "0"], "--lr must be > 0; got 0.0"),
        (
            ["--lora_targets", "q_proj"],
            "found in the base model. Please check the target modules and try again. The UNet's linear and conv layers are named",
        ),
    ],
)
def test_bad_input_gives_a_clear_error(flags, message, tmp_path):
    out = run_script(["--tiny", *flags], tmp_path, timeout=60)
    assert out.returncode != 0
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_rebel_iteration_end_to_end_with_wandb_offline(tmp_path):
    # Two pairs per micro-batch: the path on which the reference implementation mixes pairs.
    flags = [*SMALL, "--train_batch_size", "2", "--gradient_accumulation_steps", "1", "--reward", "compressibility"]
    out = run_script([*flags, "--num_iterations", "2", "--track"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir, rows = read_progress(tmp_path)
    assert [r["objective/reward_queries"] for r in rows] == [4, 8]  # two queries per pair, 2 pairs per iteration
    assert (run_dir / "lora.safetensors").exists() and list(run_dir.glob("events.out.tfevents*"))
    assert json.loads((run_dir / "progress.json").read_text())["history"][-1]["reward_queries"] == 8
    assert list((run_dir / "wandb").glob("offline-run-*"))


# Defaults but 2 denoising steps and 32x32 images: every optimizer-step count of the defaults, at little cost.
TINY_DEFAULTS = ["--tiny", "--resolution", "32", "--num_steps", "2", "--num_iterations", "2"]


def test_ppo_iteration_end_to_end_with_the_papers_accumulation(tmp_path):
    """The paper's PPO (8 samples, 2 per micro-batch, 2 inner epochs, accumulation 8): accepted, one step per
    iteration."""
    flags = [
        "--algo",
        "ppo",
        "--train_batch_size",
        "2",
        "--num_inner_epochs",
        "2",
        "--gradient_accumulation_steps",
        "8",
    ]
    out = run_script([*TINY_DEFAULTS, *flags, "--reward", "aesthetic"], tmp_path, dump=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert torch.load(tmp_path / "rank0.pt")["steps"] == 2
    _, rows = read_progress(tmp_path)
    assert [r["objective/reward_queries"] for r in rows] == [8, 16]  # one query per sample


@pytest.mark.parametrize("algo", ["rebel", "ppo"])
def test_defaults_take_one_optimizer_step_per_iteration(algo, tmp_path):
    """The paper compares REBEL and PPO at equal gradient updates: the defaults step once per iteration for both."""
    out = run_script([*TINY_DEFAULTS, "--algo", algo, "--reward", "compressibility"], tmp_path, dump=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert torch.load(tmp_path / "rank0.pt")["steps"] == 2


def test_torchrun_two_processes_keep_lora_identical(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    env = {**TORCHRUN_ENV, "HF_HUB_OFFLINE": "1"}
    flags = [*SMALL, "--reward", "aesthetic", "--num_iterations", "2"]
    out = run_script(flags, tmp_path, launcher, env=env, dump=True)
    assert out.returncode == 0, out.stderr[-3000:]
    check_gloo_threads_joined(out.stdout, ranks=2)
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0["steps"] == rank1["steps"] == 2
    assert not torch.equal(rank0["noise"], rank1["noise"])  # each rank drew its own noise ...
    for name, weight in rank0["lora"].items():  # ... yet DDP's averaged gradients keep the weights identical
        torch.testing.assert_close(weight, rank1["lora"][name], rtol=0, atol=0)
    moved = max(w.abs().max().item() for k, w in rank0["lora"].items() if "lora_B" in k)  # lora_B starts at 0
    assert moved > 0
    (run_dir,) = list((tmp_path / "runs").iterdir())  # and rank 0 saved those weights
    saved = load_file(run_dir / "lora.safetensors")
    assert saved.keys() == rank0["lora"].keys() and all(torch.equal(saved[k], rank0["lora"][k]) for k in saved)
    _, rows = read_progress(tmp_path)
    assert rows[-1]["objective/reward_queries"] == 2 * 2 * 2 * 2  # ranks x prompts x pair x iterations


# Measured on seeds 1-5 (docs/rebel_lcm.md): the mean of iterations 8-10 is 0.22 to 0.41 kB above the mean of
# iterations 1-3 (about -1.59), while batch-to-batch noise at the start is about 0.005. A random tiny UNet needs LoRA
# on conv_out too (see --lora_targets) and a large step size.
LEARN = ["--tiny", "--resolution", "32", "--sample_batch_size", "4", "--gradient_accumulation_steps", "4"]
LEARN += ["--num_steps", "4", "--lr", "3e-2", "--lora_alpha", "64", "--reward", "compressibility"]
LEARN += ["--lora_targets", "to_q", "to_k", "to_v", "to_out.0", "conv_out", "--num_iterations", "10"]
LEARN += ["--eval_every", "100"]


@pytest.mark.parametrize("seed", [1, pytest.param(2, marks=pytest.mark.slow)])  # -m "not slow" keeps one seed
def test_rebel_raises_compressibility_in_tiny_mode(seed, tmp_path):
    out = run_script([*LEARN, "--seed", str(seed)], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    _, rows = read_progress(tmp_path)
    rewards = [r["objective/reward"] for r in rows]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.1, rewards


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tiny_iteration_on_cuda_bf16(tmp_path):
    out = run_script([*SMALL, "--reward", "compressibility", "--num_iterations", "1"], tmp_path)
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
    cmd = [sys.executable, str(ROOT / "eval" / "plot_lcm.py"), "--runs", str(tmp_path / "runs")]
    out = subprocess.run([*cmd, "--out", str(tmp_path / "f.png")], env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "f.png").stat().st_size > 10_000


# Eight short iterations, an evaluation every 3 (its own generator: it must not move the run's RNG).
RESUMABLE = ["--tiny", "--resolution", "32", "--sample_batch_size", "2", "--gradient_accumulation_steps", "2"]
RESUMABLE += ["--num_steps", "2", "--reward", "compressibility", "--num_iterations", "8", "--eval_every", "3"]


def course(run_dir) -> list[dict]:
    """The logged iterations without their timings, which differ between runs."""
    return [{k: v for k, v in row.items() if not k.startswith(("time/", "memory/"))} for row in read_metrics(run_dir)]


def start(flags, tmp_path, name, launcher=(sys.executable,), env=ENV):
    """The script in the background, in a process group of its own, its output in tmp_path/<name>.log."""
    cmd = [*launcher, str(ROOT / "rebel_lcm.py"), *flags]
    with open(tmp_path / f"{name}.log", "w") as log:
        return subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_after(proc, run_dir, rows: int, sig, group: bool = False) -> tuple[int, int]:
    """Send `sig` (to the whole process group with `group`: torchrun and its workers, as a scheduler stops them) once
    the run has logged `rows` iterations; return its exit code and the number of iterations logged by then."""
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= rows:
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
            break
        time.sleep(0.02)
    code = proc.wait(timeout=120)
    return code, len(read_metrics(run_dir))


@pytest.mark.slow
def test_a_stopped_run_resumes_exactly(tmp_path):
    """A whole run, and the same run stopped twice and resumed twice: SIGTERM (a checkpoint of the iteration under way,
    exit 143), then SIGKILL between checkpoints (logged iterations past the checkpoint, dropped on resume). The same
    metrics for every iteration, no row twice, the same LoRA weights, one wandb run."""
    full, part = tmp_path / "full", tmp_path / "part"
    every_2 = [*RESUMABLE, "--save_freq", "2"]
    whole = start([*every_2, "--run_dir", str(full)], tmp_path, "full")  # beside the stopped runs: 2 cores

    proc = start([*every_2, "--run_dir", str(part), "--track"], tmp_path, "1")
    code, logged = stop_after(proc, part, 2, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM and logged < 8, (tmp_path / "1.log").read_text()[-3000:]
    checkpoint = part / "checkpoints" / f"update_{logged:06d}"  # the iteration the signal let finish
    trainer = json.loads((checkpoint / "trainer.json").read_text())
    assert trainer["update"] == logged and trainer["reward_buffers"] and trainer["wandb_id"]
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    weights = [k for k in saved if k.startswith("model.")]
    assert weights and all("lora_" in k for k in weights), weights  # the LoRA weights alone, and their Adam state
    assert any(k.startswith("optimizer.state.") and k.endswith("exp_avg_sq") for k in saved)

    # --save_freq may change on resume; every 4 leaves iterations 5 to 7 to kill the run in, past a checkpoint.
    proc = start([*RESUMABLE, "--save_freq", "4", "--resume", str(part)], tmp_path, "2")
    code, logged = stop_after(proc, part, max(5, logged + 1), signal.SIGKILL)
    assert code == -signal.SIGKILL and logged < 8, (tmp_path / "2.log").read_text()[-3000:]
    out = run_script([*every_2, "--resume", str(part), "--track"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split("resumed after iteration ")[1].split()[0]) < logged

    assert whole.wait(timeout=300) == 0, (tmp_path / "full.log").read_text()[-3000:]
    assert course(part) == course(full) and [r["update"] for r in course(part)] == list(range(1, 9))
    progress = [json.loads((run / "progress.json").read_text())["history"] for run in (full, part)]
    assert progress[0] == progress[1] and len(progress[1]) == 8
    assert filecmp.cmp(full / "lora.safetensors", part / "lora.safetensors", shallow=False)
    assert sorted(os.listdir(part / "checkpoints")) == ["update_000006", "update_000008"]  # --keep_checkpoints 2
    runs = sorted((part / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {r.name.rsplit("-", 1)[1] for r in runs} == {trainer["wandb_id"]}


def test_run_dir_checks_fail_fast(tmp_path):
    """A new run refuses a non-empty run folder (its logs would mix with another run's) and one it cannot write, before
    it builds a model."""
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "metrics.jsonl").write_text('{"update": 1}\n')
    (tmp_path / "file").write_text("")
    for run_dir, message in (("used", "is not empty: pass --resume"), ("file/run", "is not a writable directory")):
        out = run_script(["--tiny", "--run_dir", str(tmp_path / run_dir)], tmp_path, timeout=60)
        assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_stopped_torchrun_run_resumes_exactly(tmp_path):
    """Two ranks: SIGTERM to torchrun and its workers; each rank writes its share of the checkpoint and its RNG states,
    and the resumed run ends where the whole run ends."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519"]
    env = {**TORCHRUN_ENV, "HF_HUB_OFFLINE": "1"}
    full, part = tmp_path / "full", tmp_path / "part"
    flags = [*RESUMABLE, "--save_freq", "2"]
    out = run_script([*flags, "--run_dir", str(full)], tmp_path, launcher, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    proc = start([*flags, "--run_dir", str(part)], tmp_path, "part", launcher, env)
    code, logged = stop_after(proc, part, 2, signal.SIGTERM, group=True)
    assert code != 0 and logged < 8, (tmp_path / "part.log").read_text()[-3000:]  # torchrun itself exits 1
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= set(os.listdir(part / "checkpoints" / f"update_{logged:06d}"))
    out = run_script([*flags, "--resume", str(part)], tmp_path, launcher, env=env)
    assert out.returncode == 0 and f"resumed after iteration {logged}" in out.stdout, out.stderr[-3000:]
    assert course(part) == course(full)
    assert filecmp.cmp(full / "lora.safetensors", part / "lora.safetensors", shallow=False)


def test_a_non_finite_batch_stops_the_run(tmp_path):
    """A learning rate of 1e30 wrecks the LoRA weights at the first step; the next rollout's log-probs are not finite,
    and the run stops there, naming them, with the batch saved, before the optimizer steps on it."""
    flags = [*RESUMABLE, "--lr", "1e30", "--no_clip_grad_norm", "--run_dir", str(tmp_path / "run")]
    out = run_script(flags, tmp_path)
    assert out.returncode != 0 and "error: the sampler's log-probs: 4 of 4 values are NaN or inf" in out.stderr
    assert "Traceback" not in out.stderr and len(read_metrics(tmp_path / "run")) == 1
    assert not torch.load(tmp_path / "run" / "nonfinite_rank0.pt")["the sampler's log-probs"].isfinite().any()


@pytest.mark.parametrize(
    "model, message",
    [("/nonexistent", "--model '/nonexistent': no such directory"), ("nobody/no-lcm", "--model nobody/no-lcm: cannot")],
    ids=["missing-folder", "unknown-hub-name"],
)
def test_a_model_that_cannot_be_loaded_is_one_line(model, message, tmp_path):
    out = run_script(["--model", model], tmp_path, timeout=120)
    assert out.returncode == 1 and message in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert not (tmp_path / "runs").exists()  # a run that failed to start leaves no empty folder behind


def test_a_run_killed_in_its_first_checkpoint_starts_over_on_resume(tmp_path):
    """Killed while it wrote its first checkpoint, a run has only update_N.tmp: --resume starts it over in its own
    folder (as the LM scripts' open_run does), rather than refusing it or starting elsewhere, and ends with a
    checkpoint of its last iteration (here the second, where --save_freq 0 would write none)."""
    run = tmp_path / "run"
    (run / "checkpoints" / "update_000002.tmp").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"update": 1}\n{"update": 2}\n')
    out = run_script([*RESUMABLE, "--num_iterations", "2", "--save_freq", "0", "--resume", str(run)], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no complete checkpoint there; starting the run in it" in out.stderr
    assert [r["update"] for r in read_metrics(run)] == [1, 2] and not (tmp_path / "runs").exists()
    assert (run / "lora.safetensors").exists() and os.listdir(run / "checkpoints") == ["update_000002"]
