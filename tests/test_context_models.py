"""bench/context_models.py: the ideal adaptive code length against coding it symbol by symbol,
and the models' figures on hand-made layers."""
import math
import os
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import context_models  # noqa: E402


def sequential_kt_bits(context, symbol, k):
    """The same code length the slow way: each symbol at its context's counts so far."""
    counts, bits = {}, 0.0
    for c, s in zip(context, symbol):
        seen = counts.setdefault(c, np.full(k, 0.5))
        bits -= math.log2(seen[s] / seen.sum())
        seen[s] += 1
    return bits


def test_kt_bits_known_answer():
    # one context, 0 then 1: 1/2, then (0 + 1/2) / (1 + 1) = 1/4 -> 1 + 2 bits
    assert context_models.kt_bits([0, 0], [0, 1], 2) == pytest.approx(3.0)
    assert context_models.kt_bits([], [], 2) == 0.0


def test_kt_bits_is_the_sequential_code_length():
    rng = np.random.default_rng(0)
    context, symbol = rng.integers(0, 5, 300), rng.integers(0, 4, 300)
    assert context_models.kt_bits(context * 7 + 3, symbol, 4) == pytest.approx(sequential_kt_bits(context, symbol, 4))


def test_models_on_hand_made_layers():
    # A layer whose rows are all alive or all dead past column 4: the row density tells them apart.
    rng = np.random.default_rng(1)
    rows = rng.random(64) < 0.5
    mask = np.zeros((64, 256), np.float32)
    mask[rows, 4:] = rng.random((rows.sum(), 252)) < 0.9
    mask[:, :4] = rng.random((64, 4)) < 0.5
    codebook = torch.tensor([-0.5, -0.1, 0.2, 0.7])
    index = torch.from_numpy(np.where(mask == 1, rng.integers(0, 4, mask.shape), 0))
    bits = context_models.layer_bits(codebook, index, torch.from_numpy(mask))
    presence = dict(zip(context_models.PRESENCE, bits["presence"]))
    assert presence["neighbours + row density"] < 0.85 * presence["neighbours"]
    assert len(bits["clusters"]) == len(context_models.CLUSTERS) and min(bits["clusters"]) > 0
    # uniform random clusters: no model codes them in much less than log2(4) bits a weight
    assert min(bits["clusters"]) > 0.95 * 2 * mask.sum()
