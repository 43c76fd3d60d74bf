"""Runtime and peak-memory benchmark of the algorithm scripts under one shared configuration (the paper's Figure 2).

The paper measures 2.8B models on A6000 GPUs "for a batch of 512 prompts", averaged over 100 batches
(Section 4.1, Runtime & Memory Analysis). This tool runs each script in `--scripts` for `--updates` updates
with the same model, lengths, batch and world size, drops the first `--warmup` updates (CUDA context,
allocator and kernel autotuning make them slow), and reports the mean time per phase and the peak memory.

It reads what every script writes to `{run_dir}/metrics.jsonl` (one object per update, from rank 0):
`update`, `time/generation`, `time/reward`, `time/logprob`, `time/update`, `time/total` in seconds, already
max-reduced over ranks, and `memory/peak_gb` (GiB, max over ranks, reset every update; peak RSS on CPU).
A phase a method does not have (DPO generates nothing) is absent or 0.

    python -m eval.benchmark --scripts rebel.py ppo.py "rloo.py --rloo_k 4" "rloo.py --reinforce" dpo.py \
        --nproc_per_node 8 --updates 12 --warmup 2 --sft_model_path ... --reward_model_path ... --query_dataset ... \
        -- --lr 3e-6
An entry of `--scripts` may carry flags of its own (quoted, as above); everything after `--` is passed to every
script unchanged.

`--synthetic SHAPE` (pythia-1.4b, pythia-2.8b, pythia-6.9b, llama-3-8b, or tiny for tests) needs no network: it
builds random-weight models of that exact shape and random-token prompts of the configured lengths with
eval/synthetic.py (or reuses those already in output_dir/synthetic_SHAPE) and runs every script on them.

Next to the measured peak, the summary splits each script's memory into the parts that parameter counts determine
(`memory_breakdown`: weights, gradients, optimizer state, reference policy, reward model, ppo.py's critic, DDP's
buckets); the rest of the peak is activations and KV cache. docs/memory.md applies the same function to the
paper's settings.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

from eval import BadInput, print_error

PHASES = ["generation", "reward", "logprob", "update"]
GIB = 2**30
MEMORY_PARTS = ["weights", "gradients", "optimizer", "reference", "reward_model", "critic", "ddp_buckets"]


@dataclass
class Args:
    scripts: tuple[str, ...] = ("rebel.py",)
    """the algorithm scripts to compare, each run with the same flags; an entry may add its own ("rloo.py --rloo_k 4")"""
    updates: int = 12
    """updates to run per script, warm-up included (total_episodes = updates * batch_size)"""
    warmup: int = 2
    """first updates left out of every statistic"""
    nproc_per_node: int = 1
    """processes (GPUs) per script; above 1 the script is launched with torchrun"""
    torchrun: bool = False
    """launch with torchrun even for one process (--fsdp needs it)"""
    sft_model_path: str = ""
    """--sft_model_path of every script ('' = the script's default)"""
    reward_model_path: str = ""
    """--reward_model_path of every script ('' = the script's default)"""
    query_dataset: str = ""
    """--query_dataset of every script ('' = the script's default)"""
    preference_dataset: str = ""
    """--preference_dataset of dpo.py ('' = its default)"""
    synthetic: str = ""
    """run on random-weight models of this shape and random-token prompts, built offline by eval/synthetic.py (tiny,
    pythia-1.4b, pythia-2.8b, pythia-6.9b, llama-3-8b) in output_dir/synthetic_<shape>, or reused from there; they
    replace --sft_model_path, --reward_model_path, --query_dataset and --preference_dataset"""
    num_eval_prompts: int | None = None
    """--num_eval_prompts of every script; evaluation runs before the first and after the last update, outside the
    timings (default: the script's own, every prompt; with --synthetic, 8 per process)"""
    query_length: int = 512
    """prompt length in tokens (the paper's TL;DR setting)"""
    response_length: int = 53
    """response length in tokens (the paper's TL;DR setting)"""
    batch_size: int = 512
    """prompts per update, over all processes (the paper's Figure 2 uses 512)"""
    per_device_train_batch_size: int = 8
    """micro-batch per process"""
    output_dir: str = "benchmark_out"
    """benchmark.json, benchmark.md, benchmark.png, runs/<script>/ with each run's metrics.jsonl, and runs/<script>.log"""
    reuse: bool = False
    """summarise the metrics.jsonl already under output_dir/runs instead of running the scripts again"""
    extra_args: tuple[str, ...] = ()
    """arguments passed to every script (also: everything after `--` on the command line)"""


def run_name(spec: str) -> str:
    """'rloo.py --rloo_k 4' -> 'rloo --rloo_k 4': the table's and the plot's label of one --scripts entry."""
    script, *flags = shlex.split(spec)
    return " ".join([os.path.splitext(os.path.basename(script))[0], *flags])


def script_command(spec: str, run_dir: str, args: Args) -> list[str]:
    script, *own_flags = shlex.split(spec)
    name = os.path.splitext(os.path.basename(script))[0]
    launcher = [sys.executable]
    if args.nproc_per_node > 1 or args.torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc_per_node}"]
    flags = {
        "run_dir": run_dir,
        "total_episodes": args.updates * args.batch_size,
        "batch_size": args.batch_size,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "query_length": args.query_length,
        "response_length": args.response_length,
        "sft_model_path": args.sft_model_path,
        "reward_model_path": args.reward_model_path,
        "query_dataset": args.query_dataset,
        "preference_dataset": args.preference_dataset if name in ("dpo", "reward") else "",
        "num_eval_prompts": args.num_eval_prompts or "",
        "eval_freq": 0,  # no mid-run evaluation inside the timed updates
        "output_dir": "",  # nothing saved (tracking stays off: it is off by default in every script)
    }
    if name in ("sft", "reward"):
        # One epoch over the training split: `updates` updates when it holds updates * batch_size rows (as the
        # --synthetic set does). They evaluate only after training, and sft.py calls its starting model --base_model.
        del flags["total_episodes"], flags["reward_model_path"], flags["eval_freq"]
        if name == "sft":
            flags["base_model"] = flags.pop("sft_model_path")
    cli = []
    for k, v in flags.items():
        if v != "" or k == "output_dir":
            cli += [f"--{k}", str(v)]
    return launcher + [script] + cli + own_flags + list(args.extra_args)


