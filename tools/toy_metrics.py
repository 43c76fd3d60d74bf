"""A 10-update run of every script (metrics.jsonl and the evaluation tables) on the micro toy task, to check that a refactor changes no number.

    python tools/toy_metrics.py run OUT [NAME ...] # builds the task in OUT/task, runs every script (or the runs named,
                                                   # sft and reward always), OUT/<name>.jsonl
    python tools/toy_metrics.py compare OLD NEW    # the metrics that differ (time/ and memory/ aside); exit 1 if any

Every run is one process on one thread (OMP_NUM_THREADS=1) with a fixed seed, so two checkouts that compute the same
thing write the same numbers, bit for bit. SFT and the reward model are trained by the checkout itself, so a change
there shows in every later row too; the RL rows start from them.
"""

import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
LENGTHS = ["--query_length", "64", "--response_length", "24"]
IGNORED = ("time/", "memory/")


def runs(task: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (script, flags) of every run, in the order they run (sft and reward first: the others use them)."""
    data, models = os.path.join(task, "data"), task
    small = ["--batch_size", "32", "--per_device_train_batch_size", "16", "--lr", "3e-3", *LENGTHS]
    rl = ["--query_dataset", f"{data}/tldr", "--sft_model_path", f"{models}/sft", "--reward_model_path",
          f"{models}/rm", *LENGTHS, "--batch_size", "8", "--per_device_train_batch_size", "4",
          "--local_rollout_forward_batch_size", "8", "--total_episodes", "80", "--num_eval_prompts", "8",
          "--eval_freq", "5", "--lora_rank", "4", "--lora_alpha", "8", "--lr", "1e-3", "--output_dir", ""]  # fmt: skip
    gold = os.path.join(ROOT, "toy", "tldr.py") + ":gold_preference"
    return {
        "sft": (
            "sft.py",
            [
                *small,
                "--query_dataset",
                f"{data}/tldr",
                "--base_model",
                f"{data}/base_model",
                "--output_dir",
                f"{models}/sft",
            ],
        ),  # fmt: skip
        "reward": (
            "reward.py",
            [
                *small,
                "--query_dataset",
                f"{data}/tldr",
                "--preference_dataset",
                f"{data}/preference",
                "--sft_model_path",
                f"{models}/sft",
                "--output_dir",
                f"{models}/rm",
            ],
        ),  # fmt: skip
        "rebel": ("rebel.py", rl),
        "rebel_best_worst": ("rebel.py", [*rl, "--num_samples", "4", "--pairing", "best_worst"]),
        "rebel_mu_dataset": ("rebel.py", [*rl, "--mu", "dataset", "--mu_column", "reference_response"]),
        "rebel_preference": ("rebel.py", [*rl, "--preference_fn", gold]),
        "rebel_preference_4": ("rebel.py", [*rl, "--preference_fn", gold, "--num_samples", "4"]),
        "rloo": ("rloo.py", rl),
        "reinforce": ("rloo.py", [*rl, "--reinforce"]),
        "ppo": ("ppo.py", rl),
        "iterative_dpo": ("iterative_dpo.py", rl),
        "dpo": ("dpo.py", [*rl, "--preference_dataset", f"{data}/preference"]),
        "rebel_lcm": (
            "rebel_lcm.py",
            [
                "--tiny",
                "--resolution",
                "32",
                "--sample_batch_size",
                "2",
                "--gradient_accumulation_steps",
                "2",
                "--num_steps",
                "3",
                "--num_iterations",
                "10",
                "--output_dir",
                f"{task}/lcm",
            ],
        ),  # fmt: skip
    }


def run(out: str, only: list[str]) -> None:
    sys.path.insert(0, ROOT)
    from toy.tldr import write_task

    task = os.path.join(out, "task")
    if not os.path.isdir(os.path.join(task, "data")):
        write_task(os.path.join(task, "data"), seed=0, size="micro", n_train=256, n_validation=64, n_test=64,
                   n_pref=256)  # fmt: skip
    for name, (script, flags) in runs(task).items():
        if only and name not in only + ["sft", "reward"]:
            continue
        run_dir = os.path.join(task, "runs", name)
        made = {"sft": f"{task}/sft", "reward": f"{task}/rm"}.get(name)
        for old in (run_dir, made):  # a second run starts afresh (the scripts refuse to overwrite)
            if old and os.path.isdir(old):
                shutil.rmtree(old)
        proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *flags, "--run_dir", run_dir], cwd=task,
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        if proc.returncode != 0:
            raise SystemExit(f"{name} exited with {proc.returncode}:\n{proc.stdout[-3000:]}")
        shutil.copy(os.path.join(run_dir, "metrics.jsonl"), os.path.join(out, f"{name}.jsonl"))
        tables = sorted(f for f in os.listdir(run_dir) if f.startswith("eval_") and f.endswith(".csv"))
        with open(os.path.join(out, f"{name}.eval.csv"), "w") as f:  # the evaluation tables, one after another
            f.writelines(open(os.path.join(run_dir, t)).read() for t in tables)
        print(f"{name}: {sum(1 for _ in open(os.path.join(out, f'{name}.jsonl')))} rows", flush=True)


def rows(path: str) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith(IGNORED)} for line in f]


def compare(old: str, new: str) -> int:
    differ = 0
    for name in runs("task"):
        if not os.path.exists(os.path.join(new, f"{name}.jsonl")):
            continue
        a, b = rows(os.path.join(old, f"{name}.jsonl")), rows(os.path.join(new, f"{name}.jsonl"))
        diffs = [(i, k, x.get(k), y.get(k)) for i, (x, y) in enumerate(zip(a, b)) for k in x.keys() | y.keys()
                 if x.get(k) != y.get(k)]  # fmt: skip
        if len(a) != len(b):
            diffs.append(("rows", "", len(a), len(b)))
        if open(os.path.join(old, f"{name}.eval.csv")).read() != open(os.path.join(new, f"{name}.eval.csv")).read():
            diffs.append(("evaluation tables", "", "differ", ""))
        differ += bool(diffs)
        values = sum(len(x) for x in a)
        print(f"{name}: {len(a)} rows, {values} values, " + (f"{len(diffs)} differ" if diffs else "identical"))
        for d in diffs[:5]:
            print("   ", d)
    return differ


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"] and len(sys.argv) >= 3:
        run(sys.argv[2], sys.argv[3:])
    elif sys.argv[1:2] == ["compare"] and len(sys.argv) == 4:
        sys.exit(1 if compare(sys.argv[2], sys.argv[3]) else 0)
    else:
        raise SystemExit(__doc__)
