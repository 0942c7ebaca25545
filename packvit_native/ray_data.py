"""The Ray Data engine: ``packvit encode --engine ray`` and :func:`encode_dataset` for your own pipelines.

Named ``ray_data`` so that ``import ray`` inside the package means the Ray package. Ray is imported here only,
and only when called: the runtime never needs it (``pip install "packvit-native[ray]"``).

The pipeline, one ``map_batches`` stage each, streamed:

1. (``--engine ray`` only) read: one CPU task per shard streams its samples (the same readers as the local
   engine, :mod:`packvit_native.shards`) in chunks of :data:`READ_CHUNK`, then one end-of-shard row carrying
   the shard's sample count and read errors;
2. decode and resize: CPU tasks, :data:`DECODE_BATCH` rows each, produce each image's float32 patches exactly
   as ``pv.preprocess`` makes them (the local engine's bytes, so the same values);
3. the model: ``--workers`` stateful actors (``compute=ActorPoolStrategy(size=N)``, ``num_gpus=
   --gpus-per-worker``, 0 on CPU), each loading the model once and checking its fingerprint, then packing each
   input batch of :data:`ACTOR_BATCH` rows into ``--max-tokens`` batches; a sample that fails to decode or
   encode comes out with its ``error`` set, it never fails the actor;
4. (``--engine ray`` only) the driver gathers each shard's rows and writes the shard (the local engine's
   writer) as soon as all of them arrived, so a run killed midway keeps every shard it finished.
"""

from __future__ import annotations

import argparse
import atexit
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cli import (
    KEPT,
    OUTPUT_COLUMNS,
    Fatal,
    capture_graphs,
    check_device,
    default_dtype,
    encode_args,
    load_model,
    resize_rule,
)
from .shards import (
    Encoded,
    Plan,
    Sample,
    Shard,
    ShardResult,
    Stats,
    Writes,
    encode_images,
    finish_shard,
    preprocess_bytes,
    read_shard,
)

__all__ = ["encode_dataset"]

READ_CHUNK = 64  # samples per block a read task yields
DECODE_BATCH = 32  # rows per decode task call
ACTOR_BATCH = 256  # rows per model actor call, packed into --max-tokens batches inside
IMAGE = "__image__"  # the image bytes column between the read and decode stages of --engine ray


def _ray() -> Any:
    try:
        import ray
        import ray.data  # the submodule, for ray.data below
    except ImportError:
        raise Fatal('--engine ray needs Ray Data: pip install "packvit-native[ray]"') from None
    return ray


