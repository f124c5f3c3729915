"""Users' data files as their tools write them: CSV from Excel and csv writers, JSONL, .npz for array bundles."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from edgepeft.errors import BundleError, DataError
from edgepeft.runtime import TrainingSession
from edgepeft.runtime.data import read_text_file

TAKES = r"this bundle takes x float32\[batch, 16\] and labels int64\[batch\]"
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def _write_csv(path, rows, header=("text", "label"), **options):
    with open(path, "w", encoding=options.pop("encoding", "utf-8"), newline="") as f:
        writer = csv.writer(f, **options)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# ---- CSV and JSONL as users' tools write them ---------------------------------------------------


def test_excel_csv_utf8_with_bom_and_crlf(tmp_path):
    rows = [["Emma Woodhouse", "emma"], ["café", "persuasion"]]
    path = _write_csv(tmp_path / "excel.csv", rows, encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbftext,label\r\n")
    assert read_text_file(path) == (["Emma Woodhouse", "café"], ["emma", "persuasion"])


def test_excel_csv_separated_by_semicolons(tmp_path):
    path = _write_csv(tmp_path / "de.csv", [["Grüße, Emma", "emma"]], delimiter=";", encoding="utf-8-sig")
    assert read_text_file(path) == (["Grüße, Emma"], ["emma"])


def test_line_breaks_inside_fields_are_kept(tmp_path):
    texts = [f"before{c}after" for c in LINE_BREAKS] + ['she said "hi",\r\nthen left']
    path = _write_csv(tmp_path / "breaks.csv", [[t, "a"] for t in texts])
    assert read_text_file(path)[0] == texts
    jsonl = tmp_path / "breaks.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "label": "a"}, ensure_ascii=False) + "\r\n" for t in texts),
                     encoding="utf-8", newline="")  # fmt: skip
    assert read_text_file(jsonl)[0] == texts


@pytest.mark.parametrize("name, blob", [("zero.csv", b""), ("bom.csv", b"\xef\xbb\xbf"), ("blank.jsonl", b"\r\n \n"),
                                        ("zero.jsonl", b"")])  # fmt: skip
def test_an_empty_file_says_it_is_empty(tmp_path, name, blob):
    (tmp_path / name).write_bytes(blob)
    with pytest.raises(DataError, match=f"{name} is empty"):
        read_text_file(tmp_path / name)


def test_an_unterminated_quote_names_the_file_and_line(tmp_path):
    path = tmp_path / "quote.csv"
    path.write_text('text,label\nfine,emma\n"never closed,emma\nnext,emma\n')
    with pytest.raises(DataError, match=r"quote.csv is not valid CSV: the quote \(\"\) opened on line 3 is never"):
        read_text_file(path)


def test_an_unquoted_delimiter_in_a_text_is_refused(tmp_path):
    path = tmp_path / "comma.csv"
    path.write_text("text,label\nhello, world,emma\n")
    with pytest.raises(DataError, match="comma.csv line 2 has 3 cells, the header has 2: quote a text"):
        read_text_file(path)


def test_a_text_longer_than_the_csv_field_limit_is_read(tmp_path):
    long = "word " * 40_000  # 200,000 characters, over the csv module's default 131,072
    path = _write_csv(tmp_path / "long.csv", [[long, "emma"], ["short", "emma"]])
    assert read_text_file(path)[0] == [long, "short"]
    assert csv.field_size_limit() == 131_072  # the process-wide limit is left as it was


def test_columns_named_otherwise(tmp_path):
    path = _write_csv(tmp_path / "reviews.csv", [["great", "5"], ["poor", "1"]], header=("id", "review", "score"))
    path.write_text(path.read_text().replace("great", "1,great").replace("poor", "2,poor"))
    assert read_text_file(path, text_column="review", label_column="score") == (["great", "poor"], ["5", "1"])
    with pytest.raises(DataError, match=r"has no `text` column \(found \['id', 'review', 'score'\]\).*`text_column`"):
        read_text_file(path)


def test_the_jsonl_error_keeps_the_parser_message(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b" "label": "y"}\n')
    with pytest.raises(DataError, match="bad.jsonl line 2 is not valid JSON: Expecting ',' delimiter at column 14"):
        read_text_file(path)


def test_a_file_over_1_gib_is_refused_unread(tmp_path):
    path = tmp_path / "huge.csv"
    with open(path, "wb") as f:
        f.truncate((1 << 30) + 1)  # sparse: no disk used
    with pytest.raises(DataError, match="larger than 1024 MiB: split it"):
        read_text_file(path)


# ---- text bundles (one MiniLM session for the whole module) -------------------------------------


@pytest.fixture(scope="module")
def minilm(minilm_int8):
    return TrainingSession(minilm_int8)


def test_text_bundle_files(minilm, tmp_path):
    long = "Emma Woodhouse, handsome, clever, and rich. " * 4546  # 200,024 characters
    rows = [["1", "It is a truth universally acknowledged,\r\nthat a single man", "prideprejudice"],
            ["2", long, "emma"]]  # fmt: skip
    path = _write_csv(tmp_path / "excel.csv", rows, header=("id", "review", "score"), encoding="utf-8-sig")
    data = minilm.load_data(path, text_column="review", label_column="score")
    max_length = minilm.manifest.max_length
    assert data.features["input_ids"].shape == (2, max_length)
    assert data.features["attention_mask"][1].sum() == max_length  # the long text: truncated, not refused
    assert list(data.labels) == [minilm.manifest.labels.index("prideprejudice"), minilm.manifest.labels.index("emma")]
    with pytest.raises(DataError, match=r"excel.csv has no `label` column \(found \['id', 'review', 'score'\]\)"):
        minilm.load_data(path, text_column="review")
    inputs = minilm.load_inputs(path, text_column="review")  # prediction: labels not needed
    np.testing.assert_array_equal(inputs["input_ids"], data.features["input_ids"])
    unlabelled = _write_csv(tmp_path / "texts.csv", [["Call me Ishmael."]], header=("text",))
    assert minilm.predict(minilm.load_inputs(unlabelled)).labels[0] in minilm.manifest.labels
    numbers = _write_csv(tmp_path / "numbers.csv", [["hello", "1"], ["world", "6"]])
    with pytest.raises(DataError, match=r"label '6' \(row 2\) is not one the bundle knows: .* or a class index 0..5"):
        minilm.load_data(numbers)  # "1" is a class index (datasets write them); 6 is out of range


# ---- array bundles (the tiny MLP: x float32[batch, 16], 4 classes) ------------------------------


@pytest.fixture(scope="module")
def mlp(mlp_bundle):
    return TrainingSession(mlp_bundle)


def _arrays(rows: int = 6):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 16)).astype(np.float32)
    return x, x[:, :4].argmax(axis=1)


def test_npz_with_float_labels(mlp, tmp_path):
    x, y = _arrays()
    np.savez(tmp_path / "d.npz", x=x.astype(np.float64), labels=y.astype(np.float64))
    data = mlp.load_data(tmp_path / "d.npz")
    np.testing.assert_array_equal(data.features["x"], x)
    assert data.labels.dtype == np.int64 and list(data.labels) == list(y)
    expected = mlp.evaluate(mlp.dataset({"x": x}, y))
    assert mlp.evaluate(data).loss == pytest.approx(expected.loss)
    np.savez(tmp_path / "half.npz", x=x, labels=np.array([0, 1, 1.5, 2, 3, 0]))
    with pytest.raises(DataError, match=r"'labels' must hold int64 values: 1.5 \(row 3\) is not a whole number "
                                        r"\(whole numbers written as floats \(2.0\) are read as integers"):  # fmt: skip
        mlp.load_data(tmp_path / "half.npz")
    np.savez(tmp_path / "nolabels.npz", x=x)
    with pytest.raises(DataError, match=r"has no array 'labels' \(found \['x'\]\): " + TAKES):
        mlp.load_data(tmp_path / "nolabels.npz")
    np.testing.assert_array_equal(mlp.load_inputs(tmp_path / "nolabels.npz")["x"], x)
    np.savez(tmp_path / "narrow.npz", x=x[:, :15], labels=y)
    with pytest.raises(DataError, match=r"narrow.npz: 'x' dimension 1 must be 16, got shape \(6, 15\): " + TAKES):
        mlp.load_data(tmp_path / "narrow.npz")


def test_jsonl_of_input_fields(mlp, tmp_path):
    x, y = _arrays()
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"id": i, "x": x[i].tolist(), "label": int(y[i])}) + "\n" for i in range(6)))
    data = mlp.load_data(path)
    np.testing.assert_allclose(data.features["x"], x)
    assert list(data.labels) == list(y)
    np.testing.assert_allclose(mlp.predict(mlp.load_inputs(path)).outputs, mlp.predict({"x": x}).outputs)
    path.write_text(json.dumps({"x": [1] * 16, "label": 0}) + "\n" + json.dumps({"x": [1] * 15, "label": 0}) + "\n")
    with pytest.raises(DataError, match=r"field `x`: row 2 \(line 2\) has shape \(15,\), row 1 has \(16,\)"):
        mlp.load_data(path)
    path.write_text(json.dumps({"features": [1] * 16, "label": 0}) + "\n")
    with pytest.raises(DataError, match=r"has no `x` field \(found \['features', 'label'\]\): " + TAKES):
        mlp.load_data(path)


def test_csv_of_input_columns(mlp, tmp_path):
    x, y = _arrays()
    cells = [[*map(repr, map(float, row)), f"{label}.0"] for row, label in zip(x, y)]  # labels written 2.0
    spread = _write_csv(tmp_path / "spread.csv", cells, header=[f"x_{i}" for i in range(16)] + ["label"])
    listed = _write_csv(tmp_path / "listed.csv", [[json.dumps(row.tolist()), int(label)] for row, label in zip(x, y)],
                        header=("x", "label"))  # fmt: skip
    for path in (spread, listed):
        data = mlp.load_data(path)
        np.testing.assert_allclose(data.features["x"], x)
        assert list(data.labels) == list(y)
    with pytest.raises(DataError, match=r"has no `score` column .*`label_column`"):
        mlp.load_data(listed, label_column="score")
    renamed = _write_csv(tmp_path / "renamed.csv", [[json.dumps(row.tolist()), int(v)] for row, v in zip(x, y)],
                         header=("x", "score"))  # fmt: skip
    assert list(mlp.load_data(renamed, label_column="score").labels) == list(y)
    with pytest.raises(DataError, match=r"renamed.csv has no `label` column"):
        mlp.load_data(renamed)
    np.testing.assert_allclose(mlp.load_inputs(renamed)["x"], x)
    with pytest.raises(DataError, match=r"text_column='review'.*" + TAKES.replace(" and labels int64\\[batch\\]", "")):
        mlp.load_data(renamed, text_column="review")


def test_a_text_file_for_an_array_bundle_says_what_it_takes(mlp, tmp_path):
    path = _write_csv(tmp_path / "t.csv", [["hello", "0"]])
    with pytest.raises(BundleError, match=r"has no tokenizer.json: it takes arrays, not text \(this bundle takes x"):
        mlp.load_data(path)


def test_array_data_files_train(mlp_bundle, tmp_path):
    x, y = _arrays(64)
    np.savez(tmp_path / "train.npz", x=x, labels=y)
    session = TrainingSession(mlp_bundle)
    report = session.train(session.load_data(tmp_path / "train.npz"))
    assert report.steps > 0 and np.isfinite(report.epoch_losses).all()
