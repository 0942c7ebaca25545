"""packvit-check: exit codes, what it says without transformers, and no transformers warnings of its own making."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from weights_convert.check import load_reference, save_tiny_reference
from weights_convert.check import main as check_main

ROOT = Path(__file__).resolve().parents[1]


def test_without_transformers_says_what_to_install(tmp_path):
    # sys.modules[name] = None makes `import transformers` raise ImportError, as if it were not installed.
    script = (
        "import sys\n"
        "sys.modules['transformers'] = None\n"
        "from weights_convert.check import main\n"
        "sys.exit(main([]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr == (
        "packvit-check: error: the comparison needs transformers; install it with "
        "pip install 'packvit-native[test]' (or pip install transformers==5.17.0)\n"
    )


def test_unreadable_checkpoint_is_exit_2(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("null")
    assert check_main([str(tmp_path / "src")]) == 2
    assert (
        capsys.readouterr().err
        == f"packvit-check: error: {tmp_path / 'src' / 'config.json'} must hold a JSON object, not NoneType\n"
    )


@pytest.fixture
def transformers_warnings():
    """Records of every transformers warning, with the level and the once-only cache as a fresh process has."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_warning()
    logging.Logger.warning_once.cache_clear()  # an earlier test may have triggered (and cached) the warning
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
    transformers.utils.logging.set_verbosity(verbosity)


TWO_TOWERS = [("siglip", "two_tower"), ("siglip2", "two_tower"), ("qwen2_5_vl", "vlm")]


@pytest.mark.parametrize(("family", "variant"), TWO_TOWERS)
def test_two_tower_references_raise_no_transformers_warnings(
    transformers_warnings, tmp_path, family, variant
):
    load_reference(save_tiny_reference(family, variant, tmp_path / "reference"))
    messages = [r.getMessage() for r in transformers_warnings]
    assert messages == [], messages


def test_two_tower_check_prints_only_its_table(transformers_warnings, capsys):
    assert check_main(["--family", "siglip", "--variant", "two_tower"]) == 0
    captured = capsys.readouterr()
    assert "PASS" in captured.out and captured.err == "", captured.err
    assert "token_id" not in captured.out
    assert [r.getMessage() for r in transformers_warnings] == []


def test_a_checkpoint_transformers_cannot_load_is_exit_2(tiny_reference, tmp_path, capsys):
    """packvit-convert reads a lone .pth; transformers does not, so the check says so in one line."""
    import shutil

    import torch
    from safetensors.torch import load_file

    src = Path(shutil.copytree(tiny_reference("dinov3", "gelu"), tmp_path / "src"))
    torch.save(load_file(src / "model.safetensors"), src / "weights.pth")
    (src / "model.safetensors").unlink()
    assert check_main([str(src)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"packvit-check: error: {src}: transformers cannot load it") and err.count("\n") == 1
    )
