"""The AID-VAR parts: shapes data, D (heads, DiffAugment, hinge), the injector."""
import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from data import SHAPE_CLASSES, ShapesDataset, make_shapes
import models
from checkpoints import load_dino
from models import BatchNormLocal, GuidanceInjector, ProjectedDiscriminator, build_dino, diff_augment

VAR_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
TINY_PATCH_NUMS = (1, 2, 3, 4, 6, 8)


# ---------------------------------------------------------------- shapes data

def test_make_shapes_deterministic_and_balanced():
    im_a, lab_a = make_shapes(200, seed=3)
    im_b, lab_b = make_shapes(200, seed=3, chunk=37)  # chunking must not change the result
    im_c, lab_c = make_shapes(200, seed=4)
    assert im_a.shape == (200, 32, 32, 3) and im_a.dtype == np.uint8
    assert lab_a.shape == (200,) and lab_a.dtype == np.int64
    assert np.array_equal(im_a, im_b) and np.array_equal(lab_a, lab_b)
    assert not np.array_equal(im_a, im_c)
    assert len(SHAPE_CLASSES) == 10
    assert np.bincount(lab_a, minlength=10).tolist() == [20] * 10
    counts = np.bincount(make_shapes(23, seed=0)[1], minlength=10)
    assert counts.max() - counts.min() <= 1
    assert im_a.min() < 40 and im_a.max() > 215  # uses the range


def test_make_shapes_shape_occupies_plausible_fraction():
    images, labels = make_shapes(300, seed=0)
    x = images.astype(np.float32) / 255
    luma = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    border = np.concatenate([luma[:, 0], luma[:, -1], luma[:, :, 0], luma[:, :, -1]], axis=1)
    # the fill differs from the background base by >= 0.4 in luminance; background varies < ~0.15
    frac = (np.abs(luma - np.median(border, axis=1)[:, None, None]) > 0.2).mean(axis=(1, 2))
    assert frac.min() > 0.02 and frac.max() < 0.7
    for k in range(10):
        assert 0.04 < frac[labels == k].mean() < 0.5, SHAPE_CLASSES[k]
    # anti-aliasing: edge pixels take intermediate values between background and fill
    dist = np.abs(luma - np.median(border, axis=1)[:, None, None])
    assert ((dist > 0.08) & (dist < 0.3)).mean() > 0.01
    # circle is the roundest class, cross the sparsest: classes differ in area
    assert frac[labels == 0].mean() > frac[labels == 4].mean()


def test_shapes_dataset_item():
    ds = ShapesDataset(20, seed=1, size=32)
    img, label = ds[3]
    assert len(ds) == 20 and img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label < 10
    assert img.min() >= -1 and img.max() <= 1


# ---------------------------------------------------------------- DiffAugment

def test_diff_augment_shape_grad_and_generator():
    for size in (32, 256):
        x = torch.rand(2, 3, size, size, requires_grad=True)
        y = diff_augment(x * 2 - 1)
        assert y.shape == x.shape
        y.square().sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(diff_augment(x, generator=g1), diff_augment(x, generator=g2))


def _shift_zero_fill(x_3HW, dy, dx):
    out = torch.zeros_like(x_3HW)
    H, W = x_3HW.shape[-2:]
    ys, xs = slice(max(0, -dy), min(H, H - dy)), slice(max(0, -dx), min(W, W - dx))
    yd, xd = slice(max(0, dy), min(H, H + dy)), slice(max(0, dx), min(W, W + dx))
    out[:, ys, xs] = x_3HW[:, yd, xd]  # out[i, j] = x[i + dy, j + dx]
    return out


def test_diff_augment_translation_is_zero_filled_shift():
    x = torch.rand(8, 3, 32, 32) + 0.5  # strictly positive, so zeros only come from the fill
    y = diff_augment(x, policy='translation', generator=torch.Generator().manual_seed(1))
    s = int(32 * 0.125 + 0.5)
    shifts = []
    for b in range(8):
        match = [(dy, dx) for dy in range(-s, s + 1) for dx in range(-s, s + 1)
                 if torch.equal(y[b], _shift_zero_fill(x[b], dy, dx))]
        assert len(match) == 1, f'sample {b} is not a zero-filled shift within +-{s}'
        shifts.append(match[0])
    assert any(sh != (0, 0) for sh in shifts)
    assert len(set(shifts)) > 1  # per-sample randomness


