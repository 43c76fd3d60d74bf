"""Win rate of a policy's summaries against the human references, judged by an LLM or by the toy gold judge.

This is the paper's "GPT-4 win rate" (Section 4.1, Appendix I.1.5): a judge model reads a post and two
summaries, one from the policy and one reference, placed as A/B by a coin flip, and states which it
prefers. Ties count half. The paper judges a random 10% subset of the test set (600 prompts) with
gpt-4-0613; those are the defaults here.

Input: the evaluation CSVs that the training scripts write (columns `query, postprocessed_response,
reference_response, ...`), one summary row per file. Every judge answer is appended to a JSON-lines
cache as soon as it arrives, keyed by a hash of the endpoint and the whole request (model, prompt, temperature,
max_tokens), so an interrupted run resumes without paying twice. An answer without a readable "Preferred: A/B" (one
letter alone: "Preferred: A or B" is none) is a *parse failure*: it is counted and reported, never turned into a coin
flip or a loss. A rejected key or an endpoint that does not answer stops the run with one `error:` line and exit code 1.

    # any OpenAI-compatible endpoint; the key is read from $OPENAI_API_KEY and never written anywhere
    python -m eval.winrate runs/rebel/eval.csv runs/ppo/eval.csv --output_dir winrate_out
    # offline: the toy task's programmatic judge (toy/tldr.py)
    python -m eval.winrate toy_runs/eval.csv --judge gold --all
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import re
import sys
import threading
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Literal

import pandas as pd
import tyro
from tqdm import tqdm

from eval import BadInput, print_error
from toy.tldr import gold_judge, gold_score

PROMPT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")


@dataclass
class Args:
    csvs: tyro.conf.Positional[tuple[str, ...]]
    """evaluation CSV(s) with columns query, postprocessed_response, reference_response"""
    judge: Literal["openai", "gold"] = "openai"
    """`openai`: any OpenAI-compatible chat-completions endpoint; `gold`: the toy task's programmatic judge"""
    output_dir: str = "winrate_out"
    """where judgments.jsonl, summary.json and (by default) the judge cache are written"""

    # subset, as in the paper: "a randomly sampled subset (10%) of the test set with 600 samples"
    subset_frac: float = 0.1
    """fraction of each CSV's rows to judge (1.0 = every row)"""
    max_samples: int = 600
    """cap on the number of judged rows per CSV (0 = no cap)"""
    all: bool = False
    """judge every row (overrides subset_frac and max_samples)"""
    seed: int = 0
    """seeds the subset and the A/B coin flips; the same seed picks the same prompts in every CSV"""

    # OpenAI-compatible backend
    base_url: str = "https://api.openai.com/v1"
    """endpoint root; requests go to {base_url}/chat/completions. Credentials in it (user:key@, ?api_key=) are sent
    but never recorded or printed"""
    model: str = "gpt-4-0613"
    """judge model (the paper's, Appendix I.1.5)"""
    api_key_env: str = "OPENAI_API_KEY"
    """environment variable holding the API key (the key itself is never logged or written)"""
    template: str = "tldr_winrate_v1"
    """prompt template: a name in eval/prompts/ or a path to a .txt file; its file stem is the recorded version"""
    temperature: float = 0.0
    """judge sampling temperature (the paper does not state it; 0 makes judgments as repeatable as the API allows)"""
    max_tokens: int = 256
    """judge answer length cap; the requested answer is two lines"""
    concurrency: int = 8
    """requests in flight at once"""
    max_retries: int = 2
    """retries per request on 429, 5xx, timeouts and connection errors (the openai client's backoff: 0.5 s,
    doubling, at most 8 s, or the server's Retry-After)"""
    request_timeout_s: float = 20.0
    """timeout of one request. A dead endpoint stops the run after (1 + max_retries) * request_timeout_s, ~1 min"""
    cache: str = ""
    """judge cache (JSON lines); default {output_dir}/judge_cache.jsonl"""
    tokenizer: str = ""
    """a tokenizer (path or hub name) whose special tokens are stripped from both summaries too, besides the usual ones"""


