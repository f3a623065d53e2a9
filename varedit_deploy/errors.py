"""User-facing errors: what was found, what was expected, and what fixes it.

`VareditError` is for problems with the user's input, files or environment; the CLI prints
its message and exits 1 without a traceback. Bugs in our own code stay plain exceptions.
"""


class VareditError(Exception):
    """A problem the user can fix (bad input, missing files, incompatible artifacts)."""


class CheckpointError(VareditError):
    """A checkpoint is missing, unreadable, or does not match the model configuration."""


class ConfigError(VareditError):
    """An unknown model name, a malformed config file, or an inconsistent setting."""


class InputError(VareditError):
    """A bad image, instruction or option value."""


class OutputError(VareditError):
    """An output path that cannot be written, or that holds files we did not write."""


class ArtifactError(VareditError):
    """An exported artifact folder is missing files, altered, or of an unknown schema."""


class UnsafeArtifactError(ArtifactError):
    """An artifact or engine manifest (or a graph in it) names a file outside its folder, or declares an
    impossible size: refused before anything is opened, whatever its hashes say."""


class EngineError(VareditError):
    """A TensorRT engine refused a call (profile, shape, address, enqueue) or its execution context."""


def require(module: str, extra: str, package: str | None = None):
    """Import an optional dependency, or fail saying which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise missing_dependency(package or module, extra) from None


def missing_dependency(module: str, extra: str) -> VareditError:
    """The error to raise when an optional dependency is not installed."""
    return VareditError(
        f"this needs the Python package '{module}', which is not installed; "
        f'install it with: pip install "varedit-deploy[{extra}]"'
    )
