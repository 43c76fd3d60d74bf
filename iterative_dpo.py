"""Iterative DPO (Guo et al., 2024, arXiv 2402.04792): REBEL's online baseline (arXiv 2404.16767, Algorithm 2).

Exactly REBEL's loop (two responses y, y' per prompt from pi_t, reward = RM score minus a KL penalty to the SFT
policy), but only the *sign* of the reward difference is used: the pair is labelled by sgn(r(x, y) - r(x, y')) and
the DPO loss is minimised with pi_t, the policy that sampled the batch, as the reference (Equation 20):

    -ln sigmoid( sgn(r(x, y) - r(x, y')) * beta * [ln pi_theta(y|x)/pi_t(y|x) - ln pi_theta(y'|x)/pi_t(y'|x)] )

REBEL regresses onto the reward difference itself; `diff rebel.py iterative_dpo.py` is essentially that change.

    python iterative_dpo.py --help
    python iterative_dpo.py --beta 0.05                              # one process
    torchrun --nproc_per_node 8 iterative_dpo.py --beta 0.05         # the paper's TL;DR run
"""

import json
import os
import random
import resource
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (imported before init_process_group: see the end of __main__)
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass
class Args:
    # common flags
    exp_name: str = "iterative_dpo"
    """the name of this experiment (prefix of the run name)"""
    seed: int = 555134
    """seed of the experiment; rank r samples with seed + r"""
    track: bool = False
    """log to Weights and Biases (works with WANDB_MODE=offline)"""
    wandb_project_name: str = "rebel"
    """the wandb project"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""
    cuda: bool = True
    """use CUDA when it is available"""
    run_dir: str | None = None
    """where TensorBoard events, metrics.jsonl and the evaluation tables go (default: runs/<run name>)"""
    output_dir: str = "models/iterative_dpo_tldr"
    """where the final policy and tokenizer are saved with save_pretrained ('' to skip saving)"""
    save_merged: bool = False
    """with LoRA, also save the adapter merged into the base weights, in <output_dir>/merged"""
    eval_freq: int = 100
    """evaluate every this many updates (and before the first and after the last); 0 = only at the end"""
    num_eval_prompts: int | None = None
    """evaluate on the first N prompts of the evaluation split (default: all)"""
    num_sample_rows: int = 4
    """sample completions printed and logged at each evaluation"""

    # data and models
    query_dataset: str = "cleanrl/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1704563162"
    """hub name or local path of the prompt dataset (load_dataset)"""
    query_column: str = "query"
    """dataset column holding the prompt text"""
    reference_column: str = "reference_response"
    """dataset column holding the reference response (for the evaluation table)"""
    train_split: str = "train"
    eval_split: str = "validation"
    query_length: int = 512
    """prompts are left-padded / left-truncated to this many tokens"""
    response_length: int = 53
    """tokens sampled per response (min = max new tokens, as in the paper)"""
    sft_model_path: str = "vwxyzjn/EleutherAI_pythia-2.8b-deduped__sft__tldr"
    """the SFT policy: initial policy and KL reference (hub name or save_pretrained directory)"""
    reward_model_path: str = "vwxyzjn/EleutherAI_pythia-2.8b-deduped__reward__tldr"
    """the reward model: AutoModelForSequenceClassification with one label, or the backbone+scalar-head format of
    summarize_from_feedback_details"""
    penalty_reward_value: float = -1.0
    """score given to responses that contain no EOS token"""
    temperature: float = 0.7
    """sampling temperature. The official code samples at 0.7; the paper's Table (Appendix I.1.4) lists 0.1"""
    eval_temperature: float = 0.01
    """sampling temperature for evaluation (the official code's 0.01, near greedy)"""

    # Iterative DPO
    beta: float = 0.05
    """beta of Equation (20): the strength of the implicit KL constraint to pi_t"""
    kl_coef: float = 0.05
    """coefficient of the KL penalty to the SFT policy inside the reward (which only decides the labels)"""
    noptepochs: int = 4
    """passes over each batch of pairs"""
    num_mini_batches: int = 1
    """optimizer steps per pass (each over batch_size / num_mini_batches pairs)"""

    # optimisation
    total_episodes: int | None = None
    """prompts to train on in total (default: one epoch of the train split)"""
    batch_size: int = 512
    """prompts (pairs) per update, over all ranks; stays fixed as the world size changes"""
    per_device_train_batch_size: int = 8
    """prompts per micro-batch on one rank (2x as many sequences); gradient accumulation fills the rest"""
    local_rollout_forward_batch_size: int = 32
    """prompts per no-grad generation / scoring chunk on one rank"""
    lr: float = 3e-6
    """AdamW learning rate, decayed linearly to 0"""
    eps: float = 1e-5
    """AdamW epsilon"""
    max_grad_norm: float | None = None
    """clip the gradient norm to this (default: no clipping, as in the paper)"""

    # model
    lora: bool = True
    """train LoRA adapters (reference = adapter disabled); --no-lora: full fine-tuning with a frozen reference copy"""
    lora_rank: int = 1024
    lora_alpha: int = 2048
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None
    """modules to adapt (default: peft's default for the architecture, query_key_value for Pythia, as the official
    code); 'all-linear' adapts every linear layer"""
    bf16: bool = True
    """on CUDA: frozen weights in bf16, trainable weights in fp32, compute under bf16 autocast"""


