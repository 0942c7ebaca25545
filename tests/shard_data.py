"""Small generated shards for the shard tests: webdataset tar files and parquet files of mixed-size images, each
with one corrupt sample, and the features the single-process folder path gives for the same image bytes."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CORRUPT = b"\xff\xd8\xff this is not a jpeg"


def photo_like(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """``uint8 [h, w, 3]`` that compresses like a photo: a smooth colour gradient, a few flat discs with sharp
    edges, mild noise."""
    y, x = np.mgrid[0:h, 0:w]
    ramps = np.stack([y, x], -1) / max(h, w)  # [h, w, 2]
    image = rng.uniform(40, 200, 3) + ramps @ rng.uniform(-80, 80, (2, 3))  # [h, w, 3]
    for _ in range(3):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.1, 0.4) * min(h, w)
        image[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    return np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)


def image_bytes(rng: np.random.Generator, fmt: str) -> bytes:
    h, w = (int(v) for v in rng.integers(12, 60, 2))
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def samples(shard: int, n: int, seed: int = 0) -> list[tuple[str, bytes, str]]:
    """``(key, image bytes, extension)``: ``n`` images, the third one corrupt."""
    rng = np.random.default_rng([seed, shard])
    out = []
    for i in range(n):
        fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")][i % 3]
        data = CORRUPT if i == 2 else image_bytes(rng, fmt)
        out.append((f"s{shard:02d}/{i:04d}", data, "jpg" if i == 2 else ext))
    return out


def write_webdataset(folder: Path, shards: int = 3, per_shard: int = 5) -> list[Path]:
    """``folder/0000{0..shards-1}.tar``; members ``KEY.<ext>``, ``KEY.json``, ``KEY.txt``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        path = folder / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for key, data, ext in samples(s, per_shard):
                members = {
                    ext: data,
                    "json": json.dumps({"id": key}).encode(),
                    "txt": f"caption {key}".encode(),
                }
                for member_ext, blob in members.items():
                    info = tarfile.TarInfo(f"{key}.{member_ext}")
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
        paths.append(path)
    return paths


def write_parquet(folder: Path, shards: int = 2, per_shard: int = 5, row_group_size: int = 2) -> list[Path]:
    """``folder/part-{0..shards-1}.parquet`` with columns ``id`` (key), ``jpg`` (bytes), ``caption``, several
    row groups each."""
    import pyarrow as pa  # here, so that the helpers for webdataset shards need no pyarrow
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        rows = samples(10 + s, per_shard)
        table = pa.table(
            {
                "id": [k for k, _, _ in rows],
                "jpg": pa.array([d for _, d, _ in rows], pa.binary()),
                "caption": [f"caption {k}" for k, _, _ in rows],
            }
        )
        path = folder / f"part-{s}.parquet"
        pq.write_table(table, path, row_group_size=row_group_size)
        paths.append(path)
    return paths


def as_files(folder: Path, shards: list[list[tuple[str, bytes, str]]]) -> dict[str, Path]:
    """The good samples' bytes as image files, for the folder path: key -> file."""
    files = {}
    for rows in shards:
        for key, data, ext in rows:
            if data == CORRUPT:
                continue
            path = folder / f"{key}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            files[key] = path
    return files