# ---------------------------------------------------------------------------------------------------------------------
# Prompt, subset, A/B order and answer parsing (pure functions, tested directly)


def load_template(template: str) -> tuple[str, str]:
    """Returns (text, version). The version is the file stem, e.g. tldr_winrate_v1: bump it when you edit the text."""
    path = template if os.path.exists(template) else os.path.join(PROMPT_DIR, f"{template}.txt")
    with open(path) as f:
        text = f.read()
    return text, os.path.splitext(os.path.basename(path))[0]


def format_prompt(template: str, post: str, summary_a: str, summary_b: str) -> str:
    # str.replace rather than str.format: posts contain braces.
    return (
        template.replace("{{post}}", post.strip())
        .replace("{{summarya}}", summary_a.strip())
        .replace("{{summaryb}}", summary_b.strip())
    )


# Special tokens left in a summary (the TL;DR dataset's reference is " summary<|endoftext|>") tell the judge which
# summary is which. Stripped from both: any <|...|> token (also with DeepSeek's full-width bars, <｜...｜>), and the
# common special tokens of other vocabularies.
SPECIAL_TOKEN = re.compile(
    r"<[|｜][^<>|｜\s]*[|｜]>|</?s>|<(?:pad|unk|eos|bos|mask)>|<(?:start|end)_of_turn>|\[(?:PAD|CLS|SEP|MASK|UNK)\]"
)


def strip_special_tokens(text: str, extra: tuple[str, ...] = ()) -> str:
    """`text` without special-token strings (SPECIAL_TOKEN, and the strings in `extra`), outer whitespace stripped."""
    for token in extra:
        text = text.replace(token, "")
    return SPECIAL_TOKEN.sub("", text).strip()


def tokenizer_special_tokens(name: str) -> tuple[str, ...]:
    """The special-token strings of a tokenizer, longest first (so that no token is cut inside a longer one)."""
    if not name:
        return ()
    from transformers import AutoTokenizer

    return tuple(sorted(AutoTokenizer.from_pretrained(name).all_special_tokens, key=len, reverse=True))


def select_rows(n_rows: int, subset_frac: float, max_samples: int, seed: int, all_rows: bool = False) -> list[int]:
    """Row ids to judge: a seeded random subset of size min(round(frac * n), max_samples), in file order."""
    if all_rows or subset_frac >= 1.0:
        return list(range(n_rows))
    n = min(n_rows, max(1, round(subset_frac * n_rows)))
    if max_samples > 0:
        n = min(n, max_samples)
    return sorted(random.Random(seed).sample(range(n_rows), n))


def policy_is_a(seed: int, row_id: int) -> bool:
    """The A/B coin flip for one row. Seeded per row, so a row's order does not depend on which subset was drawn."""
    return random.Random(f"{seed}:{row_id}").random() < 0.5


# The label "Preferred:" (markdown around it allowed), and what follows it on its line.
_PREFERRED = re.compile(r"(?i:preferred)[\s*_`\"'>)\]]*:([^\n]*)")
# An answer is one capital A or B alone, in optional markdown/quotes/"Summary": "A or B", "A, B" or a sentence are
# no answer, as a judge that names both letters has stated no preference.
_MARKUP = r"[\s*_`\"'.:<>()\[\]]*"
_ANSWER = re.compile(rf"{_MARKUP}(?:(?i:summary){_MARKUP})?([AB]){_MARKUP}")


