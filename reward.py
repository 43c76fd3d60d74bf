"""Bradley-Terry reward model on TL;DR preference pairs: the second stage of REBEL's pipeline (Gao et al., 2024, arXiv
2404.16767, Appendix I.1.2; its settings: I.1.4).

The SFT model with a one-output linear head (saved as AutoModelForSequenceClassification, num_labels=1) scores a (post,
summary) at the summary's last non-pad token (its EOS; ScalarRewardModel reads it there, not transformers' forward,
which needs the pad id in the config) and is trained on pairs (y_chosen, y_rejected) of responses to a post x:

    min_theta  - mean_{pairs (x, y_chosen, y_rejected)}  ln sigmoid( r_theta(x, y_chosen) - r_theta(x, y_rejected) )

After training, the mean score of the SFT data's reference summaries is saved as `config.reward_bias`, which rebel.py's
load_reward_model subtracts: references score 0 on average, as in summarize_from_feedback_details and the official
REBEL code (so rebel.py's fixed score of -1 for a response with no EOS lies below a typical reference's). Under bf16
the scores are computed in bf16. The file reads top to bottom: the loss and the model, the loop (main), its FSDP
sharding, the flags (Args), then the appendix of plumbing shared with rebel.py, where one piece is this algorithm's:
r_theta itself, ScalarRewardModel, in the appendix's "the reward" section (rebel.py scores with it too).

    python reward.py --help
    torchrun --nproc_per_node 8 reward.py                    # Pythia 1.4B, from the SFT model
    python -m toy.demo                                      # the offline toy task, end to end
"""

import atexit
import csv
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


def bradley_terry_loss(rewards: torch.Tensor) -> torch.Tensor:
    """rewards (B, 2), chosen then rejected: -log sigmoid(r_chosen - r_rejected), the Bradley-Terry likelihood. r_theta
    is ScalarRewardModel's (the appendix): the head on the hidden state of the last non-pad token, minus a bias (0
    while training; main sets it to the references' mean score at the end)."""
    return -nn.functional.logsigmoid(rewards[:, 0] - rewards[:, 1]).mean()


def new_reward_model(sft_model_path: str):
    """The SFT model's backbone (a LoRA adapter merged) under a fresh one-output linear head, initialised by
    transformers (normal, std = the config's initializer_range; summarize_from_feedback_details draws 1/sqrt(H+1)):
    the AutoModelForSequenceClassification that is saved, and the ScalarRewardModel over its modules that scores."""
    from transformers import AutoModelForSequenceClassification

    sft_model = load_policy(sft_model_path, torch.float32)
    sft_model.config.num_labels = 1
    hf_model = AutoModelForSequenceClassification.from_config(sft_model.config)
    hf_model.base_model.load_state_dict(sft_model.base_model.state_dict())
    return hf_model, ScalarRewardModel(hf_model.base_model, hf_model.score)


