#!/usr/bin/env python3
"""Reference engine decode speed on a CPU, side by side with Hugging Face transformers' `generate`.

A randomly initialised checkpoint of Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 heads / 2 KV heads,
vocab 151,936, tied embeddings) is created locally once (no download) and loaded by both:
  * transformers: `AutoModelForCausalLM` (float32, sdpa), greedy `generate` of one request, KV cache on;
  * distserve: the engine's own paged-KV model (`distserve.engine.model.Model`, what the scheduler thread
    calls each step), loaded from the same directory: one request, then a batch of 8 decoded together.
Decode tokens/s = generated tokens after the first / (time to generate them): the prefill (and its first
token) is timed apart and subtracted, for both. Each figure is the median of --repeat runs, interleaved (one
of each per round, so a busy machine slows all alike), once with one torch thread and once with all of
them (torch's default: one per physical core), in the same process. `--baseline FILE` adds the same two
engine runs with another version of `distserve/engine/model.py` (e.g. `git show HEAD:distserve/engine/model.py
> /tmp/model_base.py`), interleaved in the same rounds: before/after on the same noisy machine.

Usage: .venv/bin/python tools/bench_engine.py [--tokens 32] [--prompt 64] [--repeat 3] [--threads 1,all]
       [--model-dir DIR] [--baseline FILE] [--json docs/bench/engine-2core.json]
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


class Transformers:
    """transformers' greedy `generate`, one request."""

    def __init__(self, path: Path, prompt: list[int]) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.x = torch.tensor([prompt])

    def _generate(self, n: int) -> float:
        torch = self.torch
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(self.x, attention_mask=torch.ones_like(self.x), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, pad_token_id=0)
        assert out.shape[1] == self.x.shape[1] + n
        return time.perf_counter() - start

    def run(self, tokens: int) -> tuple[float, float]:
        """(prefill seconds, decode tokens/s): generate 1 token, then 1 + tokens; the difference is decode."""
        t1 = self._generate(1)
        return t1, tokens / (self._generate(tokens + 1) - t1)


class Engine:
    """The engine's model (what its scheduler thread runs each step), `batch` requests decoded together."""

    def __init__(self, path: Path, prompt: list[int], batch: int, tokens: int, module=None) -> None:
        import torch

        from distserve.engine import model as current
        from distserve.engine.config import ModelConfig

        module = module or current
        self.torch = torch
        per_seq = -(-(len(prompt) + tokens + 2) // 16)
        cfg = ModelConfig.load(None, {"num_blocks": per_seq * batch + 1}, hf_dir=str(path))
        self.model = module.Model(cfg, module.load_weights(cfg))
        self.pool = self.model.new_pool()
        self.prompt = prompt
        self.batch = batch
        self.seqs = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]

    def run(self, tokens: int) -> tuple[float, float]:
        argmax = self.torch.argmax
        start = time.perf_counter()
        logits = self.model.prefill(self.pool, [(self.prompt, b) for b in self.seqs])
        nxt = [int(t) for t in argmax(logits, -1)]
        mid = time.perf_counter()
        for step in range(tokens):
            pos = len(self.prompt) + step
            logits = self.model.decode(self.pool, [(t, pos, b) for t, b in zip(nxt, self.seqs)])
            nxt = [int(t) for t in argmax(logits, -1)]
        return mid - start, self.batch * tokens / (time.perf_counter() - mid)


def measure(runners: dict, tokens: int, repeat: int) -> dict:
    """Medians per runner; runs interleaved (one of each per round) so a busy machine slows all alike."""
    for r in runners.values():
        r.run(2)  # warm-up
    got: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    for _ in range(repeat):
        for name, r in runners.items():
            got[name].append(r.run(tokens))
    return {name: {"prefill_s": statistics.median(p for p, _ in xs),
                   "decode_tokens_per_s": statistics.median(d for _, d in xs),
                   "decode_tokens_per_s_all": [round(d, 3) for _, d in xs]} for name, xs in got.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens per run (after the first)")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", default="1,all", help="comma list of thread counts; 'all': torch's default")
    ap.add_argument("--model-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "distserve-bench-qwen2.5-0.5b-shape")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--baseline", type=Path, help="another model.py to run beside the current one")
    args = ap.parse_args()
    import torch

    make_checkpoint(args.model_dir)
    default_threads = torch.get_num_threads()
    prompt = [(i * 7919) % 150000 + 1 for i in range(args.prompt)]
    rows = []
    runners = {"transformers": Transformers(args.model_dir, prompt),
               "engine_batch1": Engine(args.model_dir, prompt, 1, args.tokens),
               "engine_batch8": Engine(args.model_dir, prompt, 8, args.tokens)}
    if args.baseline:
        import importlib.util

        spec = importlib.util.spec_from_file_location("distserve_model_baseline", args.baseline)
        base = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(base)
        runners["baseline_batch1"] = Engine(args.model_dir, prompt, 1, args.tokens, base)
        runners["baseline_batch8"] = Engine(args.model_dir, prompt, 8, args.tokens, base)
    for spec in args.threads.split(","):
        threads = default_threads if spec == "all" else int(spec)
        torch.set_num_threads(threads)
        res = measure(runners, args.tokens, args.repeat)
        hf, one, eight = (res[k]["decode_tokens_per_s"] for k in ("transformers", "engine_batch1", "engine_batch8"))
        row = {"threads": threads, **res, "single_vs_transformers": one / hf, "batch8_vs_single": eight / one}
        rows.append(row)
        print(f"threads={threads}: transformers {hf:.2f} tok/s, engine {one:.2f} tok/s ({one / hf:.2f}x), "
              f"batch 8 {eight:.2f} tok/s ({eight / one:.2f}x single)", file=sys.stderr)
        if args.baseline:
            b1, b8 = (res[k]["decode_tokens_per_s"] for k in ("baseline_batch1", "baseline_batch8"))
            row.update(baseline_single_vs_transformers=b1 / hf, baseline_batch8_vs_single=b8 / b1)
            print(f"  baseline: engine {b1:.2f} tok/s ({b1 / hf:.2f}x), batch 8 {b8:.2f} tok/s "
                  f"({b8 / b1:.2f}x single)", file=sys.stderr)
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
