"""REBEL: Reinforcement Learning via Regressing Relative Rewards (Gao et al., 2024, arXiv 2404.16767).

Algorithm 1: for every prompt x, sample two responses y, y' from the current policy pi_t, score each with a reward
model minus a KL penalty to the SFT policy, and regress the difference of their log-ratios onto the difference of
their rewards (Equation 1):

  min_theta mean_{x,y,y'} (1/eta * [ln pi_theta(y|x)/pi_t(y|x) - ln pi_theta(y'|x)/pi_t(y'|x)] - [r(x, y) - r(x, y')])^2

Why pairs: this regresses onto the mirror-descent update pi_{t+1}(y|x) = pi_t(y|x) exp(eta r(x, y)) / Z(x), whose
partition function Z(x) cancels in the difference of two responses to the same prompt. Its gradient at pi_t is
RLOO's with k = 2; linearised at pi_t and solved exactly, the regression is that gradient preconditioned by the Fisher
information, a natural policy gradient step (Section 3.2, Claims 1 and 2). Like DPO (and IPO, which regresses the
same difference) it works on a difference of log-ratios, but its target is a difference of rewards, and its
reference is a pi_t that moves at every update. Two regularisers, then: eta keeps each update near pi_t (a trust
region), and the KL penalty inside the reward (--kl_coef) keeps the policy near the SFT policy.

pi is the policy at the sampling temperature: every log-prob (the regression's, the KL's) comes from the logits
divided by --temperature, the distribution the responses were drawn from. The models stay in eval mode (no dropout).

Top to bottom: the algorithm (rebel_loss, the rollout, the pairs); the loop (main); the variants; the flags (Args, each
field's docstring its --help); the appendix every script shares: the algorithm's helpers first, then plumbing to skip.

Shapes: B prompts per rank, m responses to each, P pairs (y, y') per prompt, T response tokens, ctx prompt tokens
(left-padded), L = ctx + T. In Algorithm 1, m = 2 (y and y', both sampled from pi_t) and P = 1; only the variants change
them (their block says how: --preference_fn with k = 2 adds a third sample y'', m = 3, never trained on). Below, one
update written with this file's functions, leaving out main's minibatches (at 512 prompts one forward would not fit),
DDP and logging. `policy` is the model being trained, pi_theta; at the update's start it is pi_t, which samples. x is a
batch of left-padded prompt ids (B, ctx), prompts the same prompts as strings, and reward(query_responses, ctx, prompts)
a reward model's score of each row:

    ref_policy = partial(adapter_disabled, policy)    # LoRA; full fine-tuning: partial(nullcontext, a_frozen_copy)
    pad_id, stop_ids = tokenizer.pad_token_id, stop_token_ids(tokenizer, policy.generation_config)  # EOS, end of turn
    config = sampling_config(53, temperature, pad_id)                      # 53 tokens per response, as the paper
    responses = sample_responses(policy, x, 2, config, chunk=8)            # y, y' ~ pi_t: (B, 2, T); 8 prompts a pass
    rollout = score_responses(policy=policy, ref_policy=ref_policy, reward=reward, queries=x, prompts=prompts,
                              responses=responses, config=config, stop_ids=stop_ids,
                              penalty=-1.0, chunk=8)            # penalty: the score of a response that did not end
    rewards = rollout.scores - kl_coef * (rollout.logprobs - rollout.ref_logprobs)  # r(x, y): (B, 2), one pair a row
    for epoch in range(noptepochs):                                                 # ln pi_t stays fixed
        new_logprobs = sequence_logprobs(policy, rollout.query_responses, rollout.masks, x.size(1), temperature, pad_id)
        rebel_loss(new_logprobs, rollout.logprobs, rewards, eta).backward()         # P = 1: the (B, 2) rows are pairs
        optimizer.step()
        optimizer.zero_grad()

To copy the core: rebel_loss, Rollout, sample_responses, score_responses (pair_up and take_pairs only for k > 2), and
from the appendix's first section sampling_config, generate, first_true_indices, truncate_response, response_mask,
trim_responses, forward, response_logprobs, token_logprobs, sequence_logprobs, stop_token_ids (adapter_disabled only
with LoRA, grad_sync only with DDP).

    python rebel.py --eta 1.0                               # one process
    torchrun --nproc_per_node 8 rebel.py --eta 1.0          # the 2.8B TL;DR run (temperature 0.7: the official code's)
    python -m toy.demo                                      # the offline toy task, end to end
"""

import atexit
import copy
import csv
import importlib.util
import json
import os
import random
import re
import resource
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (imported before init_process_group, which some torch versions need)
import torch.nn as nn
import tyro
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import trange

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


class Rollout(NamedTuple):
    """What the loss needs of m responses to each of B prompts (L = prompt + T tokens)."""

    query_responses: torch.Tensor  # (B, m, L) token ids: the left-padded prompt, the response padded after its end
    masks: torch.Tensor  # (B, m, T) True on the response's tokens
    logprobs: torch.Tensor  # (B, m) ln pi_t(y|x), summed over the response
    ref_logprobs: torch.Tensor  # (B, m) ln pi_ref(y|x) under the SFT policy, for the KL penalty
    scores: torch.Tensor  # (B, m) the reward model's score, or `penalty` for a response with no stop token
    has_eos: torch.Tensor  # (B, m) whether the response ended with a stop token


@torch.no_grad()
def sample_responses(policy, queries, num: int, config, chunk: int) -> torch.Tensor:
    """num responses per prompt from `policy` (pi_t), `chunk` prompts at a time: queries (B, ctx), the left-padded
    prompt ids -> (B, num, T) token ids, T = --response_length; config: a transformers GenerationConfig
    (sampling_config). EOS does not stop sampling (score_responses cuts there) unless config has stop ids."""
    ctx = queries.size(1)
    responses = [generate(policy, q.repeat_interleave(num, 0), config)[:, ctx:] for q in queries.split(chunk)]
    return torch.cat(responses).unflatten(0, (-1, num))


@torch.no_grad()
def score_responses(
    *, policy, ref_policy, reward, queries, responses, prompts, config, stop_ids, penalty, chunk, timer=None
) -> Rollout:
    """What the loss needs of m responses (B, m, T) to each prompt, `chunk` prompts at a time. queries (B, ctx): the
    left-padded prompt ids; prompts: the same prompts as the dataset gives them (a reward function reads them);
    ref_policy: a function of no arguments, `with ref_policy() as ref:` gives the SFT policy (the adapter off, or a
    frozen copy); reward: reward(query_responses (N, L), ctx, prompts) -> N scores, or None for scores of 0; config:
    the sampling config (its temperature and pad id; the pad is never a stop token); stop_ids: the tokens that end a
    response; penalty: the score of one that did not end."""
    ctx, m, out = queries.size(1), responses.size(1), []
    pad_id, temperature = config.pad_token_id, config.temperature
    timer = timer or (lambda phase: nullcontext())  # no timer given: no timing
    for start in range(0, len(queries), chunk):
        query, response = queries[start : start + chunk], responses[start : start + chunk]
        # Response processing 1: cut after the first stop token (sampled anywhere: --stop_at_eos only ends sampling
        # early), pad the rest.
        response = truncate_response(response.flatten(0, 1), stop_ids, pad_id)
        query_response = torch.cat((query.repeat_interleave(m, 0), response), 1).unflatten(0, (-1, m))  # (b, m, L)
        mask = response_mask(response, pad_id).unflatten(0, (-1, m))  # (b, m, T)
        # Response processing 2: ln pi(y|x) under pi_t and the SFT reference, summed over the mask: log_softmax(logits /
        # temperature) with the pad's logit at -inf (never sampled), positions counted from the first real token. To
        # copy: the appendix's first section (generate, truncate_response, response_mask, trim_responses, *_logprobs).
        trimmed, trimmed_mask = trim_responses(query_response, mask, ctx)  # drops response columns all padding
        with timer("logprob"):
            logprob = sequence_logprobs(policy, trimmed, trimmed_mask, ctx, temperature, pad_id)
            with ref_policy() as ref:
                ref_logprob = sequence_logprobs(ref, trimmed, trimmed_mask, ctx, temperature, pad_id)
        # Response processing 3: the reward; a response that did not end gets the fixed penalty instead.
        with timer("reward"):
            chunk_prompts = [p for p in prompts[start : start + chunk] for _ in range(m)]
            score = reward(trimmed.flatten(0, 1), ctx, chunk_prompts) if reward else torch.zeros_like(logprob)
        has_eos = torch.isin(response, torch.tensor(stop_ids, device=response.device)).any(1).unflatten(0, (-1, m))
        score = torch.where(has_eos, score.view_as(logprob), penalty)  # (b * m,) scores as (b, m)
        out.append((query_response, mask, logprob, ref_logprob, score, has_eos))  # full width: chunks concatenate
    return Rollout(*(torch.cat(t) for t in zip(*out)))


def pair_up(scores: torch.Tensor, rule: str) -> torch.Tensor:
    """Which two of a prompt's m responses form each pair (y, y') of Equation (1): scores (B, m) -> indices (B, P, 2).
    'adjacent': (0, 1), (2, 3), ... for an even m (independent samples, as Algorithm 1); 'best_worst': the highest
    and the lowest score, ranked with the no-EOS penalty and without the KL term (one pair, as the official
    UltraFeedback pipeline)."""
    B, m = scores.shape
    if rule == "adjacent":
        return torch.arange(m, device=scores.device).view(1, -1, 2).expand(B, -1, -1)
    best = scores.argmax(1)  # (B,)
    worst = scores.scatter(1, best[:, None], float("inf")).argmin(1)  # best at +inf: argmin picks another, ties too
    return torch.stack((best, worst), 1).unsqueeze(1)  # (B, 1, 2)


