"""The paper's Table 1, Figure 2 and Figure 5 on the offline toy task: every method, three seeds, one gold judge.

    python -m eval.table1                              # all methods, seeds 1 2 3, learning rates tuned on seed 0
    python -m eval.table1 --jobs 2                     # two runs at a time (one core each); the timing stage still runs alone
    python -m eval.table1 --methods REBEL PPO --lrs 3e-4 --seeds 1   # a quick look: no tuning, one seed

What it does, every stage the real script run as a subprocess (the toy flags are toy/demo.py's):
1. For the tuning seed and every reported seed: build the toy task, train the SFT policy and the reward model.
2. Tuning, the same for every method: one run per learning rate in --lrs on the tuning seed (a different toy task
   and different models from the reported seeds); the learning rate whose final policy has the highest gold
   win rate is kept. Nothing else is tuned: every other flag is the script's default (the paper's values).
3. Every method with its learning rate on every reported seed, with the same budget: 640 prompts in 20 updates
   of 32 (DPO: 640 offline preference pairs), LoRA rank 16 on every linear layer, the paper's epochs per batch
   (4 for PPO, iterative DPO and REBEL; 1 for the others). The policy is judged by the gold judge against the
   reference summaries on 256 validation prompts every 5 updates; the table reports the final one.
4. Timing (Figure 2): every method again for 8 updates, one run at a time, on the first reported seed.

Writes to --out: table1.md (gold win rate, RM score, KL to SFT, mean ± standard error over seeds; and the
time per update and peak memory of every method at equal batch), results.json, reward_vs_kl.png (Figure 5:
RM score against KL through training, and RM score by KL bin at the end) and runtime_memory.png (Figure 2).
A run that finished before (its done.json exists) is not run again, and an interrupted one continues from its
last checkpoint (--resume), so an interrupted job resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from eval import print_error
from eval.benchmark import format_table, read_metrics, summarize_run
from eval.benchmark import plot as plot_runtime
from toy.demo import RL_FLAGS, TOY_LENGTHS, judge_table, prepare_seed, run

# The paper's methods (Table 1) and the flags that make each one; the rest is shared (toy/demo.py's RL_FLAGS).
METHODS = {
    "DPO": ("dpo.py", []),
    "Iterative DPO": ("iterative_dpo.py", []),
    "PPO": ("ppo.py", []),
    "REINFORCE": ("rloo.py", ["--reinforce"]),
    "RLOO (k=2)": ("rloo.py", ["--rloo_k", "2"]),
    "RLOO (k=4)": ("rloo.py", ["--rloo_k", "4"]),
    "REBEL": ("rebel.py", []),
}


def method_flags(method: str, d: str, seed: int, lr: float, run_dir: str) -> tuple[str, list[str]]:
    script, extra = METHODS[method]
    data = ["--query_dataset", f"{d}/data/tldr"]
    if script == "dpo.py":  # offline: trains on the preference pairs, evaluates on the TL;DR prompts
        data += ["--preference_dataset", f"{d}/data/preference"]
    flags = [*RL_FLAGS, *TOY_LENGTHS, *data, "--seed", str(seed), "--lr", str(lr), "--sft_model_path", f"{d}/sft",
             "--reward_model_path", f"{d}/rm", "--output_dir", "", "--run_dir", run_dir, *extra]  # fmt: skip
    return script, flags


def run_name(method: str, lr: float) -> str:
    return f"{method.replace(' ', '_').replace('(', '').replace(')', '')}_lr{lr:g}"


def run_method(out: str, method: str, seed: int, lr: float) -> dict:
    """One training run, judged at every evaluation; skipped if it finished before."""
    d = os.path.join(out, f"seed{seed}")
    run_dir = os.path.join(d, "runs", run_name(method, lr))
    done = os.path.join(run_dir, "done.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    script, flags = method_flags(method, d, seed, lr, run_dir)
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)  # its log goes beside the run directory
    wall = run(script, [*flags, "--resume", run_dir], run_dir + ".log")  # an interrupted run goes on
    evals = sorted(f for f in os.listdir(run_dir) if f.startswith("eval_"))
    curve = [{"update": int(f[5:11]), **judge_table(os.path.join(run_dir, f))} for f in evals]
    result = {"method": method, "seed": seed, "lr": lr, "wall_s": wall, "curve": curve, "run_dir": run_dir,
              **summarize_run(read_metrics(os.path.join(run_dir, "metrics.jsonl")), warmup=1)}  # fmt: skip
    with open(done, "w") as f:
        json.dump(result, f, indent=1)
    return result


def mean_se(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    return values.mean(), (values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan"))


def fmt(values, digits: int = 3) -> str:
    m, se = mean_se(values)
    return f"{m:.{digits}f}" if np.isnan(se) else f"{m:.{digits}f} ± {se:.{digits}f}"


def quality_table(runs: list[dict], methods: list[str], lrs: dict) -> str:
    lines = ["| method | lr | gold win rate | gold score | RM score | KL(π‖π_SFT) |", "|---|---|---|---|---|---|"]
    sft = [r["curve"][0] for r in runs if r["method"] == methods[-1]]  # update 0: the SFT policy, as every run sees it
    cells = [fmt([c[k] for c in sft]) for k in ("win_rate", "gold_score", "rm_score", "kl")]
    lines.append("| SFT | | " + " | ".join(cells) + " |")
    for m in methods:
        final = [r["curve"][-1] for r in runs if r["method"] == m]
        cells = [fmt([c[k] for c in final]) for k in ("win_rate", "gold_score", "rm_score", "kl")]
        lines.append(f"| {m} | {lrs[m]:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_table(runs: list[dict], methods: list[str], seeds: list[int]) -> str:
    """The final gold win rate of every run, ± its standard error over the evaluation prompts."""
    lines = ["| method | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for m in methods:
        by_seed = {r["seed"]: r["curve"][-1] for r in runs if r["method"] == m}
        lines.append(f"| {m} | " + " | ".join(f"{by_seed[s]['win_rate']:.3f} ± {by_seed[s]['win_rate_se']:.3f}"
                                               for s in seeds) + " |")  # fmt: skip
    return "\n".join(lines)


def tuning_table(sweep: list[dict], methods: list[str], lrs: list[float]) -> str:
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for m in methods:
        by_lr = {r["lr"]: r["curve"][-1]["win_rate"] for r in sweep if r["method"] == m}
        lines.append(f"| {m} | " + " | ".join(f"{by_lr[lr]:.3f}" for lr in lrs) + " |")
    return "\n".join(lines)


def time_method(out: str, method: str, seed: int, lr: float, updates: int = 8, warmup: int = 2) -> dict:
    """Figure 2: time per update and peak memory, from a short run of its own made while nothing else runs
    (the tuning and table runs may share the cores); no evaluation inside the timed updates."""
    run_dir = os.path.join(out, f"seed{seed}", "timing", run_name(method, lr))
    done = os.path.join(run_dir, "done.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    script, flags = method_flags(method, os.path.join(out, f"seed{seed}"), seed, lr, run_dir)
    flags += ["--total_episodes", str(updates * 32), "--eval_freq", "0", "--num_eval_prompts", "32"]
    if os.path.exists(run_dir):  # an interrupted timing run: resumed, it would time a second start too
        raise SystemExit(f"error: {run_dir} holds an unfinished timing run: remove it to time it again")
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)  # its log goes beside the run directory
    run(script, flags, run_dir + ".log")
    result = {"script": method, **summarize_run(read_metrics(os.path.join(run_dir, "metrics.jsonl")), warmup)}
    with open(done, "w") as f:
        json.dump(result, f, indent=1)
    return result


def plot_reward_vs_kl(runs: list[dict], methods: list[str], path: str) -> None:
    """Figure 5: left, mean RM score against mean KL at every evaluation (± SE over seeds); right, the final
    policies' RM score averaged within ten equal-size bins of their per-prompt KL (all seeds pooled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_bins) = plt.subplots(1, 2, figsize=(11, 4))
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        points = pd.DataFrame(
            [{"update": c["update"], "kl": c["kl"], "rm": c["rm_score"]} for r in rs for c in r["curve"]]
        )
        g = points.groupby("update")
        n = g.size()
        kl, rm = g.kl.mean(), g.rm.mean()
        ax.errorbar(kl, rm, xerr=g.kl.std(ddof=1) / np.sqrt(n), yerr=g.rm.std(ddof=1) / np.sqrt(n), marker="o",
                    ms=3, capsize=2, label=m)  # fmt: skip
        final = pd.concat([pd.read_csv(os.path.join(r["run_dir"], f"eval_{r['curve'][-1]['update']:06d}.csv"))
                           for r in rs])  # fmt: skip
        bins = pd.qcut(final.kl.rank(method="first"), 10, labels=False)
        ax_bins.plot(final.groupby(bins).kl.mean(), final.groupby(bins).score.mean(), marker="o", ms=3, label=m)
    ax.set_xlabel("KL(π‖π_SFT), mean over prompts")
    ax.set_ylabel("reward model score")
    ax.set_title("through training (every 5 updates, ± SE over seeds)", fontsize=9)
    ax_bins.set_xlabel("KL bin mean (final policy, 10 equal-size bins)")
    ax_bins.set_ylabel("reward model score")
    ax_bins.set_title("final policies: RM score by KL", fontsize=9)
    for a in (ax, ax_bins):
        a.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/table1", help="where tasks, models, runs, tables and figures go")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="the seeds reported")
    parser.add_argument("--tune_seed", type=int, default=0, help="the seed the learning rates are chosen on")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
                        help="learning-rate grid, the same for every method (one value: no tuning)")  # fmt: skip
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
                        help=f"subset of {list(METHODS)}")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each uses one thread)")
    args = parser.parse_args(argv)
    if args.tune_seed in args.seeds and len(args.lrs) > 1:
        parser.error(f"--tune_seed {args.tune_seed} is one of --seeds {args.seeds}: tune on a seed you do not report")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    args.methods = [m for m in METHODS if m in args.methods]  # the table's order
    return args


