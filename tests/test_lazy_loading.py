"""A vision tower inside a vision-language checkpoint is read without reading the language model."""

import json
import struct
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
LM_BYTES = 4 * 2**30


def _sparse_safetensors(path: Path, key: str, nbytes: int) -> None:
    """A valid safetensors file holding one fp32 tensor of ``nbytes``, written as a sparse file (no disk use)."""
    header = json.dumps({key: {"dtype": "F32", "shape": [nbytes // 4], "data_offsets": [0, nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + nbytes)


def test_peak_memory_is_the_towers_not_the_language_models(tiny_reference, tmp_path):
    src = tiny_reference("qwen2_5_vl", "vlm")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text((src / "config.json").read_text())
    state = load_file(src / "model.safetensors")
    save_file(state, ckpt / "model-00001-of-00002.safetensors")
    _sparse_safetensors(
        ckpt / "model-00002-of-00002.safetensors", "model.layers.99.mlp.huge.weight", LM_BYTES
    )
    weight_map = dict.fromkeys(state, "model-00001-of-00002.safetensors")
    weight_map["model.layers.99.mlp.huge.weight"] = "model-00002-of-00002.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    script = (
        "import resource, sys\n"
        "from weights_convert.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
        "sys.exit(code)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(ckpt), str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "the language model (" in run.stdout and "model.layers.*" in run.stdout
    peak = int(run.stdout.split("peak_rss_kib")[1].split()[0]) * 1024
    assert peak < LM_BYTES / 4, (
        f"peak RSS {peak / 2**30:.2f} GiB with a {LM_BYTES / 2**30:.0f} GiB language model"
    )
    print(f"peak RSS of the conversion: {peak / 2**20:.0f} MiB beside a {LM_BYTES / 2**30:.0f} GiB LM shard")
