"""Fixtures shared by the test files (constants and helpers: helpers.py, authors_helpers.py,
model_helpers.py, datasets_helpers.py)."""
import pytest

from experiments import config
from experiments.engine import train_row
from models import backbone

from .authors_helpers import TINY_BACKBONE, tiny_resnet
from .helpers import ROW, TINY_RUN


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Where a test module's synthetic data set is generated (on first use)."""
    return tmp_path_factory.mktemp("data") / "synthetic"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(results folder, data root) of a ks_def_r18 row trained for one tiny epoch."""
    results = tmp_path_factory.mktemp("results")
    data_root = tmp_path_factory.mktemp("data") / "synthetic"
    train_row("demo", ROW, TINY_RUN + [f"data.root={data_root}", "train.epochs=1", "train.lr_drop=[]"],
              results=results)
    return results, data_root


@pytest.fixture(scope="module")
def tiny_backbone():
    """Registers the authors' fixtures' backbone (authors_helpers.tiny_resnet) as a backbone choice,
    for a test module (`pytestmark = pytest.mark.usefixtures("tiny_backbone")`)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(backbone.RESNETS, TINY_BACKBONE, (tiny_resnet, None, [16, 32, 64, 128]))
        mp.setitem(config.CHOICES, "model.backbone.name", backbone.BACKBONE_NAMES + [TINY_BACKBONE])
        yield
