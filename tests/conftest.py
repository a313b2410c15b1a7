"""Shared fixtures: the real MNIST files, an isolated cache, and a loopback mirror."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lenet5.data import FILES, load_mnist

REPO = Path(__file__).resolve().parents[1]
# CI and developers keep the four published files in ../shared/mnist; LENET5_TEST_DATA overrides.
MNIST_DIR = Path(os.environ.get("LENET5_TEST_DATA", REPO.parent / "shared" / "mnist"))


@pytest.fixture(scope="session", autouse=True)
def isolated_environment(tmp_path_factory):
    """Keep the user's cache and settings out of the tests, and the tests' out of the user's."""
    for name in ("LENET5_DATA", "LENET5_OFFLINE", "LENET5_MIRRORS"):
        os.environ.pop(name, None)
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    missing = [f.name for f in FILES if not (MNIST_DIR / f.name).is_file()]
    if missing:
        pytest.fail(f"the MNIST files are needed in {MNIST_DIR} (or $LENET5_TEST_DATA); missing: {missing}")
    return MNIST_DIR


@pytest.fixture(scope="session")
def mnist(mnist_dir):
    return load_mnist(mnist_dir, download=False)


@pytest.fixture(scope="session")
def served_run(mnist, tmp_path_factory) -> Path:
    """A lenet5 run trained briefly (2 passes over 20,000 images), shared by the serving tests."""
    from lenet5.train import TrainConfig, fit

    run = tmp_path_factory.mktemp("serve") / "run"
    fit(TrainConfig(model="lenet5", optimizer="adam", batch_size=64, epochs=2, train_samples=20_000,
                    test_samples=1_000), mnist, run)
    return run


@pytest.fixture(autouse=True)
def _denormals_computed_again():
    """`lenet5.cli.main` flushes denormals for the process (as a command should); tests call it
    in-process, so each test gives the default back for the next (hypothesis, for one, needs it)."""
    yield
    import torch

    torch.set_flush_denormal(False)
