"""Errors for data that cannot be used.

``DataError`` says that a data set cannot be used: its message names the file (and the annotation or
image id) and what was expected. It is raised when the data set is built wherever a check is cheap
enough, and otherwise (an unreadable image) when the item is loaded.

torch's DataLoader re-raises an exception of a worker process in the main process as
``exc_type(msg)``, msg being "Caught DataError in DataLoader worker process N.\\nOriginal Traceback
(most recent call last): ... <module>.DataError: <original message>". DataError recognises that form
and keeps only the original message, so the main process shows the worker's message unchanged.
"""
import re

_WRAPPED = re.compile(r"\ACaught \w+ .*?\.\nOriginal Traceback \(most recent call last\):\n", re.DOTALL)


def _unwrap(message, class_name):
    """The original message inside a DataLoader worker's re-raised message, else message unchanged."""
    if not isinstance(message, str) or not _WRAPPED.match(message):
        return message
    # The traceback ends with "<module>.<ClassName>: <message>"; with chained exceptions it holds
    # several such lines, the last one being the exception that was raised.
    last = None
    for last in re.finditer(rf"^(?:[\w.]+\.)?{re.escape(class_name)}: ", message, re.MULTILINE):
        pass
    if last is None:
        return message
    return message[last.end():].rstrip("\n")


class DataError(ValueError):
    """The data set cannot be used: the message names the file (and annotation/image id) and what
    was expected."""

    def __init__(self, *args):
        if len(args) == 1:
            args = (_unwrap(args[0], type(self).__name__),)
        super().__init__(*args)


class DataNotFoundError(DataError, FileNotFoundError):
    """A data path (root, image folder, annotation file) does not exist; the message names the path
    and the setting it came from. Also a FileNotFoundError, for callers that catch that."""
