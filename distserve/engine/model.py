"""A small decoder-only transformer over a paged KV pool (torch, CPU).

Pre-norm blocks with RMSNorm, rotary attention (grouped KV heads) and a SwiGLU MLP. The pool is one
float32 tensor laid out like lmdeploy's: layers x blocks x (K/V, block_size, kv_heads, head_dim).

Batch invariance: PD output must equal hybrid output token for token, but a CPU GEMM's rounding depends
on how many rows it multiplies. Linear layers and norms therefore accumulate in float64 and round to
float32, so a row's result does not depend on its batch; attention runs per sequence (same shapes
whichever engine runs it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distserve.engine import tokenizer
from distserve.engine.config import ModelConfig


def _names(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"embed": (cfg.vocab_size, h), "norm": (h,), "lm_head": (cfg.vocab_size, h)}
    for layer in range(cfg.num_layers):
        p = f"layers.{layer}."
        shapes[p + "attn_norm"] = (h,)
        shapes[p + "qkv"] = ((cfg.num_heads + 2 * cfg.num_kv_heads) * d, h)
        shapes[p + "o"] = (h, cfg.num_heads * d)
        shapes[p + "mlp_norm"] = (h,)
        shapes[p + "gate_up"] = (2 * i, h)
        shapes[p + "down"] = (h, i)
    return shapes


def random_weights(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.seed)
    out = {}
    for name, shape in _names(cfg).items():
        if len(shape) == 1:
            out[name] = torch.ones(shape)
        elif name == "embed":
            out[name] = torch.randn(shape, generator=g)
        else:
            # A gain above 1 keeps attention peaked and outputs context-dependent for a random model.
            gain = 2.0 if name.endswith("qkv") else 1.0
            out[name] = torch.randn(shape, generator=g) * (gain / shape[1] ** 0.5)
    return out


def load_weights(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    if not cfg.weights:
        return random_weights(cfg)
    from safetensors.torch import load_file

    loaded = load_file(cfg.weights)
    expected = _names(cfg)
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise ValueError(f"{cfg.weights}: missing tensors {missing[:5]}")
    for name, shape in expected.items():
        if tuple(loaded[name].shape) != shape:
            raise ValueError(f"{cfg.weights}: {name} has shape {tuple(loaded[name].shape)}, expected {shape}")
    return {name: loaded[name].float().contiguous() for name in expected}


def save_weights(cfg: ModelConfig, path: str) -> None:
    from safetensors.torch import save_file

    save_file(random_weights(cfg), path)


class Model:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
        self.cfg = cfg
        w64 = {k: v.double().contiguous() for k, v in weights.items()}
        self.embed = weights["embed"]
        self.layers = []
        for layer in range(cfg.num_layers):
            p = f"layers.{layer}."
            self.layers.append({k: w64[p + k] for k in ("attn_norm", "qkv", "o", "mlp_norm", "gate_up", "down")})
        self.norm = w64["norm"]
        self.lm_head = w64["lm_head"]
        bias = torch.zeros(cfg.vocab_size)
        if cfg.output_mask:
            allowed = set(range(32, 127)) | {10, tokenizer.EOS}
            bias[[t for t in range(cfg.vocab_size) if t not in allowed]] = float("-inf")
            bias[tokenizer.EOS] = cfg.eos_logit_bias
        self.out_bias = bias
        half = cfg.head_dim // 2
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(half, dtype=torch.float64) / half))
        angles = torch.arange(cfg.max_model_len + 1, dtype=torch.float64)[:, None] * inv[None, :]
        self.cos, self.sin = angles.cos().float(), angles.sin().float()
        self.groups = cfg.num_heads // cfg.num_kv_heads

    # -- pieces ------------------------------------------------------------------------------------
    @staticmethod
    def _lin(x: torch.Tensor, w64: torch.Tensor) -> torch.Tensor:
        return F.linear(x.double(), w64).float()

    @staticmethod
    def _norm(x: torch.Tensor, w64: torch.Tensor) -> torch.Tensor:
        x64 = x.double()
        return (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w64).float()

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, D], pos: [T]."""
        cos, sin = self.cos[pos][:, None, :], self.sin[pos][:, None, :]
        a, b = x[..., ::2], x[..., 1::2]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)

    def _qkv(self, x: torch.Tensor, layer: dict, pos: torch.Tensor):
        cfg = self.cfg
        qkv = self._lin(self._norm(x, layer["attn_norm"]), layer["qkv"])
        d = cfg.head_dim
        q = qkv[:, : cfg.num_heads * d].view(-1, cfg.num_heads, d)
        k = qkv[:, cfg.num_heads * d: (cfg.num_heads + cfg.num_kv_heads) * d].view(-1, cfg.num_kv_heads, d)
        v = qkv[:, (cfg.num_heads + cfg.num_kv_heads) * d:].view(-1, cfg.num_kv_heads, d)
        return self._rope(q, pos), self._rope(k, pos), v.contiguous()

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        """q: [n, Hq, D], k/v: [t, Hkv, D] -> [n, Hq*D]."""
        if self.groups > 1:
            k = k.repeat_interleave(self.groups, dim=1)
            v = v.repeat_interleave(self.groups, dim=1)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                             is_causal=causal)
        return out.transpose(0, 1).reshape(q.shape[0], -1)

    def _mlp(self, x: torch.Tensor, layer: dict) -> torch.Tensor:
        gu = self._lin(self._norm(x, layer["mlp_norm"]), layer["gate_up"])
        gate, up = gu.chunk(2, dim=-1)
        return self._lin(F.silu(gate) * up, layer["down"])

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._lin(self._norm(x, self.norm), self.lm_head) + self.out_bias

    # -- steps -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, pool: torch.Tensor, seqs: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        """Each seq is (tokens from position 0, its blocks). Writes KV; returns last-token logits [S, V]."""
        bs = self.cfg.block_size
        lens = [len(t) for t, _ in seqs]
        tokens = torch.tensor([t for toks, _ in seqs for t in toks], dtype=torch.long)
        pos = torch.cat([torch.arange(n) for n in lens])
        slots = []
        for (toks, blocks), n in zip(seqs, lens):
            p = torch.arange(n)
            slots.append((torch.tensor(blocks, dtype=torch.long)[p // bs], p % bs))
        x = self.embed[tokens]
        for li, layer in enumerate(self.layers):
            q, k, v = self._qkv(x, layer, pos)
            kv = pool[li]
            outs, start = [], 0
            for (bidx, slot), n in zip(slots, lens):
                kv[bidx, 0, slot] = k[start: start + n]
                kv[bidx, 1, slot] = v[start: start + n]
                outs.append(self._attend(q[start: start + n], k[start: start + n], v[start: start + n], True))
                start += n
            x = x + self._lin(torch.cat(outs), layer["o"])
            x = x + self._mlp(x, layer)
        last = torch.tensor(lens).cumsum(0) - 1
        return self._logits(x[last])

    @torch.inference_mode()
    def decode(self, pool: torch.Tensor, seqs: list[tuple[int, int, list[int]]]) -> torch.Tensor:
        """Each seq is (token, its position, blocks covering the position). Returns logits [S, V]."""
        bs = self.cfg.block_size
        tokens = torch.tensor([t for t, _, _ in seqs], dtype=torch.long)
        pos = torch.tensor([p for _, p, _ in seqs], dtype=torch.long)
        bidx = torch.tensor([blocks[p // bs] for _, p, blocks in seqs], dtype=torch.long)
        slot = pos % bs
        gathers = [(torch.tensor(blocks[: p // bs + 1], dtype=torch.long), p + 1) for _, p, blocks in seqs]
        x = self.embed[tokens]
        hk, d = self.cfg.num_kv_heads, self.cfg.head_dim
        for li, layer in enumerate(self.layers):
            q, k, v = self._qkv(x, layer, pos)
            kv = pool[li]
            kv[bidx, 0, slot] = k
            kv[bidx, 1, slot] = v
            outs = []
            for i, (blocks, length) in enumerate(gathers):
                kk = kv[blocks, 0].reshape(-1, hk, d)[:length]
                vv = kv[blocks, 1].reshape(-1, hk, d)[:length]
                outs.append(self._attend(q[i: i + 1], kk, vv, False))
            x = x + self._lin(torch.cat(outs), layer["o"])
            x = x + self._mlp(x, layer)
        return self._logits(x)
