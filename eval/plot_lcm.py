"""Figure 3 of the REBEL paper from rebel_lcm.py runs: reward against reward queries, REBEL vs PPO.

Each curve is the interquartile mean (IQM) over seeds, with a 95% confidence interval from a percentile
stratified bootstrap over runs (Agarwal et al., 2021), as Section 4.3 describes.

    python eval/plot_lcm.py --runs runs/ --out figure3.png

Every run folder holds the progress.json that rebel_lcm.py writes (its args say the algo and seed). Runs of one
algo are put on a common grid of reward queries (each run's reward linearly interpolated), up to the shortest run.
"""

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import bootstrap, trim_mean


def iqm(x, axis=-1):
    """Interquartile mean: the mean of the middle 50% (trim 25% on each side)."""
    return trim_mean(x, 0.25, axis=axis)


def load_runs(folder: Path) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """algo -> list of (reward_queries, reward_mean) arrays, one per run."""
    runs: dict[str, list] = {}
    for path in sorted(folder.rglob("progress.json")):
        try:
            record = json.loads(path.read_text())
        except ValueError as e:
            raise SystemExit(
                f"error: {path} is not valid JSON ({e}): a run killed while writing it? fix or move it"
            ) from None
        history = record["history"]
        if not history:
            continue
        if not all("reward_queries" in h and "reward_mean" in h for h in history):
            raise SystemExit(f"error: {path} is not a progress.json of rebel_lcm.py (no reward_queries, reward_mean)")
        queries = np.array([h["reward_queries"] for h in history], dtype=float)
        rewards = np.array([h["reward_mean"] for h in history], dtype=float)
        runs.setdefault(record["args"]["algo"], []).append((queries, rewards))
    return runs


def iqm_curve(runs, num_points: int = 50, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0):
    """Common query grid, IQM over runs and its bootstrap CI at each grid point."""
    end = min(q[-1] for q, _ in runs)
    grid = np.linspace(max(q[0] for q, _ in runs), end, num_points)
    scores = np.stack([np.interp(grid, q, r) for q, r in runs])  # (runs, points)
    mean = iqm(scores, axis=0)
    if len(runs) < 2:  # one run has no spread to resample
        return grid, mean, mean, mean
    # Stratified over runs: each grid point resamples runs with replacement (the runs are the only stratum here,
    # one task per curve), percentile intervals.
    ci = bootstrap(
        (scores,), iqm, axis=0, confidence_level=confidence, n_resamples=n_resamples, method="percentile",
        random_state=np.random.default_rng(seed),
    ).confidence_interval  # fmt: skip
    return grid, mean, ci.low, ci.high


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="folder searched for progress.json files")
    parser.add_argument("--out", type=Path, default=Path("figure3_lcm.png"), help="output PNG")
    parser.add_argument("--ylabel", default="LAION aesthetic score", help="y-axis label (the reward used)")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_runs(args.runs)
    if not runs:
        raise SystemExit(f"error: no progress.json under {args.runs}: point --runs at rebel_lcm.py's --output_dir")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for algo, color in (("rebel", "tab:red"), ("ppo", "tab:blue")):
        if algo not in runs:
            continue
        grid, mean, low, high = iqm_curve(runs[algo])
        ax.plot(grid, mean, color=color, label=f"{algo.upper()} ({len(runs[algo])} seeds)")
        ax.fill_between(grid, low, high, color=color, alpha=0.25)
    ax.set_xlabel("reward queries")
    ax.set_ylabel(args.ylabel)
    ax.set_title("IQM, 95% stratified bootstrap CI")
    ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=150)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, KeyError) as e:  # a failed read or write; a progress.json not of rebel_lcm.py
        raise SystemExit(f"error: {type(e).__name__}: {e}; check --runs and --out") from None
