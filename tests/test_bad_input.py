"""Bad input gets one clear line and loses nothing (issue 13): train_injector.py's out_dir and --resume, sample.py's
--w, --data_path on the tiny preset, evaluate.py's labels and truncated npz files, the hub when offline."""
import json
import os
import time
import zipfile

import numpy as np
import pytest
import safetensors.torch
import torch

import checkpoints
import evaluate
import sample
import train_disc_probe
import train_injector as ti
from conftest import FAST, SMALL


def _one_line(e):
    msg = str(e.value.code if hasattr(e.value, 'code') else e.value)
    assert '\n' not in msg and len(msg) < 700, msg
    return msg


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """A finished 2-step run (checkpoint at every step)."""
    out = tmp_path_factory.mktemp('run')
    ti.main(FAST + ['--max_steps', '2', '--ckpt_every', '1', '--out_dir', str(out)])
    return out


# ----------------------------------------------------------------------------- train_injector.py: out_dir, --resume

def test_fresh_run_into_an_earlier_run_is_refused(run_dir):
    before = {f: (run_dir / f).read_bytes() for f in ('last.pt', 'injector.safetensors', 'log.jsonl')}
    with pytest.raises(SystemExit) as e:
        ti.main(FAST + ['--max_steps', '2', '--out_dir', str(run_dir)])
    msg = _one_line(e)
    assert '--resume auto' in msg and str(run_dir) in msg and 'last.pt' in msg
    assert {f: (run_dir / f).read_bytes() for f in before} == before  # nothing overwritten


@pytest.mark.parametrize('kind', ['truncated', 'garbage', 'missing', 'injector', 'state_dict', 'other_dict'])
def test_bad_resume_file_is_one_clear_line(run_dir, tmp_path, kind):
    path = tmp_path / f'{kind}.pt'
    if kind == 'truncated':
        path.write_bytes((run_dir / 'last.pt').read_bytes()[:4000])
    elif kind == 'garbage':
        path.write_bytes(b'this is not a checkpoint\n' * 10)
    elif kind == 'injector':
        path = run_dir / 'injector.safetensors'
    elif kind == 'state_dict':
        torch.save(safetensors.torch.load_file(run_dir / 'injector.safetensors'), path)
    elif kind == 'other_dict':
        torch.save({'step': 3, 'model': torch.zeros(2)}, path)
    out = tmp_path / 'out'
    with pytest.raises(SystemExit) as e:
        ti.main(FAST + ['--max_steps', '3', '--resume', str(path), '--out_dir', str(out)])
    msg = _one_line(e)
    assert str(path) in msg and '--resume' in msg, msg
    expect = {'truncated': 'not a readable checkpoint', 'garbage': 'not a readable checkpoint', 'missing': 'no such file',
              'injector': 'injector file', 'state_dict': 'guidance injector', 'other_dict': 'not a training checkpoint'}
    assert expect[kind] in msg, msg
    assert not out.exists()  # refused before anything was written


def test_resume_truncates_the_log_to_the_checkpoint(tmp_path, monkeypatch):
    """A run killed after step 3 with its last checkpoint at step 2: the resumed log has each step once."""
    calls = {'n': 0}
    step = ti.train_step

    def killed_at_4(*a, **kw):
        calls['n'] += 1
        if calls['n'] == 4:
            raise KeyboardInterrupt
        return step(*a, **kw)
    monkeypatch.setattr(ti, 'train_step', killed_at_4)
    with pytest.raises(SystemExit, match="interrupted at step 3"):  # Ctrl-C: one line, not a traceback
        ti.main(FAST + ['--max_steps', '5', '--ckpt_every', '2', '--out_dir', str(tmp_path)])
    monkeypatch.setattr(ti, 'train_step', step)
    rows = [json.loads(l) for l in (tmp_path / 'log.jsonl').read_text().splitlines()]
    assert [r['step'] for r in rows] == [1, 2, 3]
    assert torch.load(tmp_path / 'last.pt', weights_only=True)['step'] == 2
    ti.main(FAST + ['--max_steps', '4', '--ckpt_every', '2', '--out_dir', str(tmp_path), '--resume', 'auto'])
    rows = [json.loads(l) for l in (tmp_path / 'log.jsonl').read_text().splitlines()]
    assert [r['step'] for r in rows] == [1, 2, 3, 4]
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['start_step'] == 2 and config['resumed_from'] == str(tmp_path / 'last.pt')


