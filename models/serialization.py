"""Reading PyTorch files without running code: the one place where this project calls torch.load.

`torch.load(..., weights_only=True)` rebuilds only tensors and plain data (dicts, lists, numbers,
strings, ...) and stops at the first other global a pickle names, before anything is called. This
module turns its errors into one line that names the file: refused (with the global it needed) or
unreadable (truncated, damaged, not a PyTorch file). content_checksum is the digest that the files
this project writes carry under CHECKSUM, verified when they are read."""
import hashlib
import io
import pickle
import re
import warnings
from pathlib import Path

import torch


class UnreadableFile(ValueError):
    """A file that load_plain cannot or will not read; `refused` is the global its pickle needs when it
    was refused for that (nothing was used), else None."""

    def __init__(self, message, refused=None):
        super().__init__(message)
        self.refused = refused


def load_plain(path, file=None):
    """The object in the PyTorch file at `path` (or in `file`, that file already open, or its bytes),
    on the CPU, rebuilt from tensors and plain data only. UnreadableFile names the file and why
    otherwise."""
    source = io.BytesIO(file) if isinstance(file, (bytes, bytearray)) else file if file is not None else Path(path)
    try:
        with warnings.catch_warnings():  # e.g. torch's note on a plain pickle: the error line says it all
            warnings.simplefilter("ignore")
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch names the global as "GLOBAL module.name" ("Unsupported global: GLOBAL x.y ...")
        named = re.search(r"GLOBAL ([\w.]+)", str(e))
        if named:
            raise UnreadableFile(f"{path} is refused: its pickle needs {named.group(1)}, and this project only reads "
                                 f"files of tensors and plain data (nothing of the file was used)",
                                 named.group(1)) from None
        why = next((line.strip() for line in str(e).splitlines()[1:] if line.strip() and "WeightsUnpickler" not in line
                    and not line.startswith(("Please file", "Check the documentation"))), "")
        raise UnreadableFile(f"{path} cannot be read ({why or 'not a pickle of tensors and plain data'}); it is "
                             f"truncated, damaged or not a PyTorch file") from None
    except Exception as e:  # noqa: BLE001 - a truncated zip, bad headers, ...: all mean an unusable file
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UnreadableFile(f"{path} cannot be read ({type(e).__name__}: {first}); it is truncated, damaged or "
                             f"not a PyTorch file") from None


CHECKSUM = "checksum"  # the state's key holding content_checksum() of the rest


def content_checksum(state):
    """'sha256:<hex>' over a checkpoint state's contents, in order: every key, every tensor's dtype,
    shape and bytes, every other value's repr. Equal for a state and the same state read back from
    its file; any changed byte of a tensor or value changes it. The CHECKSUM key itself is left out."""
    digest = hashlib.sha256()

    def visit(value):
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
        elif isinstance(value, dict):
            items = [(k, v) for k, v in value.items() if not (value is state and k == CHECKSUM)]
            digest.update(f"{type(value).__name__} {len(items)}{{".encode())
            for k, v in items:
                digest.update(f"{k!r}:".encode())
                visit(v)
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(f"{type(value).__name__} {len(value)}[".encode())
            for v in value:
                visit(v)
            digest.update(b"]")
        else:
            digest.update(f"{type(value).__name__} {value!r};".encode())

    visit(state)
    return "sha256:" + digest.hexdigest()


def checksum_problem(state, before_checksums, kind):
    """Why the dict `state`, read from a file of `kind` (e.g. "pretrained trunk"), is damaged, or None:
    its CHECKSUM does not match its contents, or it has none (a file written before checksums) but holds
    a key outside `before_checksums`, the keys of those files: so a damaged key name is no way round."""
    recorded = state.get(CHECKSUM)
    if recorded is None:
        unknown = set(state) - set(before_checksums)
        return f"it has no checksum, and keys no {kind} has ({', '.join(sorted(map(str, unknown)))})" if unknown else None
    if recorded != content_checksum(state):
        return "its contents do not match the checksum recorded when it was written"
    return None
