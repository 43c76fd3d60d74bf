"""An offline toy version of the TL;DR summarisation task, with a programmatic gold judge.

The real pipeline (SFT -> reward model -> RL, judged by GPT-4 against human references) needs the
hub. This module builds a small synthetic stand-in that exercises every part of it offline:

* posts in the TL;DR prompt format ("SUBREDDIT: r/... TITLE: ... POST: ... TL;DR:"),
* reference summaries that are *mediocre* under the judge, so that RL has room to improve,
* preference pairs labelled by a Bradley-Terry draw on the gold score (noisy, as human labels are),
* a word-level tokenizer and tiny Pythia-architecture (GPT-NeoX) configs,
* `gold_score` / `gold_judge`: the stand-in for GPT-4. It reads only the post text and the summary.

Every post is about one *person* who did one *event*, the author's *feeling*, and a *question*;
the rest of the body is filler. A good summary states the four facts and nothing else. The judge
rewards each fact covered, and penalises filler, facts that are not in the post, repeated words,
length, and a missing full stop. The best summary scores 4.0 ("my boss read my diary . i feel
hurt . what should i do ?"); references cover about half of the facts.

    python -m toy.tldr --out toy_data      # writes the datasets, tokenizer and model configs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re

SUBREDDITS = ["relationships", "AskReddit", "tifu", "jobs", "dating_advice", "legaladvice", "pets", "personalfinance"]
PERSONS = ["girlfriend", "boyfriend", "boss", "roommate", "sister", "brother", "mom", "dad",
           "friend", "coworker", "landlord", "neighbor"]  # fmt: skip
EVENTS = ["lied about money", "broke my phone", "forgot my birthday", "ignored my texts", "took my car",
          "cancelled our trip", "read my diary", "quit the job", "ate my food", "moved away",
          "yelled at me", "lost my keys"]  # fmt: skip
FEELINGS = ["angry", "sad", "confused", "jealous", "worried", "hurt", "anxious", "lonely"]
QUESTIONS = ["what should i do ?", "am i wrong ?", "how do i fix this ?", "should i talk to them ?"]
FILLERS = [
    "we live in a small town .", "it was raining that day .", "i have a cat named max .",
    "we met in college .", "i work at a bakery .", "the weather has been bad .",
    "i drink a lot of coffee .", "my car is old .", "we like pizza .", "i play guitar on weekends .",
    "the house is near the park .", "i started a new class .", "we watched a movie last week .",
    "my phone is always dead .", "i go running every morning .", "the bus was late again .",
]  # fmt: skip
FILLER_WORDS = {w for s in FILLERS for w in s.split()} - {"i", "we", "my", "a", "the", "is", ".", "at", "on", "in"}

# Judge weights, also documented in the README's "Toy task" section.
FACT_WEIGHT = 1.0  # per fact covered: person, event, feeling, question
WRONG_FACT_PENALTY = 1.0  # per person/feeling/event word that is not in the post
FILLER_PENALTY = 0.25  # per filler word
REPEAT_PENALTY = 0.5  # per repeated content word
LENGTH_FREE_WORDS = 16  # longer summaries lose LENGTH_PENALTY per extra word
LENGTH_PENALTY = 0.1
NO_PERIOD_PENALTY = 0.5  # a summary that stops mid-sentence


def make_post(rng: random.Random) -> dict:
    person, event, feeling, question = (
        rng.choice(PERSONS),
        rng.choice(EVENTS),
        rng.choice(FEELINGS),
        rng.choice(QUESTIONS),
    )
    fillers = rng.sample(FILLERS, rng.randint(1, 3))
    facts = [f"my {person} {event} .", f"i feel {feeling} ."]
    body = fillers + facts
    rng.shuffle(body)
    query = (
        f"SUBREDDIT: r/{rng.choice(SUBREDDITS)}\n\nTITLE: my {person} {event}\n\n"
        f"POST: {' '.join(body)} {question}\n\nTL;DR:"
    )
    return {
        "query": query,
        "person": person,
        "event": event,
        "feeling": feeling,
        "question": question,
        "fillers": fillers,
    }


def make_summary(post: dict, rng: random.Random, p_fact: float = 0.5, p_repeat: float = 0.0) -> str:
    """A human-like but mediocre summary: each fact kept with probability p_fact, plus filler; with probability
    p_repeat one sentence is said twice (so that the reward model sees some repetition, though not much)."""
    parts = []
    if rng.random() < p_fact:
        parts.append(f"my {post['person']} {post['event']} .")
    elif rng.random() < 0.5:
        parts.append(f"my {post['person']} did something .")
    if rng.random() < p_fact:
        parts.append(f"i feel {post['feeling']} .")
    if rng.random() < 0.6:
        parts.append(rng.choice(post["fillers"]))
    if rng.random() < p_fact:
        parts.append(post["question"])
    if not parts:
        parts.append(rng.choice(post["fillers"]))
    rng.shuffle(parts)
    if rng.random() < p_repeat:
        parts.append(rng.choice(parts))
    return " " + " ".join(parts)


def _words(text: str) -> list[str]:
    return text.split()


def parse_post(query: str) -> dict:
    """Recover the facts from the post text alone (the judge sees what GPT-4 would see)."""
    match = re.search(r"TITLE: my (\w+) (.+?)\s+(?:POST:|TL;DR:)", query)
    if match is None:
        raise ValueError("gold judge: the query is not a toy TL;DR post (no 'TITLE: my <person> <event>' line)")
    person, event = match.group(1), match.group(2).strip()
    feeling = re.search(r"i feel (\w+) \.", query).group(1)
    question = next(q for q in QUESTIONS if q in query)
    fillers = [f for f in FILLERS if f in query]
    return {"person": person, "event": event, "feeling": feeling, "question": question, "fillers": fillers}


def gold_score(query: str, summary: str) -> float:
    """The gold quality of `summary` as a summary of the post in `query` (higher is better, max 4)."""
    post = parse_post(query)
    text = " " + " ".join(_words(summary)) + " "
    words = _words(summary)
    score = 0.0
    score += FACT_WEIGHT * (f" {post['person']} " in text)
    score += FACT_WEIGHT * (f" {post['event']} " in text)
    score += FACT_WEIGHT * (f" {post['feeling']} " in text)
    score += FACT_WEIGHT * (f" {post['question']} " in text)
    wrong = [w for w in words if (w in PERSONS and w != post["person"]) or (w in FEELINGS and w != post["feeling"])]
    wrong += [e for e in EVENTS if e != post["event"] and f" {e} " in text]
    score -= WRONG_FACT_PENALTY * len(wrong)
    score -= FILLER_PENALTY * sum(w in FILLER_WORDS for w in words)
    content = [w for w in words if len(w) > 3]
    score -= REPEAT_PENALTY * (len(content) - len(set(content)))
    score -= LENGTH_PENALTY * max(0, len(words) - LENGTH_FREE_WORDS)
    if not words or words[-1] not in {".", "?"}:
        score -= NO_PERIOD_PENALTY
    return score


def gold_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The gold score as a reward function (rebel.py --reward_fn toy/tldr.py:gold_reward): a verifiable reward."""
    return [gold_score(p, r) for p, r in zip(prompts, responses)]