def test_kept_log_rows_drop_rows_after_the_step_and_half_lines(tmp_path):
    log = tmp_path / 'log.jsonl'
    log.write_text(''.join(json.dumps({'step': s, 'loss': 0.5}) + '\n' for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    assert [json.loads(l)['step'] for l in ti.kept_log_rows(log, 2).splitlines()] == [1, 2]
    assert ti.kept_log_rows(tmp_path / 'absent.jsonl', 2) == ''  # no log yet: nothing to keep


# ----------------------------------------------------------------------------- --data_path on the tiny preset

def test_data_path_on_the_tiny_preset_is_refused(tmp_path):
    for main, argv in ((ti.main, FAST + ['--max_steps', '1', '--out_dir', str(tmp_path / 'a')]),
                       (train_disc_probe.main, ['--random_init', '--steps', '1', '--out_dir', str(tmp_path / 'b')])):
        with pytest.raises(SystemExit) as e:
            main(argv + ['--data_path', str(tmp_path)])
        msg = _one_line(e)
        assert '--data_path' in msg and '--depth' in msg


# ----------------------------------------------------------------------------- sample.py --w

@pytest.mark.parametrize('w', ['nan', 'inf'])
def test_non_finite_w_is_refused_before_any_folder(tmp_path, w):
    out = tmp_path / 'samples'
    with pytest.raises(SystemExit) as e:
        sample.main(SMALL + ['--w', '0', w, '--out_dir', str(out)])
    msg = _one_line(e)
    assert 'finite' in msg and w in msg
    assert not out.exists()


def test_negative_and_huge_w_warn_and_run(tmp_path, capsys):
    written = sample.main(SMALL + ['--w', '-0.5', '5', '--out_dir', str(tmp_path)])
    err = capsys.readouterr().err
    assert 'warning: --w -0.5 is negative' in err
    assert 'warning: --w 5 is' in err
    assert set(written) == {-0.5, 5.0} and all(p.is_file() for p in written.values())


# ----------------------------------------------------------------------------- evaluate.py

def test_labels_outside_the_classes_are_refused(tmp_path):
    path = tmp_path / 'bad_labels.npz'
    np.savez(path, arr_0=np.zeros((8, 32, 32, 3), np.uint8), labels=np.array([0, 1, 2, 3, 4, 5, 12, -1]))
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(path), '--random_init', '--cpu', '--cache_dir', str(tmp_path / 'cache')])
    msg = _one_line(e)
    assert str(path) in msg and 'outside the classes 0..9' in msg and '12' in msg and '-1' in msg


def _npz_with_lying_header(path, rows_promised, rows_written):
    """An npz whose arr_0 header promises more rows than the member holds (a truncated write)."""
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as zf:
        with zf.open('arr_0.npy', 'w') as f:
            np.lib.format.write_array_header_1_0(f, {'descr': '|u1', 'fortran_order': False,
                                                     'shape': (rows_promised, 32, 32, 3)})
            f.write(np.zeros((rows_written, 32, 32, 3), np.uint8).tobytes())
        with zf.open('labels.npy', 'w') as f:  # a member after it: a memmap would read its bytes as pixels
            np.lib.format.write_array(f, np.arange(rows_promised) % 10)


def test_flags_and_headers_are_checked_before_any_image_is_inflated(tmp_path):
    """A compressed arr_0 that would inflate to 9.8 GB (real-model 256x256 samples, only its header and a few bytes
    written): the missing --ref is said at once, before the member is read; the same file with --ref says what is
    wrong with the data."""
    path = tmp_path / 'bomb.npz'
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as zf:
        with zf.open('arr_0.npy', 'w') as f:
            np.lib.format.write_array_header_1_0(f, {'descr': '|u1', 'fortran_order': False,
                                                     'shape': (50000, 256, 256, 3)})
            f.write(bytes(1000))
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(path), '--cpu', '--cache_dir', str(tmp_path / 'cache')])
    assert '--ref is required' in _one_line(e)
    ref = tmp_path / 'ref.npz'
    np.savez(ref, arr_0=np.zeros((4, 256, 256, 3), np.uint8))
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(path), '--ref', str(ref), '--random_init', '--cpu', '--cache_dir', str(tmp_path / 'cache')])
    assert str(path) in _one_line(e) and 'truncated or corrupt' in _one_line(e)


def test_float_images_are_refused_from_the_header(tmp_path):
    path = tmp_path / 'float.npz'
    np.savez_compressed(path, arr_0=np.zeros((8, 32, 32, 3), np.float32))
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(path), '--random_init', '--cpu', '--cache_dir', str(tmp_path / 'cache')])
    assert 'dtype float32' in _one_line(e) and 'expected uint8' in _one_line(e)


def test_npz_header_promising_more_rows_than_the_file_holds(tmp_path):
    path = tmp_path / 'truncated.npz'
    _npz_with_lying_header(path, 100, 8)
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(path), '--random_init', '--cpu', '--cache_dir', str(tmp_path / 'cache')])
    msg = _one_line(e)
    assert str(path) in msg and 'truncated' in msg and '(100, 32, 32, 3)' in msg and '8 of 100 rows' in msg