def parse_preference(answer: str | None) -> str | None:
    """'A', 'B', or None when the answer states no readable preference (a parse failure).

    Accepts "Preferred: A", "Preferred: **B**", "**Preferred:** \"A\"", "Preferred: Summary B", and the letter on
    the line after "Preferred:"; the last "Preferred:" wins (a judge sometimes restates the format first). Without
    one, a last line that is only A or B (the prompt asks for the letter on its own line) counts too. Anything else
    after the label ("A or B", "A, B", a sentence) is a parse failure.
    """
    if not answer:
        return None
    labels = list(_PREFERRED.finditer(answer))
    if labels:
        stated = labels[-1].group(1)
        if not stated.strip():  # "Preferred:" alone on its line: the letter is on the next non-empty line
            rest = [line for line in answer[labels[-1].end() :].splitlines() if line.strip()]
            stated = rest[0] if rest else ""
        match = _ANSWER.fullmatch(stated)
        return match.group(1) if match else None
    lines = [line for line in answer.strip().splitlines() if line.strip()]
    match = _ANSWER.fullmatch(lines[-1]) if lines else None
    return match.group(1) if match and "summary" not in lines[-1].lower() else None


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion p out of n. With ties counted half it is slightly conservative."""
    if n == 0:
        return float("nan"), float("nan")
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, center - half), min(1.0, center + half)


def summarize(judgments: list[dict]) -> dict:
    """Win rate over the rows with a parsed verdict; parse failures and failed requests are reported, not scored."""
    scores = {"policy": 1.0, "tie": 0.5, "reference": 0.0}
    judged = [j for j in judgments if j["winner"] in scores]
    n = len(judged)
    win_rate = sum(scores[j["winner"]] for j in judged) / n if n else float("nan")
    low, high = wilson_interval(win_rate, n) if n else (float("nan"), float("nan"))
    return {
        "win_rate": win_rate,
        "ci95_low": low,
        "ci95_high": high,
        "ci_method": "wilson",
        "n_selected": len(judgments),
        "n_judged": n,
        "wins": sum(j["winner"] == "policy" for j in judged),
        "ties": sum(j["winner"] == "tie" for j in judged),
        "losses": sum(j["winner"] == "reference" for j in judged),
        "parse_failures": sum(j["error"] is None and j["parsed"] is None for j in judgments),
        "failed_requests": sum(j["error"] is not None for j in judgments),
    }


# Query parameters that carry credentials: ?api_key=, ?key=, ?token=, ?sig= (signed URLs), ...
_SECRET_PARAM = re.compile(r"key|token|secret|passw|sig|auth|cred", re.I)


def split_credentials(base_url: str) -> tuple[str, list[str]]:
    """(the endpoint: base_url without user:password@ and credential query parameters, the credentials removed).

    The endpoint is what summary.json, the cache key and the messages show; the credentials are redacted from them.
    """
    parts = urllib.parse.urlsplit(base_url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    public = [(name, value) for name, value in query if not _SECRET_PARAM.search(name)]
    secrets = [parts.username, parts.password] + [value for name, value in query if _SECRET_PARAM.search(name)]
    endpoint = parts._replace(netloc=parts.netloc.rpartition("@")[2], query=urllib.parse.urlencode(public))
    return endpoint.geturl(), [secret for secret in secrets if secret]


def redact(text: str, secrets: list[str]) -> str:
    """`text` with each secret replaced by ***."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


# ---------------------------------------------------------------------------------------------------------------------
# Judge backends


class JudgeCache:
    """Append-only JSON-lines cache of raw judge answers; safe to share between threads."""

    def __init__(self, path: str):
        self.path, self.lock, self.answers = path, threading.Lock(), {}
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line cut short by an interrupted run
                        continue
                    self.answers[record["key"]] = record["answer"]
            # After a cut-short last line, the next answer must start a line of its own, not complete the broken one.
            with open(path, "rb+") as f:
                if f.seek(0, os.SEEK_END) > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        f.write(b"\n")

    @staticmethod
    def key(endpoint: str, request: dict) -> str:
        # The endpoint and the whole request body (model, prompt, temperature, max_tokens): every setting that can
        # change the answer, so a new one added to the request is covered too. The endpoint has no credentials.
        return hashlib.sha256(json.dumps([endpoint, request], sort_keys=True).encode()).hexdigest()

    def put(self, key: str, model: str, version: str, answer: str) -> None:
        with self.lock:
            self.answers[key] = answer
            with open(self.path, "a") as f:
                f.write(json.dumps({"key": key, "model": model, "template_version": version, "answer": answer}) + "\n")
                f.flush()


