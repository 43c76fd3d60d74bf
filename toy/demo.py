"""The main job on the offline toy task: build the task, SFT, reward model, REBEL, then judge with the gold judge.

    python -m toy.demo                       # about 100 s on 2 CPU cores
    python -m toy.demo --seeds 1 2 3         # the README's table (mean and standard error over seeds)

Each stage is the real script run as a subprocess with toy-sized flags (below), exactly as a user would run it.
Prints a table (gold win rate against the references, gold score, RM score, KL) and saves a learning curve.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd

from toy.tldr import gold_judge, gold_score, write_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Toy-sized flags shared by every stage; the scripts' defaults are the paper's.
TOY_LENGTHS = ["--query_length", "64", "--response_length", "24"]
# SFT and the reward model take a few hundred sub-second updates here: no checkpoint every 20 of them (each costs ~1 s).
SFT_FLAGS = ["--batch_size", "32", "--per_device_train_batch_size", "32", "--lr", "3e-3", "--num_train_epochs", "3",
             "--num_eval_prompts", "256", "--save_freq", "0"]  # fmt: skip
RM_FLAGS = ["--batch_size", "32", "--per_device_train_batch_size", "32", "--lr", "1e-3", "--num_train_epochs", "2",
            "--save_freq", "0"]  # fmt: skip
# Every online algorithm gets the same budget: 640 prompts in 20 updates of 32, LoRA rank 16 on every linear layer.
RL_FLAGS = ["--batch_size", "32", "--per_device_train_batch_size", "16", "--local_rollout_forward_batch_size", "64",
            "--total_episodes", "640", "--eval_freq", "5", "--num_eval_prompts", "256",
            "--lora_rank", "16", "--lora_alpha", "32", "--lora_target_modules", "all-linear"]  # fmt: skip
REBEL_FLAGS = [*RL_FLAGS, "--lr", "3e-4"]


def run(script: str, flags: list[str], log: str) -> float:
    """Run one stage; its output goes to a log file, and a failure shows the end of it."""
    t0 = time.time()
    with open(log, "w") as f:
        # Tiny models run fastest on one thread per process (and do not fight over the cores).
        env = {"OMP_NUM_THREADS": "1", **os.environ}
        proc = subprocess.run(
            [sys.executable, os.path.join(ROOT, script), *flags], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env
        )
    if proc.returncode != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"{script} failed (exit {proc.returncode}); the end of {log}:\n{tail}")
    return time.time() - t0


def judge_table(csv_path: str) -> dict:
    """Gold win rate against the references (ties count half), gold score, RM score and KL of one evaluation table."""
    df = pd.read_csv(csv_path, keep_default_na=False)
    wins = np.array(
        [gold_judge(q, a, b) for q, a, b in zip(df["query"], df.postprocessed_response, df.reference_response)]
    )
    gold = np.array([gold_score(q, a) for q, a in zip(df["query"], df.postprocessed_response)])
    return {"win_rate": wins.mean(), "win_rate_se": wins.std(ddof=1) / np.sqrt(len(wins)), "gold_score": gold.mean(),
            "rm_score": df.score.mean(), "kl": df.kl.mean(), "n": len(df)}  # fmt: skip


def prepare_seed(out: str, seed: int) -> tuple[str, dict]:
    """Build the toy task of one seed, then train its SFT policy and reward model; return the folder and stage times."""
    d = os.path.join(out, f"seed{seed}")
    if os.path.isdir(d) and os.listdir(d):  # it deletes nothing, an earlier demo's models included
        raise SystemExit(f"error: {d} is not empty (an earlier demo's): pass another --out, or remove it")
    os.makedirs(d, exist_ok=True)
    times = {}
    t0 = time.time()
    write_task(os.path.join(d, "data"), seed=seed)
    times["task"] = time.time() - t0
    common = ["--seed", str(seed), *TOY_LENGTHS]
    times["sft"] = run("sft.py", [*common, *SFT_FLAGS, "--query_dataset", f"{d}/data/tldr", "--base_model", f"{d}/data/base_model",
                                  "--output_dir", f"{d}/sft", "--run_dir", f"{d}/runs/sft"], f"{d}/sft.log")  # fmt: skip
    times["reward"] = run("reward.py", [*common, *RM_FLAGS, "--query_dataset", f"{d}/data/tldr", "--preference_dataset",
                                        f"{d}/data/preference", "--sft_model_path",
                                        f"{d}/sft", "--output_dir", f"{d}/rm", "--run_dir", f"{d}/runs/rm"], f"{d}/rm.log")  # fmt: skip
    return d, times


def rebel_curve(d: str, seed: int, name: str = "rebel", flags: tuple | list = (), times: dict | None = None) -> list:
    """REBEL on the prepared task in `d` with REBEL_FLAGS (and `flags`: another setting, the same budget); returns
    the judged evaluation tables, update 0 (the SFT policy) first."""
    t = run("rebel.py", ["--seed", str(seed), *TOY_LENGTHS, *REBEL_FLAGS, "--query_dataset", f"{d}/data/tldr",
                         "--sft_model_path", f"{d}/sft", "--reward_model_path", f"{d}/rm", "--output_dir", f"{d}/{name}",
                         "--run_dir", f"{d}/runs/{name}", *flags], f"{d}/{name}.log")  # fmt: skip
    if times is not None:
        times[name] = t
    evals = sorted(f for f in os.listdir(f"{d}/runs/{name}") if f.startswith("eval_"))
    return [{"update": int(f[5:11]), **judge_table(f"{d}/runs/{name}/{f}")} for f in evals]


def run_seed(out: str, seed: int) -> dict:
    d, times = prepare_seed(out, seed)
    curve = rebel_curve(d, seed, times=times)
    with open(f"{d}/runs/rm/metrics.jsonl") as f:
        rm_accuracy = [json.loads(line) for line in f][-1]["eval/accuracy"]
    return {
        "seed": seed,
        "sft": curve[0],
        "rebel": curve[-1],
        "curve": curve,
        "times": times,
        "rm_accuracy": rm_accuracy,
    }


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for r in results:
        c = pd.DataFrame(r["curve"])
        for ax, key in zip(axes, ("win_rate", "rm_score", "kl")):
            ax.plot(c["update"], c[key], marker="o", label=f"seed {r['seed']}")
    for ax, title in zip(axes, ("gold win rate vs references", "reward model score", "KL(pi || pi_SFT)")):
        ax.set_title(title)
        ax.set_xlabel("REBEL update (0 = SFT)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/toy_demo", help="where data, models, runs and the figure go")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    cli = parser.parse_args()
    os.makedirs(cli.out, exist_ok=True)
    t0 = time.time()
    results = []
    for seed in cli.seeds:
        print(
            f"seed {seed}: building the toy task, then SFT -> reward model -> REBEL (logs in {cli.out}/seed{seed}/*.log)"
        )
        results.append(run_seed(cli.out, seed))
        t = results[-1]["times"]
        print(
            "  "
            + ", ".join(f"{k} {v:.0f} s" for k, v in t.items())
            + f"; RM validation accuracy {results[-1]['rm_accuracy']:.3f}"
        )
    rows = []
    for name in ("sft", "rebel"):
        per_seed = pd.DataFrame([r[name] for r in results])
        row = {"policy": name.upper()}
        for key in ("win_rate", "gold_score", "rm_score", "kl"):
            m = per_seed[key].mean()
            if len(results) > 1:
                row[key] = f"{m:.3f} ± {per_seed[key].std(ddof=1) / np.sqrt(len(results)):.3f}"
            elif key == "win_rate":
                row[key] = f"{m:.3f} ± {per_seed['win_rate_se'].iloc[0]:.3f}"
            else:
                row[key] = f"{m:.3f}"
        rows.append(row)
    table = pd.DataFrame(rows)
    n = results[0]["sft"]["n"]
    spread = "standard error over seeds" if len(results) > 1 else f"standard error over {n} prompts"
    print(f"\nGold judge on {n} held-out validation prompts, against the reference summaries (± {spread}):")
    print(table.to_string(index=False))
    plot(results, os.path.join(cli.out, "learning_curve.png"))
    with open(os.path.join(cli.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(
        f"\nlearning curve: {cli.out}/learning_curve.png; results: {cli.out}/results.json; total {time.time() - t0:.0f} s"
    )
