"""The errors orlik raises on bad input or a missing tool; the CLI prints one line and exits 2."""

from __future__ import annotations


class OrlikError(Exception):
    """Base of every error that is the user's to fix. The message is one actionable line."""

    exit_code = 2


class InputError(OrlikError):
    """A file, option or value the user gave is missing, empty or malformed."""


class CheckpointError(InputError):
    """An FP16 checkpoint directory is missing files, corrupt, or of an unsupported kind."""


class ManifestError(InputError):
    """A variant.json is missing, corrupt, or does not match the files beside it."""


class UnknownNameError(InputError):
    """A name (backend, recipe, architecture, type) that is not registered."""

    def __init__(self, kind: str, name: str, valid: list[str] | tuple[str, ...]) -> None:
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        super().__init__(f"unknown {kind} {name!r}; valid: {', '.join(self.valid)}")


class MissingDependencyError(OrlikError):
    """A library or tool that this step needs is not installed; the message says how to get it."""


class ToolError(OrlikError):
    """An external tool (llama.cpp, a quantization library) failed on valid-looking input."""


class OutputError(OrlikError):
    """The output location cannot be written (permissions, full disk)."""


class NotBuiltError(OrlikError):
    """A stage of the pipeline that this version of orlik does not have yet."""
