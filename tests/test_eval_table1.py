"""eval/table1.py: the flags each method gets, mean ± standard error over seeds, and the Figure 5 plot."""

import numpy as np
import pandas as pd
import pytest

from eval.table1 import METHODS, mean_se, method_flags, parse_args, per_seed_table, plot_reward_vs_kl, quality_table


def flag(flags, name):
    return flags[len(flags) - 1 - flags[::-1].index(name) + 1]  # the last occurrence wins, as in tyro


def test_every_method_gets_the_same_budget_and_its_own_algorithm_flags():
    for method, (script, extra) in METHODS.items():
        got_script, flags = method_flags(method, "/d", seed=2, lr=1e-3, run_dir="/r")
        assert got_script == script
        assert flag(flags, "--total_episodes") == "640" and flag(flags, "--batch_size") == "32"
        assert flag(flags, "--lr") == "0.001" and flag(flags, "--seed") == "2" and flag(flags, "--lora_rank") == "16"
        assert flag(flags, "--sft_model_path") == "/d/sft" and flag(flags, "--reward_model_path") == "/d/rm"
        assert flags[len(flags) - len(extra) :] == extra  # the algorithm's own flags come last
    _, dpo = method_flags("DPO", "/d", 1, 3e-4, "/r")  # offline: preference pairs in, TL;DR prompts evaluated
    assert flag(dpo, "--preference_dataset") == "/d/data/preference" and flag(dpo, "--query_dataset") == "/d/data/tldr"
    _, rloo4 = method_flags("RLOO (k=4)", "/d", 1, 3e-4, "/r")
    assert flag(rloo4, "--rloo_k") == "4" and flag(rloo4, "--query_dataset") == "/d/data/tldr"


def test_mean_and_standard_error_over_seeds():
    m, se = mean_se([0.8, 0.9, 1.0])
    assert m == pytest.approx(0.9) and se == pytest.approx(0.1 / np.sqrt(3))  # std (ddof 1) = 0.1
    assert np.isnan(mean_se([0.7])[1])


def fake_runs(tmp_path):
    """Two seeds of REBEL and PPO, each evaluated at updates 0, 5, 10, with a per-prompt evaluation table."""
    runs, rng = [], np.random.default_rng(0)
    for method, gain in (("PPO", 0.1), ("REBEL", 0.2)):
        for seed in (1, 2):
            run_dir = tmp_path / f"{method}{seed}"
            run_dir.mkdir()
            curve = [{"update": u, "win_rate": 0.5 + gain * u / 10 + 0.01 * seed, "win_rate_se": 0.02, "gold_score": 2.0, "n": 40,
                      "rm_score": gain * u, "kl": u / 10 * seed} for u in (0, 5, 10)]  # fmt: skip
            pd.DataFrame({"kl": rng.exponential(1.0, 40), "score": rng.normal(0.0, 1.0, 40)}).to_csv(
                run_dir / "eval_000010.csv", index=False
            )
            runs.append({"method": method, "seed": seed, "lr": 3e-4, "curve": curve, "run_dir": str(run_dir)})
    return runs


def test_quality_table_reports_final_policies_and_sft(tmp_path):
    table = quality_table(fake_runs(tmp_path), ["PPO", "REBEL"], {"PPO": 1e-4, "REBEL": 3e-4})
    lines = table.splitlines()
    assert lines[2] == "| SFT | | 0.515 ± 0.005 | 2.000 ± 0.000 | 0.000 ± 0.000 | 0.000 ± 0.000 |"
    # PPO at update 10: win rates 0.61 and 0.62, KL 1 and 2.
    assert lines[3] == "| PPO | 0.0001 | 0.615 ± 0.005 | 2.000 ± 0.000 | 1.000 ± 0.000 | 1.500 ± 0.500 |"
    assert lines[4].startswith("| REBEL | 0.0003 | 0.715 ± 0.005 |")


def test_per_seed_table(tmp_path):
    lines = per_seed_table(fake_runs(tmp_path), ["PPO", "REBEL"], [1, 2]).splitlines()
    assert lines[0] == "| method | seed 1 | seed 2 |"
    assert lines[2] == "| PPO | 0.610 ± 0.020 | 0.620 ± 0.020 |"


def test_reward_vs_kl_plot(tmp_path):
    path = tmp_path / "fig.png"
    plot_reward_vs_kl(fake_runs(tmp_path), ["PPO", "REBEL"], str(path))
    assert path.stat().st_size > 10_000


def test_cli_refuses_to_tune_on_a_reported_seed(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--seeds", "0", "1", "--tune_seed", "0"])
    assert "tune on a seed you do not report" in capsys.readouterr().err
    args = parse_args(["--seeds", "0", "--lrs", "3e-4", "--methods", "REBEL", "DPO"])  # one lr: nothing is tuned
    assert args.methods == ["DPO", "REBEL"]  # the table's order


def test_timing_runs_in_a_fresh_output_folder(tmp_path, monkeypatch):
    """The timing stage (Figure 2) on an --out where no timing run was made yet: its log's folder is created."""
    import json
    import os

    import eval.table1 as table1

    def fake_run(script, flags, log):  # what toy.demo.run does first, then a script's metrics
        open(log, "w").close()
        run_dir = flags[len(flags) - 1 - flags[::-1].index("--run_dir") + 1]
        os.makedirs(run_dir)
        with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
            for update in range(1, 9):
                f.write(
                    json.dumps({"update": update, "time/update": 0.5, "time/total": 1.0, "memory/peak_gb": 1}) + "\n"
                )
        return 0.0

    monkeypatch.setattr(table1, "run", fake_run)
    result = table1.time_method(str(tmp_path), "REBEL", 1, 3e-4)
    assert result["updates_measured"] == 6 and result["time/total"] == 1.0
    assert table1.time_method(str(tmp_path), "REBEL", 1, 3e-4) == result  # done.json: not run again
