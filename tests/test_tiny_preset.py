"""The SHIPPED tiny preset (weights/, made by pretrain_tiny.py) is usable: it loads, is small, and its
models do their jobs on fresh shapes (seeds never used in training: pretrain_tiny.py trains on seed 0 and
validates on seed 1).

Thresholds are the values measured on the shipped files (see weights/MANIFEST.json) with a margin;
retraining with `python pretrain_tiny.py` should pass them too.
"""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoints
import data
import models
from data import make_shapes

FRESH_SEED = 123
# measured on the shipped files -> threshold, with a margin (guards against a broken or regressed file).
MAX_VAE_MSE = 0.012           # measured 0.0068 (images in [-1, 1]; the first shipped VQ-VAE: 0.049)
MIN_FEATNET_ACC = 0.95        # measured 1.00 on these 200 shapes (chance 0.10; the first shipped featnet: 0.93)
MIN_SAMPLE_ACC = 0.5          # measured 0.75 on these 20 samples (chance 0.10; v2: 0.65; the first shipped VAR: 0.35)
MIN_TOKEN_ACC_FIRST = 0.15    # measured 0.20 (the palette has ~50 background colours for 1 token)
MIN_TOKEN_ACC_LAST = 0.28     # measured 0.38 (v2: 0.37; the first shipped VAR: 0.19)
# sampling settings of the test: CFG 5 with top-k / top-p, the most class-faithful of those tried on the first VAR
CFG, TOP_K, TOP_P = 5.0, 20, 0.9


@pytest.fixture(scope='module')
def tiny():
    vae, var = checkpoints.load_tiny()
    return vae, var


@pytest.fixture(scope='module')
def featnet():
    return checkpoints.load_eval_net('featnet')


@pytest.fixture(scope='module')
def fresh():
    img_NHW3, lab_N = make_shapes(200, FRESH_SEED)
    x_B3HW = data.to_signed(torch.from_numpy(img_NHW3))
    return x_B3HW, torch.from_numpy(lab_N)


def classify(net, x_B3HW):
    """[-1, 1] images -> predicted class (the featnet expects [0, 1] normalised with its pretrained_cfg)."""
    with torch.no_grad():
        return net(models.vit_normalize(net, x_B3HW.add(1).div(2))).argmax(-1)


def test_shipped_files_load_and_are_small(tiny, featnet):
    vae, var = tiny
    assert var.vae is vae
    assert not any(p.requires_grad for m in (vae, var, featnet) for p in m.parameters())
    sizes = {n: (checkpoints.TINY_DIR / checkpoints.TINY_FILES[n]).stat().st_size for n in ('vae', 'var', 'featnet')}
    assert sum(sizes.values()) < 20e6, sizes
    assert (checkpoints.TINY_DIR / 'MANIFEST.json').is_file()


def test_committed_weights_match_their_manifest():
    """Every file weights/MANIFEST.json lists is there, with its recorded size and sha256 (a truncated or swapped file fails)."""
    folder = checkpoints.REPO_DIR / 'weights'
    manifest = json.loads((folder / 'MANIFEST.json').read_text())
    assert manifest
    for name, entry in manifest.items():
        path = folder / name
        assert path.stat().st_size == entry['size_bytes'], name
        assert data.sha256_file(path).hexdigest() == entry['sha256'], name


def test_vae_reconstructs_fresh_shapes(tiny, fresh):
    vae, _ = tiny
    x_B3HW = fresh[0][:64]
    with torch.no_grad():
        rec_B3HW = vae.img_to_reconstructed_img(x_B3HW, last_one=True)
    mse = F.mse_loss(rec_B3HW, x_B3HW).item()
    assert mse < MAX_VAE_MSE, f'VQ-VAE reconstruction MSE {mse:.4f} >= {MAX_VAE_MSE}'


def test_featnet_classifies_fresh_shapes(featnet, fresh):
    x_B3HW, lab_B = fresh
    acc = (classify(featnet, x_B3HW) == lab_B).float().mean().item()
    assert acc > MIN_FEATNET_ACC, f'feature network accuracy {acc:.3f} <= {MIN_FEATNET_ACC}'


def test_var_samples_are_recognisable(tiny, featnet):
    _, var = tiny
    lab_B = torch.arange(10).repeat_interleave(2)
    img_B3HW = var.autoregressive_infer_cfg(len(lab_B), lab_B, g_seed=0, cfg=CFG, top_k=TOP_K, top_p=TOP_P)
    assert img_B3HW.shape == (20, 3, 32, 32)
    acc = (classify(featnet, img_B3HW.mul(2).sub(1)) == lab_B).float().mean().item()
    assert acc > MIN_SAMPLE_ACC, f'only {acc:.2f} of the VAR samples are classified as their label (chance 0.10)'


def test_var_teacher_forced_token_accuracy(tiny, fresh):
    vae, var = tiny
    x_B3HW, lab_B = fresh[0][:64], fresh[1][:64]
    with torch.no_grad():
        idx_ls = vae.img_to_idxBl(x_B3HW)
        logits_BLV = var(lab_B, vae.quantize.idxBl_to_var_input(idx_ls))
    hit_BL = logits_BLV.argmax(-1) == torch.cat(idx_ls, dim=1)
    (b0, e0), (bl, el) = var.begin_ends[0], var.begin_ends[-1]
    acc_first, acc_last = hit_BL[:, b0:e0].float().mean().item(), hit_BL[:, bl:el].float().mean().item()
    assert acc_first > MIN_TOKEN_ACC_FIRST, f'scale-0 token accuracy {acc_first:.3f}'
    assert acc_last > MIN_TOKEN_ACC_LAST, f'last-scale token accuracy {acc_last:.3f}'


def test_readme_quick_start_uses_the_shipped_injector_and_repeats_its_verdict(tmp_path):
    """`python sample.py --w 0 0.1` (the README's quick start, fewer samples): the shipped injector is loaded, its
    training-time verdict is printed in one line, and the guided samples differ from the baseline's."""
    import subprocess
    import sys
    from conftest import REPO
    r = subprocess.run([sys.executable, 'sample.py', '--w', '0', '0.1', '--num_per_class', '2', '--out_dir', str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    val = checkpoints.read_injector_meta(checkpoints.TINY_DIR / checkpoints.TINY_FILES['injector'])['validation']
    lines = [l for l in (r.stdout + r.stderr).splitlines() if 'validation' in l]
    assert len(lines) == 1 and f'{val["FID_w0"]:.2f} -> {val["rows"][0]["FID"]:.2f}' in lines[0]
    assert ('did NOT help' in lines[0]) == (val['verdict'] != 'helps')
    base, guided = (data.load_samples(tmp_path / f'samples_w{w}.npz')['images'] for w in ('0', '0.1'))
    assert base.shape == guided.shape == (20, 32, 32, 3) and not np.array_equal(base, guided)
