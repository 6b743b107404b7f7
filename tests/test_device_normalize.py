"""uint8 batches from the workers, normalisation and random erasing on the device (distvit.data.device).

The reference is the former worker-side float path, kept here verbatim in substance: normalise the HWC
uint8 images as (x / 255 - mean) / std, then timm-style random erasing on each normalised sample from
its own generator (box draws, then a noise seed). The loader's output must equal it for the same seed.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from distvit.data import pipeline
from distvit.data.device import DeviceNormalize, to_uint8_batch
from distvit.data.loader import build_train_loader
from distvit.data.transforms import TrainTransform
from test_augment import aug_cfg, shards  # noqa: F401  (the module fixture)


def old_normalize(images: list[np.ndarray], mean, std) -> torch.Tensor:
    batch = torch.from_numpy(np.stack(images))
    if batch.dim() == 3:
        batch = batch.unsqueeze(-1)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, -1, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)]).view(1, -1, 1, 1)
    return batch.permute(0, 3, 1, 2).float().mul_(scale).sub_(shift).contiguous()


def old_erase(img: torch.Tensor, rng, prob: float, mode: str) -> None:
    """The worker-side RandomErasing this change replaced (min_area 0.02, max_area 1/3, min_aspect 0.3)."""
    if rng.random() > prob:
        return
    chan, h_img, w_img = img.shape
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    for _ in range(10):
        target = rng.uniform(0.02, 1 / 3) * h_img * w_img
        aspect = math.exp(rng.uniform(*log_aspect))
        h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if w < w_img and h < h_img:
            top, left = rng.randint(0, h_img - h), rng.randint(0, w_img - w)
            gen = torch.Generator().manual_seed(rng.getrandbits(63))
            shape = (chan, h, w) if mode == "pixel" else (chan, 1, 1)
            fill = torch.empty(shape).normal_(generator=gen) if mode != "const" else torch.zeros(shape)
            img[:, top:top + h, left:left + w] = fill
            return


@pytest.mark.parametrize("remode,in_chans", [("pixel", 1), ("rand", 3), ("const", 3)])
def test_uint8_loader_with_device_normalisation_equals_the_float_pipeline(shards, monkeypatch, remode, in_chans):
    mean, std = ([0.5], [0.25]) if in_chans == 1 else ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    cfg = aug_cfg(shards, num_workers=0, remode=remode, reprob=0.7, in_chans=in_chans, mean=mean, std=std)
    sent, reference = [], []
    to_uint8, plan = pipeline.to_uint8_batch, TrainTransform.erase_plan

    def record_batch(images):
        batch = to_uint8(images)
        sent.append(batch)
        reference.append(old_normalize(images, mean, std))
        return batch

    def record_plan(self, rngs, shape):
        twins = [copy.deepcopy(r) for r in rngs]  # the generators as the old path met them
        for img, rng in zip(reference[-1], twins):
            old_erase(img, rng, 0.7, remode)
        return plan(self, rngs, shape)

    monkeypatch.setattr(pipeline, "to_uint8_batch", record_batch)
    monkeypatch.setattr(TrainTransform, "erase_plan", record_plan)
    got = [x for x, _ in build_train_loader(cfg, dp_rank=0, dp_size=1, seed=5)]
    assert len(got) == len(reference) > 3
    assert all(b.dtype == torch.uint8 and b.shape[1] == in_chans for b in sent)  # what crosses to the trainer
    for new, old in zip(got, reference):
        assert new.dtype == torch.float32
        torch.testing.assert_close(new, old, rtol=0, atol=1e-6)
    erased = sum(int((old.flatten(2) != old_normalize(list(b.permute(0, 2, 3, 1).numpy()), mean, std).flatten(2))
                     .any(-1).any(-1).sum()) for old, b in zip(reference, sent))
    assert erased > 0  # erasing did happen, and happened identically


def test_device_normalize_matches_the_formula_and_rejects_float():
    images = [np.random.RandomState(i).randint(0, 256, (5, 6, 3), dtype=np.uint8) for i in range(3)]
    batch = to_uint8_batch(images)
    assert batch.shape == (3, 3, 5, 6) and batch.is_contiguous()
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    out = DeviceNormalize(mean, std)(batch, "cpu")
    ref = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).double() / 255
           - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(out, ref.float(), rtol=0, atol=1e-5)
    with pytest.raises(TypeError, match="uint8"):
        DeviceNormalize(mean, std)(batch.float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_normalisation_equals_cpu():
    batch = to_uint8_batch([np.random.RandomState(i).randint(0, 256, (8, 8, 3), dtype=np.uint8) for i in range(4)])
    erase = torch.tensor([[1, 2, 3, 4, 99], [0, 0, 0, 0, 0], [0, 0, 2, 2, 7], [5, 5, 1, 1, 3]])
    norm = DeviceNormalize((0.4, 0.5, 0.6), (0.2, 0.3, 0.4), "pixel")
    torch.testing.assert_close(norm(batch, "cuda", erase).cpu(), norm(batch, "cpu", erase), rtol=0, atol=1e-6)