def take_pairs(t: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Each pair's two rows of t: t (B, m, ...) and pairs (B, P, 2) from pair_up -> (B * P, 2, ...), prompt b's pair p
    at row b * P + p. In Algorithm 1 (m = 2, pairs [[0, 1]] for every prompt) that is t itself."""
    prompt = torch.arange(len(t), device=t.device)[:, None, None]  # (B, 1, 1), broadcast against pairs
    return t[prompt, pairs].flatten(0, 1)


# ---------------------------------------------------------------------------------------------- the loop
def main(args: "Args") -> None:
    require(args.eta > 0, f"--eta must be > 0 (it divides the log-ratios in Equation 1); got {args.eta}")
    resolve_variants(args)  # checks --num_samples, --pairing, --mu; sets --kl_coef's default (0 with --preference_fn)
    flags = asdict(args)  # what the appendix reads: the same helpers serve scripts whose Args differ
    check_flags(flags)
    # Set-up (the appendix): processes, batch sizes, the run's folder, data, models, resume, logs. The batch sizes:
    # --batch_size prompts per update over all ranks, P pairs each; micro-batches of --per_device_train_batch_size pairs
    rank, world_size, device = init_processes(args.cuda, args.seed)
    bf16, dtype, autocast = precision(args.precision, device)
    local_batch_size = exact_div(args.batch_size, world_size, "--batch_size over the world size")
    pairs_per_prompt = args.num_samples // 2 if args.pairing == "adjacent" else 1  # P, as pair_up pairs them
    rank_pairs = local_batch_size * pairs_per_prompt
    mini_batch_size = exact_div(rank_pairs, args.num_mini_batches, "per-rank pairs over --num_mini_batches")
    grad_accum = exact_div(mini_batch_size, args.per_device_train_batch_size, "pairs per minibatch")
    checkpoint, run_dir, run_name, output_dir = open_run(flags)
    tokenizer = load_tokenizer(args.sft_model_path)
    pad = tokenizer.pad_token_id  # never EOS: load_tokenizer adds a pad token where a model has none
    # Both splits (Prompts: every rank reads each whole); train.responses: --mu_column's y' (None without --mu dataset).
    train, eval_data = load_splits(flags, tokenizer, args.mu_column)
    total_episodes = args.total_episodes or len(train.dataset)
    num_updates = total_episodes // args.batch_size
    require(num_updates >= 1, f"--total_episodes {total_episodes} is smaller than one --batch_size {args.batch_size}")
    batches = prompt_batches(len(train.dataset), args.batch_size, rank, world_size, args.seed)  # rank's share

    # The models, all in eval mode (no dropout). raw_policy is pi_theta: it samples and is saved; `policy` is the same
    # model as the gradient steps see it (DDP's wrapper, or FSDP's shards). ref_policy is a function: `with
    # ref_policy() as ref:` gives the SFT policy, the reference of the KL penalty (see load_trained_policy).
    raw_policy, ref_policy, stop_ids = load_trained_policy(flags, tokenizer, dtype, device, bf16)  # --sft_model_path
    reward = load_reward(args.reward_fn, args.reward_model_path, args.reward_tokenizer, tokenizer, dtype, device)
    preference = load_function(args.preference_fn, "--preference_fn") if args.preference_fn else None
    # The columns of the rollout's (B, m) tensors that pi_t samples (the metrics' columns): [0, 1] in Algorithm 1.
    policy_columns = variant_columns(args.num_samples, args.mu, preference is not None)
    num_sampled = len(policy_columns)  # responses pi_t samples per prompt: 2 in Algorithm 1 (1 with --mu dataset)
    policy = distribute(raw_policy, args.fsdp, bf16, device)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=args.lr, eps=args.eps)
    config, eval_config = sampling_configs(flags, pad, stop_ids)  # at --temperature and at --eval_temperature
    chunk, penalty = args.local_rollout_forward_batch_size, args.penalty_reward_value

    # Resume: the trainable weights, the optimizer, the RNG states and the position in the data, where the run stopped.
    record = load_checkpoint(checkpoint, policy, optimizer, flags, world_size)  # trainer.json: update, flags, wandb id
    start_update = record.get("update", 0)
    require(start_update <= num_updates, f"--resume: update {start_update} is past the run's {num_updates} updates")
    for _ in range(start_update):  # the batches already trained on
        next(batches)
    signals = stop_signals()
    plan = f"{num_updates} updates of {args.batch_size} prompts, {grad_accum} micro-batches per step"
    log = RunLog(run_dir, run_name, flags, record, start_update, device, plan)
    sample_eval = eval_sampler(raw_policy, ref_policy, reward, eval_config, stop_ids, penalty, chunk)
    run_evaluation = partial(evaluate, sample=sample_eval, reward=reward, tokenizer=tokenizer, data=eval_data, log=log,
                             flags=flags, autocast=autocast, preference=preference)  # fmt: skip

    # The loop, Algorithm 1: rollout -> reward -> regress relative rewards (Equation 1) -> log -> checkpoint.
    nan_dump = os.path.join(run_dir, f"nonfinite_rank{rank}.pt")  # where check_finite saves a non-finite batch
    stop, update = False, start_update
    if not checkpoint:
        run_evaluation(0)
    for update in trange(start_update + 1, num_updates + 1, initial=start_update, total=num_updates, disable=rank > 0):
        timer = Timer(device)
        lr_now = (1.0 - (update - 1.0) / num_updates) * args.lr  # linear decay: --lr first, --lr / num_updates last
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        batch = next(batches)  # this rank's B prompts of the global batch
        queries = trim_left_padding(train.queries[batch], pad, args.pad_multiple).to(device)  # (B, <= query_length)
        ctx, prompts = queries.size(1), [train.prompts[i] for i in batch]

        # 1. Rollout: y, y' ~ pi_t for each prompt x, their log-probs under pi_t and the SFT policy, and their scores
        # (the reward model's; the penalty without EOS). The variants enter at the lines marked `variant` (their block
        # follows the loop).
        with autocast():
            with timer("generation"):  # y, y' ~ pi_t: (B, 2, T) in Algorithm 1
                responses = sample_responses(raw_policy, queries, num_sampled, config, chunk)
            if args.mu == "dataset":  # variant: y' is the prompt's response in the dataset (Algorithm 1's mu), column 1
                responses = with_dataset_responses(responses, train.responses[batch])
            # (variant --preference_fn: no reward model here; the judge scores the rollout below)
            rollout = score_responses(policy=raw_policy, ref_policy=ref_policy, reward=None if preference else reward,
                                      queries=queries, responses=responses, prompts=prompts, config=config,
                                      stop_ids=stop_ids, penalty=penalty, chunk=chunk, timer=timer)  # fmt: skip
        check_finite({f"the rollout's {name}": t for name, t in rollout._asdict().items()}, nan_dump)
        query_responses, masks, logprobs, ref_logprobs, scores, has_eos = rollout  # each (B, m, ...)
        wins = None  # with --preference_fn, the judge's P(y_i > y_j | x)
        if preference:  # variant (Appendix D.2): each score is the judge's preference over other samples of pi_t
            with timer("reward"):
                scores, wins = preference_scores(preference, tokenizer, rollout, prompts, args.num_samples, penalty)

        # 2. Reward: r(x, y) = score(x, y) - kl_coef * (ln pi_t(y|x) - ln pi_ref(y|x)), neither normalised nor whitened
        # (Equation 1 regresses on its differences as they are); and the pairs (y, y').
        kl = logprobs - ref_logprobs  # (B, m)
        rewards = scores - args.kl_coef * kl  # (B, m); kl_coef 0.05 (0 with --preference_fn: resolve_variants)
        # Ranked by score, not reward: best_worst leaves the KL term out (pair_up). The first --num_samples columns:
        # with --preference_fn and k = 2, the third sample y'' (D.2) is not paired.
        pairs = pair_up(scores[:, : args.num_samples], args.pairing)  # (B, P, 2)
        pair_query_responses, pair_masks, pair_logprobs, pair_rewards = (
            take_pairs(t, pairs) for t in (query_responses, masks, logprobs, rewards)
        )  # (B * P, 2, ...); a loss that needs more of each pair (ref_logprobs, the scores) takes it the same way

        # 3. Regress relative rewards (Equation 1): noptepochs passes over the pairs, one optimizer step per minibatch;
        # ln pi_t (pair_logprobs, from the rollout) stays fixed through all of them, as pi_t does in Algorithm 1.
        num_pairs = len(pair_rewards)  # B * P
        minibatches = [mb for _ in range(args.noptepochs) for mb in torch.randperm(num_pairs).split(mini_batch_size)]
        loss_stats, approxkl_stats = [], []
        with timer("update"):
            for minibatch in minibatches:
                for micro, idx in enumerate(minibatch.split(args.per_device_train_batch_size)):  # grad_accum of them
                    query_response, mask = trim_responses(pair_query_responses[idx], pair_masks[idx], ctx)
                    # ln pi_theta(y|x) (b, 2). DDP all-reduces the gradients only on a step's last micro-batch; it
                    # decides so at the forward pass, which is why backward() can run outside this block.
                    with grad_sync(policy, enabled=micro == grad_accum - 1), autocast():
                        new_logprobs = sequence_logprobs(policy, query_response, mask, ctx, config.temperature, pad)
                    loss = rebel_loss(new_logprobs, pair_logprobs[idx], pair_rewards[idx], args.eta, args.loss_scaling)
                    check_finite({"the REBEL loss": loss, "new log-probs": new_logprobs}, nan_dump)
                    (loss / grad_accum).backward()
                    loss_stats.append(loss.item())
                    # approxkl: the mean of 1/2 (ln pi_theta(y|x) - ln pi_t(y|x))^2, per sequence (not per token)
                    approxkl_stats.append(0.5 * (new_logprobs - pair_logprobs[idx]).pow(2).mean().item())
                if args.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)  # FSDP2's DTensors too
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        # 4. Log the metrics of pi_t's samples (policy_columns): log.write averages them over the ranks and rank
        # 0 writes them. Evaluate every --eval_freq updates. The entropy is estimated by -ln pi_t(y|x) per token.
        per_epoch = len(loss_stats) // args.noptepochs  # micro-batches per pass
        stats = {
            "objective/scores": scores[:, policy_columns].mean().item(),
            "objective/kl": kl[:, policy_columns].mean().item(),
            "objective/rlhf_reward": rewards[:, policy_columns].mean().item(),
            "objective/entropy": -(logprobs[:, policy_columns].sum() / masks[:, policy_columns].sum()).item(),
            "objective/response_length": masks[:, policy_columns].sum(-1).float().mean().item(),
            "objective/eos_rate": has_eos[:, policy_columns].float().mean().item(),
            "loss/policy": float(np.mean(loss_stats)),
            "loss/policy_first_epoch": float(np.mean(loss_stats[:per_epoch])),
            "loss/policy_last_epoch": float(np.mean(loss_stats[-per_epoch:])),
            "policy/approxkl": float(np.mean(approxkl_stats)),
            **variant_metrics(scores, wins, policy_columns, args.mu == "dataset"),
        }
        log.write(update, stats, timer, lr_now)
        if args.eval_freq and update % args.eval_freq == 0 and update != num_updates:
            run_evaluation(update)

        # 5. Checkpoint every --save_freq updates, at the last (the trained state, whatever happens to the final save),
        # and on Ctrl-C or SIGTERM, which then stop the run.
        stop = all_reduce({"stop": len(signals)}, dist.ReduceOp.MAX, device)["stop"] > 0
        if stop or update == num_updates or (args.save_freq and update % args.save_freq == 0):
            record |= {"update": update, "world_size": world_size, "flags": flags}  # its trainer.json
            save_checkpoint(run_dir, update, policy, optimizer, record, args.keep_checkpoints)
        if stop:
            break

    # The end: the last evaluation and the trained policy saved; or, stopped by a signal, the way to resume printed.
    if not stop:
        run_evaluation(num_updates)
        save_policy(raw_policy, tokenizer, output_dir, args.fsdp, args.lora and args.save_merged)
    del policy  # DDP's wrapper must go (with its gloo threads) before log.end ends the process group
    log.end(update, signals if stop else None)


# ---------------------------------------------------------------------------------------------- the variants
# The loop is Algorithm 1 as the paper runs it on TL;DR. The variants change a prompt's m responses (the columns of the
# rollout's (B, m, ...) tensors) or their scores: --num_samples k > 2 (m = k, paired by --pairing: P = k/2 adjacent
# pairs, or 1 best_worst); --mu dataset (y', column 1, is the dataset's response: Algorithm 1's mu; pi_t samples m - 1);
# --preference_fn (a response's score is its mean preference over other samples y'' of pi_t, Appendix D.2; with k = 2 a
# third sample y'', the last column, is drawn, m = 3, and never trained on).


def resolve_variants(args: "Args") -> None:
    """Check the variants' flags, and set the defaults that depend on --preference_fn on `args` (so that a checkpoint
    records the values used): D.2's regression has no reference policy, so no KL penalty; no reward model unless one
    is named."""
    require(args.num_samples >= 2, f"--num_samples must be >= 2 (REBEL regresses on pairs); got {args.num_samples}")
    require(args.pairing != "adjacent" or args.num_samples % 2 == 0,
            f"--pairing adjacent: --num_samples must be even, not {args.num_samples}")  # fmt: skip
    require((args.mu == "dataset") == bool(args.mu_column), "--mu dataset and --mu_column NAME go together")
    require(args.mu == "policy" or args.num_samples == 2, "--mu dataset pairs y with its y': --num_samples must be 2")
    if args.kl_coef is None:
        args.kl_coef = 0.0 if args.preference_fn else 0.05
    if args.reward_model_path is None and not (args.preference_fn or args.reward_fn):
        args.reward_model_path = "vwxyzjn/EleutherAI_pythia-2.8b-deduped__reward__tldr"


def variant_columns(num_samples: int, mu: str, preference: bool) -> list[int]:
    """The columns of a prompt's m responses that pi_t samples: all but --mu dataset's y' (column 1), where m is
    --num_samples k, or 3 with --preference_fn and k = 2 (D.2's y'')."""
    m = 3 if preference and num_samples == 2 else num_samples
    return [i for i in range(m) if mu == "policy" or i != 1]


def with_dataset_responses(responses: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    """--mu dataset: the prompts' dataset responses y' (B, T) (right-padded ids) put second, after pi_t's y (and
    before a --preference_fn's y''): (B, m - 1, T) -> (B, m, T). y' is then scored as a sample is: its reward has the
    same KL term, though pi_t did not sample it."""
    return torch.cat((responses[:, :1], given.to(responses.device)[:, None], responses[:, 1:]), 1)


def preference_scores(fn, tokenizer, r: Rollout, prompts, num_samples: int, penalty: float) -> tuple:
    """--preference_fn fn: Appendix D.2's reward of every response (the penalty without EOS), and the judge's
    P(y_i > y_j | x) (B, m, m)."""
    wins = compare_pairs(fn, tokenizer, r.query_responses, r.query_responses.size(-1) - r.masks.size(-1), prompts)
    scores = preference_rewards(wins, comparators(num_samples).to(wins.device))  # (B, m)
    return torch.where(r.has_eos, scores, penalty), wins


def preference_rewards(wins: torch.Tensor, against: torch.Tensor) -> torch.Tensor:
    """r_t(x, y) = l(x, y, pi_t), the mean of l(x, y, y'') = 2 P(y > y''|x) - 1 (Equation 11) over y'' ~ pi_t: wins
    (B, m, m) holds P(y_i > y_j | x), against (m, m) y_j's weight as a y'' of y_i (comparators()). Returns (B, m)."""
    weights = against.to(wins.dtype)
    return ((2 * wins - 1) * weights).sum(-1) / weights.sum(-1)


def comparators(k: int) -> torch.Tensor:
    """The y'' of each response: (m, m), row i marks the y_j that y_i is compared with. For k >= 3 samples, the other
    k - 1 (a win rate, as SPO; the pair's own l(y, y') enters both its rewards, so the target's mean given (y, y') is
    ((k - 2) (l(y, pi_t) - l(y', pi_t)) + 2 l(y, y')) / (k - 1)); for k = 2, a third sample alone (D.2's one-sample
    variant: l(y, y'') - l(y', y'') estimates l(y, pi_t) - l(y', pi_t) without bias), compared with both and never
    trained on."""
    return ~torch.eye(k, dtype=torch.bool) if k > 2 else torch.tensor([[0, 0, 1], [0, 0, 1], [1, 1, 0]]).bool()


def variant_metrics(scores, wins, policy_columns: list[int], mu_dataset: bool) -> dict:
    """--mu dataset: how often y beats the dataset's y' (P(y > y') by the judge, or score(y) > score(y'), ties half).
    --preference_fn: the mean 2 P(y_i > y_j) - 1 over ordered pairs of distinct samples of pi_t, ~0 (skew-symmetry)."""
    stats = {}
    if mu_dataset:
        ties = scores[:, 0] == scores[:, 1]
        win = wins[:, 0, 1] if wins is not None else (scores[:, 0] > scores[:, 1]) + 0.5 * ties
        stats["objective/win_rate_vs_mu"] = win.float().mean().item()
    if wins is not None:
        self_play = 2 * wins[:, policy_columns][:, :, policy_columns] - 1  # (B, s, s), s = len(policy_columns)
        stats["objective/self_preference"] = self_play[:, ~torch.eye(len(policy_columns), dtype=bool)].mean().item()
    return stats


# ---------------------------------------------------------------------------------------------- the flags
@dataclass
class Args:
    # REBEL (Algorithm 1, Equation 1)
    eta: float = 1.0
    """eta of Equation (1): the step size of the mirror-descent update it regresses onto, pi_t exp(eta r) / Z (larger:
    further from pi_t each update; the optimizer's step size is --lr)"""
    kl_coef: float | None = None
    """coefficient of the KL penalty to the SFT policy inside the reward (default 0.05; with --preference_fn, 0)"""
    loss_scaling: Literal["paper", "official"] = "paper"
    """'paper': Equation (1), a mean over pairs where the paper sums; 'official': eta^2 times it, (log-ratio difference
    - eta * reward difference)^2, as the official code (at eta != 1 AdamW sees the scale only via eps and clipping)"""
    noptepochs: int = 4
    """passes over each batch of pairs"""
    num_mini_batches: int = 1
    """optimizer steps per pass (each over 1 / num_mini_batches of the update's pairs, on every rank)"""

    # sampling and reward
    temperature: float = 0.7
    """sampling temperature: 0.7, the official code's (Appendix I.1.4's table lists 0.1: pass 0.1 to follow it)"""
    response_length: int = 53
    """tokens sampled per response, exactly, as in the paper: EOS does not stop sampling; the rollout cuts after it"""
    penalty_reward_value: float = -1.0
    """score given to responses that contain no EOS token"""
    stop_at_eos: bool = False
    """stop sampling a response at its first stop token (EOS, a chat model's end of turn), as chat runs: faster, and
    the same distribution (a response is cut after its first stop token either way)"""
    sft_model_path: str = "vwxyzjn/EleutherAI_pythia-2.8b-deduped__sft__tldr"
    """the SFT policy, initial and KL reference: hub name, save_pretrained folder, or a LoRA adapter (merged in)"""
    reward_model_path: str | None = None
    """a one-label sequence classifier or a backbone + scalar head (default: the paper's 2.8B; --preference_fn: none)"""
    reward_tokenizer: str | None = None
    """the reward model's tokenizer and chat template (default: its own, else the policy's), reading decoded text"""
    reward_fn: str | None = None
    """path/to/file.py:function, used instead of the reward model: fn(prompts, responses) -> one score per response"""

    # data
    query_dataset: str = "cleanrl/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1704563162"
    """hub name, local directory or single data file (.jsonl, .json, .csv, .parquet) of the prompts"""
    query_column: str = "query"
    """the prompt column: a text, or a conversation (a list of {role, content}; rendered with the chat template)"""
    reference_column: str | None = "reference_response"
    """the reference response column for the evaluation table (a text, or a conversation ending with it); None: none"""
    chat: bool = False
    """render text prompts with the chat template too (a "\n\nHuman: ... \n\nAssistant:" text as its turns)"""
    train_split: str = "train"
    """the split to train on"""
    eval_split: str = "validation"
    """the split to evaluate on"""
    query_length: int = 512
    """prompts are left-padded to this many tokens"""
    long_prompts: Literal["filter", "truncate"] = "filter"
    """prompts longer than --query_length: 'filter' drops them (as the paper's chat runs); 'truncate' keeps their end"""

    # optimisation
    total_episodes: int | None = None
    """prompts to train on in total (default: one epoch of the train split)"""
    batch_size: int = 512
    """prompts per update, over all ranks (P pairs each: one in Algorithm 1); stays fixed as the world size changes"""
    per_device_train_batch_size: int = 8
    """pairs per micro-batch on one rank (2x as many sequences); gradient accumulation fills the rest (512 prompts on
    8 ranks: 64 pairs per rank, 8 micro-batches of 8)"""
    local_rollout_forward_batch_size: int = 32
    """prompts per no-grad generation / scoring chunk on one rank"""
    lr: float = 3e-6
    """AdamW learning rate (torch's weight decay 0.01, as the official code), decayed linearly to lr / num_updates"""
    eps: float = 1e-5
    """AdamW epsilon"""
    max_grad_norm: float | None = None
    """clip the gradient norm to this (default: no clipping; the paper gives no value for TL;DR)"""

    # variants of Algorithm 1 (the loop reads as Algorithm 1 as the paper runs TL;DR; the variants' code follows it)
    num_samples: int = 2
    """responses per prompt (Algorithm 1: 2, y and y'; the variants' block after the loop says what the others do)"""
    pairing: Literal["adjacent", "best_worst"] = "adjacent"
    """the pairs (y, y'): 'adjacent' (1st-2nd, 3rd-4th, ...); 'best_worst' (one pair per prompt: the highest and the
    lowest score, as the official UltraFeedback runs)"""
    mu: Literal["policy", "dataset"] = "policy"
    """Algorithm 1's base distribution of y': 'policy' (pi_t: sampled); 'dataset' (the prompt's --mu_column response)"""
    mu_column: str | None = None
    """with --mu dataset, the train split's column of y' (a text, or a conversation ending with it; it ends as the
    policy ends its own: EOS, or the chat template's end of turn)"""
    preference_fn: str | None = None
    """path/to/file.py:fn, a preference instead of a reward (Appendix D.2): fn(prompts, responses_a, responses_b) ->
    P(a > b) in [0, 1] per pair. Evaluated by win rate; --kl_coef defaults to 0, as D.2's regression has no reference"""

    # the trained model
    lora: bool = True
    """train LoRA adapters (reference = adapter disabled); --no-lora: full fine-tuning with a frozen reference copy"""
    lora_rank: int = 1024
    """LoRA rank r (1024 and alpha 2048: the paper's TL;DR setting, Appendix I.1.4)"""
    lora_alpha: int = 2048
    """LoRA alpha (the adapter's output is scaled by alpha / r)"""
    lora_dropout: float = 0.0
    """LoRA dropout: 0, as the models train in eval mode (no dropout), where another value would do nothing"""
    lora_target_modules: list[str] | None = None
    """modules to adapt (default: peft's for the architecture: Pythia's query_key_value); 'all-linear': all"""
    num_trainable_layers: int | None = None
    """with --no-lora, train only the last N layers and what follows them (the final norm, an untied LM head), the rest
    frozen, as the paper's chat runs"""

    # speed and memory
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """'bf16': trainable weights in fp32, frozen ones in bf16, forward passes under bf16 autocast (a full fine-tuning's
    reference copy stays fp32, as the policy it copies); 'auto': bf16 on CUDA, fp32 on CPU"""
    pad_multiple: int = 64
    """left-pad a batch of prompts to its longest rounded up to this multiple; 0: to --query_length (official code)"""
    static_cache: bool = True
    """sample with a static KV cache, compiled on CUDA (about 3x faster, docs/memory.md); not with --fsdp"""
    fsdp: bool = False
    """shard the policy (and a full fine-tuning reference) over the ranks with FSDP2 where DDP does not fit (6.9B)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass (in eval mode too): less memory, ~1/3 more time"""
    cuda: bool = True
    """use CUDA when it is available"""

    # the run: logs, evaluation, checkpoints
    exp_name: str = "rebel"
    """the name of this experiment (prefix of the run name)"""
    seed: int = 555134
    """seed of the experiment; rank r samples with seed + r"""
    track: bool = False
    """log to Weights and Biases (works with WANDB_MODE=offline)"""
    wandb_project_name: str = "rebel"
    """the wandb project"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""
    run_dir: str | None = None
    """where TensorBoard events, metrics.jsonl and the evaluation tables go (default: runs/<run name>)"""
    output_dir: str | None = None
    """where the final policy is saved, new or empty or this run's (default: <run_dir>/model; '': not saved)"""
    save_merged: bool = False
    """with LoRA, also save the adapter merged into the base weights, in <output_dir>/merged"""
    save_freq: int = 20
    """write a checkpoint every this many updates (and at the last, and on Ctrl-C or SIGTERM); 0 = only then"""
    keep_checkpoints: int = 2
    """how many of the latest checkpoints to keep in <run_dir>/checkpoints"""
    resume: str | None = None
    """continue the run in this folder from its latest checkpoint (or start it there): pass it at every launch"""
    eval_freq: int = 100
    """evaluate every this many updates, and before the first and after the last (0: only those two)"""
    num_eval_prompts: int | None = None
    """evaluate on the first N prompts of the evaluation split (default: all)"""
    num_sample_rows: int = 4
    """sample completions printed and logged at each evaluation"""
    eval_temperature: float = 0.01
    """sampling temperature for evaluation (the official code's 0.01, near greedy); eval/kl uses it too"""


# ============================================ below: the same in every script (tools/sync_appendix.py copies it)
# The appendix: the helpers of rebel.py's that a script calls, word for word and in rebel.py's order (fix them there;
# rebel.py holds all, some for its siblings only): first the algorithm's helpers, where a script has them; from `set-up`
# on, plumbing (the run's folder, models, data, evaluation, checkpoints, errors), which a reader can skip.


# ---------------------------------------------------------------------------------------------- the algorithm's helpers
def sampling_configs(flags: dict, pad_id: int, stop_ids: list[int]) -> tuple:
    """sampling_config at --temperature and at --eval_temperature: --response_length tokens, a static KV cache unless
    --no-static_cache or --fsdp (a sharded sampler is not compiled), stopping at a stop token with --stop_at_eos."""
    static, stops = flags["static_cache"] and not flags["fsdp"], stop_ids if flags["stop_at_eos"] else None
    length = flags["response_length"]
    return tuple(sampling_config(length, flags[t], pad_id, static, stops) for t in ("temperature", "eval_temperature"))


def sampling_config(response_length: int, temperature: float, pad_id: int, static_cache=False, stop_ids=None):
    """Exactly response_length tokens, as the paper: with no eos_token_id, EOS is sampled as any token and the rollout
    cuts after it (min_new_tokens says the same length again); with stop_ids (chat), up to the first stop. The pad is
    never sampled."""
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=response_length, min_new_tokens=None if stop_ids else response_length,
                            eos_token_id=stop_ids or None, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                            pad_token_id=pad_id, suppress_tokens=[pad_id],
                            cache_implementation="static" if static_cache else None)  # fmt: skip


@torch.no_grad()
def generate(model, queries: torch.Tensor, config) -> torch.Tensor:
    """Sample with `config` alone, not filled from the model's generation_config (a repetition penalty, EOS ids)."""
    from torch.distributed.fsdp import FSDPModule
    from transformers import GenerationConfig

    pad_id, length = config.pad_token_id, queries.size(1) + config.max_new_tokens
    attention_mask = queries != pad_id
    input_ids = queries.masked_fill(~attention_mask, 0)  # masked anyway; an added pad may have no embedding row
    if config.eos_token_id:  # a finished response is fed this token: a real one, where the pad may have no embedding
        config = copy.deepcopy(config)
        config.pad_token_id = config.eos_token_id[0]
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a peft wrapper
    own_config, hf_model.generation_config = hf_model.generation_config, GenerationConfig()
    sharded = [m for m in hf_model.modules() if isinstance(m, FSDPModule)]  # FSDP only: gather each layer once
    for module in sharded:
        module.set_reshard_after_forward(False, recurse=False)
    try:
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    finally:
        hf_model.generation_config = own_config
        for module in sharded:
            module.set_reshard_after_forward(True, recurse=False)
            module.reshard()
    output = torch.cat((queries, output[:, queries.size(1) :]), 1)
    return nn.functional.pad(output, (0, length - output.size(1)), value=pad_id)  # stopped early: the same length


def first_true_indices(bools: torch.Tensor) -> torch.Tensor:  # each row's first True; the row length if none
    n = bools.size(-1)
    return torch.where(bools, torch.arange(n, device=bools.device), n).min(dim=-1).values


def truncate_response(responses: torch.Tensor, stop_ids: list[int], pad_id: int) -> torch.Tensor:
    """Keep each response up to and including its first stop token (EOS or a chat model's end of turn); pad the rest."""
    positions = torch.arange(responses.size(1), device=responses.device)
    ends = first_true_indices(torch.isin(responses, torch.tensor(stop_ids, device=responses.device)))
    return responses.masked_fill(positions > ends[:, None], pad_id)


def response_mask(responses: torch.Tensor, pad_id: int) -> torch.Tensor:
    """True before the first pad: after truncate_response, up to and including the first stop token (or all)."""
    lengths = first_true_indices(responses == pad_id)  # tokens kept
    return torch.arange(responses.size(1), device=responses.device)[None] < lengths[:, None]


def trim_left_padding(queries: torch.Tensor, pad_id: int, multiple: int) -> torch.Tensor:
    """Drop the left padding that every prompt has, keeping a multiple of `multiple` columns (0: keep all)."""
    longest = int((queries != pad_id).sum(1).max())
    keep = min(queries.size(1), -(-longest // multiple) * multiple) if multiple else queries.size(1)
    return queries[:, queries.size(1) - keep :]


def trim_responses(query_responses: torch.Tensor, masks: torch.Tensor, context_length: int):
    """Drop the response columns that are padding in every response: query_responses (..., L), masks (..., T)."""
    width = int(masks.sum(-1).max())
    return query_responses[..., : context_length + width], masks[..., :width]


def forward(model, query_responses: torch.Tensor, pad_id: int, logits_to_keep: torch.Tensor | None = None):
    """Forward with the pad id masked and positions counted from the first real token, as generate() counts them."""
    attention_mask = query_responses != pad_id
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    input_ids = query_responses.masked_fill(~attention_mask, 0)  # masked anyway; an added pad may have no embedding row
    keep = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}  # the LM head's (a backbone has none)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **keep)


def response_logprobs(model, query_responses, context_length: int, temperature: float, pad_id: int):
    """Per-token log pi(y_t | x, y_<t) of the responses as generate() samples them (temperature, no pad); pads get 0.
    The same as log_softmax(logits[:, ctx - 1 : -1] / temperature, -1).gather(-1, y) with the pad's logit at -inf,
    computed with less memory: the LM head over the response positions only, the softmax a few positions at a time."""
    from torch.utils.checkpoint import checkpoint

    responses = query_responses[:, context_length:]
    # The LM head over the response positions only (the logits at t - 1 give token t): at a 128k vocabulary, the
    # prompt's would be most of a pass's memory.
    positions = torch.arange(context_length - 1, query_responses.size(1) - 1, device=query_responses.device)
    logits = forward(model, query_responses, pad_id, positions).logits
    if logits.size(1) != responses.size(1):  # a model that ignores logits_to_keep
        logits = logits[:, context_length - 1 : -1]  # (B, T, V)
    is_pad = responses == pad_id  # (B, T)
    tokens = responses.masked_fill(is_pad, 0)
    # A few positions at a time (64 MB of fp32 logits each), recomputed in the backward pass: no second (B, T, V).
    step = max(1, 2**24 // (logits.size(0) * logits.size(-1)))
    chunks = zip(logits.split(step, 1), tokens.split(step, 1))
    parts = [checkpoint(token_logprobs, z, y, temperature, pad_id, use_reentrant=False) for z, y in chunks]
    return torch.cat(parts, 1).masked_fill(is_pad, 0.0)  # (B, T); pads read token 0's log-prob (maybe -inf): zeroed


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, pad_id: int) -> torch.Tensor:
    """log softmax(logits / temperature)[tokens] in fp32, the pad excluded: (B, t, V) and (B, t) -> (B, t)."""
    z = logits.float() / temperature
    if pad_id < z.size(-1):
        z[..., pad_id] = float("-inf")  # generate() suppresses it
    return z.gather(2, tokens.unsqueeze(-1)).squeeze(-1) - z.logsumexp(-1)


def sequence_logprobs(model, query_responses, masks, context_length: int, temperature: float, pad_id: int):
    """log pi(y|x): query_responses (B, n, L) and masks (B, n, T) -> (B, n)."""
    logprobs = response_logprobs(model, query_responses.flatten(0, 1), context_length, temperature, pad_id)
    return (logprobs * masks.flatten(0, 1)).sum(-1).unflatten(0, masks.shape[:2])


def stop_token_ids(tokenizer, generation_config) -> list[int]:
    """The tokenizer's EOS and the model's own stop tokens (a chat model's end of turn: Llama-3's <|eot_id|>)."""
    ids = generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return [tokenizer.eos_token_id] + [i for i in ids if i != tokenizer.eos_token_id]


@contextmanager
def adapter_disabled(peft_model):
    """The peft model with its adapter switched off: the base model (peft's own context manager yields nothing)."""
    with peft_model.disable_adapter():
        yield peft_model


def grad_sync(model, enabled: bool):
    """DDP's no_sync unless enabled (a step's last micro-batch), which acts at the forward; not FSDP's (whole grads)."""
    return model.no_sync() if isinstance(model, DDP) and not enabled else nullcontext()


def trim_padding(query_responses: torch.Tensor, context_length: int, pad_id: int, multiple: int):
    """For fixed texts (sft, reward, dpo): drop the padding columns that all sequences (..., L) share on both sides, in
    multiples of `multiple` (0: none; the scores stay the same); returns them and the new context length."""
    if not multiple:
        return query_responses, context_length
    flat = query_responses.flatten(0, -2)
    queries, responses = trim_left_padding(flat[:, :context_length], pad_id, multiple), flat[:, context_length:]
    last = int((torch.arange(1, responses.size(1) + 1, device=responses.device) * (responses != pad_id)).max())
    keep = min(responses.size(1), -(-last // multiple) * multiple)
    return query_responses[..., context_length - queries.size(1) : context_length + keep], queries.size(1)


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


def check_flags(flags: dict) -> None:
    """Every script's flags, checked once at start (a flag this script lacks is skipped; its own: in its main)."""
    positive = """lr eps batch_size per_device_train_batch_size local_rollout_forward_batch_size query_length
    response_length noptepochs num_mini_batches num_train_epochs temperature eval_temperature lora_rank lora_alpha
    keep_checkpoints total_episodes num_eval_prompts num_norm_examples max_grad_norm num_trainable_layers"""
    for key in positive.split():
        v = flags.get(key)  # None: the default (all, or off)
        require(v is None or v > 0, f"--{key} must be {'>= 1' if isinstance(v, int) else '> 0'}; got {v}")
    for key in "save_freq eval_freq pad_multiple num_sample_rows kl_coef lora_dropout".split():
        require(flags.get(key, 0) >= 0, f"--{key} must be >= 0; got {flags.get(key)}")
    dropout = flags.get("lora_dropout", 0)  # the models train in eval mode (the rollout's and the update's ln pi agree)
    require(dropout == 0, f"--lora_dropout {dropout} would do nothing: the models train in eval mode; leave it at 0")
    for key in "sft_model_path base_model reward_model_path reward_tokenizer query_dataset preference_dataset".split():
        path = flags.get(key)  # a local path (a hub name is org/name) that is not there: said with its flag at start
        require(not path or os.path.exists(path) or not (path.startswith(("/", ".", "~")) or path.count("/") > 1),
                f"--{key} {path}: no such file or directory; give an existing path, or a hub name")  # fmt: skip
    fsdp = flags.get("fsdp")
    require(not fsdp or "RANK" in os.environ, "--fsdp needs torchrun (torchrun --nproc_per_node 1 for one GPU)")
    require(not (fsdp and flags.get("save_merged")), "--save_merged does not work with --fsdp: merge the saved adapter")
    require(not flags.get("num_trainable_layers") or not (flags["lora"] or fsdp),
            "--num_trainable_layers trains whole layers: add --no-lora (and it does not work with --fsdp)")  # fmt: skip


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


# ---------------------------------------------------------------------------------------------- models
def lora_config(flags: dict):
    """peft's LoraConfig of the --lora_* flags (['all-linear'], the flag's list: peft's word for all linear layers)."""
    from peft import LoraConfig

    modules = flags["lora_target_modules"]
    return LoraConfig(r=flags["lora_rank"], lora_alpha=flags["lora_alpha"], lora_dropout=flags["lora_dropout"],
                      target_modules=modules[0] if modules == ["all-linear"] else modules)  # fmt: skip


def load_trained_policy(flags: dict, tokenizer, dtype, device, bf16: bool):
    """--sft_model_path to train (eval mode: no dropout), its reference (`with ref_policy() as ref`) and its stop
    tokens. --lora: fp32 adapters on a base in `dtype`, the reference with the adapter off; --num_trainable_layers:
    those in fp32, the reference with their first weights swapped in; else fp32, a frozen copy."""
    from peft import get_peft_model

    path, lora, num_trainable_layers = flags["sft_model_path"], flags["lora"], flags["num_trainable_layers"]
    policy = load_policy(path, dtype if lora or num_trainable_layers else torch.float32)
    check_positions(policy.config, (flags["query_length"], flags["response_length"]), path)
    check_vocabulary(tokenizer, policy, path)
    stop_ids = stop_token_ids(tokenizer, policy.generation_config)
    if lora:
        try:
            policy = get_peft_model(policy, lora_config(flags))
        except ValueError as e:
            names = sorted({n.rsplit(".", 1)[-1] for n, m in policy.named_modules() if isinstance(m, nn.Linear)})
            raise BadInput(f"--lora_target_modules: {e}. The model's linear layers are named {names[:12]}") from e
        ref_policy = partial(adapter_disabled, policy)
    elif num_trainable_layers:
        ref_policy = partial(weights_swapped, policy, train_last_layers(policy.to(device), num_trainable_layers, dtype))
    else:
        ref_model = load_policy(path, torch.float32).to(device).eval().requires_grad_(False)
        ref_policy = partial(nullcontext, shard(ref_model, bf16) if flags["fsdp"] else ref_model)
    if flags["gradient_checkpointing"]:
        checkpoint_layers(policy)
    return policy.to(device).eval(), ref_policy, stop_ids


def distribute(model, fsdp: bool, bf16: bool, device):
    """The model as the gradient steps see it: FSDP2-sharded in place, DDP-wrapped under torchrun, or itself."""
    if fsdp:
        return shard(model, bf16)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if dist.is_initialized() else model


def load_policy(path: str, dtype: torch.dtype):
    """A causal LM from a hub name or save_pretrained directory; a LoRA adapter (what every script saves) merged into
    its base and named by its path, which an adapter trained on it records as its base."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import find_adapter_config_file

    check_model_path(path)
    with refused(f"cannot load a model from '{path}'"):
        if not find_adapter_config_file(path):
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
            missing = sorted(info["missing_keys"])  # initialised at random: a reward model's folder has no LM head
            require(not missing, f"'{path}' is not a whole causal LM: no weights for {len(missing)} parameters (e.g. "
                    f"{missing[:1]}), which would start random; give a policy saved with its LM head")  # fmt: skip
            return model
        # Not peft's AutoPeftModel: it resizes the embedding to a tokenizer saved beside the adapter.
        base_path = PeftConfig.from_pretrained(path).base_model_name_or_path
        try:
            base = load_policy(base_path, dtype)
        except BadInput as e:
            raise BadInput(f"'{path}' is a LoRA adapter whose base model '{base_path}' cannot be loaded: {e}") from e
        model = PeftModel.from_pretrained(base, path).merge_and_unload()
        model.name_or_path = path
        return model


def load_tokenizer(path: str):
    """The policy's tokenizer, its pad distinct from EOS and BOS (never fed to a model: it needs no embedding row)."""
    from transformers import AutoTokenizer

    check_model_path(path)
    require(not os.path.isdir(path) or has_tokenizer(path),
            f"'{path}' holds no tokenizer (no tokenizer.json or tokenizer_config.json): save one there")  # fmt: skip
    with refused(f"cannot load a tokenizer from '{path}'"):
        tokenizer = AutoTokenizer.from_pretrained(path)
    require(tokenizer.eos_token_id is not None,
            f"the tokenizer of {path} has no EOS token (responses end with it): set one")  # fmt: skip
    if tokenizer.pad_token_id in (None, tokenizer.eos_token_id, tokenizer.bos_token_id):
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return tokenizer


def has_tokenizer(folder: str) -> bool:
    files = {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model"}
    return bool(files & set(os.listdir(folder)))


def check_positions(config, lengths: tuple, path: str) -> None:
    """A prompt and its response fit in the model's positions (past them a position table has no row)."""
    limit = position_limit(config)
    require(limit is None or sum(lengths) <= limit, f"--query_length {lengths[0]} + --response_length {lengths[1]} = "
            f"{sum(lengths)} tokens is more than the {limit} positions of the model {path}: lower them")  # fmt: skip


def position_limit(config) -> int | None:
    """The most tokens a model has positions for, by whichever name its config gives it (None: no limit)."""
    fields = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")
    return next((v for v in (getattr(config, f, None) for f in fields) if isinstance(v, int)), None)


def check_vocabulary(tokenizer, model, path: str) -> None:
    """Every id the tokenizer gives (its pad aside: no model reads it) has a row in the model's embedding."""
    top = max(i for i in tokenizer.get_vocab().values() if i != tokenizer.pad_token_id)
    rows = model.get_input_embeddings().num_embeddings
    require(top < rows, f"tokenizer ids reach {top}, past the {rows} embedding rows of the model {path}: use its own")


def check_model_path(path: str) -> None:
    """A local path must be a save_pretrained directory: the loaders would try it as a hub name and fail obscurely."""
    require(not os.path.isfile(path), f"'{path}' is a file; give the directory save_pretrained wrote, or a hub name")
    require(not os.path.isdir(path) or bool({"config.json", "adapter_config.json"} & set(os.listdir(path))),
            f"'{path}' holds no model: no config.json (or adapter_config.json for a LoRA adapter)")  # fmt: skip
    require(os.path.exists(path) or not path.startswith(("/", ".", "~")), f"'{path}': no such directory")


def train_last_layers(model, n: int, dtype: torch.dtype) -> dict:
    """Train the last n layers and what follows them in fp32, as the official chat code; returns their start weights."""
    layers = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]
    require(0 < n <= len(layers), f"--num_trainable_layers {n}: the model has {len(layers)} layers")
    model.get_input_embeddings().requires_grad_(False)
    for layer in layers[:-n]:
        layer.requires_grad_(False)
    reference = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return reference


@contextmanager
def weights_swapped(model, weights: dict):
    """The model with the named parameters' values replaced by `weights` (no gradient flows meanwhile)."""
    params = dict(model.named_parameters())
    live = {name: params[name].data for name in weights}
    try:
        for name, value in weights.items():
            params[name].data = value
        yield model
    finally:
        for name, value in live.items():
            params[name].data = value


def checkpoint_layers(model) -> None:
    """Activation checkpointing of every layer; unlike transformers' switch, in eval mode and renaming no parameter."""
    from torch.utils.checkpoint import checkpoint

    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    for module in hf_model.modules():
        if type(module).__name__ in hf_model._no_split_modules:
            module.forward = partial(checkpoint, module.forward, use_reentrant=False)


def shard(model, bf16: bool):
    """FSDP2: every transformer layer, then the whole, sharded over the ranks; compute in bf16 (with `bf16`), gradients
    reduced in fp32. The root is the transformers model inside any peft wrapper: generate() calls its forward."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    mixed_precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for param in hf_model.parameters():  # rank 0's random init (LoRA's) everywhere, as DDP does; loaded weights agree
        if param.requires_grad:
            dist.broadcast(param.data, src=0)
    for module in hf_model.modules():
        if type(module).__name__ in hf_model._no_split_modules:
            fully_shard(module, mp_policy=mixed_precision)
    fully_shard(hf_model, mp_policy=mixed_precision)
    return model


def full_state_dict(model) -> dict:
    """Every rank takes part; rank 0 gets the whole state dict on the CPU, for save_pretrained."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_policy(model, tokenizer, output_dir: str, fsdp: bool, merged: bool) -> None:
    """save_pretrained of the policy and tokenizer (`merged`: also in <output_dir>/merged); all ranks call it."""
    state = full_state_dict(model) if fsdp and output_dir else None
    if not output_dir or (dist.is_initialized() and dist.get_rank() != 0):
        return
    fix = ". The trained state is in the run's last checkpoint: run the same command with --resume <its run_dir> "
    with refused(f"cannot save the policy to {output_dir}", fix + "--output_dir <another directory>"):
        model.save_pretrained(output_dir, state_dict=state)
        tokenizer.save_pretrained(output_dir)
        if merged:
            model.merge_and_unload().save_pretrained(os.path.join(output_dir, "merged"))
            tokenizer.save_pretrained(os.path.join(output_dir, "merged"))
    print(f"saved the policy to {output_dir}")


# ---------------------------------------------------------------------------------------------- the reward
class ScalarRewardModel(nn.Module):
    """A backbone and a linear head read at the last non-pad token, minus a bias (reward.py's: references score 0)."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, bias: float = 0.0):
        super().__init__()
        self.backbone, self.head, self.bias = backbone, head, bias

    def forward(self, query_responses: torch.Tensor, pad_id: int) -> torch.Tensor:
        width, limit = query_responses.size(1), position_limit(self.backbone.config)
        require(limit is None or width <= limit, f"the reward model reads {width} tokens (prompt and response), more "
                f"than its {limit} positions: lower --query_length / --response_length, or use another")  # fmt: skip
        hidden = forward(self.backbone, query_responses, pad_id).last_hidden_state  # (B, L, H)
        # The last non-pad token: queries are left-padded and responses right-padded, so it is the rightmost one.
        last = ((query_responses != pad_id) * torch.arange(width, device=hidden.device)).argmax(1)
        hidden = hidden[torch.arange(hidden.size(0), device=hidden.device), last]  # (B, H)
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1) - self.bias  # (B,)


class Reward:
    """r(x, y): a reward model's score of the policy's tokens, or of the texts (its own model_tokenizer), or fn's."""

    def __init__(self, tokenizer, model=None, model_tokenizer=None, fn=None):
        self.tokenizer, self.model, self.model_tokenizer, self.fn = tokenizer, model, model_tokenizer, fn

    def __call__(self, query_responses: torch.Tensor, context_length: int, prompts: list) -> torch.Tensor:
        if self.fn is None and self.model_tokenizer is None:
            return self.model(query_responses, self.tokenizer.pad_token_id).float()  # (N,)
        responses = self.tokenizer.batch_decode(query_responses[:, context_length:], skip_special_tokens=True)
        if self.fn is not None:
            name = f"--reward_fn {getattr(self.fn, '__name__', self.fn)}"
            try:
                scores = self.fn(prompts, responses)
                values = torch.as_tensor(scores, dtype=torch.float, device=query_responses.device)
            except Exception as e:
                raise BadInput(f"{name} failed on {len(responses)} responses: {type(e).__name__}: {e}") from e
            require(values.shape == (len(responses),), f"{name} returned {str(scores)[:80]!r}; it must return one "
                    f"number per response ({len(responses)})")  # fmt: skip
            return values
        tokenizer, texts, pad = self.model_tokenizer, [], self.tokenizer.pad_token_id
        for prompt, response, query_response in zip(prompts, responses, query_responses):
            if isinstance(prompt, str):  # decoded after its prompt, so that a sentencepiece response keeps its space
                query, whole = query_response[:context_length], query_response[query_response != pad]
                head = self.tokenizer.decode(query[query != pad], skip_special_tokens=True)
                whole = self.tokenizer.decode(whole, skip_special_tokens=True)
                response = whole[len(head) :] if whole.startswith(head) else response
            texts.append(reward_text(prompt, response, tokenizer))
        # The special tokens reward.py trains with: a text gets the tokenizer's own (its BOS); a template holds them.
        ids = [tokenizer(t, add_special_tokens=isinstance(p, str)).input_ids for t, p in zip(texts, prompts)]
        width, pad_id = max(map(len, ids)), tokenizer.pad_token_id
        inputs = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids], device=query_responses.device)
        return self.model(inputs, pad_id).float()  # (N,)


def reward_text(prompt, response: str, tokenizer) -> str:
    """What a reward model with its own tokenizer reads: the chat with the response as its last turn, or text + EOS."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": response}], tokenize=False)
    return prompt + response + tokenizer.eos_token


def same_tokenizer(a, b) -> bool:
    """Whether token ids mean the same to both tokenizers (pad tokens aside) and prompts render the same."""
    pads = {a.pad_token, b.pad_token}
    vocab_a, vocab_b = ({k: v for k, v in t.get_vocab().items() if k not in pads} for t in (a, b))
    return vocab_a == vocab_b and a.chat_template == b.chat_template


def load_reward(reward_fn: str | None, model_path: str | None, tokenizer_path: str | None, tokenizer, dtype, device):
    """--reward_fn path/to/file.py:name, or the reward model with its tokenizer where that differs from the policy's;
    None where neither is named (rebel.py's --preference_fn)."""
    if not (reward_fn or model_path):
        return None
    if reward_fn:
        return Reward(tokenizer, fn=load_function(reward_fn, "--reward_fn"))
    model = load_reward_model(model_path, dtype).to(device).eval().requires_grad_(False)
    reward_tokenizer = load_reward_tokenizer(tokenizer_path, model_path, tokenizer)
    if reward_tokenizer is tokenizer:
        print(f"the reward model {model_path} has no tokenizer: it reads the policy's tokens", file=sys.stderr)
    if same_tokenizer(reward_tokenizer, tokenizer):  # it reads the policy's token ids
        check_vocabulary(tokenizer, model.backbone, model_path)
        return Reward(tokenizer, model)
    return Reward(tokenizer, model, reward_tokenizer)


def load_function(spec: str, flag: str):
    """The function `name` of the file of spec 'path/to/file.py:name' (--reward_fn, --preference_fn)."""
    path, _, name = spec.rpartition(":")
    require(os.path.isfile(path) and name, f"{flag} {spec}: give an existing file.py:function_name")
    module_spec = importlib.util.spec_from_file_location(f"{flag.lstrip('-')}_module", path)
    module = importlib.util.module_from_spec(module_spec)
    with refused(f"{flag} {spec}: {path} fails to run"):  # a syntax error, a missing import: said in one line
        module_spec.loader.exec_module(module)
    require(callable(getattr(module, name, None)), f"{flag} {spec}: {path} defines no function '{name}'")
    return getattr(module, name)


@torch.no_grad()
def compare_pairs(fn, tokenizer, query_responses: torch.Tensor, context_length: int, prompts: list) -> torch.Tensor:
    """P(y_i > y_j | x) of every ordered pair of a prompt's responses by one call of --preference_fn fn(prompts,
    responses_a, responses_b) -> a probability (or 0/1) per pair. (B, m, L) -> (B, m, m), 0.5 on the diagonal."""
    B, m = query_responses.shape[:2]
    texts = tokenizer.batch_decode(query_responses[..., context_length:].flatten(0, 1), skip_special_tokens=True)
    b, i, j = torch.tensor([(b, i, j) for b in range(B) for i in range(m) for j in range(m) if i != j]).unbind(1)
    name = f"--preference_fn {getattr(fn, '__name__', fn)}"
    try:
        out = fn([prompts[x] for x in b], [texts[x] for x in b * m + i], [texts[x] for x in b * m + j])
        values = torch.as_tensor(out, dtype=torch.float)
    except Exception as e:
        raise BadInput(f"{name} failed on {len(b)} pairs: {type(e).__name__}: {e}") from e
    require(values.shape == (len(b),) and bool(((values >= 0) & (values <= 1)).all()), f"{name} returned "
            f"{str(out)[:80]!r}; it must return one probability in [0, 1] per pair ({len(b)})")  # fmt: skip
    wins = torch.full((B, m, m), 0.5)
    wins[b, i, j] = values
    return wins.to(query_responses.device)


def load_reward_tokenizer(path: str | None, model_path: str, tokenizer):
    """The reward model's tokenizer: `path`, else the one saved with it, else the policy's (`tokenizer`) itself."""
    from huggingface_hub import snapshot_download

    local = path or (model_path if os.path.isdir(model_path) else snapshot_download(model_path))
    return load_tokenizer(local) if path or has_tokenizer(local) else tokenizer


def load_reward_model(path: str, dtype: torch.dtype) -> ScalarRewardModel:
    """An AutoModelForSequenceClassification with one label, or summarize_from_feedback_details' ScalarModel."""
    from huggingface_hub import snapshot_download
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    check_model_path(path)
    with refused(f"reward model: cannot read the checkpoint {path}"):
        local = path if os.path.isdir(path) else snapshot_download(path)
        with open(os.path.join(local, "config.json")) as f:
            config = json.load(f)
        if "base_config" not in config:
            model, info = AutoModelForSequenceClassification.from_pretrained(local, dtype=dtype,
                                                                             output_loading_info=True)  # fmt: skip
            if missing := sorted(info["missing_keys"]):
                raise BadInput(f"reward model {path}: no weights for {len(missing)} parameters of "
                               f"{type(model).__name__} (e.g. {missing[0]}), which would score at random. A reward "
                               "model of its own class (a `v_head`, custom code) must be converted first: "
                               "docs/chat.md")  # fmt: skip
            head, n = getattr(model, "score", None) or getattr(model, "classifier", None), model.config.num_labels
            require(n == 1, f"reward model {path} has num_labels={n}; a reward model needs num_labels=1 (one score)")
            require(isinstance(head, nn.Linear), f"reward model {path}: {type(model).__name__} has no linear output "
                    "(`score`) to read one score from")  # fmt: skip
            return ScalarRewardModel(model.base_model, head, getattr(model.config, "reward_bias", 0.0))
        # https://github.com/vwxyzjn/summarize_from_feedback_details (ScalarModel): config.json with `base_config`,
        # weights `lm_backbone.*` and `scalar_head.*` (with or without a bias)
        state = {}
        for name in sorted(n for n in os.listdir(local) if n.endswith((".safetensors", ".bin"))):
            file = os.path.join(local, name)
            state.update(load_file(file) if name.endswith(".safetensors") else torch.load(file, weights_only=True))
        backbone = AutoModel.from_config(AutoConfig.for_model(**config["base_config"]), dtype=dtype)
        backbone.load_state_dict({k.removeprefix("lm_backbone."): v for k, v in state.items() if k.startswith("lm_")})
        head_state = {k.removeprefix("scalar_head."): v for k, v in state.items() if k.startswith("scalar_head.")}
        head = nn.Linear(config["hidden_size"], 1, bias="bias" in head_state)
        head.load_state_dict(head_state)
        return ScalarRewardModel(backbone, head.to(dtype), config.get("bias", 0.0))


# ---------------------------------------------------------------------------------------------- data
class Prompts(NamedTuple):  # a split of a dataset, as load_prompts reads it
    dataset: object  # its rows
    prompts: list  # as given: texts, or chat messages (conversations, and texts with `chat`: the template renders them)
    queries: torch.Tensor  # (N, query_length) the prompts' token ids, left-padded
    responses: torch.Tensor | None  # (N, response_length) a column's, ending as the policy's end, right-padded; or None
    dropped: int  # how many prompts longer than query_length were dropped (--long_prompts filter)


def load_prompts(path, split, query_column, reference_column, tokenizer, query_length, response_length, long_prompts,
                 chat=False) -> Prompts:  # fmt: skip
    """A split of a dataset (hub name, save_to_disk folder, data file, or folder of one file per split), with the
    responses of reference_column (None: none)."""
    from datasets import load_dataset, load_from_disk

    formats = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}
    looks_local = path.startswith(("/", ".", "~")) or path.rsplit(".", 1)[-1] in formats
    require(os.path.exists(path) or not looks_local, f"dataset '{path}': no such file or directory")
    file = path if os.path.isfile(path) else None  # a single file serves every split
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "dataset_dict.json")):  # the split's own file
        named = [n for n in sorted(os.listdir(path)) if n.rpartition(".")[::2] in {(split, f) for f in formats}]
        require(len(named) == 1, f"dataset folder '{path}' needs one file for split '{split}', named {split}.jsonl "
                f"(or .json, .csv, .parquet); it has {sorted(os.listdir(path))[:8]}")  # fmt: skip
        file = os.path.join(path, named[0])
    kind = formats.get(file.rsplit(".", 1)[-1]) if file else None
    require(not file or kind, f"dataset file '{file}': unknown format; give a .jsonl, .json, .csv or .parquet file")
    require(not file or os.path.getsize(file) > 0, f"dataset file '{file}' is empty")
    if kind == "json":
        check_json_lines(file)
    if kind == "csv":
        with open(file, newline="") as f:
            header = next(csv.reader(f), [])
        twice = sorted({c for c in header if header.count(c) > 1})
        require(not twice, f"dataset file '{file}' has several columns named {twice}: rename them")
    with refused(f"cannot load split '{split}' of dataset '{path}'"):
        if file:
            dataset = load_dataset(kind, data_files=file, split="train")
        elif os.path.isfile(os.path.join(path, "dataset_dict.json")):  # save_to_disk: its splits by their exact names
            splits = load_from_disk(path)
            require(split in splits, f"dataset '{path}' has no split '{split}'; its splits are {list(splits)}")
            dataset = splits[split]
        else:
            dataset = load_dataset(path, split=split)
    require(len(dataset) > 0, f"split '{split}' of dataset '{path}' has no rows")
    roles = {"system", "user", "assistant"}
    for column in (query_column, reference_column or query_column):
        require(column in dataset.column_names, f"dataset '{path}' ({split}) has no column '{column}'; it has "
                f"{dataset.column_names}. Set the flag that names it (--query_column, --reference_column, "
                "--chosen_column, --rejected_column, --mu_column) to one")  # fmt: skip
        for row, value in enumerate(dataset[column]):  # a text, or a conversation of {role, content} messages
            text = value if isinstance(value, str) else None
            if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
                whole = all(isinstance(m.get("content"), str) and m.get("role") in roles for m in value)
                text = value[-1].get("content") if whole else None
            where = f"dataset '{path}' ({split}), column '{column}', row {row}"
            require(isinstance(text, str) and bool(text.strip()), f"{where}: {str(value)[:60]!r} is not a non-empty "
                    "text or conversation (of {role, content} messages, roles system, user, assistant); fix or drop "
                    "the rows like it")  # fmt: skip
            role = value[-1].get("role") if column != query_column and isinstance(value, list) else "assistant"
            require(role == "assistant", f"{where}: the conversation ends with a {role!r} message, not the answer")
    prompts = [as_messages(x) if chat or isinstance(x, list) else x for x in dataset[query_column]]
    if isinstance(prompts[0], list):
        require(bool(tokenizer.chat_template), f"the policy's tokenizer has no chat template for the conversations "
                f"of '{path}': give a model with one, or prompts as text without --chat")  # fmt: skip
        texts = [tokenizer.apply_chat_template(x, tokenize=False, add_generation_prompt=True) for x in prompts]
        ids = tokenizer(texts, add_special_tokens=False).input_ids  # the template holds the special tokens it wants
    else:
        ids = tokenizer(prompts).input_ids
    long = [i for i, x in enumerate(ids) if len(x) > query_length]
    if long and long_prompts == "filter":
        keep = sorted(set(range(len(ids))) - set(long))
        dataset, ids, prompts = dataset.select(keep), [ids[i] for i in keep], [prompts[i] for i in keep]
    elif long:
        print(f"warning: {len(long)} prompts of '{path}' ({split}) are longer than --query_length {query_length}; "
              "keeping their last tokens (--long_prompts filter drops them)", file=sys.stderr)  # fmt: skip
    require(bool(ids), f"every prompt of '{path}' ({split}) is longer than --query_length {query_length}")
    pad, references, cut = tokenizer.pad_token_id, [], 0
    queries = [[pad] * (query_length - len(x)) + x[-query_length:] for x in ids]
    for row, (value, prompt) in enumerate(zip(dataset[reference_column] if reference_column else [], prompts)):
        where = f"'{path}' ({split}), column '{reference_column}', row {row}"
        ref = response_ids(last_turn(value), prompt, tokenizer, where)
        cut += len(ref) > response_length
        ref = ref[: response_length - 1] + ref[-1:] if len(ref) > response_length else ref  # still ends as it ended
        references.append(ref + [pad] * (response_length - len(ref)))
    if cut:
        print(f"warning: {cut} responses in column '{reference_column}' of '{path}' ({split}) are longer than "
              f"--response_length {response_length}: each is cut to its first {response_length - 1} tokens and an EOS "
              "(or end of turn)", file=sys.stderr)  # fmt: skip
    dropped = len(long) if long_prompts == "filter" else 0
    return Prompts(dataset, prompts, torch.tensor(queries), torch.tensor(references) if references else None, dropped)


