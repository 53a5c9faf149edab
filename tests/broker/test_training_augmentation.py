"""Tests of broker.training.augmentation: the views and repairs of a training batch."""

from __future__ import annotations

import torch

from broker.training.augmentation import augment


def test_augment_is_a_symmetry():
    x = torch.arange(2 * 3 * 63 * 63, dtype=torch.float32).reshape(2, 3, 63, 63)
    y = augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    for a, b in zip(x, y, strict=True):
        assert torch.equal(torch.sort(a.flatten()).values, torch.sort(b.flatten()).values)
        assert b[:, 31, 31].tolist() == a[:, 31, 31].tolist()  # the centre stays the centre
    assert y.is_contiguous(memory_format=torch.channels_last)  # the layout the nets train in


def test_augment_views_are_the_flips_and_rotations_it_draws():
    x = torch.randn(64, 3, 63, 63)
    y = augment(x, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)  # the same draws, in the same order
    k, flip = torch.randint(0, 4, (64,), generator=gen), torch.rand(64, generator=gen) < 0.5
    for i in range(64):
        want = torch.rot90(x[i].flip(-1) if flip[i] else x[i], int(k[i]), dims=(-2, -1))
        assert torch.equal(y[i], want)
    assert len(set(zip(k.tolist(), flip.tolist(), strict=True))) == 8  # every view drawn


def test_augment_truncates_and_masks_before_rotating():
    x = torch.ones(400, 3, 63, 63)
    y = augment(x, torch.Generator().manual_seed(2), p_truncate=0.5, p_mask=0.5)
    assert torch.equal(x, torch.ones_like(x))  # the input is not modified
    zeroed = (y == 0).flatten(1).float().mean(1)
    assert 0.5 < (zeroed > 0).float().mean() < 0.95
    assert torch.all((y == 0).sum(1) % 3 == 0)  # a pixel is zeroed in all channels or none
