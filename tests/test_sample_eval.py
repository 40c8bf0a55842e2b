"""sample.py and evaluate.py end to end on small random tiny-geometry models (CPU, in-process)."""
import json

import numpy as np
import pytest
import torch

import evaluate
import models
import sample
from conftest import SMALL

# 2 classes x 2 samples, batches of 2: 2 batches per w
LABELS = [3, 3, 7, 7]


def _npz_bytes(path):
    return path.read_bytes()


@pytest.fixture(scope='module')
def paired(tmp_path_factory):
    """One uninterrupted --w 0 0.5 run."""
    out = tmp_path_factory.mktemp('paired')
    written = sample.main(SMALL + ['--w', '0', '0.5', '--out_dir', str(out), '--progression', '--progression_n', '2'])
    return out, written


def test_files_and_format(paired):
    out, written = paired
    assert set(written) == {0.0, 0.5}
    for name in ('samples_w0.npz', 'samples_w0.5.npz', 'grid_w0.png', 'grid_w0.5.png', 'progression.png'):
        assert (out / name).is_file(), name
    assert not list(out.glob('.partial*'))  # merged and cleaned up
    with np.load(out / 'samples_w0.5.npz', allow_pickle=False) as f:
        assert set(f.files) == {'arr_0', 'labels', 'tokens', 'preset', 'meta'}  # never 'mu' (ADM rule)
        assert f['arr_0'].dtype == np.uint8 and f['arr_0'].shape == (4, 32, 32, 3)
        assert f['labels'].tolist() == LABELS  # class-major
        L = sum(pn * pn for pn in models.TINY['patch_nums'])
        assert f['tokens'].dtype == np.int16 and f['tokens'].shape == (4, L)
        assert 0 <= f['tokens'].min() and f['tokens'].max() < models.TINY['V']
        assert str(f['preset']) == 'tiny'
        meta = json.loads(str(f['meta']))
        assert meta['w'] == 0.5 and meta['seed'] == 5 and meta['random_init'] is True


def test_paired_labels_same_images_differ(paired):
    out, _ = paired
    a, b = np.load(out / 'samples_w0.npz'), np.load(out / 'samples_w0.5.npz')
    assert np.array_equal(a['labels'], b['labels'])
    assert not np.array_equal(a['arr_0'], b['arr_0'])
    assert not np.array_equal(a['tokens'], b['tokens'])
    # scale 0 is never guided and uses the same seed: identical first tokens in both files
    assert np.array_equal(a['tokens'][:, 0], b['tokens'][:, 0])


def test_w0_is_plain_var_sampling(paired):
    out, _ = paired
    torch.manual_seed(0)  # sample.py --random_init's models
    vae, var = models.build_tiny(init=True)
    vae, var = models.frozen(vae, 'cpu'), models.frozen(var, 'cpu')
    labels = torch.tensor(LABELS)
    imgs, toks = [], []
    for b in range(2):
        img, idx = var.autoregressive_infer_cfg(2, labels[2 * b:2 * b + 2], g_seed=sample.batch_seed(5, b), cfg=1.5,
                                                top_k=0, top_p=0.0, more_smooth=False, ret_idx=True)
        imgs.append(img.mul(255).to(torch.uint8).permute(0, 2, 3, 1).numpy())  # VAR / ADM: truncation
        toks.append(torch.cat(idx, 1).numpy())
    f = np.load(out / 'samples_w0.npz')
    assert np.array_equal(f['arr_0'], np.concatenate(imgs))
    assert np.array_equal(f['tokens'], np.concatenate(toks))


def test_interrupted_run_resumes_to_identical_bytes(paired, tmp_path, capsys):
    out, _ = paired
    args = SMALL + ['--w', '0', '0.5', '--out_dir', str(tmp_path)]
    sample.main(args + ['--max_batches', '1'])  # stops: w=0 has 1 of 2 batches, w=0.5 none
    assert not (tmp_path / 'samples_w0.npz').exists()
    assert len(list((tmp_path / '.partial_w0').glob('batch_*.npz'))) == 1
    assert 'rerun the same command to resume' in capsys.readouterr().out
    sample.main(args)
    assert 'resuming: 1 finished batches' in capsys.readouterr().out
    # same seed, separate runs, one of them interrupted: byte-identical files
    for name in ('samples_w0.npz', 'samples_w0.5.npz'):
        assert _npz_bytes(tmp_path / name) == _npz_bytes(out / name), name
    # a finished file is not recomputed; other settings in the same folder are refused
    sample.main(args)
    assert 'not recomputed' in capsys.readouterr().out
    with pytest.raises(SystemExit, match='other settings'):
        sample.main(SMALL[:-1] + ['6', '--w', '0', '--out_dir', str(tmp_path)])


