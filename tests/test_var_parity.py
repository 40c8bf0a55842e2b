"""Checkpoint-exactness of our VQVAE / VAR against the official implementation (tests/fixtures)."""
import json

import pytest
import torch

import models
import official_var
from conftest import fixture_module


@pytest.fixture(scope='module')
def parity(fixtures_dir):
    return torch.load(fixtures_dir / 'var_tiny_parity.pt')


@pytest.fixture(scope='module')
def manifest(fixtures_dir):
    return json.loads((fixtures_dir / 'var_state_manifest.json').read_text())


def _spec_list(sd):
    return [(k, list(v.shape), str(v.dtype).replace('torch.', '')) for k, v in sd.items()]


@pytest.mark.parametrize('depth', [16, 20, 24, 30])
def test_state_dict_layout_matches_official(manifest, depth):
    vae, var = models.build_vae_var(device='meta', depth=depth)
    want = manifest['var'][f'd{depth}']
    assert _spec_list(var.state_dict()) == [(k, v['shape'], v['dtype']) for k, v in want['state_dict'].items()]
    assert sum(p.numel() for p in var.parameters()) == want['total_param_numel']
    assert var.C == want['derived']['C'] and var.L == want['derived']['L']
    want_vae = manifest['vae']
    assert _spec_list(vae.state_dict()) == [(k, v['shape'], v['dtype']) for k, v in want_vae['state_dict'].items()]
    assert sum(p.numel() for p in vae.parameters()) == want_vae['total_param_numel']
    assert not any(p.requires_grad for p in vae.parameters())
    assert vae.quantize.quant_resi.ticks.tolist() == want_vae['phi_ticks']
    assert [vae.quantize.quant_resi.index(si / 9) for si in range(10)] == want_vae['phi_index_per_scale']


def test_phi_index_table(parity):
    for SN, want in parity['phi_index_table_K4'].items():
        q = models.VectorQuantizer2(8, 4, v_patch_nums=tuple(range(1, int(SN) + 1)))
        assert [q.quant_resi.index(si / (int(SN) - 1)) for si in range(int(SN))] == want, SN


def _build(parity, fixtures_dir, dtype):
    rule = fixture_module('weight_rule')
    kw = parity['config']['build_vae_var_kwargs']
    vae, var = models.build_vae_var(device='cpu', **kw)
    spec = parity['state_dict_spec']
    assert _spec_list(vae.state_dict()) == [(k, list(s), d) for k, (s, d) in spec['vae'].items()]
    assert _spec_list(var.state_dict()) == [(k, list(s), d) for k, (s, d) in spec['var'].items()]
    vae.load_state_dict(rule.make_state_dict(rule.spec_from_state_dict(vae.state_dict()), kw['patch_nums']), strict=True)
    var.load_state_dict(rule.make_state_dict(rule.spec_from_state_dict(var.state_dict()), kw['patch_nums']), strict=True)
    vae, var = vae.to(dtype).eval(), var.to(dtype).eval()
    var.cond_drop_rate = 0.0
    return vae, var


TOL = {torch.float64: dict(feat=1e-10, img=1e-10), torch.float32: dict(feat=1e-5, img=3e-4)}


def _close(a, b, atol):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a.double() - b.double()).abs().max().item()
    assert err <= atol, f'max abs err {err:.3g} > {atol:.1g}'


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=['f64', 'f32'])
def test_vqvae_and_var_reproduce_official(parity, fixtures_dir, dtype):
    vae, var = _build(parity, fixtures_dir, dtype)
    ref = parity['float64' if dtype == torch.float64 else 'float32']
    tol = TOL[dtype]
    img = parity['inputs']['img'].to(dtype)
    with torch.no_grad():
        _close(vae.quant_conv(vae.encoder(img)), ref['vae_f'], tol['feat'])
        idx = vae.img_to_idxBl(img)
        assert [torch.equal(a, b) for a, b in zip(idx, ref['idx_Bl'])] == [True] * 4
        f = vae.quant_conv(vae.encoder(img))
        for a, b in zip(vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=True), ref['fhat_from_img']):
            _close(a, b, tol['feat'])
        for a, b in zip(vae.quantize.embed_to_fhat(vae.idxBl_to_h(idx), True, last_one=False), ref['fhat_from_idx']):
            _close(a, b, tol['feat'])
        _close(vae.idxBl_to_img(idx, same_shape=True, last_one=True), ref['recon_img'], tol['img'])
        if 'recon_img_per_scale' in ref:
            for a, b in zip(vae.idxBl_to_img(idx, same_shape=True, last_one=False), ref['recon_img_per_scale']):
                _close(a, b, tol['img'])
        x = vae.quantize.idxBl_to_var_input(idx)
        _close(x, ref['x_BLCv_wo_first_l'], tol['feat'])
        _close(var(parity['inputs']['label_tf'], x), ref['logits_BLV'], tol['feat'])


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=['f64', 'f32'])
def test_greedy_cfg_sampling_reproduces_official(parity, fixtures_dir, dtype, monkeypatch):
    vae, var = _build(parity, fixtures_dir, dtype)
    ref = parity['float64' if dtype == torch.float64 else 'float32']['ar']
    tol = TOL[dtype]
    seen_logits, seen_fhat = [], []
    orig_sample, orig_next = models.sample_with_top_k_top_p_, vae.quantize.get_next_autoregressive_input

    def spy_sample(logits_BlV, **kw):
        seen_logits.append(logits_BlV.clone())  # before top-k masks it in place
        return orig_sample(logits_BlV, **kw)

    def spy_next(si, SN, f_hat, h):
        out = orig_next(si, SN, f_hat, h)
        seen_fhat.append(out[0].clone())
        return out
    monkeypatch.setattr(official_var, 'sample_with_top_k_top_p_', spy_sample)
    monkeypatch.setattr(vae.quantize, 'get_next_autoregressive_input', spy_next)
    img, idx = var.autoregressive_infer_cfg(B=2, label_B=parity['inputs']['label_ar'], g_seed=0, cfg=1.5, top_k=1,
                                            top_p=0.0, more_smooth=False, ret_idx=True)
    assert [torch.equal(a, b) for a, b in zip(idx, ref['idx_Bl'])] == [True] * 4
    for a, b in zip(seen_logits, ref['logits_cfg']):
        _close(a, b, tol['feat'])
    _close(seen_fhat[-1], ref['f_hat'], tol['feat'])
    _close(img, ref['img'], tol['img'])


