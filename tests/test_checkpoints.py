"""Clear errors for missing / wrong / corrupt checkpoints, the guidance hook contract of the sampler, the preset object
and the one entry point that loads frozen models."""
import argparse

import pytest
import torch

import checkpoints
import models


def test_missing_checkpoint_offline_says_what_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(SystemExit) as e:
        checkpoints.load_pretrained(16, ckpt_dir=tmp_path)
    msg = str(e.value)
    assert 'var_d16.pth' in msg and str(tmp_path) in msg and 'FoundationVision/var' in msg and 'HF_HUB_OFFLINE' in msg
    assert len(msg.splitlines()) == 1


def test_wrong_depth_checkpoint_names_what_the_file_is(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    # a depth-20 VAR with the real patch_nums/classes; narrow (width 64) so the file stays small
    _, var20 = models.build_vae_var(depth=20, embed_dim=64, num_heads=1, V=64, Cvae=8, ch=32)
    torch.save(var20.state_dict(), tmp_path / 'var_d16.pth')
    (tmp_path / checkpoints.VAE_FILE).write_bytes(b'')
    with pytest.raises(SystemExit) as e:
        checkpoints.load_pretrained(16, ckpt_dir=tmp_path)
    msg = str(e.value)
    assert 'is a depth-20 VAR' in msg and 'depth-16 VAR' in msg and 'was asked for' in msg
    assert len(msg) < 600  # a sentence, not a state_dict dump


def test_truncated_checkpoint_is_reported_as_corrupt(tmp_path):
    vae, _ = models.build_tiny()
    path = tmp_path / 'vae.pth'
    torch.save(vae.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit, match='not a readable PyTorch checkpoint'):
        checkpoints.load_state_dict_file(path)
    with pytest.raises(SystemExit, match='no such file'):
        checkpoints.load_state_dict_file(tmp_path / 'nope.pth')


def test_vae_file_given_as_var_is_named(tmp_path):
    vae, var = models.build_tiny()
    torch.save(vae.state_dict(), tmp_path / 'x.pth')
    with pytest.raises(SystemExit, match=r'is a VQ-VAE \(vocab 256'):
        checkpoints.load_checked(var, checkpoints.load_state_dict_file(tmp_path / 'x.pth'), tmp_path / 'x.pth', 'the tiny VAR')


def test_official_training_checkpoint_is_unwrapped(tmp_path):
    _, var = models.build_tiny()
    torch.save({'trainer': {'var_wo_ddp': var.state_dict()}, 'epoch': 3}, tmp_path / 'ar-ckpt-best.pth')
    sd = checkpoints.load_state_dict_file(tmp_path / 'ar-ckpt-best.pth')
    assert sd.keys() == var.state_dict().keys()


@pytest.fixture(scope='module')
def random_tiny():
    torch.manual_seed(0)
    vae, var = models.build_tiny(init=True)
    return vae.eval(), var.eval()


@pytest.mark.parametrize('inject', ['input', 'head'])
def test_zero_guidance_hook_is_bit_identical(random_tiny, inject):
    vae, var = random_tiny
    labels = torch.tensor([0, 3, 7])
    kw = dict(g_seed=11, cfg=1.5, top_k=50, top_p=0.9, ret_idx=True)
    img0, idx0 = var.autoregressive_infer_cfg(3, labels, **kw)
    calls = []

    def hook(si, idx_prev):
        calls.append((si, idx_prev.shape))
        return torch.zeros(idx_prev.shape[0], var.patch_nums[si] ** 2, var.C)
    img1, idx1 = var.autoregressive_infer_cfg(3, labels, guidance_hook=hook, guidance_w=1.0, inject=inject, **kw)
    assert torch.equal(img0, img1) and all(torch.equal(a, b) for a, b in zip(idx0, idx1))
    # the hook sees every scale >= 1 with the previous scale's tokens
    assert calls == [(si, (3, var.patch_nums[si - 1] ** 2)) for si in range(1, len(var.patch_nums))]


def test_nonzero_guidance_changes_samples(random_tiny):
    vae, var = random_tiny
    labels = torch.tensor([0, 3, 7])
    base = var.autoregressive_infer_cfg(3, labels, g_seed=11, top_k=1)
    hook = lambda si, idx_prev: torch.randn(idx_prev.shape[0], var.patch_nums[si] ** 2, var.C, generator=torch.Generator().manual_seed(si))
    guided = var.autoregressive_infer_cfg(3, labels, g_seed=11, top_k=1, guidance_hook=hook, guidance_w=5.0)
    assert not torch.equal(base, guided)


def test_kv_cache_sampling_equals_teacher_forcing(random_tiny):
    """Greedy KV-cached sampling and a full masked teacher-forced pass on its own tokens give the same logits."""
    vae, var = random_tiny
    labels = torch.tensor([1, 2])
    _, idx = var.autoregressive_infer_cfg(2, labels, g_seed=0, cfg=0.0, top_k=1, ret_idx=True)
    logits = var(labels, vae.quantize.idxBl_to_var_input(idx))
    assert torch.equal(logits.argmax(-1), torch.cat(idx, 1))


def test_kv_cache_feeds_only_new_tokens(random_tiny):
    """Each stage runs the blocks on its own pn^2 tokens only; earlier keys/values come from the cache."""
    vae, var = random_tiny
    seen = []
    h = var.blocks[0].attn.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0].shape[1]), with_kwargs=True)
    var.autoregressive_infer_cfg(2, torch.tensor([1, 2]), g_seed=0, top_k=5)
    h.remove()
    assert seen == [pn * pn for pn in var.patch_nums]
    assert var.blocks[0].attn.cached_k is None  # cache cleared after sampling


