"""Shared pieces of the eval/ tests: a fake OpenAI-compatible judge server, toy evaluation CSVs, a tiny chat model."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd

from toy.tldr import make_splits, parse_post

GOOD, GARBLED = "GOOD", "GARBLED"
# The ways a judge states its choice that the parser must read; the fake server cycles through them.
ANSWER_FORMATS = [
    "Preferred: {}",
    "Preferred: **{}**",
    '**Preferred:** "{}"',
    "Preferred: Summary {}",
    "Preferred:\n{}",
]


class FakeJudgeServer:
    """An OpenAI-compatible /chat/completions endpoint on 127.0.0.1 that prefers the summary containing GOOD.

    `failures` is a list of HTTP status codes served, one per request, before any real answer (the error body quotes
    the request path); a summary
    containing GARBLED gets an answer with no stated preference; `reject_with_key` answers 401 quoting the key;
    `hang` records each request and never answers it (until the server shuts down); `answer` is sent as the content
    of every answer, or only where the policy summary contains one of the strings in `answer_rows` when that is set.
    """

    def __init__(self):
        self.requests: list[dict] = []
        self.failures: list[int] = []
        self.reject_with_key = False
        self.hang = False
        self.answer: str | None = None
        self.answer_rows: set[str] = set()
        self.release = threading.Event()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                auth = self.headers.get("Authorization", "")
                with server.lock:
                    server.requests.append({"path": self.path, "auth": auth, "body": body})
                    status = server.failures.pop(0) if server.failures else 200
                    n = len(server.requests)
                if server.hang:
                    server.release.wait(30)
                    return
                if server.reject_with_key:
                    return self._send(401, {"error": {"message": f"Incorrect API key provided: {auth[7:]}"}})
                if status != 200:
                    return self._send(status, {"error": {"message": f"try again ({self.path})"}})  # as 4xx pages do
                prompt = body["messages"][0]["content"]
                a = re.search(r"### Summary A:\n(.*?)\n\n### Summary B:", prompt, re.S).group(1)
                if server.answer is not None and (
                    not server.answer_rows or any(marker in prompt for marker in server.answer_rows)
                ):
                    content = server.answer
                elif GARBLED in prompt:
                    content = "Comparison: both are fine.\nI cannot decide."
                else:
                    choice = "A" if GOOD in a else "B"
                    content = "Comparison: one is better.\n" + ANSWER_FORMATS[n % len(ANSWER_FORMATS)].format(choice)
                self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def best_summary(query: str) -> str:
    """The toy judge's ideal summary (gold score 4.0): the four facts and nothing else."""
    post = parse_post(query)
    return f" my {post['person']} {post['event']} . i feel {post['feeling']} . {post['question']}"


def weak_summary(query: str) -> str:
    """A filler sentence from the post: no facts, filler penalised."""
    return " " + parse_post(query)["fillers"][0]


def write_eval_csv(path, policy: list[str], reference: list[str], queries: list[str]) -> None:
    """An evaluation CSV in the columns the training scripts write."""
    n = len(queries)
    df = pd.DataFrame(
        {
            "query": queries,
            "postprocessed_response": policy,
            "reference_response": reference,
            "score": [0.0] * n,
            "reference_score": [0.0] * n,
            "kl": [0.0] * n,
        }
    )
    df.to_csv(path, index=False)


def toy_queries(n: int, seed: int = 0) -> list[str]:
    sft, _ = make_splits(seed, n_train=1, n_validation=1, n_test=n, n_pref=1)
    return [r["query"] for r in sft["test"]]


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {{ eos_token }} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def build_tiny_chat_model(out_dir: str, with_chat_template: bool = True) -> str:
    """A 2-layer GPT-NeoX with a word-level tokenizer, saved with save_pretrained (no hub access)."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from toy.tldr import build_tokenizer

    words = "user assistant system : what is the capital of france ? tell me a story write a poem hello thanks"
    tokenizer = build_tokenizer([words] * 3 + toy_queries(8))
    if with_chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=0,
    )
    GPTNeoXForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


END_OF_TURN = "<|eot_id|>"


def tiny_llama_config(vocab_size: int, hidden: int = 32, layers: int = 2, **extra):
    """A Llama-architecture config small enough for CPU tests: 2 heads (no grouped KV), an MLP twice the width."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, **extra)  # fmt: skip


def build_cycling_llama(out_dir: str, stops_on_end_of_turn: bool = True, **generation) -> str:
    """A 1-layer Llama whose greedy answer to a chat prompt is `hello <|eot_id|> user : hello <|eot_id|> user ...`.

    Each token's logits depend only on the token itself: ":" -> hello -> <|eot_id|> -> user (runner-up: thanks)
    -> ":". Like Llama-3-Instruct, its generation_config.json stops on <|eot_id|>, which is not the tokenizer's EOS
    (unless stops_on_end_of_turn=False); `generation` adds other generation_config fields.
    """
    import torch
    from transformers import LlamaForCausalLM

    from toy.tldr import build_tokenizer

    tokenizer = build_tokenizer(["user assistant : hello thanks what is the capital of france ?"] * 3)
    tokenizer.add_special_tokens({"additional_special_tokens": [END_OF_TURN]})
    tokenizer.chat_template = CHAT_TEMPLATE
    cycle = tokenizer.convert_tokens_to_ids([":", "hello", END_OF_TURN, "user"])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    config = tiny_llama_config(
        64, hidden=16, layers=1, tie_word_embeddings=False, bos_token_id=eos, pad_token_id=pad,
        eos_token_id=[eos, cycle[2]] if stops_on_end_of_turn else eos,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        layer = model.model.layers[0]
        for weight in (model.model.embed_tokens.weight, layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight):
            weight.zero_()  # the residual stream stays the current token's embedding
        model.lm_head.weight.zero_()
        for i, token in enumerate(cycle):
            model.model.embed_tokens.weight[token, i] = 1.0
            model.lm_head.weight[cycle[(i + 1) % len(cycle)], i] = 10.0
        model.lm_head.weight[tokenizer.convert_tokens_to_ids("thanks"), 2] = 5.0
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.update(**generation)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_chat_recipe_model(out_dir: str) -> str:
    """A tiny Llama saved the way the README's chat recipe (--no-lora --num_trainable_layers) saves one: the tokenizer
    carries the `<|pad|>` the scripts add, whose id is one past the embedding's rows (they never feed it)."""
    import torch
    from transformers import LlamaForCausalLM

    from toy.tldr import build_tokenizer

    tokenizer = build_tokenizer(["user assistant : what is the capital of france ? write a poem hello thanks"] * 3)
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    LlamaForCausalLM(tiny_llama_config(len(tokenizer), bos_token_id=eos, eos_token_id=eos)).save_pretrained(out_dir)
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})  # as rebel.py's load_tokenizer, with no embedding row
    tokenizer.save_pretrained(out_dir)
    return out_dir
