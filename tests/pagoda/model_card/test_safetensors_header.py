"""The safetensors header read with the standard library: what it says of each tensor,
where the data starts, and the files that are not safetensors."""

from __future__ import annotations

import struct

import pytest

from pagoda.model_card.errors import ModelCardError
from pagoda.model_card.safetensors_header import read_safetensors_header
from tests.pagoda.model_card.folders import safetensors_numpy, weights


def read(path):
    with path.open("rb") as f:
        return read_safetensors_header(f, path)


def test_the_header_gives_each_tensor_and_where_the_data_starts(tmp_path):
    path = tmp_path / "w.safetensors"
    arrays = weights()
    safetensors_numpy.save_file(arrays, str(path), metadata={"format": "np"})
    tensors, start = read(path)
    assert set(tensors) == set(arrays)  # no __metadata__ entry
    (size,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert start == 8 + size
    data = path.read_bytes()[start:]
    for name, array in arrays.items():
        info = tensors[name]
        assert info["shape"] == list(array.shape)
        begin, end = info["data_offsets"]
        assert data[begin:end] == array.tobytes()
    assert tensors["model.norm.weight"]["dtype"] == "F16"


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"\x01\x02", "too short"),
        (struct.pack("<Q", 1 << 40), "header of"),
        (struct.pack("<Q", 4) + b"{not", "not a safetensors file: "),
    ],
)
def test_other_files_are_refused(tmp_path, content, why):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelCardError, match=why):
        read(path)
