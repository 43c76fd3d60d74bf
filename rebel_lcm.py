"""REBEL and a DDPO-style PPO baseline for text-to-image latent consistency models.

REBEL: Reinforcement Learning via Regressing Relative Rewards (Gao et al., 2024, arXiv 2404.16767), Section 4.3 (image
generation), Figure 3 and Appendix I.3. Each of the 8 denoising steps of a latent consistency model (LCM) is a Gaussian
policy; a trajectory's log-prob is the sum of its step log-probs. REBEL regresses the difference of two trajectories'
log-ratios onto their reward difference, Equation (1):

    ( (1/eta) * ( ln pi_theta(y|x)/pi_t(y|x) - ln pi_theta(y'|x)/pi_t(y'|x) ) - (r(x,y) - r(x,y')) )^2

`--algo ppo` swaps the regression for the per-step clipped ratio of DDPO (Black et al., 2023), the paper's "PPO"
baseline. Everything else (sampler, rewards, normalisation, LoRA) is shared. The file reads top to bottom: the flags
(Args), the algorithm (the losses, the sampler), the loop (main), the models, reward and logs of this script, then the
plumbing shared with rebel.py.

    python rebel_lcm.py --tiny --resolution 32 --reward compressibility --num_iterations 5      # offline CPU demo
    torchrun --nproc_per_node 4 rebel_lcm.py --algo rebel --aesthetic_mlp_path sac+logos+ava1-l14-linearMSE.pth
    torchrun --nproc_per_node 4 rebel_lcm.py --algo ppo --lr 1e-4 --train_batch_size 2 --num_inner_epochs 2 \
        --aesthetic_mlp_path sac+logos+ava1-l14-linearMSE.pth                                # the paper's PPO
    torchrun --nproc_per_node 4 rebel_lcm.py <the same flags> --resume runs/<run name>     # continue a stopped run

Reference implementation of the paper: https://github.com/Owen-Oertell/rlcm (see docs/rebel_lcm.md for where this
file differs from it).
"""

import atexit
import io
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (imported before init_process_group, which some torch versions need)
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.nn.parallel import DistributedDataParallel as DDP

# The 45 animal prompts of Appendix I.3.1.
ANIMALS = (
    "cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox wolf lizard "
    "beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog chicken duck goose bee pig "
    "turkey fly llama camel bat gorilla hedgehog kangaroo"
).split()


@dataclass
class Args:
    # REBEL (Equation 1), or DDPO's PPO
    algo: Literal["rebel", "ppo"] = "rebel"
    """`rebel` (Eq. 1) or `ppo` (DDPO's clipped ratio); the defaults below are the paper's REBEL settings"""
    eta: float = 1.0
    """REBEL's eta in Eq. (1); must be > 0"""
    clip_range: float = 1e-4
    """PPO ratio clip range"""
    clip_advantages: bool = True
    """clip normalised rewards to [-adv_clip_max, adv_clip_max] (the paper lists it; the reference's REBEL does not)"""
    adv_clip_max: float = 10.0
    """advantage clip"""
    stat_buffer_size: int = 32
    """per-prompt running buffer of rewards used for normalisation"""
    stat_min_count: int = 16
    """below this many rewards for a prompt, normalise with the statistics of the whole gathered batch"""

    # sampling (the MDP) and reward
    num_steps: int = 8
    """denoising steps (the horizon of the MDP)"""
    lcm_origin_steps: int = 50
    """the LCM scheduler's `original_inference_steps` (its skipping-step schedule)"""
    guidance_scale: float = 8.0
    """guidance scale fed to the LCM through its w-embedding (the reference implementation's 8.0)"""
    final_step_logprob: bool = False
    """False: the last step is deterministic (the scheduler's variance there is 0) and carries no log-prob. True: the
    reference implementation's: noise on the last step with its own timestep's variance, its log-prob counted, although
    the image is decoded from the mean"""
    logprob_per_dim: bool = True
    """average each step's Gaussian log-density over the latent's dimensions (reference implementation and DDPO);
    False sums them (the exact density, 4 x 96 x 96 = 36864 times larger at --resolution 768)"""
    resolution: int = 768
    """image side in pixels (square); the latents are resolution / 8 on the side (768: the reference's LCM pipeline)"""
    reward: Literal["aesthetic", "compressibility", "incompressibility"] = "aesthetic"
    """`aesthetic` (LAION predictor), `compressibility` or `incompressibility` (JPEG size, no weights)"""
    aesthetic_clip: str = "openai/clip-vit-large-patch14"
    """hub name or path of the CLIP ViT-L/14 whose normalised image embedding the aesthetic MLP reads"""
    aesthetic_mlp_path: str = "sac+logos+ava1-l14-linearMSE.pth"
    """the aesthetic MLP head's state dict: a local .pth/.safetensors file, or `owner/repo:filename` on the hub"""

    # optimisation
    num_iterations: int = 1000
    """sample-then-train iterations (the paper's 100 epochs x 10 batches per epoch)"""
    sample_batch_size: int = 8
    """prompts per rank per iteration; REBEL samples each prompt twice (a pair), PPO once"""
    train_batch_size: int = 1
    """prompts per micro-batch (REBEL: both samples of each prompt's pair). The paper's PPO uses 2"""
    gradient_accumulation_steps: int = 8
    """micro-batches per optimizer step, counted across inner epochs. The defaults take one optimizer step per
    iteration for both algos, as the paper compares them at equal gradient updates; so does the paper's PPO
    (--train_batch_size 2 --num_inner_epochs 2: 4 micro-batches x 2 epochs = 8)"""
    num_inner_epochs: int = 1
    """passes over each iteration's samples. The paper's PPO uses 2; with one optimizer step per iteration the second
    pass recomputes the first one's gradient at the same parameters: the update of one pass, twice the cost"""
    lr: float = 3e-4
    """AdamW learning rate: REBEL's 3e-4 (Appendix I.3.3); the paper's PPO uses 1e-4, so pass --lr 1e-4"""
    weight_decay: float = 0.0
    """AdamW weight decay (0 makes it the reference implementation's Adam)"""
    clip_grad_norm: bool = True
    """clip the gradient norm to max_grad_norm (the paper lists it; the reference REBEL loop does not)"""
    max_grad_norm: float = 5.0
    """maximum gradient norm"""

    # the trained model
    model: str = "SimianLuo/LCM_Dreamshaper_v7"
    """hub name or path of the latent consistency model (unet, vae, text_encoder, tokenizer, scheduler)"""
    tiny: bool = False
    """tiny random models built from configs instead of --model (tests, CPU demo): --resolution 32, 16x16 latents"""
    lora_rank: int = 8
    """LoRA rank on the UNet attention projections"""
    lora_alpha: int = 8
    """LoRA alpha"""
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    """UNet modules that get LoRA: the attention projections (paper, reference); the tiny learning test adds conv_out"""

    # speed and memory
    bf16: bool = True
    """on CUDA: frozen weights in bf16, trainable (LoRA) weights in fp32, UNet compute under bf16 autocast"""
    cuda: bool = True
    """use CUDA when it is available"""

    # the run: logs, evaluation, checkpoints
    exp_name: str = "rebel_lcm"
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment; rank r uses seed + r so that ranks draw different noise"""
    track: bool = False
    """log to Weights and Biases (works with WANDB_MODE=offline)"""
    wandb_project_name: str = "rebel"
    """the wandb project"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""
    output_dir: str = "runs"
    """the folder of the runs: a run writes to <output_dir>/<run name> unless --run_dir names its folder"""
    run_dir: str | None = None
    """the run's folder, new or empty: logs, progress.json, checkpoints, LoRA (default: <output_dir>/<run name>)"""
    eval_every: int = 10
    """evaluate (fixed prompts and noise, image grid) every this many iterations, and at the end"""
    num_eval_images: int = 8
    """images in the evaluation grid"""
    save_freq: int = 20
    """write a checkpoint and lora.safetensors every this many iterations (and at the last, and on Ctrl-C or SIGTERM);
    0 = only then"""
    keep_checkpoints: int = 2
    """how many of the latest checkpoints to keep in <run_dir>/checkpoints"""
    resume: str | None = None
    """continue the run in this folder from its latest checkpoint (or start it there): pass it at every launch"""
    world_size: int = 1
    """number of processes (filled at run time)"""
    queries_per_iteration: int = 0
    """reward queries per iteration over all ranks (filled at run time)"""
    run_name: str = ""
    """the run's name: its folder's name (filled at run time)"""


