"""AID-VAR training (train_injector.py) on small random models: gradients, frozen parts, resume, DDP, failures."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import checkpoints
import data
import models
import soft_decode
import train_injector as ti
from conftest import FAST, REPO


@pytest.fixture(scope='module')
def parts():
    vae, var, D, G = ti.build_everything(*ti.resolve_args(FAST), 'cpu')
    torch.manual_seed(0)
    img = data.to_signed(torch.from_numpy(data.make_shapes(8, seed=5)[0]))
    labels = torch.arange(8) % 10
    with torch.no_grad():
        idx = vae.img_to_idxBl(img)
    return vae, var, D, G, idx, labels


@pytest.mark.parametrize('inject', ['input', 'head'])
def test_untrained_injector_is_bit_identical(parts, inject):
    vae, var, D, G, idx, labels = parts
    with torch.no_grad():
        plain = var(labels, vae.quantize.idxBl_to_var_input(idx))
        guided, g, _ = ti.guided_logits(var, G, labels, idx, w=1.0, inject=inject)
    assert torch.equal(g, torch.zeros_like(g))
    assert torch.equal(plain, guided)


@pytest.mark.parametrize('inject', ['input', 'head'])
@pytest.mark.parametrize('decode', soft_decode.MODES)
def test_adversarial_loss_alone_trains_the_injector(parts, inject, decode):
    """lambda_rec = 0: -D(fake) must reach the injector through the soft decode, finitely, and move it."""
    vae, var, D, G0, idx, labels = parts
    G = models.GuidanceInjector(var.C, var.patch_nums)
    G.load_state_dict(G0.state_dict())
    torch.manual_seed(1)
    logits, _, _ = ti.guided_logits(var, G, labels, idx, w=0.5, inject=inject)
    fake, real, labs = soft_decode.disc_images(var, logits, idx, idx, labels, torch.randint(1, len(var.patch_nums), (8,)), decode, 1.0)
    D.requires_grad_(False)
    loss_adv = -D(fake, labs).mean()
    loss_adv.backward()
    D.requires_grad_(True)
    grads = [p.grad for p in G.parameters() if p.grad is not None]
    total = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    assert grads and torch.isfinite(total) and total > 0, (inject, decode, total)
    before = [p.detach().clone() for p in G.parameters()]
    torch.optim.AdamW(G.parameters(), lr=1e-3).step()
    assert any(not torch.equal(b, p) for b, p in zip(before, G.parameters()))


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_only_injector_and_heads_change(tmp_path):
    vae0, var0, D0, G0 = ti.build_everything(*ti.resolve_args(FAST), 'cpu')
    out = ti.main(FAST + ['--max_steps', '3', '--r1_gamma', '0.2', '--r1_every', '2', '--sample_every', '3', '--out_dir', str(tmp_path)])
    for name, before in (('vae', vae0), ('var', var0)):
        after = out[name].state_dict()
        assert all(torch.equal(v, after[k]) for k, v in before.state_dict().items()), name
    bb = out['D'].backbone.state_dict()
    assert all(torch.equal(v, bb[k]) for k, v in D0.backbone.state_dict().items())
    heads = out['D'].heads_state_dict()
    assert any(not torch.equal(v, heads[k]) for k, v in D0.heads_state_dict().items())
    assert any(not torch.equal(v, out['injector'].state_dict()[k]) for k, v in G0.state_dict().items())
    logs = [json.loads(l) for l in (tmp_path / 'log.jsonl').read_text().splitlines()]
    assert [r['step'] for r in logs] == [1, 2, 3]
    for key in ('loss_D', 'loss_adv', 'loss_CE', 'acc_real', 'acc_fake', 'grad_norm_G', 'grad_norm_D', 'img_per_s'):
        assert all(key in r for r in logs), key
    assert len(logs[0]['g_norm_per_scale']) == 5
    assert (tmp_path / 'grid_step000003.png').is_file()


def _losses(path):
    return [{k: v for k, v in json.loads(l).items() if k != 'img_per_s'} for l in path.read_text().splitlines()]


def test_resume_is_exact(tmp_path):
    common = FAST + ['--r1_gamma', '0.2', '--r1_every', '2', '--ckpt_every', '2', '--context', 'rollout']
    ti.main(common + ['--max_steps', '4', '--out_dir', str(tmp_path / 'a')])
    ti.main(common + ['--max_steps', '2', '--out_dir', str(tmp_path / 'b')])
    ti.main(common + ['--max_steps', '4', '--out_dir', str(tmp_path / 'b'), '--resume', 'auto'])
    assert _losses(tmp_path / 'a' / 'log.jsonl') == _losses(tmp_path / 'b' / 'log.jsonl')
    a = torch.load(tmp_path / 'a' / 'last.pt', weights_only=False)
    b = torch.load(tmp_path / 'b' / 'last.pt', weights_only=False)
    assert a['step'] == b['step'] == 4
    for part in ('injector', 'disc_heads'):
        assert all(torch.equal(v, b[part][k]) for k, v in a[part].items()), part
    inj, meta = checkpoints.load_injector(tmp_path / 'b' / 'injector.safetensors', ti.build_everything(*ti.resolve_args(FAST), 'cpu')[1])
    assert meta['inject'] == 'input' and meta['step'] == 4 and meta['w_train'] == models.PRESETS['tiny']['w_train']


def test_nan_loss_stops_with_the_step_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    calls = {'n': 0}
    guided = ti.guided_logits

    def poisoned(*a, **kw):  # the second step's guided logits are NaN (teacher context: one call per step)
        calls['n'] += 1
        logits, g, cond = guided(*a, **kw)
        bad = calls['n'] == 2
        return (logits * float('nan') if bad else logits), g, (cond * float('nan') if bad else cond)
    monkeypatch.setattr(ti, 'guided_logits', poisoned)
    with pytest.raises(SystemExit) as e:
        ti.main(FAST + ['--max_steps', '5', '--ckpt_every', '1', '--context', 'teacher', '--out_dir', str(tmp_path)])
    msg = str(e.value)
    assert 'step 2' in msg and 'loss_D = nan' in msg and 'last.pt (step 1)' in msg
    ck = torch.load(tmp_path / 'last.pt', weights_only=False)
    assert ck['step'] == 1 and all(torch.isfinite(v).all() for v in ck['injector'].values())


def test_missing_or_empty_data_path(tmp_path):
    with pytest.raises(SystemExit, match='ImageNet not found'):
        ti.main(['--depth', '16', '--data_path', str(tmp_path / 'nope')])
    (tmp_path / 'train').mkdir()
    with pytest.raises(SystemExit, match='no class subfolders'):
        ti.main(['--depth', '16', '--data_path', str(tmp_path)])


# train_injector.main run under accelerate, then every rank saves the weights it ended with (only rank 0 writes
# last.pt and the injector file): the test compares the ranks itself instead of trusting the run's own checksum check
RANK_DUMP = """import os, sys
import torch
sys.path.insert(0, {repo!r})
import train_injector
out = train_injector.main(sys.argv[1:])
torch.save(dict(injector=out['injector'].state_dict(), disc_heads=out['D'].heads_state_dict()),
           os.path.join({out!r}, 'rank%s.pt' % os.environ['RANK']))