def connect(args: argparse.Namespace, say: Callable[[str], None]) -> torch.device:
    """Join the Ray cluster (``--address``, else ``RAY_ADDRESS``, else a local one; one already initialised in
    this process is used as it is) and settle ``--gpus-per-worker``, ``--workers`` and the default
    ``--dtype`` from its resources. Returns the actors' device type."""
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=args.address)
        atexit.register(ray.shutdown)
    gpus = ray.cluster_resources().get("GPU", 0)
    if args.gpus_per_worker is None:
        args.gpus_per_worker = 1.0 if gpus else 0.0
    if args.gpus_per_worker < 0:
        raise Fatal(f"--gpus-per-worker must be 0 or more, got {args.gpus_per_worker:g}")
    if args.workers is None:
        args.workers = max(1, int(gpus // args.gpus_per_worker)) if args.gpus_per_worker else 1
    device = torch.device("cuda" if args.gpus_per_worker > 0 else "cpu")
    if args.device is not None and torch.device(args.device).type != device.type:
        raise Fatal(f"--device {args.device} does not fit --gpus-per-worker {args.gpus_per_worker:g}")
    if args.graphs and device.type != "cuda":
        raise Fatal("--graphs replays CUDA graphs: give the model actors GPUs (--gpus-per-worker above 0)")
    check_cluster(args, device)
    args.dtype = default_dtype(args, device)
    say(
        f"packvit encode: Ray cluster with {gpus:g} GPUs and {ray.cluster_resources().get('CPU', 0):g} CPUs; "
        f"{args.workers} model workers with {args.gpus_per_worker:g} GPUs each"
    )
    return device


def check_cluster(args: argparse.Namespace, device: torch.device) -> None:
    """``Fatal`` for model actors the cluster cannot run, which Ray would otherwise wait for forever (actors
    asking for GPUs it has not; CPU actors holding every CPU, so that no task is left to read and decode) or
    start only to fail in each (an attention backend the CPU cannot run)."""
    resources = _ray().cluster_resources()
    gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 0)
    if device.type == "cuda" and not gpus:
        raise Fatal(
            "the Ray cluster has no GPU now (an autoscaler adding GPU nodes only once asked cannot be told apart "
            "here); pass --gpus-per-worker 0 (gpus_per_worker=0) to run the model on CPUs"
        )
    if device.type == "cpu":
        if args.workers + 1 > cpus:
            raise Fatal(
                f"{args.workers} model workers on CPUs would hold all {cpus:g} CPUs of the Ray cluster, and no "
                f"CPU would be left to read and decode images; use at most {max(int(cpus) - 1, 0)} (--workers, "
                "workers=)" + ("" if cpus >= 2 else ": encoding on CPUs needs a cluster of 2 CPUs or more")
            )
        check_device(args, device)  # the driver runs the same software as the actors it starts


# --------------------------------------------------------------------------------------------- the stages


def _read_shards(
    batch: dict[str, np.ndarray], args: argparse.Namespace, metas: dict[str, Any]
) -> Iterator[Any]:
    """Read stage: each shard's samples in chunks, then its end-of-shard row."""
    import pyarrow as pa

    def kept(column: str, kind: Any, samples: list[Sample], path: str) -> Any:
        try:
            return pa.array([s.meta.get(column) for s in samples] or [None], kind)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:  # the type comes from the first shard, as locally
            raise Fatal(
                f"--keep-columns {column}: {path} holds values that do not fit the column's type in the first "
                f"shard ({kind}): {e}; drop the column or encode such shards apart; {KEPT}"
            ) from None

    def table(samples: list[Sample], name: str, path: str, count: int = -1, errors: str | None = None) -> Any:
        return pa.table(
            {
                "_shard": pa.array([name] * max(len(samples), 1), pa.string()),
                "_index": pa.array([s.index for s in samples] or [-1], pa.int64()),
                "key": pa.array([s.key for s in samples] or [None], pa.string()),
                IMAGE: pa.array([s.data for s in samples] or [None], pa.binary()),
                **{c: kept(c, t, samples, path) for c, t in metas.items()},
                "_count": pa.array([count] * max(len(samples), 1), pa.int64()),
                "_errors": pa.array([errors] * max(len(samples), 1), pa.string()),
            }
        )

    for path, name in zip(batch["path"], batch["name"], strict=True):
        chunk, errors, count = [], [], 0
        for sample in read_shard(Shard(Path(path), str(name)), args):
            if sample.error is not None:
                errors.append([sample.index, sample.key, sample.error, sample.part, sample.retry])
                continue
            chunk.append(sample)
            count += 1
            if len(chunk) == READ_CHUNK:
                yield table(chunk, name, path)
                chunk = []
        if chunk:
            yield table(chunk, name, path)
        yield table([], name, path, count, json.dumps(errors))


def _decode(
    table: Any, config: Any, args: argparse.Namespace, rule: dict[str, Any], image_column: str
) -> Any:
    """Decode stage (CPU tasks): image bytes -> ``grid_thw``, ``_patches`` (flat float32) and ``error``."""
    import pyarrow as pa

    column = table.column(image_column).combine_chunks()
    if pa.types.is_struct(column.type):  # the Hugging Face datasets image layout
        column = column.field("bytes")
    grids, patches, errors, offsets = [], [], [], [0]
    for data in column.to_pylist():
        grid, error = None, None
        if not data:
            error = "no image bytes"
        else:
            try:
                p, g = preprocess_bytes(data, config, args, rule)
                patches.append(p.numpy().reshape(-1))
                grid = g[0].tolist()
            except ValueError as e:
                error = str(e)
        grids.append(grid)
        errors.append(error)
        offsets.append(offsets[-1] + (patches[-1].size if grid is not None else 0))
    values = np.concatenate(patches) if patches else np.zeros(0, np.float32)
    table = table.drop_columns([image_column])
    for name in ("grid_thw", "_patches", "error"):
        if name in table.column_names:
            table = table.drop_columns([name])
    table = table.append_column("grid_thw", pa.array(grids, pa.list_(pa.int64(), 3)))
    table = table.append_column(
        "_patches", pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(values))
    )
    return table.append_column("error", pa.array(errors, pa.string()))


