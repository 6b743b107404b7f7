"""`distvit generate`: complete images patch by patch with a causal ViT trained by task.kind=autoregressive.

    distvit generate --checkpoint runs/aim_digits --prompt 'data/digits/val-*.tar' --prefix-patches 8 --out gen/
    distvit generate --checkpoint runs/aim_digits --prompt 3.png 7.png --prefix-patches 4,8 --sp 2 --out gen/

Each prompt is the first K patches (raster order) of an image: the images of --prompt (image files,
or webdataset shards read as the run's val loader reads them, --num of them). --prefix-patches
takes one K or a comma list cycled over the prompts: prompts of different lengths decode in one
batch, each sequence at its own position in the KV cache (ragged cache_seqlens).

How: one prefill of every prompt (the model's prefix attention over min(K, task.prefix_patches)
patches, causal after), then one token per step per sequence with the KV cache and
decode_attention (stream-K on CUDA, the torch path on CPU; --backend to choose). With --sp N the
command spawns N local gloo processes that each hold 1/N of the KV cache (parallel/decode_sp.py)
and merge their attention partials with decode_attention_sp; the result equals --sp 1.

Writes to --out: grid.png (one row per prompt: prompt | generated | ground truth), generated.pt
(the images, normalised as the model sees them) and metrics.json (MSE of the generated patches
against the ground truth, and of the mean training image as the baseline).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from distvit.config import ConfigError
from distvit.errors import UserError
from distvit.models.causal_vit import CausalViT, prefix_bias


# ------------------------------------------------------------------------------ decoding


def _check_prompts(model: CausalViT, prompts: list[torch.Tensor]) -> list[int]:
    lengths = [int(p.shape[0]) for p in prompts]
    bad = [n for n in lengths if not 0 <= n <= model.num_patches]
    if bad or not prompts:
        raise ValueError(f"generate: prompt lengths {lengths}; each must be 0..{model.num_patches} patches")
    return lengths


def _prefix_tokens(model: CausalViT, lengths: list[int], device) -> torch.Tensor:
    """Tokens of each sequence that see each other both ways: the start token and min(L, K) prompt patches."""
    return torch.tensor([min(n, model.prefix_patches) + 1 for n in lengths], device=device)


@torch.no_grad()
def generate(model: CausalViT, prompts: list[torch.Tensor], *, backend: str = "auto", group=None) -> torch.Tensor:
    """Complete every prompt (L_b, patch_dim) to N patches greedily: (B, N, patch_dim), one batch.

    A prefill writes every prompt's tokens into one KV cache (shorter prompts padded at the end,
    which the causal mask hides); then every step feeds each unfinished sequence its last
    prediction at its own position. group: a process group to split the cache over (--sp).
    """
    lengths = _check_prompts(model, prompts)
    N, dev = model.num_patches, model.pos_embed.device
    B = len(prompts)
    T = min(max(lengths) + 1, N)  # tokens of the prefill: the start token and the prompt's patches
    known = torch.zeros(B, N, model.patch_dim, dtype=model.pos_embed.dtype, device=dev)
    for b, p in enumerate(prompts):
        known[b, :lengths[b]] = p.to(dev, known.dtype)
    tokens = torch.cat([model.start_token.expand(B, -1, -1), model.patch_embed(known[:, :T - 1])], dim=1)
    cache = model.new_cache(B, backend=backend)
    prefix = _prefix_tokens(model, lengths, dev)
    pred = model.forward_tokens(tokens + model.pos_embed[:, :T], cache, bias=prefix_bias(prefix, T, T, tokens.dtype))
    if group is not None:
        from distvit.parallel.decode_sp import ShardedKVCache

        cache = ShardedKVCache.from_full(cache, group)
    lens = torch.tensor(lengths, device=dev)
    cache.seqlens.copy_((lens + 1).clamp(max=N))
    cur = pred[torch.arange(B, device=dev), lens.clamp(max=T - 1)]  # the prediction of patch L_b
    nxt = lens.clone()  # the patch each sequence fills next
    out = known.clone()
    rows = torch.arange(B, device=dev)
    while True:
        active = nxt < N
        out[rows[active], nxt[active]] = cur[active]
        nxt = nxt + active.long()
        if not bool((nxt < N).any()):
            return out
        # A finished sequence rewrites its last slot (its output is dropped): the batch stays in lockstep.
        cache.seqlens.clamp_(max=N - 1)
        pos = cache.seqlens.long()
        step_tokens = model.patch_embed(cur[:, None]) + model.pos_embed[0, pos][:, None]
        cur = model.forward_tokens(step_tokens, cache)[:, 0]


@torch.no_grad()
def generate_recompute(model: CausalViT, prompts: list[torch.Tensor]) -> torch.Tensor:
    """The reference: each prompt alone, every step a full (prefix-)causal forward over all tokens so far."""
    lengths = _check_prompts(model, prompts)
    N, dev = model.num_patches, model.pos_embed.device
    out = []
    for prompt, n in zip(prompts, lengths):
        seq = prompt.to(dev, model.pos_embed.dtype)[None]
        prefix = _prefix_tokens(model, [n], dev)
        while seq.shape[1] < N:
            T = seq.shape[1] + 1
            tokens = torch.cat([model.start_token, model.patch_embed(seq)], dim=1) + model.pos_embed[:, :T]
            pred = model.forward_tokens(tokens, bias=prefix_bias(prefix, T, T, tokens.dtype))[:, -1:]
            seq = torch.cat([seq, pred], dim=1)
        out.append(seq[0])
    return torch.stack(out)


# ------------------------------------------------------------------------------ --sp N: local gloo ranks


def _sp_worker(rank: int, world: int, port: int, checkpoint: str, job: str, backend: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = load_generator(checkpoint, "cpu")
        prompts = torch.load(job, weights_only=True)["prompts"]
        out = generate(model, prompts, backend=backend, group=dist.group.WORLD)
        if rank == 0:
            torch.save(out, job + ".out")
    finally:
        dist.destroy_process_group()


def generate_sp(checkpoint: str, prompts: list[torch.Tensor], sp: int, backend: str = "auto") -> torch.Tensor:
    """generate() on `sp` spawned CPU gloo ranks, the KV cache split over them; returns rank 0's result."""
    import torch.multiprocessing as mp

    from distvit.parallel.mesh import free_port

    with tempfile.TemporaryDirectory() as tmp:
        job = str(Path(tmp) / "job.pt")
        torch.save({"prompts": [p.cpu() for p in prompts]}, job)
        mp.spawn(_sp_worker, args=(sp, free_port(), checkpoint, job, backend), nprocs=sp, join=True)
        return torch.load(job + ".out", weights_only=True)


