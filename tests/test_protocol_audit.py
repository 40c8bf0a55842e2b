"""benchmarks/protocol_audit.py end to end on a few samples: its paired rows share labels and seeds, its FIDs are
evaluate.py's, and its sample-count row is the mean over disjoint class-balanced subsets."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import data
import iscs

from conftest import REPO


@pytest.fixture(scope='module')
def audit(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('audit')
    cmd = [sys.executable, 'benchmarks/protocol_audit.py', '--n_per_class', '4', '--n_small', '20', '--ref_n', '200',
           '--bootstrap', '20', '--seeds', '11', '12', '--out_dir', str(tmp / 'runs'), '--results', str(tmp / 'results')]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, json.loads((tmp / 'results' / 'protocol_audit.json').read_text()), r.stdout


def test_paired_rows_share_labels_and_seeds(audit):
    tmp, res, out = audit
    npz = {k: data.load_samples(f) for k, f in res['npz'].items()}
    base = npz['w0_seed11']
    for k in ('more_smooth', 'untrained_zero', 'untrained_random', 'trained_w_train'):
        assert np.array_equal(npz[k]['labels'], base['labels']) and npz[k]['meta']['seed'] == 11, k
        assert res['paired_check'][k] is True
    assert npz['more_smooth']['meta']['more_smooth'] is True and base['meta']['more_smooth'] is False
    assert npz['w0_seed12']['meta']['seed'] == 12 and 'w0_seed12' not in res['paired_check']  # the unpaired row
    # the injector that never trained (zero output layer) draws exactly the baseline's tokens; a random one does not
    assert res['untrained_zero_tokens_identical'] is True
    assert np.array_equal(npz['untrained_zero']['tokens'], base['tokens'])
    assert not np.array_equal(npz['untrained_random']['tokens'], base['tokens'])
    zero = res['rows']['untrained injector, zero output layer, w = 0.001 (paired)']
    assert zero['judge']['change'] == 0.0 and zero['judge']['ci95'] == [0.0, 0.0]
    assert '| more_smooth on vs off (w = 0, paired) |' in out


def test_fids_are_evaluate_pys(audit, tmp_path):
    """The audit's full-file FIDs on both networks equal evaluate.py's of the same file and reference."""
    tmp, res, _ = audit
    js = tmp_path / 'eval.json'
    subprocess.run([sys.executable, 'evaluate.py', res['npz']['more_smooth'], '--ref_n', '200', '--no_iscs',
                    '--cache_dir', str(tmp_path / 'cache'), '--json', str(js)], cwd=REPO, check=True, capture_output=True)
    m = json.loads(js.read_text())['results'][0]['metrics']
    assert res['fid']['judge']['more_smooth'] == pytest.approx(m['FID_judge'], rel=1e-9)
    assert res['fid']['featnet']['more_smooth'] == pytest.approx(m['FID'], rel=1e-9)


def test_sample_count_row_is_the_subset_mean(audit):
    """Two seeds x (40 samples / 20) = 4 subset FIDs, each >= 0, and the bias is mean(small) - mean(full)."""
    _, res, _ = audit
    for net in ('judge', 'featnet'):
        s = res['sample_count'][net]
        assert len(s['small']) == 4 and len(s['full']) == 2
        assert s['bias'] == pytest.approx(np.mean(s['small']) - np.mean(s['full']))
        assert s['bias'] > 0  # 20 samples in 128 dimensions: FID's small-sample bias dominates


def test_unpaired_bootstrap_is_wider_than_paired():
    """paired=False resamples each set on its own: a copy of the base gets a non-zero interval (paired: exactly 0)."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((300, 4))
    paired, = iscs.paired_fid_bootstrap([base, base.copy()], np.zeros(4), np.eye(4), 50)
    unpaired, = iscs.paired_fid_bootstrap([base, base.copy()], np.zeros(4), np.eye(4), 50, paired=False)
    assert paired['ci95'] == [0.0, 0.0]
    assert unpaired['ci95'][0] < 0 < unpaired['ci95'][1]


def test_imagenet_audit_script_parses_and_names_both_protocols():
    """The ImageNet twin is a shell script for machines with the checkpoints: it must parse, and sample under both
    protocols (VAR's 50 per class with more_smooth off, the release's 10 per class with it on)."""
    script = REPO / 'benchmarks' / 'protocol_audit_imagenet.sh'
    subprocess.run(['bash', '-n', str(script)], check=True)
    text = script.read_text()
    assert '--num_per_class 50 --seed "$SEED" --out_dir' in text
    assert '--num_per_class 10 --seed "$SEED" --more_smooth' in text
