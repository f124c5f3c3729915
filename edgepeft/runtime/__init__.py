"""The device runtime: numpy and ONNX Runtime's training API only. Never imports torch."""

from edgepeft.runtime.bundle import Bundle, open_bundle
from edgepeft.runtime.data import Dataset
from edgepeft.runtime.generation import Generation
from edgepeft.runtime.generation_session import GenerationSession
from edgepeft.runtime.session import EvalReport, Prediction, TrainingSession, TrainReport
from edgepeft.runtime.train_config import TrainConfig

__all__ = [
    "Bundle",
    "Dataset",
    "EvalReport",
    "Generation",
    "GenerationSession",
    "Prediction",
    "TrainConfig",
    "TrainReport",
    "TrainingSession",
    "open_bundle",
]
