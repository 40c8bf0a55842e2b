"""FID / IS / precision-recall library: parity with tests/fixtures (README_fid_metrics.md)."""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoints
import features
import iscs
from checkpoints import FID_WEIGHTS_NAME, FID_WEIGHTS_URL, load_fid_inception
from conftest import fixture_module
from evaluate import inception_score, inception_score_per_split, kth_nn_sq_radii, precision_recall
from features import FIDInceptionV3, inception_features, preprocess_uint8
from iscs import feature_stats, frechet_distance

# float64 vs outputs_f64: measured max abs error 2.8e-17 (logits 5.6e-17) on this CPU; the
# README's 1e-14 leaves room for other BLAS/conv kernels and still catches every variant.
ATOL_F64 = 1e-14
# float32 vs outputs_f32: measured 1.5e-8 (pool3) / 2.2e-8 (logits) / 1.5e-8 (stage means).
ATOL_F32_HEAD = 5e-8
ATOL_F32_EARLY = 1e-7
# The fixture was made with pytorch-fid's preprocessing (F.interpolate bilinear, 2x - 1). evaluate.py's FID uses
# the ADM evaluator's (TF1 legacy bilinear resize, (v - 128) / 128; test_fid_matches_torch_fidelity below), so the
# parity tests of the network pass pipeline='pytorch-fid' explicitly: they compare the network, not the resize.
FIXTURE_PIPELINE = 'pytorch-fid'
# The 16 named stages whose outputs the parity fixture records (stage_means).
STAGES = ('Conv2d_1a_3x3', 'Conv2d_2a_3x3', 'Conv2d_2b_3x3', 'Conv2d_3b_1x1', 'Conv2d_4a_3x3',
          'Mixed_5b', 'Mixed_5c', 'Mixed_5d', 'Mixed_6a', 'Mixed_6b', 'Mixed_6c', 'Mixed_6d',
          'Mixed_6e', 'Mixed_7a', 'Mixed_7b', 'Mixed_7c')


def forward_taps(model, x_N3HW) -> dict:
    """Every parity-test output of a FIDInceptionV3 for (N, 3, 299, 299) input in [-1, 1], read by forward hooks:
    feat64 (N, 64), feat192 (N, 192), feat768 (N, 768): pytorch-fid's block features, spatial means after maxpool1,
    maxpool2 and Mixed_6e; pool3 (N, 2048); logits (N, 1008) with fc bias; logits_nobias (N, 1008);
    spatial_mixed6d_b1x1_first7_nhwc (N, 2023): the sFID tap (ADM 'mixed_6/conv'), Mixed_6d's 1x1 branch, first 7
    channels, HWC order; stage_means {stage: (N, C)}: spatial mean of each of the 16 STAGES' outputs (before any pool).
    """
    taps = {'stage_means': {}}

    def put(where, key, fn):
        return lambda module, inputs, out: where.__setitem__(key, fn(out))
    spatial_mean = lambda h: F.adaptive_avg_pool2d(h, 1).flatten(1)
    hooks = [getattr(model, s).register_forward_hook(put(taps['stage_means'], s, lambda h: h.mean((2, 3))))
             for s in STAGES]
    hooks += [getattr(model, name).register_forward_hook(put(taps, key, spatial_mean))
              for name, key in (('maxpool1', 'feat64'), ('maxpool2', 'feat192'), ('Mixed_6e', 'feat768'))]
    hooks.append(model.Mixed_6d.branch1x1.register_forward_hook(put(
        taps, 'spatial_mixed6d_b1x1_first7_nhwc', lambda h: h[:, :7].permute(0, 2, 3, 1).flatten(1))))
    try:
        pool3_N2048, logits_nobias = model(x_N3HW)
    finally:
        for h in hooks:
            h.remove()
    # logits as torch-fidelity forms them, (pool3 @ W^T) + b: a fused addmm (model.fc) rounds differently on some CPUs
    taps.update(pool3=pool3_N2048, logits=logits_nobias + model.fc.bias, logits_nobias=logits_nobias)
    return taps


