import importlib.util
import os
import sys
from pathlib import Path

# one thread: on the 2-core CI machines, 2 OpenMP/OpenBLAS threads measured several times slower than 1
os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault('HF_HUB_OFFLINE', '1')
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FIXTURES = REPO / 'tests' / 'fixtures'  # vendored: a clone needs nothing beside it (tests/fixtures/README.md)
torch.set_num_threads(1)

# train_injector.py / sample.py flags of a quick run (tests only): random weights, a few images, no grids, no validation
FAST = ['--random_init', '--global_batch_size', '4', '--n_tiny', '64', '--sample_every', '0', '--num_workers', '0',
        '--val_n', '0']
SMALL = ['--random_init', '--cpu', '--classes', '3', '7', '--num_per_class', '2', '--batch_size', '2', '--seed', '5']


@pytest.fixture(scope='session')
def fixtures_dir():
    if not FIXTURES.is_dir():
        pytest.fail(f'fixtures not found at {FIXTURES}: they are part of the repository (restore tests/fixtures/)')
    return FIXTURES


def fixture_module(name):
    """Imports a Python file of tests/fixtures (the deterministic weight rules) by name."""
    spec = importlib.util.spec_from_file_location(name, FIXTURES / f'{name}.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
