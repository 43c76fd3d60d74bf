"""Issue 27, rules 3 and 4. Every entry point has one error path: bad input or a failed read or write is one line
`error: ...`, exit code 1, no traceback, and what was computed survives (torch's checkpoint exceptions and torchrun's
other ranks included). Every loader reads exactly what it claims, or refuses."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ENV, ROOT, TORCHRUN_ENV, run_script, script_command
from rl_checks import bad_input_message

import rebel as R


def rl(toy, tmp_path, *flags):
    return [*toy.rl_flags, "--output_dir", "", "--run_dir", str(tmp_path / "run"), *flags]


def error_line(output: str, returncode: int) -> str:
    """A refusal as the user sees it: exit code 1, no traceback, and its `error:` line (the last one)."""
    assert returncode == 1 and "Traceback" not in output, output[-3000:]
    return [line for line in output.splitlines() if "error: " in line][-1]


def run_tool(module: str, *flags: str) -> tuple[str, int]:
    proc = subprocess.run([sys.executable, "-m", module, *flags], cwd=ROOT, env=ENV, capture_output=True, text=True)
    return proc.stdout + proc.stderr, proc.returncode


# ---------------------------------------------------------------------------------------------- rule 3


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs: room for a run's start and first evaluation, not for a checkpoint (root only)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    yield disk
    subprocess.run(["umount", str(disk)])


@pytest.mark.slow  # a run to its first checkpoint
def test_a_full_disk_while_checkpointing_is_one_line_and_the_evaluation_survives(toy, small_disk):
    run = small_disk / "run"
    proc = run_script("rebel.py", *toy.rl_flags, "--save_freq", "1", "--output_dir", "", "--run_dir", str(run),
                      check=False)  # fmt: skip
    line = error_line(proc.stdout, proc.returncode)  # a CheckpointException (a BaseException) at abf420a
    assert "cannot write the checkpoint" in line and "No space left on device" in line, line
    assert f"--resume {run}" in line
    assert (run / "eval_000000.csv").stat().st_size > 0


def test_a_damaged_checkpoint_on_resume_is_one_line(tmp_path):
    import torch

    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    path = R.save_checkpoint(str(tmp_path), 1, model, optimizer, {"update": 1, "flags": {}, "world_size": 1}, keep=2)
    [shard] = [f for f in os.listdir(path) if f.endswith(".distcp")]
    with open(os.path.join(path, shard), "r+b") as f:  # cut short, as by a disk that filled while copying it
        f.truncate(os.path.getsize(os.path.join(path, shard)) // 2)
    with pytest.raises(R.BadInput, match="cannot read the checkpoint .*resume from an intact one"):
        R.load_checkpoint(path, model, optimizer, {}, 1)  # a CheckpointException, not caught, at abf420a


@pytest.mark.slow
def test_under_torchrun_a_refusal_by_rank_0_is_one_line_on_every_rank(toy, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "theirs.txt").write_text("another run's file")  # only rank 0 checks the run folder
    proc = subprocess.run(script_command("rebel.py", rl(toy, tmp_path), torchrun=2), cwd=ROOT, env=TORCHRUN_ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 1
    assert "[rank0]: error: --run_dir" in proc.stdout and "is not empty" in proc.stdout
    assert "[rank1]: error: --run_dir" in proc.stdout, proc.stdout  # its collective failed: the line, from the store
    assert "[rank1]: Traceback" not in proc.stdout and "Connection closed by peer" not in proc.stdout, proc.stdout


def test_an_eval_tool_that_cannot_read_its_input_says_so_in_one_line(tmp_path):
    output, code = run_tool("eval.winrate", str(tmp_path / "missing.csv"), "--judge", "gold")
    assert "No such file or directory" in error_line(output, code)


def test_the_eval_tools_refuse_bad_input_in_one_line(tmp_path):
    import pandas as pd

    import eval.benchmark as benchmark
    import eval.winrate as winrate
    from eval import BadInput

    (tmp_path / "empty.csv").write_text("")  # pandas' EmptyDataError traceback at abf420a
    with pytest.raises(SystemExit, match="error: .*empty.csv is empty"):
        winrate.main(winrate.Args(csvs=(str(tmp_path / "empty.csv"),), judge="gold", output_dir=str(tmp_path / "w")))
    row = {"query": "not a toy post", "postprocessed_response": "a", "reference_response": "b"}
    pd.DataFrame([row]).to_csv(tmp_path / "other.csv", index=False)  # a ValueError traceback at abf420a
    with pytest.raises(BadInput, match="--judge gold judges the toy task only"):
        winrate.main(winrate.Args(csvs=(str(tmp_path / "other.csv"),), judge="gold", output_dir=str(tmp_path / "w")))
    with pytest.raises(SystemExit, match=r"--subset_frac must be in \(0, 1\]"):  # judged one row at abf420a
        winrate.main(winrate.Args(csvs=(str(tmp_path / "other.csv"),), judge="gold", subset_frac=0.0))
    with pytest.raises(BadInput, match=r"--scripts \['nosuch.py'\]: no such file"):  # a table of failures at abf420a
        benchmark.main(benchmark.Args(scripts=("nosuch.py",), output_dir=str(tmp_path / "b")))
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "hi"}]))
    output, code = run_tool("eval.alpaca_eval_hook", "--model_path", str(tmp_path / "gone"), "--instructions",
                            str(tmp_path / "alpaca.json"))  # fmt: skip
    assert error_line(output, code) == f"error: --model_path {tmp_path / 'gone'}: no such directory"


def test_the_hooks_check_their_records_and_output_folder_before_generating(tmp_path):
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "hi"}, {"prompt": "no instruction"}]))
    output, code = run_tool("eval.alpaca_eval_hook", "--model_path", "no/model", "--instructions",
                            str(tmp_path / "alpaca.json"))  # fmt: skip
    assert "record 1" in error_line(output, code) and "instruction" in output
    import eval.alpaca_eval_hook as alpaca
    import eval.mt_bench_hook as mt_bench
    from eval import BadInput

    (tmp_path / "questions.jsonl").write_text(json.dumps({"question_id": 1, "category": "math", "turns": ["hi"]}))
    with pytest.raises(BadInput, match="question 1: 'turns' must hold two texts"):
        mt_bench.main(mt_bench.Args(model_path="no/model", questions=str(tmp_path / "questions.jsonl")))
    (tmp_path / "broken.jsonl").write_text('{"instruction": "a"}\n{"instruction": \n')
    with pytest.raises(BadInput, match="is not valid JSON Lines"):
        alpaca.main(alpaca.Args(model_path="no/model", instructions=str(tmp_path / "broken.jsonl")))
    (tmp_path / "ok.json").write_text(json.dumps([{"instruction": "hi"}]))
    for flags, message in (({"batch_size": 0}, "--batch_size must be >= 1"), ({"max_instructions": -1}, "-1")):
        with pytest.raises(BadInput, match=message):  # -1 dropped the last instruction at abf420a
            alpaca.main(alpaca.Args(model_path="no/model", instructions=str(tmp_path / "ok.json"), **flags))


# ---------------------------------------------------------------------------------------------- rule 4: models


def test_a_reward_function_file_that_fails_to_run_is_one_line(tmp_path):
    (tmp_path / "fns.py").write_text("def score(prompts, responses:\n")
    with pytest.raises(R.BadInput, match=r"--reward_fn .*fns.py fails to run \(SyntaxError"):
        R.load_function(f"{tmp_path / 'fns.py'}:score", "--reward_fn")  # a SyntaxError traceback at abf420a


def test_a_reward_model_folder_is_not_a_policy(toy, tmp_path):
    message = bad_input_message("rebel.py", rl(toy, tmp_path, "--sft_model_path", toy.rm))
    assert "is not a whole causal LM" in message and "lm_head" in message  # trained with a random head at abf420a


def extended_tokenizer(path: str, folder):
    """The policy's tokenizer with ten more tokens, saved in `folder`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_tokens([f"<new{i}>" for i in range(10)])
    tokenizer.save_pretrained(folder)
    return tokenizer


