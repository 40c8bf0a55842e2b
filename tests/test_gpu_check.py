"""benchmarks/gpu_check.py --tiny: the GPU check's code runs end to end on the CPU and fills every row."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS = ['matmul', 'sampling_d16', 'sampling_d30', 'decode_d16', 'train_d16_input', 'train_d16_head', 'train_d24_input',
        'train_d24_head', 'fid_inception', 'dino', 'iscs']


def test_gpu_check_tiny_fills_every_row(tmp_path):
    out = tmp_path / 'gpu_check.json'
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', CUDA_VISIBLE_DEVICES='')
    r = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'gpu_check.py'), '--tiny', '--out', str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res['tiny'] and [row['name'] for row in res['rows']] == ROWS
    for row in res['rows']:
        assert row['ok'] and row['metrics'], row
        bad = {k: v for k, v in row['metrics'].items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)}
        assert not bad, (row['name'], bad)
    sampling = {row['name']: row['metrics'] for row in res['rows']}['sampling_d16']
    assert 0 < sampling['frac_of_matmul'] < 1.5 and sampling['gflop_per_image_guided'] > sampling['gflop_per_image']
    assert 'AID-VAR GPU check' in r.stdout  # the table