def test_diff_augment_cutout_zeroes_a_square():
    size = 32
    cut = int(size * 0.2 + 0.5)
    x = torch.ones(32, 3, size, size)
    y = diff_augment(x, policy='cutout', generator=torch.Generator().manual_seed(2))
    full = 0
    for b in range(32):
        zero = (y[b] == 0).all(0)
        assert torch.equal((y[b] == 0).any(0), zero)  # same hole in every channel
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        assert len(rows) > 0
        box = torch.zeros_like(zero)
        box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        assert torch.equal(zero, box)  # the hole is one axis-aligned rectangle...
        h, w = len(rows), len(cols)
        assert h <= cut and w <= cut  # ...a square of side `cut`, clipped at the borders
        inner = rows.min() > 0 and rows.max() < size - 1 and cols.min() > 0 and cols.max() < size - 1
        if inner:
            assert h == w == cut
            full += 1
        assert (y[b][:, ~zero] == 1).all()  # everything else untouched
    assert full > 0


# ---------------------------------------------------------------- discriminator

def _tiny_vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2, num_classes=0)


def test_disc_shapes_freezing_and_training():
    D = ProjectedDiscriminator(_tiny_vit(), num_classes=10)
    assert D.hooks == [0, 1, 2, 3] and len(D.heads) == 5 and D.num_tokens == 64
    D.train()
    assert not D.backbone.training and all(h.training for h in D.heads)
    D.requires_grad_(True)  # a GAN loop toggling D must not unfreeze the backbone
    assert not any(p.requires_grad for p in D.backbone.parameters())
    assert all(p.requires_grad for p in D.heads.parameters())

    torch.manual_seed(1)
    real, fake = torch.rand(8, 3, 32, 32) * 2 - 1, torch.rand(8, 3, 32, 32) * 2 - 1
    y = torch.randint(0, 10, (8,))
    out = D(real, y)
    assert out.shape == (8, 5 * 64) and torch.isfinite(out).all()

    bb_before = {k: v.clone() for k, v in D.backbone.state_dict().items()}
    heads_before = [p.detach().clone() for p in D.head_parameters()]
    opt = torch.optim.Adam([p for p in D.parameters() if p.requires_grad], lr=1e-2)
    # distinct fake labels: with identical ones and every logit inside the margin, the cls-conv
    # bias gradients of real and fake cancel exactly
    models.hinge_d_loss(D(real, y), D(fake, (y + 1) % 10)).backward()
    assert all(p.grad is None for p in D.backbone.parameters())
    opt.step()
    for k, v in D.backbone.state_dict().items():
        assert torch.equal(v, bb_before[k]), k
    changed = [not torch.equal(a, b.detach()) for a, b in zip(heads_before, D.head_parameters())]
    assert all(changed)


def test_disc_gradient_reaches_image_and_r1_double_backward():
    D = ProjectedDiscriminator(_tiny_vit(), num_classes=10).train()
    x = (torch.rand(8, 3, 32, 32) * 2 - 1).requires_grad_(True)
    y = torch.randint(0, 10, (8,))
    (g,) = torch.autograd.grad(D(x, y, double_backward=True).sum(), x, create_graph=True)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    # R1 = gamma/2 * E||grad||^2 must itself be differentiable w.r.t. the heads
    r1 = g.square().sum(dim=(1, 2, 3)).mean()
    r1.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in D.head_parameters())