# ----------------------------------------------------------------------------- the hub, offline without HF_HUB_OFFLINE

@pytest.fixture
def no_network(monkeypatch):
    import socket

    import huggingface_hub

    def refused(*a, **kw):
        raise OSError('[Errno 101] Network is unreachable')

    def no_download(*a, **kw):
        raise AssertionError('hf_hub_download was called although the hub is unreachable')
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    monkeypatch.setattr(socket, 'create_connection', refused)
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', no_download)


def test_offline_checkpoint_fails_fast_with_current_advice(tmp_path, no_network):
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        checkpoints.find_checkpoint('var_d16.pth', tmp_path)
    assert time.perf_counter() - t0 < 2
    msg = _one_line(e)
    assert 'hf download FoundationVision/var var_d16.pth' in msg and 'huggingface-cli' not in msg
    assert 'HF_HUB_OFFLINE=1' in msg and 'Network is unreachable' in msg


def test_offline_dino_fails_fast_with_current_advice(tmp_path, no_network):
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        checkpoints.load_dino(cache_dir=tmp_path)
    assert time.perf_counter() - t0 < 5  # timm import included
    msg = _one_line(e)
    assert 'hf download timm/vit_small_patch16_224.dino' in msg and 'huggingface-cli' not in msg
    assert 'HF_HUB_OFFLINE=1' in msg


def test_hub_check_gives_up_after_its_timeout(monkeypatch):
    import socket

    def hangs(*a, **kw):  # a black-holed connection (or a name lookup that never answers)
        time.sleep(3)
        raise OSError('timed out')
    monkeypatch.setattr(socket, 'create_connection', hangs)
    monkeypatch.setattr(checkpoints, 'HUB_CHECK_TIMEOUT', 0.2)
    t0 = time.perf_counter()
    why = checkpoints.hub_unreachable()
    assert time.perf_counter() - t0 < 1.5 and 'no answer within 0.2 s' in why


def test_fid_inception_download_checks_its_host_first(tmp_path, monkeypatch):
    """Not offline by the flag but unreachable: one line in about the check's timeout, naming the URL's host, without
    starting the download (whose client would retry)."""
    import socket
    asked = []

    def refused(address, *a, **kw):
        asked.append(address)
        raise OSError('Network is unreachable')
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    for k in ('HTTPS_PROXY', 'https_proxy', 'ALL_PROXY', 'all_proxy'):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(socket, 'create_connection', refused)
    monkeypatch.setattr(torch.hub, 'download_url_to_file', lambda *a, **kw: pytest.fail('download started'))
    with pytest.raises(SystemExit) as e:
        checkpoints.load_fid_inception(tmp_path)
    msg = _one_line(e)
    assert asked == [('github.com', 443)] and 'cannot be downloaded' in msg and 'HF_HUB_OFFLINE=1' in msg


# ----------------------------------------------------------------------------- nothing replaced without a word

def test_resume_with_other_settings_says_what_changed(run_dir, tmp_path, capsys):
    out = tmp_path / 'r'
    out.mkdir()
    (out / 'last.pt').write_bytes((run_dir / 'last.pt').read_bytes())
    ti.main(FAST + ['--max_steps', '3', '--resume', 'auto', '--lr_g', '0.5', '--out_dir', str(out)])
    line = [l for l in capsys.readouterr().out.splitlines() if 'differ from the checkpoint' in l]
    assert len(line) == 1 and '--lr_g 0.001 -> 0.5' in line[0] and '--max_steps 2 -> 3' in line[0]


def test_disc_probe_into_an_earlier_probe_is_refused_unless_overwrite(tmp_path):
    argv = ['--random_init', '--steps', '1', '--batch_size', '2', '--n_tiny', '16', '--out_dir', str(tmp_path)]
    train_disc_probe.main(argv)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    with pytest.raises(SystemExit) as e:
        train_disc_probe.main(argv)
    assert 'already holds a --space rgb probe' in _one_line(e) and '--overwrite' in _one_line(e)
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before
    train_disc_probe.main(argv + ['--space', 'latent'])  # the other space's files do not collide
    train_disc_probe.main(argv + ['--overwrite'])
    for bad in (['--steps', '0'], ['--batch_size', '0']):
        with pytest.raises(SystemExit, match='must be >= 1'):
            train_disc_probe.main(argv + bad)


