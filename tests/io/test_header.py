"""Fuzzing the safetensors header reader: every generated file either reads correctly or raises our
own CheckpointError — no other exception, no hang, no allocation larger than the file (issue 7)."""
import json
import math
import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from astolfo_merge.errors import CheckpointError
from astolfo_merge.io.header import DTYPES, read_header

pytestmark = pytest.mark.slow   # generated inputs: tens of seconds
DTYPE_NAMES = list(DTYPES) + ["C64", "F4", "", "f16", None, 7]
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=False),
                         st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                           max_leaves=6)
shapes = st.one_of(st.lists(st.integers(0, 6), max_size=4), st.lists(st.integers(-3, 2 ** 40), max_size=3), json_values)


@st.composite
def entries(draw):
    dtype = draw(st.sampled_from(DTYPE_NAMES))
    shape = draw(shapes)
    if draw(st.booleans()) and isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape) and dtype in DTYPES:
        size = math.prod(shape) * DTYPES[dtype][1]
        begin = draw(st.integers(0, 64))
        offsets = [begin, begin + size + draw(st.sampled_from([0, 0, 0, 1, -1]))]
    else:
        offsets = draw(st.one_of(st.lists(st.integers(-5, 2 ** 64), max_size=3), json_values))
    entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    if draw(st.integers(0, 9)) == 0:
        entry = draw(json_values)
    return entry


@st.composite
def hostile_header(draw):
    """JSON text json.dumps never writes: names twice, deep nesting, integers beyond 64 bits (issue 15)."""
    entry = json.dumps({"dtype": "F32", "shape": [1], "data_offsets": [0, 4]})
    kind = draw(st.integers(0, 3))
    if kind == 0:
        name = draw(st.text(max_size=3))
        return ("{%s:%s,%s:%s}" % (json.dumps(name), entry, json.dumps(name), entry)).encode()
    if kind == 1:
        depth = draw(st.sampled_from([20, 40, 900, 5000, 100_000]))
        return b'{"__metadata__":{"k":' + b"[" * depth + b"]" * depth + b"}}"
    if kind == 2:
        digits = draw(st.integers(19, 6000))
        return b'{"a":{"dtype":"F32","shape":[' + b"1" * digits + b'],"data_offsets":[0,4]}}'
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    return ('{"a":{"%s":1,%s}' % (field, entry[1:])).encode()


@st.composite
def files(draw):
    kind = draw(st.integers(0, 11))
    if kind == 0:
        return draw(st.binary(max_size=64))
    if kind == 1:
        header = draw(st.binary(max_size=64))
    elif kind >= 10:
        header = draw(hostile_header())
    else:
        doc = draw(st.dictionaries(st.text(max_size=6), entries(), max_size=5))
        if draw(st.booleans()):
            doc["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=4), json_values, max_size=3), json_values))
        header = json.dumps(doc).encode()
    data = draw(st.binary(max_size=200))
    length = len(header)
    if draw(st.integers(0, 5)) == 0:
        length = draw(st.one_of(st.integers(0, 2 ** 64 - 1), st.integers(max(0, length - 3), length + 3)))
    return struct.pack("<Q", length) + header + data


def check(path, blob):
    path.write_bytes(blob)
    try:
        header = read_header(path)
    except CheckpointError as exc:
        assert str(path) in str(exc)
        return
    data_len = len(blob) - header.data_start
    spans = sorted((t.begin, t.end) for t in header.tensors.values())
    assert all(0 <= b <= e <= data_len for b, e in spans)
    # as the reference library: the tensors' bytes follow each other from 0 to the end of the file
    ends = [0] + [e for _, e in spans]
    assert [b for b, _ in spans] == ends[:-1] and ends[-1] == data_len
    agree_with_reference(path, header)


def agree_with_reference(path, header):
    """What we accept, the reference library accepts with the same tensors (unless the metadata holds
    non-strings: we read those, it does not)."""
    from safetensors import safe_open
    raw = path.read_bytes()[8:header.data_start]
    meta = json.loads(raw).get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        return   # we tolerate a falsy or non-string __metadata__; the reference refuses it
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(header.tensors)
        for key in f.keys():
            assert tuple(f.get_slice(key).get_shape()) == header.tensors[key].shape


@settings(max_examples=2_000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(blob=files())
def test_generated_headers_read_or_raise_our_error(tmp_path_factory, blob):
    check(tmp_path_factory.getbasetemp() / "fuzz.safetensors", blob)


def _valid_file(rng):
    doc, offset = {}, 0
    for i in range(rng.randint(0, 4)):
        dtype = rng.choice(list(DTYPES))
        shape = [rng.randint(0, 4) for _ in range(rng.randint(0, 3))]
        size = math.prod(shape) * DTYPES[dtype][1]
        doc[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if rng.random() < 0.5:
        doc["__metadata__"] = {"k": "v" * rng.randint(0, 5)}
    header = json.dumps(doc).encode()
    return bytearray(struct.pack("<Q", len(header)) + header + bytes(rng.randrange(256) for _ in range(offset)))


def _mutate(rng, blob):
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        if op == 0 and blob:      # flip a byte
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        elif op == 1:             # truncate
            del blob[rng.randrange(len(blob) + 1):]
        elif op == 2:             # insert digits (offsets, shapes, the length field)
            pos = rng.randrange(len(blob) + 1)
            blob[pos:pos] = str(rng.randint(0, 10 ** rng.randint(1, 20))).encode()
        elif op == 3:             # rewrite the length field
            blob[:8] = struct.pack("<Q", rng.choice([0, 1, len(blob), max(0, len(blob) - 8), 2 ** 63, rng.randrange(2 ** 64)]))
        else:                     # swap a JSON token
            text = bytes(blob)
            for a, b in ((b'"F16"', b'"X9"'), (b"[", b"{"), (b"]", b""), (b'"shape"', b'"shap"'), (b",", b",,")):
                if a in text and rng.random() < 0.5:
                    text = text.replace(a, b, 1)
            blob[:] = text
    return bytes(blob)


def test_twenty_thousand_mutated_headers_read_or_raise_our_error(tmp_path):
    import random
    rng = random.Random(20261122)
    path = tmp_path / "mutant.safetensors"
    outcomes = {"read": 0, "refused": 0}
    for _ in range(20_000):
        blob = _mutate(rng, _valid_file(rng))
        path.write_bytes(blob)
        try:
            agree_with_reference(path, read_header(path))
            outcomes["read"] += 1
        except CheckpointError:
            outcomes["refused"] += 1
    assert outcomes["read"] > 500 and outcomes["refused"] > 5_000, outcomes


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(blob=files())
def test_reading_a_header_never_allocates_more_than_the_file(tmp_path_factory, blob):
    path = tmp_path_factory.getbasetemp() / "fuzz-mem.safetensors"
    path.write_bytes(blob)
    tracemalloc.start()
    try:
        read_header(path)
    except CheckpointError:
        pass
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 20 * len(blob) + 64 * 1024


def test_a_header_length_of_2_to_the_63_is_refused_without_allocating(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2 ** 63) + b"{}")
    tracemalloc.start()
    try:
        read_header(path)
    except CheckpointError as exc:
        assert "larger than the file" in str(exc)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 * 1024
