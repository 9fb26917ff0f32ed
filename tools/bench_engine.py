#!/usr/bin/env python3
"""Reference engine decode speed on a CPU, side by side with Hugging Face transformers' `generate`.

A randomly initialised checkpoint of Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 heads / 2 KV heads,
vocab 151,936, tied embeddings) is created locally once (no download) and loaded by both:
  * transformers: `AutoModelForCausalLM` (float32, sdpa), greedy `generate` of one request, KV cache on;
  * distserve: the engine's own paged-KV model (`distserve.engine.model.Model`, what the scheduler thread
    calls each step), loaded from the same directory: one request, then a batch of 8 decoded together.
Decode tokens/s = generated tokens after the first / (time to generate them): the prefill (and its first
token) is timed apart and subtracted, for both. Each figure is the median of --repeat runs, once with one
torch thread and once with all of them (torch's default: one per physical core), in the same process.

Usage: .venv/bin/python tools/bench_engine.py [--tokens 32] [--prompt 64] [--repeat 3] [--threads 1,all]
       [--model-dir DIR] [--json docs/bench/engine-2core.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643,
                  eos_token_id=151643)


def make_checkpoint(path: Path) -> None:
    """Qwen2.5-0.5B's shape with random weights, and a small local byte-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    if (path / "config.json").is_file():
        return
    print(f"creating {path} (random weights, Qwen2.5-0.5B's shape)", file=sys.stderr)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B)).to(torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["a small corpus for a benchmark tokenizer"] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(path)


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def bench_transformers(path: Path, prompt: list[int], tokens: int, repeat: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    x = torch.tensor([prompt])
    kw = dict(attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=0)

    def run(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)
        assert out.shape[1] == len(prompt) + n
        return time.perf_counter() - start

    run(2)  # warm-up
    prefills, decodes = [], []
    for _ in range(repeat):
        t1 = run(1)
        tn = run(tokens + 1)
        prefills.append(t1)
        decodes.append(tokens / (tn - t1))
    return {"prefill_s": _median(prefills), "decode_tokens_per_s": _median(decodes)}


def bench_engine(path: Path, prompt: list[int], tokens: int, repeat: int, batch: int) -> dict:
    import torch

    from distserve.engine.config import ModelConfig
    from distserve.engine.model import Model, load_weights

    blocks_per_seq = -(-(len(prompt) + tokens + 2) // 16)
    cfg = ModelConfig.load(None, {"num_blocks": blocks_per_seq * batch + 1}, hf_dir=str(path))
    model = Model(cfg, load_weights(cfg))
    pool = model.new_pool()
    seqs = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(batch)]

    def run(n: int) -> tuple[float, float]:
        start = time.perf_counter()
        logits = model.prefill(pool, [(prompt, b) for b in seqs])
        nxt = [int(t) for t in torch.argmax(logits, -1)]
        mid = time.perf_counter()
        for step in range(n):
            pos = len(prompt) + step
            logits = model.decode(pool, [(t, pos, b) for t, b in zip(nxt, seqs)])
            nxt = [int(t) for t in torch.argmax(logits, -1)]
        return mid - start, time.perf_counter() - mid

    run(2)  # warm-up
    prefills, decodes = [], []
    for _ in range(repeat):
        p, d = run(tokens)
        prefills.append(p)
        decodes.append(batch * tokens / d)
    return {"batch": batch, "prefill_s": _median(prefills), "decode_tokens_per_s": _median(decodes)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens per run (after the first)")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", default="1,all", help="comma list of thread counts; 'all': torch's default")
    ap.add_argument("--model-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "distserve-bench-qwen2.5-0.5b-shape")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    import torch

    make_checkpoint(args.model_dir)
    default_threads = torch.get_num_threads()
    prompt = [(i * 7919) % 150000 + 1 for i in range(args.prompt)]
    rows = []
    for spec in args.threads.split(","):
        threads = default_threads if spec == "all" else int(spec)
        torch.set_num_threads(threads)
        hf = bench_transformers(args.model_dir, prompt, args.tokens, args.repeat)
        one = bench_engine(args.model_dir, prompt, args.tokens, args.repeat, 1)
        eight = bench_engine(args.model_dir, prompt, args.tokens, args.repeat, 8)
        row = {"threads": threads, "transformers": hf, "engine_batch1": one, "engine_batch8": eight,
               "single_vs_transformers": one["decode_tokens_per_s"] / hf["decode_tokens_per_s"],
               "batch8_vs_single": eight["decode_tokens_per_s"] / one["decode_tokens_per_s"]}
        rows.append(row)
        print(f"threads={threads}: transformers {hf['decode_tokens_per_s']:.2f} tok/s, engine "
              f"{one['decode_tokens_per_s']:.2f} tok/s ({row['single_vs_transformers']:.2f}x), batch 8 "
              f"{eight['decode_tokens_per_s']:.2f} tok/s ({row['batch8_vs_single']:.2f}x single)", file=sys.stderr)
    import transformers

    out = {"model": "random Qwen2.5-0.5B shape (float32)", "prompt_tokens": args.prompt,
           "decode_tokens": args.tokens, "repeat": args.repeat, "cpus": os.cpu_count(),
           "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "transformers": transformers.__version__, "results": rows}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