if __name__ == "__main__":
    sys.excepthook = print_error  # bad input or a failed read or write: one line, no traceback
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    tuning = len(args.lrs) > 1
    seeds = ([args.tune_seed] if tuning else []) + args.seeds

    def prepare(seed):
        if not os.path.exists(os.path.join(args.out, f"seed{seed}", "rm", "config.json")):
            prepare_seed(args.out, seed)

    with ThreadPoolExecutor(args.jobs) as pool:
        print(f"1. toy task, SFT and reward model for seeds {seeds}", flush=True)
        list(pool.map(prepare, seeds))

        lrs = {m: args.lrs[0] for m in args.methods}
        sweep = []
        if tuning:
            print(f"2. tuning: {len(args.methods)} methods x lr {args.lrs} on seed {args.tune_seed}", flush=True)
            jobs = [(m, lr) for m in args.methods for lr in args.lrs]
            sweep = list(pool.map(lambda j: run_method(args.out, j[0], args.tune_seed, j[1]), jobs))
            for m in args.methods:
                best = max((r for r in sweep if r["method"] == m), key=lambda r: r["curve"][-1]["win_rate"])
                lrs[m] = best["lr"]
                scores = ", ".join(f"{r['lr']:g}: {r['curve'][-1]['win_rate']:.3f}" for r in sweep if r["method"] == m)
                print(f"   {m}: gold win rate by lr {scores} -> {lrs[m]:g}", flush=True)

        print(f"3. {len(args.methods)} methods x seeds {args.seeds}", flush=True)
        jobs = [(m, s) for s in args.seeds for m in args.methods]
        runs = list(pool.map(lambda j: run_method(args.out, j[0], j[1], lrs[j[0]]), jobs))

    print(f"4. timing: {len(args.methods)} methods, 8 updates each, one at a time, on seed {args.seeds[0]}", flush=True)
    timing = [time_method(args.out, m, args.seeds[0], lrs[m]) for m in args.methods]

    quality = quality_table(runs, args.methods, lrs)
    n = runs[0]["curve"][-1]["n"]
    spread = "standard error over seeds" if len(args.seeds) > 1 else "one seed"
    sections = [
        f"Toy TL;DR task, seeds {args.seeds}; gold judge against the reference summaries on {n} validation prompts "
        f"(mean ± {spread}). Learning rate tuned on seed {args.tune_seed} over {args.lrs} by gold win rate"
        f"{'' if tuning else ' (not tuned: one value)'}.",
        quality,
        "Gold win rate of each run (± standard error over the prompts):",
        per_seed_table(runs, args.methods, args.seeds),
        "Time per update of 32 prompts (mean ± std over updates 3-8, one run at a time, one thread) and peak memory "
        "(on CPU: the process's peak resident memory, mostly the Python and PyTorch runtime at this size):",
        format_table(timing),
    ]
    if tuning:
        sections += [f"Tuning on seed {args.tune_seed}: final gold win rate by learning rate (the best is kept):",
                     tuning_table(sweep, args.methods, args.lrs)]  # fmt: skip
    report = "\n\n".join(sections) + "\n"
    with open(os.path.join(args.out, "table1.md"), "w") as f:
        f.write(report)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "lrs": lrs, "sweep": sweep, "runs": runs, "timing": timing}, f, indent=1)
    plot_reward_vs_kl(runs, args.methods, os.path.join(args.out, "reward_vs_kl.png"))
    plot_runtime(timing, os.path.join(args.out, "runtime_memory.png"), "toy task, batch of 32 prompts, CPU, one thread")
    print("\n" + report)
    print(f"{args.out}/table1.md, reward_vs_kl.png, runtime_memory.png, results.json; total {time.time() - t0:.0f} s")
