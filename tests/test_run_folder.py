"""A run owns one folder and writes nowhere else it did not create (docs/runs.md, rule 1): its model goes inside its
run folder by default, an output folder of another run or inside what it reads is refused in one line at start, and
no tool deletes what it did not create."""

import os
import shutil

import pytest
from conftest import run_script


def snapshot(folder) -> dict:
    """Every file under `folder` with its bytes: what must survive."""
    return {
        os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
        for d, _, names in os.walk(folder)
        for f in names
    }


def refusal(proc) -> str:
    """The one line a refused run prints (exit code 1, no traceback)."""
    assert proc.returncode == 1 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stdout[-3000:]
    return lines[0]


def test_a_run_keeps_its_model_and_its_inputs_to_itself(toy, tmp_path):
    """Two runs with the default --output_dir no longer share one (models/rebel_tldr): each saves in <run_dir>/model.
    Another run's model as --output_dir is refused and survives; and --resume refuses a data file changed in place."""
    data = shutil.copytree(toy.tldr, tmp_path / "data")
    flags = [*toy.rl_flags, "--query_dataset", str(data), "--save_freq", "1"]
    run_script("rebel.py", *flags, "--run_dir", "first", cwd=tmp_path)
    model = tmp_path / "first" / "model"
    assert os.path.exists(model / "adapter_model.safetensors") and not os.path.exists(tmp_path / "models")
    saved = snapshot(model)

    proc = run_script(
        "rebel.py", *flags, "--run_dir", "second", "--output_dir", "first/model", cwd=tmp_path, check=False
    )
    assert refusal(proc).startswith("error: --output_dir first/model is not empty and not this run's")
    assert snapshot(model) == saved and not os.path.exists(tmp_path / "second")

    with open(data / "train.jsonl", "a") as f:  # the dataset grows in place
        f.write(open(data / "train.jsonl").readline())
    proc = run_script("rebel.py", *flags, "--resume", "first", cwd=tmp_path, check=False)
    assert f"--query_dataset {data / 'train.jsonl'} was modified since the run read it" in refusal(proc)


@pytest.mark.parametrize("case", ["output-over-the-sft-model", "run-dir-in-the-data"])
def test_a_run_never_writes_inside_what_it_reads(toy, tmp_path, case):
    sft, data = shutil.copytree(toy.sft, tmp_path / "sft"), shutil.copytree(toy.tldr, tmp_path / "data")
    before = snapshot(tmp_path)
    flags = [*toy.rl_flags, "--sft_model_path", str(sft), "--query_dataset", str(data)]
    if case == "output-over-the-sft-model":  # full fine-tuning would have saved over the SFT weights
        flags += ["--no-lora", "--output_dir", str(sft), "--run_dir", str(tmp_path / "run")]
        message = f"error: --output_dir {sft} is inside --sft_model_path {sft}, which this run reads: choose another"
    else:
        flags += ["--run_dir", str(data / "run")]
        message = f"error: --run_dir {data / 'run'} is inside --query_dataset {data}, which this run reads: choose"
    assert refusal(run_script("rebel.py", *flags, check=False)).startswith(message)
    assert snapshot(tmp_path) == before


def test_resume_never_deletes_the_folder_it_is_given(toy, tmp_path):
    """--resume of a folder without a complete checkpoint used to delete that folder to start over (a user's files
    with it); now the run starts in it and deletes nothing (here it then stops at the missing model)."""
    folder = tmp_path / "job"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    flags = [*toy.rl_flags, "--sft_model_path", str(tmp_path / "gone"), "--resume", str(folder)]
    assert "no such file or directory" in refusal(run_script("rebel.py", *flags, check=False))
    assert (folder / "notes.txt").read_text() == "mine"


def test_the_demo_refuses_an_earlier_demo_instead_of_deleting_it(tmp_path):
    from toy.demo import prepare_seed

    (tmp_path / "seed1" / "runs" / "rebel").mkdir(parents=True)
    (tmp_path / "seed1" / "runs" / "rebel" / "eval_000020.csv").write_text("mine")
    with pytest.raises(SystemExit, match="seed1 is not empty .an earlier demo's.: pass another --out"):
        prepare_seed(str(tmp_path), 1)
    assert (tmp_path / "seed1" / "runs" / "rebel" / "eval_000020.csv").read_text() == "mine"


def test_the_gpu_check_refuses_a_used_out_folder_instead_of_deleting_in_it(tmp_path, capsys):
    from eval.gpu_check import main

    (tmp_path / "runs" / "rebel").mkdir(parents=True)
    (tmp_path / "runs" / "rebel" / "metrics.jsonl").write_text("mine")
    assert main(["--dry", "--out", str(tmp_path), "--scripts", "rebel"]) == 2
    assert f"error: --out {tmp_path} is not empty" in capsys.readouterr().out
    assert (tmp_path / "runs" / "rebel" / "metrics.jsonl").read_text() == "mine"