# ---------------------------------------------------------------------------------------------- the algorithm


def rebel_loss(new_logprobs, old_logprobs, rewards, eta: float, scaling: str = "paper") -> torch.Tensor:
    """Equation (1) over N pairs. All inputs are (N, 2): column 0 is y and column 1 is y', for the same prompt x.
    new_logprobs are ln pi_theta, old_logprobs ln pi_t (the rollout's), rewards r(x, y) = score(x, y) - kl_coef *
    (ln pi_t(y|x) - ln pi_ref(y|x)). A log-prob is the whole response's: for a text, summed over its tokens at the
    sampling temperature (sequence_logprobs), with no length normalisation. Both are computed the same way, so the
    first step starts from a log-ratio of ~0: the loss is then ~ mean (r(x, y) - r(x, y'))^2, and its gradient
    -2/eta mean (r(x, y) - r(x, y')) grad[ln pi(y|x) - ln pi(y'|x)], RLOO's with k = 2. A per-token loss would take
    response_logprobs (B, T) and the masks.

    mean_{x,y,y'} ( 1/eta * [ln pi_theta(y|x)/pi_t(y|x) - ln pi_theta(y'|x)/pi_t(y'|x)] - [r(x, y) - r(x, y')] )^2

    (The paper sums over the pairs, the official code takes eta^2 times the mean (scaling="official"): the same
    minimiser, and AdamW's steps barely see the scale.) The first log-ratio is ~0, not 0: the rollout and the step batch
    and pad the responses differently, so their kernels round differently, more so in bf16.
    """
    log_ratio = new_logprobs - old_logprobs  # (N, 2) ln pi_theta / pi_t
    prediction = (log_ratio[:, 0] - log_ratio[:, 1]) / eta  # (N,)
    target = rewards[:, 0] - rewards[:, 1]  # (N,)
    loss = ((prediction - target) ** 2).mean()
    return eta**2 * loss if scaling == "official" else loss


def ppo_loss(logp, old_logp, advantages, clip_range):
    """The alternative, DDPO's clipped surrogate on every step: -min(ratio A, clip(ratio, 1 -+ clip_range) A) with
    ratio = pi_theta / pi_t per step; logp, old_logp (B, T), advantages (B,). Returns (loss, clipfrac).
    https://github.com/kvablack/ddpo-pytorch/blob/main/scripts/train.py"""
    ratio = torch.exp(logp - old_logp)  # (B, T)
    unclipped = -advantages[:, None] * ratio
    clipped = -advantages[:, None] * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ((ratio - 1).abs() > clip_range).float().mean()


class PerPromptStatTracker:
    """The rewards r of Eq. (1) (and PPO's advantages): each normalised with the mean/std of its prompt's last
    `buffer_size` rewards; until a prompt has `min_count` rewards, with the statistics of the whole gathered batch
    (as the reference does). https://github.com/kvablack/ddpo-pytorch/blob/main/ddpo_pytorch/stat_tracking.py"""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count, self.buffers = buffer_size, min_count, {}

    def update(self, prompt_ids: np.ndarray, rewards: np.ndarray) -> np.ndarray:
        advantages = np.empty_like(rewards, dtype=np.float64)
        for p in np.unique(prompt_ids):
            mask = prompt_ids == p
            buffer = self.buffers.setdefault(int(p), deque(maxlen=self.buffer_size))
            buffer.extend(rewards[mask].tolist())
            stats = rewards if len(buffer) < self.min_count else np.asarray(buffer)
            advantages[mask] = (rewards[mask] - stats.mean()) / (stats.std() + 1e-6)
        return advantages

    def state_dict(self) -> dict:
        """The buffers as JSON: a checkpoint carries them, since they normalise the rewards of the iterations ahead."""
        return {str(p): list(buffer) for p, buffer in self.buffers.items()}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {int(p): deque(buffer, maxlen=self.buffer_size) for p, buffer in state.items()}


def lcm_coefficients(scheduler, num_steps: int, origin_steps: int, final_step_logprob: bool, device) -> dict:
    """Per denoising step i: timestep t_i, alpha-bar at t_i and at the next state, and the boundary scalings."""
    scheduler.set_timesteps(num_steps, original_inference_steps=origin_steps)
    t = scheduler.timesteps.long()
    alphas = scheduler.alphas_cumprod.float()
    alpha_next = torch.cat([alphas[t[1:]], torch.ones(1)])  # the scheduler's last step lands at alpha-bar 1: no noise
    if final_step_logprob:
        # The reference implementation steps from t_last to t_last itself, so the last step has variance 1 - alpha-bar.
        alpha_next[-1] = alphas[t[-1]]
    c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
    coef = dict(t=t, alpha=alphas[t], alpha_next=alpha_next, c_skip=c_skip.float(), c_out=c_out.float())
    return {k: v.to(device) for k, v in coef.items()}


def consistency_mean(unet, x_t, step, coef, prompt_embeds, w_emb, dtype):
    """The policy's mean for steps `step` (N,) from states x_t (N, C, H, W): the LCM's consistency output
    (Luo et al., 2023, Eq. 9: c_skip x_t + c_out x0_hat) rescaled to the next timestep; w_emb is (1 or N, D).
    Returns (mean, denoised)."""
    view = lambda v: v[step].view(-1, 1, 1, 1)  # noqa: E731
    # The frozen UNet may be bf16 while the sampler, the w-embedding and the LoRA weights are fp32: every input goes
    # in at the UNet's dtype (a fp32 w-embedding meets its bf16 cond_proj otherwise), LoRA runs under autocast.
    cond = dict(encoder_hidden_states=prompt_embeds.to(dtype), timestep_cond=w_emb.to(dtype).expand(len(x_t), -1))
    with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        eps = unet(x_t.to(dtype), coef["t"][step], **cond).sample
    a_t = view(coef["alpha"])
    x0 = (x_t - (1 - a_t).sqrt() * eps.float()) / a_t.sqrt()  # epsilon parameterisation
    denoised = view(coef["c_out"]) * x0 + view(coef["c_skip"]) * x_t
    return view(coef["alpha_next"]).sqrt() * denoised, denoised


