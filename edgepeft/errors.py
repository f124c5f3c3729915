"""The exceptions edgepeft raises: one family, each naming what is wrong."""


class EdgePeftError(Exception):
    """Base class of every error edgepeft raises on purpose."""


class ExportError(EdgePeftError):
    """A model or PEFT spec cannot be compiled into a bundle."""


class BundleError(EdgePeftError):
    """A bundle directory is missing a file, is corrupted, or is not a bundle."""


class InputError(EdgePeftError, ValueError):
    """Arrays or labels handed to the runtime do not fit the bundle."""


class PromptError(InputError):
    """A prompt a causal LM cannot continue: empty, no tokens, or longer than the model's context."""


class DataError(EdgePeftError, ValueError):
    """A local data file is empty, malformed, or holds unknown labels."""


class AdapterError(EdgePeftError):
    """An adapter directory is malformed or was made for a different base model."""


class OutputError(EdgePeftError, FileExistsError):
    """An output path must not be written: it holds something else, or lies inside the input bundle."""
