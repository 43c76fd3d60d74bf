"""Real inputs that used to give wrong results, lose the model or crash: each case is refused in one line naming the
fix, or handled as a user would expect. The helpers are rebel.py's appendix, the same in every script (test_skeleton)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pandas as pd
import pytest
import torch
from conftest import ENV, run_script, script_command
from rl_checks import bad_input_message, run_in_process

import rebel as R


def rl(toy, tmp_path, *flags):
    return [*toy.rl_flags, "--output_dir", "", "--run_dir", str(tmp_path / "run"), *flags]


@pytest.fixture
def tokenizer(toy):
    return R.load_tokenizer(toy.sft)


def prompts_of(path, split, tokenizer, column="query", reference=None):
    return R.load_prompts(path, split, column, reference, tokenizer, 64, 24, "filter")


# ---------------------------------------------------------------------------------------------- data


def test_a_saved_dataset_dict_keeps_its_exact_split_names(tmp_path, tokenizer):
    from datasets import Dataset, DatasetDict

    rows = lambda n, tag: Dataset.from_dict({"query": [f"{tag} {i} ?\n\nTL;DR:" for i in range(n)]})  # noqa: E731
    DatasetDict(
        {
            "train_sft": rows(3, "sft"),
            "train_prefs": rows(5, "prefs"),
            "test_sft": rows(2, "a"),
            "test_prefs": rows(4, "b"),
        }
    ).save_to_disk(tmp_path / "uf")
    dataset, prompts, *_ = prompts_of(str(tmp_path / "uf"), "train_prefs", tokenizer)
    assert len(dataset) == 5 and all(p.startswith("prefs") for p in prompts)  # not train_sft + train_prefs together
    with pytest.raises(R.BadInput, match=r"no split 'train'; its splits are \['train_sft', 'train_prefs'"):
        prompts_of(str(tmp_path / "uf"), "train", tokenizer)


@pytest.mark.parametrize(
    "cell, shown",
    [("", "''"), ("   ", "'   '"), (None, "'None'"), (7, "'7'"), ([{"role": "user"}], "role")],
    ids=["empty", "whitespace", "none", "int", "message-without-content"],
)
def test_a_bad_cell_is_named_by_column_and_row(tmp_path, tokenizer, cell, shown):
    rows = [{"query": "fine ?\n\nTL;DR:", "ref": "ok"}] * 3 + [{"query": cell, "ref": "ok"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(R.BadInput, match=f"column 'query', row 3: .*{shown}"):
        prompts_of(str(tmp_path / "d.jsonl"), "train", tokenizer)


def test_a_response_conversation_must_end_with_the_assistants_answer(tmp_path, tokenizer):
    """A reference (or --mu_column, chosen, rejected) conversation ending with a user turn would make that question
    the response: refused, row named. One ending with the answer is read as its last message."""
    answer = [{"role": "user", "content": "q ?"}, {"role": "assistant", "content": "i feel fine ."}]
    rows = [{"query": "fine ?\n\nTL;DR:", "ref": answer, "text": "i feel fine ."}] * 3
    (tmp_path / "ok.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    *_, references, _ = prompts_of(str(tmp_path / "ok.jsonl"), "train", tokenizer, reference="ref")
    *_, from_text, _ = prompts_of(str(tmp_path / "ok.jsonl"), "train", tokenizer, reference="text")
    assert torch.equal(references, from_text)  # the conversation's answer, as the same text in a plain column
    rows[2] = {**rows[2], "ref": [*answer, {"role": "user", "content": "and then ?"}]}
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(R.BadInput, match="column 'ref', row 2: the conversation ends with a 'user' message"):
        prompts_of(str(tmp_path / "d.jsonl"), "train", tokenizer, reference="ref")


def test_a_csv_with_two_columns_of_one_name_is_refused(tmp_path, tokenizer):
    (tmp_path / "d.csv").write_text("query,query\nfirst ?,second ?\n")
    with pytest.raises(R.BadInput, match=r"several columns named \['query'\]"):
        prompts_of(str(tmp_path / "d.csv"), "train", tokenizer)


def test_a_json_syntax_error_names_the_file_and_line(tmp_path, tokenizer):
    (tmp_path / "d.jsonl").write_text('{"query": "a ?"}\n{"query": "b ?"}\n{"query": "c ?",}\n')
    with pytest.raises(R.BadInput, match="d.jsonl', line 3: not valid JSON"):
        prompts_of(str(tmp_path / "d.jsonl"), "train", tokenizer)


def test_pairs_without_a_preference(tmp_path, tokenizer, capsys):
    same = [{"query": f"q {i} ?", "chosen": "a b", "rejected": "a b"} for i in range(4)]
    (tmp_path / "same.jsonl").write_text("\n".join(json.dumps(r) for r in same))
    args = ("train", "query", "chosen", "rejected", tokenizer, (64, 24), "filter", False)
    with pytest.raises(R.BadInput, match="every pair .* has chosen == rejected"):
        R.load_preferences(str(tmp_path / "same.jsonl"), *args)
    same[0]["rejected"] = "c d"
    (tmp_path / "some.jsonl").write_text("\n".join(json.dumps(r) for r in same))
    pairs, _ = R.load_preferences(str(tmp_path / "some.jsonl"), *args)
    assert len(pairs) == 4 and "3 of 4 pairs" in capsys.readouterr().out


def test_a_response_longer_than_response_length_is_cut_with_a_warning(tmp_path, tokenizer, capsys):
    """A chosen response over --response_length tokens (EOS included) is cut and given an EOS: dpo.py and sft.py then
    teach the model to stop there, so the count of such responses is said, by column."""
    rows = [{"query": "q ?", "chosen": "a " * 30, "rejected": "b c"}, {"query": "r ?", "chosen": "a", "rejected": "d"}]
    (tmp_path / "long.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pairs, _ = R.load_preferences(str(tmp_path / "long.jsonl"), "train", "query", "chosen", "rejected", tokenizer,
                                  (64, 24), "filter", False)  # fmt: skip
    err = capsys.readouterr().err
    assert "warning: 1 responses in column 'chosen'" in err and "cut to its first 23 tokens and an EOS" in err, err
    assert "column 'rejected'" not in err
    assert (pairs[0, 0, 64:] == tokenizer.eos_token_id).sum() == 1 and pairs[0, 0, -1] == tokenizer.eos_token_id


def test_a_run_that_fails_to_start_leaves_no_empty_folder(toy, tmp_path):
    """The run and output folders a new run creates (their parents too) are removed at exit when nothing was written
    to them; a folder that existed before is kept."""
    (tmp_path / "mine").mkdir()
    empty = tempfile.mkdtemp()  # a policy folder that holds no model: refused when loaded, after the folders are made
    for run_dir in ("new/run", "mine", "mine/run"):
        flags = [*toy.rl_flags, "--sft_model_path", empty, "--run_dir", str(tmp_path / run_dir)]
        out = run_script("rebel.py", *flags, "--output_dir", str(tmp_path / "out/policy"), check=False)
        assert out.returncode == 1 and "holds no model" in out.stdout and "Traceback" not in out.stdout, out.stdout
        assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"] and not list((tmp_path / "mine").iterdir())


def test_fewer_evaluation_prompts_than_processes():
    assert R.rank_share(5, 1, 2) == [1, 3]
    with pytest.raises(R.BadInput, match="1 evaluation examples cannot be shared by 2 processes"):
        R.rank_share(1, 0, 2)


# ---------------------------------------------------------------------------------------------- models and reward


def test_a_reward_model_saved_without_tokenizer_reads_the_policys(toy, tmp_path, tokenizer, capsys):
    """transformers builds an empty tokenizer from a directory without tokenizer files: every response then scored
    the same constant. The policy's tokenizer is taken instead, with a note."""
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(toy.rm).save_pretrained(tmp_path / "rm")
    assert R.load_reward_tokenizer(None, str(tmp_path / "rm"), tokenizer) is tokenizer
    reward = R.load_reward(None, str(tmp_path / "rm"), None, tokenizer, torch.float32, torch.device("cpu"))
    assert reward.model_tokenizer is None  # it reads the policy's token ids as they are
    assert "has no tokenizer: it reads the policy's tokens" in capsys.readouterr().err
    # ppo.py's critic starts from that reward model too: the note is said once.
    flags = [*toy.rl_flags, "--reward_model_path", str(tmp_path / "rm"), "--total_episodes", "8"]
    run_in_process("ppo.py", [*flags, "--output_dir", "", "--run_dir", str(tmp_path / "run")])
    assert capsys.readouterr().err.count("has no tokenizer") == 1
    with pytest.raises(R.BadInput, match="holds no tokenizer"):
        R.load_tokenizer(str(tmp_path / "rm"))


