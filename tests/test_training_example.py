"""The training example runs end to end on the CPU."""

import importlib.util
import math
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_merger.py"


def _load():
    spec = importlib.util.spec_from_file_location("train_merger", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_merger_runs_two_steps_and_trains_the_encoder(capsys):
    example = _load()
    losses = example.main(["--steps", "2", "--checkpoint-every", "1"])
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert capsys.readouterr().out.count("loss") == 2


def test_merge_index_groups_2x2_blocks():
    example = _load()
    index = example.merge_index(torch.tensor([[1, 2, 4], [2, 2, 2]]))
    # Frame 0 (2x4): blocks of columns (0, 1) and (2, 3); then two 2x2 frames of the clip.
    assert index.tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