def test_vae_file_loads_into_other_patch_nums(tmp_path):
    """Like the official quantizer: the per-scale usage buffer of a VAE file may have another number of scales."""
    src = models.VQVAE(vocab_size=64, z_channels=8, ch=32, v_patch_nums=(1, 2, 3, 4))
    torch.save(src.state_dict(), tmp_path / 'vae.pth')
    for device in ('cpu', 'meta'):
        with torch.device(device):
            dst = models.VQVAE(vocab_size=64, z_channels=8, ch=32, v_patch_nums=(1, 2, 4))
        checkpoints.load_checked(dst, checkpoints.load_state_dict_file(tmp_path / 'vae.pth'), tmp_path / 'vae.pth', 'a VQ-VAE')
        assert torch.equal(dst.quantize.embedding.weight, src.quantize.embedding.weight)
        assert dst.quantize.ema_vocab_hit_SV.shape == (3, 64) and not dst.quantize.ema_vocab_hit_SV.is_meta


# ---------------------------------------------------------------------------------- injector files: safetensors, old .pt

def test_shipped_injector_is_safetensors_with_readable_metadata():
    """The field's tools read the metadata without this project: preset, depth, w_train, verdict, the VAR's sha256."""
    from safetensors import safe_open
    path = checkpoints.TINY_DIR / checkpoints.TINY_FILES['injector']
    assert path.suffix == '.safetensors'
    with safe_open(str(path), framework='pt') as f:
        md = f.metadata()
    assert md['format'] == 'aid-var injector 1' and md['preset'] == 'tiny' and md['depth'] == 'None'
    assert md['w_train'] == '0.1' and md['verdict'] == 'no measurable effect'
    _, var = checkpoints.load_tiny()
    assert md['var_sha256'] == checkpoints.weights_sha256(var)  # trained on the shipped VAR, as loaded


def test_old_pt_injector_loads_the_same_weights(tmp_path):
    _, var = checkpoints.load_tiny()
    inj, meta = checkpoints.load_injector(checkpoints.TINY_DIR / checkpoints.TINY_FILES['injector'], var)
    torch.save({'meta': meta, 'state_dict': inj.state_dict()}, tmp_path / 'old.pt')  # the format before safetensors
    old, old_meta = checkpoints.load_injector(tmp_path / 'old.pt', var)
    assert old_meta == meta
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), inj.state_dict().values()))


def test_safetensors_round_trip_and_foreign_files(tmp_path):
    import safetensors.torch
    _, var = checkpoints.load_tiny()
    torch.manual_seed(0)
    inj = models.GuidanceInjector(var.C, var.patch_nums)
    torch.nn.init.normal_(inj.proj_out.weight)
    checkpoints.save_injector(tmp_path / 'a.safetensors', inj, dict(depth=None, w_train=0.5, inject='input'))
    back, meta = checkpoints.load_injector(tmp_path / 'a.safetensors', var)
    assert meta['w_train'] == 0.5 and meta['embed_dim'] == var.C and meta['depth'] is None
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), inj.state_dict().values()))
    safetensors.torch.save_file({'w': torch.zeros(2)}, str(tmp_path / 'plain.safetensors'))  # no AID-VAR metadata
    (tmp_path / 'cut.safetensors').write_bytes((tmp_path / 'a.safetensors').read_bytes()[:500])
    for name, what in (('plain', 'not an AID-VAR injector file'), ('cut', 'not a readable safetensors file')):
        with pytest.raises(SystemExit, match=what):
            checkpoints.load_injector(tmp_path / f'{name}.safetensors', var)


def test_sample_warns_when_the_injector_was_trained_on_another_var(tmp_path, capsys):
    """--plant shift changes the VAR's weights: the shipped injector (trained on the clean VAR) says so."""
    import sample
    sample.main(['--w', '0.1', '--classes', '0', '--num_per_class', '2', '--plant', 'shift', '--out_dir', str(tmp_path)])
    assert 'was trained on another VAR' in capsys.readouterr().err
    sample.main(['--w', '0.1', '--classes', '0', '--num_per_class', '2', '--out_dir', str(tmp_path / 'clean')])
    assert 'was trained on another VAR' not in capsys.readouterr().err


