"""The AIM next-patch objective on its own (issue 19), without the Trainer (engine/tasks.py, models/causal_vit.py).

- the loss ignores the predictions at the prefix positions [:, :K] and sees every other one;
- normalised targets have zero mean and (unbiased) variance var / (var + 1e-6) per patch;
- with prefix attention, the full forward's prediction at position i >= K does not change when
  patches i, i+1, ... change (no leakage of the target or later patches), while the prefix
  positions see each other both ways; plain causal (K = 0) sees nothing ahead;
- the loss equals a mean squared error computed by hand on a 4-patch example, with and without
  normalised targets;
- CausalViT.loss and NextPatch.loss are the same objective (one implementation).
"""
from __future__ import annotations

import math

import pytest
import torch

from distvit.engine.tasks import NORM_EPS, NextPatch, normalise_patches
from distvit.models.causal_vit import vit_causal_digits

K = 5  # prefix patches of the 16 of an 8x8 digit


def _model(prefix: int = K, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return vit_causal_digits(prefix_patches=prefix, **kw).eval()


def _images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("norm_pix", [False, True])
def test_the_loss_ignores_the_prefix_predictions_and_sees_every_other(norm_pix):
    model, images = _model(), _images()
    task = NextPatch(prefix_patches=K, norm_pix=norm_pix)
    with torch.no_grad():
        pred = model(images)
    base = task.loss(pred, images, model)
    changed = pred.clone()
    changed[:, :K] += 100.0 * torch.randn_like(changed[:, :K])  # anything at the prefix positions
    assert torch.equal(task.loss(changed, images, model), base)
    for i in (K, K + 3, pred.shape[1] - 1):  # the first predicted patch, one inside, the last
        one = pred.clone()
        one[1, i, 2] += 0.5
        assert task.loss(one, images, model) != base, i
    # K = 0: every position counts, position 0 included.
    plain = NextPatch(prefix_patches=0, norm_pix=norm_pix)
    first = pred.clone()
    first[0, 0, 0] += 0.5
    assert plain.loss(first, images, model) != plain.loss(pred, images, model)


def test_normalised_targets_have_zero_mean_and_unit_variance_per_patch():
    assert NORM_EPS == 1e-6
    g = torch.Generator().manual_seed(0)
    patches = 3.0 + 5.0 * torch.randn(4, 16, 12, generator=g, dtype=torch.float64)
    patches[0, 0] = 7.0  # a flat patch: variance 0 -> all zeros (no division by zero)
    patches[1, 2] = torch.linspace(0, 1e-4, 12, dtype=torch.float64)  # variance ~1e-9, far below eps
    out = normalise_patches(patches)
    var = patches.var(-1, unbiased=True)
    torch.testing.assert_close(out.mean(-1), torch.zeros_like(var), rtol=0, atol=1e-12)
    # (x - mean) / sqrt(var + eps): the unbiased variance of the result is var / (var + eps), ~1 for real patches.
    torch.testing.assert_close(out.var(-1, unbiased=True), var / (var + NORM_EPS), rtol=1e-10, atol=1e-12)
    assert torch.equal(out[0, 0], torch.zeros(12, dtype=torch.float64))
    assert out[1, 2].abs().max() < 0.1  # eps keeps a near-flat patch small instead of blowing it up to unit scale
    typical = out.var(-1, unbiased=True)[2:]
    torch.testing.assert_close(typical, torch.ones_like(typical), rtol=0, atol=1e-6)
    # The targets NextPatch trains against with norm_pix are these, per patch of the model's patchify.
    model, images = _model(), _images()
    torch.testing.assert_close(NextPatch(K, norm_pix=True).targets(model, images), normalise_patches(model.patchify(images)))
    assert torch.equal(NextPatch(K, norm_pix=False).targets(model, images), model.patchify(images))


def _changed_from(model, images: torch.Tensor, first: int, seed: int = 2) -> torch.Tensor:
    """images with every patch from `first` on replaced by other pixels."""
    patches = model.patchify(images).clone()
    patches[:, first:] = 3.0 * torch.randn(patches[:, first:].shape, generator=torch.Generator().manual_seed(seed))
    return model.unpatchify(patches)


@pytest.mark.parametrize("prefix", [0, K])
def test_a_prediction_sees_no_patch_from_its_own_on_and_the_prefix_sees_itself_both_ways(prefix):
    model, images = _model(prefix), _images()
    n = model.num_patches
    with torch.no_grad():
        pred = model(images)
        for i in range(prefix, n):
            # Prediction i regresses patch i from patches 0 .. i-1: changing patches i .. N-1 leaves predictions
            # prefix .. i as they are (masked keys weigh exactly 0), and changes the later ones.
            other = model(_changed_from(model, images, i))
            assert torch.equal(other[:, prefix:i + 1], pred[:, prefix:i + 1]), i
            if i + 1 < n:
                assert (other[:, i + 1] - pred[:, i + 1]).abs().max() > 1e-3, i
        if prefix:
            # The prefix (start token + patches 0 .. K-1) is bidirectional: changing its last patch (K-1) changes
            # every prefix position's output, position 0 included; a patch after the prefix changes none of them.
            last = model(_changed_from(model, images, prefix - 1))
            assert all((last[:, j] - pred[:, j]).abs().max() > 1e-3 for j in range(prefix)), "prefix not bidirectional"
            after = model(_changed_from(model, images, prefix))
            assert torch.equal(after[:, :prefix + 1], pred[:, :prefix + 1])
        else:
            # Plain causal: position 0 sees only the start token.
            assert torch.equal(model(_changed_from(model, images, 0))[:, 0], pred[:, 0])


def test_the_loss_equals_a_mean_squared_error_by_hand():
    # A 4x4 one-channel image in 2x2 patches: 4 patches of 4 pixels, raster order, each (row, col) within the patch.
    model = vit_causal_digits(img_size=4, embed_dim=16, depth=1, num_heads=2, prefix_patches=1)
    image = torch.tensor([[0., 1., 4., 4.],
                          [2., 3., 4., 4.],
                          [1., 0., 0., 2.],
                          [0., 1., 4., 6.]])[None, None]
    patches = [[0, 1, 2, 3], [4, 4, 4, 4], [1, 0, 0, 1], [0, 2, 4, 6]]
    assert model.patchify(image)[0].tolist() == patches
    pred = torch.tensor([[[9., 9., 9., 9.], [4., 3., 4., 5.], [0., 0., 0., 0.], [1., 2., 3., 4.]]])
    # Raw pixels, prefix 1: patches 1, 2, 3 only; 12 squared errors.
    sq = [(p - t) ** 2 for i in (1, 2, 3) for p, t in zip(pred[0, i].tolist(), patches[i])]
    assert NextPatch(prefix_patches=1, norm_pix=False).loss(pred, image, model).item() == pytest.approx(sum(sq) / 12)
    assert sum(sq) == (0 + 1 + 0 + 1) + (1 + 0 + 0 + 1) + (1 + 0 + 1 + 4)  # per patch, by eye
    # Normalised targets: (x - mean) / sqrt(unbiased var + 1e-6) per patch; a flat patch becomes zeros.
    def norm(p):
        m = sum(p) / 4
        v = sum((x - m) ** 2 for x in p) / 3
        return [(x - m) / math.sqrt(v + 1e-6) for x in p]
    sq = [(p - t) ** 2 for i in (1, 2, 3) for p, t in zip(pred[0, i].tolist(), norm(patches[i]))]
    assert norm(patches[1]) == [0.0] * 4
    got = NextPatch(prefix_patches=1, norm_pix=True).loss(pred, image, model).item()
    assert got == pytest.approx(sum(sq) / 12, rel=1e-6)
    # Two images: the mean of their per-image errors (equal patch counts: the mean over every element).
    two = NextPatch(prefix_patches=0, norm_pix=False).loss(torch.cat([pred, pred + 1]), torch.cat([image, image]), model)
    flat = [(p - t) ** 2 for q in (pred[0], pred[0] + 1) for i in range(4) for p, t in zip(q[i].tolist(), patches[i])]
    assert two.item() == pytest.approx(sum(flat) / 32)


@pytest.mark.parametrize("prefix,norm_pix", [(0, False), (K, False), (K, True)])
def test_the_model_loss_is_the_task_loss(prefix, norm_pix):
    model, images = _model(prefix), _images()
    with torch.no_grad():
        task = NextPatch(prefix, norm_pix).loss(model(images), images, model)
        assert torch.equal(model.loss(images, norm_pix=norm_pix), task)