def _fd_by_hand(x_ND, mu2, s2):
    """Fréchet distance of a sample set's Gaussian fit to N(mu2, s2), from scratch (no iscs, no sqrtm):
    tr sqrtm(S1 S2) = tr sqrtm(A S2 A), A = S1^(1/2), whose argument is symmetric PSD (eigh)."""
    mu1 = x_ND.sum(0) / len(x_ND)
    s1 = (x_ND - mu1).T @ (x_ND - mu1) / (len(x_ND) - 1)
    lam, vec = np.linalg.eigh(s1)
    a = (vec * np.sqrt(np.clip(lam, 0, None))) @ vec.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(a @ s2 @ a), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def test_round_trip_through_evaluate(paired, tmp_path, capsys, monkeypatch):
    out, _ = paired
    base, guided = out / 'samples_w0.npz', out / 'samples_w0.5.npz'
    common = ['--random_init', '--cpu', '--ref_n', '16', '--cache_dir', str(tmp_path / 'cache')]
    # the features and reference statistics evaluate.py bootstraps, kept for an independent bootstrap below
    seen, bootstrap = [], evaluate.iscs.paired_fid_bootstrap

    def recording(feats, mu, sigma, *args, **kwargs):
        seen.append((feats, mu, sigma))
        return bootstrap(feats, mu, sigma, *args, **kwargs)
    monkeypatch.setattr(evaluate.iscs, 'paired_fid_bootstrap', recording)
    # 1) baseline vs guided side by side (ISCS off here: its sqrtm's are the slow part, run once below)
    results = evaluate.main([str(base), str(guided), '--no_iscs', '--json', str(tmp_path / 'both.json'),
                             '--bootstrap', '20'] + common)
    text = capsys.readouterr().out
    assert 'samples_w0.5.npz - samples_w0.npz' in text  # side by side with differences
    assert 'FID(samples_w0.5.npz) - FID(samples_w0.npz) = ' in text and 'of 20 replicates' in text
    for res, path in zip(results, (base, guided)):
        on_disk = json.loads(evaluate.json_path(path).read_text())
        assert on_disk['samples'] == str(path) and on_disk['sampling']['w'] in (0.0, 0.5)
        for key in ('FID', 'IS', 'IS_std', 'precision', 'recall', 'class_acc'):
            assert np.isfinite(on_disk['metrics'][key]), key
        assert on_disk['skipped']['ISCS'] == '--no_iscs'
        assert any('only 4 samples' in w for w in on_disk['warnings'])
        assert on_disk['settings']['pr_k'] == 3 and on_disk['settings']['pr_ref_n'] == 16
    both = json.loads((tmp_path / 'both.json').read_text())
    assert np.isclose(both['differences_to_first']['FID'][0],
                      results[1]['metrics']['FID'] - results[0]['metrics']['FID'])
    (bs,) = both['fid_bootstrap']
    assert bs['n_boot'] == 20
    # the same paired bootstrap by hand: the FID features of both files (they give the reported FIDs), the same
    # 20 draws (numpy, seed 0) of 4 rows shared by both files, the reference held fixed
    feats, mu, sigma = seen[0]
    assert [len(f) for f in feats] == [4, 4]
    for f, res in zip(feats, results):
        assert _fd_by_hand(f, mu, sigma) == pytest.approx(res['metrics']['FID'], rel=1e-6)
    rng = np.random.default_rng(0)
    d = []
    for _ in range(20):
        rows = rng.integers(0, 4, 4)
        d.append(_fd_by_hand(feats[1][rows], mu, sigma) - _fd_by_hand(feats[0][rows], mu, sigma))
    np.testing.assert_allclose(bs['ci95'], np.percentile(d, [2.5, 97.5]), rtol=1e-5, atol=1e-6)  # sqrtm of singular S1 S2
    assert bs['p_lower'] == np.mean(np.array(d) < 0)
    assert min(np.abs(d)) > 1e-3 and 0 < bs['p_lower'] < 1  # no near-ties, and both signs occur
    # rows that are not the same draws cannot be bootstrapped in pairs: refused before any work
    shuffled = tmp_path / 'shuffled.npz'
    with np.load(guided) as f:
        np.savez(shuffled, arr_0=f['arr_0'][::-1], labels=f['labels'][::-1])
    with pytest.raises(SystemExit, match='needs paired sample files.*different labels'):
        evaluate.main([str(base), str(shuffled), '--bootstrap', '5'] + common)

    # 2) ISCS from the stored tokens; a file without tokens gets the other metrics and the reason
    no_tok = tmp_path / 'no_tokens.npz'
    with np.load(base) as f:
        np.savez(no_tok, arr_0=f['arr_0'], labels=f['labels'])
    res_g, res_nt = evaluate.main([str(guided), str(no_tok)] + common)
    text = capsys.readouterr().out
    assert 'from the cache' in text  # reference features computed once, by content hash
    assert res_g['metrics']['FID'] == results[1]['metrics']['FID']
    assert res_nt['metrics']['FID'] == results[0]['metrics']['FID']  # same images as the baseline
    it = json.loads(evaluate.json_path(guided).read_text())['iscs']
    assert it['k'] == [1, 2, 3, 4, 5] and len(it['S_k']) == len(it['FD_k']) == 5
    assert np.isclose(sum(it['w_k']), 1.0)
    assert np.isfinite(res_g['metrics']['ISCS']) and np.isclose(res_g['metrics']['ISCS'], np.dot(it['w_k'], it['S_k']))
    assert it['n_gen'] == 4 and it['n_real'] == 16
    assert res_nt['metrics']['ISCS'] is None and 'tokens' in res_nt['skipped']['ISCS']
    assert 'ISCS skipped' in text


