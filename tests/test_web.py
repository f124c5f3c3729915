"""The JavaScript device runtime (edgepeft/web) under Node and in headless Chromium, against the Python runtime."""

from __future__ import annotations

import csv
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from web_support import WEB, learnable_csv, need_chromium, need_node_modules, node, node_json

from edgepeft.export.web_lr import MAGIC
from edgepeft.runtime import TrainConfig, TrainingSession
from edgepeft.runtime.data import read_text_file

STEP_ATOL = 1e-6


@pytest.fixture(scope="module")
def tiny_text_bundles(tmp_path_factory):
    """The tiny BERT (WordPiece tokenizer, max_length 32) as fp32 and int8 bundles."""
    from tiny_bert import make_tiny_bert

    from edgepeft.export import ExportOptions, LoraSpec, export

    root = tmp_path_factory.mktemp("web")
    model = make_tiny_bert(root / "tiny-bert")
    bundles = {}
    for quantization in ("fp32", "int8"):
        bundles[quantization] = root / quantization
        options = ExportOptions(labels=("a", "b"), max_length=32, quantization=quantization)
        export(model, bundles[quantization], lora=LoraSpec(), options=options)
    return {**bundles, "model": model, "data": learnable_csv(root / "data.csv")}


def _flat(values: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([v.ravel() for v in values.values()])


def test_the_optimizer_graph_carries_the_learning_rate_table_once(tiny_text_bundles):
    data = (tiny_text_bundles["fp32"] / "optimizer_model.onnx").read_bytes()
    assert data.count(MAGIC) == 1


@pytest.mark.parametrize("schedule,warmup,steps", [("constant", 0, 1), ("linear", 2, 5), ("cosine", 1, 5)])
def test_a_js_step_equals_a_python_step_at_the_same_learning_rate(tiny_text_bundles, tmp_path, schedule, warmup, steps):
    """The rate baked into the optimizer graph: the same parameters after the run's steps, within 1e-6.

    (WASM and native kernels round differently, ~2e-7 a step at this rate: a longer run or a higher rate drifts
    further, as any two builds do. A schedule the graph got wrong moves parameters by ~1e-3.)"""
    need_node_modules()
    bundle, data = tiny_text_bundles["fp32"], tiny_text_bundles["data"]
    session = TrainingSession(bundle)
    start = _flat(session.trainable_values())
    config = TrainConfig(batch_size=8, learning_rate=5e-3, schedule=schedule, warmup_steps=warmup, shuffle=False,
                         max_steps=steps)  # fmt: skip
    session.train(session.load_data(data), config)
    python = _flat(session.trainable_values())
    node("bin/edgepeft-web-train.mjs", "--bundle", bundle, "--data", data, "--lr", "5e-3", "--schedule", schedule,
         "--warmup", str(warmup), "--no-shuffle", "--max-steps", str(steps),
         "--values-out", tmp_path / "v.bin")  # fmt: skip
    js = np.fromfile(tmp_path / "v.bin", dtype=np.float32)
    assert np.abs(python - start).max() > 1e-3 * min(steps, 2)  # the steps moved the parameters
    assert np.abs(js - python).max() <= STEP_ATOL


def test_js_and_python_tokenizers_give_identical_ids_on_austen(minilm_int8, tmp_path):
    need_node_modules()
    from edgepeft.demo import austen_rows

    edge = ["ÉLISE  Bennet's café — naïve?!", "中文 字符 and emoji 🙂 mixed",
            "UPPER lower MiXeD\tTabs\nnewline",
            " ".join(["Pemberley"] * 300)]  # longer than max_length: truncated  # fmt: skip
    path = tmp_path / "texts.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([row["text"], row["label"]] for row in austen_rows())
        writer.writerows([text, "emma"] for text in edge)
    texts, _ = read_text_file(path)
    encoded = TrainingSession(minilm_int8).encode(texts)
    lines = node("bin/edgepeft-web-tokenize.mjs", "--bundle", minilm_int8, "--data", path).splitlines()
    assert len(lines) == len(texts) == 2404
    for i, line in enumerate(lines):
        ids, types = json.loads(line)
        mask = encoded["attention_mask"][i].astype(bool)
        assert ids == encoded["input_ids"][i][mask].tolist(), texts[i][:80]
        assert types == encoded["token_type_ids"][i][mask].tolist()
    assert len(json.loads(lines[-1])[0]) == 128


@pytest.mark.parametrize("quantization", ["fp32", "int8"])
def test_node_trains_a_bundle_and_its_adapter_loads_in_the_python_runtime(tiny_text_bundles, tmp_path, quantization):
    need_node_modules()
    bundle, data = tiny_text_bundles[quantization], tiny_text_bundles["data"]
    report = node_json("bin/edgepeft-web-train.mjs", "--bundle", bundle, "--data", data, "--eval-data", data,
                       "--lr", "5e-2", "--epochs", "8", "--adapter-out", tmp_path / "adapter",
                       "--predict-out", tmp_path / "pred.json", "--values-out", tmp_path / "v.bin")  # fmt: skip
    assert report["steps"] == 48 and report["stopped"] == "complete"
    assert report["lossAfter"] < 0.5 * report["lossBefore"] and report["accuracyAfter"] >= 0.9
    session = TrainingSession(bundle)
    session.load_adapter(tmp_path / "adapter")  # checksums, fingerprint and config checksum verified
    assert np.array_equal(_flat(session.trainable_values()), np.fromfile(tmp_path / "v.bin", dtype=np.float32))
    texts, _ = read_text_file(data)
    assert session.predict(texts).classes.tolist() == json.loads((tmp_path / "pred.json").read_text())


def test_a_run_resumes_from_saved_trainable_values(tiny_text_bundles, tmp_path):
    need_node_modules()
    bundle, data = tiny_text_bundles["fp32"], tiny_text_bundles["data"]
    first = node_json("bin/edgepeft-web-train.mjs", "--bundle", bundle, "--data", data, "--eval-data", data,
                      "--lr", "5e-2", "--max-steps", "6", "--values-out", tmp_path / "v.bin")  # fmt: skip
    resumed = node_json("bin/edgepeft-web-train.mjs", "--bundle", bundle, "--data", data, "--eval-data", data,
                        "--lr", "5e-2", "--max-steps", "6", "--step-offset", "6",
                        "--values-in", tmp_path / "v.bin")  # fmt: skip
    assert resumed["lossBefore"] == pytest.approx(first["lossAfter"], abs=1e-6)
    assert resumed["lossAfter"] < first["lossBefore"]


def test_a_corrupted_bundle_file_is_refused_by_its_sha256(tiny_text_bundles, tmp_path):
    need_node_modules()
    import shutil
    import subprocess

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_text_bundles["fp32"], copy)
    data = bytearray((copy / "checkpoint").read_bytes())
    data[-1] ^= 1
    (copy / "checkpoint").write_bytes(bytes(data))
    done = subprocess.run(["node", str(WEB / "bin/edgepeft-web-train.mjs"), "--bundle", str(copy), "--data",
                           str(tiny_text_bundles["data"])], capture_output=True, text=True)  # fmt: skip
    assert done.returncode != 0 and "bundle file checkpoint is corrupted" in done.stderr