def gaussian_log_prob(x_next, mean, std, per_dim: bool) -> torch.Tensor:
    """log N(x_next; mean, std^2 I) per sample (N,), averaged (per_dim) or summed over the latent dimensions."""
    log_density = -((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_density.mean(dim=(1, 2, 3)) if per_dim else log_density.sum(dim=(1, 2, 3))


@torch.no_grad()
def sample_trajectories(unet, coef, prompt_embeds, w_emb, noise, *, dtype, final_step_logprob, per_dim, generator=None):
    """Run the LCM sampler (coef: lcm_coefficients) from `noise` (B, C, H, W), recording every stochastic step.

    Returns states and next_states (B, T, C, H, W), log_probs (B, T) and the final denoised latents
    (B, C, H, W), where T = num_steps - 1 (or num_steps with --final_step_logprob)."""
    x, states, next_states, log_probs = noise.float(), [], [], []
    num_steps = len(coef["t"])
    num_stochastic = num_steps if final_step_logprob else num_steps - 1
    for i in range(num_steps):
        step = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        mean, denoised = consistency_mean(unet, x, step, coef, prompt_embeds, w_emb, dtype)
        if i < num_stochastic:
            std = (1 - coef["alpha_next"][i]).sqrt()
            x_next = mean + std * torch.randn(mean.shape, device=mean.device, generator=generator)
            states.append(x)
            next_states.append(x_next)
            log_probs.append(gaussian_log_prob(x_next, mean, std, per_dim))
            x = x_next
    return torch.stack(states, 1), torch.stack(next_states, 1), torch.stack(log_probs, 1), denoised


def trajectory_log_probs(unet, coef, states, next_states, prompt_embeds, w_emb, *, dtype, per_dim):
    """Recompute the step log-probs (B, T) of recorded trajectories under the current parameters, with
    gradients, in one UNet call over all B x T steps."""
    B, T = states.shape[:2]
    step = torch.arange(T, device=states.device).repeat(B)  # (B*T,)
    flat = lambda x: x.reshape(B * T, *x.shape[2:])  # noqa: E731
    mean, _ = consistency_mean(unet, flat(states), step, coef, prompt_embeds.repeat_interleave(T, 0), w_emb[:1], dtype)
    std = (1 - coef["alpha_next"][step]).sqrt().view(-1, 1, 1, 1)
    return gaussian_log_prob(flat(next_states), mean, std, per_dim).view(B, T)


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the guidance scale w (B,) -> (B, dim), the LCM's `timestep_cond`.
    https://github.com/huggingface/diffusers/blob/main/src/diffusers/pipelines/latent_consistency_models/pipeline_latent_consistency_text2img.py
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) / (half - 1) * torch.arange(half, dtype=torch.float32))
    angles = (w.float() * 1000.0)[:, None] * freqs[None, :]
    return F.pad(torch.cat([torch.sin(angles), torch.cos(angles)], dim=1), (0, dim % 2))


# ---------------------------------------------------------------------------------------------- the loop