def test_evaluate_prints_the_metrics_before_a_write_fails_and_names_a_replaced_reference(tmp_path, capsys):
    sample.main(SMALL + ['--w', '0', '--out_dir', str(tmp_path)])
    smp, ref2 = tmp_path / 'samples_w0.npz', tmp_path / 'ref2.npz'
    with np.load(smp) as f:
        np.savez(ref2, arr_0=f['arr_0'][::-1])  # other bytes: another reference
    ev = lambda ref: evaluate.main([str(smp), '--random_init', '--no_iscs', '--ref', str(ref), '--cache_dir', str(tmp_path / 'c')])
    ev(smp)
    capsys.readouterr()
    ev(ref2)
    assert 'replacing the result against' in capsys.readouterr().out
    json_path = tmp_path / 'samples_w0.eval.json'
    json_path.unlink()
    json_path.mkdir()  # a path that cannot be written
    with pytest.raises(SystemExit) as e:
        ev(smp)
    assert 'could not write' in _one_line(e)
    assert 'FID ' in capsys.readouterr().out  # the metrics were printed first


@pytest.mark.parametrize('bad,what', [(['--global_batch_size', '0'], '--global_batch_size 0'), (['--lr_g', '-1'], '--lr_g -1.0'),
                                      (['--max_steps', '0'], '--max_steps 0')])
def test_bad_numbers_are_one_line_before_anything_is_written(tmp_path, bad, what):
    with pytest.raises(SystemExit) as e:
        ti.main(FAST + ['--max_steps', '1', '--out_dir', str(tmp_path / 'o'), *bad])
    assert what in _one_line(e) and not (tmp_path / 'o').exists()


def test_out_dir_that_is_a_file_and_bad_disc_ckpt_are_one_line(tmp_path, run_dir):
    (tmp_path / 'f').write_text('x')
    torch.save({'meta': {}, 'state_dict': {}}, tmp_path / 'old_injector.pt')  # a torch file of another kind
    with pytest.raises(SystemExit, match='is a file'):
        ti.main(FAST + ['--max_steps', '1', '--out_dir', str(tmp_path / 'f')])
    for ckpt, what in ((tmp_path / 'missing.pt', 'no such file'), (tmp_path / 'f', 'not a readable torch file'),
                       (tmp_path / 'old_injector.pt', 'holds no D heads')):
        with pytest.raises(SystemExit) as e:
            ti.main(FAST + ['--max_steps', '1', '--out_dir', str(tmp_path / 'o'), '--disc_ckpt', str(ckpt)])
        assert what in _one_line(e)


def test_sample_folder_lock_corrupt_leftover_and_ctrl_c_are_one_line(tmp_path, monkeypatch):
    out = tmp_path / 's'
    out.mkdir()
    (out / '.lock').write_text(str(os.getppid()))  # a live process holds the folder
    with pytest.raises(SystemExit) as e:
        sample.main(SMALL + ['--w', '0', '--out_dir', str(out)])
    assert 'in use by another sample.py' in _one_line(e)
    (out / '.lock').write_text('999999999')  # a lock whose process is gone is taken over
    sample.main(SMALL + ['--w', '0', '--out_dir', str(out)])
    assert not (out / '.lock').exists()
    (out / 'samples_w0.npz').write_bytes(b'PK\x03\x04 cut off')
    with pytest.raises(SystemExit) as e:
        sample.main(SMALL + ['--w', '0', '--out_dir', str(out)])
    assert 'not a readable npz' in _one_line(e)

    def interrupt(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(sample, 'sample_batch', interrupt)
    with pytest.raises(SystemExit, match='interrupted: the finished batches are kept'):
        sample.main(SMALL + ['--w', '0.5', '--out_dir', str(tmp_path / 'i')])
    assert not (tmp_path / 'i' / '.lock').exists()


def test_training_ctrl_c_says_what_was_kept(tmp_path, monkeypatch):
    step = ti.train_step
    calls = []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(*a, **kw)
    monkeypatch.setattr(ti, 'train_step', interrupted)
    with pytest.raises(SystemExit) as e:
        ti.main(FAST + ['--max_steps', '5', '--ckpt_every', '1', '--out_dir', str(tmp_path)])
    assert 'interrupted at step 2' in str(e.value) and 'step 2 is kept' in str(e.value) and '--resume auto' in str(e.value)


def test_soft_reals_calibrate_on_a_small_training_set(tmp_path, capsys):
    """A debugging folder smaller than the 64 calibration images (was: StopIteration) calibrates on what it has."""
    ti.main(FAST + ['--n_tiny', '12', '--real_decode', 'soft', '--max_steps', '1', '--out_dir', str(tmp_path)])
    assert 'temperatures to the VAR on 12 training images' in capsys.readouterr().out
    assert len(json.loads((tmp_path / 'config.json').read_text())['real_temps']) == 6
