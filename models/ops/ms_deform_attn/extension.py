"""Lazy loading of the compiled CUDA extension (`_C`, built by `build.py`).

Nothing is imported until the op first needs it, and any failure (not built, built against
another torch or CUDA, missing libcudart) is recorded rather than raised: callers fall back to
the PyTorch path.
"""
import importlib
import importlib.util
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
EXTENSION_NAME = "_C"
BUILD_COMMAND = "python -m models.ops.ms_deform_attn.build"

_extension = None
_load_error = None
_tried = False


def get_extension():
    """The extension module, or None when it cannot be loaded (see `extension_load_error`)."""
    global _extension, _load_error, _tried
    if not _tried:
        _tried = True
        try:
            _extension = importlib.import_module(f"{__package__}.{EXTENSION_NAME}")
        except Exception as exc:  # noqa: BLE001 - ImportError, OSError (undefined symbol, missing library), ...
            _load_error = f"{type(exc).__name__}: {exc}"
    return _extension


def extension_available():
    """True when the compiled CUDA extension is loaded (loading it on first call)."""
    return get_extension() is not None


def extension_load_error():
    """Why the extension could not be loaded, or None."""
    get_extension()
    return _load_error


def load_extension_from(path):
    """Load the extension from a specific shared library (e.g. built with `build --out-dir`) and
    use it from now on. Raises when it cannot be loaded."""
    global _extension, _load_error, _tried
    # The module name must end in EXTENSION_NAME: Python looks up PyInit_<last component>.
    spec = importlib.util.spec_from_file_location(f"{__package__}.{EXTENSION_NAME}", path)
    if spec is None:
        raise ImportError(f"not a loadable extension: {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _extension, _load_error, _tried = module, None, True
    return module
