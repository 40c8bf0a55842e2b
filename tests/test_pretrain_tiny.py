"""pretrain_tiny.py end to end on a few steps, through pretrain_tiny.main(argv) in this process: all four stages,
files the loaders accept, a manifest that describes them, bit-identical resuming, shipping; one command line run."""
import importlib
import json
import multiprocessing
import os
import subprocess
import sys

import torch

import checkpoints
import models
import pretrain_tiny
from conftest import REPO

FEW = ['--n_train', '48', '--n_val', '20', '--fn_n_train', '64', '--vae_steps', '3', '--vae_bs', '4',
       '--dead_window', '2', '--var_steps', '3', '--var_bs', '8', '--var_eval_every', '2', '--fn_steps', '3',
       '--fn_bs', '8', '--score_n', '20', '--judge_steps', '3', '--judge_bs', '8', '--judge_n_train', '64']


def run_main(capsys, *argv):
    """pretrain_tiny.main(argv) here: (exit, stdout). exit is None when main returned, else SystemExit's code: 0 after
    --stop_after, the one-line message of a refusal (the command line prints it and exits 1, without a traceback)."""
    code = None
    try:
        pretrain_tiny.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().out


def test_importing_does_not_parse_argv(monkeypatch):
    """The flags are parsed in main(argv): importing the module with foreign flags in sys.argv (pytest's, a notebook's)
    neither exits nor keeps a global args."""
    monkeypatch.setattr(sys, 'argv', ['pretrain_tiny.py', '--no_such_flag', '--stage', 'nonsense'])
    module = importlib.reload(pretrain_tiny)
    assert not hasattr(module, 'args') and not hasattr(module, 'DATA_INFO')
    assert module.parser.parse_args(['--stage', 'judge']).stage == 'judge'


def test_pretrain_all_stages_write_loadable_files(tmp_path, capsys, monkeypatch):
    out = tmp_path / 'w'
    monkeypatch.setattr(sys, 'argv', ['pretrain_tiny.py', '--bogus'])  # main(argv) reads argv, never sys.argv
    code, log = run_main(capsys, '--out_dir', out, *FEW)
    assert code is None, log[-3000:]
    # one process, the four stages in turn
    assert log.index('[vae] 0.') < log.index('[var] 0.') < log.index('[featnet] 0.') < log.index('[judge] 0.'), log
    manifest = json.loads((out / 'MANIFEST.json').read_text())
    vae, var = models.build_tiny()
    net = models.build_featnet()
    for name, model in (('vae', vae), ('var', var), ('featnet', net), ('judge', models.build_judge())):
        path = out / checkpoints.TINY_FILES[name]
        sd = checkpoints.load_state_dict_file(path)
        assert all(v.dtype in (torch.float16, torch.int64, torch.bool) for v in sd.values())  # shipped as fp16
        checkpoints.load_checked(model, sd, path, name)
        entry = manifest[checkpoints.TINY_FILES[name]]
        assert entry['steps'] == 3 and entry['size_bytes'] == path.stat().st_size and len(entry['sha256']) == 64
        assert entry['command'] == ' '.join(['python pretrain_tiny.py', '--out_dir', str(out), *FEW])
    assert manifest['tiny_featnet.pt']['train_images'] == 64
    assert manifest['tiny_judge.pt']['train_images'] == 64 and manifest['tiny_judge.pt']['train_seed'] == 5
    assert manifest['tiny_vae.pt']['train_images'] == 48 and manifest['tiny_vae.pt']['val_images'] == 20
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
    (warm / checkpoints.TINY_FILES['vae']).write_bytes((out / checkpoints.TINY_FILES['vae']).read_bytes())
    run_var = lambda init: run_main(capsys, '--stage', 'var', '--out_dir', warm, *FEW, '--var_lr', '1e-9',
                                    '--var_init', init)
    code, log = run_var(out / checkpoints.TINY_FILES['vae'])
    assert isinstance(code, str) and 'a tiny VAR' in code, code
    assert '[var] tokens' not in log
    code, log = run_var(out / checkpoints.TINY_FILES['var'])
    assert code is None, log[-3000:]
    init, warm_sd = (checkpoints.load_state_dict_file(d / checkpoints.TINY_FILES['var']) for d in (out, warm))
    assert all(torch.allclose(init[k].float(), warm_sd[k].float(), atol=1e-3) for k in init)
    torch.manual_seed(0)  # --seed 0: what the run would have started from without --var_init
    fresh = models.build_tiny(init=True)[1].state_dict()
    assert not all(torch.allclose(init[k].float(), fresh[k], atol=1e-3) for k in init)
    entry = json.loads((warm / 'MANIFEST.json').read_text())[checkpoints.TINY_FILES['var']]
    assert entry['init_sha256'] == manifest[checkpoints.TINY_FILES['var']]['sha256']


# What a resume checkpoint holds, in order: a run started by one version of pretrain_tiny.py is continued by the next
# (a long pretraining run spans sessions), so these keys are a file format
RESUME_KEYS = dict(vae=['stage', 'step', 'rng', 'model', 'opt', 'gen', 'hits_V', 'wall'],
                   var=['stage', 'step', 'rng', 'model', 'opt', 'ema', 'vae_sha256', 'wall', 'ema_loss', 'ema_acc'],
                   featnet=['stage', 'step', 'rng', 'model', 'opt', 'gen', 'wall', 'ema_loss'],
                   done=['stage', 'done', 'sha256'])