# ------------------------------------------------------------------------------ runs, prompts, pictures


def load_generator(checkpoint: str, device: str = "auto"):
    """The run's causal model in eval mode (inference.load_run); one line if it cannot generate."""
    from distvit.inference import load_run

    run = load_run(checkpoint, device)  # a missing path is a FileNotFoundError: one line (errors.py)
    if not isinstance(run.model, CausalViT):
        raise ConfigError(f"--checkpoint {checkpoint}: {run.cfg.model.name} is not an autoregressive model; train a "
                          "vit_causal_* model with task.kind=autoregressive (e.g. --config aim_digits)")
    if run.cfg.task.norm_pix:
        raise ConfigError(f"--checkpoint {checkpoint}: trained with task.norm_pix=true, it predicts each patch "
                          "normalised by its own mean and std, which cannot be drawn as pixels; train with "
                          "task.norm_pix=false (as configs/aim_digits.yaml does) to generate images")
    run.model.run = run  # the config and manifest travel with the model (prompts, pictures)
    return run.model


def load_prompts(model: CausalViT, sources: list[str], num: int) -> torch.Tensor:
    """Whole images (n, C, H, W), normalised as the run's val loader does: every image file, and the
    first `num` images of each shard pattern."""
    from PIL import Image

    run = model.run
    images = []
    for src in sources:
        path = Path(src)
        if path.is_file() and not src.endswith(".tar"):
            try:
                with Image.open(path) as img:
                    img.load()
                    images.append(run.preprocess([img.copy()]).cpu())
            except (OSError, ValueError) as exc:
                raise UserError(f"--prompt {src}: not a readable image ({type(exc).__name__}); give PNG/JPEG files "
                                "or webdataset shards (.tar, brace or glob patterns)") from None
        else:
            images.append(_shard_images(run, src, num))
    batch = torch.cat(images) if images else torch.empty(0)  # every image file; --num from each shard pattern
    if batch.shape[0] == 0:
        raise UserError(f"--prompt {' '.join(sources)}: no images found; give image files or shard patterns")
    return batch.to(model.pos_embed.device)


