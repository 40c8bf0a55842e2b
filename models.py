"""AID-VAR's networks: the official VAR / VQ-VAE (official_var.py, re-exported here), the guidance injector, the
projected discriminator with DiffAugment, the tiny preset's feature network and judge, the presets table, and the
planted errors of the positive control. Loading them: checkpoints.py; evaluation features: features.py."""
import argparse
import math
import os
from types import SimpleNamespace
from typing import List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils.parametrizations import spectral_norm

from official_var import (REAL_PATCH_NUMS, VAR, VQVAE, GuidanceHook, VectorQuantizer2,  # noqa: F401
                          at_least_fp32, build_vae_var, sample_with_top_k_top_p_)


# ----------------------------------------------------------------------------------------------------------
# DiffAugment (Zhao et al. 2020), as used by StyleGAN-T's discriminator

def _rand(shape, x, generator):
    # draw on the generator's device (CPU generators work for CUDA inputs too), then move
    dev = generator.device if generator is not None else x.device
    return torch.rand(shape, generator=generator, device=dev).to(device=x.device, dtype=x.dtype)


def _randint(low, high, shape, x, generator):
    dev = generator.device if generator is not None else x.device
    return torch.randint(low, high, shape, generator=generator, device=dev).to(x.device)


def diff_augment(x_B3HW, policy='color,translation,cutout', generator=None):
    """Differentiable augmentation with per-sample randomness (DISC_SPEC section 4).

    Args:
        x_B3HW: images in [-1, 1] (any H, W). policy: comma-separated subset of
            'color' (brightness, saturation, contrast), 'translation' (ratio 1/8, zero fill),
            'cutout' (square of side ratio 0.2, set to 0), applied in that order.
        generator: optional torch.Generator for reproducible draws.
    Returns:
        augmented images, same shape/dtype; differentiable w.r.t. x_B3HW. Values may leave [-1, 1].
    """
    x = x_B3HW
    B, _, H, W = x.shape
    ops = [p.strip() for p in policy.split(',') if p.strip()]
    for op in ops:
        if op not in ('color', 'translation', 'cutout'):
            raise ValueError(f'unknown DiffAugment policy {op!r}')
    if 'color' in ops:
        x = x + (_rand((B, 1, 1, 1), x, generator) - 0.5)                       # brightness
        m = x.mean(dim=1, keepdim=True)
        x = (x - m) * (_rand((B, 1, 1, 1), x, generator) * 2) + m               # saturation
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - m) * (_rand((B, 1, 1, 1), x, generator) + 0.5) + m             # contrast
    if 'translation' in ops:
        sy, sx = int(H * 0.125 + 0.5), int(W * 0.125 + 0.5)
        ty = _randint(-sy, sy + 1, (B, 1, 1), x, generator)
        tx = _randint(-sx, sx + 1, (B, 1, 1), x, generator)
        # gather from a 1-pixel zero-padded copy; indices past the border land on the padding
        gy = (torch.arange(H, device=x.device)[None, :, None] + ty + 1).clamp(0, H + 1)
        gx = (torch.arange(W, device=x.device)[None, None, :] + tx + 1).clamp(0, W + 1)
        gb = torch.arange(B, device=x.device)[:, None, None]
        x_pad = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)
        x = x_pad[gb, gy, gx].permute(0, 3, 1, 2)  # output[i, j] = input[i + ty, j + tx]
    if 'cutout' in ops:
        cy, cx = int(H * 0.2 + 0.5), int(W * 0.2 + 0.5)
        # centre range as in the reference implementation (an extra position for even sizes)
        oy = _randint(0, H + (1 - cy % 2), (B, 1, 1), x, generator)
        ox = _randint(0, W + (1 - cx % 2), (B, 1, 1), x, generator)
        ys = torch.arange(H, device=x.device)[None, :, None] - (oy - cy // 2)
        xs = torch.arange(W, device=x.device)[None, None, :] - (ox - cx // 2)
        hole = (ys >= 0) & (ys < cy) & (xs >= 0) & (xs < cx)
        x = x * (~hole).unsqueeze(1).to(x.dtype)
    return x


# ----------------------------------------------------------------------------------------------------------
# Projected discriminator (StyleGAN-T) on a frozen timm ViT

DINO_MODEL = 'vit_small_patch16_224.dino'
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def vit_normalize(net, x01_B3HW):
    """Images in [0, 1] (B, 3, H, W) -> a timm ViT's input: (x - mean) / std from its pretrained_cfg (ImageNet default)."""
    cfg = getattr(net, 'pretrained_cfg', None) or {}
    # float32 constants cast to the input's dtype (bf16 under autocast, float64 in parity checks)
    mean = torch.tensor(cfg.get('mean', _IMAGENET_MEAN), device=x01_B3HW.device).to(x01_B3HW.dtype).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get('std', _IMAGENET_STD), device=x01_B3HW.device).to(x01_B3HW.dtype).view(1, 3, 1, 1)
    return (x01_B3HW - mean) / std


def build_dino() -> nn.Module:
    """timm `vit_small_patch16_224.dino` (DINO ViT-S/16, 224x224, 384 channels, 12 blocks, num_classes 0) with random
    weights, in eval mode (checkpoints.load_dino loads the pretrained ones)."""
    import timm
    return timm.create_model(DINO_MODEL, pretrained=False, num_classes=0).eval()


class BatchNormLocal(nn.Module):
    """Ghost batch norm over (B, C, T): statistics per group of `virtual_bs` consecutive samples.

    No running statistics, identical in train and eval. B must split into ceil(B / virtual_bs)
    equal groups. Stats are computed in float32 so bf16 activations normalise stably.
    """

    def __init__(self, num_features, virtual_bs=8, affine=True, eps=1e-5):
        super().__init__()
        self.virtual_bs, self.eps, self.affine = virtual_bs, eps, affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x_BCT):
        B, C, T = x_BCT.shape
        G = math.ceil(B / self.virtual_bs)
        if B % G:
            raise ValueError(f'BatchNormLocal: batch {B} does not split into {G} equal groups '
                             f'(virtual batch {self.virtual_bs})')
        x = x_BCT.float().view(G, B // G, C, T)
        mean = x.mean(dim=(1, 3), keepdim=True)
        var = x.var(dim=(1, 3), keepdim=True, unbiased=False)
        x = ((x - mean) / torch.sqrt(var + self.eps)).view(B, C, T)
        if self.affine:
            x = x * self.weight.float()[None, :, None] + self.bias.float()[None, :, None]
        return x.to(x_BCT.dtype)


def SpectralConv1d(*args, **kwargs):
    """nn.Conv1d with spectral normalisation of its weight (1 power iteration per training forward)."""
    return spectral_norm(nn.Conv1d(*args, **kwargs), n_power_iterations=1, eps=1e-12)


DISC_NORMS = ('bn', 'none')
# DiffAugment policies by name: StyleGAN-T's, one that keeps colour (a colour error stays visible), none
DISC_AUGS = {'diffaug': 'color,translation,cutout', 'nocolor': 'translation,cutout', 'none': ''}


class _ConvBlock(nn.Sequential):
    def __init__(self, channels, kernel_size, norm='bn'):
        if norm not in DISC_NORMS:
            raise ValueError(f'unknown discriminator norm {norm!r}; choose from {DISC_NORMS}')
        super().__init__(
            SpectralConv1d(channels, channels, kernel_size, padding=kernel_size // 2, padding_mode='circular'),
            # Identity keeps the Sequential indices, so the conv weights have the same keys either way
            BatchNormLocal(channels) if norm == 'bn' else nn.Identity(),
            nn.LeakyReLU(0.2),
        )


class _ResidualBlock(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return (self.fn(x) + x) / math.sqrt(2)


class DiscHead(nn.Module):
    """One StyleGAN-T head: (B, C, T) ViT tokens -> (B, T) patch logits, class-projected.

    cmapper: equalized-lr linear from one-hot(num_classes) written as a table lookup:
    cmap = W[label] / sqrt(num_classes) + b, W ~ N(0, 1), b = 0. num_classes=0 -> unconditional.
    norm: 'bn' (StyleGAN-T's ghost batch norm) or 'none'.
    """

    def __init__(self, channels, num_classes, cmap_dim=64, norm='bn'):
        super().__init__()
        self.num_classes, self.cmap_dim = num_classes, cmap_dim
        self.main = nn.Sequential(_ConvBlock(channels, 1, norm), _ResidualBlock(_ConvBlock(channels, 9, norm)))
        if num_classes > 0:
            self.cls = SpectralConv1d(channels, cmap_dim, kernel_size=1)
            self.cmap_weight = nn.Parameter(torch.randn(num_classes, cmap_dim))
            self.cmap_bias = nn.Parameter(torch.zeros(cmap_dim))
        else:
            self.cls = SpectralConv1d(channels, 1, kernel_size=1)

    def forward(self, x_BCT, labels_B):
        out = self.cls(self.main(x_BCT))
        if self.num_classes == 0:
            return out.squeeze(1)
        cmap_BD = F.embedding(labels_B, self.cmap_weight) / math.sqrt(self.num_classes) + self.cmap_bias
        return (out * cmap_BD.to(out.dtype).unsqueeze(-1)).sum(dim=1) / math.sqrt(self.cmap_dim)


def hinge_d_loss(out_real, out_fake) -> torch.Tensor:
    """D's hinge loss (StyleGAN-T): mean(relu(1 - D(real))) + mean(relu(1 + D(fake))), on D's outputs of any shape."""
    return F.relu(1 - out_real).mean() + F.relu(1 + out_fake).mean()


class ProjectedDiscriminator(nn.Module):
    """StyleGAN-T projected discriminator: frozen timm ViT + trainable per-tap heads.

    Args:
        backbone: timm VisionTransformer with a CLS token (DINO ViT-S/16, or the tiny feature ViT).
            Frozen (requires_grad False, always eval) but differentiable: gradients reach the image.
        num_classes: label count for the projection (0 = unconditional).
        hooks: block indices to tap; default for depth d: [d//4-1, d//2-1, 3d//4-1, d-1].
        hook_patch: also tap the block-0 input (patch embedding + position embedding, with CLS).
        cmap_dim: projection dimension. diffaug: DiffAugment policy applied in every forward, real and fake
            (a key of DISC_AUGS or a policy string; True = StyleGAN-T's 'color,translation,cutout', False / '' = off).
        p_crop: probability of a random backbone-size crop when the input is larger than that.
        norm: 'bn' (StyleGAN-T's BatchNormLocal in the heads) or 'none'. Ghost batch norm normalises each call
            (real and fake separately) per group of 8, which removes any shift that all fakes share; on the tiny
            preset that shift is most of what separates them from the reals (docs/positive_control.md: D learns with 'none').
    Output of forward: raw logits (B, n_taps * T), T = patch tokens; head order = blocks then patch tap.
    """

    def __init__(self, backbone, num_classes, hooks=None, cmap_dim=64, diffaug=True, p_crop=0.5,
                 hook_patch=True, norm='bn'):
        super().__init__()
        if not getattr(backbone, 'has_class_token', False):
            raise ValueError('ProjectedDiscriminator needs a ViT with a CLS token (the readout adds it to every token)')
        depth = len(backbone.blocks)
        if hooks is None:
            hooks = [depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1, depth - 1]
        hooks = sorted(int(h) for h in hooks)
        if hooks[0] < 0 or hooks[-1] >= depth:
            raise ValueError(f'hooks {hooks} out of range for a backbone with {depth} blocks')
        self.hooks, self.hook_patch = hooks, hook_patch
        self.num_classes, self.p_crop = num_classes, p_crop
        self.diffaug = DISC_AUGS.get(diffaug, diffaug) if isinstance(diffaug, str) else DISC_AUGS['diffaug' if diffaug else 'none']
        self.backbone = backbone.eval().requires_grad_(False)
        size = backbone.patch_embed.img_size
        self.img_size = (int(size[0]), int(size[1]))
        self.num_tokens = int(np.prod(backbone.patch_embed.grid_size))
        n_taps = len(hooks) + int(hook_patch)
        self.heads = nn.ModuleList([DiscHead(backbone.embed_dim, num_classes, cmap_dim, norm) for _ in range(n_taps)])

    def train(self, mode=True):
        super().train(mode)
        self.backbone.eval()  # dropout / drop-path of the frozen ViT must never switch on
        return self

    def requires_grad_(self, requires_grad=True):
        # GAN loops toggle D.requires_grad_ around the G step: only the heads may follow.
        self.heads.requires_grad_(requires_grad)
        return self

    def head_parameters(self):
        """The trainable parameters (the heads only)."""
        return self.heads.parameters()

    def heads_state_dict(self):
        """State of the heads only (weights, spectral-norm vectors); the backbone is not saved."""
        return self.heads.state_dict()

    def load_heads_state_dict(self, state_dict, strict=True):
        return self.heads.load_state_dict(state_dict, strict=strict)

    def backbone_features(self, x_B3HW):
        """Tapped ViT tokens for normalised backbone-size images.

        Returns: list of (B, C, T) tensors, CLS added to every patch token then dropped;
        order: hooked blocks ascending, then the patch-embedding tap.
        """
        bb = self.backbone
        x = bb.patch_embed(x_B3HW)
        x = bb._pos_embed(x)  # CLS (+ register tokens) and position embedding, then pos_drop
        x = bb.patch_drop(x)
        x = bb.norm_pre(x)
        taps = [x] if self.hook_patch else []
        feats = []
        for i, blk in enumerate(bb.blocks[:self.hooks[-1] + 1]):
            x = blk(x)
            if i in self.hooks:
                feats.append(x)
        feats += taps
        npt = bb.num_prefix_tokens
        return [(f[:, npt:] + f[:, :1]).transpose(1, 2) for f in feats]

    def forward(self, img_B3HW, labels_B, double_backward=False):
        """img_B3HW in [-1, 1] (any size), labels_B int64 in [0, num_classes) -> logits (B, n_taps*T).

        Call separately on real and fake batches: BatchNormLocal mixes samples within a call.
        double_backward: set True when the result will be differentiated twice (R1 penalty,
        autograd.grad(..., create_graph=True)): runs the ViT attention with the math SDPA kernel,
        because the fused (flash / memory-efficient) kernels have no double backward.
        """
        if double_backward:
            with sdpa_kernel(SDPBackend.MATH):
                return self._forward(img_B3HW, labels_B)
        return self._forward(img_B3HW, labels_B)

    def _forward(self, img_B3HW, labels_B):
        x = img_B3HW
        if self.diffaug:
            x = diff_augment(x, self.diffaug)
        x = (x + 1) / 2
        S_h, S_w = self.img_size
        if x.shape[-2] > S_h and x.shape[-1] > S_w and self.p_crop > 0 and torch.rand(()) < self.p_crop:
            oy = int(torch.randint(0, x.shape[-2] - S_h + 1, ()))  # one offset for the whole batch
            ox = int(torch.randint(0, x.shape[-1] - S_w + 1, ()))
            x = x[..., oy:oy + S_h, ox:ox + S_w]
        if tuple(x.shape[-2:]) != self.img_size:
            x = F.interpolate(x, size=self.img_size, mode='area')
        x = vit_normalize(self.backbone, x)
        feats = self.backbone_features(x)
        # float32 logits: the hinge / R1 losses are reduced over B x 5T values
        return torch.cat([head(f, labels_B) for head, f in zip(self.heads, feats)], dim=1).float()


# ----------------------------------------------------------------------------------------------------------
# Guidance injector

def sincos_pos_embed_2d(p, dim, device=None, dtype=torch.float32):
    """Fixed 2-D sin/cos position encoding for a p x p grid, row-major -> (p*p, dim).

    First dim/2 channels encode the row (y), last dim/2 the column (x); each half is
    [sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-k / (dim/4)) (MAE / ViT convention).
    """
    if dim % 4:
        raise ValueError(f'2-D sin/cos position encoding needs dim divisible by 4, got {dim}')
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)
    ang = torch.arange(p, dtype=torch.float64)[:, None] * omega[None]
    emb_1d = torch.cat([ang.sin(), ang.cos()], dim=1)                  # (p, dim/2)
    emb_y = emb_1d[:, None, :].expand(p, p, dim // 2)
    emb_x = emb_1d[None, :, :].expand(p, p, dim // 2)
    return torch.cat([emb_y, emb_x], dim=-1).reshape(p * p, dim).to(device=device, dtype=dtype)


class SafeLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back to the input dtype (no clamping)."""

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class _InjectorBlock(nn.Module):
    """Pre-norm transformer block; both residual branches scaled by res_scale."""

    def __init__(self, dim, num_heads, ffn_hidden, res_scale):
        super().__init__()
        self.num_heads, self.res_scale = num_heads, res_scale
        self.norm1 = SafeLayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = SafeLayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_hidden)
        self.fc2 = nn.Linear(ffn_hidden, dim)

    def forward(self, x_BLC):
        B, L, C = x_BLC.shape
        qkv = self.qkv(self.norm1(x_BLC)).view(B, L, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                     # each (B, h, L, C/h)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, C)
        x = x_BLC + self.res_scale * self.proj(a)
        return x + self.res_scale * self.fc2(F.gelu(self.fc1(self.norm2(x))))


class GuidanceInjector(nn.Module):
    """Predicts the guidance map g_si for scale si from the VAR token features of scale si-1.

    Args:
        embed_dim: VAR width C (divisible by num_heads and by 4).
        patch_nums: the VAR's per-scale side lengths, e.g. (1, 2, 3, 4, 5, 6, 8, 10, 13, 16).
        depth, num_heads, ffn_hidden, res_scale: transformer layout (DESIGN: 2, 8, 512, 0.1).
        broadcast: ablation: mean-pool the output over positions, same vector everywhere.
    The output projection is zero-initialised: an untrained injector returns exactly zeros.
    """

    def __init__(self, embed_dim, patch_nums, depth=2, num_heads=8, ffn_hidden=512, res_scale=0.1,
                 broadcast=False):
        super().__init__()
        if embed_dim % num_heads or embed_dim % 4:
            raise ValueError(f'embed_dim {embed_dim} must be divisible by num_heads={num_heads} and by 4')
        self.embed_dim, self.patch_nums, self.broadcast = embed_dim, tuple(patch_nums), broadcast
        self.proj_in = nn.Linear(embed_dim, embed_dim)
        # the features are normalised (norm sqrt(C)) and the position code scaled to ~0.07 of that: unscaled, the
        # sin/cos code (norm 9.8 at C=192) swamped proj_in's output (0.1-0.8) and g became one constant vector
        self.norm_in = SafeLayerNorm(embed_dim, elementwise_affine=False)
        self.pos_scale = 0.1
        self.blocks = nn.ModuleList([_InjectorBlock(embed_dim, num_heads, ffn_hidden, res_scale)
                                     for _ in range(depth)])
        self.norm_out = SafeLayerNorm(embed_dim)
        self.proj_out = nn.Linear(embed_dim, embed_dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, feat_BlC, si):
        """feat_BlC: (B, pn_{si-1}^2, C) VAR token features of scale si-1; si >= 1.

        Returns: guidance (B, pn_si^2, C) (unbounded; scaled by w at use), in the autocast dtype under autocast
        (bf16 autocast: bf16 for fp32 and bf16 feat alike, proj_out being an autocast linear), else in the parameters'
        dtype (feat must have it).
        """
        if not 1 <= si < len(self.patch_nums):
            raise ValueError(f'scale index {si} not in [1, {len(self.patch_nums) - 1}] (scale 0 is never guided)')
        p_prev, p = self.patch_nums[si - 1], self.patch_nums[si]
        B, l, C = feat_BlC.shape
        if l != p_prev * p_prev or C != self.embed_dim:
            raise ValueError(f'expected features (B, {p_prev * p_prev}, {self.embed_dim}) for scale {si - 1}, '
                             f'got {tuple(feat_BlC.shape)}')
        x = self.norm_in(self.proj_in(feat_BlC))
        x_BCpp = x.transpose(1, 2).reshape(B, C, p_prev, p_prev)
        x_BCpp = F.interpolate(x_BCpp, size=(p, p), mode='bilinear', align_corners=False)
        x = x_BCpp.flatten(2).transpose(1, 2)                                   # (B, p*p, C)
        x = x + self.pos_scale * sincos_pos_embed_2d(p, C, device=x.device, dtype=x.dtype)
        for blk in self.blocks:
            x = blk(x)
        g_BLC = self.proj_out(self.norm_out(x))
        if self.broadcast:
            g_BLC = g_BLC.mean(dim=1, keepdim=True).expand(B, p * p, C)
        return g_BLC


# ----------------------------------------------------------------------------------------------------------
# Presets: the tiny preset's architectures, and what differs between it and the official models

# The embedded tiny preset: 32x32 shapes, 4x VQ-VAE, a small VAR, a small ViT feature network (`featnet`: timm
# VisionTransformer arguments). The one table of its architectures, by version; pretrain_tiny.py --preset trains any
# of them and records the name in MANIFEST.json. weights/ (pretrain_tiny.py) holds TINY_PRESET.
TINY_PRESETS = dict(
    v1=dict(patch_nums=(1, 2, 3, 4, 6, 8), V=256, Cvae=16, ch=32, ch_mult=(1, 2, 2), num_classes=10,
            depth=4, embed_dim=192, num_heads=3,
            featnet=dict(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4, mlp_ratio=4.0, num_classes=10)),
)
# the wider / deeper VARs of the pilots in docs/pretrain_tiny.md
TINY_PRESETS.update(pilot_w256=dict(TINY_PRESETS['v1'], embed_dim=256, num_heads=4),
                    pilot_d6=dict(TINY_PRESETS['v1'], depth=6))
# AIDVAR_TINY_DIR / AIDVAR_TINY_PRESET point every script at other tiny weights (e.g. a pretrain_tiny.py staging run)
TINY_PRESET = os.environ.get('AIDVAR_TINY_PRESET', 'v1')
TINY = TINY_PRESETS[TINY_PRESET]
REAL_DEPTHS = (16, 20, 24, 30)


# Everything that differs between the tiny preset and the official models, resolved once per script (resolve_preset):
# image size, classes, the networks each part uses, sampling and evaluation defaults, and train_injector.py's
# defaults. Real models: paper Table 5 / App. F, StyleGAN-T's D (ghost batch norm, DiffAugment), fakes from the VAR's
# inference (§3.1), no validation unless asked (it needs a reference batch). Tiny: each value chosen by the positive
# control, read on the judge (docs/positive_control.md, docs/tiny_preset.md).
PRESETS = {
    'real': dict(name='real', resolution=256, num_classes=1000, patch_nums=REAL_PATCH_NUMS, V=4096,
                 feature_net='dino', fid_net='inception', judge=False,  # D's backbone and ISCS; FID / IS / PR
                 num_per_class=50, top_k=900, top_p=0.96, iscs_n=None,
                 w_train=0.001, lr_g=1e-6, lr_d=1e-6, r1_gamma=0.2, global_batch_size=256, epochs=2, max_steps=None,
                 sample_every=1000, ckpt_every=1000, context='rollout', decode='soft', real_decode='soft',
                 disc_norm='bn', disc_aug='diffaug', g_draws=1, fake_cfg=0.0, val_n=0, val_net='inception'),
    'tiny': dict(name='tiny', resolution=32, num_classes=TINY['num_classes'], patch_nums=TINY['patch_nums'], V=TINY['V'],
                 feature_net='featnet', fid_net='featnet', judge=True,  # the feature network stands in for both
                 num_per_class=10, top_k=0, top_p=0.0, iscs_n=1000,
                 w_train=0.1, lr_g=1e-3, lr_d=2e-3, r1_gamma=0.0, global_batch_size=16, epochs=None, max_steps=150,
                 sample_every=50, ckpt_every=50, context='teacher', decode='rao', real_decode='hard',
                 disc_norm='none', disc_aug='none', g_draws=4, fake_cfg=0.0, val_n=300, val_net='judge'),
}


def resolve_preset(depth: Optional[int], name: Optional[str] = None) -> SimpleNamespace:
    """What --depth selects, read once at the top of a script's main: None -> the tiny preset, 16/20/24/30 -> the
    official VAR-d{depth}; name 'real' with depth None: official models of unknown depth (sample files without a
    preset key). Fields: the PRESETS values (preset.resolution, preset.fid_net, preset.w_train, ...), depth, tiny
    (bool), label ('tiny preset' / 'VAR-d24') and tag (the npz `preset` key: 'tiny' / 'd24')."""
    name = name or ('tiny' if depth is None else 'real')
    tiny = name == 'tiny'
    return SimpleNamespace(**PRESETS[name], depth=depth, tiny=tiny, label='tiny preset' if tiny else f'VAR-d{depth}'
                           if depth else 'the official VAR', tag='tiny' if tiny else f'd{depth}')


def apply_preset(args) -> SimpleNamespace:
    """Sets every flag of args left at None that PRESETS has to the value of args.depth's preset; returns the preset."""
    preset = resolve_preset(args.depth)
    for k, v in vars(preset).items():
        if hasattr(args, k) and getattr(args, k) is None:
            setattr(args, k, v)
    return preset


def show_defaults(parser):
    """Ends every flag's --help with its default: both presets' values for the flags apply_preset fills (default
    None), the value for the others (switches, and helps that already say their default, are left as they are)."""
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.nargs == 0:
            continue
        if action.default is None and action.dest in PRESETS['tiny']:
            real, tiny = (PRESETS[k][action.dest] for k in ('real', 'tiny'))
            action.help = (action.help or '') + f' (default: real models {"not set" if real is None else real}, ' \
                                                f'tiny preset {"not set" if tiny is None else tiny})'
        elif action.default is not None and 'default' not in (action.help or ''):
            action.help = ((action.help or '') + f' (default: {action.default})'.replace('%', '%%')).lstrip()


def build_random(depth: Optional[int] = None, device='cpu', seed: int = 0):
    """The VQ-VAE + VAR of a --depth (None: the tiny preset) with random from-scratch weights, frozen: tests and
    benchmarks. Same seed, same weights (the VQ-VAE is built first, so its weights do not depend on the depth)."""
    torch.manual_seed(seed)
    vae, var = build_tiny(init=True) if depth is None else build_vae_var(depth=depth, init=True)
    return frozen(vae, device), frozen(var, device)


def build_tiny(device='cpu', init=False, preset=None):
    """The tiny preset's VQVAE + VAR (random or from-scratch-initialised weights); preset: a TINY_PRESETS name."""
    c = TINY_PRESETS[preset] if preset else TINY
    return build_vae_var(device=device, patch_nums=c['patch_nums'], V=c['V'], Cvae=c['Cvae'], ch=c['ch'],
                         num_classes=c['num_classes'], depth=c['depth'], ch_mult=c['ch_mult'],
                         embed_dim=c['embed_dim'], num_heads=c['num_heads'], init=init)


def frozen(model: nn.Module, device):
    """Eval mode, no gradients, on device (a VAR also stops class dropout): how every pretrained part is used."""
    model = model.to(device).eval()
    model.requires_grad_(False)
    if isinstance(model, VAR):
        model.cond_drop_rate = 0.0
    return model


def token_features(var: VAR, idx_Bl: torch.Tensor) -> torch.Tensor:
    """The VAR's own features of a token map: word_embed(codebook[idx]). (B, pn^2) -> (B, pn^2, C)."""
    return var.word_embed(var.vae.quantize.embedding(idx_Bl))


# The tiny preset's feature network: a small timm ViT classifier on the shapes. It stands in for DINO
# (discriminator backbone, ISCS features) and for Inception (FID / IS / precision-recall) in the tiny preset.
TINY_FEATNET = TINY['featnet']


def build_featnet(preset=None):
    """The tiny preset's feature network architecture (random weights): a timm VisionTransformer whose patch
    embedding is a small convolutional stem (32x32 -> 8x8 tokens of width 128, like a 4x4 patchify)."""
    from timm.models.vision_transformer import VisionTransformer
    cfg = TINY_PRESETS[preset]['featnet'] if preset else TINY_FEATNET
    net = VisionTransformer(**cfg)
    # Early convolutions (Xiao et al. 2021): with a plain 4x4 patchify this ViT was still near chance after
    # 35k images on CPU; the stem gives it locality and costs ~15 of its ~100 MFLOP per image.
    C = cfg['embed_dim']
    net.patch_embed.proj = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1), nn.GELU(), nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(),
                                         nn.Conv2d(64, C, 2, 2))
    # DINO/ImageNet normalisation, so the projected discriminator treats both backbones alike
    net.pretrained_cfg = dict(mean=_IMAGENET_MEAN, std=_IMAGENET_STD)
    return net


# The tiny preset's judge: a small CNN shapes classifier trained apart from the feature network (another architecture,
# data seed and init; pretrain_tiny.py --stage judge). The feature network is D's backbone, so an injector trained
# against D moves images along directions that network is sensitive to and its FID cannot judge the injector (in
# either direction); every pass / fail, default and selection on the tiny preset is read on this network.
def build_judge() -> nn.Sequential:
    """The judge's architecture (random weights): 32x32 RGB in [-1, 1] -> 10 logits; net[:-1] gives the 128-d
    penultimate features its FID is taken on."""
    return nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1), nn.GELU(), nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(),
                         nn.Conv2d(64, 128, 3, 2, 1), nn.GELU(), nn.Conv2d(128, 128, 3, 2, 1), nn.GELU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10))