def test_stochastic_sampling_reproduces_official_rng_stream(parity, fixtures_dir):
    """top-k/top-p multinomial and more_smooth Gumbel draws consume the CPU generator exactly as the official code."""
    vae, var = _build(parity, fixtures_dir, torch.float64)
    ref, s, m = parity['float64'], parity['inputs']['sampled'], parity['inputs']['smooth']
    label = parity['inputs']['label_ar']
    img, idx = var.autoregressive_infer_cfg(2, label, g_seed=s['g_seed'], cfg=s['cfg'], top_k=s['top_k'], top_p=s['top_p'],
                                            ret_idx=True)
    assert all(torch.equal(a, b) for a, b in zip(idx, ref['ar_sampled']['idx_Bl']))
    _close(img, ref['ar_sampled']['img'], 1e-10)
    img = var.autoregressive_infer_cfg(2, label, g_seed=m['g_seed'], cfg=m['cfg'], top_k=m['top_k'], top_p=m['top_p'],
                                       more_smooth=True)
    _close(img, ref['ar_smooth']['img'], 1e-10)


def test_multiscale_quantizer_ten_scales(parity):
    q = parity['quant_multiscale']
    cfg = q['config']
    vae = models.VQVAE(vocab_size=cfg['vocab_size'], z_channels=cfg['z_channels'], ch=cfg['ch'],
                       v_patch_nums=tuple(cfg['v_patch_nums'])).double()
    quant = vae.quantize
    # the codebook and Phi weights come from the same rule as the main VQVAE (same keys and shapes)
    rule = fixture_module('weight_rule')
    vae.load_state_dict(rule.make_state_dict(rule.spec_from_state_dict(vae.state_dict())), strict=True)
    ref = q['float64']
    f = ref['f'].double()
    idx = quant.f_to_idxBl_or_fhat(f, to_fhat=False)
    assert all(torch.equal(a, b) for a, b in zip(idx, ref['idx_Bl']))
    assert [quant.quant_resi.index(si / 9) for si in range(10)] == ref['phi_index_per_scale']
    fh = quant.embed_to_fhat(vae.idxBl_to_h(idx), True, last_one=False)
    for a, b in zip(fh, ref['fhat_from_idx']):
        _close(a, b, 1e-10)
    _close(fh[-1], ref['fhat_last'], 1e-10)
    _close(quant.idxBl_to_var_input(idx), ref['x_BLCv_wo_first_l'], 1e-10)
    f_hat = torch.zeros_like(f)
    for si, (h, want) in enumerate(zip(vae.idxBl_to_h(idx), ref['next_ar_inputs'])):
        f_hat, nxt = quant.get_next_autoregressive_input(si, 10, f_hat, h)
        _close(nxt, want, 1e-10)
    ref32 = q['float32']
    vae32 = vae.float()
    idx32 = vae32.quantize.f_to_idxBl_or_fhat(f.float(), to_fhat=False)
    assert all(torch.equal(a, b) for a, b in zip(idx32, ref32['idx_Bl']))
    _close(vae32.quantize.embed_to_fhat(vae32.idxBl_to_h(idx32), True, last_one=True), ref32['fhat_last'], 1e-5)
    _close(vae32.quantize.idxBl_to_var_input(idx32), ref32['x_BLCv_wo_first_l'], 1e-5)


@pytest.mark.parametrize('c_in,c_out', [(32, 32), (32, 64)])
def test_resnet_block_in_place_keeps_values_and_gradients(c_in, c_out):
    """ResnetBlock runs SiLU and the residual add in place (sampling speed): its output and every gradient (input and
    weights, as soft decoding backpropagates through the decoder) equal the textbook out-of-place block's exactly."""
    torch.manual_seed(0)
    block = official_var.ResnetBlock(c_in, c_out)
    for p in block.parameters():  # GroupNorm's default affine (1, 0) would hide a wrong in-place order
        torch.nn.init.normal_(p, std=0.5)
    F = torch.nn.functional
    textbook = lambda x: block.nin_shortcut(x) + block.conv2(F.silu(block.norm2(block.conv1(F.silu(block.norm1(x))))))
    x0 = torch.randn(2, c_in, 8, 8)
    results = []
    for fn in (block, textbook):
        x = x0.clone().requires_grad_(True)
        block.zero_grad()
        y = fn(x)
        y.mul(torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append([y.detach(), x.grad] + [p.grad.clone() for p in block.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))