# ---------------------------------------------------------------------------------------------- the loop
def main(args: "Args") -> None:
    flags = asdict(args)
    check_flags(flags)
    # Set-up (the appendix): processes, batch sizes, the run's folder, data, the model, resume, logs.
    rank, world_size, device = init_processes(args.cuda, args.seed)
    bf16, _, autocast = precision(args.precision, device)
    local_batch_size = exact_div(args.batch_size, world_size, "--batch_size over the world size")
    grad_accum = exact_div(local_batch_size, args.per_device_train_batch_size, "per-rank batch over micro-batches")
    checkpoint, run_dir, run_name, output_dir = open_run(flags)
    tokenizer = load_tokenizer(args.sft_model_path)
    pad, lengths = tokenizer.pad_token_id, (args.query_length, args.response_length)
    # Preference pairs (B, 2, L) to train on, and the SFT data's references to set the zero of the score; every rank
    # tokenises the whole splits and takes its own pairs from the shared shuffle.
    read_pairs = partial(load_preferences, args.preference_dataset, query_column=args.query_column,
                         chosen_column=args.chosen_column, rejected_column=args.rejected_column, tokenizer=tokenizer,
                         lengths=lengths, long_prompts=args.long_prompts, chat=False)  # fmt: skip
    train_data, dropped = read_pairs(split=args.train_split)
    eval_data, _ = read_pairs(split=args.eval_split)
    eval_data = eval_data[rank_share(min(args.num_eval_prompts or len(eval_data), len(eval_data)), rank, world_size)]
    references = load_prompts(args.query_dataset, args.train_split, args.query_column, args.reference_column, tokenizer,
                              *lengths, args.long_prompts)  # fmt: skip
    norm_data = torch.cat((references.queries, references.responses), 1)
    norm_data = norm_data[rank_share(min(args.num_norm_examples or len(norm_data), len(norm_data)), rank, world_size)]
    num_updates = len(train_data) // args.batch_size * args.num_train_epochs
    batches = prompt_batches(len(train_data), args.batch_size, rank, world_size, args.seed)

    # r_theta: hf_model is what is saved; raw_model scores with its modules (eval mode keeps dropout off); `model` is
    # what the gradient steps go through (DDP's wrapper, or the same model sharded by FSDP with itself as the root).
    # Each rank builds its own new head; DDP copies rank 0's to the others.
    hf_model, raw_model = new_reward_model(args.sft_model_path)
    check_positions(hf_model.config, lengths, args.sft_model_path)
    check_vocabulary(tokenizer, hf_model, args.sft_model_path)
    raw_model.to(device).eval()
    if args.fsdp:
        model = shard_reward_model(raw_model, bf16)
    else:
        model = distribute(raw_model, fsdp=False, bf16=bf16, device=device)  # DDP under torchrun (FSDP: see above)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, eps=args.eps)

    # Resume: the trainable weights, the optimizer, the RNG states and the position in the data, where the run stopped.
    record = load_checkpoint(checkpoint, model, optimizer, flags, world_size)
    start_update = record.get("update", 0)
    require(start_update <= num_updates, f"--resume: update {start_update} is past the run's {num_updates} updates")
    for _ in range(start_update):  # the batches already trained on
        next(batches)
    signals = stop_signals()
    plan = f"{num_updates} updates of {args.batch_size} pairs, {grad_accum} micro-batches per step"
    log = RunLog(run_dir, run_name, flags, record, start_update, device, plan)
    if log.master and dropped:
        print(f"dropped {dropped} training pairs whose prompt is longer than --query_length {args.query_length}")

    # The loop: a batch of pairs -> scores -> Bradley-Terry loss -> step -> log -> checkpoint.
    nan_dump = os.path.join(run_dir, f"nonfinite_rank{rank}.pt")  # where check_finite saves a non-finite batch
    stop, update = False, start_update
    for update in trange(start_update + 1, num_updates + 1, initial=start_update, total=num_updates, disable=rank > 0):
        timer, lr_now = Timer(device), (1.0 - (update - 1.0) / num_updates) * args.lr  # linear decay to lr/num_updates
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        batch = train_data[next(batches)].to(device)  # (b, 2, query_length + response_length)

        # 1. Scores of each micro-batch's pairs, trimmed of the padding all its sequences share (the same scores), the
        # Bradley-Terry loss, and a step.
        loss_stats, accuracy_stats = [], []
        with timer("update"):
            for micro, mb in enumerate(batch.split(args.per_device_train_batch_size)):
                query_responses, _ = trim_padding(mb, args.query_length, pad, args.pad_multiple)
                with grad_sync(model, enabled=micro == grad_accum - 1), autocast():  # sync at the last micro-batch
                    # Each pair's two rows side by side: (b, 2, L) -> (2b, L) scores -> (b, 2), chosen then rejected.
                    rewards = model(query_responses.flatten(0, 1), pad).float().view(-1, 2)
                    loss = bradley_terry_loss(rewards)
                check_finite({"the reward model's scores": rewards.detach(), "pairs": query_responses}, nan_dump)
                (loss / grad_accum).backward()
                loss_stats.append(loss.item())
                accuracy_stats.append((rewards[:, 0] > rewards[:, 1]).float().mean().item())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        # 2. Log: metrics reduced over ranks, rank 0 writes.
        stats = {"loss/reward": float(np.mean(loss_stats)), "objective/accuracy": float(np.mean(accuracy_stats))}
        log.write(update, stats, timer, lr_now)

        # 3. Checkpoint every --save_freq updates, at the last (the trained state, whatever happens to the final save),
        # and on Ctrl-C or SIGTERM, which then stop the run.
        stop = all_reduce({"stop": len(signals)}, dist.ReduceOp.MAX, device)["stop"] > 0
        if stop or update == num_updates or (args.save_freq and update % args.save_freq == 0):
            record |= {"update": update, "world_size": world_size, "flags": flags}  # its trainer.json
            save_checkpoint(run_dir, update, model, optimizer, record, args.keep_checkpoints)
        if stop:
            break

    # The end: the zero of the score, the validation accuracy and the reward model saved; or, stopped by a signal, the
    # way to resume printed.
    if not stop:
        # Normalisation: the reference responses' mean score, over every rank's share, becomes the zero of the score.
        with torch.no_grad(), autocast():
            total = sum(
                raw_model(mb.to(device), pad).float().sum().item()
                for mb in norm_data.split(args.per_device_train_batch_size)
            )
        norm = all_reduce({"sum": total, "count": len(norm_data)}, dist.ReduceOp.SUM, device)
        raw_model.bias = hf_model.config.reward_bias = norm["sum"] / norm["count"]
        # Evaluation: accuracy on the validation pairs, with the normalised score.
        with torch.no_grad(), autocast():
            rewards = [
                raw_model(mb.to(device).flatten(0, 1), pad).float().view(-1, 2)
                for mb in eval_data.split(args.per_device_train_batch_size)
            ]
            rewards = torch.cat(rewards)  # (n, 2)
        val = all_reduce(
            {
                "eval/accuracy": (rewards[:, 0] > rewards[:, 1]).float().mean().item(),
                "eval/loss": bradley_terry_loss(rewards).item(),
                "eval/reward_chosen": rewards[:, 0].mean().item(),
                "eval/reward_rejected": rewards[:, 1].mean().item(),
            },
            device=device,
        )
        val["eval/reference_score_before_norm"] = hf_model.config.reward_bias
        if log.master:
            for key, value in val.items():
                log.writer.add_scalar(key, value, num_updates)
            log.metrics.write(json.dumps({"update": num_updates, **val}) + "\n")
            seconds = time.time() - log.start
            print("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()) + f" ({seconds:.0f} s)")
        # config.pad_token_id stays the SFT model's: the pad token load_tokenizer may add may lack an embedding row (an
        # id outside the embedding makes from_pretrained fail), and EOS as the pad id would make transformers' forward
        # read the score one token before the EOS, where this model was not trained to score.
        state = full_state_dict(hf_model) if args.fsdp and output_dir else None  # on every rank
        if log.master and output_dir:
            hf_model.save_pretrained(output_dir, state_dict=state)
            tokenizer.save_pretrained(output_dir)
            print(f"saved the reward model to {output_dir}")
    del model  # gloo's worker threads are joined at exit only once DDP's wrapper is gone (tests/test_ddp_teardown.py)
    log.end(update, signals if stop else None)


# ---------------------------------------------------------------------------------------------- FSDP
def shard_reward_model(model, bf16: bool):
    """FSDP2 as shard() does it (every transformer layer, then a root; bf16 compute with --precision bf16, gradients
    reduced in fp32), with the ScalarRewardModel as the root: its forward calls the backbone's and the head's directly,
    so it must own what lies outside the layers (embeddings, final norm, head). Rank 0's new head everywhere, as DDP."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mixed_precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for param in model.parameters():
        if param.requires_grad:
            dist.broadcast(param.data, src=0)
    for module in model.backbone.modules():
        if type(module).__name__ in model.backbone._no_split_modules:
            fully_shard(module, mp_policy=mixed_precision)
    fully_shard(model, mp_policy=mixed_precision)
    return model


# ---------------------------------------------------------------------------------------------- the flags
@dataclass
class Args:
    # data: the preference pairs trained on, and the references that set the score's zero
    preference_dataset: str = "cleanrl/summarize_from_feedback_oai_preprocessing_1704563162"
    """hub name, local directory or single data file of the preference pairs trained on"""
    chosen_column: str = "chosen"
    """the column of the preferred response"""
    rejected_column: str = "rejected"
    """the column of the other response"""
    query_dataset: str = "cleanrl/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1704563162"
    """the SFT data (prompts and reference responses, its --train_split): its references' mean score becomes the zero"""
    reference_column: str = "reference_response"
    """the reference response column of --query_dataset"""
    num_norm_examples: int | None = None
    """compute the references' mean score on the first N examples of --query_dataset (default: all)"""
    query_column: str = "query"
    """the prompt column (in both datasets)"""
    train_split: str = "train"
    """the split of --preference_dataset to train on, and of --query_dataset whose references set the zero"""
    eval_split: str = "validation"
    """the split of --preference_dataset to evaluate on"""
    query_length: int = 512
    """prompts are left-padded to this many tokens"""
    long_prompts: Literal["filter", "truncate"] = "filter"
    """prompts longer than --query_length: 'filter' drops them (as the paper's chat runs); 'truncate' keeps their end"""
    response_length: int = 53
    """responses are truncated to this many tokens, EOS included"""

    # optimisation
    num_train_epochs: int = 1
    """passes over the preference pairs"""
    batch_size: int = 64
    """preference pairs per optimizer step, over all ranks"""
    per_device_train_batch_size: int = 8
    """pairs per micro-batch on one rank; gradient accumulation fills the rest"""
    lr: float = 3e-6
    """AdamW learning rate (torch's weight decay 0.01), decayed linearly to lr / num_updates at the last update"""
    eps: float = 1e-5
    """AdamW epsilon"""

    # the trained model
    sft_model_path: str = "runs/sft_tldr_pythia-1.4b/model"
    """the model the reward model starts from (sft.py's output): hub name, save_pretrained folder, or a LoRA adapter"""

    # speed and memory
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """'bf16': weights in fp32, bf16 autocast; 'auto': bf16 on CUDA, fp32 on CPU"""
    pad_multiple: int = 64
    """a micro-batch drops the padding columns all its sequences share, keeping a multiple of this many on each side
    (the scores are the same); 0: every pair padded to --query_length + --response_length (official code)"""
    fsdp: bool = False
    """shard the reward model (backbone and head) over the ranks with FSDP2 where DDP does not fit (6.9B)"""
    cuda: bool = True
    """use CUDA when it is available"""

    # the run: logs, evaluation, checkpoints
    exp_name: str = "reward"
    """the name of this experiment (prefix of the run name)"""
    seed: int = 555134
    """seed of the experiment"""
    track: bool = False
    """log to Weights and Biases (works with WANDB_MODE=offline)"""
    wandb_project_name: str = "rebel"
    """the wandb project"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""
    run_dir: str | None = None
    """where TensorBoard events and metrics.jsonl go (default: runs/<run name>)"""
    output_dir: str | None = None
    """where the reward model and tokenizer are saved, new or empty or this run's (default: <run_dir>/model; '': not
    saved)"""
    save_freq: int = 20
    """write a checkpoint every this many updates (and at the last, and on Ctrl-C or SIGTERM); 0 = only then"""
    keep_checkpoints: int = 2
    """how many of the latest checkpoints to keep in <run_dir>/checkpoints"""
    resume: str | None = None
    """continue the run in this folder from its latest checkpoint (or start it there): pass it at every launch"""
    num_eval_prompts: int | None = None
    """measure validation accuracy on the first N pairs of the evaluation split (default: all)"""


# ============================================ below: the same in every script (tools/sync_appendix.py copies it)
# The appendix: the helpers of rebel.py's that a script calls, word for word and in rebel.py's order (fix them there;
# rebel.py holds all, some for its siblings only): first the algorithm's helpers, where a script has them; from `set-up`
# on, plumbing (the run's folder, models, data, evaluation, checkpoints, errors), which a reader can skip.


# ---------------------------------------------------------------------------------------------- the algorithm's helpers
def trim_left_padding(queries: torch.Tensor, pad_id: int, multiple: int) -> torch.Tensor:
    """Drop the left padding that every prompt has, keeping a multiple of `multiple` columns (0: keep all)."""
    longest = int((queries != pad_id).sum(1).max())
    keep = min(queries.size(1), -(-longest // multiple) * multiple) if multiple else queries.size(1)
    return queries[:, queries.size(1) - keep :]


def forward(model, query_responses: torch.Tensor, pad_id: int, logits_to_keep: torch.Tensor | None = None):
    """Forward with the pad id masked and positions counted from the first real token, as generate() counts them."""
    attention_mask = query_responses != pad_id
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    input_ids = query_responses.masked_fill(~attention_mask, 0)  # masked anyway; an added pad may have no embedding row
    keep = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}  # the LM head's (a backbone has none)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **keep)


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
def precision(choice: str, device) -> tuple:
    """--precision: whether to train in bf16 ('auto': on CUDA), the frozen weights' dtype, the forwards' autocast."""
    bf16 = choice == "bf16" or (choice == "auto" and device.type == "cuda")
    return bf16, torch.bfloat16 if bf16 else torch.float32, partial(torch.autocast, device.type, torch.bfloat16, bf16)


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