def test_resume_is_bit_identical(tmp_path, capsys):
    """A run stopped mid-stage (mid-VQ-VAE, mid-VAR, right at the VAR's last step, mid-feature network) and
    continued with --resume ends with exactly the weights of an uninterrupted run; finished stages are not
    retrained. The checkpoints hold RESUME_KEYS. A finished stage whose file changed is refused."""
    run = lambda out, *extra: run_main(capsys, '--out_dir', out, '--var_ema', '0.9', *FEW, *extra)
    code, log = run(tmp_path / 'a')
    assert code is None, log[-3000:]
    logs, keys = [], lambda stage: list(torch.load(tmp_path / 'b' / f'resume_{stage}.pt', weights_only=True))
    # vae 0-2 | vae 2-3, var 0-1 | var 1-3 (stops after its last step) | featnet 0-1 | featnet 1-3, judge
    sessions = (['--stop_after', '2'], ['--resume', '--stop_after', '2'], ['--resume', '--stop_after', '2'],
                ['--resume', '--stop_after', '1'], ['--resume'])
    for i, extra in enumerate(sessions):
        code, log = run(tmp_path / 'b', *extra)
        assert code == (None if i == 4 else 0), log[-3000:]  # --stop_after ends the session with exit 0
        logs.append(log)
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
    for name in ('vae', 'var', 'featnet', 'judge'):
        sd_a, sd_b = (checkpoints.load_state_dict_file(d / checkpoints.TINY_FILES[name]) for d in (tmp_path / 'a', tmp_path / 'b'))
        assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a), name
    # a finished stage whose file changed afterwards is refused in one line, not retrained over it
    (tmp_path / 'b' / checkpoints.TINY_FILES['vae']).write_bytes((tmp_path / 'a' / checkpoints.TINY_FILES['var']).read_bytes())
    code, log = run(tmp_path / 'b', '--resume')
    assert isinstance(code, str) and 'changed since' in code, code
    man_a, man_b = (json.loads((d / 'MANIFEST.json').read_text()) for d in (tmp_path / 'a', tmp_path / 'b'))
    for f in ('tiny_vae.pt', 'tiny_var.pt', 'tiny_featnet.pt', 'tiny_judge.pt'):
        assert man_a[f]['metrics'] == man_b[f]['metrics']
        assert man_a[f]['command'].replace(str(tmp_path / 'a'), '') == man_b[f]['command'].replace(str(tmp_path / 'b'), '')


def test_judge_stage_ships_only_when_asked_and_never_writes_into_weights(tmp_path, capsys, monkeypatch):
    """The shipped folder is never a run folder; --ship copies the run's files and MANIFEST entries into it. The
    refusal goes through the command line (AIDVAR_TINY_DIR, exit 1, one line), the runs through main()."""
    shipped = tmp_path / 'shipped'
    shipped.mkdir()
    (shipped / 'MANIFEST.json').write_text('{"tiny_var.pt": {"sha256": "kept"}}\n')
    cmd = ['--stage', 'judge', '--n_val', '20', '--judge_n_train', '64', '--judge_steps', '2', '--judge_bs', '8']
    r = subprocess.run([sys.executable, 'pretrain_tiny.py', *cmd, '--out_dir', str(shipped)], cwd=REPO,
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS='1', AIDVAR_TINY_DIR=str(shipped)))
    assert r.returncode == 1 and 'folder of the shipped tiny models' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert sorted(p.name for p in shipped.iterdir()) == ['MANIFEST.json']
    monkeypatch.setattr(checkpoints, 'TINY_DIR', shipped)  # what AIDVAR_TINY_DIR sets when checkpoints is imported
    code, log = run_main(capsys, *cmd, '--out_dir', tmp_path / 'run')
    assert code is None, log[-2000:]
    assert not (shipped / 'tiny_judge.pt').exists()  # not asked to ship
    code, log = run_main(capsys, *cmd, '--out_dir', tmp_path / 'run2', '--ship')
    assert code is None and '[check] the shipped loaders load' in log, log[-2000:]
    manifest = json.loads((shipped / 'MANIFEST.json').read_text())
    assert manifest['tiny_var.pt'] == {'sha256': 'kept'}  # the other entries stay
    assert manifest['tiny_judge.pt']['sha256'] == json.loads((tmp_path / 'run2' / 'MANIFEST.json').read_text())['tiny_judge.pt']['sha256']
    assert (shipped / 'tiny_judge.pt').read_bytes() == (tmp_path / 'run2' / 'tiny_judge.pt').read_bytes()
    checkpoints.load_checked(models.build_judge(), checkpoints.load_state_dict_file(shipped / 'tiny_judge.pt'), 'j', 'judge')
    assert sorted(p.name for p in shipped.iterdir()) == ['MANIFEST.json', 'tiny_judge.pt']  # no lock file left


def _add_entries(out_dir, tag, n):
    for i in range(n):
        pretrain_tiny.update_manifest(out_dir, lambda manifest: manifest.update({f'{tag}{i}': i}))


def test_manifest_updates_from_two_processes_keep_every_entry(tmp_path):
    """Two stages side by side on one out_dir (two shells) both read-modify-write MANIFEST.json: the flock makes
    each update see the other's, so no entry is lost."""
    ctx = multiprocessing.get_context('fork')
    procs = [ctx.Process(target=_add_entries, args=(tmp_path, tag, 200)) for tag in 'ab']
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    manifest = json.loads((tmp_path / 'MANIFEST.json').read_text())
    assert manifest == {f'{tag}{i}': i for tag in 'ab' for i in range(200)}
