"""Errors of running rows that the command line prints as one `error:` line (with ConfigError,
datasets.DataError, models.backbone.WeightsError and models.convert_hf.ConversionError). The stop
of a run by a signal is experiments/signals.py."""


class RunError(RuntimeError):
    """A row cannot start or go on: the message says why and what to do."""


class BatchPlanError(RunError):
    """train.total_batch_size cannot be kept with this batch size and number of processes."""


def first_names(names, first=5):
    """'a, b, c, ...': the first `first` names of a list, for messages."""
    return ", ".join(names[:first]) + (", ..." if len(names) > first else "")


def is_user_error(error):
    """True for errors whose message says everything (a configuration, a run's state, the data set,
    pretrained weights): the command line prints them as one `error:` line, without a traceback."""
    from datasets import DataError
    from models.backbone import WeightsError
    from models.convert_hf import ConversionError

    from .config import ConfigError

    return isinstance(error, (ConfigError, RunError, DataError, WeightsError, ConversionError))
