"""pretrain_tiny.py end to end on a few steps: all four stages (the feature network in a second process),
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
       '--fn_bs', '8', '--score_n', '20', '--judge_steps', '3', '--judge_bs', '8', '--judge_n_train', '64']


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
    for name, model in (('vae', vae), ('var', var), ('featnet', net), ('judge', models.build_judge())):
        path = out / models.TINY_FILES[name]
        sd = models.load_state_dict_file(path)
        assert all(v.dtype in (torch.float16, torch.int64, torch.bool) for v in sd.values())  # shipped as fp16
        models.load_checked(model, sd, path, name)
        entry = manifest[models.TINY_FILES[name]]
        assert entry['steps'] == 3 and entry['size_bytes'] == path.stat().st_size and len(entry['sha256']) == 64
    assert manifest['tiny_featnet.pt']['train_images'] == 64
    # the VAR's samples were scored by the finished feature network, against this VAR file: the same score from the
    # shipped files here (--score_n 20 balanced labels, one batch, g_seed 1, the default cfg 1.5, no top-k / top-p;
    # the images pass through [-1, 1] as in pretrain_tiny.py). After 3 steps the network answers one class for
    # every sample, so the score is 0.1 here; the recomputation still pins which samples, labels and files it used
    metrics = manifest['tiny_featnet.pt']['metrics']
    assert metrics['var_sample_settings'] == dict(cfg=1.5, top_k=0, top_p=0.0, n=20,
                                                  g_seeds='1 + i for samples 250 i .. 250 i + 249',
                                                  var_sha256=manifest['tiny_var.pt']['sha256'])
    lab_N = torch.arange(20) % 10
    with torch.no_grad():
        vae.eval(), var.eval(), net.eval()
        img_N3HW = var.autoregressive_infer_cfg(20, lab_N, g_seed=1, cfg=1.5, top_k=0, top_p=0.0)
        pred_N = net(models.vit_normalize(net, img_N3HW.mul(2).sub(1).add(1).div(2))).argmax(-1)
    assert metrics['var_sample_acc'] == round((pred_N == lab_N).float().mean().item(), 4)
    assert (out / 'pretrain_samples.png').is_file() and (out / 'pretrain_vae_recon.png').is_file()

    # --var_init: a warm restart starts from the given VAR (at lr ~0 it ships those weights) and records its sha256;
    # a file that is not such a VAR is refused in one line, before the data is tokenised
    warm = tmp_path / 'warm'
    warm.mkdir()
    (warm / models.TINY_FILES['vae']).write_bytes((out / models.TINY_FILES['vae']).read_bytes())
    run_var = lambda init: subprocess.run(
        [sys.executable, 'pretrain_tiny.py', '--stage', 'var', '--out_dir', str(warm), *FEW, '--var_lr', '1e-9',
         '--var_init', str(init)], cwd=REPO, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'),
        timeout=600)
    r = run_var(out / models.TINY_FILES['vae'])
    assert r.returncode == 1 and 'a tiny VAR' in r.stderr and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert '[var] tokens' not in r.stdout
    r = run_var(out / models.TINY_FILES['var'])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    init, warm_sd = (models.load_state_dict_file(d / models.TINY_FILES['var']) for d in (out, warm))
    assert all(torch.allclose(init[k].float(), warm_sd[k].float(), atol=1e-3) for k in init)
    torch.manual_seed(0)  # --seed 0: what the run would have started from without --var_init
    fresh = models.build_tiny(init=True)[1].state_dict()
    assert not all(torch.allclose(init[k].float(), fresh[k], atol=1e-3) for k in init)
    entry = json.loads((warm / 'MANIFEST.json').read_text())[models.TINY_FILES['var']]
    assert entry['init_sha256'] == manifest[models.TINY_FILES['var']]['sha256']


# What a resume checkpoint holds, in order: a run started by one version of pretrain_tiny.py is continued by the next
# (a long pretraining run spans sessions), so these keys are a file format
RESUME_KEYS = dict(vae=['stage', 'step', 'rng', 'model', 'opt', 'gen', 'hits_V', 'wall'],
                   var=['stage', 'step', 'rng', 'model', 'opt', 'ema', 'vae_sha256', 'wall', 'ema_loss', 'ema_acc'],
                   featnet=['stage', 'step', 'rng', 'model', 'opt', 'gen', 'wall', 'ema_loss'],
                   done=['stage', 'done', 'sha256'])


def test_resume_is_bit_identical(tmp_path):
    """A run stopped mid-stage (mid-VQ-VAE, mid-VAR, right at the VAR's last step, mid-feature network) and
    continued with --resume ends with exactly the weights of an uninterrupted run; finished stages are not
    retrained. The checkpoints hold RESUME_KEYS. A finished stage whose file changed is refused."""
    run = lambda out, *extra: subprocess.run(
        [sys.executable, 'pretrain_tiny.py', '--out_dir', str(out), '--serial', '--var_ema', '0.9', *FEW, *extra],
        cwd=REPO, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=600)
    r = run(tmp_path / 'a')
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    logs, keys = [], lambda stage: list(torch.load(tmp_path / 'b' / f'resume_{stage}.pt', weights_only=True))
    # vae 0-2 | vae 2-3, var 0-1 | var 1-3 (stops after its last step) | featnet 0-1 | featnet 1-3
    sessions = (['--stop_after', '2'], ['--resume', '--stop_after', '2'], ['--resume', '--stop_after', '2'],
                ['--resume', '--stop_after', '1'], ['--resume'])
    for i, extra in enumerate(sessions):
        r = run(tmp_path / 'b', *extra)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        logs.append(r.stdout)
        if i == 0:
            assert keys('vae') == RESUME_KEYS['vae']
        if i == 1:
            assert keys('vae') == RESUME_KEYS['done'] and keys('var') == RESUME_KEYS['var']
            assert (tmp_path / 'b' / 'resume_var_tokens.pt').is_file()
        if i == 3:
            assert keys('var') == RESUME_KEYS['done'] and keys('featnet') == RESUME_KEYS['featnet']
    assert 'stopped at step 2' in logs[0] and '[vae] resuming at step 2' in logs[1]
    assert '[var] resuming at step 1' in logs[2] and 'stopped at step 3' in logs[2]
    assert '[var] tokens from' in logs[2] and '[var] tokens from' not in logs[1]
    assert not (tmp_path / 'b' / 'resume_var_tokens.pt').exists()  # removed once the VAR shipped
    assert '[var] resuming at step 3' in logs[3] and '[vae] finished in an earlier session' in logs[3]
    assert '[featnet] resuming at step 1' in logs[4] and '[var] finished in an earlier session' in logs[4]
    assert keys('featnet') == RESUME_KEYS['done']
    for name in ('vae', 'var', 'featnet'):
        sd_a, sd_b = (models.load_state_dict_file(d / models.TINY_FILES[name]) for d in (tmp_path / 'a', tmp_path / 'b'))
        assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a), name
    # a finished stage whose file changed afterwards is refused in one line, not retrained over it
    (tmp_path / 'b' / models.TINY_FILES['vae']).write_bytes((tmp_path / 'a' / models.TINY_FILES['var']).read_bytes())
    r = run(tmp_path / 'b', '--resume')
    assert r.returncode == 1 and 'changed since' in r.stderr and 'Traceback' not in r.stderr, r.stderr[-2000:]
    man_a, man_b = (json.loads((d / 'MANIFEST.json').read_text()) for d in (tmp_path / 'a', tmp_path / 'b'))
    for f in ('tiny_vae.pt', 'tiny_var.pt', 'tiny_featnet.pt'):
        assert man_a[f]['metrics'] == man_b[f]['metrics']
        assert man_a[f]['command'].replace(str(tmp_path / 'a'), '') == man_b[f]['command'].replace(str(tmp_path / 'b'), '')


def test_judge_stage_ships_only_when_asked_and_never_writes_into_weights(tmp_path):
    """The shipped folder is never a run folder; --ship copies the run's files and MANIFEST entries into it."""
    env = dict(os.environ, OMP_NUM_THREADS='1', AIDVAR_TINY_DIR=str(tmp_path / 'shipped'))
    (tmp_path / 'shipped').mkdir()
    (tmp_path / 'shipped' / 'MANIFEST.json').write_text('{"tiny_var.pt": {"sha256": "kept"}}\n')
    cmd = [sys.executable, 'pretrain_tiny.py', '--stage', 'judge', '--n_val', '20', '--judge_n_train', '64',
           '--judge_steps', '2', '--judge_bs', '8']
    r = subprocess.run(cmd + ['--out_dir', str(tmp_path / 'shipped')], cwd=REPO, capture_output=True, text=True, env=env)
    assert r.returncode != 0 and 'folder of the shipped tiny models' in r.stderr and 'Traceback' not in r.stderr
    assert sorted(p.name for p in (tmp_path / 'shipped').iterdir()) == ['MANIFEST.json']
    r = subprocess.run(cmd + ['--out_dir', str(tmp_path / 'run')], cwd=REPO, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (tmp_path / 'shipped' / 'tiny_judge.pt').exists()  # not asked to ship
    r = subprocess.run(cmd + ['--out_dir', str(tmp_path / 'run2'), '--ship'], cwd=REPO, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    shipped = json.loads((tmp_path / 'shipped' / 'MANIFEST.json').read_text())
    assert shipped['tiny_var.pt'] == {'sha256': 'kept'}  # the other entries stay
    assert shipped['tiny_judge.pt']['sha256'] == json.loads((tmp_path / 'run2' / 'MANIFEST.json').read_text())['tiny_judge.pt']['sha256']
    assert (tmp_path / 'shipped' / 'tiny_judge.pt').read_bytes() == (tmp_path / 'run2' / 'tiny_judge.pt').read_bytes()
    models.load_checked(models.build_judge(), models.load_state_dict_file(tmp_path / 'shipped' / 'tiny_judge.pt'), 'j', 'judge')