def gold_judge(query: str, summary_a: str, summary_b: str) -> float:
    """1.0 if A is the better summary, 0.0 if B is, 0.5 for a tie (ties count half in win rates)."""
    a, b = gold_score(query, summary_a), gold_score(query, summary_b)
    return 1.0 if a > b else 0.0 if b > a else 0.5


def gold_preference(prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[float]:
    """The gold judge as a preference oracle (rebel.py --preference_fn toy/tldr.py:gold_preference): per pair,
    P(a > b) = 1, 0 or 0.5 for a tie. It is skew-symmetric: swapping a and b gives 1 - P."""
    return [gold_judge(p, a, b) for p, a, b in zip(prompts, responses_a, responses_b)]


def make_splits(seed: int = 0, n_train: int = 4000, n_validation: int = 512, n_test: int = 512, n_pref: int = 4000):
    """Deterministic splits in the columns the scripts read (same names as the TL;DR hub datasets)."""
    rng = random.Random(seed)
    sft = {}
    for split, n in (("train", n_train), ("validation", n_validation), ("test", n_test)):
        rows = []
        for _ in range(n):
            post = make_post(rng)
            rows.append({"query": post["query"], "reference_response": make_summary(post, rng)})
        sft[split] = rows
    pref = {}
    for split, n in (("train", n_pref), ("validation", n_validation)):
        rows = []
        for _ in range(n):
            post = make_post(rng)
            a, b = make_summary(post, rng, 0.6, p_repeat=0.2), make_summary(post, rng, 0.6, p_repeat=0.2)
            # Bradley-Terry label with temperature 1: close pairs are noisy, like human labels.
            p_a = 1.0 / (1.0 + math.exp(-(gold_score(post["query"], a) - gold_score(post["query"], b))))
            chosen, rejected = (a, b) if rng.random() < p_a else (b, a)
            rows.append({"query": post["query"], "chosen": chosen, "rejected": rejected})
        pref[split] = rows
    return sft, pref


SPECIAL_TOKENS = {"eos": "<|endoftext|>", "pad": "[PAD]", "unk": "<unk>"}


def build_tokenizer(texts: list[str]):
    """A word-level tokenizer trained on the toy corpus, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    trainer = trainers.WordLevelTrainer(
        special_tokens=[SPECIAL_TOKENS["eos"], SPECIAL_TOKENS["pad"], SPECIAL_TOKENS["unk"]]
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=SPECIAL_TOKENS["eos"],
        bos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
    )


def model_config(vocab_size: int, size: str = "tiny") -> dict:
    """Pythia-architecture (GPT-NeoX) configs. 'tiny' trains in about a minute on 2 CPU cores."""
    dims = {"tiny": (2, 64, 4), "micro": (2, 32, 2)}[size]
    layers, hidden, heads = dims
    return {
        "model_type": "gpt_neox",
        "architectures": ["GPTNeoXForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": 4 * hidden,
        "max_position_embeddings": 256,
        "rotary_pct": 0.25,
        "rotary_emb_base": 10000,
        "use_parallel_residual": True,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }


def write_task(out: str, seed: int = 0, size: str = "tiny", **sizes) -> None:
    """Write <out>/tldr and <out>/preference (JSON-lines per split), <out>/tokenizer, <out>/base_model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sft, pref = make_splits(seed, **sizes)
    for name, splits in (("tldr", sft), ("preference", pref)):
        os.makedirs(os.path.join(out, name), exist_ok=True)
        for split, rows in splits.items():
            with open(os.path.join(out, name, f"{split}.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    corpus = [r["query"] + r["reference_response"] for r in sft["train"]]
    corpus += [r["query"] + r["chosen"] + r["rejected"] for r in pref["train"]]
    corpus += [" ".join(FILLERS + PERSONS + EVENTS + FEELINGS + QUESTIONS + ["did something"])]
    tokenizer = build_tokenizer(corpus)
    # The base model is the "pretrained Pythia" of the toy world: randomly initialised, saved with
    # save_pretrained so that sft.py loads it exactly as it would load EleutherAI/pythia-1.4b-deduped.
    torch.manual_seed(seed)
    config = AutoConfig.for_model(**model_config(len(tokenizer), size))
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(os.path.join(out, "base_model"))
    tokenizer.save_pretrained(os.path.join(out, "base_model"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="toy_data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", default="tiny", choices=["tiny", "micro"])
    parser.add_argument("--n_train", type=int, default=4000)
    parser.add_argument("--n_pref", type=int, default=4000)
    cli = parser.parse_args()
    write_task(cli.out, cli.seed, cli.size, n_train=cli.n_train, n_pref=cli.n_pref)
    print(f"wrote the toy TL;DR task to {cli.out}/")
