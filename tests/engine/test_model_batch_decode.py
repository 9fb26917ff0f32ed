"""The engine model's batch decode path (issue 21): a batch decoded together gives each sequence what it gets
decoded alone (up to float32 rounding), with its attention in one call over a padded block table and its
large matmuls in the orientation `MatmulPlanner` timed fastest; exact mode keeps batch invariance."""

from __future__ import annotations

import torch

from distserve.engine.config import ModelConfig
from distserve.engine.model import MatmulPlanner, Model, random_weights

# Weights above the planner's floor (1 << 18 elements), GQA (8 query heads on 2 KV heads), block size 4.
BIG = dict(num_layers=2, hidden_size=512, num_heads=8, num_kv_heads=2, intermediate_size=1024, block_size=4,
           num_blocks=64, qkv_bias=True)


def _decode_batch_and_alone(cfg: ModelConfig):
    model = Model(cfg, random_weights(cfg))
    pool = model.new_pool()
    prompts = [list(range(1, 1 + n)) for n in (3, 9, 14, 6)]  # different lengths: padded, masked table
    blocks = [list(range(i * 8, i * 8 + 8)) for i in range(len(prompts))]
    first = model.prefill(pool, list(zip(prompts, blocks))).argmax(-1).tolist()
    seqs = [(t, len(p), b) for t, p, b in zip(first, prompts, blocks)]
    for _ in range(2 * MatmulPlanner.SAMPLES):  # the planner's trial calls, then its settled choice
        together = model.decode(pool.clone(), seqs)
    alone = torch.cat([model.decode(pool.clone(), [s]) for s in seqs])
    return model, together, alone


def test_batch_decode_equals_each_sequence_alone():
    model, together, alone = _decode_batch_and_alone(ModelConfig(**BIG, batch_invariant=False))
    assert torch.allclose(together, alone, rtol=1e-4, atol=1e-4), (together - alone).abs().max()
    assert together.argmax(-1).tolist() == alone.argmax(-1).tolist()
    # every large matmul of the 4-row decode settled on an orientation (one key per weight shape)
    shapes = {(k, n) for m, k, n, _ in model.planner.choice if m == 4}
    assert {(512, 768), (512, 512), (512, 2048), (1024, 512)} <= shapes


def test_exact_mode_batch_decode_is_batch_invariant():
    model, together, alone = _decode_batch_and_alone(ModelConfig(**BIG, batch_invariant=True))
    assert torch.equal(together, alone)
    assert not model.planner.choice  # exact mode never reorients (float64 linear layers)


def test_planner_orientations_agree_and_small_or_single_rows_bypass():
    planner = MatmulPlanner()
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(1024, 512, generator=g), torch.randn(1024, generator=g)
    x = torch.randn(8, 512, generator=g)
    ref = torch.nn.functional.linear(x, w, b)
    for _ in range(2 * planner.SAMPLES):
        y = planner.linear(x, w, b)
        assert y.is_contiguous() and torch.allclose(y, ref, rtol=1e-5, atol=1e-4)
    assert len(planner.choice) == 1
    planner.linear(x[:1], w, b)  # one row: F.linear, no timing
    planner.linear(x, w[:64], b[:64])  # a small weight: F.linear
    assert len(planner.choice) == 1 and not planner._trials
