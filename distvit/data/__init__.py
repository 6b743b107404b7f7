"""Training data: webdataset shards split over ranks and workers, deterministic, exactly resumable.

    from distvit.data import DataConfig, build_train_loader, build_val_loader, read_manifest, write_digits

Modules, one job each: config (the `data:` section), manifest (dataset.json), shards (listing and the
per-epoch plan), reader (tar -> raw samples with positions), transforms (decode, augment, normalize),
pipeline (worker streams with resume cursors), loader (the train/val loaders), write (sources ->
shards), verify and cli (`distvit data write|verify`). Design notes: docs/data.md.
"""
from distvit.data.config import DataConfig
from distvit.data.errors import DataError
from distvit.data.loader import TrainLoader, ValLoader, build_train_loader, build_val_loader
from distvit.data.manifest import read_manifest
from distvit.data.write import write_csv, write_digits, write_imagefolder

__all__ = [
    "DataConfig", "DataError", "TrainLoader", "ValLoader", "build_train_loader", "build_val_loader",
    "read_manifest", "write_csv", "write_digits", "write_imagefolder",
]