# ----------------------------------------------------------------------------------------------------------
# AID-VAR glue: guidance from token maps, planted errors


def make_guidance_hook(var: VAR, injector) -> GuidanceHook:
    """The sampler hook for an injector: (si, tokens of scale si-1) -> g_si (B, pn_si^2, C)."""
    return lambda si, idx_prev_Bl: injector(token_features(var, idx_prev_Bl), si)


def teacher_guidance(var: VAR, injector, ctx_idx_Bl: List[torch.Tensor]) -> torch.Tensor:
    """Guidance for every scale of a teacher-forced pass, from the context tokens of the scale before.

    ctx_idx_Bl: tokens per scale [(B, pn^2)]. Returns (B, L, C), zero on scale 0 (never guided).
    """
    B = ctx_idx_Bl[0].shape[0]
    gs = [torch.zeros(B, var.first_l, var.C, device=ctx_idx_Bl[0].device)]
    gs += [injector(token_features(var, ctx_idx_Bl[si - 1]), si) for si in range(1, len(var.patch_nums))]
    return torch.cat([at_least_fp32(g) for g in gs], dim=1)  # w * g is added in float32


PLANT_STRENGTH = dict(shift=3.0, logit=6.0)  # sized in docs/positive_control.md


def plant_error(var: VAR, kind: str, strength: Optional[float] = None, seed: int = 0) -> torch.Tensor:
    """Plants a known systematic error in a frozen VAR at scales >= 1 (the positive control). Returns the error.

    shift: word_embed.bias += delta, |delta| = strength: every token feature of scales >= 1 moves by delta (C,).
    logit: the head's logits of scales >= 1 move by b (V,), b_v = strength * the standardised projection of code v
    on a random direction of the code space: a fixed preference for codes of one kind (a colour cast, say). Applied
    by a forward hook on the head; scale 0 is told apart by its length first_l.
    A fixed seed gives the same error everywhere (training, sampling, evaluation).
    """
    if kind not in PLANT_STRENGTH:
        raise SystemExit(f'--plant must be one of {tuple(PLANT_STRENGTH)}, got {kind!r}')
    strength = PLANT_STRENGTH[kind] if strength is None else strength
    g = torch.Generator().manual_seed(10_000 + seed)
    if kind == 'shift':
        delta = torch.randn(var.C, generator=g)
        delta = (delta * strength / delta.norm()).to(var.word_embed.bias)
        var.word_embed.bias.data += delta
        return delta
    u = torch.randn(var.Cvae, generator=g)
    proj = var.vae.quantize.embedding.weight.detach().float().cpu() @ u
    b = (strength * (proj - proj.mean()) / proj.std()).to(var.head.bias)

    def add_bias(module, inputs, logits):
        if logits.shape[1] == var.L:  # a teacher-forced pass over every scale
            return torch.cat([logits[:, :var.first_l], logits[:, var.first_l:] + b.to(logits.dtype)], dim=1)
        return logits if logits.shape[1] == var.first_l else logits + b.to(logits.dtype)

    var.head.register_forward_hook(add_bias)
    return b
