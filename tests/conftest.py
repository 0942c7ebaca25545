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