def test_tokenizers_that_differ_only_in_their_pad_are_the_same(toy, tokenizer):
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(toy.sft)
    other.pad_token = "job"  # a real token of the policy's vocabulary, where the policy's pad is its own [PAD]
    assert other.pad_token_id == tokenizer.get_vocab()["job"] != tokenizer.pad_token_id
    assert R.same_tokenizer(tokenizer, other) and R.same_tokenizer(other, tokenizer)


@pytest.mark.parametrize(
    "fn, message",
    [
        (lambda p, r: [1.0] * (len(r) - 1), "returned .* one number per response"),
        (lambda p, r: None, "failed on 4 responses"),
        (lambda p, r: ["good"] * len(r), "failed on 4 responses"),
        (lambda p, r: 1 / 0, "failed on 4 responses: ZeroDivisionError"),
    ],
    ids=["count", "none", "strings", "raises"],
)
def test_a_reward_function_that_returns_nonsense(tokenizer, fn, message):
    reward = R.Reward(tokenizer, fn=fn)
    with pytest.raises(R.BadInput, match=f"--reward_fn <lambda> {message}"):
        reward(torch.ones(4, 10, dtype=torch.long), 5, ["x ?"] * 4)


def test_an_adapter_whose_base_is_gone(tmp_path):
    (tmp_path / "adapter").mkdir()
    config = {"peft_type": "LORA", "base_model_name_or_path": str(tmp_path / "gone"), "r": 4, "target_modules": ["x"]}
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(R.BadInput, match="is a LoRA adapter whose base model .*gone' cannot be loaded"):
        R.load_policy(str(tmp_path / "adapter"), torch.float32)