def main(args: Args) -> None:
    check_args(args)

    # Set-up: processes, the run's folder, the frozen LCM with LoRA on its UNet, the reward, resume, logs.
    rank, args.world_size, device = init_processes(args.cuda, args.seed)
    ddp, dtype = dist.is_initialized(), torch.bfloat16 if device.type == "cuda" and args.bf16 else torch.float32
    pairs = 2 if args.algo == "rebel" else 1  # REBEL draws y and y' for every prompt
    args.queries_per_iteration = args.world_size * args.sample_batch_size * pairs
    run_name = f"{args.exp_name}__{args.algo}__{args.seed}__{int(time.time())}"
    run_dir = args.run_dir or os.path.join(args.output_dir, run_name)  # --resume: open_run takes its folder
    checkpoint, run_dir, *_ = open_run({**asdict(args), "run_dir": run_dir, "output_dir": ""})
    args.run_name = os.path.basename(os.path.normpath(run_dir))
    tokenizer, text_encoder, unet, vae, scheduler = load_lcm(args, device, dtype, rank)
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    reward_fn = make_reward_fn(args, device)
    coef = lcm_coefficients(scheduler, args.num_steps, args.lcm_origin_steps, args.final_step_logprob, device)
    side = args.resolution // 2 ** (len(vae.config.block_out_channels) - 1)  # the VAE downsamples by 8 (tiny: 2)
    latent_shape = (unet.config.in_channels, side, side)
    w_emb = guidance_embedding(torch.full((1,), args.guidance_scale - 1.0), unet.config.time_cond_proj_dim).to(device)
    raw_unet, unet = unet, DDP(unet, device_ids=[device.index] if device.type == "cuda" else None) if ddp else unet
    optimizer = torch.optim.AdamW(lora_params, lr=args.lr, weight_decay=args.weight_decay)
    stat_tracker = PerPromptStatTracker(args.stat_buffer_size, args.stat_min_count)
    sampling = dict(dtype=dtype, final_step_logprob=args.final_step_logprob, per_dim=args.logprob_per_dim)

    # Resume: the LoRA weights, the optimizer, the RNG states, the reward statistics and the position in the run.
    flags = asdict(args)
    record = load_checkpoint(checkpoint, unet, optimizer, flags, args.world_size)
    start_update, n = record.get("update", 0), args.num_iterations
    require(start_update <= n, f"--resume: update {start_update} is past the run's {n} updates")
    stat_tracker.load_state_dict(record.get("reward_buffers", {}))
    reward_queries = start_update * args.queries_per_iteration
    signals = stop_signals()
    log = LcmLog(run_dir, flags, record, start_update, reward_queries, device)
    run_evaluation = partial(evaluate_images, log=log, unet=raw_unet, vae=vae, tokenizer=tokenizer, coef=coef,
                             text_encoder=text_encoder, w_emb=w_emb, reward_fn=reward_fn, latent_shape=latent_shape,
                             sampling=sampling, num_images=args.num_eval_images)  # fmt: skip

    # The loop: rollout -> reward -> regress relative rewards (Eq. 1; or PPO) -> log -> checkpoint.
    B, mb, accumulation = args.sample_batch_size, args.train_batch_size, args.gradient_accumulation_steps
    stop, iteration, nan_dump = False, start_update, os.path.join(run_dir, f"nonfinite_rank{rank}.pt")
    for iteration in range(start_update + 1, args.num_iterations + 1):
        t0 = time.time()
        # 1. Rollout: B prompts per rank; REBEL samples each twice with different noise (y, y').
        prompt_ids = torch.from_numpy(np.random.randint(len(ANIMALS), size=args.sample_batch_size))
        embeds = encode_prompts(tokenizer, text_encoder, [ANIMALS[i] for i in prompt_ids], device)
        embeds = embeds.repeat(pairs, 1, 1)  # (pairs*B, L, D): rows [0, B) are y, rows [B, 2B) are y'
        noise = torch.randn((pairs * args.sample_batch_size, *latent_shape), device=device)
        states, next_states, old_log_probs, final = sample_trajectories(
            raw_unet, coef, embeds, w_emb, noise, **sampling
        )

        # 2. Reward: each normalised by its prompt's statistics, gathered from every rank (PerPromptStatTracker).
        rewards = reward_fn(decode(vae, final, dtype)).float().to(device)  # (pairs*B,)
        check_finite({"the rewards": rewards, "the sampler's log-probs": old_log_probs}, nan_dump)
        all_rewards = all_gather_cat(rewards, args.world_size)
        all_ids = all_gather_cat(prompt_ids.repeat(pairs).to(device), args.world_size)
        advantages = stat_tracker.update(all_ids.cpu().numpy(), all_rewards.cpu().numpy().astype(np.float64))
        advantages = torch.as_tensor(advantages, dtype=torch.float32).view(args.world_size, -1)[rank].to(device)
        if args.clip_advantages:
            advantages = advantages.clamp(-args.adv_clip_max, args.adv_clip_max)
        reward_queries += args.queries_per_iteration
        t_sample = time.time() - t0

        # 3. Train: micro-batches of whole trajectories (REBEL: whole pairs); the optimizer steps once every
        # --gradient_accumulation_steps micro-batches, counted across the inner epochs.
        info = {"loss": [], "approx_kl": [], "clipfrac": [], "grad_norm": []}
        unet.train()
        micro_step = 0
        pair = lambda v: v.view(2, mb).T  # noqa: E731  (2*mb,) rows [y of idx, y' of idx] -> (mb, 2): columns y, y'
        for _ in range(args.num_inner_epochs):
            perm = torch.randperm(B, device=device)  # shuffles prompts (pairs), never splitting y from y'
            for start in range(0, B, mb):
                idx = perm[start : start + mb]
                rows = torch.cat([idx + j * B for j in range(pairs)])  # REBEL: [y of idx, y' of idx]
                micro_step += 1
                last_micro_step = micro_step % accumulation == 0
                if ddp:  # synchronise LoRA gradients only on the micro-batch that steps the optimizer
                    unet.require_backward_grad_sync = last_micro_step
                log_probs = trajectory_log_probs(unet, coef, states[rows], next_states[rows], embeds[rows], w_emb,
                                                 dtype=dtype, per_dim=args.logprob_per_dim)  # fmt: skip
                if args.algo == "rebel":  # (pairs*mb, T): a trajectory's log-prob is the sum of its step log-probs
                    loss = rebel_loss(
                        pair(log_probs.sum(1)), pair(old_log_probs[rows].sum(1)), pair(advantages[rows]), args.eta
                    )
                else:
                    loss, clipfrac = ppo_loss(log_probs, old_log_probs[rows], advantages[rows], args.clip_range)
                    info["clipfrac"].append(clipfrac.detach())
                check_finite(
                    {f"the {args.algo} loss": loss.detach(), "the new log-probs": log_probs.detach()}, nan_dump
                )
                (loss / accumulation).backward()
                info["loss"].append(loss.detach())
                if last_micro_step:
                    if args.clip_grad_norm:
                        info["grad_norm"].append(torch.nn.utils.clip_grad_norm_(lora_params, args.max_grad_norm))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        unet.eval()
        # Before the first optimizer step every log-ratio is 0, so I measure the KL after the update, on the last
        # micro-batch: Schulman's k2 estimator 0.5 (log pi_theta - log pi_t)^2 per step, as DDPO logs it.
        with torch.no_grad():
            new_log_probs = trajectory_log_probs(raw_unet, coef, states[rows], next_states[rows], embeds[rows], w_emb,
                                                 dtype=dtype, per_dim=args.logprob_per_dim)  # fmt: skip
        info["approx_kl"].append(0.5 * ((new_log_probs - old_log_probs[rows]) ** 2).mean())

        # 4. Log: metrics reduced over ranks, with reward queries as the x-axis; evaluate every --eval_every.
        stats = {f"loss/{args.algo}": info["loss"], "policy/approx_kl": info["approx_kl"]}
        stats |= {f"policy/{k}": info[k] for k in ("clipfrac", "grad_norm") if info[k]}  # PPO; --clip_grad_norm
        log.write(iteration, stats, all_rewards, reward_queries, t0, t_sample)
        if log.master and (iteration % args.eval_every == 0 or iteration == args.num_iterations):
            run_evaluation(iteration, reward_queries)

        # 5. Checkpoint every --save_freq iterations, at the last, and on Ctrl-C or SIGTERM, which then stop the run.
        received = torch.tensor(len(signals), device=device)
        if ddp:  # a signal may reach the ranks in different iterations: all of them stop after the same one
            dist.all_reduce(received, op=dist.ReduceOp.MAX)
        stop = received.item() > 0
        if stop or iteration == args.num_iterations or (args.save_freq > 0 and iteration % args.save_freq == 0):
            record.update(update=iteration, world_size=args.world_size, flags=flags,
                           reward_buffers=stat_tracker.state_dict())  # fmt: skip
            save_checkpoint(run_dir, iteration, unet, optimizer, record, args.keep_checkpoints)
            log.save_lora(raw_unet)
        if stop:
            break
    del unet  # gloo's worker threads are joined at exit only once DDP's wrapper is gone (tests/test_ddp_teardown.py)
    log.end(iteration, signals if stop else None)


# ---------------------------------------------------------------------------------------------- this script's plumbing


def check_args(args: Args) -> None:
    """Refuse bad flags before anything starts."""
    require(args.lr > 0, f"--lr must be > 0; got {args.lr}")
    require(args.eta > 0, f"--eta {args.eta} must be > 0 (it divides the log-ratio in Eq. 1): try --eta 1.0")
    require(not args.tiny or args.model == Args.model, "--tiny builds random models instead of --model: drop one")
    local = args.model.startswith(("/", ".", "~"))  # a path, not a hub name
    require(args.tiny or os.path.isdir(args.model) or not local, f"--model '{args.model}': no such directory")
    require(args.num_steps >= 2, f"--num_steps {args.num_steps} leaves no stochastic step: use --num_steps 2 or more")
    B, mb, accumulation = args.sample_batch_size, args.train_batch_size, args.gradient_accumulation_steps
    micro_batches = args.num_inner_epochs * B // max(mb, 1)  # per iteration, over all inner epochs
    require(
        min(B, mb, accumulation, args.num_inner_epochs) >= 1 and B % mb == 0 and micro_batches % accumulation == 0,
        f"--sample_batch_size {B} must be a positive multiple of --train_batch_size {mb}, and its {micro_batches} "
        f"micro-batches (x --num_inner_epochs) a multiple of --gradient_accumulation_steps {accumulation}, so that "
        f"every optimizer step sees as many samples: e.g. --gradient_accumulation_steps {max(micro_batches, 1)}",
    )


