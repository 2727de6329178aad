"""`GGUFFile` against the `gguf` package: a file written with `gguf.GGUFWriter` (every
metadata type, plain and quantized tensors) reads back the same through both parsers."""

import gguf
import numpy as np
import pytest

from jaxserve.model.loading.gguf_file import GGUFFile

T = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(path, {name: (array written, ggml type)}) of a file with one tensor per type."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("gguf") / "all-types.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -5)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -300)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -70000)
    writer.add_float32("t.f32", 0.25)
    writer.add_uint64("t.u64", 2**40)
    writer.add_int64("t.i64", -(2**40))
    writer.add_float64("t.f64", 1e-300)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "caf\u00e9 \U0001f916")
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, 1.5])
    writer.add_array("t.strings", ["a", "", "\u00e9\u00e8", "long " * 50])
    tensors = {}
    for name, kind, shape in (("f32", T.F32, (3, 64)), ("f16", T.F16, (2, 32)),
                              ("q8_0", T.Q8_0, (4, 64)), ("q4_1", T.Q4_1, (2, 3, 64)),
                              ("bf16", T.BF16, (5, 32))):
        values = rng.standard_normal(shape).astype(np.float32)
        if kind == T.F32:
            stored = values
        elif kind == T.F16:
            stored = values.astype(np.float16)
        else:
            stored = gguf.quants.quantize(values, kind)
        writer.add_tensor(name, stored, raw_dtype=kind if kind not in (T.F32, T.F16) else None)
        tensors[name] = (values, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path), tensors


def test_metadata_reads_back_as_gguf_reads_it(written):
    path, _ = written
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):  # the header, which GGUFReader lists as fields
            continue
        assert key in ours
        expected = field.contents()
        assert ours.get(key) == pytest.approx(expected) if isinstance(expected, float) \
            else ours.get(key) == expected, key
    assert ours.get("t.strings")[3] == "long " * 50
    assert ours.get("missing", "default") == "default"


def test_tensors_read_back_as_gguf_reads_them_and_dequantize(written):
    path, tensors = written
    ours = GGUFFile(path)
    theirs = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert set(ours.tensors) == set(theirs) == set(tensors)
    for name, (values, kind) in tensors.items():
        mine, reference = ours.tensors[name], theirs[name]
        assert mine.tensor_type == reference.tensor_type == kind
        assert mine.shape == tuple(int(d) for d in reference.shape)
        assert mine.n_bytes == reference.n_bytes
        assert mine.data.dtype == reference.data.dtype
        np.testing.assert_array_equal(mine.data, reference.data)
        restored = gguf.quants.dequantize(mine.data, mine.tensor_type)
        np.testing.assert_allclose(restored.reshape(values.shape), values, atol=0.3)


def test_a_file_that_is_not_gguf_or_is_cut_short_fails_naming_it(written, tmp_path):
    path, _ = written
    with open(path, "rb") as f:
        data = f.read()
    not_gguf = tmp_path / "not.gguf"
    not_gguf.write_bytes(b"GGML" + data[4:])
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(not_gguf)
    old = tmp_path / "v1.gguf"
    old.write_bytes(data[:4] + (1).to_bytes(4, "little") + data[8:])
    with pytest.raises(ValueError, match="version 1"):
        GGUFFile(old)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated"):
        GGUFFile(cut)
