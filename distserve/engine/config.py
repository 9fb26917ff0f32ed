"""Engine and model configuration (no torch here: the null mode and the CLI import it)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from distserve.engine.tokenizer import VOCAB_SIZE


class ModelConfig(BaseModel):
    """A decoder-only transformer and its paged KV cache.

    The default keeps one engine under 1 GiB RSS (about 4.3 M parameters, a 64 MiB KV pool) and a 64-token
    completion well under a second on one CPU core.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = "distserve-reference"
    num_layers: int = Field(4, ge=1, le=64)
    hidden_size: int = Field(256, ge=8, le=8192)
    num_heads: int = Field(4, ge=1, le=128)
    num_kv_heads: int = Field(4, ge=1, le=128)
    intermediate_size: int = Field(1024, ge=8, le=32768)
    vocab_size: int = Field(VOCAB_SIZE, ge=VOCAB_SIZE, le=1 << 20)
    max_model_len: int = Field(4096, ge=16, le=1 << 20)
    rope_theta: float = 10000.0
    # Paged KV cache: block_size tokens per block, num_blocks blocks in the pool.
    block_size: int = Field(16, ge=1, le=4096)
    num_blocks: int = Field(512, ge=2, le=1 << 22)
    # Random weights from this seed unless `weights` names a safetensors file.
    seed: int = 0
    weights: str | None = None
    # Emit only printable ASCII, newline and EOS (text is lossless and readable). None: on for random
    # weights, off for loaded ones.
    printable_only: bool | None = None
    # Added to EOS's logit when printable_only is on, so random answers are not cut after a few tokens.
    eos_logit_bias: float = -4.0

    @property
    def output_mask(self) -> bool:
        return self.printable_only if self.printable_only is not None else self.weights is None

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("head dimension (hidden_size / num_heads) must be even (rotary embedding)")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_block_shape(self) -> list[int]:
        """One pool, lmdeploy-like: layers x blocks x (K/V, tokens, kv heads, head dim)."""
        return [self.num_layers, self.num_blocks, 2, self.block_size, self.num_kv_heads, self.head_dim]

    @property
    def block_bytes(self) -> int:
        """Bytes of one block in one layer (float32)."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * 4

    @property
    def kv_pool_bytes(self) -> int:
        return self.num_layers * self.num_blocks * self.block_bytes

    @classmethod
    def load(cls, path: str | None, overrides: dict | None = None) -> "ModelConfig":
        data: dict = {}
        if path:
            text = Path(path).read_text()
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError(f"{path}: expected a JSON object")
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.model_validate(data)
