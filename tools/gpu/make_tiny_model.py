"""Build a tiny Llama model for lmdeploy's PyTorch backend, offline and deterministic.

Random weights from a fixed seed (saved with save_pretrained, bfloat16 safetensors) and a BPE tokenizer
trained here with the `tokenizers` package on a generated corpus (saved as a fast tokenizer with a chat
template, so lmdeploy's "hf" chat template applies). Nothing is downloaded.

    python tools/gpu/make_tiny_model.py OUT_DIR [--layers 4] [--hidden 256] [--seed 1234]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


def corpus(seed: int, lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    words = (
        "the a prefill decode engine cache block token router etcd lease watch link model serve "
        "fast slow red green blue river mountain cloud stone light dark open close read write "
        "one two three four five six seven eight nine ten alpha beta gamma delta omega"
    ).split()
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "pe", "su", "do", "ga"]
    out = []
    for _ in range(lines):
        n = rng.randint(4, 16)
        toks = []
        for _ in range(n):
            if rng.random() < 0.7:
                toks.append(rng.choice(words))
            else:
                toks.append("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))))
        out.append(" ".join(toks) + rng.choice([".", "!", "?", ","]))
    return out


def build_tokenizer(out: Path, seed: int, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=SPECIAL[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_model(out: Path, seed: int, vocab: int, tok, layers: int, hidden: int, heads: int, kv_heads: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
        # A wide init keeps the greedy argmax well separated (random models otherwise sit on near-ties).
        initializer_range=0.08,
        torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    # Older config readers look for these names (transformers 5 writes `dtype` and `rope_parameters`).
    raw = json.loads((out / "config.json").read_text())
    raw.setdefault("torch_dtype", "bfloat16")
    raw.setdefault("rope_theta", 10000.0)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, a.seed, a.vocab)
    vocab = len(tok)
    cfg = build_model(out, a.seed, vocab, tok, a.layers, a.hidden, a.heads, a.kv_heads)
    (out / "distserve_tiny.json").write_text(
        json.dumps(
            {
                "seed": a.seed,
                "vocab": vocab,
                "layers": a.layers,
                "hidden": a.hidden,
                "arch": cfg.architectures,
            }
        )
    )
    print(f"tiny model in {out}: vocab {vocab}, {a.layers} layers, hidden {a.hidden}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
