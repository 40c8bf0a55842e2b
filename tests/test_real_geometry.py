"""The real-model path end to end on a small debug setup: one train_injector.py step at depth 16 (VAR-d16 geometry,
random weights, DINO ViT-S/16 geometry) on a generated ImageNet-style folder of 6 JPEGs, batch 1, the paper's
defaults (soft reals with their temperature calibration on the few images there are). About 40-80 s on one core."""
import json
import math
import os
import subprocess
import sys

import numpy as np
from PIL import Image

import checkpoints
from conftest import REPO


def test_one_depth16_step_on_a_small_jpeg_folder(tmp_path):
    rng = np.random.default_rng(0)
    for wnid in ('n01440764', 'n01443537'):
        (tmp_path / 'inet' / 'train' / wnid).mkdir(parents=True)
        for i in range(3):  # odd sizes: the official resize + crop must handle them
            Image.fromarray(rng.integers(0, 255, (300 + 7 * i, 280, 3), dtype=np.uint8)).save(
                tmp_path / 'inet' / 'train' / wnid / f'{i}.JPEG')
    out = tmp_path / 'run'
    cmd = [sys.executable, 'train_injector.py', '--depth', '16', '--random_init', '--data_path', str(tmp_path / 'inet'),
           '--global_batch_size', '1', '--max_steps', '1', '--val_n', '0', '--sample_every', '0', '--num_workers', '0',
           '--out_dir', str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1'))
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'matching the soft reals\' temperatures to the VAR on 6 training images' in r.stdout
    rows = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    assert [row['step'] for row in rows] == [1]
    assert all(math.isfinite(rows[0][k]) for k in ('loss_D', 'loss_adv', 'loss_CE'))
    meta = checkpoints.read_injector_meta(out / 'injector.safetensors')
    assert meta['depth'] == 16 and meta['w_train'] == 0.001 and meta['embed_dim'] == 1024
    assert len(meta['patch_nums']) == 10 and len(meta['var_sha256']) == 64
