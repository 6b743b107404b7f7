"""Adam kernels for sub-groups updated on the device side of interleaved offload.

Both take the hyper-parameters from DeepSpeedCPUAdam's param group and the step count from its
state, so a sub-group's state stays DeepSpeedCPUAdam's whichever side updated it.

- `TorchAdam`: torch ops on the device tensors, written in the same order of operations as
  DeepSpeed's cpu_adam (csrc/adam/cpu_adam_impl.cpp: bias corrections and step size in float32,
  `param += -lr*wd*param` for AdamW, `param += step_size * m / (sqrt(v) * bc2 + eps)`). It is not
  bitwise equal to cpu_adam: the C++ code fuses multiply-adds (AVX FMA) and keeps beta^t as a
  running float32 product, torch does neither. The difference is a few float32 ulps per step.
- `CpuAdamStandIn`: calls the very cpu_adam C++ object of the engine's DeepSpeedCPUAdam on the
  stand-in "device" tensors (CPU). Same kernel, same running beta^t state, same call order as
  stock DeepSpeed, so results are bitwise equal and any difference a test sees comes from the
  schedule's copies, not from arithmetic.
"""
from __future__ import annotations

import numpy as np
import torch


class CpuAdamStandIn:
    name = "cpu_adam"

    def __init__(self, cpu_adam):
        self.cpu_adam = cpu_adam

    def __call__(self, param, grad, exp_avg, exp_avg_sq, step: int, group: dict) -> None:
        beta1, beta2 = group["betas"]
        self.cpu_adam.ds_opt_adam.adam_update(
            self.cpu_adam.opt_id, step, group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
            group["bias_correction"], param, grad, exp_avg, exp_avg_sq,
        )


class TorchAdam:
    name = "torch"

    def __init__(self, adamw_mode: bool):
        self.adamw_mode = adamw_mode

    @torch.no_grad()
    def __call__(self, param, grad, exp_avg, exp_avg_sq, step: int, group: dict) -> None:
        f32 = np.float32
        beta1, beta2 = f32(group["betas"][0]), f32(group["betas"][1])
        lr, eps, wd = f32(group["lr"]), f32(group["eps"]), f32(group["weight_decay"])
        if group["bias_correction"]:
            bc1 = f32(1) - f32(float(beta1) ** step)
            bc2 = f32(1) / np.sqrt(f32(1) - f32(float(beta2) ** step))
        else:
            bc1, bc2 = f32(1), f32(1)
        step_size = -lr / bc1
        if wd > 0 and not self.adamw_mode:
            grad.add_(param, alpha=float(wd))  # L2 Adam: the grad buffer is ours to overwrite
        exp_avg.mul_(float(beta1)).add_(grad, alpha=float(f32(1) - beta1))
        exp_avg_sq.mul_(float(beta2)).addcmul_(grad, grad, value=float(f32(1) - beta2))
        denom = torch.sqrt(exp_avg_sq, out=grad)  # reuse the grad buffer: no extra device memory
        denom.mul_(float(bc2)).add_(float(eps))
        if wd > 0 and self.adamw_mode:
            param.add_(param, alpha=float(-lr * wd))
        param.addcdiv_(exp_avg, denom, value=float(step_size))
