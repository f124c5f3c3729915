"""edgepeft: private on-device fine-tuning (PEFT) on ONNX Runtime training.

`edgepeft.export` (host, needs torch) compiles a model into a training bundle;
`edgepeft.runtime` (device, numpy + ONNX Runtime only) trains it on local data.
"""

__version__ = "0.1.0"
