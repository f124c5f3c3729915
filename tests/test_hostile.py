"""Hostile and broken files: every loader refuses them with a clear error, and a bounded fuzz finds no crash."""

from __future__ import annotations

import csv
import json
import shutil
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgepeft import manifest as mf
from edgepeft.errors import AdapterError, BundleError, DataError
from edgepeft.fileio import read_json_object, write_json_atomic
from edgepeft.runtime import TrainingSession, open_bundle
from edgepeft.runtime.adapter import WEIGHTS, load_adapter
from edgepeft.runtime.checkpoint import PROGRESS, read_state
from edgepeft.runtime.data import read_text_file

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def bundle(mlp_bundle):
    return mlp_bundle


@pytest.fixture(scope="module")
def mlp_session(bundle):
    return TrainingSession(bundle)


@pytest.fixture(scope="module")
def adapter(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    TrainingSession(bundle).save_adapter(out)
    return out


def _manifest(bundle) -> dict:
    return json.loads((bundle / mf.MANIFEST_FILE).read_text())


def _with_manifest(bundle, tmp_path, data: dict):
    copy = shutil.copytree(bundle, tmp_path / "b")
    (copy / mf.MANIFEST_FILE).write_text(json.dumps(data))
    return copy


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda m: m["files"].update({"/etc/passwd": "0" * 64}), "points outside the bundle"),
        (lambda m: m["files"].update({"a/../../x": "0" * 64}), "points outside the bundle"),
        (lambda m: m["inputs"][0].update(dtype="float16"), "dtype 'float16'"),
        (lambda m: m.update(schema_version=99), "schema version 99"),
        (lambda m: m.update(loss="hinge"), "loss 'hinge'"),
        (lambda m: m["trainable"][0].update(shape=[10**12, 8]), "the checkpoint disagrees"),
        (lambda m: m["trainable"][0].update(name="not.a.parameter"), "the checkpoint disagrees"),
        (lambda m: m.update(trainable=[]), "no trainable parameters"),
    ],
)
def test_hostile_manifests(bundle, tmp_path, mutate, message):
    data = _manifest(bundle)
    mutate(data)
    with pytest.raises(BundleError, match=message):
        TrainingSession(_with_manifest(bundle, tmp_path, data))


def test_manifest_bytes_that_are_not_utf8(bundle, tmp_path):
    copy = shutil.copytree(bundle, tmp_path / "b")
    (copy / mf.MANIFEST_FILE).write_bytes(b'{"schema_version": "\xff\xfe"}')
    with pytest.raises(BundleError, match="not valid JSON"):
        open_bundle(copy)


def test_a_symlink_out_of_the_bundle_is_refused(bundle, tmp_path):
    copy = shutil.copytree(bundle, tmp_path / "b")
    outside = tmp_path / "outside.onnx"
    shutil.copy(copy / mf.EVAL_MODEL, outside)
    (copy / mf.EVAL_MODEL).unlink()
    (copy / mf.EVAL_MODEL).symlink_to(outside)
    with pytest.raises(BundleError, match="links outside the bundle"):
        open_bundle(copy)


def _rewrite_weights(adapter, tmp_path, change) -> object:
    copy = shutil.copytree(adapter, tmp_path / "a")
    path = copy / WEIGHTS
    path.write_bytes(change(path.read_bytes()))
    return copy


def _flip_last_byte(blob: bytes) -> bytes:
    return blob[:-1] + bytes([blob[-1] ^ 0x10])


def _huge_header(blob: bytes) -> bytes:
    return struct.pack("<Q", 1 << 60) + blob[8:]


def _int_dtype(blob: bytes) -> bytes:
    size = struct.unpack("<Q", blob[:8])[0]
    header = blob[8 : 8 + size].replace(b'"F32"', b'"I32"')
    return blob[:8] + header + blob[8 + size :]


