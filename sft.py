"""Supervised fine-tuning on TL;DR reference summaries: the first stage of the paper's pipeline (Appendix I.1.2).

Next-token cross-entropy on the reference response given the post (the prompt tokens are not trained on).
The result is saved with save_pretrained, with a pad token added to the tokenizer, so that reward.py and
rebel.py load it directly.

    python sft.py --help
    torchrun --nproc_per_node 8 sft.py                       # Pythia 1.4B, the paper's SFT model
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
import tyro
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass
class Args:
    # common flags
    exp_name: str = "sft"
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
    output_dir: str = "models/sft_tldr_pythia-1.4b"
    """where the model and tokenizer are saved with save_pretrained ('' to skip saving)"""
    num_eval_prompts: int | None = None
    """compute the validation loss on the first N examples of the evaluation split (default: all)"""

    # data and model
    query_dataset: str = "cleanrl/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1704563162"
    """hub name or local path of the dataset (load_dataset)"""
    query_column: str = "query"
    """dataset column holding the prompt text"""
    reference_column: str = "reference_response"
    """dataset column holding the target response"""
    train_split: str = "train"
    eval_split: str = "validation"
    query_length: int = 512
    """prompts are left-padded / left-truncated to this many tokens"""
    response_length: int = 53
    """target responses are truncated to this many tokens, EOS included"""
    base_model: str = "EleutherAI/pythia-1.4b-deduped"
    """the pretrained model to fine-tune (hub name or save_pretrained directory)"""

    # optimisation
    num_train_epochs: int = 1
    batch_size: int = 64
    """examples per optimizer step, over all ranks"""
    per_device_train_batch_size: int = 8
    """examples per micro-batch on one rank; gradient accumulation fills the rest"""
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


def ensure_pad_token(tokenizer):
    """Pythia has no pad token. Add one as summarize_from_feedback_details does; the embedding is not resized
    because pad positions are masked and their input ids replaced by 0 before every forward pass."""
    if tokenizer.eos_token_id is None:
        raise BadInput("the base model's tokenizer has no EOS token; responses must end with one, so set it")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})


def tokenize_pairs(dataset, args: Args, tokenizer):
    """query (left-padded to query_length) + response (EOS appended, right-padded to response_length)."""
    for column in (args.query_column, args.reference_column):
        if column not in dataset.column_names:
            raise BadInput(
                f"dataset '{args.query_dataset}' has no column '{column}'; it has {dataset.column_names}. "
                f"Pass --query_column / --reference_column."
            )
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    queries = tokenizer(
        list(dataset[args.query_column]), padding="max_length", max_length=args.query_length, truncation=True
    ).input_ids
    responses = []
    for text in dataset[args.reference_column]:
        ids = tokenizer(text.removesuffix(tokenizer.eos_token), add_special_tokens=False).input_ids
        ids = ids[: args.response_length - 1] + [tokenizer.eos_token_id]
        responses.append(ids + [tokenizer.pad_token_id] * (args.response_length - len(ids)))
    return torch.cat((torch.tensor(queries), torch.tensor(responses)), 1)  # (N, query_length + response_length)


def sft_loss(model, query_responses: torch.Tensor, context_length: int, pad_id: int) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens (EOS included, pads excluded)."""
    attention_mask = query_responses != pad_id
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    logits = (
        model(
            input_ids=query_responses.masked_fill(~attention_mask, 0),
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        .logits[:, context_length - 1 : -1]
        .float()
    )  # (B, T, V) fmt: skip
    labels = query_responses[:, context_length:].masked_fill(~attention_mask[:, context_length:], -100)  # (B, T)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


if __name__ == "__main__":
    sys.excepthook = print_bad_input  # bad input: one clear line instead of a traceback
    from datasets import load_dataset
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    torch.manual_seed(args.seed + rank)
    bf16 = use_cuda and args.bf16

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()

    # Data
    tokenizer = AutoTokenizer.from_pretrained(args.base_model)
    ensure_pad_token(tokenizer)
    train_data = tokenize_pairs(load_dataset(args.query_dataset, split=args.train_split), args, tokenizer)
    eval_data = tokenize_pairs(load_dataset(args.query_dataset, split=args.eval_split), args, tokenizer)
    eval_data = eval_data[: args.num_eval_prompts][rank::world_size]
    steps_per_epoch = len(train_data) // args.batch_size
    num_updates = steps_per_epoch * args.num_train_epochs
    if num_updates < 1:
        raise BadInput(f"the train split has {len(train_data)} examples, fewer than one --batch_size {args.batch_size}")

    # Model: eval mode keeps dropout off, as in the paper's models.
    model = AutoModelForCausalLM.from_pretrained(args.base_model, dtype=torch.float32).to(device).eval()
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
            f"run {run_name}: {num_updates} steps of {args.batch_size} examples, world size {world_size}; logs in {run_dir}"
        )

    @torch.no_grad()
    def validation_loss() -> float:
        losses = [sft_loss(raw_model, b.to(device), args.query_length, tokenizer.pad_token_id).item()
                  for b in eval_data.split(args.per_device_train_batch_size)]  # fmt: skip
        return all_reduce({"l": float(np.mean(losses))}, device=device)["l"]

    # The loop: one pass over the shuffled train split (same shuffle on every rank; each takes its share).
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
            losses = []
            for micro, mb in enumerate(batch.split(args.per_device_train_batch_size)):
                with nullcontext() if micro == grad_accum - 1 or not ddp else model.no_sync(), autocast():
                    loss = sft_loss(model, mb, args.query_length, tokenizer.pad_token_id)
                    (loss / grad_accum).backward()
                losses.append(loss.item())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stats = all_reduce({"loss/sft": float(np.mean(losses))}, device=device)
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

    val = validation_loss()
    if master:
        writer.add_scalar("eval/loss", val, update)
        metrics_file.write(json.dumps({"update": update, "eval/loss": val}) + "\n")
        print(f"validation loss {val:.4f} after {update} steps ({time.time() - start:.0f} s)")
        if args.output_dir:
            raw_model.save_pretrained(args.output_dir)
            tokenizer.padding_side = "right"
            tokenizer.save_pretrained(args.output_dir)
            print(f"saved the SFT model to {args.output_dir}")
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
