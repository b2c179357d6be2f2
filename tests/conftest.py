import pytest
import torch

from eomt.config import get_cfg
from eomt.data import generate_synthetic_dataset


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic dataset on disk, shared by the tests that train or evaluate."""
    root = tmp_path_factory.mktemp("synthetic_shared")
    generate_synthetic_dataset(root, num_train=8, num_val=4, seed=5)
    return root


@pytest.fixture
def tiny_cfg(synthetic_root, tmp_path):
    """A config for a very small EoMT on the synthetic dataset; extra overrides as arguments."""

    def make(*overrides):
        return get_cfg(
            "configs/synthetic/eomt_tiny_panoptic.yaml",
            [
                f"dataset.root={synthetic_root}",
                f"output_dir={tmp_path / 'run'}",
                "model.backbone_kwargs={embed_dim: 32, depth: 3, num_heads: 2}",
                "input.image_size=[64, 64]",
                "model.num_queries=8",
                "loss.num_points=256",
                "solver.batch_size=4",
                "solver.batch_size_per_device=2",
                "solver.max_iter=6",
                "solver.warmup_iters=[2, 2]",
                "test.metrics=[panoptic]",
                "test.num_vis=0",
                "dataloader.num_workers=0",
                "checkpoint_period=3",
                "log_period=1",
                *overrides,
            ],
        )

    return make


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (tiny tensors: far faster than several threads on a
    busy machine), the thread count restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Interrupted(Exception):
    """Stands for a kill: raised by `die_after_logging`."""


@pytest.fixture
def die_after_logging(monkeypatch):
    """die_after_logging(trainer, iteration): train until the record of `iteration` is logged,
    then die there, as a killed process would (before any later checkpoint)."""
    from eomt.engine.trainer import Trainer

    def train(trainer, iteration: int) -> None:
        original_log = Trainer._log

        def log_then_die(self, metrics_file, record, wandb_run):
            original_log(self, metrics_file, record, wandb_run)
            if record["iteration"] == iteration:
                raise Interrupted

        monkeypatch.setattr(Trainer, "_log", log_then_die)
        with pytest.raises(Interrupted):
            trainer.train()
        monkeypatch.setattr(Trainer, "_log", original_log)

    return train


@pytest.fixture
def read_only(monkeypatch):
    """`read_only(folder)`: creating `folder` or anything in it is refused, as on a read-only
    file system (the tests run as root, whom file modes do not stop)."""
    import errno
    from pathlib import Path

    mkdir = Path.mkdir

    def make(folder: Path) -> None:
        def refuse(path, *args, **kwargs):
            if path == folder or folder in path.parents:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            mkdir(path, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", refuse)

    return make