class RequestFailed(Exception):
    """One row's request failed (a 400, retries used up on 429 or 5xx, a malformed answer); the run goes on."""


class JudgeUnavailable(Exception):
    """A failure that every other row would repeat: the run stops."""


class KeyRejected(JudgeUnavailable):
    """401 or 403: a wrong, expired or unauthorised key."""


class EndpointDown(JudgeUnavailable):
    """Timeouts or connection errors in every attempt."""


def make_client(base_url: str, api_key: str, timeout_s: float, max_retries: int):
    from openai import OpenAI  # here, so that importing this module and --judge gold need no openai

    # The client appends /chat/completions after the whole base_url, so a query in it (?api-version=) goes apart.
    parts = urllib.parse.urlsplit(base_url)
    query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    return OpenAI(
        base_url=parts._replace(query="").geturl(),
        default_query=query or None,
        api_key=api_key,
        timeout=timeout_s,
        max_retries=max_retries,
    )


def chat_completion(client, request: dict) -> str:
    """The judge's answer. The client retries 429, 5xx, timeouts and connection errors, sleeping only this thread."""
    import openai

    try:
        response = client.chat.completions.create(**request)
    except openai.APIError as e:
        detail = " ".join(e.message.split())[:300]  # one line: it may end up in an `error:` line
        if isinstance(e, (openai.AuthenticationError, openai.PermissionDeniedError)):
            raise KeyRejected(detail) from None
        if isinstance(e, openai.APIConnectionError):  # APITimeoutError included
            raise EndpointDown(detail) from None
        raise RequestFailed(detail) from None
    try:
        return response.choices[0].message.content or ""
    except (AttributeError, IndexError, TypeError):
        raise RequestFailed("malformed API response") from None


def judge_row(
    row: dict, row_id: int, args: Args, template: str, version: str, cache: JudgeCache | None, client, endpoint: str
) -> dict:
    a_is_policy = policy_is_a(args.seed, row_id)
    policy, reference = row["postprocessed_response"], row["reference_response"]
    summary_a, summary_b = (policy, reference) if a_is_policy else (reference, policy)
    record = {
        "row_id": row_id,
        "policy_position": "A" if a_is_policy else "B",
        "raw": None,
        "parsed": None,
        "winner": None,
        "error": None,
    }
    if args.judge == "gold":
        try:
            verdict = gold_judge(row["query"], summary_a, summary_b)
        except ValueError as e:  # a post of another task
            raise BadInput(
                f"row {row_id}: {e}: --judge gold judges the toy task only (--judge openai otherwise)"
            ) from e
        score_a, score_b = gold_score(row["query"], summary_a), gold_score(row["query"], summary_b)
        record["raw"] = f"gold_score A={score_a:.3f} B={score_b:.3f}"
        record["parsed"] = {1.0: "A", 0.0: "B", 0.5: "tie"}[verdict]
    else:
        prompt = format_prompt(template, row["query"], summary_a, summary_b)
        request = {
            "model": args.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": args.temperature,
            "max_tokens": args.max_tokens,
        }
        key = JudgeCache.key(endpoint, request)
        record["cached"] = key in cache.answers
        try:
            answer = cache.answers[key] if record["cached"] else chat_completion(client, request)
        except RequestFailed as e:
            record["error"] = str(e)
            return record
        if not record["cached"]:
            cache.put(key, args.model, version, answer)
        record["raw"], record["parsed"] = answer, parse_preference(answer)
    if record["parsed"] == "tie":
        record["winner"] = "tie"
    elif record["parsed"] is not None:
        record["winner"] = "policy" if record["parsed"] == record["policy_position"] else "reference"
    return record