class _Encoder:
    """Model stage: a stateful actor holding the model, loaded once."""

    def __init__(self, args: argparse.Namespace, sha256: str, timing: bool) -> None:
        self.args, self.timing = args, timing
        self.device = torch.device("cuda" if args.gpus_per_worker > 0 else "cpu")
        self.model, found = load_model(args, self.device)
        if found != sha256:  # e.g. another copy of the checkpoint on this node
            raise RuntimeError(
                f"--model {args.model} on this worker has sha256 {found[:16]}, the driver's has {sha256[:16]}"
            )
        self.dim = self.model.config.hidden_size
        capture_graphs(self.model, args)

    def __call__(self, table: Any) -> Any:
        import pyarrow as pa

        args, config = self.args, self.model.config
        errors = table.column("error").to_pylist()
        grids = table.column("grid_thw").to_pylist()
        column = table.column("_patches").combine_chunks()
        offsets, values = column.offsets.to_numpy(), column.values.to_numpy(zero_copy_only=False)
        values = values if values.flags.writeable else values.copy()  # torch takes writable arrays only
        results: list[Encoded | str | None] = [None] * table.num_rows
        batch, rows, tokens = [], [], 0
        forward_s = 0.0

        def flush() -> None:
            nonlocal forward_s, tokens
            started = time.perf_counter()
            for row, item in zip(rows, encode_images(self.model, batch, args, self.device), strict=True):
                results[row] = item
            forward_s += time.perf_counter() - started
            batch.clear()
            rows.clear()
            tokens = 0

        for row, (grid, error) in enumerate(zip(grids, errors, strict=True)):
            if error is not None or grid is None:
                continue
            patches = torch.from_numpy(values[offsets[row] : offsets[row + 1]]).view(-1, config.patch_dim)
            n = patches.shape[0] + config.num_prefix * grid[0]
            if batch and tokens + n > args.max_tokens:
                flush()
            batch.append((patches, torch.tensor([grid], dtype=torch.int64)))
            rows.append(row)
            tokens += n
        if batch:
            flush()

        encoded = [r if isinstance(r, Encoded) else None for r in results]
        errors = [r if isinstance(r, str) else e for r, e in zip(results, errors, strict=True)]
        table = table.drop_columns(["_patches", "error"])
        widths = {"embedding": config.hidden_size}
        if config.projection_dim is not None:
            widths["image_embeds"] = config.projection_dim
        null = pa.array([e is None for e in encoded])
        for name, width in widths.items():
            rows = np.zeros((table.num_rows, width), np.float32)  # a failed row: null, its values unused
            for row, e in enumerate(encoded):
                if e is not None:
                    rows[row] = e.rows[name]
            column = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), width, mask=null)
            table = table.append_column(name, column)
        if args.tokens:
            for key in _token_names(args):
                patches = [None if e is None else e.tokens[key][0] for e in encoded]
                table = table.append_column(key, _token_column(pa, patches, self.dim))
                if args.prefix:
                    prefix = [None if e is None else e.tokens[key][1] for e in encoded]
                    table = table.append_column(
                        key.replace("features", "prefix", 1), _token_column(pa, prefix, self.dim)
                    )
        if args.preview:
            pictures = [None if e is None else e.preview.tobytes() for e in encoded]
            table = table.append_column("_pca", pa.array(pictures, pa.binary()))
        table = table.append_column("error", pa.array(errors, pa.string()))
        if self.timing:  # the batch's forward time, spread over its rows, for the run summary
            share = forward_s / max(table.num_rows, 1)
            table = table.append_column("_forward_s", pa.array([share] * table.num_rows, pa.float64()))
        return table