# ----------------------------------------------------------------------------- one preset object, one load entry point

def test_resolve_preset_names_the_parts_each_script_uses():
    tiny, d24, unknown = models.resolve_preset(None), models.resolve_preset(24), models.resolve_preset(None, 'real')
    assert (tiny.tiny, tiny.label, tiny.tag, tiny.resolution) == (True, 'tiny preset', 'tiny', 32)
    assert (tiny.fid_net, tiny.feature_net, tiny.judge, tiny.val_net) == ('featnet', 'featnet', True, 'judge')
    assert (d24.tiny, d24.label, d24.tag, d24.resolution, d24.depth) == (False, 'VAR-d24', 'd24', 256, 24)
    assert (d24.fid_net, d24.feature_net, d24.judge, d24.w_train) == ('inception', 'dino', False, 0.001)
    assert (unknown.tiny, unknown.label, unknown.resolution) == (False, 'the official VAR', 256)
    args = argparse.Namespace(depth=None, w_train=None, lr_g=0.5, unrelated=None)
    assert models.apply_preset(args).tiny and (args.w_train, args.lr_g, args.unrelated) == (0.1, 0.5, None)


def test_evaluate_reads_the_depth_from_the_files_preset_key():
    import evaluate
    smp = dict(preset='d24', shape=(2, 256, 256, 3), labels=None, meta={})
    preset = evaluate.check_samples([('a.npz', smp)], argparse.Namespace(depth=None, bootstrap=0))
    assert (preset.depth, preset.label, preset.fid_net) == (24, 'VAR-d24', 'inception')
    preset = evaluate.check_samples([('a.npz', dict(smp, preset=None))], argparse.Namespace(depth=None, bootstrap=0))
    assert (preset.tiny, preset.depth, preset.label) == (False, None, 'the official VAR')  # 256 px, no key: real


def test_load_frozen_plants_the_asked_error_and_seeds_random_weights():
    tiny = models.resolve_preset(None)
    _, planted = checkpoints.load_frozen(tiny, plant='shift')
    _, clean = checkpoints.load_tiny()
    assert checkpoints.weights_sha256(planted) != checkpoints.weights_sha256(clean)
    models.plant_error(clean, 'shift')
    assert checkpoints.weights_sha256(planted) == checkpoints.weights_sha256(clean)
    sha = lambda seed: checkpoints.weights_sha256(checkpoints.load_frozen(tiny, random_init=True, seed=seed)[1])
    assert sha(3) == checkpoints.weights_sha256(models.build_random(None, seed=3)[1]) and sha(3) != sha(4)


def test_download_helper_offline_unreachable_failing_and_working(monkeypatch):
    fetched = []
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(SystemExit, match=r'^X is missing, and it cannot be downloaded offline .* To get it: by hand\.$'):
        checkpoints.download('X is missing', 'by hand', lambda: fetched.append(1))
    monkeypatch.delenv('HF_HUB_OFFLINE')
    monkeypatch.setattr(checkpoints, 'hub_unreachable', lambda url=None: 'host:443 is not reachable')
    with pytest.raises(SystemExit, match='host:443 is not reachable'):
        checkpoints.download('X is missing', 'by hand', lambda: fetched.append(1))
    assert fetched == []  # neither case started the download
    monkeypatch.setattr(checkpoints, 'hub_unreachable', lambda url=None: None)

    def broken():
        raise ConnectionError('reset by peer')
    with pytest.raises(SystemExit, match=r'downloading it failed \(ConnectionError: reset by peer\)'):
        checkpoints.download('X is missing', 'by hand', broken)
    assert checkpoints.download('X is missing', 'by hand', lambda: 'path') == 'path'


def test_torch_load_is_one_line_with_its_hint(tmp_path):
    (tmp_path / 'g.pt').write_bytes(b'garbage' * 10)
    for path, what in ((tmp_path / 'g.pt', 'is not a readable D heads file'), (tmp_path / 'none.pt', 'no such file')):
        with pytest.raises(SystemExit) as e:
            checkpoints.torch_load(path, 'D heads file', 'Give the right one.')
        msg = str(e.value.code)
        assert str(path) in msg and what in msg and msg.endswith('Give the right one.') and '\n' not in msg


def test_eval_features_refuse_nan_weights():
    import features
    torch.manual_seed(0)
    judge = checkpoints.load_eval_net('judge', random_init=True)
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8).numpy()
    f, lg = features.extract('judge', images, judge, 2, progress=False)
    assert f.shape == (3, 128) and lg.shape == (3, 10)
    judge[0].weight.data[0, 0, 0, 0] = float('nan')
    with pytest.raises(SystemExit, match='judge network produced NaN / inf'):
        features.extract('judge', images, judge, 2, progress=False)
