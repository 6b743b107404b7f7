"""The optimizer that fits the run: AdamW, LAMB or SGD with weight-decay and layer-decay groups.

- no decay on norms, biases, position embeddings and class/distillation tokens (1-D tensors and
  the names a model lists in `no_weight_decay()`), as timm and DeiT do;
- `optim.layer_decay` (BEiT / MAE fine-tuning): timm's `param_groups_layer_decay` grouping (stem =
  layer 0, block i = layer i + 1, the final norm with the last block, the head last) with lr scale
  `layer_decay ** (last - layer)`; each group's lr is the peak lr times its scale, so the schedule
  (a LambdaLR multiplier) keeps the ratios. Groups are ordered head first: the logged lr is the peak;
- adamw: DeepSpeedCPUAdam when the optimizer state lives on the CPU (offload), as DeepSpeed
  requires; FusedAdam on CUDA when its kernel builds, else torch's fused AdamW; torch AdamW on the CPU
  (fused under ZeRO 1-2, whose flat partitions make the for-loop slow);
- lamb: timm's LAMB (NVLAMB, per-tensor trust ratio), ported below. The trust ratio needs whole
  tensors, and ZeRO hands the optimizer flat partitions, so LAMB runs with ZeRO stage 0 only
  (the config says so); DeepSpeed's FusedLamb is CUDA-only and has the same restriction;
- sgd: torch SGD with `optim.momentum` (Nesterov), fused on CUDA;
- `optim.clip_mode: value` clamps every gradient element the optimizer sees, just before its step:
  under ZeRO those are the averaged, accumulated, unscaled gradient partitions, and an elementwise
  clamp does not care how they are partitioned (`norm` is DeepSpeed's gradient_clipping);
- `model.freeze`: fnmatch patterns of parameter names that get requires_grad=False.
"""
from __future__ import annotations

import fnmatch
import re

import torch

from distvit.config import Config, ConfigError
from distvit.parallel import deepspeed_optim


def _no_decay(name: str, p: torch.Tensor, skip: set[str]) -> bool:
    return p.ndim <= 1 or name in skip or name.endswith(".bias") or any(name.startswith(s + ".") for s in skip)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if _no_decay(name, p, skip) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


MATCH_PREV_GROUP = 99999.0
# timm's group_matcher(coarse=False) of ViT / DeiT and of Swin (the same parameter names as ours).
VIT_MATCHER = [(r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre|dist_token", (0.0,)),
               (r"^blocks\.(\d+)", (1.0,)), (r"^norm", (1.0, MATCH_PREV_GROUP))]
SWIN_MATCHER = [(r"^patch_embed", (0.0,)), (r"^layers\.(\d+).downsample", (1.0,), (0.0,)),
                (r"^layers\.(\d+)\.\w+\.(\d+)", (1.0,)), (r"^norm", (1.0, MATCH_PREV_GROUP))]


def layer_ids(model: torch.nn.Module) -> dict[str, int]:
    """Parameter name -> layer index, as timm's group_with_matcher(reverse=True) numbers them."""
    names = [n for n, _ in model.named_parameters()]
    matcher = SWIN_MATCHER if any(n.startswith("layers.") for n in names) else VIT_MATCHER

    def key(name):
        for pattern, prefix, *suffix in matcher:
            m = re.match(pattern, name)
            if m:
                return prefix + tuple(float(g) for g in m.groups() if g is not None) + (suffix[0] if suffix else ())
        return (float("inf"),)  # the head and anything after the trunk

    keys = {n: key(n) for n in names}
    ids, lid = {}, -1
    for k in sorted(set(keys.values())):
        if lid < 0 or k[-1] != MATCH_PREV_GROUP:
            lid += 1
        ids[k] = lid
    return {n: ids[k] for n, k in keys.items()}


def layer_decay_groups(model: torch.nn.Module, weight_decay: float, lr: float, layer_decay: float) -> list[dict]:
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    ids = layer_ids(model)
    last = max(ids.values())
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        nd = _no_decay(name, p, skip)
        lid = ids[name]
        scale = layer_decay ** (last - lid)
        g = groups.setdefault((lid, nd), {"params": [], "weight_decay": 0.0 if nd else weight_decay,
                                          "lr": lr * scale, "lr_scale": scale, "layer": lid})
        g["params"].append(p)
    return sorted(groups.values(), key=lambda g: (-g["layer"], g["weight_decay"] == 0.0))


def freeze_parameters(model: torch.nn.Module, patterns: list[str]) -> int:
    """requires_grad=False on every parameter whose name matches a pattern; returns how many tensors."""
    names = [n for n, _ in model.named_parameters()]
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            import difflib

            close = difflib.get_close_matches(pat, names, n=3, cutoff=0.4)
            raise ConfigError(f"model.freeze pattern {pat!r} matches no parameter of the model (close names: "
                              f"{', '.join(close) or names[:3]}); patterns are fnmatch over names, e.g. 'blocks.0.*'")
    frozen = 0
    for n, p in model.named_parameters():
        if any(fnmatch.fnmatchcase(n, pat) for pat in patterns):
            p.requires_grad_(False)
            frozen += 1
    return frozen


def build_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.layer_decay is not None:
        groups = layer_decay_groups(model, o.weight_decay, o.lr, o.layer_decay)
    else:
        groups = param_groups(model, o.weight_decay)
    opt = _make(groups, cfg, device)
    if o.grad_clip is not None and o.clip_mode == "value":
        clamp_grads_before_step(opt, o.grad_clip)
    return opt


def _make(groups, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        fused = device.type == "cuda"
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.momentum > 0, fused=fused or None)
    if o.name == "lamb":
        return Lamb(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    kwargs = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    if cfg.parallel.offload != "none":
        return deepspeed_optim.cpu_adamw(groups, **kwargs)
    if device.type == "cuda":
        return deepspeed_optim.fused_adamw(groups, **kwargs)
    # ZeRO 1-2 hand the optimizer flat partitions: the for-loop makes ~7 passes over one huge tensor
    # (32 ms for ViT-Ti's 5.7M on one CPU thread), torch's fused CPU kernel one (6 ms).
    if cfg.parallel.zero_stage >= 1:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    return torch.optim.AdamW(groups, foreach=False, **kwargs)


def clamp_grads_before_step(opt: torch.optim.Optimizer, value: float) -> None:
    """A step pre-hook (torch runs it for every Optimizer subclass, DeepSpeed's included)."""

    @torch.no_grad()
    def clamp(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.clamp_(-value, value)

    opt.register_step_pre_hook(clamp)


class Lamb(torch.optim.Optimizer):
    """timm's Lamb (timm/optim/lamb.py) without its internal grad-norm clip (DeepSpeed clips):
    Adam moments with bias correction, L2 decay added to the update, update scaled per tensor by
    ||w|| / ||update|| when weight decay is on (the trust ratio; 1 where either norm is 0)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            group["step"] = group.get("step", 0) + 1
            bc1, bc2 = 1 - beta1 ** group["step"], 1 - beta2 ** group["step"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                m, v, g = state["exp_avg"], state["exp_avg_sq"], p.grad
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                update = (m / bc1).div_((v.sqrt() / bc2 ** 0.5).add_(group["eps"]))
                if group["weight_decay"] != 0:
                    update.add_(p, alpha=group["weight_decay"])
                    w_norm, u_norm = p.norm(2.0), update.norm(2.0)
                    ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                    update.mul_(ratio)
                p.add_(update, alpha=-group["lr"])
        return loss