def _token_names(args: argparse.Namespace) -> list[str]:
    from .cli import feature_keys

    return feature_keys(args.layers)


def _token_column(pa: Any, tensors: list[torch.Tensor | None], dim: int) -> Any:
    """Per row ``[n, D]`` tokens (float32; ``None`` -> an empty list) as ``list<fixed_size_list<float32>[D]>``."""
    counts = [0 if t is None else t.shape[0] for t in tensors]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    parts = [t.float().reshape(-1).numpy() for t in tensors if t is not None]
    values = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return pa.ListArray.from_arrays(
        pa.array(offsets), pa.FixedSizeListArray.from_arrays(pa.array(values), dim)
    )


def _pipeline(
    ds: Any,
    args: argparse.Namespace,
    config: Any,
    rule: dict[str, Any],
    sha256: str,
    image_column: str,
    timing: bool,
) -> Any:
    ray = _ray()
    if Path(args.model).is_dir():  # a local folder, named so that workers started elsewhere find it too
        args = argparse.Namespace(**{**vars(args), "model": str(Path(args.model).absolute())})
    ds = ds.map_batches(
        _decode, batch_format="pyarrow", batch_size=DECODE_BATCH, num_cpus=1,
        fn_kwargs={"config": config, "args": args, "rule": rule, "image_column": image_column},
    )  # fmt: skip
    # Blocks of one actor batch each. It also keeps Ray from fusing the decode tasks into the model actors (it
    # fuses a task stage into the next actor stage when both ask for the same resources, as on CPU-only
    # clusters): decoding always runs in CPU tasks of its own, beside the forwards.
    ds = ds.repartition(target_num_rows_per_block=ACTOR_BATCH)
    return ds.map_batches(
        _Encoder, batch_format="pyarrow", batch_size=ACTOR_BATCH,
        fn_constructor_kwargs={"args": args, "sha256": sha256, "timing": timing},
        compute=ray.data.ActorPoolStrategy(size=args.workers), num_gpus=args.gpus_per_worker,
    )  # fmt: skip


