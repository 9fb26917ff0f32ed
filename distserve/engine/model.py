"""The engine's decoder-only transformer over a paged KV pool (torch, CPU).

One implementation for every model the engine runs: the dense Llama family (pre-norm blocks with RMSNorm,
rotary attention with optional Llama 3 / linear frequency scaling, grouped KV heads, optional biases, a SiLU
gated MLP, tied or untied embeddings). The built-in random model is one configuration of it; Hugging Face
checkpoints load into it (`load_hf_weights`). The pool is one tensor of the configured dtype laid out like
lmdeploy's: layers x blocks x (K/V, block_size, kv_heads, head_dim).

Numerics follow transformers' Llama code (RMSNorm in float32, rotary tables in float32, the same rotation
and attention scale), so greedy output equals `generate`'s. q/k/v and gate/up are fused into one matmul
each; attention runs per sequence (prefill: causal over its own keys; decode: over its gathered blocks).

Batch invariance (`ModelConfig.exact_batching`, the built-in model's default): PD output must equal hybrid
output token for token, but a CPU GEMM's rounding depends on how many rows it multiplies. Linear layers
and norms then accumulate in float64 and round to float32, so a row's result does not depend on its batch.
Checkpoints run in their dtype instead (speed); PD equals hybrid there whenever the batches match.

Decode batches (speed, not exact mode): a CPU GEMM of a few rows against a large weight runs 1.5-3x
slower in one orientation than the other (MKL, M = 4..16), and which one wins depends on the shape, the
thread count and the machine. `MatmulPlanner` times both on the first real calls of each (rows, in, out,
threads) and keeps the faster; decode attention of a batch is one call over its gathered blocks.
"""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from distserve.engine import hf, tokenizer
from distserve.engine.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_LAYER_KEYS = ("attn_norm", "qkv", "qkv_bias", "o", "o_bias", "mlp_norm", "gate_up", "gate_up_bias", "down",
               "down_bias")