@pytest.mark.parametrize(
    "change, message",
    [
        (_flip_last_byte, "corrupted \\(checksum differs\\)"),
        (lambda blob: blob[: len(blob) // 2], "cannot be read"),
        (_huge_header, "cannot be read"),
        (lambda blob: b"", "cannot be read"),
        (_int_dtype, "checksum differs|expected a float type"),
    ],
)
def test_hostile_adapter_weights(bundle, adapter, tmp_path, change, message):
    manifest = open_bundle(bundle).manifest
    with pytest.raises(AdapterError, match=message):
        load_adapter(manifest, _rewrite_weights(adapter, tmp_path, change))


def test_adapter_with_nan_values_is_refused(bundle, tmp_path):
    session = TrainingSession(bundle)
    values = session.trainable_values()
    name = next(iter(values))
    values[name] = np.full_like(values[name], np.nan)
    from edgepeft.runtime.adapter import save_adapter

    save_adapter(session.manifest, values, tmp_path / "nan")
    with pytest.raises(AdapterError, match="NaN or infinite"):
        session.load_adapter(tmp_path / "nan")


def test_training_state_pointing_outside_is_refused(bundle, tmp_path):
    session = TrainingSession(bundle)
    session.save_state(tmp_path / "state")
    record = read_json_object(tmp_path / "state" / PROGRESS, BundleError, "state")
    record["checkpoint"] = "../../bundle/checkpoint"
    write_json_atomic(tmp_path / "state" / PROGRESS, record)  # a planted file with a valid checksum
    with pytest.raises(BundleError, match="is missing"):
        read_state(tmp_path / "state", session.manifest.base_fingerprint)


# ---- bounded fuzzing: anything may be refused, nothing may crash with another exception ----------


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@FUZZ
@given(key=st.sampled_from(["inputs", "outputs", "label", "loss", "trainable", "files", "labels", "max_length",
                            "peft_config", "base_fingerprint", "schema_version", "quantization"]),
       value=json_values)  # fmt: skip
def test_fuzz_manifest_fields(bundle, key, value):
    data = _manifest(bundle)
    data[key] = value
    try:
        mf.Manifest.from_dict(data)
    except BundleError:
        pass


@FUZZ
@given(blob=st.binary(max_size=512))
def test_fuzz_manifest_bytes(tmp_path_factory, blob):
    directory = tmp_path_factory.mktemp("m")
    (directory / mf.MANIFEST_FILE).write_bytes(blob)
    try:
        open_bundle(directory)
    except BundleError:
        pass


@FUZZ
@given(data=st.data())
def test_fuzz_adapter_files(bundle, adapter, tmp_path_factory, data):
    manifest = open_bundle(bundle).manifest
    directory = shutil.copytree(adapter, tmp_path_factory.mktemp("a") / "a")
    blob = bytearray((directory / WEIGHTS).read_bytes())
    for _ in range(data.draw(st.integers(0, 4))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    (directory / WEIGHTS).write_bytes(bytes(blob[:cut]) if data.draw(st.booleans()) else bytes(blob))
    if data.draw(st.booleans()):
        (directory / "adapter_config.json").write_bytes(data.draw(st.binary(max_size=64)))
    try:
        load_adapter(manifest, directory)
    except AdapterError:
        pass


@FUZZ
@given(text=st.text(max_size=300), suffix=st.sampled_from([".csv", ".jsonl", ".tsv"]))
def test_fuzz_data_files(tmp_path_factory, text, suffix):
    if not _encodable(text):  # lone surrogates: not text a file can hold
        return
    path = tmp_path_factory.mktemp("d") / f"data{suffix}"
    path.write_text(text, encoding="utf-8")
    try:
        texts, labels = read_text_file(path)
    except DataError:
        return
    assert texts and all(isinstance(t, str) and t.strip() for t in texts)
    assert labels is None or len(labels) == len(texts)



# Texts and labels as users' data holds them: any unicode, with quotes, delimiters, line breaks of every
# kind and BOM-like characters; blank ones are refused on purpose, so they are not drawn.
_tricky = st.text(alphabet=st.characters(blacklist_categories=("Cs",)) | st.sampled_from('",\t\n\r\x0b\x0c\x1c\x1d'
                                                                                 '\x1e\x85\u2028\u2029\ufeff\ufffe'),
                  min_size=1, max_size=40).filter(str.strip)  # fmt: skip


@FUZZ
@given(rows=st.lists(st.tuples(_tricky, _tricky), min_size=1, max_size=6), bom=st.booleans(),
       dialect=st.sampled_from([csv.excel, csv.excel_tab, csv.unix_dialect]))  # fmt: skip
def test_fuzz_csv_round_trip(tmp_path_factory, rows, bom, dialect):
    # excel: CRLF, quotes when needed; unix: LF, quotes all (with LF and minimal quoting, Python's writer
    # leaves a "\r" unquoted, which no reader can tell from a line end).
    path = tmp_path_factory.mktemp("d") / ("data.tsv" if dialect is csv.excel_tab else "data.csv")
    with open(path, "w", encoding="utf-8-sig" if bom else "utf-8", newline="") as f:
        writer = csv.writer(f, dialect)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    assert read_text_file(path) == ([text for text, _ in rows], [label for _, label in rows])


@FUZZ
@given(rows=st.lists(st.tuples(_tricky, _tricky), min_size=1, max_size=6), ascii_only=st.booleans(),
       crlf=st.booleans())  # fmt: skip
def test_fuzz_jsonl_round_trip(tmp_path_factory, rows, ascii_only, crlf):
    path = tmp_path_factory.mktemp("d") / "data.jsonl"
    end = "\r\n" if crlf else "\n"
    lines = [json.dumps({"text": text, "label": label}, ensure_ascii=ascii_only) + end for text, label in rows]
    path.write_text("".join(lines), encoding="utf-8", newline="")
    assert read_text_file(path) == ([text for text, _ in rows], [label for _, label in rows])


_cells = st.one_of(st.integers(-(2**70), 2**70), st.floats(), st.booleans(), st.none(), st.text(max_size=6),
                   st.lists(st.floats(width=32) | st.integers(-5, 5), max_size=17))  # fmt: skip


@FUZZ
@given(rows=st.lists(st.dictionaries(st.sampled_from(["x", "label", "x_0", "x_1", "text"]), _cells, max_size=4),
                     min_size=1, max_size=4),
       suffix=st.sampled_from([".csv", ".jsonl"]), labels=st.booleans())  # fmt: skip
def test_fuzz_array_data_files(mlp_session, tmp_path_factory, rows, suffix, labels):
    path = tmp_path_factory.mktemp("d") / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        columns = sorted({key for row in rows for key in row})
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows([[json.dumps(row[c]) if c in row else "" for c in columns] for row in rows])
    session = mlp_session
    try:
        data = session.load_data(path) if labels else session.dataset(session.load_inputs(path))
    except (DataError, BundleError):
        return
    assert data.features["x"].dtype == np.float32 and data.features["x"].shape[1:] == (16,)
    assert not labels or (data.labels.dtype == np.int64 and len(data.labels) == len(data))


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def test_edited_json_files_fail_their_checksums(bundle, adapter, tmp_path):
    session = TrainingSession(bundle)
    session.save_state(tmp_path / "state")
    record = json.loads((tmp_path / "state" / PROGRESS).read_text())
    record["step"] += 1
    (tmp_path / "state" / PROGRESS).write_text(json.dumps(record))
    with pytest.raises(BundleError, match="corrupted \\(checksum differs\\)"):
        read_state(tmp_path / "state", session.manifest.base_fingerprint)

    copy = shutil.copytree(adapter, tmp_path / "a")
    config = json.loads((copy / "adapter_config.json").read_text())
    config["lora_alpha"] = 1.0
    (copy / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="adapter config .* is corrupted"):
        session.load_adapter(copy)
