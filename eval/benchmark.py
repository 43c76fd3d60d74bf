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
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass

import tyro

PHASES = ["generation", "reward", "logprob", "update"]


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
    sft_model_path: str = ""
    """--sft_model_path of every script ('' = the script's default)"""
    reward_model_path: str = ""
    """--reward_model_path of every script ('' = the script's default)"""
    query_dataset: str = ""
    """--query_dataset of every script ('' = the script's default)"""
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
    launcher = [sys.executable]
    if args.nproc_per_node > 1:
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
        "eval_freq": 0,  # no mid-run evaluation inside the timed updates
        "output_dir": "",  # nothing saved (tracking stays off: it is off by default in every script)
    }
    cli = []
    for k, v in flags.items():
        if v != "" or k == "output_dir":
            cli += [f"--{k}", str(v)]
    return launcher + [script] + cli + own_flags + list(args.extra_args)


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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


def main(args: Args) -> list[dict]:
    os.makedirs(args.output_dir, exist_ok=True)
    results = []
    for script in args.scripts:
        run_dir = os.path.join(args.output_dir, "runs", run_name(script).replace(" --", "_").replace(" ", "_"))
        metrics = os.path.join(run_dir, "metrics.jsonl")
        if not args.reuse:
            shutil.rmtree(run_dir, ignore_errors=True)  # a new run needs an empty run directory
            os.makedirs(os.path.dirname(run_dir), exist_ok=True)
            command = script_command(script, run_dir, args)
            print("running:", shlex.join(command), flush=True)
            with open(run_dir + ".log", "w") as log:
                returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
            if returncode != 0:
                results.append({"script": script, "error": f"exit code {returncode}, see {run_dir}.log"})
                continue
        try:
            results.append({"script": script, **summarize_run(read_metrics(metrics), args.warmup)})
        except (OSError, ValueError, KeyError) as e:
            results.append({"script": script, "error": f"{type(e).__name__}: {e}"})

    config = asdict(args)
    with open(os.path.join(args.output_dir, "benchmark.json"), "w") as f:
        json.dump({"config": config, "results": results}, f, indent=2)
    table = format_table(results)
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
    extra = []
    if "--" in argv:
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    args = tyro.cli(Args, args=argv, use_underscores=True)
    args.extra_args = tuple(args.extra_args) + tuple(extra)
    return args


if __name__ == "__main__":
    results = main(parse_cli(sys.argv[1:]))
    sys.exit(1 if any("error" in r for r in results) else 0)
