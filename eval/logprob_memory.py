"""Peak CPU memory and time of one log-prob pass (response_logprobs of a script's appendix), as docs/benchmark.md
reports it: after a small warm-up pass, the process's resident memory is sampled every millisecond during the pass,
and the peak above the memory held just before it is printed. Run each measurement in a fresh process.

    python eval/logprob_memory.py --model DIR                       # a save_pretrained causal LM (e.g. SmolLM2)
    python eval/logprob_memory.py --vocab 128256                    # a tiny random Llama with that vocabulary
    python eval/logprob_memory.py --vocab 128256 --grad             # forward and backward, as in the update
    python eval/logprob_memory.py --vocab 128256 --script OLD.py    # another version's appendix
                                                                     # (git show abf420a:rebel.py > OLD.py)
"""

import argparse
import importlib.util
import os
import threading
import time

import torch


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_during(fn):
    """fn()'s result, its wall time, and the peak resident memory above that before it (bytes), sampled each ms."""
    before, peak, done = resident_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    return out, seconds, max(peak[0], resident_bytes()) - before


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", default=os.path.join(os.path.dirname(__file__), "..", "rebel.py"))
    parser.add_argument("--model", help="a save_pretrained causal LM folder (default: a tiny random Llama)")
    parser.add_argument("--vocab", type=int, default=128256, help="the tiny Llama's vocabulary")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--query", type=int, default=256, help="prompt tokens")
    parser.add_argument("--response", type=int, default=256, help="response tokens")
    parser.add_argument("--grad", action="store_true", help="forward and backward (the update), not the rollout's")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("script", args.script)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    else:
        config = LlamaConfig(vocab_size=args.vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)  # fmt: skip
        model = LlamaForCausalLM(config)
    model.eval().requires_grad_(args.grad)
    # As under LoRA, no gradient for the vocabulary-sized weights: only the logits' own memory differs between versions.
    model.get_input_embeddings().requires_grad_(False)
    model.get_output_embeddings().requires_grad_(False)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.query + args.response))
    pad = vocab  # an added pad token past the vocabulary, never in ids

    def one_pass():
        with torch.set_grad_enabled(args.grad):
            logprobs = script.response_logprobs(model, ids, args.query, 0.7, pad)
            if args.grad:
                logprobs.sum().backward()
        return logprobs.detach()

    # A small pass first: the weights (memory-mapped by from_pretrained) and torch's thread pools are in place.
    with torch.set_grad_enabled(args.grad):
        script.response_logprobs(model, ids[:1, args.query - 8 : args.query + 8], 8, 0.7, pad).sum()
    model.zero_grad(set_to_none=True)
    _, seconds, peak = peak_during(one_pass)
    print(f"{os.path.basename(os.path.dirname(os.path.abspath(args.script)))}/{os.path.basename(args.script)} "
          f"vocab={vocab} batch={args.batch} query={args.query} response={args.response} grad={args.grad}: "
          f"peak +{peak / 2**20:.0f} MiB, {seconds:.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