def test_batchnorm_local_groups_are_independent():
    D = ProjectedDiscriminator(_tiny_vit(), num_classes=10, diffaug=False).eval()
    x = torch.rand(16, 3, 32, 32) * 2 - 1
    y = torch.randint(0, 10, (16,))
    with torch.no_grad():
        a = D(x, y)
        x2 = x.clone()
        x2[0] = -x2[0]
        b = D(x2, y)
    assert torch.equal(a[8:], b[8:])  # other virtual batch: untouched
    assert not torch.allclose(a[1:8], b[1:8])  # same group: statistics shared
    with pytest.raises(ValueError):
        BatchNormLocal(4)(torch.randn(11, 4, 5))  # 11 does not split into 2 equal groups


def test_disc_without_norm_scores_each_image_alone():
    # norm 'none' (--disc_norm none): a sample's logits do not depend on the rest of its batch
    D = ProjectedDiscriminator(_tiny_vit(), num_classes=10, diffaug=False, norm='none').eval()
    assert not any(isinstance(m, BatchNormLocal) for m in D.modules())
    x, y = torch.rand(8, 3, 32, 32) * 2 - 1, torch.randint(0, 10, (8,))
    with torch.no_grad():
        a = D(x, y)
        x2 = x.clone()
        x2[0] = -x2[0]
        b = D(x2, y)
        single = D(x[3:4], y[3:4])
    assert not torch.allclose(a[0], b[0]) and torch.equal(a[1:], b[1:])
    assert torch.allclose(a[3:4], single, atol=1e-5)
    # the conv weights keep their keys, so the only difference between the two state dicts is the norms'
    bn_keys = set(ProjectedDiscriminator(_tiny_vit(), num_classes=10).heads_state_dict())
    assert set(D.heads_state_dict()) < bn_keys
    with pytest.raises(ValueError, match='unknown discriminator norm'):
        ProjectedDiscriminator(_tiny_vit(), num_classes=10, norm='layer')


def test_disc_heads_state_dict_roundtrip():
    D1 = ProjectedDiscriminator(_tiny_vit(), num_classes=10, diffaug=False).eval()
    D2 = ProjectedDiscriminator(_tiny_vit(), num_classes=10, diffaug=False).eval()
    # _tiny_vit reseeds, so both start with the same heads: make D2's differ in every floating tensor first
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for t in D2.heads_state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=gen) * 0.1)
    sd = D1.heads_state_dict()
    assert not any(k.startswith('backbone') for k in sd)
    assert sd.keys() == D2.heads_state_dict().keys()
    assert all(not torch.equal(v, D2.heads_state_dict()[k]) for k, v in sd.items() if v.is_floating_point())
    x, y = torch.rand(8, 3, 32, 32) * 2 - 1, torch.randint(0, 10, (8,))
    with torch.no_grad():
        assert not torch.allclose(D1(x, y), D2(x, y))
    D2.load_heads_state_dict(sd)
    assert all(torch.equal(v, D2.heads_state_dict()[k]) for k, v in sd.items())
    with torch.no_grad():
        assert torch.equal(D1(x, y), D2(x, y))


def test_dino_disc_layout_and_param_count(tmp_path):
    bb = build_dino()
    D = ProjectedDiscriminator(bb, num_classes=1000)
    assert D.hooks == [2, 5, 8, 11] and D.img_size == (224, 224) and D.num_tokens == 196
    assert sum(p.numel() for p in D.head_parameters()) == 5 * 1_565_568
    # 256 input: random crop or area resize to 224, 5 x 196 logits
    with torch.no_grad():
        out = D.eval()(torch.rand(2, 3, 256, 256) * 2 - 1, torch.tensor([0, 999]))
    assert out.shape == (2, 980) and torch.isfinite(out).all()
    # local checkpoint loading (official DINO naming == timm naming, plus a stray head)
    sd = {k: torch.randn_like(v) for k, v in bb.state_dict().items()}
    sd['head.weight'] = torch.zeros(3)
    torch.save(sd, tmp_path / 'dino.pth')
    bb2 = load_dino(ckpt=tmp_path / 'dino.pth')
    assert torch.equal(bb2.state_dict()['blocks.3.attn.qkv.weight'], sd['blocks.3.attn.qkv.weight'])


