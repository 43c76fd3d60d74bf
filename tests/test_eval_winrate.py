import json
import os
import re
import subprocess
import sys
import time

import pytest
from eval_helpers import GARBLED, GOOD, FakeJudgeServer, best_summary, toy_queries, weak_summary, write_eval_csv

from eval.winrate import (
    Args,
    JudgeCache,
    load_template,
    main,
    parse_preference,
    policy_is_a,
    select_rows,
    split_credentials,
    strip_special_tokens,
    wilson_interval,
)

SECRET = "sk-test-NEVER-WRITE-ME-123"


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with FakeJudgeServer() as s:
        yield s


def openai_args(server, csvs, out, **kw):
    flags = {"base_url": server.base_url, "output_dir": str(out), "all": True, "concurrency": 4}
    return Args(csvs=tuple(str(c) for c in csvs), judge="openai", **{**flags, **kw})


def marked_csv(path, n=20, n_policy_good=15, n_garbled=0):
    """Policy summaries marked GOOD in the first n_policy_good rows, the reference marked GOOD in the others."""
    queries = toy_queries(n)
    policy = [f"policy {GOOD if i < n_policy_good else 'meh'} {i}" for i in range(n)]
    reference = [f"reference {'meh' if i < n_policy_good else GOOD} {i}" for i in range(n)]
    for i in range(n_garbled):
        policy[i] += f" {GARBLED}"
    write_eval_csv(path, policy, reference, queries)
    return path


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Comparison: A is better.\nPreferred: A", "A"),
        ("Comparison: x\nPreferred: **B**", "B"),
        ('**Preferred:** "A"', "A"),
        ("Preferred: Summary B", "B"),
        ("Comparison: Summary A is short.\nPreferred:\nB", "B"),
        ("The format is Preferred: <A or B>.\nPreferred: B", "B"),
        ("Comparison: both good.\n\nB\n", "B"),
        ("Comparison: I prefer neither.", None),
        ("Preferred: a tie", None),
        # Both letters, or a letter inside a sentence, are no answer: only one of A or B, alone, is.
        ("Comparison: both fine.\nPreferred: A or B", None),
        ('Preferred: <"A" or "B">', None),
        ("Preferred: A, B", None),
        ("Preferred: A and B are equally good", None),
        ("Comparison: A is preferred over B.\nPreferred: A or B", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_preference(answer, expected):
    assert parse_preference(answer) == expected


def test_ambiguous_answers_are_parse_failures_not_wins(server, tmp_path, capsys):
    csv = marked_csv(tmp_path / "eval.csv", n=20, n_policy_good=20)
    server.answer = "Comparison: both are fine.\nPreferred: A or B"  # every row
    with pytest.raises(SystemExit) as exit_info:
        main(openai_args(server, [csv], tmp_path / "out"))
    assert str(exit_info.value) == (
        f"error: no row of {csv} could be judged: every request failed or gave no readable preference "
        "(first unreadable answer: 'Comparison: both are fine.\\nPreferred: A or B'); each row's answer is in "
        f"{tmp_path / 'out' / 'judgments.jsonl'}"
    )
    assert "| 0/20 | 0/0/0 | 20 | 0 |" in capsys.readouterr().out  # 20 parse failures, none counted as A
    # Some rows readable: the others are reported, and the win rate is over the readable ones.
    server.answer, server.answer_rows = "Preferred: A or B", {"policy GOOD 0\n", "policy GOOD 1\n"}
    [summary] = main(openai_args(server, [csv], tmp_path / "out_some"))
    assert summary["parse_failures"] == 2 and summary["n_judged"] == 18 and summary["win_rate"] == 1.0
    assert (
        f"2 of 20 answers for {csv} state no readable preference: its win rate is over the 18 judged rows"
        in capsys.readouterr().out
    )


def test_a_csv_with_a_stray_quote_is_refused(tmp_path):
    csv = marked_csv(tmp_path / "eval.csv", n=20, n_policy_good=20)
    text = open(csv).read()
    # One unescaped quote: the quoted multi-line posts after it read as unquoted lines, i.e. as extra fragment rows.
    csv.write_text(text.replace("policy GOOD 3", '"policy GOOD 3', 1))
    with pytest.raises(SystemExit) as exit_info:
        main(Args(csvs=(str(csv),), judge="gold", output_dir=str(tmp_path / "out"), all=True))
    message = str(exit_info.value)
    assert message.startswith(f"error: {csv} is not well-formed CSV (line ") and "\n" not in message
    assert "to_csv" in message
    # Rows with a field missing (a hand-edited file) are refused too.
    csv.write_text(text.replace(",policy GOOD 3", "", 1))
    with pytest.raises(SystemExit, match=r"is not well-formed CSV \(line \d+: 5 fields, the header has 6\)"):
        main(Args(csvs=(str(csv),), judge="gold", output_dir=str(tmp_path / "out"), all=True))


def test_subset_and_coin_flip_are_seeded():
    assert select_rows(6553, 0.1, 600, seed=0) == select_rows(6553, 0.1, 600, seed=0)
    assert len(select_rows(6553, 0.1, 600, seed=0)) == 600  # the paper's 10% capped at 600
    assert len(select_rows(1000, 0.1, 600, seed=0)) == 100
    assert select_rows(50, 0.1, 600, seed=0, all_rows=True) == list(range(50))
    assert select_rows(50, 1.0, 10, seed=0) == list(range(50))
    flips = [policy_is_a(0, i) for i in range(200)]
    assert 60 < sum(flips) < 140 and flips == [policy_is_a(0, i) for i in range(200)]


def test_wilson_interval():
    low, high = wilson_interval(0.5, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(1.0, 20)[1] == 1.0 and wilson_interval(1.0, 20)[0] < 1.0


def test_template_is_the_papers_prompt():
    text, version = load_template("tldr_winrate_v1")
    assert version == "tldr_winrate_v1"
    assert text.startswith(
        "Which of the following summaries does a better job of summarizing the most important points"
    )
    for field in ("{{post}}", "{{summarya}}", "{{summaryb}}", 'Preferred: <"A" or "B">'):
        assert field in text


def test_openai_backend_win_rate_is_order_independent(server, tmp_path, capsys):
    csv = marked_csv(tmp_path / "eval.csv")
    [summary] = main(openai_args(server, [csv], tmp_path / "out"))
    assert summary["win_rate"] == 0.75 and summary["n_judged"] == 20 and summary["parse_failures"] == 0
    judgments = [json.loads(line) for line in open(tmp_path / "out" / "judgments.jsonl")]
    assert {j["policy_position"] for j in judgments} == {"A", "B"}  # both orders were exercised
    # The request carries the paper's prompt with the post and both summaries, and the key as a bearer token.
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["body"]["model"] == "gpt-4-0613"
    assert request["auth"] == f"Bearer {SECRET}"
    prompt = request["body"]["messages"][0]["content"]
    assert "### Post: SUBREDDIT: r/" in prompt and "policy GOOD" in prompt and "reference meh" in prompt
    summary_json = json.load(open(tmp_path / "out" / "summary.json"))
    assert summary_json["template_version"] == "tldr_winrate_v1" and summary_json["results"][0]["ci_method"] == "wilson"
    assert "0.750" in capsys.readouterr().out


def prompt_summaries(request: dict) -> tuple[str, str]:
    prompt = request["body"]["messages"][0]["content"]
    return re.search(r"### Summary A:\n(.*?)\n\n### Summary B:\n(.*?)\n\n", prompt, re.S).groups()


def test_special_tokens_never_reach_the_judge(server, tmp_path):
    # The TL;DR dataset's reference is " summary<|endoftext|>"; the policy's decoded response has no EOS marker.
    queries = toy_queries(12)
    policy = [f" my summary {i} ." for i in range(12)]
    reference = [f" my summary {i} .<|endoftext|>" for i in range(12)]
    write_eval_csv(tmp_path / "eval.csv", policy, reference, queries)
    main(openai_args(server, [tmp_path / "eval.csv"], tmp_path / "out"))
    judgments = [json.loads(line) for line in open(tmp_path / "out" / "judgments.jsonl")]
    assert {j["policy_position"] for j in judgments} == {"A", "B"}
    # Whichever position the policy has, both summaries read alike: the judge cannot tell the reference by a marker.
    assert sorted(prompt_summaries(r) for r in server.requests) == sorted((f"my summary {i} .",) * 2 for i in range(12))

    # A tokenizer's own special tokens (--tokenizer) are stripped too, from both sides.
    from transformers import AutoTokenizer

    from toy.tldr import build_tokenizer

    tokenizer = build_tokenizer(["my summary ."])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<SUMMARY_END>"]})
    tokenizer.save_pretrained(tmp_path / "tok")
    assert "<SUMMARY_END>" in AutoTokenizer.from_pretrained(tmp_path / "tok").all_special_tokens
    write_eval_csv(tmp_path / "own.csv", ["my summary .<SUMMARY_END>"] * 2, ["my summary .</s><pad>"] * 2, queries[:2])
    server.requests.clear()
    main(openai_args(server, [tmp_path / "own.csv"], tmp_path / "out_own", tokenizer=str(tmp_path / "tok")))
    assert [prompt_summaries(r) for r in server.requests] == [("my summary .", "my summary .")] * 2


@pytest.mark.parametrize(
    "text",
    [
        " a b .<|endoftext|>",
        "a b .</s>",
        "a b .<|eot_id|>",
        "a b .<|im_end|>\n",
        "a b .<end_of_turn>",
        "a b .[PAD][PAD]",
        "<s> a b .<|pad|><|pad|>",
        "a <|endoftext|>b .",
    ],
)
def test_strip_special_tokens(text):
    assert strip_special_tokens(text).replace("  ", " ") == "a b ."
    assert strip_special_tokens("x < y | z and <b>bold</b>") == "x < y | z and <b>bold</b>"


def test_retries_parse_failures_and_cache(server, tmp_path):
    csv = marked_csv(tmp_path / "eval.csv", n=12, n_policy_good=12, n_garbled=3)
    server.failures = [429, 500, 503, 429]
    out = tmp_path / "out"
    [summary] = main(openai_args(server, [csv], out))
    assert len(server.requests) == 12 + 4  # every failure was retried
    assert summary["failed_requests"] == 0 and summary["parse_failures"] == 3
    assert summary["n_judged"] == 9 and summary["win_rate"] == 1.0  # failures are neither losses nor coin flips
    assert sum(1 for _ in open(out / "judge_cache.jsonl")) == 12

    n_before = len(server.requests)
    [again] = main(openai_args(server, [csv], out))
    assert len(server.requests) == n_before  # the rerun is answered from the cache
    assert again == summary
    with open(out / "judge_cache.jsonl", "a") as f:
        f.write('{"key": "cut short by a ki')  # an interrupted write is skipped, not fatal
    assert main(openai_args(server, [csv], out)) == [summary] and len(server.requests) == n_before


def test_cache_survives_a_cut_short_line(tmp_path):
    path = str(tmp_path / "cache.jsonl")
    JudgeCache(path).put("k1", "m", "v1", "Preferred: A")
    with open(path, "a") as f:
        f.write('{"key": "k2", "ans')
    cache = JudgeCache(path)
    cache.put("k3", "m", "v1", "Preferred: B")
    assert JudgeCache(path).answers == {"k1": "Preferred: A", "k3": "Preferred: B"}


def test_cache_key_covers_every_setting_that_changes_the_answer(server, tmp_path):
    csv = marked_csv(tmp_path / "eval.csv", n=4, n_policy_good=4)
    out = tmp_path / "out"
    main(openai_args(server, [csv], out))
    assert len(server.requests) == 4
    main(openai_args(server, [csv], out, temperature=0.7))
    assert len(server.requests) == 8 and server.requests[-1]["body"]["temperature"] == 0.7
    main(openai_args(server, [csv], out, max_tokens=64))
    assert len(server.requests) == 12 and server.requests[-1]["body"]["max_tokens"] == 64
    main(openai_args(server, [csv], out, model="another-judge"))
    assert len(server.requests) == 16
    other_endpoint = server.base_url.replace("127.0.0.1", "localhost")
    main(openai_args(server, [csv], out, base_url=other_endpoint))
    assert len(server.requests) == 20
    # Every one of those answers is cached under its own key: the same runs again send nothing.
    for kw in ({}, {"temperature": 0.7}, {"max_tokens": 64}, {"model": "another-judge"}, {"base_url": other_endpoint}):
        main(openai_args(server, [csv], out, **kw))
    assert len(server.requests) == 20 and sum(1 for _ in open(out / "judge_cache.jsonl")) == 20


def test_rejected_key_stops_the_run_with_one_error_line(server, tmp_path):
    csv = marked_csv(tmp_path / "eval.csv", n=12, n_policy_good=12)
    server.reject_with_key = True  # a 401 whose body quotes the key
    command = [sys.executable, "-m", "eval.winrate", str(csv), "--all", "--concurrency", "2"]
    command += ["--base_url", server.base_url, "--output_dir", str(tmp_path / "out")]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: {server.base_url} rejected the API key (Error code: 401")
    assert "$OPENAI_API_KEY" in last_line and "--api_key_env" in last_line
    assert "Traceback" not in result.stderr
    assert len(server.requests) <= 2  # the requests in flight, not one per row
    assert SECRET not in result.stdout + result.stderr and "Incorrect API key provided: ***" in last_line
    for name in os.listdir(tmp_path / "out"):
        assert SECRET not in open(tmp_path / "out" / name).read()


def test_failed_requests_are_reported_and_none_judged_is_an_error(server, tmp_path, capsys):
    csv = marked_csv(tmp_path / "eval.csv", n=8, n_policy_good=8)
    server.failures = [400, 400]  # not retried: this row's request is bad, not the endpoint
    [summary] = main(openai_args(server, [csv], tmp_path / "out"))
    assert summary["failed_requests"] == 2 and summary["n_judged"] == 6 and summary["win_rate"] == 1.0
    assert f"2 of 8 requests for {csv} failed: its win rate is over the 6 judged rows" in capsys.readouterr().out
    # A rerun sends only the two failed rows.
    n_before = len(server.requests)
    [summary] = main(openai_args(server, [csv], tmp_path / "out"))
    assert len(server.requests) == n_before + 2 and summary["n_judged"] == 8

    server.failures = [400] * 8
    with pytest.raises(SystemExit) as exit_info:
        main(openai_args(server, [csv], tmp_path / "out_failed"))
    message = str(exit_info.value)
    assert message.startswith(f"error: no row of {csv} could be judged: every request failed")
    assert "(first error: Error code: 400 - try again (/v1/chat/completions))" in message
    judgments = [json.loads(line) for line in open(tmp_path / "out_failed" / "judgments.jsonl")]
    assert len(judgments) == 8 and all(j["error"] for j in judgments)  # the outputs are written before exiting


def test_progress_bar_on_stderr(tmp_path, capsys):
    queries = toy_queries(30)
    write_eval_csv(
        tmp_path / "eval.csv", [best_summary(q) for q in queries], [weak_summary(q) for q in queries], queries
    )
    main(Args(csvs=(str(tmp_path / "eval.csv"),), judge="gold", output_dir=str(tmp_path / "out"), all=True))
    assert re.search(r"eval\.csv: 100%.*30/30", capsys.readouterr().err)


def test_a_hanging_endpoint_stops_the_run(server, tmp_path):
    # The defaults surface a dead endpoint in about a minute: (1 + max_retries) attempts of request_timeout_s.
    defaults = Args(csvs=())
    assert (1 + defaults.max_retries) * defaults.request_timeout_s <= 75
    csv = marked_csv(tmp_path / "eval.csv", n=20, n_policy_good=20)
    server.hang = True
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(openai_args(server, [csv], tmp_path / "out", request_timeout_s=0.3, max_retries=1))
    assert time.perf_counter() - start < 5
    assert str(exit_info.value).startswith(f"error: no answer from {server.base_url} in 2 attempts of 0.3 s")
    assert "--request_timeout_s" in str(exit_info.value)
    assert len(server.requests) <= 4 * 2  # the rows in flight, each tried twice; the other rows are never sent


def test_connection_refused_stops_the_run(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    csv = marked_csv(tmp_path / "eval.csv", n=2, n_policy_good=2)
    args = Args(csvs=(str(csv),), base_url="http://127.0.0.1:9/v1", output_dir=str(tmp_path), all=True, max_retries=1)
    with pytest.raises(SystemExit, match=r"^error: no answer from http://127.0.0.1:9/v1 in 2 attempts .*Connection"):
        main(args)


def test_split_credentials():
    assert split_credentials("https://api.openai.com/v1") == ("https://api.openai.com/v1", [])
    assert split_credentials("https://me:sk-123@proxy.example:8443/v1?api-version=2024-06-01&api_key=sk-456") == (
        "https://proxy.example:8443/v1?api-version=2024-06-01",
        ["me", "sk-123", "sk-456"],
    )
    assert split_credentials("https://sk-789@host/v1?token=t1&key=k2&sig=s3") == (
        "https://host/v1",
        ["sk-789", "t1", "k2", "s3"],
    )


def test_credentials_in_base_url_are_never_written_or_printed(server, tmp_path, capsys):
    csv = marked_csv(tmp_path / "eval.csv", n=6, n_policy_good=3)
    host = server.base_url.split("//")[1]
    base_url = f"http://judge:URL-PASSWORD@{host}?api-version=7&api_key=QUERY-KEY"
    server.failures = [400]  # its error body quotes the request path, query included
    [summary] = main(openai_args(server, [csv], tmp_path / "out", base_url=base_url))
    assert summary["n_judged"] == 5 and summary["failed_requests"] == 1  # the endpoint is used as given ...
    assert server.requests[0]["path"] == "/v1/chat/completions?api-version=7&api_key=QUERY-KEY"
    recorded = json.load(open(tmp_path / "out" / "summary.json"))["config"]["base_url"]
    assert recorded == f"http://{host}?api-version=7"  # ... and recorded without its credentials
    [failed] = [json.loads(line) for line in open(tmp_path / "out" / "judgments.jsonl") if '"error": "' in line]
    assert failed["error"] == "Error code: 400 - try again (/v1/chat/completions?api-version=7&api_key=***)"
    captured = capsys.readouterr()
    for secret in ("URL-PASSWORD", "QUERY-KEY", SECRET):
        assert secret not in captured.out + captured.err
        for name in os.listdir(tmp_path / "out"):
            assert secret not in open(tmp_path / "out" / name).read()
    # The same endpoint without the credentials shares the cache (they are not part of the key): only the failed row
    # is sent again.
    main(openai_args(server, [csv], tmp_path / "out", base_url=recorded))
    assert len(server.requests) == 6 + 1


def test_gold_judge_on_toy_csv(tmp_path):
    queries = toy_queries(40)
    best, weak = [best_summary(q) for q in queries], [weak_summary(q) for q in queries]
    write_eval_csv(tmp_path / "good.csv", best, weak, queries)
    write_eval_csv(tmp_path / "bad.csv", weak, best, queries)
    write_eval_csv(tmp_path / "same.csv", best, best, queries)
    args = Args(
        csvs=tuple(str(tmp_path / f"{n}.csv") for n in ("good", "bad", "same")),
        judge="gold",
        output_dir=str(tmp_path / "out"),
        all=True,
    )
    good, bad, same = main(args)
    assert (good["win_rate"], bad["win_rate"], same["win_rate"]) == (1.0, 0.0, 0.5)
    assert good["n_judged"] == 40 and same["ties"] == 40
    # The default protocol judges a seeded 10% subset.
    [subset] = main(Args(csvs=(str(tmp_path / "good.csv"),), judge="gold", output_dir=str(tmp_path / "out")))
    assert subset["n_selected"] == 4
