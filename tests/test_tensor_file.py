"""Our piecewise safetensors writer: files that safetensors itself reads back exactly, in every dtype we store,
from pieces that are views of one storage, empty or not contiguous; bad pieces refused before a byte is written."""

import io

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load, save

from packvit_native.tensor_file import DTYPE_NAMES, write_tensors


def _written(tensors, metadata=None) -> bytes:
    buffer = io.BytesIO()
    write_tensors(buffer, tensors, metadata)
    return buffer.getvalue()


@pytest.mark.parametrize("dtype", list(DTYPE_NAMES))
def test_every_dtype_reads_back_as_safetensors_wrote_it(dtype):
    values = torch.randn(3, 5, dtype=torch.float64).mul(4)
    tensor = values > 0 if dtype == torch.bool else values.to(dtype)
    tensors = {"t": tensor, "scalar": torch.tensor(7, dtype=torch.int64), "empty": torch.zeros(0, 4)}
    ours = _written(tensors, {"names": "[]"})
    theirs = load(save(tensors, metadata={"names": "[]"}))
    got = load(ours)
    assert got.keys() == theirs.keys()
    for name in tensors:
        a, b = got[name], theirs[name]
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    assert int.from_bytes(ours[:8], "little") % 8 == 0  # header padded as the format asks


def test_pieces_are_stored_as_their_concatenation(tmp_path):
    batch = torch.randn(10, 6, dtype=torch.bfloat16)
    pieces = [batch[0:3], batch[3:3], batch[3:10]]  # views of one storage, one of them empty
    transposed = torch.randn(4, 2).t()  # not contiguous
    prefix = torch.randn(3, 2, 6)
    path = tmp_path / "t.safetensors"
    with open(path, "wb") as file:
        write_tensors(
            file,
            {"features": pieces, "t": transposed, "prefix": [p[None] for p in prefix]},
            {"names": '["a"]'},
        )
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"names": '["a"]'}
        assert torch.equal(f.get_tensor("features"), batch)
        assert torch.equal(f.get_tensor("t"), transposed)
        assert torch.equal(f.get_tensor("prefix"), prefix)
        assert torch.equal(f.get_slice("features")[3:5], batch[3:5])


@pytest.mark.parametrize(
    "bad",
    [
        {"f": []},
        {"f": [torch.zeros(2, 3), torch.zeros(2, 4)]},
        {"f": [torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float16)]},
        {"f": [torch.tensor(1.0), torch.tensor(2.0)]},
        {"f": torch.zeros(2, dtype=torch.complex64)},
    ],
)
def test_pieces_that_do_not_fit_are_refused_before_writing(bad):
    buffer = io.BytesIO()
    with pytest.raises(ValueError, match="tensor 'f'"):
        write_tensors(buffer, {"ok": torch.zeros(1), **bad})
    assert buffer.getvalue() == b""


@pytest.mark.parametrize(
    "tensors, metadata, match",
    [
        ({"f": torch.zeros(2, device="meta")}, None, "holds no data"),
        ({"f": torch.zeros(2, 2).to_sparse()}, None, "holds no data"),
        ({"__metadata__": torch.zeros(1)}, None, "cannot be named __metadata__"),
        # a file name that is not UTF-8, as Python decodes it: safetensors' reader refuses the escaped surrogate
        ({"f": torch.zeros(1)}, {"source": "caf\udce9.jpg"}, "not valid UTF-8"),
        ({"f": torch.zeros(1)}, {"count": 3}, "not a string"),
    ],
)
def test_what_the_format_cannot_hold_is_refused_before_writing(tensors, metadata, match):
    buffer = io.BytesIO()
    with pytest.raises(ValueError, match=match):
        write_tensors(buffer, tensors, metadata)
    assert buffer.getvalue() == b""