# ---------------------------------------------------------------------------------------------- helpers


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


def first_true_indices(bools: torch.Tensor) -> torch.Tensor:
    """Index of the first True in each row; the row length where there is none."""
    row_len = bools.size(-1)
    idx = torch.arange(row_len, device=bools.device)
    return torch.where(bools, idx, row_len).min(dim=-1).values


def truncate_response(responses: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """Keep each response up to and including its first EOS; pad the rest."""
    after_eos = (
        torch.arange(responses.size(1), device=responses.device) > first_true_indices(responses == eos_id)[:, None]
    )
    return responses.masked_fill(after_eos, pad_id)


def forward(model, query_responses: torch.Tensor, pad_id: int):
    """Forward with pads masked and positions counted from the first real token, as generate() does with left
    padding, so that log-probs here are those of the distribution that was sampled."""
    attention_mask = query_responses != pad_id
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    input_ids = query_responses.masked_fill(~attention_mask, 0)  # the pad id may lie outside the embedding
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)


def response_logprobs(model, query_responses, context_length, temperature, pad_id):
    """Per-token log pi(y_t | x, y_<t) of the response tokens, logits divided by the sampling temperature."""
    logits = forward(model, query_responses, pad_id).logits[:, context_length - 1 : -1].float()  # (B, T, V)
    logits = logits / temperature
    responses = query_responses[:, context_length:]
    return torch.gather(logits.log_softmax(-1), 2, responses.unsqueeze(-1)).squeeze(-1)  # (B, T)


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum(-1)


def response_mask(postprocessed_responses: torch.Tensor, pad_id: int) -> torch.Tensor:
    """True up to and including the first EOS (everything when there is none)."""
    lengths = first_true_indices(postprocessed_responses == pad_id)  # tokens kept
    return torch.arange(postprocessed_responses.size(1), device=lengths.device)[None] < lengths[:, None]


