"""Engine and model configuration (no torch here: the null mode and the CLI import it).

One `ModelConfig` describes every model the engine runs: the built-in random model (the default) and the
dense Llama-family checkpoints read from a Hugging Face directory (`distserve.engine.hf`). The KV geometry
that engines publish to agents and peers (layers, kv heads, head dim, dtype) comes from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from distserve.engine import hf
from distserve.engine.tokenizer import VOCAB_SIZE

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


class RopeScaling(BaseModel):
    """Rotary frequency scaling as Hugging Face configs spell it (`rope_scaling` / `rope_parameters`)."""

    model_config = ConfigDict(extra="ignore")

    rope_type: Literal["default", "linear", "llama3"] = "default"
    factor: float = Field(1.0, gt=0)
    low_freq_factor: float = Field(1.0, gt=0)
    high_freq_factor: float = Field(4.0, gt=0)
    original_max_position_embeddings: int = Field(8192, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "RopeScaling":
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("llama3 rope scaling needs high_freq_factor > low_freq_factor")
        return self


class ModelConfig(BaseModel):
    """A decoder-only transformer and its paged KV cache.

    The default (the built-in random model) keeps one engine under 1 GiB RSS (about 4.3 M parameters, a
    64 MiB KV pool) and a 64-token completion well under a second on one CPU core.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = "distserve-reference"
    num_layers: int = Field(4, ge=1, le=256)
    hidden_size: int = Field(256, ge=8, le=65536)
    num_heads: int = Field(4, ge=1, le=512)
    num_kv_heads: int = Field(4, ge=1, le=512)
    # 0: hidden_size / num_heads (set by the validator).
    head_dim: int = Field(0, ge=0, le=1024)
    intermediate_size: int = Field(1024, ge=8, le=262144)
    vocab_size: int = Field(VOCAB_SIZE, ge=2, le=1 << 21)
    max_model_len: int = Field(4096, ge=16, le=1 << 21)
    rope_theta: float = Field(10000.0, gt=1.0)
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = Field(1e-6, gt=0, lt=1)
    # Biases: q/k/v projections (Qwen2, Llama's attention_bias), the output projection, the MLP.
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    # Weights, activations and the KV pool.
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Accumulate linear layers and norms in float64 so a row's result does not depend on its batch (float32
    # only). None: on for the built-in model, off for checkpoints (speed, and the rounding transformers has).
    batch_invariant: bool | None = None
    # Paged KV cache: block_size tokens per block, num_blocks blocks in the pool.
    block_size: int = Field(16, ge=1, le=4096)
    num_blocks: int = Field(512, ge=2, le=1 << 22)
    # Random weights from this seed unless `weights` names a safetensors file or `hf_dir` a checkpoint.
    seed: int = 0
    weights: str | None = None
    # A Hugging Face model directory (config.json, *.safetensors, tokenizer files): see distserve.engine.hf.
    hf_dir: str | None = None
    architecture: str = "distserve-reference"
    # Token ids that end a generation (checkpoints: generation_config.json, config.json, the tokenizer).
    eos_token_ids: list[int] = Field(default_factory=list)
    # Emit only printable ASCII, newline and EOS (text is lossless and readable). None: on for random
    # weights, off for loaded ones.
    printable_only: bool | None = None
    # Added to EOS's logit when printable_only is on, so random answers are not cut after a few tokens.
    eos_logit_bias: float = -4.0

    @property
    def output_mask(self) -> bool:
        if self.hf_dir is not None:
            return False
        return self.printable_only if self.printable_only is not None else self.weights is None

    @property
    def exact_batching(self) -> bool:
        if self.batch_invariant is not None:
            return self.batch_invariant
        return self.hf_dir is None and self.dtype == "float32"

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if not self.head_dim:
            if self.hidden_size % self.num_heads:
                raise ValueError("hidden_size must be a multiple of num_heads")
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.head_dim % 2:
            raise ValueError("head dimension must be even (rotary embedding)")
        if self.hf_dir is None and self.vocab_size < VOCAB_SIZE:
            raise ValueError(f"vocab_size must be at least {VOCAB_SIZE} (the byte tokenizer)")
        if self.batch_invariant and self.dtype != "float32":
            raise ValueError("batch_invariant needs dtype float32")
        if any(not 0 <= t < self.vocab_size for t in self.eos_token_ids):
            raise ValueError("eos_token_ids must be token ids below vocab_size")
        return self

    @property
    def element_size(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def kv_block_shape(self) -> list[int]:
        """One pool, lmdeploy-like: layers x blocks x (K/V, tokens, kv heads, head dim)."""
        return [self.num_layers, self.num_blocks, 2, self.block_size, self.num_kv_heads, self.head_dim]

    @property
    def block_bytes(self) -> int:
        """Bytes of one block in one layer."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.element_size

    @property
    def kv_pool_bytes(self) -> int:
        return self.num_layers * self.num_blocks * self.block_bytes

    @classmethod
    def load(cls, path: str | None, overrides: dict | None = None, hf_dir: str | None = None) -> "ModelConfig":
        """The built-in model (with the JSON file at `path`), or the checkpoint in `hf_dir`; overrides win.

        With a checkpoint the JSON file may only set the cache and serving fields (CHECKPOINT_KEYS)."""
        data: dict = {}
        if path:
            text = Path(path).read_text()
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError(f"{path}: expected a JSON object")
        if hf_dir is not None:
            extra = sorted(set(data) - CHECKPOINT_KEYS)
            if extra:
                raise ValueError(f"{path}: with --model only {sorted(CHECKPOINT_KEYS)} may be set, not {extra}")
            data = {**hf.read_config(hf_dir), **data}
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.model_validate(data)


# What a --model-config file may set next to a checkpoint (the rest comes from its config.json).
CHECKPOINT_KEYS = {"name", "block_size", "num_blocks", "dtype", "max_model_len", "batch_invariant"}