def test_a_tokenizer_with_ids_past_the_embedding_is_refused(toy, tmp_path):
    shutil.copytree(toy.sft, tmp_path / "sft")
    extended_tokenizer(toy.sft, tmp_path / "sft")
    message = bad_input_message("rebel.py", rl(toy, tmp_path, "--sft_model_path", str(tmp_path / "sft")))
    assert "past the 135 embedding rows of the model" in message, message


def test_a_reward_model_reading_the_policys_ids_needs_rows_for_them(toy, tmp_path):
    from transformers import AutoModelForCausalLM

    tokenizer = extended_tokenizer(toy.sft, tmp_path / "sft")
    policy = AutoModelForCausalLM.from_pretrained(toy.sft)
    policy.resize_token_embeddings(len(tokenizer))  # a policy that learnt the new tokens
    policy.save_pretrained(tmp_path / "sft")
    shutil.copytree(toy.rm, tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")  # the same tokenizer: the reward model reads the policy's ids
    flags = rl(toy, tmp_path, "--sft_model_path", str(tmp_path / "sft"), "--reward_model_path", str(tmp_path / "rm"))
    assert f"embedding rows of the model {tmp_path / 'rm'}" in bad_input_message("rebel.py", flags)


def test_a_reward_tokenizer_that_fails_to_load_is_not_replaced_by_the_policys(toy, tmp_path):
    shutil.copytree(toy.rm, tmp_path / "rm")
    (tmp_path / "rm" / "tokenizer.json").write_text("{not json")
    with pytest.raises(R.BadInput, match="cannot load a tokenizer"):
        R.load_reward_tokenizer(None, str(tmp_path / "rm"), R.load_tokenizer(toy.sft))
    for name in ("tokenizer.json", "tokenizer_config.json"):  # truly absent: the policy's
        os.remove(tmp_path / "rm" / name)
    policy_tokenizer = R.load_tokenizer(toy.sft)
    assert R.load_reward_tokenizer(None, str(tmp_path / "rm"), policy_tokenizer) is policy_tokenizer


# ---------------------------------------------------------------------------------------------- rule 4: data


@pytest.fixture
def tokenizer(toy):
    return R.load_tokenizer(toy.sft)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_split_reads_the_one_file_named_by_it(tmp_path, tokenizer):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [{"query": f"new {i} ?"} for i in range(3)])
    write_jsonl(data / "train_old.jsonl", [{"query": f"old {i} ?"} for i in range(5)])
    dataset, prompts, *_ = R.load_prompts(str(data), "train", "query", None, tokenizer, 64, 24, "filter")
    assert len(dataset) == 3 and all(p.startswith("new") for p in prompts)  # train_old.jsonl too at abf420a
    (data / "train.csv").write_text("query\nfrom csv ?\n")
    with pytest.raises(R.BadInput, match=r"needs one file for split 'train', named train.jsonl"):
        R.load_prompts(str(data), "train", "query", None, tokenizer, 64, 24, "filter")
    (data / "rows.txt").write_text("query\n")
    with pytest.raises(R.BadInput, match=r"unknown format; give a .jsonl, .json, .csv or .parquet file"):
        R.load_prompts(str(data / "rows.txt"), "train", "query", None, tokenizer, 64, 24, "filter")