def iterative_dpo_loss(logprobs, old_logprobs, rewards, beta: float) -> torch.Tensor:
    """Equation (20). All inputs (B, 2): column 0 is y, column 1 is y' for the same prompt x.

    mean_x -ln sigmoid( sgn(r(x, y) - r(x, y')) * beta * [ln pi_theta(y|x)/pi_t(y|x) - ln pi_theta(y'|x)/pi_t(y'|x)] )

    A tie (r = r', e.g. two identical responses) carries no preference: sgn = 0 makes its term the constant ln 2 with
    zero gradient, and we mask it to 0 so that the logged loss is that of the labelled pairs (the mean still divides
    by all B pairs, so ties do not change the gradient's scale).
    """
    log_ratio = logprobs - old_logprobs  # (B, 2) ln pi_theta / pi_t
    sign = torch.sign(rewards[:, 0] - rewards[:, 1])  # (B,) +1: y preferred, -1: y' preferred, 0: tie
    logits = sign * beta * (log_ratio[:, 0] - log_ratio[:, 1])  # (B,)
    return -(F.logsigmoid(logits) * (sign != 0)).mean()


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


def load_reward_model(path: str, dtype: torch.dtype) -> ScalarRewardModel:
    """Load an AutoModelForSequenceClassification with one label, or summarize_from_feedback_details' format
    (config.json with `base_config`; weights `lm_backbone.*` and `scalar_head.*`)."""
    from huggingface_hub import snapshot_download
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    local = path if os.path.isdir(path) else snapshot_download(path)
    config_file = os.path.join(local, "config.json")
    if not os.path.isfile(config_file):
        raise BadInput(f"reward model: no config.json in {local}; pass a save_pretrained directory")
    with open(config_file) as f:
        config = json.load(f)
    if "base_config" in config:  # https://github.com/vwxyzjn/summarize_from_feedback_details (ScalarModel)
        from safetensors.torch import load_file

        files = [n for n in os.listdir(local) if n.endswith((".safetensors", ".bin"))]
        if not files:
            raise BadInput(f"reward model: no weights (*.safetensors or *.bin) in {local}")
        state = {}
        for name in files:
            fp = os.path.join(local, name)
            state.update(load_file(fp) if name.endswith(".safetensors") else torch.load(fp, map_location="cpu"))
        base_config = AutoConfig.for_model(**config["base_config"])
        backbone = AutoModel.from_config(base_config, torch_dtype=dtype)
        backbone.load_state_dict({k.removeprefix("lm_backbone."): v for k, v in state.items() if k.startswith("lm_")})
        head = nn.Linear(config["hidden_size"], 1)
        head.load_state_dict({k.removeprefix("scalar_head."): v for k, v in state.items() if k.startswith("scalar_")})
        return ScalarRewardModel(backbone, head.to(dtype), config.get("bias", 0.0))
    model = AutoModelForSequenceClassification.from_pretrained(local, torch_dtype=dtype)
    if model.config.num_labels != 1:
        raise BadInput(f"reward model {path} has {model.config.num_labels} labels; a reward model needs exactly 1")
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if not isinstance(head, nn.Linear):
        raise BadInput(f"reward model {path}: cannot find a linear `score` head on {type(model).__name__}")
    return ScalarRewardModel(model.base_model, head)


def load_prompts(args: Args, split: str, tokenizer):
    """Tokenise the prompt column (left padding / truncation) and the reference column (EOS appended)."""
    from datasets import load_dataset

    try:
        dataset = load_dataset(args.query_dataset, split=split)
    except ValueError as e:
        raise BadInput(f"cannot load split '{split}' of dataset '{args.query_dataset}': {e}") from e
    for column in (args.query_column, args.reference_column):
        if column not in dataset.column_names:
            raise BadInput(
                f"dataset '{args.query_dataset}' ({split}) has no column '{column}'; it has {dataset.column_names}. "
                f"Pass --query_column / --reference_column."
            )
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    queries = tokenizer(
        list(dataset[args.query_column]), padding="max_length", max_length=args.query_length, truncation=True
    ).input_ids
    references = []
    for text in dataset[args.reference_column]:
        ids = tokenizer(text.removesuffix(tokenizer.eos_token), add_special_tokens=False).input_ids
        ids = ids[: args.response_length - 1] + [tokenizer.eos_token_id]
        references.append(ids + [tokenizer.pad_token_id] * (args.response_length - len(ids)))
    return dataset, torch.tensor(queries), torch.tensor(references)