"""


def test_accelerate_two_processes_agree(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1')
    out = tmp_path / 'run'
    script = tmp_path / 'run_and_dump.py'
    script.write_text(RANK_DUMP.format(repo=str(REPO), out=str(out)))
    # on CPU, accelerate's --cpu launcher needs MPI for several processes; --multi_gpu uses torchrun, which works
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
           '--mixed_precision', 'no', '--dynamo_backend', 'no', str(script),
           *FAST, '--max_steps', '2', '--ckpt_every', '2', '--out_dir', str(out)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(out / 'last.pt', weights_only=False)
    assert ck['world'] == 2 and ck['step'] == 2
    assert len((out / 'log.jsonl').read_text().splitlines()) == 2
    ranks = [torch.load(out / f'rank{i}.pt', weights_only=True) for i in (0, 1)]
    _, _, D0, G0 = ti.build_everything(*ti.resolve_args(FAST), 'cpu')  # the weights every rank started from
    for part, init in (('injector', G0.state_dict()), ('disc_heads', D0.heads_state_dict())):
        a, b, saved = ranks[0][part], ranks[1][part], ck[part]
        assert a.keys() == b.keys() == saved.keys() == init.keys(), part
        assert all(torch.equal(a[k], b[k]) for k in a), part  # the two ranks hold the same weights...
        assert all(torch.equal(a[k], saved[k]) for k in a), part  # ...which are the checkpoint's
        assert any(not torch.equal(a[k], init[k]) for k in a), part  # and they trained: agreeing is not trivial
    assert ranks[0]['injector']['proj_out.weight'].abs().sum() > 0  # zero at init


@pytest.mark.parametrize('space', ['rgb', 'latent'])
def test_disc_probe_logs_every_scale_and_saves_heads(tmp_path, space):
    import csv
    import train_disc_probe
    train_disc_probe.main(['--random_init', '--space', space, '--steps', '2', '--batch_size', '4', '--n_tiny', '64',
                           '--out_dir', str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / f'probe_{space}.csv')))
    assert [(int(r['step']), int(r['scale'])) for r in rows] == [(s, k) for s in (1, 2) for k in range(6)]
    assert all(0 <= float(r['acc_real']) <= 1 and 0 <= float(r['acc_fake']) <= 1 for r in rows)
    assert (tmp_path / f'probe_{space}.png').is_file()
    heads = tmp_path / f'disc_heads_{space}.pt'
    if space == 'rgb':  # usable as train_injector.py --disc_ckpt
        out = ti.main(FAST + ['--max_steps', '1', '--disc_ckpt', str(heads), '--out_dir', str(tmp_path / 'inj'), '--r1_gamma', '0'])
        assert out['injector'] is not None
        with pytest.raises(SystemExit, match='holds heads with --disc_norm none'):  # heads with norms differ
            ti.main(FAST + ['--max_steps', '1', '--disc_ckpt', str(heads), '--disc_norm', 'bn', '--out_dir', str(tmp_path / 'inj2')])
    else:
        with pytest.raises(SystemExit, match='latent-space heads'):
            ti.main(FAST + ['--max_steps', '1', '--disc_ckpt', str(heads), '--out_dir', str(tmp_path / 'inj')])


@pytest.mark.parametrize('where', ['teacher', 'sampler'])
def test_small_guidance_survives_bf16_autocast(parts, where):
    """w * g at w = 0.001 reaches the first VAR block with <= 1% relative error under bf16 autocast."""
    vae, var, D, G, idx, labels = parts
    w, B = 0.001, labels.shape[0]
    torch.manual_seed(3)
    g_BLC = torch.randn(B, var.L, var.C)
    g_BLC[:, :var.first_l] = 0
    seen = []
    hook = var.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double()))
    try:
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
            if where == 'teacher':
                x_BLCv = vae.quantize.idxBl_to_var_input(idx)
                var.forward_hidden(labels, x_BLCv)
                var.forward_hidden(labels, x_BLCv, input_add_BLC=w * g_BLC.bfloat16())
                got, want = seen[1] - seen[0], w * g_BLC.bfloat16().double()
            else:  # scale 1 of the KV-cached sampler; the hook returns bf16, as an injector under autocast does
                g1 = g_BLC[:, slice(*var.begin_ends[1])].bfloat16()
                for hook_fn in (None, lambda si, prev: g1 if si == 1 else None):
                    var.autoregressive_infer_cfg(B, labels, g_seed=0, cfg=1.5, guidance_hook=hook_fn, guidance_w=w)
                n1 = len(seen) // 2  # the same number of block calls per run; scale 1 is the second call
                got, want = (seen[n1 + 1] - seen[1])[:B], w * g1.double()
    finally:
        hook.remove()
    rel = ((got - want).norm() / want.norm()).item()
    assert rel <= 0.01, rel


def test_training_ends_with_a_verdict_in_the_run_folder_and_the_injector(tmp_path, capsys):
    """--val_at ckpt: a verdict at every checkpoint, the last one in injector.safetensors' metadata, the best kept; the
    lower-variance estimator, several draws and CFG fakes run through the same step."""
    ti.main(FAST + ['--max_steps', '2', '--ckpt_every', '1', '--val_n', '20', '--val_at', 'ckpt', '--decode', 'rao',
                    '--g_draws', '2', '--fake_cfg', '1.5', '--out_dir', str(tmp_path)])
    out = capsys.readouterr().out + capsys.readouterr().err
    val = json.loads((tmp_path / 'validation.json').read_text())
    assert [v['step'] for v in val['history']] == [1, 2] and val['last']['step'] == 2
    meta = checkpoints.read_injector_meta(tmp_path / 'injector.safetensors')
    assert meta['validation'] == val['last'] and meta['g_draws'] == 2 and meta['fake_cfg'] == 1.5
    assert meta['validation']['verdict'] in ('helps', 'harms', 'no measurable effect')
    best = checkpoints.read_injector_meta(tmp_path / 'injector_best.safetensors')['validation']
    assert best['step'] == val['best_step'] and 'best validated weights' in out
    rows = [json.loads(l) for l in (tmp_path / 'log.jsonl').read_text().splitlines()]
    assert all(math.isfinite(r['loss_adv']) and math.isfinite(r['loss_D']) for r in rows)


def test_bad_estimator_and_validation_flags_are_one_line(tmp_path):
    for bad, what in ((['--g_draws', '0'], '--g_draws'), (['--val_n', '5', '--val_net', 'inception'], 'does not fit')):
        with pytest.raises(SystemExit, match=what):
            ti.main(FAST + ['--max_steps', '1', '--out_dir', str(tmp_path), *bad])
    with pytest.raises(SystemExit, match='needs --val_ref'):
        ti.resolve_args(['--depth', '16', '--val_n', '10'])


def test_config_json_repeats_a_run_and_given_flags_win(tmp_path):
    """--config runs/x/config.json: the run's own flags (here non-defaults: rollout context, R1) come back, so the repeat
    logs the same losses; a flag given on the command line wins; a file that is no config is one line."""
    ti.main(FAST + ['--max_steps', '2', '--context', 'rollout', '--r1_gamma', '0.2', '--r1_every', '1',
                    '--out_dir', str(tmp_path / 'a')])
    cfg = str(tmp_path / 'a' / 'config.json')
    ti.main(['--config', cfg, '--out_dir', str(tmp_path / 'b')])
    assert _losses(tmp_path / 'a' / 'log.jsonl') == _losses(tmp_path / 'b' / 'log.jsonl')
    args, _ = ti.resolve_args(['--config', cfg, '--out_dir', str(tmp_path / 'c'), '--lr_g', '0.5'])
    assert args.lr_g == 0.5 and args.context == 'rollout' and args.r1_gamma == 0.2 and args.max_steps == 2
    (tmp_path / 'x.json').write_text('{"step": 3}')
    with pytest.raises(SystemExit, match='not a train_injector.py config.json'):
        ti.resolve_args(['--config', str(tmp_path / 'x.json')])


def test_loader_workers_default_to_the_cores_per_local_process(monkeypatch):
    monkeypatch.setattr(ti.os, 'sched_getaffinity', lambda pid: set(range(12)), raising=False)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '4')
    assert ti.loader_workers(None) == 3 and ti.loader_workers(0) == 0
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '1')
    assert ti.loader_workers(None) == 8  # at most 8
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '16')
    assert ti.loader_workers(None) == 1
