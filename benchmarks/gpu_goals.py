"""The issue's GPU goals, read from one gpu-check's results: met, or missed by how much.

    python benchmarks/gpu_goals.py benchmarks/results        # reads *_cuda.jsonl, prints JSON lines

One line per goal: value, target, met, missed_by (target minus value in the goal's direction,
None when met), and the rows it came from. A goal whose benchmark left no result says so.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

CONTEXT_512K = 512 * 1024


def rows(folder: Path, name: str) -> list[dict]:
    path = folder / f"{name}_cuda.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def goal(name: str, value, target: float, *, at_least: bool, source: str, **extra) -> dict:
    if value is None:
        return {"goal": name, "met": None, "target": target, "note": f"no result for this goal in {source} (its step failed, hit its limit or did not reach it)", **extra}
    met = value >= target if at_least else value <= target
    missed = None if met else round(abs(target - value), 4)
    return {"goal": name, "value": round(value, 4), "target": target, "met": met, "missed_by": missed,
            "source": source, **extra}


def decode_goals(folder: Path) -> list[dict]:
    out = []
    found = rows(folder, "decode_attention")
    for batch in sorted({r["batch"] for r in found} or {1}):
        at = [r for r in found if r["batch"] == batch and r["context"] == CONTEXT_512K and r["backend"] != "sdpa"]
        best = max(at, key=lambda r: r["fraction_of_peak"] or 0, default=None)
        src = "decode_attention_cuda.jsonl"
        extra = {"batch": batch, "backend": best["backend"] if best else None}
        out.append(goal("decode 512k: fraction of HBM peak >= 0.85", best and best["fraction_of_peak"], 0.85,
                        at_least=True, source=src, **extra))
        out.append(goal("decode 512k: speedup vs SDPA >= 3", best and best["speedup_vs_sdpa"], 3.0,
                        at_least=True, source=src, **extra))
    return out


def offload_goals(folder: Path) -> list[dict]:
    by_mode = {r.get("mode"): r for r in rows(folder, "offload") if "step_s" in r}
    src = "offload_cuda.jsonl"
    inter, stock, partial = by_mode.get("interleaved"), by_mode.get("cpu"), by_mode.get("partial")
    ratio = inter["step_s"] / stock["step_s"] if inter and stock else None
    vs_partial = inter["step_s"] / partial["step_s"] if inter and partial else None
    extra = {}
    if inter and partial:
        extra = {"peak_mem_gib_interleaved": inter.get("peak_mem_gib"), "peak_mem_gib_partial": partial.get("peak_mem_gib")}
    return [goal("offload: interleaved step / stock CPU offload step <= 1/3", ratio, round(1 / 3, 4), at_least=False,
                 source=src),
            goal("offload: interleaved step / partial offload step < 1 (equal peak memory)", vs_partial, 1.0,
                 at_least=False, source=src, **extra)]


def mfu_goals(folder: Path) -> list[dict]:
    summary = next((r for r in rows(folder, "vit_mfu") if r.get("side") == "summary"), None)
    src = "vit_mfu_cuda.jsonl"
    return [goal("ViT-B/16 bf16: Trainer MFU >= 0.55", summary and summary.get("trainer_mfu"), 0.55, at_least=True,
                 source=src),
            goal("ViT-B/16 bf16: Trainer img/s >= 1.1x plain loop", summary and summary.get("trainer_vs_plain"), 1.1,
                 at_least=True, source=src)]


def main() -> int:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
    for row in decode_goals(folder) + offload_goals(folder) + mfu_goals(folder):
        print(json.dumps({"bench": "goals", **row}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
