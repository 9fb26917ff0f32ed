"""Tiny random Hugging Face checkpoints built locally with transformers (no download), and their reference
greedy outputs from transformers' own `generate` (float32).

Each architecture the engine supports gets one checkpoint that exercises its particular parts:
llama (Llama 3 rope scaling, grouped KV heads, attention and MLP biases, untied embeddings, a BOS-adding
tokenizer), qwen2 (q/k/v biases, tied embeddings, ChatML, a second EOS id the model really generates),
mistral (an explicit head_dim, a sliding window that caps the context).
"""

from __future__ import annotations

import json
from pathlib import Path

ARCHS = ("llama", "qwen2", "mistral")
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Prefill and decode run on different engines; the KV cache moves between them.",
    "Über naïve café: déjà vu! 日本語のテキスト、そして絵文字 🎉🚀 too.",
    "def main():\n    return 42  # numbers 0123456789",
    "Hello, world! How are you today? I am fine, thanks.",
]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
BRACKETS = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")
COMPLETIONS = ["The quick brown", "Über naïve café 日本", "def main():", "Hello"]
CHATS = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where does the KV cache go?"}],
         [{"role": "user", "content": "日本語で 🎉"}]]
MAX_TOKENS = 24


def _tokenizer(bos: bool, template: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=template)


def _config(arch: str, vocab: int):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1)
    if arch == "llama":
        return LlamaConfig(**common, max_position_embeddings=1024, attention_bias=True, mlp_bias=True,
                           tie_word_embeddings=False, rope_theta=10000.0,
                           rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if arch == "qwen2":
        return Qwen2Config(**{**common, "eos_token_id": 3}, max_position_embeddings=512, tie_word_embeddings=True,
                           rope_theta=1000000.0)
    return MistralConfig(**common, head_dim=32, max_position_embeddings=1024, sliding_window=192,
                         tie_word_embeddings=False)


def build(arch: str, root: Path) -> Path:
    """A checkpoint directory with random weights scaled so greedy answers depend on the prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    out = root / f"tiny-{arch}"
    tok = _tokenizer(bos=arch != "qwen2", template=CHATML if arch == "qwen2" else BRACKETS)
    torch.manual_seed({"llama": 1, "qwen2": 2, "mistral": 3}[arch])
    model = AutoModelForCausalLM.from_config(_config(arch, len(tok) + 12), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed" in name:
                p.normal_(0.0, 1.0)
            elif p.dim() == 2:
                p.normal_(0.0, 3.0 / p.shape[1] ** 0.5)
            elif "norm" in name:
                p.uniform_(0.7, 1.3)
            else:
                p.normal_(0.0, 0.2)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    if arch == "qwen2":
        # A second EOS id, one the model generates for the first prompt: the engine must stop on it too.
        ids = reference_generate(out, [COMPLETIONS[0]], [])[0][1]
        extra = next(t for i, t in enumerate(ids) if i >= 3 and t not in ids[:i])
        gen = json.loads((out / "generation_config.json").read_text())
        gen["eos_token_id"] = [3, extra]
        (out / "generation_config.json").write_text(json.dumps(gen))
    return out


def reference_generate(model_dir: Path, prompts: list[str], chats: list[list[dict]]):
    """[(prompt ids, generated ids, text)] from transformers' generate, greedy, float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    inputs = [list(tok(p)["input_ids"]) for p in prompts]
    for chat in chats:
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        inputs.append(list(ids))
    out = []
    with torch.no_grad():
        for ids in inputs:
            x = torch.tensor([ids])
            gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_TOKENS, do_sample=False,
                                 pad_token_id=min(eos))[0, len(ids):].tolist()
            text = tok.decode([t for t in gen if t not in eos], skip_special_tokens=True)
            out.append((ids, gen, text, bool(gen) and gen[-1] in eos))
    return out
