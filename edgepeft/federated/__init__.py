"""Federated adapters on Flower (`pip install edgepeft[federated]`): many devices train one adapter together.

The device side (`client_app`) opens the bundle with `edgepeft.runtime` (numpy + ONNX Runtime, never torch),
trains the global adapter on the device's own data and replies only adapter tensors and metrics. The server
side (`server_app`) averages adapters with Flower's FedAvg in an ArrayRecord (optionally with Flower's
fixed-clipping DP wrappers and RDP accountant, or SecAgg+), and writes the final adapter in PEFT format.
FFA-LoRA (a bundle exported with `LoraSpec(freeze_a=True)`) makes that average exact.
"""

from edgepeft.federated.settings import FedSettings

__all__ = ["FedSettings"]
