"""Bradley-Terry reward model on TL;DR preference pairs: the second stage of the paper's pipeline (Appendix I.1.2).

The SFT model with a one-output linear head (AutoModelForSequenceClassification, num_labels=1) scores a
(post, summary) at the summary's EOS token and is trained to minimise -log sigmoid(r(x, y_chosen) - r(x, y_rejected)).
Saved with save_pretrained, so rebel.py (and any hub tool) loads it as a sequence classifier.

    python reward.py --help
    torchrun --nproc_per_node 8 reward.py                    # Pythia 1.4B, from the SFT model
"""

import json
import os
import random
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (imported before init_process_group: see the end of __main__)
import torch.nn as nn
import tyro
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass
class Args:
    # common flags
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
    cuda: bool = True
    """use CUDA when it is available"""
    run_dir: str | None = None
    """where TensorBoard events and metrics.jsonl go (default: runs/<run name>)"""
    output_dir: str = "models/rm_tldr_pythia-1.4b"
    """where the reward model and tokenizer are saved with save_pretrained ('' to skip saving)"""
    num_eval_prompts: int | None = None
    """measure validation accuracy on the first N pairs of the evaluation split (default: all)"""

    # data and model
    query_dataset: str = "cleanrl/summarize_from_feedback_oai_preprocessing_1704563162"
    """hub name or local path of the preference dataset (load_dataset)"""
    query_column: str = "query"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    train_split: str = "train"
    eval_split: str = "validation"
    query_length: int = 512
    """prompts are left-padded / left-truncated to this many tokens"""
    response_length: int = 53
    """responses are truncated to this many tokens, EOS included"""
    sft_model_path: str = "models/sft_tldr_pythia-1.4b"
    """the model the reward model starts from (sft.py's output; hub name or save_pretrained directory)"""

    # optimisation
    num_train_epochs: int = 1
    batch_size: int = 64
    """preference pairs per optimizer step, over all ranks"""
    per_device_train_batch_size: int = 8
    """pairs per micro-batch on one rank; gradient accumulation fills the rest"""
    lr: float = 3e-6
    """AdamW learning rate, decayed linearly to 0"""
    eps: float = 1e-5
    """AdamW epsilon"""
    bf16: bool = True
    """on CUDA: fp32 weights, compute under bf16 autocast"""


class BadInput(ValueError):
    """A problem with the flags, the data or a checkpoint: reported as one line that names the fix, no traceback."""