def check_tokenizer(tokenizer, path: str):
    if tokenizer.eos_token_id is None:
        raise BadInput(f"the tokenizer of {path} has no EOS token; responses are truncated at EOS, so set one")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise BadInput(
            f"the tokenizer of {path} has no pad token distinct from EOS (pad={tokenizer.pad_token!r}). Add one, "
            "e.g. tokenizer.add_special_tokens({'pad_token': '[PAD]'}) and save it, as sft.py does."
        )


def prompt_batches(num_prompts: int, batch_size: int, rank: int, world_size: int, seed: int):
    """Endless global batches of prompt indices (same shuffle on every rank); each rank takes its share."""
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(num_prompts)
        for start in range(0, num_prompts - batch_size + 1, batch_size):
            yield perm[start : start + batch_size][rank::world_size]


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


@torch.no_grad()
def generate(model, queries, generation_config, pad_id):
    """Sample exactly response_length tokens per query; EOS does not stop sampling (we truncate after it)."""
    attention_mask = queries != pad_id
    output = model.generate(
        input_ids=queries.masked_fill(~attention_mask, 0),
        attention_mask=attention_mask,
        generation_config=generation_config,
    )
    return torch.cat((queries, output[:, queries.size(1) :]), 1)


@torch.no_grad()
def rollout(policy, ref_policy, reward_model, queries, args, generation_config, tokenizer, autocast, timer, n=2):
    """Sample n responses per query and score them. Returns (N, n, ...) tensors, chunked to bound memory."""
    pad, eos, out = tokenizer.pad_token_id, tokenizer.eos_token_id, []
    ctx = queries.size(1)
    for i in range(0, queries.size(0), args.local_rollout_forward_batch_size):
        query = queries[i : i + args.local_rollout_forward_batch_size].repeat_interleave(n, 0)  # pairs adjacent
        with timer("generation"), autocast():
            query_response = generate(policy, query, generation_config, pad)
        # Response processing 1: truncate after the first EOS, pad the rest.
        response = truncate_response(query_response[:, ctx:], eos, pad)
        query_response = torch.cat((query, response), 1)
        mask = response_mask(response, pad)
        # Response processing 2: summed log-probs of the sampled distribution, under pi_t and the SFT reference.
        with timer("logprob"), autocast():
            logprob = masked_sum(response_logprobs(policy, query_response, ctx, args.temperature, pad), mask)
            with ref_policy() as ref:
                ref_logprob = masked_sum(response_logprobs(ref, query_response, ctx, args.temperature, pad), mask)
        # Response processing 3: reward model score; responses without EOS get the fixed penalty.
        with timer("reward"), autocast():
            score = reward_model(query_response, pad).float()
        has_eos = (response == eos).any(1)
        score = torch.where(has_eos, score, torch.full_like(score, args.penalty_reward_value))
        out.append((query_response, mask, logprob, ref_logprob, score, has_eos))
    return [torch.cat(t).unflatten(0, (-1, n)) for t in zip(*out)]


class Timer:
    """Wall time per phase, synchronising CUDA so that asynchronous kernels are charged to their phase."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, {}

    @contextmanager
    def __call__(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


@torch.no_grad()
def evaluate(
    policy, ref_policy, reward_model, queries, references, texts, args, generation_config, tokenizer, autocast
):
    """RM score, KL to the reference, length and EOS rate on this rank's share of evaluation prompts."""
    pad, ctx, rows = tokenizer.pad_token_id, queries.size(1), []
    timer = Timer(queries.device)
    query_response, mask, logprob, ref_logprob, score, has_eos = (
        t[:, 0]
        for t in rollout(
            policy, ref_policy, reward_model, queries, args, generation_config, tokenizer, autocast, timer, n=1
        )
    )
    with autocast():
        reference_score = torch.cat([
            reward_model(torch.cat((q, r), 1), pad).float()
            for q, r in zip(queries.split(args.local_rollout_forward_batch_size), references.split(args.local_rollout_forward_batch_size))
        ])  # fmt: skip
    responses = tokenizer.batch_decode(query_response[:, ctx:], skip_special_tokens=True)
    kl = logprob - ref_logprob
    for i, (query, reference) in enumerate(texts):
        rows.append({
            "query": query, "postprocessed_response": responses[i], "reference_response": reference,
            "score": score[i].item(), "reference_score": reference_score[i].item(), "kl": kl[i].item(),
            "response_length": mask[i].sum().item(), "has_eos": has_eos[i].item(),
        })  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------- main

