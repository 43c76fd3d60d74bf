"""Win rate of a policy's summaries against the human references, judged by an LLM or by the toy gold judge.

This is the paper's "GPT-4 win rate" (Section 4.1, Appendix I.1.5): a judge model reads a post and two
summaries, one from the policy and one reference, placed as A/B by a coin flip, and states which it
prefers. Ties count half. The paper judges a random 10% subset of the test set (600 prompts) with
gpt-4-0613; those are the defaults here.

Input: the evaluation CSVs that the training scripts write (columns `query, postprocessed_response,
reference_response, ...`), one summary row per file. Every judge answer is appended to a JSON-lines
cache as soon as it arrives, keyed by a hash of (judge model, template version, exact prompt), so an
interrupted run resumes without paying twice. An answer without a readable "Preferred: A/B" is a
*parse failure*: it is counted and reported, never turned into a coin flip or a loss.

    # any OpenAI-compatible endpoint; the key is read from $OPENAI_API_KEY and never written anywhere
    python -m eval.winrate runs/rebel/eval.csv runs/ppo/eval.csv --output_dir winrate_out
    # offline: the toy task's programmatic judge (toy/tldr.py)
    python -m eval.winrate toy_runs/eval.csv --judge gold --all
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Literal

import pandas as pd
import tyro

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
    """endpoint root; requests go to {base_url}/chat/completions"""
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
    max_retries: int = 6
    """retries per request on 429, 5xx and connection errors (exponential backoff with jitter)"""
    backoff_s: float = 1.0
    """first backoff delay; doubles on each retry, capped at 60 s, times a random factor in [0.5, 1.5)"""
    request_timeout_s: float = 120.0
    """timeout of one HTTP request"""
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


# "Preferred" then optional markdown/quotes/"Summary", then a standalone capital A or B.
_PREFERRED = re.compile(r"(?i:preferred)\W*(?:(?i:summary)\W*)?([AB])(?![A-Za-z0-9])")
_MARKUP = re.compile(r"[\s*_`\"'.:<>()\[\]]+")


def parse_preference(answer: str | None) -> str | None:
    """'A', 'B', or None when the answer states no readable preference (a parse failure).

    Accepts "Preferred: A", "Preferred: **B**", "**Preferred:** \"A\"", "Preferred: Summary B"; the last
    "Preferred" wins (a judge sometimes restates the format first). Without one, a last line that is only
    A or B (the prompt asks for the letter on its own line) counts too.
    """
    if not answer:
        return None
    matches = _PREFERRED.findall(answer)
    if matches:
        return matches[-1]
    lines = [line for line in answer.strip().splitlines() if line.strip()]
    last = _MARKUP.sub("", lines[-1]) if lines else ""
    return last if last in ("A", "B") else None


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
    def key(model: str, version: str, prompt: str) -> str:
        return hashlib.sha256(f"{model}\n{version}\n{prompt}".encode()).hexdigest()

    def put(self, key: str, model: str, version: str, answer: str) -> None:
        with self.lock:
            self.answers[key] = answer
            with open(self.path, "a") as f:
                f.write(json.dumps({"key": key, "model": model, "template_version": version, "answer": answer}) + "\n")
                f.flush()


class RequestFailed(Exception):
    pass


def chat_completion(prompt: str, args: Args, api_key: str) -> str:
    """One chat-completions call with bounded retries. Each call sleeps only its own thread while backing off."""
    body = json.dumps(
        {
            "model": args.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": args.temperature,
            "max_tokens": args.max_tokens,
        }
    ).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"}
    url = args.base_url.rstrip("/") + "/chat/completions"
    last_error = ""
    for attempt in range(args.max_retries + 1):
        retry_after = None
        try:
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(request, timeout=args.request_timeout_s) as response:
                content = json.loads(response.read())["choices"][0]["message"]["content"]
                return content if content is not None else ""
        except urllib.error.HTTPError as e:
            last_error = f"HTTP {e.code}"
            if e.code != 429 and e.code < 500:
                # Error bodies can quote the key ("Incorrect API key provided: sk-..."): redact before keeping them.
                detail = e.read().decode(errors="replace")[:300].replace(api_key, "***") if api_key else ""
                raise RequestFailed(f"{last_error}: {detail}") from None
            retry_after = e.headers.get("Retry-After") if e.headers else None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            last_error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        except (KeyError, IndexError, TypeError, json.JSONDecodeError) as e:
            raise RequestFailed(f"malformed API response: {type(e).__name__}") from None
        if attempt == args.max_retries:
            break
        delay = min(60.0, args.backoff_s * 2**attempt) * random.uniform(0.5, 1.5)
        if retry_after is not None:
            try:
                delay = max(delay, min(60.0, float(retry_after)))
            except ValueError:
                pass
        time.sleep(delay)
    raise RequestFailed(f"gave up after {args.max_retries + 1} attempts, last error: {last_error}")


def judge_row(
    row: dict, row_id: int, args: Args, template: str, version: str, cache: JudgeCache | None, api_key: str
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
        verdict = gold_judge(row["query"], summary_a, summary_b)
        score_a, score_b = gold_score(row["query"], summary_a), gold_score(row["query"], summary_b)
        record["raw"] = f"gold_score A={score_a:.3f} B={score_b:.3f}"
        record["parsed"] = {1.0: "A", 0.0: "B", 0.5: "tie"}[verdict]
    else:
        prompt = format_prompt(template, row["query"], summary_a, summary_b)
        key = JudgeCache.key(args.model, version, prompt)
        record["cached"] = key in cache.answers
        try:
            answer = cache.answers[key] if record["cached"] else chat_completion(prompt, args, api_key)
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
        raise SystemExit("winrate: pass at least one evaluation CSV")
    os.makedirs(args.output_dir, exist_ok=True)
    template, version = load_template(args.template)
    api_key, cache = "", None
    if args.judge == "openai":
        api_key = os.environ.get(args.api_key_env, "")
        if not api_key:
            raise SystemExit(f"winrate: set ${args.api_key_env} to the judge endpoint's API key (or use --judge gold)")
        cache = JudgeCache(args.cache or os.path.join(args.output_dir, "judge_cache.jsonl"))
    judge_name = "toy.tldr.gold_judge" if args.judge == "gold" else args.model
    special_tokens = tokenizer_special_tokens(args.tokenizer)

    summaries, all_judgments = [], []
    for path in args.csvs:
        df = pd.read_csv(path, keep_default_na=False)  # an empty response is "", not NaN
        missing = {"query", "postprocessed_response", "reference_response"} - set(df.columns)
        if missing:
            raise SystemExit(f"winrate: {path} lacks columns {sorted(missing)}")
        for column in ("postprocessed_response", "reference_response"):  # the same cleaning on both sides
            df[column] = [strip_special_tokens(str(text), special_tokens) for text in df[column]]
        rows = df.to_dict("records")
        row_ids = select_rows(len(rows), args.subset_frac, args.max_samples, args.seed, args.all)
        print(f"judging {len(row_ids)} of {len(rows)} rows of {path}", flush=True)
        with ThreadPoolExecutor(max_workers=max(1, args.concurrency)) as pool:
            judge = lambda row, i: judge_row(row, i, args, template, version, cache, api_key)  # noqa: E731
            judgments = list(pool.map(judge, [rows[i] for i in row_ids], row_ids))
        for j in judgments:
            j["file"] = path
        all_judgments += judgments
        summaries.append({"file": path, **summarize(judgments)})

    with open(os.path.join(args.output_dir, "judgments.jsonl"), "w") as f:
        f.writelines(json.dumps(j) + "\n" for j in all_judgments)
    meta = {
        "judge": judge_name,
        "template_version": version if args.judge == "openai" else None,
        "config": asdict(args),
    }
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump({**meta, "results": summaries}, f, indent=2)
    print(f"judge: {judge_name}" + (f", prompt template {version}" if args.judge == "openai" else ""))
    print(format_table(summaries))
    return summaries


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
