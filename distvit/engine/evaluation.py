"""Evaluation over the whole val set, exact: the loader pads the last batch of each rank and marks
the padding invalid, so every sample counts once; one all-reduce over dp, one host read."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distvit.engine import distill
from distvit.parallel import comm


@torch.no_grad()
def evaluate_classifier(model, net: torch.nn.Module, batches, *, device, dtype, dp_group) -> dict:
    """Loss, top-1, top-5 of `model` (the engine or a plain module; `net` is its nn.Module) over
    `batches` of (images, labels, valid). A distilled student reports each head too (_cls, _dist)."""
    model.eval()
    heads = distill.head_names(net)
    totals = torch.zeros(len(heads), 4, dtype=torch.float64, device=device)  # loss sum, top1, top5, count
    with distill.separate_heads(net):
        for images, labels, valid in batches:
            images = images.to(device, dtype=dtype)
            labels, valid = labels.to(device), valid.to(device)
            outputs = distill.named_logits(model(images))
            for i, head in enumerate(heads):
                logits = outputs[head]
                loss = F.cross_entropy(logits, labels, reduction="none")
                top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
                hit = top5 == labels[:, None]
                totals[i] += torch.stack([
                    (loss * valid).sum(), (hit[:, 0] & valid).sum(), (hit.any(-1) & valid).sum(), valid.sum(),
                ]).double()
    totals = comm.all_reduce(totals, "sum", dp_group).tolist()  # one host read per evaluation
    model.train()
    count = max(totals[0][3], 1.0)
    result = {}
    for i, head in enumerate(heads):
        result[f"val_loss{head}"] = totals[i][0] / count
        result[f"val_top1{head}"] = 100 * totals[i][1] / count
        result[f"val_top5{head}"] = 100 * totals[i][2] / count
    return {**result, "val_count": int(totals[0][3])}