@pytest.fixture(scope='module')
def rule(fixtures_dir):
    return fixture_module('weight_rule_inception')


@pytest.fixture(scope='module')
def parity(fixtures_dir):
    return torch.load(fixtures_dir / 'fid_inception_parity.pt', weights_only=True)


@pytest.fixture(scope='module')
def ref(fixtures_dir):
    return torch.load(fixtures_dir / 'frechet_reference.pt', weights_only=True)


@pytest.fixture(scope='module')
def rule_model(rule):
    """float32 FIDInceptionV3 with the deterministic rule weights, eval mode."""
    return rule.apply_rule(FIDInceptionV3()).eval().requires_grad_(False)


@pytest.fixture(scope='module')
def taps_f64(rule_model, parity):
    model = FIDInceptionV3().eval().requires_grad_(False)
    model.load_state_dict(rule_model.state_dict())
    model = model.double()
    with torch.no_grad():
        x = preprocess_uint8(parity['images_uint8_nhwc'], dtype=torch.float64, pipeline=FIXTURE_PIPELINE)
        return x, forward_taps(model, x)


@pytest.fixture(scope='module')
def taps_f32(rule_model, parity):
    with torch.no_grad():
        return forward_taps(rule_model, preprocess_uint8(parity['images_uint8_nhwc'], pipeline=FIXTURE_PIPELINE))