def load_lcm(args: Args, device, dtype, rank: int):
    """build_lcm's parts frozen in `dtype`, fp32 LoRA on the UNet's --lora_targets: the same init on every rank (--seed;
    DDP also broadcasts rank 0's); then each rank draws its own noise (seed + rank)."""
    from diffusers.utils import logging as diffusers_logging
    from peft import LoraConfig

    diffusers_logging.set_verbosity_error()  # its dtype-cast advice targets from_pretrained, not our frozen copies
    torch.manual_seed(args.seed)
    tokenizer, text_encoder, unet, vae, scheduler = build_lcm(args)
    for module in (text_encoder, unet, vae):
        module.requires_grad_(False)
        module.to(device, dtype=dtype).eval()
    try:
        unet.add_adapter(
            LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, target_modules=list(args.lora_targets))
        )
    except ValueError as e:  # peft's NoMatchingPeftModuleError
        layers = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        names = sorted({re.sub(r"^(.*\.)?([A-Za-z_]\w*(\.\d+)?)$", r"\2", n) for n in layers})  # to_q, conv_out, ...
        raise BadInput(f"--lora_targets: {e} The UNet's linear and conv layers are named {names}") from e
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    torch.manual_seed(args.seed + rank)
    return tokenizer, text_encoder, unet, vae, scheduler


def build_tiny_tokenizer(folder: str):
    """A character-level CLIPTokenizer written to `folder`: printable ASCII, no merges, no download."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in range(33, 127):
            vocab[chr(c) + suffix] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))


def build_lcm(args: Args):
    """Tokenizer, text encoder, UNet, VAE and LCM scheduler: from `args.model`, or tiny ones from configs."""
    from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if not args.tiny:
        m = args.model
        try:
            return (
                CLIPTokenizer.from_pretrained(m, subfolder="tokenizer"),
                CLIPTextModel.from_pretrained(m, subfolder="text_encoder"),
                UNet2DConditionModel.from_pretrained(m, subfolder="unet"),
                AutoencoderKL.from_pretrained(m, subfolder="vae"),
                LCMScheduler.from_pretrained(m, subfolder="scheduler"),
            )
        except Exception as e:  # one line, not the hub client's two chained tracebacks
            raise BadInput(
                f"--model {m}: cannot load the latent consistency model ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:300]}); give a hub name or a folder with its tokenizer, text_encoder, unet, "
                "vae and scheduler"
            ) from e
    # Sizes follow diffusers' own pipeline tests; time_cond_proj_dim gives the UNet the LCM's w-embedding input.
    # A forked RNG seeded 0: the same tiny "pretrained" weights on every rank and in every run, and the caller's
    # random stream untouched.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as folder:  # the tokenizer reads its files once, at construction
            tokenizer = build_tiny_tokenizer(folder)
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                                                    num_hidden_layers=2, num_attention_heads=4, bos_token_id=0,
                                                    eos_token_id=1))  # fmt: skip
        unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), time_cond_proj_dim=32,
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))  # fmt: skip
        # scaling_factor 1: Stable Diffusion's 0.18215 is its trained VAE's latent std; a random VAE fed latents x5.5
        # decodes saturated texture that no policy can change.
        vae = AutoencoderKL(block_out_channels=(32, 64), scaling_factor=1.0, up_block_types=("UpDecoderBlock2D",) * 2,
                            down_block_types=("DownEncoderBlock2D",) * 2)  # fmt: skip
    return tokenizer, text_encoder, unet, vae, LCMScheduler()


class AestheticMLP(nn.Module):
    """The LAION aesthetic predictor's head, layer for layer (dropout is inert at eval), so its state dict loads.
    https://github.com/christophschuhmann/improved-aesthetic-predictor/blob/main/simple_inference.py"""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16),
                                    nn.Linear(16, 1))  # fmt: skip

    def forward(self, embed):
        return self.layers(embed).squeeze(-1)


class AestheticScorer(nn.Module):
    """CLIP image embedding -> L2-normalise -> MLP, on images in [0, 1] of shape (B, 3, H, W)."""

    MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's preprocessing

    def __init__(self, clip, mlp):
        super().__init__()
        self.clip, self.mlp = clip, mlp
        self.size = clip.config.image_size  # 224 for ViT-L/14

    @torch.no_grad()
    def forward(self, images):
        # Our images are square, so CLIPProcessor's resize-then-centre-crop is a plain resize.
        x = F.interpolate(images.float(), size=(self.size, self.size), mode="bicubic", antialias=True)
        x = (x - x.new_tensor(self.MEAN).view(3, 1, 1)) / x.new_tensor(self.STD).view(3, 1, 1)
        embed = self.clip(pixel_values=x.to(next(self.clip.parameters()).dtype)).image_embeds.float()
        return self.mlp(embed / embed.norm(dim=-1, keepdim=True))


def build_aesthetic(args: Args, device):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if args.tiny:  # same interface, random weights: CLIP-vision-like embedding -> normalise -> MLP
        cfg = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                               num_attention_heads=4, projection_dim=32)  # fmt: skip
        with torch.random.fork_rng():  # the same reward model on every rank, whatever the seed
            torch.manual_seed(0)
            return AestheticScorer(CLIPVisionModelWithProjection(cfg), AestheticMLP(32)).to(device).eval()
    path = args.aesthetic_mlp_path
    if not os.path.exists(path) and ":" in path:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(*path.split(":", 1))
    if not os.path.exists(path):
        raise BadInput(
            f"--aesthetic_mlp_path {path!r} not found: download sac+logos+ava1-l14-linearMSE.pth from "
            "https://github.com/christophschuhmann/improved-aesthetic-predictor and pass its path"
        )
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu")
    mlp = AestheticMLP(768)
    mlp.load_state_dict(state)
    clip = CLIPVisionModelWithProjection.from_pretrained(args.aesthetic_clip)
    return AestheticScorer(clip, mlp).to(device).eval()


def jpeg_kilobytes(images) -> torch.Tensor:
    """Size of each image saved as JPEG (quality 95), as in DDPO's compressibility reward.
    https://github.com/kvablack/ddpo-pytorch/blob/main/ddpo_pytorch/rewards.py"""
    from PIL import Image

    arrays = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for a in arrays:
        buffer = io.BytesIO()
        Image.fromarray(a).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes)


def make_reward_fn(args: Args, device):
    """images (B, 3, H, W) in [0, 1] -> rewards (B,) on the CPU, float32."""
    if args.reward == "compressibility":
        return lambda images: -jpeg_kilobytes(images)
    if args.reward == "incompressibility":
        return jpeg_kilobytes
    scorer = build_aesthetic(args, device)
    return lambda images: scorer(images).cpu()


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts, device) -> torch.Tensor:
    length = text_encoder.config.max_position_embeddings
    ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=length, return_tensors="pt").input_ids
    return text_encoder(ids.to(device))[0]


@torch.no_grad()
def decode(vae, latents, dtype) -> torch.Tensor:
    """Latents (B, 4, h, w) -> images (B, 3, H, W) in [0, 1], float32."""
    images = vae.decode((latents / vae.config.scaling_factor).to(dtype)).sample.float()
    return (images / 2 + 0.5).clamp(0, 1)