def _names(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The engine's tensor names and shapes (a `--weights` file holds these)."""
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * d
    shapes: dict[str, tuple[int, ...]] = {"embed": (cfg.vocab_size, h), "norm": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (cfg.vocab_size, h)
    for layer in range(cfg.num_layers):
        p = f"layers.{layer}."
        shapes[p + "attn_norm"] = (h,)
        shapes[p + "qkv"] = (qkv, h)
        if cfg.qkv_bias:
            shapes[p + "qkv_bias"] = (qkv,)
        shapes[p + "o"] = (h, cfg.num_heads * d)
        if cfg.o_bias:
            shapes[p + "o_bias"] = (h,)
        shapes[p + "mlp_norm"] = (h,)
        shapes[p + "gate_up"] = (2 * i, h)
        shapes[p + "down"] = (h, i)
        if cfg.mlp_bias:
            shapes[p + "gate_up_bias"] = (2 * i,)
            shapes[p + "down_bias"] = (h,)
    return shapes


def random_weights(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.seed)
    out = {}
    for name, shape in _names(cfg).items():
        if name.endswith("bias"):
            out[name] = torch.zeros(shape)
        elif len(shape) == 1:
            out[name] = torch.ones(shape)
        elif name == "embed":
            out[name] = torch.randn(shape, generator=g)
        else:
            # A gain above 1 keeps attention peaked and outputs context-dependent for a random model.
            gain = 2.0 if name.endswith("qkv") else 1.0
            out[name] = torch.randn(shape, generator=g) * (gain / shape[1] ** 0.5)
    return out


def load_weights(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    if cfg.hf_dir:
        return load_hf_weights(cfg)
    if not cfg.weights:
        return random_weights(cfg)
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
    save_file(random_weights(cfg), path)


# -- Hugging Face checkpoints ----------------------------------------------------------------------------
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of a private memory map (no read, no copy: pages come
    from the file as they are touched)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path}: not a safetensors file (bad header)") from None
    size = path.stat().st_size
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    raw = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (size,), (1,))
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(meta.get("dtype"))
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has dtype {meta.get('dtype')}, not one of {sorted(_ST_DTYPES)}")
        start, end = (8 + n + o for o in meta["data_offsets"])
        if end > size:
            raise ValueError(f"{path}: tensor {name} runs past the end of the file (truncated download?)")
        data = raw[start:end]
        if start % dtype.itemsize:
            data = data.clone()  # misaligned for its dtype: copy
        out[name] = data.view(dtype).view(meta["shape"])
    return out


def load_hf_weights(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors under the engine's names, in the configured dtype (q/k/v and gate/up fused)."""
    assert cfg.hf_dir is not None
    tensors: dict[str, torch.Tensor] = {}
    for path in hf.weight_files(cfg.hf_dir):
        tensors.update(map_safetensors(path))
    dtype = DTYPES[cfg.dtype]
    where = Path(cfg.hf_dir).name

    def get(name: str) -> torch.Tensor:
        t = tensors.get(name)
        if t is None:
            raise ValueError(f"{where}: tensor {name} missing from the checkpoint")
        return t.to(dtype)

    out = {"embed": get("model.embed_tokens.weight"), "norm": get("model.norm.weight")}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = get("lm_head.weight")
    for i in range(cfg.num_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        out[q + "attn_norm"] = get(p + "input_layernorm.weight")
        out[q + "mlp_norm"] = get(p + "post_attention_layernorm.weight")
        out[q + "qkv"] = torch.cat([get(attn + f"{x}_proj.weight") for x in "qkv"])
        out[q + "o"] = get(attn + "o_proj.weight")
        out[q + "gate_up"] = torch.cat([get(mlp + "gate_proj.weight"), get(mlp + "up_proj.weight")])
        out[q + "down"] = get(mlp + "down_proj.weight")
        if cfg.qkv_bias:
            out[q + "qkv_bias"] = torch.cat([get(attn + f"{x}_proj.bias") for x in "qkv"])
        if cfg.o_bias:
            out[q + "o_bias"] = get(attn + "o_proj.bias")
        if cfg.mlp_bias:
            out[q + "gate_up_bias"] = torch.cat([get(mlp + "gate_proj.bias"), get(mlp + "up_proj.bias")])
            out[q + "down_bias"] = get(mlp + "down_proj.bias")
    for name, shape in _names(cfg).items():
        if tuple(out[name].shape) != shape:
            raise ValueError(f"{where}: {name} has shape {tuple(out[name].shape)}, expected {shape} from config.json")
    return out


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies in float32, computed as transformers does (same rounding)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling
    if rs is None or rs.rope_type == "default":
        return inv
    if rs.rope_type == "linear":
        return inv / rs.factor
    # llama3: long wavelengths slowed by `factor`, short ones kept, the band between blended.
    old = rs.original_max_position_embeddings
    long_wave, short_wave = old / rs.low_freq_factor, old / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > long_wave, inv / rs.factor, inv)
    blend = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    mixed = (1 - blend) * scaled / rs.factor + blend * scaled
    between = ~(wavelen < short_wave) * ~(wavelen > long_wave)
    return torch.where(between, mixed, scaled)


class MatmulPlanner:
    """Per shape, `x @ w.T` or `(w @ x.T).T`, whichever runs faster here; chosen on the first real calls.

    The first `SAMPLES` calls of each orientation per (rows, in, out, threads) alternate and are timed (real
    work, nothing is computed twice; a decode step calls each layer shape once per layer, so layer shapes
    settle within a step, the output head within a few); the faster by its minimum (load only slows a run)
    is then kept, and timed again every `RECHECK` calls (a choice made while the machine was busy is not
    kept forever). One row (single-request decode), over `MAX_ROWS` rows (long prefills) and small weights
    (cache resident: call overhead dominates) always take `F.linear`.
    """

    SAMPLES = 6
    RECHECK = 4096
    MAX_ROWS = 64
    MIN_WEIGHT = 1 << 18  # elements

    def __init__(self) -> None:
        self.choice: dict[tuple[int, int, int, int], bool] = {}  # True: weights-stationary (w @ x.T)
        self._uses: dict[tuple[int, int, int, int], int] = {}
        self._trials: dict[tuple[int, int, int, int], tuple[list[float], list[float]]] = {}

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        m = x.shape[0]
        if m < 2 or m > self.MAX_ROWS or x.dim() != 2 or w.numel() < self.MIN_WEIGHT:
            return F.linear(x, w, b)
        key = (m, w.shape[1], w.shape[0], torch.get_num_threads())
        ws = self.choice.get(key)
        if ws is not None:
            uses = self._uses[key] = self._uses.get(key, 0) + 1
            if uses < self.RECHECK:
                return self._ws(x, w, b) if ws else F.linear(x, w, b)
            self._uses[key] = 0
            del self.choice[key]
        trials = self._trials.setdefault(key, ([], []))
        ws = len(trials[1]) < len(trials[0])
        start = time.perf_counter()
        y = self._ws(x, w, b) if ws else F.linear(x, w, b)
        trials[ws].append(time.perf_counter() - start)
        if len(trials[1]) >= self.SAMPLES:
            self.choice[key] = min(trials[1]) < min(trials[0])
            del self._trials[key]
        return y

    @staticmethod
    def _ws(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        y = torch.mm(w, x.t()) if b is None else torch.addmm(b[:, None], w, x.t())
        return y.t().contiguous()


class Model:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
        self.cfg = cfg
        self.dtype = DTYPES[cfg.dtype]
        self.exact = cfg.exact_batching
        # Matmul operands: float64 copies for batch invariance, else the weights as given (mapped ones stay
        # mapped when the checkpoint already has the configured dtype).
        wt = (lambda t: t.double().contiguous()) if self.exact else (lambda t: t.to(self.dtype).contiguous())
        self.embed = weights["embed"].to(self.dtype)
        self.layers = []
        for layer in range(cfg.num_layers):
            p = f"layers.{layer}."
            self.layers.append({k: (wt(weights[p + k]) if p + k in weights else None) for k in _LAYER_KEYS})
        self.norm = wt(weights["norm"])
        self.lm_head = wt(weights["embed"] if cfg.tie_word_embeddings else weights["lm_head"])
        self.out_bias = None
        if cfg.output_mask:
            bias = torch.zeros(cfg.vocab_size)
            allowed = set(range(32, 127)) | {10, tokenizer.EOS}
            bias[[t for t in range(cfg.vocab_size) if t not in allowed]] = float("-inf")
            bias[tokenizer.EOS] = cfg.eos_logit_bias
            self.out_bias = bias
        self.inv_freq = inv_frequencies(cfg)
        self.scale = cfg.head_dim ** -0.5
        self.gqa = cfg.num_heads != cfg.num_kv_heads
        d = cfg.head_dim
        self.splits = (cfg.num_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d)
        self.planner = MatmulPlanner()

    def new_pool(self) -> torch.Tensor:
        return torch.zeros(self.cfg.kv_block_shape, dtype=self.dtype)

    # -- pieces ------------------------------------------------------------------------------------
    def _lin(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if self.exact:
            return F.linear(x.double(), w, b).float()
        return self.planner.linear(x, w, b)

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        eps = self.cfg.rms_norm_eps
        if self.exact:
            x64 = x.double()
            return (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w).float()
        x32 = x.float()
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(self.dtype)

    def _cos_sin(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = pos[:, None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype)[:, None, :], emb.sin().to(self.dtype)[:, None, :]

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, D]; rotates the two halves of each head (transformers' rotate_half)."""
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return (x * cos) + (rotated * sin)

    def _qkv(self, x: torch.Tensor, layer: dict, cos: torch.Tensor, sin: torch.Tensor):
        cfg = self.cfg
        qkv = self._lin(self._norm(x, layer["attn_norm"]), layer["qkv"], layer["qkv_bias"])
        q, k, v = qkv.split(self.splits, dim=-1)
        d = cfg.head_dim
        q = self._rope(q.view(-1, cfg.num_heads, d), cos, sin)
        k = self._rope(k.view(-1, cfg.num_kv_heads, d), cos, sin)
        return q, k, v.reshape(-1, cfg.num_kv_heads, d)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """q: [n, Hq, D], k/v: [t, Hkv, D] -> [n, Hq*D]."""
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                             attn_mask=mask, is_causal=causal, scale=self.scale,
                                             enable_gqa=self.gqa)
        return out.transpose(0, 1).reshape(q.shape[0], -1)

    def _mlp(self, x: torch.Tensor, layer: dict) -> torch.Tensor:
        gu = self._lin(self._norm(x, layer["mlp_norm"]), layer["gate_up"], layer["gate_up_bias"])
        gate, up = gu.chunk(2, dim=-1)
        return self._lin(F.silu(gate) * up, layer["down"], layer["down_bias"])

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self._lin(self._norm(x, self.norm), self.lm_head).float()
        return logits + self.out_bias if self.out_bias is not None else logits

    # -- steps -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, pool: torch.Tensor, seqs: list[tuple]) -> torch.Tensor:
        """Each seq is (tokens, its blocks) or (tokens, its blocks, start): the tokens sit at positions
        start.. (default 0) and the KV of positions < start is already in the blocks (a cached prefix).
        Writes KV; returns last-token logits [S, V]."""
        bs = self.cfg.block_size
        seqs = [(s[0], s[1], s[2] if len(s) > 2 else 0) for s in seqs]
        lens = [len(t) for t, _, _ in seqs]
        tokens = torch.tensor([t for toks, _, _ in seqs for t in toks], dtype=torch.long)
        pos = torch.cat([torch.arange(p0, p0 + n) for (_, _, p0), n in zip(seqs, lens)])
        cos, sin = self._cos_sin(pos)
        slots = []
        for (toks, blocks, p0), n in zip(seqs, lens):
            p = torch.arange(p0, p0 + n)
            slots.append((torch.tensor(blocks, dtype=torch.long)[p // bs], p % bs))
        hk, d = self.cfg.num_kv_heads, self.cfg.head_dim
        x = self.embed[tokens]
        for li, layer in enumerate(self.layers):
            q, k, v = self._qkv(x, layer, cos, sin)
            kv = pool[li]
            outs, start = [], 0
            for (bidx, slot), n, (_, blocks, p0) in zip(slots, lens, seqs):
                kv[bidx, 0, slot] = k[start: start + n]
                kv[bidx, 1, slot] = v[start: start + n]
                if p0:  # the cached prefix's KV from the pool, then ours; query i sees keys <= p0 + i
                    old = torch.tensor(blocks[: p0 // bs], dtype=torch.long)
                    kk = torch.cat((kv[old, 0].reshape(-1, hk, d)[:p0], k[start: start + n]))
                    vv = torch.cat((kv[old, 1].reshape(-1, hk, d)[:p0], v[start: start + n]))
                    mask = torch.ones(n, p0 + n, dtype=torch.bool).tril(p0)
                    outs.append(self._attend(q[start: start + n], kk, vv, False, mask))
                else:
                    outs.append(self._attend(q[start: start + n], k[start: start + n], v[start: start + n],
                                             n > 1))
                start += n
            x = x + self._lin(torch.cat(outs) if len(outs) > 1 else outs[0], layer["o"], layer["o_bias"])
            x = x + self._mlp(x, layer)
        last = torch.tensor(lens).cumsum(0) - 1
        return self._logits(x[last])

    @torch.inference_mode()
    def decode(self, pool: torch.Tensor, seqs: list[tuple[int, int, list[int]]]) -> torch.Tensor:
        """Each seq is (token, its position, blocks covering the position). Returns logits [S, V]."""
        bs = self.cfg.block_size
        tokens = torch.tensor([t for t, _, _ in seqs], dtype=torch.long)
        pos = torch.tensor([p for _, p, _ in seqs], dtype=torch.long)
        cos, sin = self._cos_sin(pos)
        bidx = torch.tensor([blocks[p // bs] for _, p, blocks in seqs], dtype=torch.long)
        slot = pos % bs
        gathers = [(torch.tensor(blocks[: p // bs + 1], dtype=torch.long), p + 1) for _, p, blocks in seqs]
        # A batch attends in one call over its blocks gathered into a padded table (pad: the sequence's own
        # first block, masked out). Exact mode keeps one call per sequence: a padded row's rounding could
        # depend on the other sequences' lengths.
        table = mask = None
        if len(seqs) > 1 and not self.exact:
            width = max(len(b) for b, _ in gathers)
            table = torch.stack([torch.cat((b, b[:1].expand(width - len(b)))) for b, _ in gathers])
            mask = (torch.arange(width * bs) < torch.tensor([n for _, n in gathers])[:, None])[:, None, None, :]
        x = self.embed[tokens]
        hk, d = self.cfg.num_kv_heads, self.cfg.head_dim
        for li, layer in enumerate(self.layers):
            q, k, v = self._qkv(x, layer, cos, sin)
            kv = pool[li]
            kv[bidx, 0, slot] = k
            kv[bidx, 1, slot] = v
            if table is not None:
                att = self._attend_batch(q, kv[table], mask)
            else:
                outs = []
                for i, (blocks, length) in enumerate(gathers):
                    kk = kv[blocks, 0].reshape(-1, hk, d)[:length]
                    vv = kv[blocks, 1].reshape(-1, hk, d)[:length]
                    outs.append(self._attend(q[i: i + 1], kk, vv, False))
                att = torch.cat(outs) if len(outs) > 1 else outs[0]
            x = x + self._lin(att, layer["o"], layer["o_bias"])
            x = x + self._mlp(x, layer)
        return self._logits(x)

    def _attend_batch(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q: [S, Hq, D], kv: [S, blocks, 2, block_size, Hkv, D] gathered, mask: [S, 1, 1, keys] -> [S, Hq*D].
        The query heads sharing a KV head are that head's queries (no repeated K/V, as transformers' GQA)."""
        s, _, _, bs, hk, d = kv.shape
        k = kv[:, :, 0].reshape(s, -1, hk, d).transpose(1, 2)
        v = kv[:, :, 1].reshape(s, -1, hk, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q.view(s, hk, -1, d), k, v, attn_mask=mask, scale=self.scale)
        return out.reshape(s, -1)