def response_ids(answer: str, prompt, tokenizer, where: str) -> list[int]:
    """A dataset response's token ids, ending as the policy's own end: after a text prompt, the text and EOS; after a
    conversation, what the chat template renders for the answer's turn, up to its end of turn (its first special token
    after it: Llama-3's <|eot_id|>; EOS if there is none)."""
    eos = tokenizer.eos_token_id
    if isinstance(prompt, str):
        return tokenizer(answer.removesuffix(tokenizer.eos_token), add_special_tokens=False).input_ids + [eos]
    render = partial(tokenizer.apply_chat_template, tokenize=False)
    head = tokenizer(render(prompt, add_generation_prompt=True), add_special_tokens=False).input_ids
    whole = tokenizer(render([*prompt, {"role": "assistant", "content": answer}]), add_special_tokens=False).input_ids
    require(whole[: len(head)] == head, f"dataset {where}: the chat template renders a prompt with its answer so that "
            "it does not start with the prompt's generation prompt (in tokens): use a template that does")  # fmt: skip
    tail, special = whole[len(head) :], set(tokenizer.all_special_ids) - {tokenizer.pad_token_id}
    end = next((i for i, t in enumerate(tail) if t in special), None)
    return tail + [eos] if end is None else tail[: end + 1]


def check_json_lines(path: str) -> None:
    """A .json file is one document or JSON lines; a column holds one kind (datasets would turn a mix into strings)."""
    with open(path) as f:
        text = f.read()
    try:
        rows = json.loads(text)
    except ValueError:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            with refused(f"dataset file '{path}', line {number}: not valid JSON"):
                rows += [json.loads(line)] if line.strip() else []
    kinds = {}  # column -> {whether a text: the first row of that kind}
    for row, record in enumerate(rows if isinstance(rows, list) else []):
        for column, value in record.items() if isinstance(record, dict) else ():
            if isinstance(value, str | list):
                text, seen = isinstance(value, str), kinds.setdefault(column, {})
                seen.setdefault(text, row)
                kind = "text" if text else "conversation"
                require(len(seen) == 1, f"dataset file '{path}', column '{column}', row {row}: {str(value)[:60]!r} is "
                        f"a {kind} where row {seen.get(not text)} is not: make them one kind")  # fmt: skip