def encode_dataset(
    ds: Any,
    model: str,
    *,
    image_column: str = "image",
    workers: int = 1,
    gpus_per_worker: float = 0,
    **settings: Any,
) -> Any:
    """Encode the images of a ``ray.data.Dataset`` with the model actors of ``packvit encode --engine ray``.

    Args:
        ds: a dataset with a column of encoded image bytes (binary, or a struct with a ``bytes`` field as the
            Hugging Face ``datasets`` image type stores it).
        model: a hub id, transformers directory or converted directory, as ``--model``; every actor loads it
            and must find the fingerprint the driver found.
        image_column: the column of image bytes; it is dropped from the output.
        workers: model actors.
        gpus_per_worker: GPUs per actor; 0 runs the model on CPUs.
        settings: any other ``packvit encode`` option by its Python name, with the same default: ``dtype``,
            ``max_tokens``, ``layers``, ``prefix``, ``tokens``, ``preview``, ``max_patches``, ``min_pixels``,
            ``max_pixels``, ``size``, ``resample``, ``merge_size``, ``attn_backend``, ``max_decoded_pixels``,
            ``fp8`` (the actors load the model with ``precision="fp8"``), ``graphs`` (the actors capture CUDA
            graphs).

    Returns:
        The dataset with every other input column, plus ``grid_thw`` (``int64[3]``), ``embedding``
        (``float32[D]``, see :func:`packvit_native.shards.image_embeddings`), ``image_embeds`` for models
        with a projection, ``error`` (``None``, or why the sample could not be encoded; its ``embedding`` is
        then null), and with ``tokens=True`` ``features`` (per row ``list<float32[D]>``, ``h*w`` tokens in the
        model's order; ``features.<layer>`` per layer) and with ``prefix=True`` ``prefix``; with
        ``preview=True``, ``_pca`` (the :mod:`~packvit_native.preview` picture as ``h*w*3`` bytes).

    Raises:
        ValueError: a bad setting, a dataset column named like one this adds, or a model that cannot be loaded
            (checked here, on the driver).
    """
    args = encode_args(model=model, workers=workers, gpus_per_worker=gpus_per_worker, **settings)
    schema = ds.schema()
    if schema is not None and image_column not in schema.names:
        raise ValueError(
            f"the dataset has no column {image_column!r} (image_column); its columns: {', '.join(schema.names)}"
        )
    added = ("_", "features", "prefix") if args.tokens else ("_",)
    taken = sorted(
        c
        for c in (schema.names if schema is not None else [])
        if c != image_column and (c in OUTPUT_COLUMNS - {"key"} or c.startswith(added))
    )
    if taken:
        raise ValueError(
            f"the dataset's columns {', '.join(taken)} have the names of columns encode_dataset adds; "
            "rename them first"
        )
    if (args.layers or args.prefix) and not args.tokens:
        raise ValueError("layers and prefix choose the token features returned with tokens=True; add it")
    if args.decode != "cpu" or args.processes:
        raise ValueError(
            "encode_dataset decodes in CPU tasks; decode='gpu' and processes=True apply to packvit encode "
            "--engine local"
        )
    if args.graphs and not gpus_per_worker > 0:
        raise ValueError("graphs=True replays CUDA graphs: give the model actors GPUs (gpus_per_worker > 0)")
    device = torch.device("cuda" if gpus_per_worker > 0 else "cpu")
    args.dtype = default_dtype(args, device)
    try:
        check_cluster(args, device)
        loaded, sha256 = load_model(args, torch.device("cpu"), check_only=True)
        rule = resize_rule(args, loaded)
    except Fatal as e:
        raise ValueError(str(e)) from None
    return _pipeline(ds, args, loaded.config, rule, sha256, image_column, timing=False)


# ------------------------------------------------------------------------------------ packvit encode --engine ray


@dataclass
class _Pending:
    result: ShardResult
    expected: int | None = None
    received: int = 0
    done: bool = field(default=False)