def test_a_column_of_texts_and_conversations_is_refused(tmp_path, tokenizer):
    rows = [{"query": "a text ?"}, {"query": [{"role": "user", "content": "a conversation ?"}]}]
    write_jsonl(tmp_path / "mixed.jsonl", rows)  # datasets turns every cell into a JSON string at abf420a
    with pytest.raises(R.BadInput, match="column 'query', row 1: .* is a conversation where row 0 is not"):
        R.load_prompts(str(tmp_path / "mixed.jsonl"), "train", "query", None, tokenizer, 64, 24, "filter")


def test_a_message_with_an_unknown_role_is_refused(tmp_path, tokenizer):
    write_jsonl(tmp_path / "roles.jsonl", [{"query": [{"role": "human", "content": "hello ?"}]}])
    with pytest.raises(R.BadInput, match=r"row 0: .* roles system, user, assistant"):
        R.load_prompts(str(tmp_path / "roles.jsonl"), "train", "query", None, tokenizer, 64, 24, "filter")


def test_evaluation_scores_that_are_nan_are_refused(toy, tmp_path):
    (tmp_path / "fns.py").write_text("def nan(prompts, responses):\n    return [float('nan')] * len(responses)\n")
    message = bad_input_message("rebel.py", rl(toy, tmp_path, "--reward_fn", f"{tmp_path / 'fns.py'}:nan"))
    assert message.startswith("the evaluation's scores: 8 of 8 values are NaN or inf"), message
    assert not (tmp_path / "run" / "eval_000000.csv").exists()  # written with NaN scores at abf420a