def as_messages(prompt) -> list[dict]:
    """A prompt as chat messages: a conversation without the answer that may end it; a text in Anthropic HH's and
    Nectar's "\n\nHuman: ... \n\nAssistant:" form split into its turns; another text, one user message."""
    if isinstance(prompt, str):
        parts = re.split(r"\n\n(Human|Assistant):", prompt)
        if len(parts) < 3 or parts[0].strip():
            return [{"role": "user", "content": prompt}]
        roles = {"Human": "user", "Assistant": "assistant"}
        prompt = [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    require(bool(messages), "a conversation in the dataset has no user message")
    return messages


def last_turn(value) -> str:
    """A text as it is; a conversation's last message."""
    return value if isinstance(value, str) else value[-1]["content"]


def load_preferences(path, split, query_column, chosen_column, rejected_column, tokenizer, lengths, long_prompts, chat):
    """(N, 2, query_length + response_length) pairs, the chosen (0) and rejected (1) response padded as load_prompts
    pads references; and how many were dropped for a too-long prompt."""
    pairs = []
    for column in (chosen_column, rejected_column):
        *_, q, r, dropped = load_prompts(path, split, query_column, column, tokenizer, *lengths, long_prompts, chat)
        pairs.append(torch.cat((q, r), 1))  # the prompt, then the response
    pairs = torch.stack(pairs, 1)
    same = (pairs[:, 0] == pairs[:, 1]).all(-1)  # (N,) a pair whose two responses are one: no preference
    require(not same.all(), f"every pair of '{path}' ({split}) has {chosen_column} == {rejected_column}: check them")
    if same.any():
        print(f"warning: {int(same.sum())} of {len(same)} pairs of '{path}' ({split}) have two identical responses")
    return pairs, dropped


def rank_share(n: int, rank: int, world_size: int) -> list[int]:
    """This rank's indices of the first n examples, as many on every rank (a sharded forward is a collective)."""
    require(n >= world_size, f"{n} evaluation examples cannot be shared by {world_size} processes: give more")
    return list(range(n - n % world_size))[rank::world_size]


def prompt_batches(num_prompts: int, batch_size: int, rank: int, world_size: int, seed: int):
    """Endless global batches of prompt indices (the same shuffle on every rank); each rank takes its share."""
    if num_prompts < batch_size:
        raise BadInput(f"the train split has {num_prompts} examples, fewer than one --batch_size {batch_size}")

    def batches():
        rng = np.random.default_rng(seed)
        while True:
            perm = rng.permutation(num_prompts)
            for start in range(0, num_prompts - batch_size + 1, batch_size):
                yield perm[start : start + batch_size][rank::world_size]

    return batches()


# ---------------------------------------------------------------------------------------------- evaluation and logs
@torch.no_grad()
def eval_sampler(policy, ref_policy, reward, config, stop_ids: list[int], penalty: float, chunk: int):
    """evaluate's `sample` where a script has rebel.py's rollout (sample_responses, score_responses): one response per
    prompt with `config` (--eval_temperature), and its KL at that temperature too, as the official code reports it."""

    def sample(queries, prompts):
        responses = sample_responses(policy, queries, 1, config, chunk)  # (B, 1, T)
        r = score_responses(policy=policy, ref_policy=ref_policy, reward=reward, queries=queries, responses=responses,
                            prompts=prompts, config=config, stop_ids=stop_ids, penalty=penalty,
                            chunk=chunk)  # fmt: skip
        return tuple(t[:, 0] for t in (r.query_responses, r.masks, r.logprobs - r.ref_logprobs, r.scores, r.has_eos))

    return sample


def evaluate(update, sample, reward, tokenizer, data, log, flags: dict, autocast, preference=None):
    """The evaluation table at `update` on this rank's share of the first --num_eval_prompts prompts of `data`
    (a Prompts split): a response per prompt from sample(queries, prompts) -> (query_responses, masks, kl, scores,
    has_eos), scored as in training, and the dataset's reference with its score (scores need a `reward`); with
    `preference`, the win rate P(response > reference), both orders averaged. Rank 0 writes eval_<update>.csv."""
    import pandas as pd
    from tqdm import tqdm

    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    idx = rank_share(min(flags["num_eval_prompts"] or len(data.dataset), len(data.dataset)), rank, world_size)
    prompts, chunk = [data.prompts[i] for i in idx], flags["local_rollout_forward_batch_size"]
    queries = trim_left_padding(data.queries[idx], tokenizer.pad_token_id, flags["pad_multiple"]).to(log.device)
    ctx = queries.size(1)
    # Its own random stream: the training's samples do not depend on when, or how often, the run evaluates.
    with autocast(), torch.random.fork_rng(devices=[log.device] if log.device.type == "cuda" else []):
        query_response, mask, kl, score, has_eos = sample(queries, prompts)
    rows = {"query": [last_turn(p) for p in prompts],
            "postprocessed_response": tokenizer.batch_decode(query_response[:, ctx:], skip_special_tokens=True),
            **({"score": torch.where(has_eos, score, flags["penalty_reward_value"]).tolist()} if reward else {}),
            "kl": kl.tolist(), "response_length": mask.sum(1).tolist(), "has_eos": has_eos.tolist()}  # fmt: skip
    if data.responses is not None:  # the dataset's own responses, scored the same way
        query_references = torch.cat((queries, data.responses[idx].to(log.device)), 1)
        rows["reference_response"] = [last_turn(r) for r in data.dataset[idx][flags["reference_column"]]]
        if reward:
            with autocast():
                parts = enumerate(query_references.split(chunk))
                reference_score = [reward(qr, ctx, prompts[i * chunk : (i + 1) * chunk]) for i, qr in parts]
            rows["reference_score"] = torch.cat(reference_score).tolist()
        if preference:
            pairs = torch.stack((query_response, query_references), 1)
            wins = compare_pairs(preference, tokenizer, pairs, ctx, prompts)  # (B, 2, 2)
            rows["win_rate"] = ((wins[:, 0, 1] + 1 - wins[:, 1, 0]) / 2).tolist()
    scores = {"the evaluation's scores": score, "the references' scores": torch.tensor(rows.get("reference_score", []))}
    check_finite(scores, os.path.join(log.run_dir, f"nonfinite_rank{rank}.pt"))
    gathered = [rows] * world_size
    if dist.is_initialized():
        dist.all_gather_object(gathered, rows)
    if not log.master:
        return
    df = pd.concat([pd.DataFrame(r) for r in gathered], ignore_index=True)
    df.to_csv(os.path.join(log.run_dir, f"eval_{update:06d}.csv"), index=False)
    names = ("score", "reference_score", "win_rate", "kl", "response_length")
    stats = {f"eval/{n}": df[n].mean() for n in names if n in df} | {"eval/eos_rate": df.has_eos.mean()}
    for key, value in stats.items():
        log.writer.add_scalar(key, value, update)
    shown = next((n for n in ("score", "win_rate") if n in df), "kl")  # what the printed samples show
    samples = df.head(flags["num_sample_rows"])[["query", "postprocessed_response", shown]]
    log.writer.add_text("samples", samples.to_string(), update)
    if log.track:
        log.wandb.log({"samples": log.wandb.Table(dataframe=df.head(flags["num_sample_rows"] * 4))}, step=update)
    tqdm.write(f"eval @ {update}: " + ", ".join(f"{k} {v:.3f}" for k, v in stats.items()))
    for _, row in samples.iterrows():
        tqdm.write(f"  {row.query[-80:]!r} -> {row.postprocessed_response!r} ({row[shown]:.2f})")


def precision(choice: str, device) -> tuple:
    """--precision: whether to train in bf16 ('auto': on CUDA), the frozen weights' dtype, the forwards' autocast."""
    bf16 = choice == "bf16" or (choice == "auto" and device.type == "cuda")
    return bf16, torch.bfloat16 if bf16 else torch.float32, partial(torch.autocast, device.type, torch.bfloat16, bf16)


def load_splits(flags: dict, tokenizer, train_column: str | None) -> tuple[Prompts, Prompts]:
    """load_prompts of --train_split (with `train_column`'s responses, or none) and --eval_split (with references)."""
    path, query_column = flags["query_dataset"], flags["query_column"]
    common = (tokenizer, flags["query_length"], flags["response_length"], flags["long_prompts"], flags["chat"])
    train = load_prompts(path, flags["train_split"], query_column, train_column, *common)
    evaluation = load_prompts(path, flags["eval_split"], query_column, flags["reference_column"], *common)
    if (train.dropped or evaluation.dropped) and (not dist.is_initialized() or dist.get_rank() == 0):
        print(f"dropped the prompts longer than --query_length {flags['query_length']} tokens: {train.dropped} of "
              f"'{flags['train_split']}', {evaluation.dropped} of '{flags['eval_split']}'")  # fmt: skip
    return train, evaluation


class RunLog:
    """Rank 0's logs (TensorBoard, metrics.jsonl, with --track wandb), continued on resume where the checkpoint left
    them (`record`: its trainer.json, with the wandb id), and its start line (`plan`); all ranks call write(), end()."""

    def __init__(self, run_dir, run_name, flags: dict, record, start_update, device, plan: str):
        self.master = not dist.is_initialized() or dist.get_rank() == 0
        self.run_dir, self.track, self.device, self.batch_size = run_dir, flags["track"], device, flags["batch_size"]
        self.start_update, self.start = start_update, time.time()
        if not self.master:
            return
        from torch.utils.tensorboard import SummaryWriter

        if self.track:
            import wandb

            wandb.init(project=flags["wandb_project_name"], entity=flags["wandb_entity"], config=flags, name=run_name,
                       dir=run_dir, save_code=True, id=record.get("wandb_id"), resume="allow",
                       sync_tensorboard=True)  # fmt: skip
            self.wandb, record["wandb_id"] = wandb, wandb.run.id
        self.writer = SummaryWriter(run_dir, purge_step=start_update + 1 if start_update else 0)
        self.writer.add_text("hyperparameters", "\n".join(f"{k}: {v}" for k, v in flags.items()))
        self.metrics = metrics_log(os.path.join(run_dir, "metrics.jsonl"), start_update)
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        resumed = f"; resumed after update {start_update}" if start_update else ""
        print(f"run {run_name}: {plan}, world size {world_size}; logs in {run_dir}{resumed}")

    def write(self, update: int, stats: dict, timer, lr: float) -> None:
        """One update's metrics (mean over ranks), phase times and peak memory since the last write (max), the lr."""
        stats = all_reduce(stats, device=self.device)
        timer.times["total"] = sum(timer.times.values())
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)  # the next update's peak is its own
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
        times = {f"time/{k}": v for k, v in timer.times.items()}
        stats.update(all_reduce({**times, "memory/peak_gb": peak}, dist.ReduceOp.MAX, self.device))
        if not self.master:
            return
        speed = (update - self.start_update) * self.batch_size / (time.time() - self.start)
        stats.update({"policy/lr": lr, "episode": update * self.batch_size, "time/episodes_per_second": speed})
        for key, value in stats.items():
            self.writer.add_scalar(key, value, update)
        self.metrics.write(json.dumps({"update": update, **stats}) + "\n")
        self.metrics.flush()

    def end(self, update: int, signals: list | None) -> None:
        """The run's end: the logs closed, the run directory freed (its lock), the processes ended; a run stopped by
        `signals` (Ctrl-C, SIGTERM: on some rank) says how to resume and exits with 128 + the signal's number."""
        if self.master:
            if os.path.exists(os.path.join(self.run_dir, ".lock")):
                os.remove(os.path.join(self.run_dir, ".lock"))
            self.metrics.close()
            self.writer.close()
            if self.track:
                self.wandb.finish()
            if signals is not None:
                print(f"stopped after update {update}; continue with --resume {self.run_dir}", file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
        if signals is not None:
            sys.exit(128 + (signals or [signal.SIGTERM])[0])


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


def exact_div(a: int, b: int, what: str) -> int:
    """a / b for batch sizes, which must divide exactly (`what` names them)."""
    if b <= 0 or a % b != 0:
        raise BadInput(f"{what}: {a} is not divisible by {b}. Change the batch flags so that it divides.")
    return a // b


def all_reduce(values: dict, op=None, device=None) -> dict:
    """Mean (or another op) of scalar metrics over ranks."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    if op is None:
        t /= dist.get_world_size()
    return dict(zip(values, t.tolist()))


class Timer:
    """Wall time per phase, synchronising CUDA so that asynchronous kernels are charged to their phase."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, {}

    @contextmanager
    def __call__(self, name: str):
        sync = torch.cuda.synchronize if self.device.type == "cuda" else lambda device: None
        sync(self.device)
        t0 = time.perf_counter()
        yield
        sync(self.device)
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


def require(ok: bool, message: str) -> None:
    if not ok:
        raise BadInput(message)


if __name__ == "__main__":
    sys.excepthook = print_bad_input  # bad input: one clear line instead of a traceback
    main(tyro.cli(Args, use_underscores=True))