def test_dino_missing_weights_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    missing = tmp_path / 'nope' / 'dino.pth'
    with pytest.raises(SystemExit) as e:
        load_dino(ckpt=missing)
    msg = str(e.value.code)
    assert 'vit_small_patch16_224.dino' in msg and str(missing) in msg and 'hf download' in msg
    with pytest.raises(SystemExit) as e:
        load_dino(cache_dir=tmp_path / 'empty_cache')
    msg = str(e.value.code)
    assert 'vit_small_patch16_224.dino' in msg and 'empty_cache' in msg and 'offline' in msg
    assert '\n' not in msg


# ---------------------------------------------------------------- guidance injector

def test_injector_zero_at_init_every_scale():
    torch.manual_seed(0)
    G = GuidanceInjector(64, TINY_PATCH_NUMS)
    for si in range(1, len(TINY_PATCH_NUMS)):
        feat = torch.randn(3, TINY_PATCH_NUMS[si - 1] ** 2, 64)
        g = G(feat, si)
        assert g.shape == (3, TINY_PATCH_NUMS[si] ** 2, 64)
        assert torch.equal(g, torch.zeros_like(g))
    with pytest.raises(ValueError):
        G(torch.randn(1, 1, 64), 0)  # scale 0 is never guided


# exact counts, C = 64 * depth, 2 blocks, FFN 512: proj_in + proj_out 2 (C^2 + C), norm_out 2C, per block 4C^2 + 1033C
# + 512 (norms 4C, qkv 3C^2 + 3C, proj C^2 + C, fc1 512C + 512, fc2 512C + C): 10C^2 + 2070C + 1024 in all
@pytest.mark.parametrize('depth,count', [(16, 12_606_464), (20, 19_034_624), (24, 26_773_504)])
def test_injector_param_count(depth, count):
    with torch.device('meta'):
        G = GuidanceInjector(64 * depth, VAR_PATCH_NUMS)
    C = 64 * depth
    assert count == 10 * C * C + 2070 * C + 1024
    assert sum(p.numel() for p in G.parameters()) == count


def test_injector_trained_output_and_broadcast():
    torch.manual_seed(0)
    G = GuidanceInjector(64, VAR_PATCH_NUMS)
    Gb = GuidanceInjector(64, VAR_PATCH_NUMS, broadcast=True)
    with torch.no_grad():
        for m in (G, Gb):
            m.proj_out.weight.normal_(0, 0.02)
            m.proj_out.bias.normal_(0, 0.02)
    Gb.load_state_dict(G.state_dict())
    feat = torch.randn(2, 10 * 10, 64)
    g = G(feat, 8)
    assert g.shape == (2, 13 * 13, 64) and torch.isfinite(g).all() and g.abs().sum() > 0
    assert not torch.allclose(g[:, 0], g[:, 1])  # position-dependent
    gb = Gb(feat, 8)
    assert gb.shape == g.shape
    assert torch.equal(gb, gb[:, :1].expand_as(gb))
    assert torch.allclose(gb[:, 0], g.mean(1), atol=1e-6)
    # gradient reaches every parameter once the output layer is non-zero
    G(torch.randn(2, 3 * 3, 64), 3).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in G.parameters())


def test_injector_dtype_under_bf16_autocast():
    """Under bf16 autocast the guidance is bf16 whatever feat's dtype (proj_out is an autocast linear); without
    autocast it keeps feat's dtype."""
    G = GuidanceInjector(64, TINY_PATCH_NUMS)
    feat = torch.randn(2, 4, 64)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        g32, g16 = G(feat, 2), G(feat.bfloat16(), 2)
    assert g32.dtype == torch.bfloat16 and g32.shape == (2, 9, 64)
    assert g16.dtype == torch.bfloat16 and g16.shape == (2, 9, 64)
    assert G(feat, 2).dtype == torch.float32


def test_hinge_d_loss_values():
    """StyleGAN-T's hinge: relu(1 - real) + relu(1 + fake), each averaged; hard-coded values."""
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    assert models.hinge_d_loss(real, fake).item() == pytest.approx((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3)