# ---------------------------------------------------------------------------------------------- rule 4: flags


def test_a_refusal_names_its_own_flag(toy, tmp_path):
    message = bad_input_message("rebel.py", rl(toy, tmp_path, "--lora_dropout", "1.5"))
    assert message == "--lora_dropout 1.5 would do nothing: the models train in eval mode; leave it at 0"
    # (at abf420a it blamed --lora_target_modules); 0.1 too: LoRA's dropout is off in eval mode, where the models train
    message = bad_input_message("rebel.py", rl(toy, tmp_path, "--lora_dropout", "0.1"))
    assert message == "--lora_dropout 0.1 would do nothing: the models train in eval mode; leave it at 0"
    for flag, missing in [
        ("--sft_model_path", str(tmp_path / "gone")),
        ("--reward_model_path", str(tmp_path / "gone")),
        ("--reward_tokenizer", str(tmp_path / "gone")),
        ("--query_dataset", "runs/sft/model"),  # relative, and no hub name (org/name)
    ]:  # at 9f4a8f3: "'<path>': no such directory", or a hub error, no flag named
        message = bad_input_message("rebel.py", rl(toy, tmp_path, flag, missing))
        assert message == f"{flag} {missing}: no such file or directory; give an existing path, or a hub name"


def test_rebel_lcm_tiny_does_not_ignore_an_explicit_model(tmp_path):
    message = bad_input_message("rebel_lcm.py", ["--tiny", "--model", str(tmp_path), "--output_dir", str(tmp_path)])
    assert message == "--tiny builds random models instead of --model: drop one"  # trained the tiny one at abf420a


def test_a_missing_column_names_the_flag_of_that_column(tmp_path, tokenizer):
    write_jsonl(tmp_path / "pairs.jsonl", [{"query": "a question ?", "chosen": "yes"}])
    with pytest.raises(R.BadInput, match=r"no column 'rejected'.* --rejected_column"):  # only '...' at abf420a
        R.load_preferences(str(tmp_path / "pairs.jsonl"), "train", "query", "chosen", "rejected", tokenizer, (64, 24),
                           "filter", False)  # fmt: skip


def test_resume_of_a_file_names_resume(toy, tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    message = bad_input_message("rebel.py", [*toy.rl_flags, "--resume", str(tmp_path / "notes.txt")])
    assert message == f"--resume {tmp_path / 'notes.txt'} is a file, not a directory; choose another"  # --run_dir


def test_output_into_a_closed_pipe_is_one_line_that_names_the_pipe():
    """`rebel.py --help | head -1`: the reader leaves early; the message is about the pipe, not about a path."""
    proc = subprocess.Popen([sys.executable, "rebel.py", "--help"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1)  # fmt: skip
    proc.stdout.close()  # the reader ends before the help is printed
    stderr = proc.stderr.read()
    assert error_line(stderr, proc.wait()) == "error: the output's reader closed its pipe (BrokenPipeError)"
