import os

import pytest
import torch

os.environ.setdefault("DMDCTL_QUIET", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def toy_teacher(tmp_path_factory) -> str:
    """A briefly trained toy2d teacher file (a few seconds; good enough to exercise the code)."""
    from dmdctl.train_teacher import TrainTeacherConfig, train_teacher

    out = tmp_path_factory.mktemp("teacher")
    train_teacher(TrainTeacherConfig(out=str(out), steps=300, batch_size=256))
    return str(out / "teacher.safetensors")


@pytest.fixture(scope="session")
def toy_pairs(toy_teacher, tmp_path_factory) -> str:
    from dmdctl.make_pairs import MakePairsConfig, make_pairs

    out = tmp_path_factory.mktemp("pairs")
    make_pairs(
        MakePairsConfig(
            teacher_path=toy_teacher, out=str(out), num_pairs=256, shard_size=64, steps=8
        )
    )
    return str(out)