def test_lora_targets_that_match_nothing_list_the_real_names(toy, tmp_path):
    message = bad_input_message("rebel.py", rl(toy, tmp_path, "--lora_target_modules", "q_proj"))
    assert "--lora_target_modules" in message and "query_key_value" in message


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--noptepochs", "0"], "--noptepochs must be >= 1; got 0"),
        (["--temperature", "0"], "--temperature must be > 0; got 0.0"),
        (["--num_eval_prompts", "0"], "--num_eval_prompts must be >= 1; got 0"),
        (["--save_freq", "-1"], "--save_freq must be >= 0"),
    ],
    ids=["noptepochs", "temperature", "eval-prompts", "save-freq"],
)
def test_numeric_flags_are_checked_at_start(toy, tmp_path, flags, message):
    assert message in bad_input_message("rebel.py", rl(toy, tmp_path, *flags))


def test_full_fine_tuning_in_bf16_starts_at_kl_zero(toy, tmp_path):
    """The reference is kept in the policy's fp32 (a bf16 copy computed another distribution): KL 0 at update 0."""
    flags = [*rl(toy, tmp_path, "--no-lora", "--precision", "bf16", "--total_episodes", "8"), "--num_eval_prompts", "4"]
    run_script("rebel.py", *flags)
    assert pd.read_csv(tmp_path / "run" / "eval_000000.csv").kl.abs().max() == 0.0


# ---------------------------------------------------------------------------------------------- runs and saving


def test_a_run_directory_held_by_a_live_process_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / ".lock").write_text(str(holder.pid))
        with pytest.raises(R.BadInput, match=f"is in use by process {holder.pid}"):
            R.lock_run_dir(str(tmp_path / "run"))
    finally:
        holder.kill()
        holder.wait()
    R.lock_run_dir(str(tmp_path / "run"))  # a dead holder's lock is taken over
    assert (tmp_path / "run" / ".lock").read_text() == str(os.getpid())


def fake_checkpoint(path, **trainer):
    os.makedirs(path)
    with open(os.path.join(path, "trainer.json"), "w") as f:
        json.dump({"update": 2, "world_size": 1, "flags": {}, **trainer}, f)
    return str(path)


def test_an_edited_update_counter_is_refused(tmp_path):
    path = fake_checkpoint(tmp_path / "checkpoints" / "update_000002", update=99)
    with pytest.raises(R.BadInput, match="says update 99, which is not this checkpoint's"):
        R.load_checkpoint(path, None, None, {}, 1)