def image_grid(images: torch.Tensor, ncol: int) -> torch.Tensor:
    """(B, 3, H, W) -> one (3, rows*H, ncol*W) image, empty cells black."""
    B, C, H, W = images.shape
    rows = -(-B // ncol)
    padded = torch.cat([images, images.new_zeros(rows * ncol - B, C, H, W)])
    return padded.view(rows, ncol, C, H, W).permute(2, 0, 3, 1, 4).reshape(C, rows * H, ncol * W)


def all_gather_cat(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate a tensor from every rank (rank order) along dim 0; identity without torchrun."""
    if world_size == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(out, x)
    return torch.cat(out)


@torch.no_grad()
def evaluate_images(iteration, reward_queries, *, log, unet, vae, tokenizer, text_encoder, coef, w_emb, reward_fn,
             latent_shape, sampling: dict, num_images: int) -> None:  # fmt: skip
    """Fixed prompts and noise (their own generator), on rank 0: the mean reward and an image grid."""
    prompts, device = [ANIMALS[i % len(ANIMALS)] for i in range(num_images)], w_emb.device
    embeds = encode_prompts(tokenizer, text_encoder, prompts, device)
    g = torch.Generator(device=device).manual_seed(12345)
    noise = torch.randn((len(prompts), *latent_shape), device=device, generator=g)
    *_, final = sample_trajectories(unet, coef, embeds, w_emb, noise, **sampling, generator=g)
    images = decode(vae, final, sampling["dtype"])
    rewards = reward_fn(images)
    grid = image_grid(images.cpu(), ncol=4)
    log.writer.add_image("eval/images", grid, reward_queries)
    log.writer.add_scalar("eval/reward", rewards.mean().item(), reward_queries)
    if log.track:
        import wandb

        caption = ", ".join(f"{p}: {r:.2f}" for p, r in zip(prompts, rewards.tolist()))
        image = wandb.Image(grid.permute(1, 2, 0).numpy(), caption=caption)
        wandb.log({"eval/images": image, "eval/reward": rewards.mean().item()}, step=iteration)


class LcmLog:
    """Rank 0's logs against reward queries (the paper's x-axis): TensorBoard, metrics.jsonl, progress.json (for
    eval/plot_lcm.py), with --track wandb; continued on resume. Every rank calls write(): it reduces over the ranks."""

    def __init__(self, run_dir: str, flags: dict, record: dict, start_update: int, reward_queries: int, device):
        self.master = not dist.is_initialized() or dist.get_rank() == 0
        self.run_dir, self.flags, self.track, self.device = run_dir, flags, flags["track"], device
        if not self.master:
            return
        from torch.utils.tensorboard import SummaryWriter

        if self.track:
            import wandb

            wandb.init(project=flags["wandb_project_name"], entity=flags["wandb_entity"], config=flags,
                       name=flags["run_name"], id=record.get("wandb_id"), resume="allow", dir=run_dir,
                       save_code=True)  # fmt: skip
            record["wandb_id"] = wandb.run.id  # the checkpoint's id continues that wandb run
            wandb.define_metric("objective/reward_queries")
            wandb.define_metric("*", step_metric="objective/reward_queries")  # the paper's x-axis, as in TensorBoard
        self.writer = SummaryWriter(run_dir, purge_step=reward_queries + 1 if start_update else 0)
        self.writer.add_text("hyperparameters", "\n".join(f"|{k}|{v}|" for k, v in flags.items()))
        self.metrics = metrics_log(os.path.join(run_dir, "metrics.jsonl"), start_update)
        self.history = []  # progress.json's rows
        if start_update:
            with open(os.path.join(run_dir, "progress.json")) as f:
                self.history = [row for row in json.load(f)["history"] if row["iteration"] <= start_update]
        print(
            f"run {flags['run_name']}: {flags['algo']} on {flags['world_size']} process(es), {device}, reward "
            f"{flags['reward']}; logs in {run_dir}"
            + (f"; resumed after iteration {start_update}" if start_update else "")
        )

    def write(self, iteration: int, stats: dict, rewards, reward_queries: int, t0: float, t_sample: float) -> None:
        """`stats` (name -> scalar tensors: their mean over ranks), the gathered rewards, the times, peak memory."""
        values = torch.stack([torch.stack(v).float().mean() for v in stats.values()]).to(self.device)
        if dist.is_initialized():
            dist.all_reduce(values)
            values /= dist.get_world_size()
        if not self.master:
            return
        metrics = {**dict(zip(stats, values.tolist())), "objective/reward": rewards.mean().item(),
                   "objective/reward_std": rewards.std().item(), "objective/reward_queries": reward_queries,
                   "time/iteration_seconds": time.time() - t0, "time/sample_seconds": t_sample}  # fmt: skip
        if self.device.type == "cuda":
            metrics["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, reward_queries)
        if self.track:
            import wandb

            wandb.log(metrics, step=iteration)
        self.metrics.write(json.dumps({"update": iteration, **metrics}) + "\n")
        self.metrics.flush()
        self.history.append(
            dict(iteration=iteration, reward_queries=reward_queries, reward_mean=metrics["objective/reward"])
        )
        # progress.json is rewritten every iteration so that a killed run still plots, and replaced whole so that a
        # kill while writing it leaves the previous one.
        with open(os.path.join(self.run_dir, "progress.json.tmp"), "w") as f:
            json.dump(dict(args=self.flags, history=self.history), f)
        os.replace(os.path.join(self.run_dir, "progress.json.tmp"), os.path.join(self.run_dir, "progress.json"))
        loss = metrics[f"loss/{self.flags['algo']}"]
        print(
            f"iter {iteration} queries {reward_queries} reward {metrics['objective/reward']:.4f} loss {loss:.4g} "
            f"kl {metrics['policy/approx_kl']:.3g} ({metrics['time/iteration_seconds']:.2f}s)"
        )

    def save_lora(self, unet) -> None:
        """<run_dir>/lora.safetensors: the LoRA weights alone, in peft's format, for use outside this script."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        if self.master:
            state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
            save_file(state, os.path.join(self.run_dir, "lora.safetensors"))

    def end(self, iteration: int, signals: list | None) -> None:
        """As RunLog.end: logs closed, processes ended; stopped by `signals`, how to resume, and exit 128 + signal."""
        if self.master:
            if signals is not None:
                print(f"stopped after iteration {iteration}; continue with --resume {self.run_dir}", file=sys.stderr)
            self.metrics.close()
            self.writer.close()
            if self.track:
                import wandb

                wandb.finish()
        if dist.is_initialized():
            dist.destroy_process_group()
        if signals is not None:
            sys.exit(128 + (signals or [signal.SIGTERM])[0])


# ============================================ below: the same in every script (tools/sync_appendix.py copies it)
# The appendix: the helpers of rebel.py's that a script calls, word for word and in rebel.py's order (fix them there;
# rebel.py holds all, some for its siblings only): first the algorithm's helpers, where a script has them; from `set-up`
# on, plumbing (the run's folder, models, data, evaluation, checkpoints, errors), which a reader can skip.


# ---------------------------------------------------------------------------------------------- set-up
def init_processes(cuda: bool, seed: int):
    """Rank, world size and device under `python` or `torchrun`; rank r seeds with seed + r (its own sampling noise)."""
    use_cuda = cuda and torch.cuda.is_available()
    if "RANK" in os.environ:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    for seed_everything in (random.seed, np.random.seed, torch.manual_seed):
        seed_everything(seed + rank)
    return rank, world_size, device


def open_run(flags: dict):
    """The checkpoint to resume from (None: the run starts), the run directory, the run's name and the output directory
    (default <run_dir>/model: no two runs share one). --resume DIR continues the run in DIR from its last complete
    checkpoint, or starts it there if it has none: a pre-emptible job passes the same --resume at every launch."""
    master, resume = not dist.is_initialized() or dist.get_rank() == 0, flags["resume"]
    checkpoint = find_checkpoint(resume) if resume else None
    run_name = f"{flags['exp_name']}__{flags['seed']}__{int(time.time())}"
    run_dir = os.path.normpath(resume) if resume else flags["run_dir"] or f"runs/{run_name}"
    run_dir = os.path.dirname(os.path.dirname(checkpoint)) if checkpoint else run_dir
    output_dir = os.path.join(run_dir, "model") if flags["output_dir"] is None else flags["output_dir"]
    if master:
        start_run_dir(run_dir, output_dir, bool(resume), input_paths(flags))
        if resume and not checkpoint:
            print(f"--resume {run_dir}: no complete checkpoint there; starting the run in it", file=sys.stderr)
        lock_run_dir(run_dir)
    if dist.is_initialized():  # rank 0's names on every rank: the default ones hold its clock's time
        names = [(run_dir, output_dir)]
        dist.broadcast_object_list(names, src=0)
        run_dir, output_dir = names[0]
    return checkpoint, run_dir, run_name, output_dir


def lock_run_dir(run_dir: str) -> None:
    """<run_dir>/.lock: the PID of rank 0 while it writes the run; a second run is refused while it lives."""
    lock = os.path.join(run_dir, ".lock")
    try:
        with open(lock) as f:
            pid = int(f.read())
        os.kill(pid, 0)  # raises if no such process
    except (OSError, ValueError):
        pid = None
    require(pid in (None, os.getpid()), f"--run_dir {run_dir} is in use by process {pid}; stop it, or wait for it")
    if os.path.isdir(run_dir):
        with open(lock, "w") as f:
            f.write(str(os.getpid()))
        atexit.register(lambda: os.path.exists(lock) and os.remove(lock))


def start_run_dir(run_dir: str, output_dir: str, resume: bool, reads: dict) -> None:
    """A run owns its run and output directories (their run.json: script and id) and writes inside nothing it reads
    (`reads`: flag -> path). Both are made now, so a bad one fails at start; a failed start's are removed at exit."""
    for flag, path in (("--resume" if resume else "--run_dir", run_dir), ("--output_dir", output_dir)):
        require(not path or not os.path.isfile(path), f"{flag} {path} is a file, not a directory; choose another")
        for name, read in reads.items():  # real paths: a link or a '..' names the same folder
            source = os.path.realpath(read)
            inside = path and os.path.commonpath([os.path.realpath(path), source]) == source
            require(not inside, f"{flag} {path} is inside {name} {read}, which this run reads: choose another folder")
    owner, script = read_run_json(run_dir), os.path.basename(__file__)
    if os.path.isdir(run_dir) and os.listdir(run_dir):  # a run's folder: its run.json, or its checkpoints
        require(resume, f"--run_dir {run_dir} is not empty: pass --resume {run_dir} to continue it, or choose another")
        checkpoints = os.path.isdir(os.path.join(run_dir, "checkpoints"))
        require(owner or checkpoints, f"--resume {run_dir}: neither a checkpoint nor a run.json there: give a run's")
    theirs = owner.get("script", script) if owner else script
    require(theirs == script, f"--resume {run_dir}: that is a run of {theirs}; resume it with it")
    owner = owner or {"script": script, "id": os.urandom(8).hex()}
    require(not output_dir or read_run_json(output_dir) in (None, owner),
            f"--output_dir {output_dir} is not empty and not this run's: choose a new or empty folder")  # fmt: skip
    for flag, path in (("--run_dir", run_dir), ("--output_dir", output_dir)):
        if not path:
            continue  # no --output_dir: nothing is saved
        made = [path] if not os.path.exists(path) else []  # the folders makedirs makes, deepest first
        while made and not os.path.exists(os.path.dirname(made[-1]) or "."):
            made.append(os.path.dirname(made[-1]))
        for folder in reversed(made):  # atexit runs the last registered first: the deepest goes first
            atexit.register(lambda f=folder: os.path.isdir(f) and not os.listdir(f) and os.rmdir(f))
        marker = os.path.join(path, "run.json")
        with refused(f"{flag} {path} is not a writable directory", "; choose another"):
            os.makedirs(path, exist_ok=True)
            if not os.path.exists(marker):
                with open(marker, "w") as f:
                    json.dump(owner, f)
                atexit.register(lambda m=marker: os.listdir(os.path.dirname(m)) == ["run.json"] and os.remove(m))


def read_run_json(path: str) -> dict | None:
    """The run.json of a run or output directory; None for a new or empty folder, {} for another's."""
    marker = os.path.join(path, "run.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            return json.load(f)
    return {} if os.path.isdir(path) and os.listdir(path) else None


# ---------------------------------------------------------------------------------------------- checkpoints
def find_checkpoint(path: str) -> str | None:
    """--resume: a checkpoint directory, or a run directory's latest complete checkpoint (None: there is none)."""
    path = os.path.normpath(path)  # a trailing slash would hide the run directory from dirname
    if os.path.isfile(os.path.join(path, "trainer.json")):
        return path
    root = os.path.join(path, "checkpoints")
    done = sorted(n for n in os.listdir(root) if n[7:].isdigit()) if os.path.isdir(root) else []  # update_N
    return os.path.join(root, done[-1]) if done else None


def input_paths(flags: dict) -> dict:
    """The local files and folders a run reads, by flag (the models and the data; a hub name is no local path)."""
    names = "sft_model_path reward_model_path reward_tokenizer base_model model query_dataset preference_dataset"
    return {f"--{k}": flags[k] for k in names.split() if isinstance(flags.get(k), str) and os.path.exists(flags[k])}


def input_files(flags: dict) -> dict:
    """Every file a run reads, with its size and modification time: a resumed run must read the same."""
    files = {}
    for flag, path in input_paths(flags).items():
        found = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
        files.update({f"{flag} {file}": [os.stat(file).st_size, os.stat(file).st_mtime_ns] for file in sorted(found)})
    return files


def metrics_log(path: str, last_update: int):
    """metrics.jsonl opened for appending, without the rows written after the last checkpoint (a resumed run's)."""
    with open(path, "a+") as f:
        f.seek(0)
        rows = [line for line in f if line.endswith("\n") and json.loads(line)["update"] <= last_update]
    with open(path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(path + ".tmp", path)
    return open(path, "a")


def trainable_state(model, optimizer) -> dict:
    """The weights that train (the adapter alone under LoRA) and the optimizer state, by parameter name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model_state, "optimizer": optimizer_state}


def save_checkpoint(run_dir: str, update: int, model, optimizer, record: dict, keep: int) -> str:
    """<run_dir>/checkpoints/update_N: trainable weights and optimizer (dcp: each rank writes its part), each rank's
    RNG states and `record` (update, flags, wandb id); written as .tmp, renamed once whole: a kill leaves the last."""
    import torch.distributed.checkpoint as dcp

    rank, root = dist.get_rank() if dist.is_initialized() else 0, os.path.join(run_dir, "checkpoints")
    path, fix = os.path.join(root, f"update_{update:06d}"), f"free some space and continue with --resume {run_dir}"
    with refused(f"cannot write the checkpoint {path}", f"; the earlier checkpoints are intact: {fix}"):
        dcp.save(trainable_state(model, optimizer), checkpoint_id=path + ".tmp", no_dist=not dist.is_initialized())
        kind, keys, *rest = np.random.get_state()  # numpy's keys as a tensor, which torch.load(weights_only) reads
        rng = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), *rest),
               "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()}  # fmt: skip
        torch.save(rng, os.path.join(path + ".tmp", f"rng_rank{rank}.pt"))  # this rank's
        if dist.is_initialized():
            dist.barrier()  # every rank's part is written
        if rank == 0:
            with open(os.path.join(path + ".tmp", "trainer.json"), "w") as f:
                json.dump({**record, "script": os.path.basename(__file__)}, f)
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(path + ".tmp", path)
        for old in sorted(n for n in os.listdir(root) if n[7:].isdigit())[: -max(keep, 1)]:
            shutil.rmtree(os.path.join(root, old))
    if dist.is_initialized():
        dist.barrier()  # no rank goes on before the checkpoint is in place
    return path


def load_checkpoint(path: str | None, model, optimizer, flags: dict, world_size: int) -> dict:
    """Restore what save_checkpoint wrote, in place, after checking that the run continues with the same flags and
    reads the same files; return its trainer.json. A run that starts (path None) gets a new record of what it read."""
    if path is None:
        return {"inputs": input_files(flags)}
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    rank = dist.get_rank() if dist.is_initialized() else 0
    # Flags that do not change the run's course, of every script (rebel_lcm.py evaluates with its own generator).
    resumable = """resume run_dir track wandb_project_name wandb_entity output_dir save_merged save_freq
    keep_checkpoints eval_freq eval_every num_eval_images num_sample_rows""".split()
    with refused(f"--resume: cannot read the checkpoint {path}", "; resume from an intact one"):
        with open(os.path.join(path, "trainer.json")) as f:
            record = json.load(f)
        script = record.get("script", os.path.basename(__file__))
        require(script == os.path.basename(__file__), f"--resume {path}: that is a run of {script}; resume it with it")
        require(os.path.basename(os.path.normpath(path)) == f"update_{record.get('update', -1):06d}", f"--resume "
                f"{path}: its trainer.json says update {record.get('update')}, which is not this checkpoint's (edited "
                "or copied from another): resume from an intact one")  # fmt: skip
        was, flags = record["flags"], json.loads(json.dumps(flags))  # tuples as lists, as trainer.json holds them
        changed = [f"--{k} {was.get(k)} (now {v})" for k, v in flags.items() if was.get(k) != v and k not in resumable]
        require(not changed, f"--resume {path}: flags differ from the run's: {', '.join(changed)}")
        was, now = record.get("inputs", {}), input_files(flags)  # a run from before inputs were recorded: none
        changed = [k for k in sorted(was.keys() | now.keys()) if "inputs" in record and was.get(k) != now.get(k)]
        if changed:
            how = "is new" if changed[0] not in was else "is gone" if changed[0] not in now else "was modified"
            raise BadInput(f"--resume {path}: {changed[0]} {how} since the run read it ({len(changed)} files differ): "
                           "resume with the files it read, or start a new run")  # fmt: skip
        n = record["world_size"]
        require(n == world_size, f"--resume {path}: the run had {n} processes; resume with as many, not {world_size}")
        dcp.FileSystemReader(path).read_metadata()  # fails plainly on a damaged checkpoint, where dcp.load logs pages
        state = trainable_state(model, optimizer)
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
        options = StateDictOptions(ignore_frozen_params=True, strict=False)  # the frozen weights are not saved
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=options)  # fmt: skip
        rng = torch.load(os.path.join(path, f"rng_rank{rank}.pt"), weights_only=True)  # this rank's RNG states
        kind, keys, *rest = rng["numpy"]
        random.setstate(rng["python"])
        np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
        torch.set_rng_state(rng["torch"])
        torch.cuda.set_rng_state_all(rng["cuda"])  # [] without CUDA
    return record


def stop_signals() -> list:
    """SIGINT or SIGTERM: finish the update, save a checkpoint, exit with 128 + signal; a second: stop at once."""
    received = []

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if received:
            print(f"\n{name} again: stopping now, without a checkpoint", file=sys.stderr)
            os._exit(128 + signum)
        received.append(signum)
        print(f"\n{name}: saving a checkpoint after this update (again to stop now)", file=sys.stderr)

    def exiting():  # Python drops its handlers before its last clean-up, where a second signal would kill it (-N)
        if received:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    atexit.register(exiting)
    return received


def check_finite(tensors: dict, dump_path: str) -> None:
    """Stop on NaN or inf before the optimizer sees it, naming its source (the key); the tensors go to dump_path."""
    for name, t in tensors.items():
        if bad := int((~torch.isfinite(t)).sum()):
            torch.save({k: v.detach().cpu() for k, v in tensors.items()}, dump_path)
            raise BadInput(f"{name}: {bad} of {t.numel()} values are NaN or inf; the batch is saved in {dump_path}")


# ---------------------------------------------------------------------------------------------- plumbing
class BadInput(ValueError):
    """A problem with the flags, the data or a checkpoint: reported as one line that names the fix, no traceback."""


@contextmanager
def refused(message: str, fix: str = ""):
    """Any error inside but a BadInput becomes one: `message (ErrorType: error)fix`."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except BadInput:
        raise
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise BadInput(f"{message} ({cause(e)}){fix}") from e


def print_bad_input(kind, error, tb) -> None:
    """sys.excepthook: a BadInput prints its message alone, an OSError one line, any other error its traceback. Under
    torchrun the line goes into the ranks' store: a rank whose collective fails as its peer exits prints it too."""
    from datetime import timedelta

    message = str(error) if issubclass(kind, BadInput) else None
    if issubclass(kind, OSError):
        message = f"{cause(error)}: check that path, its permissions and the free space"
    if issubclass(kind, BrokenPipeError):  # no path: the program reading the output (`| head`, a logger) has ended
        message = "the output's reader closed its pipe (BrokenPipeError)"
    store = dist.distributed_c10d._get_default_store() if dist.is_initialized() else None
    try:
        if store and message:
            store.set("error", message)
        elif store:  # a peer's refusal ends its process, and with it the collectives of the others
            store.wait(["error"], timedelta(seconds=10))
            message = store.get("error").decode()
    except Exception:  # no store (the rank hosting it has gone), or no refusal: the traceback
        pass
    if message:
        print(f"error: {message}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, error, tb)


def cause(error: BaseException) -> str:
    """An exception in one line: torch's CheckpointException by the first rank's failure inside it."""
    error = next(iter(getattr(error, "failures", {}).values()), (error,))[0]  # CheckpointException: {rank: (e, tb)}
    return f"{type(error).__name__}: {str(error)[:200]}"


def require(ok: bool, message: str) -> None:
    if not ok:
        raise BadInput(message)


if __name__ == "__main__":
    sys.excepthook = print_bad_input  # bad input: one clear line instead of a traceback
    main(tyro.cli(Args, use_underscores=True))
