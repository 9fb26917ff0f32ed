"""Hugging Face checkpoints of the dense Llama family: their config.json as a ModelConfig (no torch here).

Supported: LlamaForCausalLM (Llama 2/3, Llama 3's rope scaling, attention/MLP biases), Qwen2ForCausalLM
(q/k/v biases), MistralForCausalLM; grouped-query attention, tied or untied embeddings. The weights are
read by distserve.engine.model.load_hf_weights into the engine's own paged-KV model, the tokenizer by
distserve.engine.tokenizer.HFTokenizer. Anything else is refused with one line naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}


class CheckpointError(ValueError):
    """A checkpoint the engine cannot run; the message is one line naming the file or field."""


def _read_json(path: Path, required: bool = True) -> dict:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path}: missing")
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files: those the index names, else every *.safetensors in the directory."""
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        files = [root / n for n in names]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: missing (named by {index.name})")
        if files:
            return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        hint = " (pytorch_model.bin is not supported: save with safe_serialization)" \
            if any(root.glob("pytorch_model*.bin")) else ""
        raise CheckpointError(f"{root}: no *.safetensors weights{hint}")
    return files


def _eos_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def _rope(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling): transformers 5 writes `rope_parameters`, older configs rope_theta/rope_scaling."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = params
    else:
        theta = cfg.get("rope_theta", 10000.0)
        scaling = cfg.get("rope_scaling")
    if not scaling:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise CheckpointError(f"rope scaling {kind!r} is not supported (supported: default, linear, llama3)")
    if kind == "default":
        return float(theta), None
    return float(theta), {**{k: v for k, v in scaling.items() if k not in ("type", "rope_theta")}, "rope_type": kind}


def read_config(model_dir: str) -> dict:
    """ModelConfig fields for a checkpoint directory; CheckpointError (one line) for anything unsupported."""
    root = Path(model_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    cfg = _read_json(root / "config.json")
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{root / 'config.json'}: architecture {arch or cfg.get('model_type')!r} is not "
                              f"supported (supported: {', '.join(ARCHITECTURES)})")
    kind = ARCHITECTURES[arch]
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{root / 'config.json'}: hidden_act {act!r} is not supported (silu only)")
    weight_files(root)  # fail now, before torch, when there are none
    if not (root / "tokenizer.json").is_file() and not (root / "tokenizer.model").is_file():
        raise CheckpointError(f"{root}: no tokenizer.json (the model's fast tokenizer)")
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        fields = {
            "name": root.resolve().name,
            "architecture": arch,
            "hf_dir": str(root.resolve()),
            "num_layers": int(cfg["num_hidden_layers"]),
            "hidden_size": hidden,
            "num_heads": heads,
            "num_kv_heads": int(cfg.get("num_key_value_heads") or heads),
            "head_dim": int(cfg.get("head_dim") or hidden // heads),
            "intermediate_size": int(cfg["intermediate_size"]),
            "vocab_size": int(cfg["vocab_size"]),
            "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
            "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        }
        max_len = int(cfg.get("max_position_embeddings", 4096))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{root / 'config.json'}: missing or bad field {exc}") from None
    fields["rope_theta"], fields["rope_scaling"] = _rope(cfg)
    if kind == "qwen2":
        fields["qkv_bias"] = True
    elif kind == "llama":
        fields["qkv_bias"] = fields["o_bias"] = bool(cfg.get("attention_bias", False))
        fields["mlp_bias"] = bool(cfg.get("mlp_bias", False))
    # Sliding-window attention equals full attention while the context fits in the window: cap it there.
    window = cfg.get("sliding_window")
    sliding = kind == "mistral" or cfg.get("use_sliding_window") or "sliding_attention" in (cfg.get("layer_types") or [])
    if window and sliding and (kind != "qwen2" or cfg.get("use_sliding_window")):
        max_len = min(max_len, int(window))
    fields["max_model_len"] = max_len
    gen = _read_json(root / "generation_config.json", required=False)
    eos = _eos_ids(gen.get("eos_token_id")) + _eos_ids(cfg.get("eos_token_id"))
    fields["eos_token_ids"] = sorted(set(eos))
    return fields