# ---- the server -------------------------------------------------------------------------------


@pytest.fixture
def served(tiny_text_bundles):
    need_node_modules()
    from edgepeft.webserve import WebApp, serve_in_thread

    app = WebApp(tiny_text_bundles["fp32"])
    server, url = serve_in_thread(app)
    yield app, server, url
    server.shutdown()
    server.server_close()


def _get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), b""


def test_the_server_binds_loopback_isolates_and_serves_only_known_files(served):
    app, server, url = served
    assert server.server_address[0] == "127.0.0.1"
    status, headers, body = _get(url)
    assert status == 200 and b"importmap" in body
    assert headers["Cross-Origin-Opener-Policy"] == "same-origin"
    assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    assert "connect-src 'self'" in headers["Content-Security-Policy"]
    served_files = ("bundle/manifest.json", "bundle/checkpoint", "ort/ort-training-wasm-simd-threaded.wasm",
                    "src/edgepeft.js", "vendor/tokenizers.mjs")
    for path in served_files:
        assert _get(url + path)[0] == 200, path
    for path in ("bundle/..%2Fdata.csv", "bundle/other.onnx", "ort/ort.min.js", "src/..%2F..%2F__init__.py",
                 "..%2F..%2Fpyproject.toml", "node_modules/onnxruntime-web/package.json",
                 "page/../../cli/app.py"):  # fmt: skip
        assert _get(url + path)[0] == 404, path
    request = urllib.request.Request(url, data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(request)


def test_the_web_command_refuses_a_directory_that_is_not_a_bundle(tmp_path):
    from click.testing import CliRunner

    from edgepeft.cli import main

    result = CliRunner().invoke(main, ["web", str(tmp_path)])
    assert result.exit_code == 1 and "Error:" in result.output


# ---- in a real browser ------------------------------------------------------------------------


def test_the_page_trains_in_chromium_and_peft_loads_the_downloaded_adapter(tiny_text_bundles, served, tmp_path):
    """The data file is chosen with the file input, trained on in the page; no request leaves the origin."""
    need_chromium()
    import peft
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    app, _, url = served
    data = tiny_text_bundles["data"]
    report = node_json("test/browser_train.mjs", "--url", url, "--data", data, "--eval-data", data, "--out",
                       tmp_path / "downloads", "--lr", "5e-2", "--epochs", "6", timeout=600)  # fmt: skip
    result = report["result"]
    assert report["crossOriginIsolated"] is True
    assert report["foreign"] == [] and report["requests"]
    assert all(r.split("?")[0].split("/")[1] in ("", "page", "src", "ort", "vendor", "bundle") for r in app.requests)
    assert "data.csv" not in " ".join(app.requests)  # the user's file was read in the page, never requested
    assert result["steps"] == 36 and result["after"]["loss"] < 0.5 * result["before"]["loss"]
    assert np.mean(result["losses"][-6:]) < np.mean(result["losses"][:6])
    adapter = tmp_path / "downloads"
    session = TrainingSession(tiny_text_bundles["fp32"])
    session.load_adapter(adapter)
    texts, _ = read_text_file(data)
    assert session.predict(texts).classes.tolist() == result["heldOutPredictions"]
    base = AutoModelForSequenceClassification.from_pretrained(tiny_text_bundles["model"], num_labels=2)
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_text_bundles["model"])
    with torch.no_grad():
        host = model(**tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")).logits
    assert host.argmax(-1).tolist() == result["heldOutPredictions"]


def test_the_demo_minilm_int8_bundle_trains_in_chromium_and_peft_agrees(
    minilm_int8, minilm_dir, austen_split, tmp_path
):
    """A few steps of the real MiniLM int8 bundle in the page (benchmarks/web_acceptance.py runs the long one)."""
    need_chromium()
    import peft
    import torch
    from conftest import AUSTEN_LABELS
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from edgepeft.webserve import WebApp, serve_in_thread

    train_csv, test_csv = austen_split
    held_out = tmp_path / "held-out.csv"
    with open(test_csv, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:48]
    with held_out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    app = WebApp(minilm_int8)
    server, url = serve_in_thread(app)
    try:
        report = node_json("test/browser_train.mjs", "--url", url, "--data", train_csv, "--eval-data", held_out,
                           "--out", tmp_path / "downloads", "--lr", "5e-3", "--max-steps", "10",
                           timeout=900)  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    result = report["result"]
    assert report["foreign"] == [] and report["crossOriginIsolated"] is True
    assert result["steps"] == 10 and result["after"]["loss"] < result["before"]["loss"]
    base = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=len(AUSTEN_LABELS))
    model = peft.PeftModel.from_pretrained(base, tmp_path / "downloads").eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    texts = [row["text"] for row in rows]
    with torch.no_grad():
        host = model(**tokenizer(texts, truncation=True, max_length=128, padding=True, return_tensors="pt")).logits
    agreement = float((host.argmax(-1).numpy() == np.array(result["heldOutPredictions"])).mean())
    assert agreement >= 0.95  # 48 passages: one disagreement is 2% (the acceptance run: 99.4% of 480)
