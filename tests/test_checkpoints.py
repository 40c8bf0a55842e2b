"""Clear errors for missing / wrong / corrupt checkpoints, and the guidance hook contract of the sampler."""
import pytest
import torch

import models


def test_missing_checkpoint_offline_says_what_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(SystemExit) as e:
        models.load_pretrained(16, ckpt_dir=tmp_path)
    msg = str(e.value)
    assert 'var_d16.pth' in msg and str(tmp_path) in msg and 'FoundationVision/var' in msg and 'HF_HUB_OFFLINE' in msg
    assert len(msg.splitlines()) == 1


def test_wrong_depth_checkpoint_names_what_the_file_is(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    # a depth-20 VAR with the real patch_nums/classes; narrow (width 64) so the file stays small
    _, var20 = models.build_vae_var(depth=20, embed_dim=64, num_heads=1, V=64, Cvae=8, ch=32)
    torch.save(var20.state_dict(), tmp_path / 'var_d16.pth')
    (tmp_path / models.VAE_FILE).write_bytes(b'')
    with pytest.raises(SystemExit) as e:
        models.load_pretrained(16, ckpt_dir=tmp_path)
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
        models.load_state_dict_file(path)
    with pytest.raises(SystemExit, match='does not exist'):
        models.load_state_dict_file(tmp_path / 'nope.pth')


def test_vae_file_given_as_var_is_named(tmp_path):
    vae, var = models.build_tiny()
    torch.save(vae.state_dict(), tmp_path / 'x.pth')
    with pytest.raises(SystemExit, match=r'is a VQ-VAE \(vocab 256'):
        models.load_checked(var, models.load_state_dict_file(tmp_path / 'x.pth'), tmp_path / 'x.pth', 'the tiny VAR')


def test_official_training_checkpoint_is_unwrapped(tmp_path):
    _, var = models.build_tiny()
    torch.save({'trainer': {'var_wo_ddp': var.state_dict()}, 'epoch': 3}, tmp_path / 'ar-ckpt-best.pth')
    sd = models.load_state_dict_file(tmp_path / 'ar-ckpt-best.pth')
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
        models.load_checked(dst, models.load_state_dict_file(tmp_path / 'vae.pth'), tmp_path / 'vae.pth', 'a VQ-VAE')
        assert torch.equal(dst.quantize.embedding.weight, src.quantize.embedding.weight)
        assert dst.quantize.ema_vocab_hit_SV.shape == (3, 64) and not dst.quantize.ema_vocab_hit_SV.is_meta


# ---------------------------------------------------------------------------------- injector files: safetensors, old .pt

def test_shipped_injector_is_safetensors_with_readable_metadata():
    """The field's tools read the metadata without this project: preset, depth, w_train, verdict, the VAR's sha256."""
    from safetensors import safe_open
    path = models.TINY_DIR / models.TINY_FILES['injector']
    assert path.suffix == '.safetensors'
    with safe_open(str(path), framework='pt') as f:
        md = f.metadata()
    assert md['format'] == 'aid-var injector 1' and md['preset'] == 'tiny' and md['depth'] == 'None'
    assert md['w_train'] == '0.1' and md['verdict'] == 'no measurable effect'
    _, var = models.load_tiny()
    assert md['var_sha256'] == models.weights_sha256(var)  # trained on the shipped VAR, as loaded


def test_old_pt_injector_loads_the_same_weights(tmp_path):
    _, var = models.load_tiny()
    inj, meta = models.load_injector(models.TINY_DIR / models.TINY_FILES['injector'], var)
    torch.save({'meta': meta, 'state_dict': inj.state_dict()}, tmp_path / 'old.pt')  # the format before safetensors
    old, old_meta = models.load_injector(tmp_path / 'old.pt', var)
    assert old_meta == meta
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), inj.state_dict().values()))


def test_safetensors_round_trip_and_foreign_files(tmp_path):
    import safetensors.torch
    _, var = models.load_tiny()
    torch.manual_seed(0)
    inj = models.GuidanceInjector(var.C, var.patch_nums)
    torch.nn.init.normal_(inj.proj_out.weight)
    models.save_injector(tmp_path / 'a.safetensors', inj, dict(depth=None, w_train=0.5, inject='input'))
    back, meta = models.load_injector(tmp_path / 'a.safetensors', var)
    assert meta['w_train'] == 0.5 and meta['embed_dim'] == var.C and meta['depth'] is None
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), inj.state_dict().values()))
    safetensors.torch.save_file({'w': torch.zeros(2)}, str(tmp_path / 'plain.safetensors'))  # no AID-VAR metadata
    (tmp_path / 'cut.safetensors').write_bytes((tmp_path / 'a.safetensors').read_bytes()[:500])
    for name, what in (('plain', 'not an AID-VAR injector file'), ('cut', 'not a readable safetensors file')):
        with pytest.raises(SystemExit, match=what):
            models.load_injector(tmp_path / f'{name}.safetensors', var)


def test_sample_warns_when_the_injector_was_trained_on_another_var(tmp_path, capsys):
    """--plant shift changes the VAR's weights: the shipped injector (trained on the clean VAR) says so."""
    import sample
    sample.main(['--w', '0.1', '--classes', '0', '--num_per_class', '2', '--plant', 'shift', '--out_dir', str(tmp_path)])
    assert 'was trained on another VAR' in capsys.readouterr().err
    sample.main(['--w', '0.1', '--classes', '0', '--num_per_class', '2', '--out_dir', str(tmp_path / 'clean')])
    assert 'was trained on another VAR' not in capsys.readouterr().err