def judge_in_parallel(
    judge: Callable[[dict, int], dict], rows: list[dict], row_ids: list[int], concurrency: int, desc: str
) -> list[dict]:
    """judge(rows[i], i) for every i in row_ids, `concurrency` at a time, with a progress bar on stderr.

    After a JudgeUnavailable the rows not sent yet are skipped, so that a wrong key costs a few requests, not one
    per row; the error is raised once the requests in flight end.
    """
    stop = threading.Event()

    def judge_unless_stopped(row_id: int) -> dict | None:
        if stop.is_set():
            return None
        try:
            return judge(rows[row_id], row_id)
        except JudgeUnavailable:
            stop.set()
            raise

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = [pool.submit(judge_unless_stopped, i) for i in row_ids]
        with tqdm(futures, desc=desc, unit="row") as progress:
            return [future.result() for future in progress]


def read_eval_csv(path: str) -> pd.DataFrame:
    """The CSV's rows, or SystemExit when the file does not parse into whole rows.

    pandas reads a CSV with one stray quote as extra fragment rows (the quoted multi-line posts after it read as
    unquoted lines, short rows filled with ""), which would then be judged and counted. So the file is parsed strictly
    first, and every record must have the header's number of fields.
    """
    fix = "write it with a CSV writer (pandas' DataFrame.to_csv quotes every field that needs it)"
    with open(path, newline="") as f:
        reader = csv.reader(f, strict=True)
        try:
            header = next(reader, [])
            n_records = 0
            for record in reader:
                n_records += 1
                if len(record) != len(header):
                    raise csv.Error(f"{len(record)} fields, the header has {len(header)}")
        except csv.Error as e:
            raise SystemExit(f"error: {path} is not well-formed CSV (line {reader.line_num}: {e}); {fix}") from None
    if not header:
        raise SystemExit(f"error: {path} is empty: give an evaluation CSV that the training scripts wrote")
    df = pd.read_csv(path, keep_default_na=False)  # an empty response is "", not NaN
    if len(df) != n_records:  # the two parsers disagree: neither reading can be trusted
        raise SystemExit(f"error: {path} is not well-formed CSV ({len(df)} rows read, {n_records} records); {fix}")
    return df


def format_table(rows: list[dict]) -> str:
    lines = [
        "| file | win rate | 95% CI (Wilson) | judged | W/T/L | parse failures | failed requests |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['file']} | {r['win_rate']:.3f} | [{r['ci95_low']:.3f}, {r['ci95_high']:.3f}] | {r['n_judged']}/{r['n_selected']} "
            f"| {r['wins']}/{r['ties']}/{r['losses']} | {r['parse_failures']} | {r['failed_requests']} |"
        )
    return "\n".join(lines)