def read_metrics(path: str) -> list[dict]:
    """The per-update rows of a metrics.jsonl (an evaluation's row, which sft.py and reward.py write there after
    training, has no time/ keys)."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if any(k.startswith("time/") for k in r)]


def summarize_run(records: list[dict], warmup: int) -> dict:
    """Mean and standard deviation of each phase's time over the measured updates, and their peak memory."""
    measured = sorted(records, key=lambda r: r["update"])[warmup:]
    if not measured:
        raise ValueError(
            f"only {len(records)} updates logged, all within the {warmup} warm-up updates: raise --updates"
        )
    summary = {"updates_measured": len(measured), "updates_discarded": len(records) - len(measured)}
    for key in [*PHASES, "total"]:
        values = [float(r.get(f"time/{key}") or 0.0) for r in measured]
        summary[f"time/{key}"] = statistics.fmean(values)
        summary[f"time/{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    # Time outside the four phases (data loading, logging, synchronisation), so the bars add up to the total.
    summary["time/other"] = max(0.0, summary["time/total"] - sum(summary[f"time/{k}"] for k in PHASES))
    summary["memory/peak_gb"] = max(float(r.get("memory/peak_gb") or 0.0) for r in measured)
    return summary


class Params(NamedTuple):
    total: int
    """every parameter of the model"""
    lora: int
    """parameters of the LoRA adapters a script would add (rank r on a d_in x d_out linear layer: r * (d_in + d_out))"""


def count_params(
    config, reward: bool = False, lora_rank: int = 1024, target_modules: list[str] | None = None
) -> Params:
    """Parameter counts of a causal LM (or, `reward`, a one-label sequence classifier) of this config, built on the
    meta device (no memory, so any size), and of its LoRA adapters: on peft's default modules for the architecture
    (Pythia: query_key_value) or on `target_modules`, matched as peft matches them; 'all-linear' leaves the output
    layer out, as peft does. ppo.py adapts the reward model's backbone only, so a head never counts."""
    import torch
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if reward:
        config = copy.deepcopy(config)
        config.num_labels = 1
    with torch.device("meta"):
        model = (AutoModelForSequenceClassification if reward else AutoModelForCausalLM).from_config(config)
    targets = target_modules or PEFT_DEFAULTS[config.model_type]
    adapted = [
        m
        for name, m in model.base_model.named_modules()
        if isinstance(m, torch.nn.Linear)
        and (targets == ["all-linear"] or any(name == t or name.endswith("." + t) for t in targets))
    ]
    lora = sum(lora_rank * (m.in_features + m.out_features) for m in adapted)
    return Params(sum(p.numel() for p in model.parameters()), lora)


def memory_breakdown(
    script: str,
    policy: Params,
    reward: Params,
    lora: bool = True,
    critic_lora: bool | None = None,
    frozen_bytes: int = 2,
    world_size: int = 1,
) -> dict[str, float]:
    """Memory per process, in GiB, that parameter counts determine, for a script as it loads its models today (every
    process holds all of them). Frozen weights take `frozen_bytes` per parameter (2: bf16, what --precision auto uses
    on CUDA), trained weights 4 (fp32 master weights), their gradients 4 and AdamW's two moments 8.

    rebel, rloo, dpo, iterative_dpo: under LoRA the policy is the frozen base plus fp32 adapters and the reference is
    that base with the adapters off (no copy); with --no-lora the whole policy trains, beside a frozen fp32 reference copy.
    The reward model is frozen. ppo adds a critic initialised from the reward model, with adapters of its own
    (--critic_lora, default: --lora; its 1 x hidden head, trained in fp32, is left out) or fully trained. sft and
    reward train one model fully (reward.py: the policy's backbone and a scalar head, the reward model's shape).
    Above one process, DDP's all-reduce buckets hold a second copy of the gradients (gradient_as_bucket_view is off)."""
    name = os.path.splitext(os.path.basename(script))[0]
    if name in ("sft", "reward"):
        trained = policy.total if name == "sft" else reward.total
        weights, reference, reward_model, critic = 4 * trained, 0, 0, 0
    else:
        trained = policy.lora if lora else policy.total
        weights = frozen_bytes * policy.total + 4 * policy.lora if lora else 4 * policy.total
        reference = 0 if lora else 4 * policy.total  # a frozen fp32 copy: the policy's precision (KL 0 at start)
        reward_model, critic = frozen_bytes * reward.total, 0
        if name == "ppo":
            critic_lora = lora if critic_lora is None else critic_lora
            critic = frozen_bytes * reward.total + 4 * reward.lora if critic_lora else 4 * reward.total
            trained += reward.lora if critic_lora else reward.total
    parts = dict(
        weights=weights,
        gradients=4 * trained,
        optimizer=8 * trained,
        reference=reference,
        reward_model=reward_model,
        critic=critic,
        ddp_buckets=4 * trained if world_size > 1 else 0,
    )
    return {k: v / GIB for k, v in parts.items()}


def memory_flags(argv: list[str]) -> argparse.Namespace:
    """The flags of a script's command line that its memory depends on, with every script's defaults (the last of a
    repeated flag wins, as in tyro)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag, default in (("lora", True), ("cuda", True)):
        parser.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=default)  # also --no-<flag>
        parser.add_argument(f"--no_{flag}", dest=flag, action="store_false")
    parser.add_argument("--lora_rank", type=int, default=1024)
    parser.add_argument("--lora_target_modules", nargs="+", default=None)
    parser.add_argument("--critic_lora", choices=["None", "True", "False"], default="None")
    parser.add_argument("--precision", default="auto")
    return parser.parse_known_args(argv)[0]


def local_config(path: str):
    """The transformers config of a local model directory (summarize_from_feedback_details' reward models keep it
    under `base_config`); None for a hub name, which would need the network, or a directory without config.json."""
    from transformers import AutoConfig

    if not path or not os.path.isfile(os.path.join(path, "config.json")):
        return None
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    return (
        AutoConfig.for_model(**config["base_config"]) if "base_config" in config else AutoConfig.from_pretrained(path)
    )


def script_memory(spec: str, args: Args, peak_gb: float) -> dict | None:
    """memory_breakdown of one --scripts entry under its flags, and the rest of its measured peak (activations, KV
    cache, and on CPU the process's own memory); None where the models' configs are not local files."""
    script, *own_flags = shlex.split(spec)
    if os.path.splitext(os.path.basename(script))[0] not in ("rebel", "rloo", "dpo", "iterative_dpo", "ppo"):
        return None
    policy_config, reward_config = local_config(args.sft_model_path), local_config(args.reward_model_path)
    if policy_config is None or reward_config is None:
        return None
    import torch

    flags = memory_flags(own_flags + list(args.extra_args))
    lora = dict(lora_rank=flags.lora_rank, target_modules=flags.lora_target_modules)
    bf16 = flags.precision == "bf16" or (flags.precision == "auto" and flags.cuda and torch.cuda.is_available())
    parts = memory_breakdown(
        script,
        count_params(policy_config, **lora),
        count_params(reward_config, reward=True, **lora),
        lora=flags.lora,
        critic_lora={"None": None, "True": True, "False": False}[flags.critic_lora],
        frozen_bytes=2 if bf16 else 4,
        world_size=args.nproc_per_node,
    )
    return {**parts, "activations": peak_gb - sum(parts.values()), "peak": peak_gb}


def format_table(results: list[dict]) -> str:
    head = "| script | updates | " + " | ".join(f"{k} (s)" for k in PHASES) + " | total (s) | peak memory (GiB) |"
    lines = [head, "|" + "---|" * (len(PHASES) + 4)]
    for r in results:
        name = run_name(r["script"])
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} |" + " |" * (len(PHASES) + 2))
            continue
        phases = " | ".join(f"{r[f'time/{k}']:.3f}" for k in PHASES)
        lines.append(
            f"| {name} | {r['updates_measured']} | {phases} | {r['time/total']:.3f} ± {r['time/total_std']:.3f} "
            f"| {r['memory/peak_gb']:.2f} |"
        )
    return "\n".join(lines)


def format_memory_table(results: list[dict]) -> str:
    head = (
        "| script | " + " | ".join(MEMORY_PARTS).replace("_", " ") + " | activations/KV cache (rest) | measured peak |"
    )
    lines = [head, "|" + "---|" * (len(MEMORY_PARTS) + 3)]
    for r in results:
        if r.get("memory"):
            values = [r["memory"][k] for k in [*MEMORY_PARTS, "activations", "peak"]]
            cells = [f"{v:.2f}" if v == 0 or abs(v) >= 0.01 else f"{v:.1e}" for v in values]  # tiny models: 6.2e-04
            lines.append(f"| {run_name(r['script'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def plot(results: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in results if "error" not in r]
    names = [run_name(r["script"]) for r in results]
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(4 + 1.2 * len(results), 4))
    bottom = [0.0] * len(results)
    for key in [*PHASES, "other"]:
        values = [r[f"time/{key}"] for r in results]
        ax_time.bar(names, values, bottom=bottom, label=key)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax_time.set_ylabel("time per update (s)")
    for ax in (ax_time, ax_mem):
        ax.tick_params(axis="x", labelrotation=30)
    ax_time.legend(fontsize=8)
    ax_mem.bar(names, [r["memory/peak_gb"] for r in results], color="tab:gray")
    ax_mem.set_ylabel("peak memory (GiB)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def use_synthetic(args: Args) -> Args:
    """Point every script at the synthetic set of args.synthetic: built now, or, with --reuse, the one built before."""
    from eval.synthetic import build

    out = os.path.join(args.output_dir, f"synthetic_{args.synthetic}")
    if args.reuse:
        with open(os.path.join(out, "synthetic.json")) as f:
            built = json.load(f)
    else:
        print(f"building (or reusing) the synthetic {args.synthetic} models and prompts in {out}", flush=True)
        rows = args.updates * args.batch_size
        built = build(args.synthetic, out, args.query_length, args.response_length, rows)
    return replace(
        args,
        sft_model_path=built["policy"],
        reward_model_path=built["reward_model"],
        query_dataset=built["prompts"],
        preference_dataset=built["prompts"],
        num_eval_prompts=args.num_eval_prompts or 8 * args.nproc_per_node,
    )


def main(args: Args) -> list[dict]:
    missing = [spec for spec in args.scripts if not os.path.isfile(shlex.split(spec)[0])]
    if missing or args.updates <= args.warmup:
        raise BadInput(f"--scripts {missing}: no such file here; run from the repository with rebel.py, ppo.py, ..."
                       if missing else f"--updates {args.updates} must be more than --warmup {args.warmup}")  # fmt: skip
    run_dirs = [
        os.path.join(args.output_dir, "runs", run_name(s).replace(" --", "_").replace(" ", "_")) for s in args.scripts
    ]
    # It deletes nothing: a run folder from before (an earlier benchmark's, or a user's) is refused before any run.
    earlier = [d for d in run_dirs if os.path.exists(d) or os.path.exists(d + ".log")]
    if earlier and not args.reuse:
        raise BadInput(
            f"{earlier[0]} exists (an earlier benchmark's?): pass a new --output_dir, or --reuse to summarise it"
        )
    os.makedirs(args.output_dir, exist_ok=True)
    if args.synthetic:
        args = use_synthetic(args)
    results = []
    for script, run_dir in zip(args.scripts, run_dirs):
        metrics = os.path.join(run_dir, "metrics.jsonl")
        if not args.reuse:
            os.makedirs(os.path.dirname(run_dir), exist_ok=True)
            command = script_command(script, run_dir, args)
            print("running:", shlex.join(command), flush=True)
            with open(run_dir + ".log", "w") as log:
                returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
            if returncode != 0:
                results.append({"script": script, "error": f"exit code {returncode}, see {run_dir}.log"})
                continue
        try:
            summary = summarize_run(read_metrics(metrics), args.warmup)
        except (OSError, ValueError, KeyError) as e:
            results.append({"script": script, "error": f"{type(e).__name__}: {e}"})
            continue
        results.append({"script": script, **summary, "memory": script_memory(script, args, summary["memory/peak_gb"])})

    config = asdict(args)
    with open(os.path.join(args.output_dir, "benchmark.json"), "w") as f:
        json.dump({"config": config, "results": results}, f, indent=2)
    table = format_table(results)
    memory = format_memory_table(results)
    if memory:
        table += (
            "\n\nMemory per process (GiB): the parts that parameter counts determine (eval.benchmark."
            "memory_breakdown), and the rest of the measured peak: activations and KV cache (on CPU also the "
            "process's own memory).\n\n" + memory
        )
    setting = (
        f"batch {args.batch_size}, query {args.query_length} + response {args.response_length} tokens, "
        f"{args.nproc_per_node} process(es), mean over {args.updates - args.warmup} updates after {args.warmup} warm-up"
    )
    with open(os.path.join(args.output_dir, "benchmark.md"), "w") as f:
        f.write(f"{setting}\n\n{table}\n")
    if any("error" not in r for r in results):
        plot(results, os.path.join(args.output_dir, "benchmark.png"), setting)
    print(setting)
    print(table)
    return results


def parse_cli(argv: list[str]) -> Args:
    """Everything after the first `--` goes to the scripts, so tyro never sees the scripts' own flags."""
    import tyro

    extra = []
    if "--" in argv:
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    args = tyro.cli(Args, args=argv, use_underscores=True)
    args.extra_args = tuple(args.extra_args) + tuple(extra)
    return args


if __name__ == "__main__":
    sys.excepthook = print_error  # bad input or a failed read or write: one line, no traceback
    results = main(parse_cli(sys.argv[1:]))
    sys.exit(1 if any("error" in r for r in results) else 0)
