"""Every allowed-values list of the config, defined once: config/schema.py and data/config.py type
their keys with these (Literal[...]), and the code that dispatches on a value imports the same
tuple, so adding a choice is one edit here plus its implementation. Also the one range rule for
numbers (`bounded`). Imports nothing of distvit: any module may use it.

One-key ranges are type annotations, so each is one line where the key is declared:

    lr: Annotated[float, bounded(gt=0)] = 1e-3                       # "must be > 0, got 0.0"
    epochs: Annotated[int | None, bounded(ge=1, note="a run needs at least one step")] = 1

The message says the range, then the value, then the note (config/load.py prefixes the key and
where its value came from). null passes where the type allows it.
"""
from __future__ import annotations

from pydantic import AfterValidator

DEVICES = ("auto", "cpu", "cuda")
ATTENTION_BACKENDS = ("auto", "sdpa", "flash", "math")  # distvit/attention/backends.py
OPTIMIZERS = ("adamw", "lamb", "sgd")  # distvit/engine/optim.py
LR_BASE_SCALES = ("linear", "sqrt")  # distvit/config/resolve.py
CLIP_MODES = ("norm", "value")
SCHEDULES = ("cosine", "linear", "constant", "wsd")  # distvit/engine/schedule.py
ZERO_STAGES = (0, 1, 2, 3)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # distvit/parallel/deepspeed_config.py
OFFLOAD_MODES = ("none", "cpu", "partial", "interleaved")  # distvit/offload
SP_IMPLS = ("ulysses", "ring", "hybrid")  # distvit/parallel/parallelize.py
DISTILL_KINDS = ("none", "hard", "soft")  # distvit/engine/distill.py
TASKS = ("classify", "autoregressive")  # distvit/engine/tasks.py

# data (distvit/data/config.py)
SHARD_SPLITS = ("samples", "shards")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
ERASE_MODES = ("const", "rand", "pixel")  # random erasing fill (timm's remode)
MIXUP_MODES = ("batch", "pair", "elem")
ON_ERROR = ("raise", "skip")
MP_CONTEXTS = ("fork", "spawn", "forkserver")
PACK_RESIZE = ("native", "random_res")  # data.packing.resize (distvit/data/packing.py)


def bounded(*, ge=None, gt=None, le=None, lt=None, hint: str = "", note: str = "") -> AfterValidator:
    lo, lo_open = (gt, True) if gt is not None else (ge, False)
    hi, hi_open = (lt, True) if lt is not None else (le, False)
    if lo is not None and hi is not None:
        rule = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    elif lo is not None:
        rule = f"{'>' if lo_open else '>='} {lo}"
    else:
        rule = f"{'<' if hi_open else '<='} {hi}"

    def check(v):
        if v is None:
            return v
        bad = (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and (v >= hi if hi_open else v > hi))
        if bad:
            raise ValueError(f"must be {rule}{' ' + hint if hint else ''}, got {v}{'; ' + note if note else ''}")
        return v

    return AfterValidator(check)
