"""pretrain_tiny.py end to end on a few steps: all three stages (the feature network in a second process),
files the loaders accept, a manifest that describes them."""
import json
import os
import subprocess
import sys

import torch

import models
from conftest import REPO

FEW = ['--n_train', '48', '--n_val', '20', '--fn_n_train', '64', '--vae_steps', '3', '--vae_bs', '4',
       '--dead_window', '2', '--var_steps', '3', '--var_bs', '8', '--var_eval_every', '2', '--fn_steps', '3',
       '--fn_bs', '8']


def test_pretrain_all_stages_write_loadable_files(tmp_path):
    out = tmp_path / 'w'
    r = subprocess.run([sys.executable, 'pretrain_tiny.py', '--out_dir', str(out), *FEW], cwd=REPO,
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert 'training in process' in r.stdout  # the feature network ran alongside, not after
    assert '[featnet]' in (out / 'pretrain_featnet.log').read_text()
    manifest = json.loads((out / 'MANIFEST.json').read_text())
    vae, var = models.build_tiny()
    net = models.build_featnet()
    for name, model in (('vae', vae), ('var', var), ('featnet', net)):
        path = out / models.TINY_FILES[name]
        sd = models.load_state_dict_file(path)
        assert all(v.dtype in (torch.float16, torch.int64, torch.bool) for v in sd.values())  # shipped as fp16
        models.load_checked(model, sd, path, name)
        entry = manifest[models.TINY_FILES[name]]
        assert entry['steps'] == 3 and entry['size_bytes'] == path.stat().st_size and len(entry['sha256']) == 64
    assert manifest['tiny_featnet.pt']['train_images'] == 64
    # the VAR's sample grid was scored by the finished feature network, against this VAR file
    assert 0.0 <= manifest['tiny_featnet.pt']['metrics']['var_sample_acc'] <= 1.0
    assert (out / 'pretrain_samples.png').is_file() and (out / 'pretrain_vae_recon.png').is_file()
