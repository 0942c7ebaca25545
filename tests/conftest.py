import pytest
import torch
import transformers

import packvit_native as pv
from weights_convert.check import save_tiny_reference

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory):
    """``tiny_reference(family, variant)`` -> directory of a seeded tiny transformers model (built once)."""
    cache = {}

    def make(family: str, variant: str):
        if (family, variant) not in cache:
            out = tmp_path_factory.mktemp(f"{family}-{variant}") / "hf"
            cache[family, variant] = save_tiny_reference(family, variant, out)
        return cache[family, variant]

    return make


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def model_dir(tiny_reference, tmp_path_factory):
    """A tiny DINOv3 converted to our format, built once and only read (tests that change or move their model
    define a fresh one of their own)."""
    return pv.from_pretrained(tiny_reference("dinov3", "gelu")).save_pretrained(
        tmp_path_factory.mktemp("model") / "model"
    )


@pytest.fixture
def break_second_token_write(monkeypatch):
    """``break_(error)``: the second ``.safetensors`` file written from then on gets a few bytes, then
    ``error`` is raised mid-write (a full disk, a Ctrl-C); ``break_(None)`` makes writes whole again."""
    from packvit_native import atomic

    real_write = atomic.write_file

    def break_(error: BaseException | None) -> None:
        if error is None:
            monkeypatch.setattr(atomic, "write_file", real_write)
            return
        calls = []

        def half_written(tmp):
            tmp.write_bytes(b"half a file")
            raise error

        def write(path, fill, **kwargs):
            if path.suffix == ".safetensors":
                calls.append(path)
            real_write(path, half_written if len(calls) == 2 else fill, **kwargs)

        monkeypatch.setattr(atomic, "write_file", write)

    return break_
