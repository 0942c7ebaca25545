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


def _peak_rss_of_conversion(ckpt: Path, out: Path) -> tuple[int, str]:
    script = (
        "import resource, sys\n"
        "from weights_convert.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
        "sys.exit(code)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(ckpt), str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    return int(run.stdout.split("peak_rss_kib")[1].split()[0]) * 1024, run.stdout


def test_peak_memory_is_the_towers_not_the_language_models(tiny_reference, tmp_path):
    """The same conversion with and without a 4 GiB language-model shard in the index: the difference in peak
    memory is what reading the language model would cost. (An absolute bound would measure the machine: the
    imports alone took 3 GiB on a GPU machine.)"""
    src = tiny_reference("qwen2_5_vl", "vlm")
    state = load_file(src / "model.safetensors")
    peaks = []
    for with_lm in (False, True):
        ckpt = tmp_path / f"ckpt-{with_lm}"
        ckpt.mkdir()
        (ckpt / "config.json").write_text((src / "config.json").read_text())
        save_file(state, ckpt / "model-00001-of-00002.safetensors")
        weight_map = dict.fromkeys(state, "model-00001-of-00002.safetensors")
        if with_lm:
            lm_key = "model.layers.99.mlp.huge.weight"
            _sparse_safetensors(ckpt / "model-00002-of-00002.safetensors", lm_key, LM_BYTES)
            weight_map[lm_key] = "model-00002-of-00002.safetensors"
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        peak, stdout = _peak_rss_of_conversion(ckpt, tmp_path / f"out-{with_lm}")
        peaks.append(peak)
    assert "the language model (" in stdout and "model.layers.*" in stdout
    without, with_lm = peaks
    assert with_lm - without < LM_BYTES / 8, (
        f"peak RSS {with_lm / 2**30:.2f} GiB with a {LM_BYTES / 2**30:.0f} GiB language model, "
        f"{without / 2**30:.2f} GiB without"
    )
    print(
        f"peak RSS of the conversion: {with_lm / 2**20:.0f} MiB beside a 4 GiB LM shard, {without / 2**20:.0f} without"
    )