def test_a_checkpoint_past_the_runs_last_update_is_refused(toy, tmp_path):
    """Name and counter agree, but update 99 of a 2-update run: resuming it would train nothing and exit 0."""
    flags = rl(toy, tmp_path)
    run_in_process("rebel.py", flags)
    last = tmp_path / "run" / "checkpoints" / "update_000002"
    trainer = json.loads((last / "trainer.json").read_text())
    (last / "trainer.json").write_text(json.dumps({**trainer, "update": 99}))
    last.rename(last.with_name("update_000099"))
    message = bad_input_message("rebel.py", [*flags, "--resume", str(tmp_path / "run")])
    assert "update 99 is past the run's 2 updates" in message


def test_resuming_another_scripts_run_says_so(tmp_path):
    path = fake_checkpoint(tmp_path / "checkpoints" / "update_000002", script="ppo.py")
    with pytest.raises(R.BadInput, match="that is a run of ppo.py; resume it with it"):
        R.load_checkpoint(path, None, None, {}, 1)


def test_a_run_killed_in_its_first_checkpoint_starts_over_on_resume(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "update_000002.tmp").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"update": 1}\n')
    flags = {"resume": str(run), "run_dir": None, "exp_name": "rebel", "seed": 1, "output_dir": ""}
    checkpoint, run_dir, _, output_dir = R.open_run(flags)
    assert checkpoint is None and run_dir == str(run) and output_dir == ""
    assert sorted(os.listdir(run)) == [".lock", "checkpoints", "metrics.jsonl", "run.json"]  # nothing deleted


def test_a_failed_final_save_says_how_to_get_the_model(tokenizer):
    class Unsaveable:
        def save_pretrained(self, *a, **k):
            raise OSError(28, "No space left on device")

    with pytest.raises(R.BadInput, match="No space left on device.*--resume <its run_dir> --output_dir"):
        R.save_policy(Unsaveable(), tokenizer, "/tmp/out", False, False)


def test_a_checkpoint_on_a_full_disk_is_one_line_and_keeps_the_earlier_ones(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    run = str(tmp_path / "run")
    first = R.save_checkpoint(run, 1, model, optimizer, {"update": 1}, keep=2)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dcp, "save", full)
    with pytest.raises(R.BadInput, match=r"cannot write the checkpoint .*update_000002 .*No space left.*--resume"):
        R.save_checkpoint(run, 2, model, optimizer, {"update": 2}, keep=2)
    assert R.find_checkpoint(run) == first  # the earlier checkpoint is intact, and --resume finds it


def test_a_reward_model_with_its_own_tokenizer_reads_the_response_with_its_space(tokenizer, monkeypatch):
    """Decoded on its own, a response loses the space that joins it to its prompt ("TL;DR:a summary"); decoded after
    its prompt it keeps it, and the text is tokenised with the reward tokenizer's special tokens (reward.py's)."""
    seen, render = [], R.reward_text
    monkeypatch.setattr(R, "reward_text", lambda *a: seen.append(render(*a)) or seen[-1])
    calls = []

    class Model:
        def __call__(self, inputs, pad_id):
            calls.append(inputs)
            return torch.zeros(len(inputs))

    prompt = "a b c\n\nTL;DR:"
    query, response = tokenizer(prompt).input_ids, tokenizer(" i feel .", add_special_tokens=False).input_ids
    R.Reward(tokenizer, Model(), tokenizer)(torch.tensor([query + response]), len(query), [prompt])
    assert seen == [prompt + " i feel ." + tokenizer.eos_token]
    assert calls[0][0].tolist() == tokenizer(seen[0]).input_ids  # with add_special_tokens, as reward.py tokenises


def test_evaluation_does_not_change_the_training(toy, tmp_path):
    """--eval_freq may change on --resume: evaluation samples from its own random stream, so the training's rollouts
    are the same however often the run evaluates."""
    rows = {}
    for freq in ("0", "1"):
        run = tmp_path / f"run{freq}"
        flags = [
            *toy.rl_flags,
            "--total_episodes",
            "24",
            "--eval_freq",
            freq,
            "--output_dir",
            "",
            "--run_dir",
            str(run),
        ]
        run_script("rebel.py", *flags)
        lines = (run / "metrics.jsonl").read_text().splitlines()
        rows[freq] = [{k: v for k, v in json.loads(x).items() if not k.startswith(("time/", "memory/"))} for x in lines]
    assert rows["0"] == rows["1"]