def encode_shards_ray(args: argparse.Namespace, plan: Plan, say: Callable[[str], None]) -> Stats:
    """Run the shards of ``plan`` through the pipeline; write each shard as soon as all its rows are back."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ray = _ray()
    ds = ray.data.from_items(
        # absolute: the workers of a cluster started elsewhere resolve a relative path in their own folder
        [{"path": str(Path(s.path).absolute()), "name": s.name} for s in plan.todo],
        override_num_blocks=len(plan.todo),
    )
    ds = ds.map_batches(_read_shards, batch_size=1, num_cpus=1, fn_kwargs={"args": args, "metas": plan.metas})
    ds = _pipeline(ds, args, plan.config, plan.rule, plan.sha256, IMAGE, timing=True)
    pending = {s.name: _Pending(ShardResult(s)) for s in plan.todo}
    stats, first, writes = Stats(workers=args.workers), [True], Writes()
    forward_s = 0.0
    dtype = getattr(torch, args.dtype)
    try:
        try:
            for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                for name in set(table.column("_shard").to_pylist()):
                    part = table.filter(pc.equal(table["_shard"], name))
                    shard = pending[name]
                    for marker in part.filter(pc.greater_equal(part["_count"], 0)).to_pylist():
                        shard.expected = marker["_count"]
                        for index, key, error, what, retry in json.loads(marker["_errors"]):
                            shard.result.fail(Sample(index, key, part=what, retry=retry), error, say)
                    rows = part.filter(pc.less(part["_count"], 0))
                    forward_s += pc.sum(rows["_forward_s"]).as_py() or 0.0
                    _gather(pa, rows, shard.result, plan, args, dtype, say)
                    shard.received += rows.num_rows
                    if shard.expected is not None and shard.received == shard.expected and not shard.done:
                        shard.done = True
                        finish_shard(shard.result, plan, args, writes, stats, first)
        except Exception as e:  # a stage's Fatal comes back wrapped in Ray's task error: say it as locally
            cause = getattr(e, "cause", None)
            if isinstance(cause, Fatal):
                raise Fatal(str(cause)) from None
            raise
        missing = [name for name, shard in pending.items() if not shard.done]
        if missing:
            raise Fatal(
                f"Ray returned shards {', '.join(missing)} incomplete; rerun the same command to resume"
            )
    finally:
        writes.close()
    stats.model_s = forward_s / max(args.workers, 1)
    return stats


def _gather(
    pa: Any,
    rows: Any,
    result: ShardResult,
    plan: Plan,
    args: argparse.Namespace,
    dtype: torch.dtype,
    say: Callable,
) -> None:
    """Turn one shard's returned rows into :class:`Encoded` images (or errors) of ``result``."""
    if not rows.num_rows:
        return
    keys, indices = rows.column("key").to_pylist(), rows.column("_index").to_pylist()
    errors, grids = rows.column("error").to_pylist(), rows.column("grid_thw").to_pylist()
    metas = {c: rows.column(c).to_pylist() for c in plan.metas}
    embeddings = {c: _fixed(rows.column(c)) for c in ("embedding", "image_embeds") if c in rows.column_names}
    tokens = {}
    if args.tokens:
        for key in _token_names(args):
            names = [key] + ([key.replace("features", "prefix", 1)] if args.prefix else [])
            tokens[key] = [_ragged(rows.column(n), plan.config.hidden_size) for n in names]
    previews = rows.column("_pca").to_pylist() if args.preview else None
    for i, (index, key, error) in enumerate(zip(indices, keys, errors, strict=True)):
        if error is not None:
            result.fail(Sample(index, key), error, say)
            continue
        encoded = Encoded(grids[i], {c: v[i] for c, v in embeddings.items()})
        if args.tokens:
            encoded.tokens = {
                k: (
                    torch.from_numpy(parts[0][i]).to(dtype),
                    torch.from_numpy(parts[1][i]).to(dtype) if len(parts) > 1 else None,
                )
                for k, parts in tokens.items()
            }
        if previews is not None:
            h, w = grids[i][1], grids[i][2]
            encoded.preview = np.frombuffer(previews[i], np.uint8).reshape(h, w, 3)
        meta = {c: v[i] for c, v in metas.items()}
        result.images.append((index, key, encoded, meta))


def _fixed(column: Any) -> np.ndarray:
    """A fixed-size-list column as ``[B, D]`` float32 (null rows are zeros)."""
    array = column.combine_chunks()
    width = array.type.list_size
    values = array.values.to_numpy(zero_copy_only=False)[
        array.offset * width : (array.offset + len(array)) * width
    ]
    return values.reshape(len(array), width).astype(np.float32, copy=False)


def _ragged(column: Any, dim: int) -> list[np.ndarray]:
    """A ``list<float32[D]>`` column as one ``[n_i, D]`` array per row."""
    array = column.combine_chunks()
    offsets = array.offsets.to_numpy()  # into array.values, whatever slice of the column this is
    rows = array.values  # the fixed-size lists, which may themselves be a slice of a longer buffer
    values = rows.values.to_numpy(zero_copy_only=False)[rows.offset * dim : (rows.offset + len(rows)) * dim]
    values = values.reshape(-1, dim)
    values = values if values.flags.writeable else values.copy()  # torch takes writable arrays only
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(array))]