def _shard_images(run, pattern: str, num: int) -> torch.Tensor:
    from distvit.data import build_val_loader

    data = run.cfg.data.model_copy(update={"val": pattern, "num_workers": 0, "batch_size": max(1, num)})
    try:
        loader = build_val_loader(data, dp_rank=0, dp_size=1)
        images, _labels, valid = next(iter(loader))
    except (FileNotFoundError, StopIteration, ValueError) as exc:
        raise UserError(f"--prompt {pattern}: no readable images there ({_first_line(exc)}); give image files or "
                        "webdataset shards (.tar, brace or glob patterns)") from None
    return images[valid.bool()].float().cpu()


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def _stats(run) -> tuple[torch.Tensor, torch.Tensor]:
    from distvit.data.loader import resolve_stats

    mean, std = resolve_stats(run.cfg.data, run.manifest)
    return torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)


def to_pixels(run, images: torch.Tensor) -> torch.Tensor:
    """Normalised images -> [0, 1] pixels."""
    mean, std = _stats(run)
    return (images.cpu().float() * std + mean).clamp(0, 1)


def mean_train_image(run, limit: int = 4096) -> torch.Tensor | None:
    """The mean of (up to `limit`) training images, normalised: the baseline a completion must beat."""
    d = run.cfg.data
    data = d.model_copy(update={"val": d.train, "num_workers": 0, "batch_size": 256})
    try:
        from distvit.data import build_val_loader

        total, count = None, 0
        for images, _labels, valid in build_val_loader(data, dp_rank=0, dp_size=1):
            x = images[valid.bool()].float()
            total = x.sum(0) if total is None else total + x.sum(0)
            count += x.shape[0]
            if count >= limit:
                break
        return None if not count else (total / count)[None]
    except Exception:  # moved or remote training data: no baseline, said in metrics.json
        return None


