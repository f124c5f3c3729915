"""The host side: compile a torch model plus a PEFT spec into an on-device training bundle (needs torch)."""

from edgepeft.export.bundle import export
from edgepeft.export.factory import load_factory
from edgepeft.export.spec import ExportOptions, LoraSpec

__all__ = ["ExportOptions", "LoraSpec", "export", "load_factory"]