if __name__ == "__main__":
    sys.excepthook = print_bad_input  # bad input: one clear line instead of a traceback
    import pandas as pd
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    args = tyro.cli(Args, use_underscores=True)
    if args.beta <= 0:
        raise BadInput(f"--beta must be > 0 (it scales the log-ratios in Equation 20); got {args.beta}")

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
    mini_batch_size = exact_div(local_batch_size, args.num_mini_batches, "per-rank batch over --num_mini_batches")
    grad_accum = exact_div(
        mini_batch_size, args.per_device_train_batch_size, "mini-batch over --per_device_train_batch_size"
    )
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)  # different sampling noise on every rank
    bf16 = use_cuda and args.bf16
    dtype = torch.bfloat16 if bf16 else torch.float32

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()

    # Data: every rank tokenises the whole split and takes its own prompts from the shared shuffle.
    tokenizer = AutoTokenizer.from_pretrained(args.sft_model_path)
    check_tokenizer(tokenizer, args.sft_model_path)
    train_set, train_queries, _ = load_prompts(args, args.train_split, tokenizer)
    eval_set, eval_queries, eval_references = load_prompts(args, args.eval_split, tokenizer)
    n_eval = min(args.num_eval_prompts or len(eval_set), len(eval_set))
    eval_idx = list(range(n_eval))[rank::world_size]
    eval_texts = [(eval_set[i][args.query_column], eval_set[i][args.reference_column]) for i in eval_idx]
    total_episodes = args.total_episodes or len(train_set)
    num_updates = total_episodes // args.batch_size
    if num_updates < 1:
        raise BadInput(f"--total_episodes {total_episodes} is smaller than one --batch_size {args.batch_size}")
    batches = prompt_batches(len(train_set), args.batch_size, rank, world_size, args.seed)

    # Models: dropout is off everywhere because every model stays in eval mode (gradients do not need train mode).
    policy = AutoModelForCausalLM.from_pretrained(
        args.sft_model_path, torch_dtype=dtype if args.lora else torch.float32
    )
    policy.generation_config.eos_token_id = None  # sample the full length; truncation after EOS happens in rollout()
    if args.lora:
        from peft import LoraConfig, get_peft_model

        lora_config = LoraConfig(
            r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, bias="none",
            target_modules=args.lora_target_modules[0] if args.lora_target_modules == ["all-linear"] else args.lora_target_modules,
            task_type="CAUSAL_LM",
        )  # fmt: skip
        policy = get_peft_model(policy, lora_config)  # peft keeps the adapters in fp32: the master weights
        peft_model = policy

        @contextmanager
        def ref_policy():  # the SFT policy is the base model with the adapter switched off
            with peft_model.disable_adapter():
                yield peft_model
    else:
        ref_model = AutoModelForCausalLM.from_pretrained(args.sft_model_path, torch_dtype=dtype).to(device).eval()
        ref_model.requires_grad_(False)
        ref_policy = lambda: nullcontext(ref_model)  # noqa: E731
    policy.to(device).eval()
    reward_model = load_reward_model(args.reward_model_path, dtype).to(device).eval()
    reward_model.requires_grad_(False)
    raw_policy = policy
    if ddp:
        policy = DDP(policy, device_ids=[local_rank] if use_cuda else None)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=args.lr, eps=args.eps)

    def sampling_config(temperature):
        return GenerationConfig(
            max_new_tokens=args.response_length, min_new_tokens=args.response_length, do_sample=True,
            temperature=temperature, top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip

    generation_config, eval_generation_config = (
        sampling_config(args.temperature),
        sampling_config(args.eval_temperature),
    )

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
        print(f"run {run_name}: {num_updates} updates of {args.batch_size} prompts, world size {world_size}, "
              f"{grad_accum} micro-batches per step; logs in {run_dir}")  # fmt: skip

    def run_evaluation(update: int):
        rows = evaluate(raw_policy, ref_policy, reward_model, eval_queries[eval_idx].to(device),
                        eval_references[eval_idx].to(device), eval_texts, args, eval_generation_config, tokenizer, autocast)  # fmt: skip
        gathered = [None] * world_size
        if ddp:
            dist.all_gather_object(gathered, rows)
        else:
            gathered = [rows]
        if master:
            df = pd.DataFrame([r for rs in gathered for r in rs])
            df.to_csv(os.path.join(run_dir, f"eval_{update:06d}.csv"), index=False)
            stats = {"eval/score": df.score.mean(), "eval/reference_score": df.reference_score.mean(), "eval/kl": df.kl.mean(),
                     "eval/response_length": df.response_length.mean(), "eval/eos_rate": df.has_eos.mean()}  # fmt: skip
            for k, v in stats.items():
                writer.add_scalar(k, v, update)
            samples = df.head(args.num_sample_rows)[["query", "postprocessed_response", "score"]]
            writer.add_text("samples", samples.to_string(), update)
            if args.track:
                wandb.log({"samples": wandb.Table(dataframe=df.head(args.num_sample_rows * 4))}, step=update)
            tqdm.write(f"eval @ {update}: " + ", ".join(f"{k} {v:.3f}" for k, v in stats.items()))
            for _, row in samples.iterrows():
                tqdm.write(f"  {row.query[-80:]!r} -> {row.postprocessed_response!r} ({row.score:.2f})")
            return stats

    # The loop: rollout -> reward -> label by the sign -> DPO loss against pi_t -> log.
    start = time.time()
    run_evaluation(0)
    for update in tqdm(range(1, num_updates + 1), disable=not master, desc="updates"):
        timer = Timer(device)
        if use_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        lr_now = (1.0 - (update - 1.0) / num_updates) * args.lr
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        queries = train_queries[next(batches)].to(device)  # (local_batch_size, query_length)

        # 1. Rollout: two responses per prompt from pi_t, scored by the reward model.
        query_responses, masks, logprobs, ref_logprobs, scores, has_eos = rollout(
            raw_policy, ref_policy, reward_model, queries, args, generation_config, tokenizer, autocast, timer
        )  # each (B, 2, ...)
        # 2. Reward: r(x, y) = RM score - kl_coef * (log pi_t(y|x) - log pi_ref(y|x)).
        kl = logprobs - ref_logprobs  # (B, 2)
        rewards = scores - args.kl_coef * kl  # (B, 2)

        # 3. DPO on the labelled pairs: noptepochs passes, pairs kept together, gradient accumulation.
        context_length = queries.size(1)
        loss_stats, approxkl_stats = [], []
        with timer("update"):
            for _epoch in range(args.noptepochs):
                perm = torch.randperm(local_batch_size, device=device)
                for mb_start in range(0, local_batch_size, mini_batch_size):
                    for micro, mc_start in enumerate(
                        range(mb_start, mb_start + mini_batch_size, args.per_device_train_batch_size)
                    ):
                        idx = perm[mc_start : mc_start + args.per_device_train_batch_size]
                        sync = micro == grad_accum - 1
                        with nullcontext() if sync or not ddp else policy.no_sync(), autocast():
                            new_logprobs = masked_sum(
                                response_logprobs(policy, query_responses[idx].flatten(0, 1), context_length,
                                                  args.temperature, tokenizer.pad_token_id),
                                masks[idx].flatten(0, 1),
                            ).unflatten(0, (-1, 2))  # fmt: skip
                            loss = iterative_dpo_loss(new_logprobs, logprobs[idx], rewards[idx], args.beta)
                            (loss / grad_accum).backward()
                        loss_stats.append(loss.item())
                        approxkl_stats.append(0.5 * (new_logprobs - logprobs[idx]).pow(2).mean().item())
                    if args.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

        # 4. Log: metrics reduced over ranks, rank 0 writes.
        n_micro = len(loss_stats) // args.noptepochs
        stats = all_reduce({
            "objective/scores": scores.mean().item(),
            "objective/kl": kl.mean().item(),
            "objective/rlhf_reward": rewards.mean().item(),
            "objective/tie_rate": (rewards[:, 0] == rewards[:, 1]).float().mean().item(),
            "objective/entropy": -(logprobs.sum() / masks.sum()).item(),
            "objective/response_length": masks.sum(-1).float().mean().item(),
            "objective/eos_rate": has_eos.float().mean().item(),
            "loss/policy": float(np.mean(loss_stats)),
            "loss/policy_first_epoch": float(np.mean(loss_stats[:n_micro])),
            "loss/policy_last_epoch": float(np.mean(loss_stats[-n_micro:])),
            "policy/approxkl": float(np.mean(approxkl_stats)),
        }, device=device)  # fmt: skip
        timer.times["total"] = sum(timer.times.values())
        stats.update(all_reduce({f"time/{k}": v for k, v in timer.times.items()}, dist.ReduceOp.MAX, device))
        stats.update(all_reduce({"memory/peak_gb": peak_memory_gb(device)}, dist.ReduceOp.MAX, device))
        if master:
            stats.update({"policy/lr": lr_now, "episode": update * args.batch_size,
                          "time/episodes_per_second": update * args.batch_size / (time.time() - start)})  # fmt: skip
            for k, v in stats.items():
                writer.add_scalar(k, v, update)
            metrics_file.write(json.dumps({"update": update, **stats}) + "\n")
            metrics_file.flush()
        if args.eval_freq and update % args.eval_freq == 0 and update != num_updates:
            run_evaluation(update)

    run_evaluation(num_updates)

    # DDP check: every rank must hold the same weights; a silent divergence would invalidate the run.
    if ddp:
        max_diff = 0.0
        for p in raw_policy.parameters():
            if p.requires_grad:
                q = p.detach().clone()
                dist.broadcast(q, 0)
                max_diff = max(max_diff, (p.detach() - q).abs().max().item())
        max_diff = all_reduce({"d": max_diff}, dist.ReduceOp.MAX, device)["d"]
        if master:
            metrics_file.write(json.dumps({"ddp/max_param_diff_across_ranks": max_diff}) + "\n")
            if max_diff > 0:
                raise RuntimeError(f"DDP ranks diverged: max parameter difference {max_diff}")

    if master and args.output_dir:
        raw_policy.save_pretrained(args.output_dir)
        tokenizer.save_pretrained(args.output_dir)
        if args.lora and args.save_merged:
            raw_policy.merge_and_unload().save_pretrained(os.path.join(args.output_dir, "merged"))
            tokenizer.save_pretrained(os.path.join(args.output_dir, "merged"))
        print(f"saved the policy to {args.output_dir}")
    if master:
        metrics_file.close()
        writer.close()
        if args.track:
            wandb.finish()
    if ddp:
        # Destroying the group joins gloo's worker threads; one still running at exit can abort the process ("terminate
        # called without an active exception"). For that the DDP wrapper must be gone, and torch.distributed.nn must have
        # been imported before init_process_group: imported later (by DDP), its functions keep the group as a default.
        del policy
        dist.destroy_process_group()