def _write(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_malformed_npz_gives_one_line_reasons(tmp_path):
    good = np.zeros((8, 32, 32, 3), np.uint8)
    nan = np.zeros((8, 32, 32, 3), np.float32)
    nan[0, 0, 0, 0] = np.nan
    (tmp_path / 'text.npz').write_text('not a zip')
    cases = {
        _write(tmp_path / 'noarr.npz', images=good): "no 'arr_0'",
        _write(tmp_path / 'float.npz', arr_0=nan): 'NaN',
        _write(tmp_path / 'nchw.npz', arr_0=good.transpose(0, 3, 1, 2).copy()): 'NCHW',
        _write(tmp_path / 'gray.npz', arr_0=good[..., 0]): 'expected (N, H, W, 3)',
        _write(tmp_path / 'one.npz', arr_0=good[:1]): 'at least 2',
        _write(tmp_path / 'mu.npz', arr_0=good, mu=np.zeros(3)): "'mu'",
        _write(tmp_path / 'labels.npz', arr_0=good, labels=np.zeros(3, np.int64)): 'labels',
        _write(tmp_path / 'big.npz', arr_0=np.zeros((4, 64, 64, 3), np.uint8), preset=np.array('tiny')): '64x64',
        str(tmp_path / 'text.npz'): 'not a readable .npz',
        str(tmp_path / 'missing.npz'): 'no such file',
    }
    for path, reason in cases.items():
        with pytest.raises(SystemExit) as e:
            evaluate.main([path, '--random_init', '--cpu', '--cache_dir', str(tmp_path / 'cache')])
        msg = str(e.value.code)
        assert '\n' not in msg and reason in msg and path in msg, (path, msg)
    with pytest.raises(SystemExit, match='--ref'):
        evaluate.main([_write(tmp_path / 'real.npz', arr_0=np.zeros((4, 256, 256, 3), np.uint8)), '--cpu'])


def test_two_processes_merge_the_same_npz(paired, tmp_path):
    """accelerate launch (torchrun under --multi_gpu; gloo on a CPU-only machine): batches split over ranks, one npz."""
    import os
    import subprocess
    import sys
    from conftest import REPO
    out, _ = paired
    env = dict(os.environ, HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
           '--mixed_precision', 'no', '--dynamo_backend', 'no', str(REPO / 'sample.py'),
           *[a for a in SMALL if a != '--cpu'], '--w', '0', '0.5', '--out_dir', str(tmp_path)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'on 2 process(es)' in r.stdout
    for name in ('samples_w0.npz', 'samples_w0.5.npz'):
        with np.load(out / name) as a, np.load(tmp_path / name) as b:
            for key in ('arr_0', 'labels', 'tokens'):
                assert np.array_equal(a[key], b[key]), (name, key)


def test_progression_is_labelled(paired):
    """progression.png: the tile grid (2 samples x 2 blocks of 6 scales, 64 px tiles + 1 px padding) under a header
    of two text lines: which block is w = 0 and which is guided, and which scale each column decodes."""
    from PIL import Image
    out, _ = paired
    img = np.asarray(Image.open(out / 'progression.png').convert('L'))
    K, pitch = len(models.TINY['patch_nums']), 65
    grid_h, grid_w = 2 * pitch + 1, (2 * (K + 1) - 1) * pitch + 1
    assert img.shape[1] == grid_w and img.shape[0] > grid_h
    header = img[:img.shape[0] - grid_h]
    title_line, scale_line = header[:len(header) // 2], header[len(header) // 2:]
    assert (title_line[:, :grid_w // 2] < 128).any() and (title_line[:, grid_w // 2:] < 128).any()  # both titles
    for k in range(2 * (K + 1) - 1):  # a scale name above every tile column, none above the white gap column
        col = scale_line[:, 1 + k * pitch:(k + 1) * pitch]
        assert (col < 128).any() == (k != K), k