def print_bad_input(kind, error, tb) -> None:
    """sys.excepthook: a BadInput prints its message alone; any other error keeps its full traceback."""
    if issubclass(kind, BadInput):
        print(f"error: {error}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, error, tb)


def exact_div(a: int, b: int, what: str) -> int:
    if b <= 0 or a % b != 0:
        raise BadInput(f"{what}: {a} is not divisible by {b}. Change the batch flags so that it divides.")
    return a // b


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def all_reduce(values: dict, op=None, device=None) -> dict:
    """Mean (or another op) of scalar metrics over ranks, so that rank 0 logs the global value."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    if op is None:
        t /= dist.get_world_size()
    return dict(zip(values, t.tolist()))


class ScalarRewardModel(nn.Module):
    """A transformer backbone and a linear head read at the last non-pad token."""

    def __init__(self, backbone: nn.Module, head: nn.Module, bias: float = 0.0):
        super().__init__()
        self.backbone, self.head, self.bias = backbone, head, bias

    def forward(self, query_responses: torch.Tensor, pad_id: int) -> torch.Tensor:
        attention_mask = query_responses != pad_id
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        hidden = self.backbone(
            input_ids=query_responses.masked_fill(~attention_mask, 0),
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state  # (B, L, H)
        # The last non-pad token: queries are left-padded and responses right-padded, so it is the rightmost one.
        last = (attention_mask * torch.arange(attention_mask.size(1), device=attention_mask.device)).argmax(1)
        hidden = hidden[torch.arange(hidden.size(0), device=hidden.device), last]  # (B, H)
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1) - self.bias  # (B,)


def tokenize_preferences(dataset, args: Args, tokenizer):
    """(N, 2, query_length + response_length): chosen then rejected, each query + response + EOS."""
    for column in (args.query_column, args.chosen_column, args.rejected_column):
        if column not in dataset.column_names:
            raise BadInput(
                f"dataset '{args.query_dataset}' has no column '{column}'; it has {dataset.column_names}. "
                f"Pass --query_column / --chosen_column / --rejected_column."
            )
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    queries = torch.tensor(tokenizer(
        list(dataset[args.query_column]), padding="max_length", max_length=args.query_length, truncation=True
    ).input_ids)  # fmt: skip

    def responses(column):
        out = []
        for text in dataset[column]:
            ids = tokenizer(text.removesuffix(tokenizer.eos_token), add_special_tokens=False).input_ids
            ids = ids[: args.response_length - 1] + [tokenizer.eos_token_id]
            out.append(ids + [tokenizer.pad_token_id] * (args.response_length - len(ids)))
        return torch.cat((queries, torch.tensor(out)), 1)

    return torch.stack((responses(args.chosen_column), responses(args.rejected_column)), 1)


def bradley_terry_loss(rewards: torch.Tensor) -> torch.Tensor:
    """rewards (B, 2), chosen then rejected: -log sigmoid(r_chosen - r_rejected), the Bradley-Terry likelihood."""
    return -nn.functional.logsigmoid(rewards[:, 0] - rewards[:, 1]).mean()


if __name__ == "__main__":
    sys.excepthook = print_bad_input  # bad input: one clear line instead of a traceback
    from datasets import load_dataset
    from tqdm import tqdm
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    args = tyro.cli(Args, use_underscores=True)

    # DDP set-up: the same file runs under `python` and `torchrun`.
    ddp = int(os.environ.get("RANK", -1)) != -1
    use_cuda = args.cuda and torch.cuda.is_available()
    if ddp:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        rank, local_rank, world_size = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
    else:
        rank, local_rank, world_size = 0, 0, 1
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    master = rank == 0
    local_batch_size = exact_div(args.batch_size, world_size, "--batch_size over the world size")
    grad_accum = exact_div(
        local_batch_size, args.per_device_train_batch_size, "per-rank batch over --per_device_train_batch_size"
    )
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed)  # the new head must start the same on every rank
    bf16 = use_cuda and args.bf16

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()

    # Data
    tokenizer = AutoTokenizer.from_pretrained(args.sft_model_path)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise BadInput(f"the tokenizer of {args.sft_model_path} has no pad token distinct from EOS; train it with "
                         "sft.py (which adds '[PAD]') or add one with tokenizer.add_special_tokens")  # fmt: skip
    train_data = tokenize_preferences(load_dataset(args.query_dataset, split=args.train_split), args, tokenizer)
    eval_data = tokenize_preferences(load_dataset(args.query_dataset, split=args.eval_split), args, tokenizer)
    eval_data = eval_data[: args.num_eval_prompts][rank::world_size]
    steps_per_epoch = len(train_data) // args.batch_size
    num_updates = steps_per_epoch * args.num_train_epochs
    if num_updates < 1:
        raise BadInput(f"the train split has {len(train_data)} pairs, fewer than one --batch_size {args.batch_size}")

    # Model: the SFT backbone and a fresh scalar head; eval mode keeps dropout off.
    hf_model = AutoModelForSequenceClassification.from_pretrained(
        args.sft_model_path, num_labels=1, dtype=torch.float32
    )
    hf_model.config.pad_token_id = tokenizer.pad_token_id
    model = ScalarRewardModel(hf_model.base_model, hf_model.score).to(device).eval()
    raw_model = model
    if ddp:
        model = DDP(model, device_ids=[local_rank] if use_cuda else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, eps=args.eps)

    # Logging: only rank 0 writes.
    run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = args.run_dir or os.path.join("runs", run_name)
    if master:
        from torch.utils.tensorboard import SummaryWriter

        if args.track:
            import wandb

            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=asdict(args), name=run_name,
                       sync_tensorboard=True, save_code=True)  # fmt: skip
        os.makedirs(run_dir, exist_ok=True)
        writer = SummaryWriter(run_dir)
        writer.add_text(
            "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
        )
        metrics_file = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        print(
            f"run {run_name}: {num_updates} steps of {args.batch_size} pairs, world size {world_size}; logs in {run_dir}"
        )

    @torch.no_grad()
    def validation() -> dict:
        rewards = torch.cat([raw_model(b.to(device).flatten(0, 1), tokenizer.pad_token_id).view(-1, 2)
                             for b in eval_data.split(args.per_device_train_batch_size)])  # fmt: skip
        return all_reduce({
            "eval/accuracy": (rewards[:, 0] > rewards[:, 1]).float().mean().item(),
            "eval/loss": bradley_terry_loss(rewards).item(),
            "eval/reward_chosen": rewards[:, 0].mean().item(),
            "eval/reward_rejected": rewards[:, 1].mean().item(),
        }, device=device)  # fmt: skip

    # The loop
    start = time.time()
    rng = np.random.default_rng(args.seed)
    update = 0
    for epoch in range(args.num_train_epochs):
        perm = rng.permutation(len(train_data))
        for step in tqdm(range(steps_per_epoch), disable=not master, desc=f"epoch {epoch}"):
            update += 1
            lr_now = (1.0 - (update - 1.0) / num_updates) * args.lr
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            batch = train_data[perm[step * args.batch_size : (step + 1) * args.batch_size][rank::world_size]].to(device)
            losses, accuracies = [], []
            for micro, mb in enumerate(batch.split(args.per_device_train_batch_size)):
                with nullcontext() if micro == grad_accum - 1 or not ddp else model.no_sync(), autocast():
                    rewards = model(mb.flatten(0, 1), tokenizer.pad_token_id).view(-1, 2).float()  # (B, 2)
                    loss = bradley_terry_loss(rewards)
                    (loss / grad_accum).backward()
                losses.append(loss.item())
                accuracies.append((rewards[:, 0] > rewards[:, 1]).float().mean().item())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stats = all_reduce(
                {"loss/reward": float(np.mean(losses)), "objective/accuracy": float(np.mean(accuracies))}, device=device
            )
            stats.update(all_reduce({"memory/peak_gb": peak_memory_gb(device)}, dist.ReduceOp.MAX, device))
            if master:
                stats.update(
                    {"policy/lr": lr_now, "episode": update * args.batch_size, "time/elapsed": time.time() - start}
                )
                for k, v in stats.items():
                    writer.add_scalar(k, v, update)
                metrics_file.write(json.dumps({"update": update, **stats}) + "\n")

    # DDP check: every rank must hold the same weights; a silent divergence would invalidate the run.
    if ddp:
        max_diff = 0.0
        for p in raw_model.parameters():
            if p.requires_grad:
                q = p.detach().clone()
                dist.broadcast(q, 0)
                max_diff = max(max_diff, (p.detach() - q).abs().max().item())
        max_diff = all_reduce({"d": max_diff}, dist.ReduceOp.MAX, device)["d"]
        if master:
            metrics_file.write(json.dumps({"ddp/max_param_diff_across_ranks": max_diff}) + "\n")
            if max_diff > 0:
                raise RuntimeError(f"DDP ranks diverged: max parameter difference {max_diff}")

    val = validation()
    if master:
        for k, v in val.items():
            writer.add_scalar(k, v, update)
        metrics_file.write(json.dumps({"update": update, **val}) + "\n")
        print("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()) + f" ({time.time() - start:.0f} s)")
        if args.output_dir:
            hf_model.save_pretrained(args.output_dir)
            tokenizer.padding_side = "right"
            tokenizer.save_pretrained(args.output_dir)
            print(f"saved the reward model to {args.output_dir}")
        metrics_file.close()
        writer.close()
        if args.track:
            wandb.finish()
    if ddp:
        # Destroying the group joins gloo's worker threads; one still running at exit can abort the process ("terminate
        # called without an active exception"). For that the DDP wrapper must be gone, and torch.distributed.nn must have
        # been imported before init_process_group: imported later (by DDP), its functions keep the group as a default.
        del model
        dist.destroy_process_group()
