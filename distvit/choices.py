"""Every allowed-values list of the config, defined once: config.py / data/config.py type their keys
with these (Literal[...]), and the code that dispatches on a value imports the same tuple, so adding
a choice is one edit here plus its implementation. No imports: any module may use it."""

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

# data (distvit/data/config.py)
SHARD_SPLITS = ("samples", "shards")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
ERASE_MODES = ("const", "rand", "pixel")  # random erasing fill (timm's remode)
MIXUP_MODES = ("batch", "pair", "elem")
ON_ERROR = ("raise", "skip")
MP_CONTEXTS = ("fork", "spawn", "forkserver")