def main(args: Args) -> list[dict]:
    if not args.csvs:
        raise SystemExit("error: pass at least one evaluation CSV")
    if not 0 < args.subset_frac <= 1:
        raise SystemExit(f"error: --subset_frac must be in (0, 1] (1: every row); got {args.subset_frac}")
    os.makedirs(args.output_dir, exist_ok=True)
    template, version = load_template(args.template)
    endpoint, secrets = split_credentials(args.base_url)
    cache, client = None, None
    if args.judge == "openai":
        api_key = os.environ.get(args.api_key_env, "")
        if not api_key:
            raise SystemExit(f"error: set ${args.api_key_env} to the judge endpoint's API key (or use --judge gold)")
        secrets.append(api_key)  # error bodies can quote it: "Incorrect API key provided: sk-..."
        cache = JudgeCache(args.cache or os.path.join(args.output_dir, "judge_cache.jsonl"))
        client = make_client(args.base_url, api_key, args.request_timeout_s, args.max_retries)
    judge = lambda row, i: judge_row(row, i, args, template, version, cache, client, endpoint)  # noqa: E731
    judge_name = "toy.tldr.gold_judge" if args.judge == "gold" else args.model
    special_tokens = tokenizer_special_tokens(args.tokenizer)

    summaries, all_judgments = [], []
    for path in args.csvs:
        df = read_eval_csv(path)
        missing = {"query", "postprocessed_response", "reference_response"} - set(df.columns)
        if missing:
            raise SystemExit(f"error: {path} lacks columns {sorted(missing)}")
        for column in ("postprocessed_response", "reference_response"):  # the same cleaning on both sides
            df[column] = [strip_special_tokens(str(text), special_tokens) for text in df[column]]
        rows = df.to_dict("records")
        row_ids = select_rows(len(rows), args.subset_frac, args.max_samples, args.seed, args.all)
        print(f"judging {len(row_ids)} of {len(rows)} rows of {path}", flush=True)
        try:
            judgments = judge_in_parallel(judge, rows, row_ids, args.concurrency, desc=path)
        except KeyRejected as e:
            raise SystemExit(
                f"error: {endpoint} rejected the API key ({redact(str(e), secrets)}); check ${args.api_key_env}, "
                "or name the variable that holds the key with --api_key_env"
            ) from None
        except EndpointDown as e:
            raise SystemExit(
                f"error: no answer from {endpoint} in {args.max_retries + 1} attempts of {args.request_timeout_s:g} s "
                f"({e}); check --base_url, or raise --request_timeout_s / --max_retries"
            ) from None
        for j in judgments:
            j["file"] = path
            if j["error"]:  # an error body can quote the key, or the URL with its credentials
                j["error"] = redact(j["error"], secrets)
        all_judgments += judgments
        summaries.append({"file": path, **summarize(judgments)})

    judgments_path = os.path.join(args.output_dir, "judgments.jsonl")
    with open(judgments_path, "w") as f:
        f.writelines(json.dumps(j) + "\n" for j in all_judgments)
    meta = {
        "judge": judge_name,
        "template_version": version if args.judge == "openai" else None,
        "config": {**asdict(args), "base_url": endpoint},
    }
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump({**meta, "results": summaries}, f, indent=2)
    print(f"judge: {judge_name}" + (f" at {endpoint}, prompt template {version}" if args.judge == "openai" else ""))
    print(format_table(summaries))
    for s in summaries:
        if s["failed_requests"] and s["n_judged"]:
            print(
                f"{s['failed_requests']} of {s['n_selected']} requests for {s['file']} failed: its win rate is over "
                f"the {s['n_judged']} judged rows; rerun the same command to retry only the failed rows"
            )
        if s["parse_failures"] and s["n_judged"]:
            print(
                f"{s['parse_failures']} of {s['n_selected']} answers for {s['file']} state no readable preference: its "
                f"win rate is over the {s['n_judged']} judged rows; their answers are in {judgments_path}"
            )
    unjudged = [s["file"] for s in summaries if s["n_judged"] == 0]
    if unjudged:
        failed = [j for j in all_judgments if j["file"] in unjudged and j["winner"] is None]
        first_error = next((j["error"] for j in failed if j["error"]), None)
        first_answer = next((j["raw"] for j in failed if not j["error"]), None)
        # A request error explains the rows best; without one, the first unreadable answer shows what the judge said.
        first = f"first error: {first_error}" if first_error else f"first unreadable answer: {first_answer!r}"
        raise SystemExit(
            f"error: no row of {', '.join(unjudged)} could be judged: every request failed or gave no readable "
            f"preference ({first}); each row's {'error' if first_error else 'answer'} is in {judgments_path}"
        )
    return summaries


if __name__ == "__main__":
    sys.excepthook = print_error  # bad input or a failed read or write: one line, no traceback
    main(tyro.cli(Args, use_underscores=True))
