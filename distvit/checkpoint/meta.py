"""CheckpointMeta: what a checkpoint says about itself (`distvit.json` beside DeepSpeed's files), typed.

The trainer writes it (checkpoint/manager.py), `ckpt reshape` writes a reshaped copy's, and every
reader (resume, elastic resume, the `ckpt` tools, consolidate, eval/predict) reads it through
read_meta: one schema, no loose dict keys spelled in several modules.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

META = "distvit.json"


@dataclass(frozen=True)
class ReshapedFrom:
    """The checkpoint a reshaped one was made from (`ckpt reshape`, elastic resume)."""
    path: str
    world_size: int
    dp_size: int
    sp_size: int = 1


@dataclass(frozen=True)
class CheckpointMeta:
    step: int
    epoch: int
    world_size: int  # ranks that saved it (dp x sp)
    dp_size: int
    sp_size: int
    zero_stage: int
    model: str
    precision: str | None = None
    config: dict = field(default_factory=dict)  # the run's resolved config (Config.model_dump(mode="json"))
    universal: bool = False  # whole tensors: DeepSpeed loads it with load_universal (any world size)
    reshaped_from: ReshapedFrom | None = None

    @property
    def is_reshaped(self) -> bool:
        return self.reshaped_from is not None

    @property
    def zero_shards(self) -> int:
        """How many partitions ZeRO cut the state into (dp x sp)."""
        return self.dp_size * self.sp_size

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "CheckpointMeta":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("sp_size", 1)  # written before sequence parallelism existed
        if values.get("reshaped_from"):
            values["reshaped_from"] = ReshapedFrom(**values["reshaped_from"])
        return cls(**values)

    def reshaped(self, src: Path) -> "CheckpointMeta":
        """The metadata of a reshaped copy of this checkpoint (ZeRO >= 1: whole tensors, `universal`)."""
        return dataclasses.replace(self, universal=self.zero_stage > 0, reshaped_from=ReshapedFrom(
            path=str(Path(src).resolve()), world_size=self.world_size, dp_size=self.dp_size, sp_size=self.sp_size))


def read_meta(tag_dir: Path) -> CheckpointMeta:
    return CheckpointMeta.from_dict(json.loads((Path(tag_dir) / META).read_text()))


def read_meta_if_any(tag_dir: Path) -> CheckpointMeta | None:
    """The metadata, or None for a folder DeepSpeed wrote without distvit (e.g. a plain ZeRO checkpoint)."""
    return read_meta(tag_dir) if (Path(tag_dir) / META).is_file() else None