def _maxabs(a, b):
    return (torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max().item()


# ----------------------------------------------------------------------------- architecture

def test_state_dict_matches_manifest(fixtures_dir, parity):
    manifest = json.loads((fixtures_dir / 'fid_inception_state_dict_manifest.json').read_text())
    assert manifest['file_name'] == FID_WEIGHTS_NAME == parity['weights_file']['file_name']
    assert parity['weights_file']['url'] == FID_WEIGHTS_URL
    sd = FIDInceptionV3().state_dict()
    assert len(sd) == 566
    assert list(sd) == [e['key'] for e in manifest['keys']] == parity['state_dict_keys_module_order']
    for e in manifest['keys']:
        assert list(sd[e['key']].shape) == e['shape'], e['key']
        assert str(sd[e['key']].dtype) == e['dtype'], e['key']
    assert sum(v.numel() for v in sd.values()) == parity['weights_file']['num_parameters_and_buffers_elems']


def test_fid_variants_and_bn_eps():
    model = FIDInceptionV3()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 94 and all(m.eps == 1e-3 for m in bns)
    assert model.Mixed_7c.max_pool and not model.Mixed_7b.max_pool
    for name in ('Mixed_5b', 'Mixed_5c', 'Mixed_5d'):
        assert isinstance(getattr(model, name), features.FIDInceptionA)
    for name in ('Mixed_6b', 'Mixed_6c', 'Mixed_6d', 'Mixed_6e'):
        assert isinstance(getattr(model, name), features.FIDInceptionC)
    assert model.AuxLogits is None and model.fc.out_features == 1008


def test_rule_weights_checksums(rule_model, parity):
    # Guards the fixture plumbing: the model really carries the rule weights the outputs came from.
    sd = rule_model.state_dict()
    for k, s in parity['rule_checksums_sum_f64'].items():
        # a float64 sum's last bits depend on the reduction order (thread count): compare to 1e-12 relative
        assert sd[k].double().sum().item() == pytest.approx(s, rel=1e-12, abs=1e-12), k
    for k, vals in parity['rule_first_values'].items():
        assert sd[k].flatten()[:4].tolist() == vals, k


# ----------------------------------------------------------------------------- parity

def test_preprocess_parity(parity, taps_f64):
    x, _ = taps_f64
    pre = parity['preprocess']
    assert x.shape == (4, 3, 299, 299) and x.dtype == torch.float64
    assert _maxabs(x.mean((2, 3)), pre['input299_channel_mean_f64']) <= ATOL_F64
    assert _maxabs(x[:, :, :8, :8], pre['input299_patch_tl8_f64']) <= ATOL_F64
    assert _maxabs(x[:, :, 145:153, 145:153], pre['input299_patch_c8_f64']) <= ATOL_F64
    x32 = preprocess_uint8(torch.from_numpy(parity['images_uint8_nhwc'].numpy()), pipeline=FIXTURE_PIPELINE)
    # float32 resize computes source coordinates in float32 (~1.5e-5 px at 256 -> 299): ~1e-5 off.
    assert x32.dtype == torch.float32 and _maxabs(x32, x) < 1e-4


def test_preprocess_rejects_bad_input():
    with pytest.raises(TypeError):
        preprocess_uint8(np.zeros((1, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError):
        preprocess_uint8(np.zeros((1, 3, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match='pipeline'):
        preprocess_uint8(np.zeros((1, 8, 8, 3), dtype=np.uint8), pipeline='clean-fid')


def _check_outputs(taps, expected, atol_head, atol_early):
    taps = dict(taps, probs=taps['logits'].softmax(1), probs_nobias=taps['logits_nobias'].softmax(1))
    errs = {}
    for key in ('feat64', 'feat192', 'feat768', 'pool3', 'logits', 'logits_nobias', 'probs', 'probs_nobias',
                'spatial_mixed6d_b1x1_first7_nhwc'):
        assert taps[key].shape == expected[key].shape, key
        errs[key] = _maxabs(taps[key], expected[key])
    assert list(taps['stage_means']) == list(STAGES) == list(expected['stage_means'])
    for stage in STAGES:
        errs[stage] = _maxabs(taps['stage_means'][stage], expected['stage_means'][stage])
    tol = {k: atol_early for k in errs}
    tol.update({k: atol_head for k in ('pool3', 'logits', 'logits_nobias', 'probs', 'probs_nobias')})
    bad = {k: e for k, e in errs.items() if not e <= tol[k]}
    assert not bad, f'parity errors above tolerance: {bad}'


def test_inception_parity_float64(parity, taps_f64):
    _check_outputs(taps_f64[1], parity['outputs_f64'], ATOL_F64, ATOL_F64)
    # Differences between images (~1e-10) are only resolvable in float64.
    pool3 = taps_f64[1]['pool3']
    ref_pool3 = parity['outputs_f64']['pool3']
    assert _maxabs(pool3 - pool3.mean(0), ref_pool3 - ref_pool3.mean(0)) <= ATOL_F64


def test_inception_parity_float32(parity, taps_f32):
    _check_outputs(taps_f32, parity['outputs_f32'], ATOL_F32_HEAD, ATOL_F32_EARLY)


def test_inception_features_batched(parity, rule_model):
    # float32 keeps this cheap; the float64 path is covered by the parity test above.
    images = parity['images_uint8_nhwc'].numpy()
    pool3, logits = inception_features(images, rule_model, batch_size=3, progress=False,  # 3 + 1: remainder
                                       pipeline=FIXTURE_PIPELINE)
    assert pool3.dtype == logits.dtype == np.float64
    assert pool3.shape == (4, 2048) and logits.shape == (4, 1008)
    assert _maxabs(pool3, parity['outputs_f32']['pool3']) <= ATOL_F32_HEAD
    assert _maxabs(logits, parity['outputs_f32']['logits_nobias']) <= ATOL_F32_HEAD


# ----------------------------------------------------------------------------- ADM / TF1 preprocessing

FIDELITY_FEATURES = ('64', '192', '768', '2048', 'logits_unbiased', 'logits')
OUR_TAPS = ('feat64', 'feat192', 'feat768', 'pool3', 'logits_nobias', 'logits')


def _torch_fidelity_extractor(state_dict, tmp_path, dtype_name):
    """torch-fidelity's InceptionV3 (TF1 resize, (v - 128) / 128) loading our weights from a local file, strictly:
    no download (feature_extractor_weights_path), the same key names as pytorch-fid's file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    path = tmp_path / f'weights_{dtype_name}.pth'
    torch.save(state_dict, path)
    return FeatureExtractorInceptionV3('inception-v3-compat', list(FIDELITY_FEATURES),
                                       feature_extractor_weights_path=str(path),
                                       feature_extractor_internal_dtype=dtype_name)


@pytest.mark.parametrize('weights', ['rule', 'random'])
def test_fid_features_match_torch_fidelity(parity, rule_model, tmp_path, weights):
    """evaluate.py's FID / IS features (default pipeline 'adm') == torch-fidelity's on the same images and weights.
    float32: bit-identical; float64: torch-fidelity rounds its outputs to float32, so within a few float32 ulps.
    'rule': the fixture's deterministic weights (feat64 / feat192 resolve the resize, see README_fid_metrics.md);
    'random': torch's seeded default init, whose signal reaches pool3 (the real weights cannot be downloaded)."""
    if weights == 'rule':
        sd = rule_model.state_dict()
    else:
        torch.manual_seed(0)
        sd = FIDInceptionV3().state_dict()  # init_weights=False: PyTorch's default layer init
    images = parity['images_uint8_nhwc']
    wants = {}
    for dtype, name in ((torch.float32, 'float32'), (torch.float64, 'float64')):
        theirs = _torch_fidelity_extractor(sd, tmp_path, name)
        ours = FIDInceptionV3().eval().requires_grad_(False)
        ours.load_state_dict(sd)
        ours = ours.to(dtype)
        with torch.no_grad():
            want = wants[name] = dict(zip(OUR_TAPS, theirs(images.permute(0, 3, 1, 2).contiguous())))
            taps = forward_taps(ours, preprocess_uint8(images, dtype=dtype))
        for key in OUR_TAPS:
            got = taps[key].float()
            if dtype == torch.float32:
                assert torch.equal(got, want[key]), (weights, name, key, _maxabs(got, want[key]))
            else:
                # a few float32 ulps (measured <= 4), far below what a different resize changes (>= 5e-5 relative)
                tol = 1e-6 * want[key].abs().max().item()
                assert _maxabs(got, want[key]) <= tol, (weights, name, key, _maxabs(got, want[key]), tol)
    if weights == 'random':  # and the batched path that evaluate.py runs
        model = FIDInceptionV3().eval().requires_grad_(False)
        model.load_state_dict(sd)
        # one batch of 4 as above: the fc matmul's last bits depend on the batch size
        pool3, logits = inception_features(images.numpy(), model, batch_size=4, progress=False)
        assert np.array_equal(pool3, wants['float32']['pool3'].double().numpy())
        assert np.array_equal(logits, wants['float32']['logits_nobias'].double().numpy())


def test_adm_resize_is_the_tf1_rule(parity, taps_f64):
    """The 'adm' pipeline against the fixture's own, independent TF1 legacy-bilinear emulation: switching the fixture's
    pytorch-fid preprocessing to it moves the input and the features by the amounts the fixture recorded for
    'tf1_legacy_bilinear' (to 1e-4 relative; the next variant, (v - 128) / 128 alone, is 1.4% away in feat64)."""
    x_fid, taps_fid = taps_f64
    images = parity['images_uint8_nhwc']
    x_adm = preprocess_uint8(images, dtype=torch.float64)
    # TF1 legacy ResizeBilinear by hand at a few pixels: source = dest * in / out, floor, lerp, clamp at the edge
    img = images.permute(0, 3, 1, 2).double()
    scale = 256 / 299
    for oy, ox in ((0, 0), (1, 7), (150, 151), (298, 298), (297, 5)):
        sy, sx = oy * scale, ox * scale
        y0, x0 = int(sy), int(sx)
        y1, x1 = min(y0 + 1, 255), min(x0 + 1, 255)
        dy, dx = sy - y0, sx - x0
        top = img[..., y0, x0] + (img[..., y0, x1] - img[..., y0, x0]) * dx
        bot = img[..., y1, x0] + (img[..., y1, x1] - img[..., y1, x0]) * dx
        want = (top + (bot - top) * dy - 128) / 128
        assert _maxabs(x_adm[..., oy, ox], want) < 1e-5, (oy, ox)
    sens = parity['preprocess_variant_sensitivity_maxabs_f64']['tf1_legacy_bilinear']
    model = FIDInceptionV3().eval().requires_grad_(False)
    model.load_state_dict(fixture_module('weight_rule_inception').apply_rule(FIDInceptionV3()).state_dict())
    with torch.no_grad():
        taps_adm = forward_taps(model.double(), x_adm)
    assert _maxabs(x_adm, x_fid) == pytest.approx(sens['input299'], rel=1e-4)
    for key in ('feat64', 'feat192', 'feat768'):
        assert _maxabs(taps_adm[key], taps_fid[key]) == pytest.approx(sens[key], rel=1e-4), key


# ----------------------------------------------------------------------------- loader

def test_load_missing_offline(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(SystemExit) as exc:
        load_fid_inception(tmp_path / 'ckpt')
    msg = str(exc.value.code)
    assert FID_WEIGHTS_NAME in msg and FID_WEIGHTS_URL in msg and str(tmp_path / 'ckpt') in msg
    assert not (tmp_path / 'ckpt').exists()


def test_load_download_failure_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)

    def broken_download(url, dst, progress=True):
        assert url == FID_WEIGHTS_URL
        open(dst, 'wb').write(b'partial')
        raise OSError('Network is unreachable')

    monkeypatch.setattr(torch.hub, 'download_url_to_file', broken_download)
    monkeypatch.setattr(checkpoints, 'hub_unreachable', lambda url=None: None)  # the host answers; the download breaks
    with pytest.raises(SystemExit) as exc:
        load_fid_inception(tmp_path)
    msg = str(exc.value.code)
    assert 'Network is unreachable' in msg and FID_WEIGHTS_URL in msg and FID_WEIGHTS_NAME in msg
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope='module')
def rule_weights_file(rule_model, tmp_path_factory):
    # Like the real file may be: a plain dict without the num_batches_tracked counters.
    path = tmp_path_factory.mktemp('w') / FID_WEIGHTS_NAME
    torch.save({k: v for k, v in rule_model.state_dict().items() if not k.endswith('num_batches_tracked')}, path)
    return path


def test_load_via_download_is_atomic(tmp_path, monkeypatch, rule_weights_file, rule_model):
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    seen = []

    def fake_download(url, dst, progress=True):
        seen.append(dst)
        shutil.copyfile(rule_weights_file, dst)

    monkeypatch.setattr(torch.hub, 'download_url_to_file', fake_download)
    monkeypatch.setattr(checkpoints, 'hub_unreachable', lambda url=None: None)  # the host answers (the download is faked)
    model = load_fid_inception(tmp_path / 'ckpt')
    assert seen and not seen[0].endswith(FID_WEIGHTS_NAME)  # written under a temp name first
    assert sorted(p.name for p in (tmp_path / 'ckpt').iterdir()) == [FID_WEIGHTS_NAME]
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    loaded = model.state_dict()
    assert list(loaded) == list(rule_model.state_dict())
    assert all(torch.equal(loaded[k], v) for k, v in rule_model.state_dict().items())


@pytest.mark.parametrize('content, expect', [
    ({'foo': torch.zeros(3)}, ["'foo'", '1 entries', '566']),
    ([torch.zeros(3)], ['list']),
])
def test_load_wrong_file(tmp_path, monkeypatch, content, expect):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    torch.save(content, tmp_path / FID_WEIGHTS_NAME)
    with pytest.raises(SystemExit) as exc:
        load_fid_inception(tmp_path)
    msg = str(exc.value.code)
    assert str(tmp_path / FID_WEIGHTS_NAME) in msg
    for part in expect:
        assert part in msg
    assert len(msg) < 600  # one paragraph, not a load_state_dict dump


def test_load_truncated_file(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    torch.save({'fc.weight': torch.zeros(1008, 2048)}, tmp_path / 'full.pth')
    (tmp_path / FID_WEIGHTS_NAME).write_bytes((tmp_path / 'full.pth').read_bytes()[:5000])
    with pytest.raises(SystemExit) as exc:
        load_fid_inception(tmp_path)
    msg = str(exc.value.code)
    assert 'truncated' in msg and FID_WEIGHTS_URL in msg and len(msg) < 600


def test_load_reports_shape_mismatch(rule_model, tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    sd = dict(rule_model.state_dict())
    sd['fc.weight'] = torch.zeros(1000, 2048)
    torch.save(sd, tmp_path / FID_WEIGHTS_NAME)
    with pytest.raises(SystemExit) as exc:
        load_fid_inception(tmp_path)
    msg = str(exc.value.code)
    assert 'fc.weight' in msg and '(1000, 2048)' in msg and '(1008, 2048)' in msg and len(msg) < 600
    assert str(tmp_path / FID_WEIGHTS_NAME) in msg and FID_WEIGHTS_URL in msg


# ----------------------------------------------------------------------------- Fréchet distance

def test_feature_stats_and_frechet_reference(ref):
    for name, case in ref['frechet'].items():
        mu1, sigma1 = feature_stats(case['x1'].numpy())
        mu2, sigma2 = feature_stats(case['x2'].numpy())
        for got, want in ((mu1, case['mu1']), (sigma1, case['sigma1']), (mu2, case['mu2']), (sigma2, case['sigma2'])):
            assert got.dtype == np.float64
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-12, atol=1e-15, err_msg=name)
        rtol = 1e-6 if 'singular' in name else 1e-9
        fd_stored = frechet_distance(case['mu1'].numpy(), case['sigma1'].numpy(),
                                     case['mu2'].numpy(), case['sigma2'].numpy())
        fd_raw = frechet_distance(mu1, sigma1, mu2, sigma2)
        assert isinstance(fd_stored, float)
        np.testing.assert_allclose(fd_stored, case['fd_standard'], rtol=rtol, err_msg=name)
        np.testing.assert_allclose(fd_raw, case['fd_standard'], rtol=rtol, err_msg=name)
        np.testing.assert_allclose(fd_stored, case['fd_eigen_psd'], rtol=rtol, err_msg=name)


def test_frechet_eps_fallback_on_nonfinite_sqrtm(ref, monkeypatch):
    case = ref['frechet']['fd_200x16_vs_300x16']
    real_sqrtm = iscs.scipy.linalg.sqrtm
    calls = []

    def sqrtm_nan_first(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(iscs.scipy.linalg, 'sqrtm', sqrtm_nan_first)
    fd = frechet_distance(case['mu1'].numpy(), case['sigma1'].numpy(), case['mu2'].numpy(), case['sigma2'].numpy())
    assert len(calls) == 2
    np.testing.assert_allclose(fd, case['fd_forced_eps_offset'], rtol=1e-9)


def test_frechet_rejects_large_imaginary(ref, monkeypatch):
    case = ref['frechet']['fd_400x8_vs_500x8_same_dist']
    monkeypatch.setattr(iscs.scipy.linalg, 'sqrtm', lambda a: np.eye(len(a)) * (1 + 0.01j))
    with pytest.raises(ValueError, match='imaginary'):
        frechet_distance(case['mu1'].numpy(), case['sigma1'].numpy(), case['mu2'].numpy(), case['sigma2'].numpy())
    # Small imaginary parts (round-off) are dropped.
    monkeypatch.setattr(iscs.scipy.linalg, 'sqrtm', lambda a: np.eye(len(a)) * (1 + 1e-4j))
    d = len(case['mu1'])
    assert frechet_distance(np.zeros(d), np.eye(d), np.zeros(d), np.eye(d)) == pytest.approx(0.0)


def test_frechet_shape_checks():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError):
        feature_stats(np.zeros((1, 5)))


# ----------------------------------------------------------------------------- precision / recall

@pytest.mark.parametrize('k', [3, 5])
@pytest.mark.parametrize('block', [10000, 64, 4])
def test_precision_recall_reference(ref, k, block):
    pr = ref['precision_recall']
    want = pr[f'k{k}']
    precision, recall = precision_recall(pr['real'].numpy(), pr['fake'].numpy(), k=k, block=block)
    assert precision == want['precision'] and recall == want['recall']
    for feats, radii in ((pr['real'], want['radii_real']), (pr['fake'], want['radii_fake'])):
        torch.testing.assert_close(kth_nn_sq_radii(feats, k, block).sqrt(), radii, rtol=1e-12, atol=1e-12)


def test_precision_recall_rejects_nan(ref):
    real = ref['precision_recall']['real'].numpy().copy()
    real[3, 2] = np.nan
    with pytest.raises(ValueError, match='NaN'):
        precision_recall(real, ref['precision_recall']['fake'].numpy())


# ----------------------------------------------------------------------------- Inception Score

def test_inception_score_reference_unshuffled(ref):
    isr = ref['inception_score']
    logits = isr['logits_f32'].numpy()
    mean, std = inception_score(logits, splits=isr['splits'], shuffle_seed=None)
    np.testing.assert_allclose(mean, isr['is_mean'], rtol=1e-10)
    np.testing.assert_allclose(std, isr['is_std_ddof0'], rtol=1e-10)
    np.testing.assert_allclose(inception_score_per_split(logits, isr['splits'], None), isr['per_split'].numpy(),
                               rtol=1e-10)


def test_inception_score_shuffle():
    # 200 class-ordered samples over 20 classes: each contiguous chunk sees only 2 classes.
    labels = np.repeat(np.arange(20), 10)
    logits = 8.0 * np.eye(20)[labels]
    unshuffled, _ = inception_score(logits, shuffle_seed=None)
    shuffled, shuffled_std = inception_score(logits, shuffle_seed=0)
    assert np.isfinite(shuffled) and np.isfinite(shuffled_std)
    assert shuffled > 2 * unshuffled
    assert inception_score(logits, shuffle_seed=0) == (shuffled, shuffled_std)
    # Contiguous chunks [i*N//splits, (i+1)*N//splits) when N is not divisible by splits.
    rng = np.random.default_rng(1)
    noisy = rng.normal(size=(195, 30)) * 3
    p = np.exp(noisy) / np.exp(noisy).sum(1, keepdims=True)
    naive = [np.exp(np.mean(np.sum(c * (np.log(c) - np.log(c.mean(0))), 1)))
             for c in (p[i * 195 // 10:(i + 1) * 195 // 10] for i in range(10))]
    np.testing.assert_allclose(inception_score_per_split(noisy, 10, None), naive, rtol=1e-12)
    with pytest.raises(ValueError):
        inception_score(np.full((20, 5), np.nan))


def test_paired_fid_bootstrap_signs_and_pairing():
    rng = np.random.default_rng(0)
    ref_mu, ref_sigma = np.zeros(4), np.eye(4)
    base = rng.standard_normal((400, 4)) + np.array([1.0, 0, 0, 0])  # off the reference by a shift
    better = base - np.array([0.8, 0, 0, 0])
    worse = base + np.array([0.5, 0, 0, 0])
    same = base.copy()
    out = iscs.paired_fid_bootstrap([base, better, worse, same], ref_mu, ref_sigma, n_boot=50)
    b, w, s = out
    assert b['ci95'][1] < 0 and b['p_lower'] == 1.0
    assert w['ci95'][0] > 0 and w['p_lower'] == 0.0
    assert s['ci95'] == [0.0, 0.0] and s['p_lower'] == 0.0 and s['n_boot'] == 50
    # pairing is what makes a small, consistent change visible: the same shift on unrelated draws of the
    # base set gives a wider interval
    other = rng.standard_normal((400, 4)) + np.array([1.0, 0, 0, 0]) + np.array([0.05, 0, 0, 0])
    paired = iscs.paired_fid_bootstrap([base, base + np.array([0.05, 0, 0, 0])], ref_mu, ref_sigma, 50)[0]
    unpaired = iscs.paired_fid_bootstrap([base, other], ref_mu, ref_sigma, 50)[0]
    assert paired['ci95'][0] > 0
    assert paired['ci95'][1] - paired['ci95'][0] < (unpaired['ci95'][1] - unpaired['ci95'][0]) / 3