def save_grid(path: Path, rows: list[list[torch.Tensor]], scale: int = 8, gap: int = 2) -> None:
    """A PNG of images (C, H, W) in [0, 1], one list per row, upscaled (nearest) and spaced on white."""
    from PIL import Image

    C, H, W = rows[0][0].shape
    h, w = H * scale, W * scale
    cols = max(len(r) for r in rows)
    canvas = torch.ones(C, gap + len(rows) * (h + gap), gap + cols * (w + gap))
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            big = img.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
            y, x = gap + i * (h + gap), gap + j * (w + gap)
            canvas[:, y:y + h, x:x + w] = big
    arr = (canvas * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(arr[..., 0] if C == 1 else arr).save(path)


def run_generate(checkpoint: str, sources: list[str], prefix: list[int], out_dir: str, *, num: int = 8, sp: int = 1,
                 backend: str = "auto", device: str = "auto") -> dict:
    model = load_generator(checkpoint, "cpu" if sp > 1 else device)
    run = model.run
    images = load_prompts(model, sources, num)
    truth = model.patchify(images)
    lengths = [prefix[i % len(prefix)] for i in range(images.shape[0])]
    bad = [k for k in prefix if not 0 <= k <= model.num_patches]
    if bad:
        raise UserError(f"--prefix-patches {bad[0]}: an image of this model has {model.num_patches} patches; "
                        f"give 0..{model.num_patches}")
    prompts = [truth[b, :n] for b, n in enumerate(lengths)]
    out = generate_sp(checkpoint, prompts, sp, backend) if sp > 1 else generate(model, prompts, backend=backend)
    out = out.to(truth.device)
    generated = model.unpatchify(out)
    grey = torch.zeros_like(truth)  # the unknown part of a prompt: the normalised mean (grey-ish)
    shown = torch.stack([torch.cat([truth[b, :n], grey[b, n:]]) for b, n in enumerate(lengths)])
    mask = torch.stack([torch.arange(model.num_patches, device=truth.device) >= n for n in lengths])  # generated patches
    metrics = {"checkpoint": checkpoint, "images": len(lengths), "prefix_patches": lengths, "sp": sp,
               "num_patches": model.num_patches, **_mse(run, model, out, truth, mask)}
    base = mean_train_image(run)
    if base is not None:
        metrics.update({f"baseline_{k}": v for k, v in
                        _mse(run, model, model.patchify(base.to(truth.device)).expand_as(truth), truth, mask).items()})
        metrics["ratio_to_baseline"] = metrics["mse"] / max(metrics["baseline_mse"], 1e-12)
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    px = [to_pixels(run, x) for x in (model.unpatchify(shown), generated, images)]
    save_grid(out_path / "grid.png", [[p[b] for p in px] for b in range(len(lengths))])
    torch.save(generated.cpu(), out_path / "generated.pt")
    (out_path / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _mse(run, model, pred, truth, mask) -> dict:
    """Mean squared error over the generated patches: normalised (as trained) and in [0, 1] pixels."""
    m = mask[..., None].float()
    count = (m.sum() * pred.shape[-1]).clamp(min=1)
    px_pred = model.patchify(to_pixels(run, model.unpatchify(pred)).to(pred.device))
    px_true = model.patchify(to_pixels(run, model.unpatchify(truth)).to(pred.device))
    return {"mse": float(((pred - truth) ** 2 * m).sum() / count),
            "pixel_mse": float(((px_pred - px_true) ** 2 * m).sum() / count)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="distvit generate", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, metavar="RUN_OR_FILE",
                   help="a run folder, checkpoint folder or weights file of a task.kind=autoregressive run")
    p.add_argument("--prompt", required=True, nargs="+", metavar="IMAGE_OR_SHARDS",
                   help="image files and/or webdataset shard patterns; each image's first K patches are the prompt")
    p.add_argument("--prefix-patches", required=True, metavar="K[,K...]",
                   help="patches given per prompt (raster order); a comma list is cycled over the prompts (ragged batch)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for grid.png, generated.pt, metrics.json")
    p.add_argument("--num", type=int, default=8, help="images taken from shard patterns (default 8)")
    p.add_argument("--sp", type=int, default=1, help="split the KV cache over N spawned CPU gloo ranks")
    p.add_argument("--backend", default="auto", choices=["auto", "streamk", "splitk", "torch", "sdpa"],
                   help="decode_attention backend (auto: streamk on CUDA, torch on CPU)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)
    try:
        prefix = [int(k) for k in args.prefix_patches.split(",")]
    except ValueError:
        p.error(f"--prefix-patches {args.prefix_patches}: give an int or a comma list of ints, e.g. 8 or 4,8")
    if args.sp < 1 or args.num < 1:
        p.error("--sp and --num must be >= 1")
    m = run_generate(args.checkpoint, args.prompt, prefix, args.out, num=args.num, sp=args.sp, backend=args.backend,
                     device=args.device)
    line = f"generated {m['images']} image(s) -> {args.out}/grid.png; MSE of the generated patches {m['mse']:.4f}"
    if "baseline_mse" in m:
        line += f" (mean training image: {m['baseline_mse']:.4f}, ratio {m['ratio_to_baseline']:.2f})"
    print(line, flush=True)
    return 0
