"""Plot ``results.json`` from bench.py as a PNG: throughput of each implementation per model and workload.

python benchmarks/plot.py benchmarks/results/results.json benchmarks/results/throughput.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(src: str, dst: str) -> None:
    data = json.loads(Path(src).read_text())
    env, rows = data["env"], data["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), 1, figsize=(10, 3.2 * len(models)), squeeze=False)
    for ax, model in zip(axes[:, 0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        workloads = list(dict.fromkeys(r["workload"] for r in mine))
        impls = list(dict.fromkeys(r["impl"] for r in mine))
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            xs, ys = [], []
            for j, wl in enumerate(workloads):
                hit = [r for r in mine if r["workload"] == wl and r["impl"] == impl]
                if hit:
                    xs.append(j + i * width)
                    ys.append(hit[0]["img_per_s"])
            ax.bar(xs, ys, width, label=impl)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(workloads))], workloads)
        ax.set_yscale("log")
        ax.set_ylabel("images/s (log)")
        ax.set_title(model)
        ax.legend(fontsize=7)
    fig.suptitle(f"{env['gpu']}, bf16 forward, torch {env['torch']}, CUDA {env['cuda']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
