"""`data write imagefolder` streams: peak memory does not grow with the number of images.

The writer runs in a fresh subprocess on 2,000 and on 20,000 noise PNGs (48x48 RGB, about 7 KB
each, so 20,000 hold about 134 MiB: a writer that read every image before writing peaked that much
higher). After its imports the subprocess resets its peak-RSS mark (/proc/self/clear_refs "5") and
reads VmHWM from /proc/self/status at the end: the writer's peak, and what writing added to the RSS
it had then. `ru_maxrss` cannot be used for the writer: it keeps the peak of the process that forked
it across exec (here pytest, which holds far more than the writer under a full test run), so the two
figures were the same whatever the writer did. Each worker is forked by the writer after the reset
(its own ru_maxrss starts from zero, its page-table peak from the writer's at the fork), so the
largest worker's peak is `ru_maxrss` of the writer's children. The numbers are printed; the bound
allows for noise on a shared machine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

MEASURE = """
import json, resource, sys
from distvit.data.write import write_imagefolder
import distvit.data.write_files, webdataset  # imported before the mark: what they load is not writing

def status(key):  # KiB
    return int(next(l for l in open("/proc/self/status") if l.startswith(key + ":")).split()[1])

open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS (Linux): the peak of this image from here
base = status("VmRSS")
write_imagefolder(sys.argv[1], sys.argv[2], samples_per_shard=500, workers=int(sys.argv[3]))
peak = status("VmHWM")
workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"self_mib": peak / 1024, "added_mib": (peak - base) / 1024, "worker_mib": workers / 1024}))
"""


def noise_folder(root: Path, n: int, classes: int = 10, variants: int = 32) -> Path:
    """n PNG files of incompressible noise in `classes` class folders (a few distinct images, copied: fast)."""
    import io

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(variants):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
        blobs.append(buf.getvalue())
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
    for i in range(n):
        (root / f"c{i % classes}" / f"{i:06d}.png").write_bytes(blobs[i % variants])
    return root


def peak_rss(src: Path, out: Path, workers: int) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = subprocess.run([sys.executable, "-c", MEASURE, str(src), str(out), str(workers)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # about 280 MB of small files written and read: 20-100 s on a shared 2-core machine
def test_writer_peak_memory_is_flat_in_dataset_size(tmp_path):
    small = noise_folder(tmp_path / "small", 2_000)
    large = noise_folder(tmp_path / "large", 20_000)
    a = peak_rss(small, tmp_path / "out_small", workers=2)
    b = peak_rss(large, tmp_path / "out_large", workers=2)
    data_mib = sum(p.stat().st_size for p in large.rglob("*.png")) / 2**20
    print(f"\nwriter peak RSS: 2,000 images {a}, 20,000 images {b} (images of the large set: {data_mib:.0f} MiB)")
    manifest = json.loads((tmp_path / "out_large" / "dataset.json").read_text())
    assert manifest["samples"] == {"train": 18_000, "val": 2_000} and len(manifest["splits"]["train"]["shards"]) == 36
    # Holding the images would add ~data_mib (about 134 MiB) to the writer, and to every worker it
    # forks after reading them; the file list adds ~3 MiB.
    assert 0 < a["added_mib"] and 0 < b["added_mib"], (a, b)  # the mark was reset and writing moved it
    assert b["added_mib"] - a["added_mib"] < 0.15 * data_mib, (a, b)
    assert b["self_mib"] - a["self_mib"] < 0.15 * data_mib, (a, b)
    assert b["worker_mib"] - a["worker_mib"] < 0.15 * data_mib, (a, b)