# ---------------------------------------------------------------------------------------------- issue 19, the rest


@pytest.mark.parametrize("script", ["rebel.py", "ppo.py", "sft.py", "reward.py"])
def test_a_prompt_and_response_longer_than_the_models_positions_is_refused(toy, tmp_path, script):
    """The toy model has 256 positions: 200 + 100 tokens would index past its position table at the first evaluation
    (GPT-2's learned positions; rotary ones were never trained there). sft.py trains on the prompt and its reference,
    reward.py on the prompt and each response: the same sum."""
    long = ["--query_length", "200", "--response_length", "100"]
    data = ["--query_dataset", toy.tldr, "--output_dir", "", "--run_dir", str(tmp_path / "run"), *long]
    flags = {
        "sft.py": [*data, "--base_model", toy.base],
        "reward.py": [*data, "--sft_model_path", toy.sft, "--preference_dataset", toy.preference],
    }.get(script, rl(toy, tmp_path, *long))
    message = bad_input_message(script, flags)
    assert "--query_length 200 + --response_length 100 = 300 tokens" in message and "256 positions" in message
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_reward_model_with_fewer_positions_than_prompt_and_response_is_refused(toy, tmp_path):
    """The policy has room for 64 + 24 tokens, the reward model (a copy of the toy's, its config cut to 64 positions)
    has not: past its positions it would score with positions it never trained on (or index past a learned table)."""
    shutil.copytree(toy.rm, tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    (tmp_path / "rm" / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    flags = rl(toy, tmp_path, "--reward_model_path", str(tmp_path / "rm"))
    message = bad_input_message("rebel.py", flags)
    assert re.search(
        r"the reward model reads (6[5-9]|[78]\d) tokens \(prompt and response\), more than its 64 positions", message
    )
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == ""  # refused at the first evaluation, before update 1


def test_the_position_limit_is_read_from_whichever_field_the_config_has():
    from types import SimpleNamespace as Config

    R.check_positions(Config(max_position_embeddings=88), (64, 24), "m")
    R.check_positions(Config(), (10**6, 10**6), "m")  # no limit in the config (relative positions): no check
    for field in ("max_position_embeddings", "n_positions", "max_seq_len"):
        with pytest.raises(R.BadInput, match="= 89 tokens is more than the 88 positions of the model m"):
            R.check_positions(Config(**{field: 88}), (64, 25), "m")


def test_a_reward_model_with_two_labels_names_num_labels(toy, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(toy.rm, num_labels=2, ignore_mismatched_sizes=True)
    model.save_pretrained(tmp_path / "rm2")
    with pytest.raises(R.BadInput, match="has num_labels=2; a reward model needs num_labels=1"):
        R.load_reward_model(str(tmp_path / "rm2"), torch.float32)


LATE_SIGNAL = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
import rebel
signals = rebel.stop_signals()
os.kill(os.getpid(), signal.SIGTERM)  # the first: the run checkpoints and exits
time.sleep(0.1)


class SecondSignal:  # the second, in Python's last clean-up (module teardown), where its handlers are gone
    def __del__(self, kill=os.kill, pid=os.getpid(), sig=signal.SIGTERM, sleep=time.sleep):
        kill(pid, sig)
        sleep(0.1)


late = SecondSignal()
sys.exit(128 + signals[0])
"""


def test_a_second_signal_while_the_process_exits_keeps_the_exit_code(tmp_path):
    """Python restores the default handlers before its last clean-up: a second SIGTERM there killed the process
    (-15, not the documented exit code 143)."""
    (tmp_path / "late.py").write_text(LATE_SIGNAL.format(root=os.path.dirname(R.__file__)))
    proc = subprocess.run([sys.executable, str(tmp_path / "late.py")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_two_signals_in_quick_succession_exit_by_the_signal_without_a_traceback(toy, tmp_path, sig):
    """The first stops the run after its update with a checkpoint; the second, 0.05 s later, while the script writes
    it or exits, stops it at once: exit code 128 + signal (143, 130) and no traceback, wherever it lands."""
    run = tmp_path / "run"
    flags = [*rl(toy, tmp_path, "--total_episodes", "800")]
    proc = subprocess.Popen(
        script_command("rebel.py", flags), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text()):
        time.sleep(0.02)
    proc.send_signal(sig)
    time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig and "Traceback" not in out, (proc.returncode, out[-3000:])
