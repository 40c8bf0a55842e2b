import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault('HF_HUB_OFFLINE', '1')
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FIXTURES = REPO.parent / 'shared' / 'fixtures'
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope='session')
def fixtures_dir():
    if not FIXTURES.is_dir():
        pytest.fail(f'fixtures not found at {FIXTURES}: the shared/ folder must sit beside the repo')
    return FIXTURES
