"""Compare feature-store codecs on real backbone features (C2..C5 of 384x384 crops).

The proxy task (NAS-FCOS §3.3) writes the feature cache once and reads it for every one of
thousands of sampled decoders, so read speed and size matter far more than write speed.
This script computes C2..C5 with a randomly initialised backbone (no pretrained weights
offline) on the synthetic dataset, preprocessed as the proxy preprocesses VOC (short side
384, 384x384 crop, ImageNet normalisation), then for each codec measures:

- write MB/s: uncompressed MB / seconds of ``materialise`` (validation + encode + write);
- read MB/s: uncompressed MB / seconds of ``read_split`` (whole split into memory);
- stream MB/s: same, through ``iter_batches`` in a shuffled order (the proxy's epoch);
- ratio: uncompressed bytes / bytes on disk.

Reads come from the page cache (the store was just written), so they measure decoding and
copying, not the disk. Timings are the best of several runs; reads go round-robin over the
codecs so that load from other processes on a shared machine hits every codec alike.

Usage:
    .venv/bin/python benchmarks/feature_store.py                       # resnet50 and tiny, 64 images
    .venv/bin/python benchmarks/feature_store.py --backbones tiny --images 16
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nasfcos.data import SHAPES, VOCDetection, build_transforms, make_synthetic  # noqa: E402
from nasfcos.model.backbones import LEVELS, build_backbone  # noqa: E402
from storage.features import CODECS, FeatureStore, materialise  # noqa: E402

CROP = 384


def compute_features(backbone_name: str, voc_root: str, num_images: int, batch_size: int, seed: int) -> dict:
    """C2..C5 (float16) and targets of the first ``num_images`` synthetic train images."""
    torch.manual_seed(seed)  # backbone init and the random crops
    backbone = build_backbone(backbone_name).eval()
    transforms = build_transforms(train=False, min_size=CROP, max_size=10**9, crop=CROP)
    dataset = VOCDetection(voc_root, image_set="train", classes=SHAPES, transforms=transforms)
    features: dict[str, list[np.ndarray]] = {level: [] for level in LEVELS}
    image_id, crop, scale, boxes, labels = [], [], [], [], []
    with torch.no_grad():
        for start in range(0, num_images, batch_size):
            samples = [dataset[i] for i in range(start, min(start + batch_size, num_images))]
            images = torch.stack([image for image, _ in samples])  # (B, 3, 384, 384)
            for level, c in zip(LEVELS, backbone(images), strict=True):
                features[level].append(c.to(torch.float16).numpy())
            for _, target in samples:
                image_id.append(target["image_id"])
                crop.append(target["crop"].numpy())
                scale.append(target["scale"].numpy())
                boxes.append(target["boxes"].numpy())
                labels.append(target["labels"].numpy())
    return {
        "features": {level: np.concatenate(parts) for level, parts in features.items()},
        "image_id": np.asarray(image_id, dtype=np.int64),
        "crop": np.stack(crop),
        "scale": np.stack(scale),
        "boxes": boxes,
        "labels": labels,
    }


def slice_samples(data: dict, start: int, stop: int) -> dict:
    return {
        "features": {level: values[start:stop] for level, values in data["features"].items()},
        "image_id": data["image_id"][start:stop],
        "crop": data["crop"][start:stop],
        "scale": data["scale"][start:stop],
        "boxes": data["boxes"][start:stop],
        "labels": data["labels"][start:stop],
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench_write(data: dict, codec: str, workdir: Path, shard_size: int, repeats: int) -> tuple[FeatureStore, float]:
    """Write ``data`` into a fresh store ``repeats`` times; the last store and the best seconds."""
    n = len(data["image_id"])
    levels = {level: values.shape[1:] for level, values in data["features"].items()}
    seconds = []
    for _ in range(repeats):
        path = workdir / f"{codec}.zarr"
        shutil.rmtree(path, ignore_errors=True)
        store = FeatureStore.create(path, splits={"bench": n}, levels=levels, shard_size=shard_size, codec=codec, attrs={})
        t = time.perf_counter()
        materialise(store, "bench", lambda a, b: slice_samples(data, a, b))
        seconds.append(time.perf_counter() - t)
    return store, min(seconds)


def bench_read(store: FeatureStore, data: dict, batch_size: int, seed: int) -> tuple[float, float]:
    """Seconds of one ``read_split`` and of one shuffled ``iter_batches`` pass over the store."""
    path = store.path
    store = FeatureStore.open(path)  # fresh handles, like a new proxy worker
    t = time.perf_counter()
    out = store.read_split("bench")
    read_s = time.perf_counter() - t
    for level, values in data["features"].items():  # bit-exact, or the numbers mean nothing
        assert np.array_equal(out["features"][level].view(np.uint16), values.view(np.uint16)), (path, level)
    del out
    order = np.random.default_rng(seed).permutation(store.splits["bench"])
    t = time.perf_counter()
    for _batch in store.iter_batches("bench", batch_size, order=order):
        pass
    return read_s, time.perf_counter() - t


def bench_codecs(data: dict, codecs: list[str], workdir: Path, args: argparse.Namespace) -> list[dict]:
    """Write each codec's store, then read them round-robin so machine load hits all alike."""
    mb = sum(values.nbytes for values in data["features"].values()) / 1e6
    stores, write_s = {}, {}
    for codec in codecs:
        stores[codec], write_s[codec] = bench_write(data, codec, workdir, args.shard_size, args.write_repeats)
    read_s = {codec: float("inf") for codec in codecs}
    stream_s = dict(read_s)
    for r in range(args.read_repeats):
        for codec in codecs:
            read, stream = bench_read(stores[codec], data, args.batch_size, seed=r)
            read_s[codec], stream_s[codec] = min(read_s[codec], read), min(stream_s[codec], stream)
    rows = []
    for codec in codecs:
        size = disk_bytes(stores[codec].path / "bench")
        rows.append(
            {
                "codec": codec,
                "chunk_size": stores[codec].chunk_size,
                "write": mb / write_s[codec],
                "read": mb / read_s[codec],
                "stream": mb / stream_s[codec],
                "ratio": mb * 1e6 / size,
                "disk_mb": size / 1e6,
                "mb": mb,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["resnet50", "tiny"])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16, help="iter_batches batch size (stream MB/s)")
    parser.add_argument("--codecs", nargs="+", default=list(CODECS), choices=list(CODECS))
    parser.add_argument("--write-repeats", type=int, default=2, help="fresh stores written per codec (best kept)")
    parser.add_argument("--read-repeats", type=int, default=5, help="round-robin read passes over all codecs (best kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="where stores are written (default: a temp dir)")
    args = parser.parse_args()

    print(f"# machine: {os.cpu_count()} CPUs, {cpu_model()}, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} at start")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        # Images larger than the crop on both sides after resizing, like VOC (~500x375).
        paths = make_synthetic(tmp / "data", num_train=args.images, num_val=1, image_size=(300, 500), seed=args.seed)
        for name in args.backbones:
            t = time.perf_counter()
            data = compute_features(name, paths["voc_root"], args.images, batch_size=8, seed=args.seed)
            shapes = ", ".join(f"{k} {tuple(v.shape[1:])}" for k, v in data["features"].items())
            zeros = np.mean([np.mean(v == 0) for v in data["features"].values()])
            print(f"\n## {name}: {args.images} images, {shapes}; features computed in {time.perf_counter() - t:.1f} s; {zeros:.0%} zeros (mean over levels)\n")
            workdir = tmp / name
            workdir.mkdir()
            rows = bench_codecs(data, args.codecs, workdir, args)
            shutil.rmtree(workdir)
            print(f"load average {os.getloadavg()[0]:.1f} after; uncompressed: {rows[0]['mb']:.0f} MB, shard_size {args.shard_size}, chunk_size {rows[0]['chunk_size']} samples\n")
            print("| codec | write MB/s | read MB/s | stream MB/s | ratio | on disk MB |")
            print("|---|---:|---:|---:|---:|---:|")
            for row in rows:
                print(f"| {row['codec']} | {row['write']:.0f} | {row['read']:.0f} | {row['stream']:.0f} | {row['ratio']:.2f} | {row['disk_mb']:.0f} |")
            del data


if __name__ == "__main__":
    main()
