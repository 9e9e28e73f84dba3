"""Shared test fixtures and locations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5"
HYMENOPTERA = SHARED / "data" / "hymenoptera" / "train"

needs_shared_weights = pytest.mark.skipif(
    not MOBILENET_WEIGHTS.is_file(), reason=f"shared weights not found at {MOBILENET_WEIGHTS}"
)
needs_hymenoptera = pytest.mark.skipif(
    not HYMENOPTERA.is_dir(), reason=f"shared ants/bees data not found at {HYMENOPTERA}"
)


def small_input(backbone: str) -> tuple[int, int, int]:
    """The smallest input each backbone accepts: architecture tests stay cheap."""
    import tlkeras

    size = max(32, tlkeras.get_backbone(backbone).min_size)
    return (size, size, 3)


@pytest.fixture
def keras_home(tmp_path: Path) -> Path:
    """A KERAS_HOME holding the shared MobileNet(alpha=0.25) ImageNet weights under models/.

    Keras reads KERAS_HOME when it is imported, so tests pass this to a subprocess's environment.
    """
    home = tmp_path / "keras_home"
    (home / "models").mkdir(parents=True)
    os.symlink(MOBILENET_WEIGHTS, home / "models" / MOBILENET_WEIGHTS.name)
    return home
