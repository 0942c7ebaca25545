"""``packvit encode --engine ray --address`` on a Ray cluster started in another folder: its workers run there,
not in the folder the command was given in, so relative paths must reach them made absolute."""

import os

import numpy as np
import pyarrow.parquet as pq
import ray
from ray.cluster_utils import Cluster
from shard_data import write_webdataset

from packvit_native.cli import main


def test_relative_paths_reach_the_workers_of_a_cluster_started_elsewhere(model_dir, tmp_path, monkeypatch):
    # deeper than the work folder, so that no relative path means the same file in both
    head = tmp_path / "cluster" / "head"
    head.mkdir(parents=True)
    monkeypatch.chdir(head)  # the cluster's processes, and so its workers, run here
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        work = tmp_path / "work"
        write_webdataset(work / "wds", shards=2, per_shard=3)
        monkeypatch.chdir(work)
        common = ["encode", "--model", os.path.relpath(model_dir, work), "wds/{00000..00001}.tar"]
        assert (
            main([*common, "--out", "local", "--device", "cpu"]) == 1
        )  # the third sample of each is corrupt
        assert main([*common, "--out", "ray", "--engine", "ray", "--address", cluster.address]) == 1
        for name in ("00000.parquet", "00001.parquet"):
            local, remote = pq.read_table(work / "local" / name), pq.read_table(work / "ray" / name)
            assert local.column("key").to_pylist() == remote.column("key").to_pylist() and local.num_rows == 2
            np.testing.assert_allclose(
                np.stack(local.to_pandas().embedding),
                np.stack(remote.to_pandas().embedding),
                rtol=0,
                atol=1e-6,
            )
        assert not (head / "ray").exists()
    finally:
        ray.shutdown()
        cluster.shutdown()
