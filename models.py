"""AID-VAR's networks and their loading: the official VAR / VQ-VAE (official_var.py, re-exported here), the
guidance injector, the projected discriminator with DiffAugment, DINO and the tiny feature network, checkpoint
finding and checked loading, the presets table, and the planted errors of the positive control."""
import argparse
import hashlib
import json
import math
import os
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils.parametrizations import spectral_norm

import data
from official_var import (REAL_PATCH_NUMS, VAR, VQVAE, GuidanceHook, VectorQuantizer2,  # noqa: F401
                          at_least_fp32, build_vae_var, sample_with_top_k_top_p_)

REPO_DIR = Path(__file__).resolve().parent
HF_REPO = 'FoundationVision/var'
VAE_FILE = 'vae_ch160v4096z32.pth'


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
DINO_HF_REPO = 'timm/vit_small_patch16_224.dino'
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def vit_normalize(net, x01_B3HW):
    """Images in [0, 1] (B, 3, H, W) -> a timm ViT's input: (x - mean) / std from its pretrained_cfg (ImageNet default)."""
    cfg = getattr(net, 'pretrained_cfg', None) or {}
    # float32 constants cast to the input's dtype (bf16 under autocast, float64 in parity checks)
    mean = torch.tensor(cfg.get('mean', _IMAGENET_MEAN), device=x01_B3HW.device).to(x01_B3HW.dtype).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get('std', _IMAGENET_STD), device=x01_B3HW.device).to(x01_B3HW.dtype).view(1, 3, 1, 1)
    return (x01_B3HW - mean) / std


def _dino_state_dict(path):
    """A DINO ViT-S/16 weights file (timm .safetensors, or official/timm .pth) -> timm-named ViT state_dict."""
    path = Path(path)
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file as load_safetensors
        sd = load_safetensors(str(path), device='cpu')
    else:  # the official DINO file is already a plain dict; full training checkpoints hold it under 'teacher'
        sd = load_state_dict_file(path)
    out = {}
    for k, v in sd.items():
        for prefix in ('module.', 'backbone.'):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if not k.startswith('head'):  # DINO's projection head / classifier: not part of the ViT
            out[k] = v
    return out


def build_backbone_dino(pretrained=True, ckpt=None, cache_dir=None):
    """Create timm `vit_small_patch16_224.dino` (DINO ViT-S/16, 224x224, 384 channels, 12 blocks).

    Args:
        pretrained: load the DINO weights; False gives a random init (tests, debugging).
        ckpt: optional local weights file (.safetensors / .pth / .bin; timm or official DINO
            naming). If given it must exist.
        cache_dir: Hugging Face hub cache to look in (default: the hub's own default).
    Returns:
        the timm VisionTransformer (num_classes=0), in eval mode.
    Raises:
        SystemExit with a one-paragraph message when the weights cannot be found or fetched.
    """
    import timm
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    if ckpt is None and not pretrained:
        return timm.create_model(DINO_MODEL, pretrained=False, num_classes=0).eval()
    how_to = (f'To get it, run once with network access (the weights are fetched from the Hugging Face '
              f'repo {DINO_HF_REPO} into the hub cache), or download model.safetensors from that repo '
              f'(e.g. `hf download {DINO_HF_REPO} model.safetensors --local-dir checkpoints`) '
              f'or the official DINO file dino_deitsmall16_pretrain.pth and pass its path as the '
              f'DINO checkpoint.')
    if ckpt is not None:
        if not Path(ckpt).is_file():
            raise SystemExit(f'DINO ViT-S/16 weights ({DINO_MODEL}) not found: the file {ckpt} does not '
                             f'exist. {how_to}')
        path = str(ckpt)
    else:
        hub_dir = cache_dir if cache_dir is not None else __import__('huggingface_hub').constants.HF_HUB_CACHE
        path = try_to_load_from_cache(DINO_HF_REPO, 'model.safetensors', cache_dir=cache_dir)
        if not isinstance(path, str):
            if hub_offline():
                raise SystemExit(f'DINO ViT-S/16 weights ({DINO_MODEL}) are not available offline: no '
                                 f'model.safetensors for {DINO_HF_REPO} in the Hugging Face cache {hub_dir}, '
                                 f'and HF_HUB_OFFLINE is set. {how_to}')
            why = hub_unreachable()
            if why:
                raise SystemExit(f'DINO ViT-S/16 weights ({DINO_MODEL}) are not in the Hugging Face cache {hub_dir} '
                                 f'and cannot be downloaded: {why} (offline? set HF_HUB_OFFLINE=1). {how_to}')
            try:
                path = hf_hub_download(DINO_HF_REPO, 'model.safetensors', cache_dir=cache_dir)
            except Exception as e:  # network / hub failures: report them, do not print a traceback
                raise SystemExit(f'DINO ViT-S/16 weights ({DINO_MODEL}) could not be downloaded from '
                                 f'{DINO_HF_REPO} into {hub_dir} ({type(e).__name__}: {e}). {how_to}') from e
    model = timm.create_model(DINO_MODEL, pretrained=False, num_classes=0)
    load_checked(model, _dino_state_dict(path), path, f'the DINO ViT-S/16 backbone ({DINO_MODEL})')
    return model.eval()


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
# Presets and checkpoints

# The embedded tiny preset: 32x32 shapes, 4x VQ-VAE, a small VAR, a small ViT feature network (`featnet`: timm
# VisionTransformer arguments). The one table of its architectures, by version; pretrain_tiny.py --preset trains any
# of them and records the name in MANIFEST.json. weights/ (pretrain_tiny.py) holds TINY_PRESET.
TINY_PRESETS = dict(
    v1=dict(patch_nums=(1, 2, 3, 4, 6, 8), V=256, Cvae=16, ch=32, ch_mult=(1, 2, 2), num_classes=10,
            depth=4, embed_dim=192, num_heads=3,
            featnet=dict(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4, mlp_ratio=4.0, num_classes=10)),
)
# the wider / deeper VARs of the pilots in docs/pretrain_tiny.md (both learnt slower than v1 at equal steps)
TINY_PRESETS.update(pilot_w256=dict(TINY_PRESETS['v1'], embed_dim=256, num_heads=4),
                    pilot_d6=dict(TINY_PRESETS['v1'], depth=6))
# AIDVAR_TINY_DIR / AIDVAR_TINY_PRESET point every script at other tiny weights (e.g. a pretrain_tiny.py staging run)
TINY_PRESET = os.environ.get('AIDVAR_TINY_PRESET', 'v1')
TINY = TINY_PRESETS[TINY_PRESET]
TINY_DIR = Path(os.environ.get('AIDVAR_TINY_DIR', REPO_DIR / 'weights'))
TINY_FILES = dict(vae='tiny_vae.pt', var='tiny_var.pt', featnet='tiny_featnet.pt', judge='tiny_judge.pt',
                  injector='tiny_injector.safetensors')
REAL_DEPTHS = (16, 20, 24, 30)

# Everything that differs between the tiny preset and the official models, read once per script (preset_of): image
# size, classes, sampling and evaluation defaults, and train_injector.py's defaults. Real models: paper Table 5 /
# App. F, StyleGAN-T's D (ghost batch norm, DiffAugment), fakes from the VAR's inference (§3.1), no validation unless
# asked (it needs a reference batch). Tiny: each value chosen by the positive control, read on the judge
# (docs/positive_control.md, docs/tiny_preset.md): w 0.1, lr_g 1e-3, lr_d 2e-3, R1 off, D without batch norm or
# DiffAugment, token-sample fakes after the ground-truth prefix against hard reals, 4 Gumbel-Rao draws per image.
PRESETS = {
    'real': dict(name='real', resolution=256, num_classes=1000, patch_nums=REAL_PATCH_NUMS, V=4096,
                 num_per_class=50, top_k=900, top_p=0.96, iscs_n=None,
                 w_train=0.001, lr_g=1e-6, lr_d=1e-6, r1_gamma=0.2, global_batch_size=256, epochs=2, max_steps=None,
                 sample_every=1000, ckpt_every=1000, context='rollout', decode='soft', real_decode='soft',
                 disc_norm='bn', disc_aug='diffaug', g_draws=1, fake_cfg=0.0, val_n=0, val_net='inception'),
    'tiny': dict(name='tiny', resolution=32, num_classes=TINY['num_classes'], patch_nums=TINY['patch_nums'], V=TINY['V'],
                 num_per_class=10, top_k=0, top_p=0.0, iscs_n=1000,
                 w_train=0.1, lr_g=1e-3, lr_d=2e-3, r1_gamma=0.0, global_batch_size=16, epochs=None, max_steps=150,
                 sample_every=50, ckpt_every=50, context='teacher', decode='rao', real_decode='hard',
                 disc_norm='none', disc_aug='none', g_draws=4, fake_cfg=0.0, val_n=300, val_net='judge'),
}


def preset_of(depth: Optional[int]) -> dict:
    """PRESETS entry of a --depth: None -> the tiny preset, 16/20/24/30 -> the official models."""
    return PRESETS['tiny' if depth is None else 'real']


def apply_preset(args) -> dict:
    """Sets every flag of args left at None that PRESETS has to the value of args.depth's preset; returns the preset."""
    preset = preset_of(args.depth)
    for k, v in preset.items():
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


def hub_offline() -> bool:
    return os.environ.get('HF_HUB_OFFLINE', '0').strip().lower() in ('1', 'true', 'yes', 'on')


HUB_CHECK_TIMEOUT = 3.0  # seconds; huggingface_hub itself retries 5 times with back-off (~25 s offline)


def hub_unreachable(url: Optional[str] = None) -> Optional[str]:
    """None if the host of url (default: the Hugging Face hub), or the HTTPS proxy in use, accepts a TCP connection
    within HUB_CHECK_TIMEOUT seconds, else why not. Run before every download, so an offline machine without
    HF_HUB_OFFLINE=1 fails in seconds instead of after the download client's retries."""
    import socket
    import threading
    from urllib.parse import urlsplit
    from huggingface_hub import constants
    proxy = next((os.environ[k] for k in ('HTTPS_PROXY', 'https_proxy', 'ALL_PROXY', 'all_proxy') if os.environ.get(k)), None)
    url = urlsplit(proxy if proxy else url or constants.ENDPOINT)
    host, port = url.hostname, url.port or (80 if url.scheme == 'http' else 443)
    result = {}

    def connect():  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection((host, port), timeout=HUB_CHECK_TIMEOUT).close()
            result['ok'] = True
        except OSError as e:
            result['error'] = f'{type(e).__name__}: {e}'
    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(HUB_CHECK_TIMEOUT + 0.5)
    if result.get('ok'):
        return None
    return (f'{"the proxy " if proxy else ""}{host}:{port} is not reachable '
            f'({result.get("error", f"no answer within {HUB_CHECK_TIMEOUT:g} s")})')


def find_checkpoint(filename: str, ckpt_dir='checkpoints', repo_id: str = HF_REPO) -> Path:
    """Returns ckpt_dir/filename, downloading it from the HF hub repo if missing and online.

    Offline or on a failed download this exits with a short message (file, path tried, how to get it).
    """
    path = Path(ckpt_dir) / filename
    if path.is_file():
        return path
    how = (f'download https://huggingface.co/{repo_id}/resolve/main/{filename} (e.g. `hf download '
           f'{repo_id} {filename} --local-dir {ckpt_dir}`) and put it at {path}, or point --ckpt_dir at the folder '
           f'that holds it')
    if hub_offline():
        raise SystemExit(f'Checkpoint {filename} was not found at {path.resolve()}, and HF_HUB_OFFLINE is set so it '
                         f'cannot be downloaded. To get it: {how}.')
    why = hub_unreachable()
    if why:
        raise SystemExit(f'Checkpoint {filename} was not found at {path.resolve()}, and it cannot be downloaded: {why} '
                         f'(offline? set HF_HUB_OFFLINE=1). To get it: {how}.')
    from huggingface_hub import hf_hub_download
    print(f'[ckpt] {filename} not in {ckpt_dir}: downloading from the hub repo {repo_id} ...')
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, local_dir=str(ckpt_dir)))
    except Exception as e:  # any network/hub failure ends in the same actionable message, with its cause
        raise SystemExit(f'Checkpoint {filename} was not found at {path.resolve()} and downloading it failed '
                         f'({type(e).__name__}: {e}). To get it: {how}.') from e


def load_state_dict_file(path) -> dict:
    """torch.load of a checkpoint file -> flat {key: tensor}; unwraps common wrappers; clear error if corrupt."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f'Checkpoint file {path} does not exist.')
    try:
        sd = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, wrong format: all mean "not a usable checkpoint"
        raise SystemExit(f'{path} ({path.stat().st_size:,} bytes) is not a readable PyTorch checkpoint: '
                         f'{data.first_line(e)}. The file is probably truncated '
                         f'or corrupt (an interrupted download?); delete it and fetch it again.') from e
    if isinstance(sd, dict) and 'trainer' in sd and isinstance(sd['trainer'], dict) and 'var_wo_ddp' in sd['trainer']:
        sd = sd['trainer']['var_wo_ddp']  # the official training checkpoint (ar-ckpt-*.pth)
    for wrapper in ('state_dict', 'model', 'teacher'):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise SystemExit(f'{path} does not hold a state_dict (a flat key -> tensor dict); found {type(sd).__name__}.')
    return sd


def describe_state_dict(sd: dict) -> str:
    """One phrase saying what a state_dict is: 'a depth-20 VAR (width 1280, 1000 classes, L=680)', 'a VQ-VAE ...'."""
    if 'class_emb.weight' in sd and 'head.weight' in sd:
        depth = len({k.split('.')[1] for k in sd if k.startswith('blocks.')})
        n_cls, C = sd['class_emb.weight'].shape
        L = sd['pos_1LC'].shape[1] if 'pos_1LC' in sd else '?'
        return f'a depth-{depth} VAR (width {C}, {n_cls - 1} classes, L={L})'
    if 'quantize.embedding.weight' in sd and 'encoder.conv_in.weight' in sd:
        V, Cvae = sd['quantize.embedding.weight'].shape
        ch = sd['encoder.conv_in.weight'].shape[0]
        return f'a VQ-VAE (vocab {V}, Cvae {Cvae}, ch {ch})'
    if 'proj_out.weight' in sd and 'proj_in.weight' in sd:
        return f'a guidance injector (width {sd["proj_out.weight"].shape[0]})'
    keys = list(sd)[:3]
    return f'an unknown state_dict with {len(sd)} entries (first keys {keys})'


def load_checked(model: nn.Module, sd: dict, path, expected: str):
    """Strict load that first compares keys/shapes and, on mismatch, says what the file is instead of dumping keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
             and not k.endswith('ema_vocab_hit_SV')]  # per-scale usage stats: other patch_nums are fine
    if missing or unexpected or wrong:
        detail = []
        if wrong:
            k = wrong[0]
            detail.append(f'{len(wrong)} shape mismatches, e.g. {k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}')
        if missing:
            detail.append(f'{len(missing)} missing keys, e.g. {missing[0]}')
        if unexpected:
            detail.append(f'{len(unexpected)} unexpected keys, e.g. {unexpected[0]}')
        raise SystemExit(f'{path} is {describe_state_dict(sd)}, but {expected} was asked for ({"; ".join(detail)}).')
    # assign=True lets a model built on the meta device take the file's tensors without allocating twice
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True,
                          assign=any(t.is_meta for t in own.values()))
    return model


def load_pretrained(depth: int, ckpt_dir='checkpoints', device='cpu'):
    """Official VQVAE + VAR-d{depth} with their ImageNet-256 weights, in eval mode, frozen. Returns (vae, var)."""
    if depth not in REAL_DEPTHS:
        raise SystemExit(f'--depth must be one of {REAL_DEPTHS} (the released VAR-d16/20/24/30), got {depth}.')
    var_path = find_checkpoint(f'var_d{depth}.pth', ckpt_dir)
    find_checkpoint(VAE_FILE, ckpt_dir)  # both files present before the (slow) loading starts
    vae, var = build_vae_var(device='meta', depth=depth)  # no random init: the files' tensors are assigned
    load_checked(var, load_state_dict_file(var_path), var_path, f'a depth-{depth} VAR (width {64 * depth}, 1000 classes, L=680)')
    load_vae(ckpt_dir, vae=vae)
    return frozen(vae, device), frozen(var, device)


def load_vae(ckpt_dir='checkpoints', device='cpu', vae: Optional[VQVAE] = None) -> VQVAE:
    """The official VQ-VAE (vae_ch160v4096z32.pth) alone, frozen; loads into `vae` if given (e.g. built on meta)."""
    path = find_checkpoint(VAE_FILE, ckpt_dir)
    if vae is None:
        with torch.device('meta'):
            vae = VQVAE(vocab_size=4096, z_channels=32, ch=160, test_mode=True, share_quant_resi=4)
    load_checked(vae, load_state_dict_file(path), path, 'the VQ-VAE vae_ch160v4096z32 (vocab 4096, Cvae 32, ch 160)')
    return frozen(vae, device)


def build_random(depth: Optional[int] = None, device='cpu', seed: int = 0):
    """A preset's VQ-VAE + VAR with random from-scratch weights, frozen: tests and benchmarks. Same seed, same weights
    (the VQ-VAE is built first, so its weights do not depend on the depth)."""
    torch.manual_seed(seed)
    vae, var = build_tiny(init=True) if depth is None else build_vae_var(depth=depth, init=True)
    return frozen(vae, device), frozen(var, device)


def build_tiny(device='cpu', init=False, preset=None):
    """The tiny preset's VQVAE + VAR (random or from-scratch-initialised weights); preset: a TINY_PRESETS name."""
    c = TINY_PRESETS[preset] if preset else TINY
    return build_vae_var(device=device, patch_nums=c['patch_nums'], V=c['V'], Cvae=c['Cvae'], ch=c['ch'],
                         num_classes=c['num_classes'], depth=c['depth'], ch_mult=c['ch_mult'],
                         embed_dim=c['embed_dim'], num_heads=c['num_heads'], init=init)


def tiny_file(name: str) -> Path:
    path = TINY_DIR / TINY_FILES[name]
    if not path.is_file():
        raise SystemExit(f'The tiny preset file {path} is missing. It ships with the repository; restore it with '
                         f'`git checkout -- weights/` or rebuild every tiny model with `python pretrain_tiny.py`.')
    return path


def load_tiny(device='cpu'):
    """The shipped tiny VQVAE + VAR, eval mode, frozen. Returns (vae, var)."""
    vae, var = build_tiny()
    for model, name in ((vae, 'vae'), (var, 'var')):
        path = tiny_file(name)
        load_checked(model, load_state_dict_file(path), path, f'the tiny preset {name}')  # shipped in fp16
    return frozen(vae, device), frozen(var, device)


def load_vae_var(depth: Optional[int], ckpt_dir='checkpoints', device='cpu'):
    """--depth None -> the tiny preset; 16/20/24/30 -> the official models. Returns (vae, var)."""
    return load_tiny(device) if depth is None else load_pretrained(depth, ckpt_dir, device)


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


def load_featnet(device='cpu'):
    """The shipped tiny feature network, eval mode, frozen."""
    net = build_featnet()
    path = tiny_file('featnet')
    load_checked(net, load_state_dict_file(path), path, 'the tiny preset feature network')
    return frozen(net, device)


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


def load_judge(device='cpu'):
    """The shipped tiny judge network, eval mode, frozen."""
    net = build_judge()
    path = tiny_file('judge')
    load_checked(net, load_state_dict_file(path), path, 'the tiny preset judge network')
    return frozen(net, device)


def judge_features(images_NHWC_uint8, net, batch_size=256, device='cpu', progress=True, desc='judge'):
    """The judge's (penultimate features (N, 128) float64, logits (N, 10) float64) of uint8 images (N, 32, 32, 3)."""
    def forward(x_B3HW):
        f_BD = net[:-1](x_B3HW)
        return f_BD, net[-1](f_BD)
    return batched_features(images_NHWC_uint8, forward, batch_size, device, progress, desc)


# ----------------------------------------------------------------------------------------------------------
# AID-VAR glue: guidance from token maps, planted errors, injector files, the feature network of a preset

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


PLANT_STRENGTH = dict(shift=3.0, logit=6.0)  # each moves the shipped tiny VAR's FID by +12.5 / +13.0 (v3; 1,000 samples, seed 7)


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


@torch.no_grad()
def guidance_shares(var: VAR, injector, ctx_idx_Bl: List[torch.Tensor]) -> dict:
    """How much of |g|^2 (scales >= 1, teacher-forced on ctx_idx_Bl) is one vector shared by every sample and position
    ('shared'), and how much varies between samples at a fixed position ('input': the injector reads its input)."""
    g_BlC = teacher_guidance(var, injector, ctx_idx_Bl)[:, var.first_l:].double()
    total = g_BlC.square().sum(-1).mean()
    return dict(shared=(g_BlC.mean((0, 1)).square().sum() / total).item(),
                input=(g_BlC.var(0, unbiased=False).sum(-1).mean() / total).item())


def weights_sha256(module: nn.Module) -> str:
    """sha256 (hex) of a network's weights as held in memory (names, dtypes' bytes): the same on every machine for the
    same loaded checkpoint (and plant_error's shift), unlike a file hash it also covers random or edited weights."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


INJECTOR_FORMAT = 'aid-var injector 1'


def save_injector(path, injector, meta: dict):
    """The released injector as safetensors: float32 tensors and string metadata: `aid_var_meta` (JSON: depth,
    patch_nums, embed_dim, inject, w_train, broadcast, validation, var_sha256, ...) and, for tools that list
    metadata, format / preset / depth / w_train / verdict / var_sha256 (models.weights_sha256 of the VAR trained on)."""
    from safetensors.torch import save_file
    meta = dict(meta, embed_dim=injector.embed_dim, patch_nums=list(injector.patch_nums), broadcast=injector.broadcast)
    sd = {k: v.detach().float().cpu().contiguous() for k, v in injector.state_dict().items()}
    val = meta.get('validation') or {}
    flat = dict(format=INJECTOR_FORMAT, preset='tiny' if meta.get('depth') is None else f'VAR-d{meta["depth"]}',
                depth=str(meta.get('depth')), w_train=str(meta.get('w_train')), verdict=val.get('verdict', 'not validated'),
                var_sha256=str(meta.get('var_sha256')), aid_var_meta=json.dumps(meta))
    with data.atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=flat)


def _read_injector_file(path):
    """(state_dict, meta) of an injector file: safetensors (save_injector) or the older .pt ({'meta', 'state_dict'})."""
    if not path.is_file():
        raise SystemExit(f'Injector file {path} does not exist (train one with `python train_injector.py`).')
    with open(path, 'rb') as f:
        torch_file = f.read(2) in (b'PK', b'\x80\x02')  # torch.save's zip or legacy pickle; else safetensors
    if not torch_file:
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework='pt') as f:
                md, sd = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:  # truncated or not safetensors: say so instead of a Rust error
            raise SystemExit(f'{path} is not a readable safetensors file ({type(e).__name__}); it is probably truncated.') from e
        if md.get('format') != INJECTOR_FORMAT or 'aid_var_meta' not in md:
            raise SystemExit(f'{path} is not an AID-VAR injector file (safetensors without its metadata: '
                             f'{describe_state_dict(sd)}); use the injector.safetensors written by train_injector.py.')
        return sd, json.loads(md['aid_var_meta'])
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated or not a torch file: say so instead of a pickle traceback
        raise SystemExit(f'{path} is not a readable injector file ({type(e).__name__}); it is probably truncated.') from e
    if not (isinstance(obj, dict) and 'meta' in obj and 'state_dict' in obj):
        what = describe_state_dict(obj) if isinstance(obj, dict) and all(torch.is_tensor(v) for v in obj.values()) else type(obj).__name__
        raise SystemExit(f'{path} is not an AID-VAR injector file (it is {what}); use the injector.safetensors written '
                         f'by train_injector.py.')
    return obj['state_dict'], obj['meta']


def read_injector_meta(path) -> dict:
    """The metadata of an injector file alone (no VAR needed)."""
    return _read_injector_file(Path(path))[1]


def load_injector(path, var: VAR, device='cpu'):
    """Loads an injector file written by train_injector.py (.safetensors, or an older .pt) and checks it fits `var`.
    Returns (injector, meta)."""
    path = Path(path)
    sd, meta = _read_injector_file(path)
    if meta['embed_dim'] != var.C or tuple(meta['patch_nums']) != tuple(var.patch_nums):
        raise SystemExit(f'{path} is an injector for a VAR of width {meta["embed_dim"]} (depth {meta.get("depth")}), '
                         f'patch_nums {tuple(meta["patch_nums"])}, but the VAR in use has width {var.C}, patch_nums '
                         f'{tuple(var.patch_nums)}.')
    inj = GuidanceInjector(meta['embed_dim'], meta['patch_nums'], broadcast=meta.get('broadcast', False))
    load_checked(inj, sd, path, 'a guidance injector')
    return frozen(inj, device), meta


def build_feature_net(preset: str, pretrained=True, dino_ckpt=None) -> nn.Module:
    """The image feature network of a preset ('tiny' / 'real', PRESETS[...]['name']): the discriminator's backbone and
    the ISCS features. tiny: the tiny feature network (load_featnet, frozen; build_featnet when not pretrained);
    real: DINO ViT-S/16 (build_backbone_dino, eval mode; random weights when not pretrained)."""
    if preset == 'tiny':
        return load_featnet() if pretrained else build_featnet()
    return build_backbone_dino(ckpt=dino_ckpt) if pretrained else build_backbone_dino(pretrained=False)


# ----------------------------------------------------------------------------------------------------------
# FID InceptionV3: pytorch-fid's port of TF inception-2015-12-05, the network FID / IS / precision-recall are
# defined on (docs/evaluation.md)

from torchvision.models.inception import (BasicConv2d, Inception3, InceptionA, InceptionAux,  # noqa: E402
                                          InceptionB, InceptionC, InceptionD, InceptionE)

FID_WEIGHTS_NAME = 'pt_inception-2015-12-05-6726825d.pth'
FID_WEIGHTS_URL = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/' + FID_WEIGHTS_NAME
INCEPTION_SIZE = 299


def _fid_avg_pool(x_NCHW: torch.Tensor) -> torch.Tensor:
    # TF's avg-pool ignores padded zeros; torchvision's default (count_include_pad=True) counts them: the classic
    # silent FID bug.
    return F.avg_pool2d(x_NCHW, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(InceptionA):
    """InceptionA with the TF pooling branch (count_include_pad=False)."""

    def _forward(self, x):
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(_fid_avg_pool(x))]


class FIDInceptionC(InceptionC):
    """InceptionC with the TF pooling branch (count_include_pad=False)."""

    def _forward(self, x):
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = conv(branch7x7dbl)
        return [self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(_fid_avg_pool(x))]


class FIDInceptionE(InceptionE):
    """InceptionE with the TF pooling branch: avg (count_include_pad=False) or, for Mixed_7c, a 3x3 stride-1
    max-pool (a quirk of the TF graph that FID is defined on)."""

    def __init__(self, in_channels: int, max_pool: bool = False):
        super().__init__(in_channels)
        self.max_pool = max_pool

    def _forward(self, x):
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        if self.max_pool:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _fid_avg_pool(x)
        return [self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)]


class FIDInceptionV3(Inception3):
    """The InceptionV3 that FID / IS are defined on (pytorch-fid's FIDInceptionA/C/E variants).

    torchvision ``Inception3(num_classes=1008, aux_logits=False, transform_input=False)`` with the pooling branches
    of Mixed_5b..5d, 6b..6e, 7b swapped for avg-pool with count_include_pad=False and Mixed_7c for max-pool.
    BatchNorm eps is 0.001 (torchvision's BasicConv2d default). state_dict: the 566 keys of FID_WEIGHTS_NAME in
    module order.
    """
    LAYERS = ('Conv2d_1a_3x3', 'Conv2d_2a_3x3', 'Conv2d_2b_3x3', 'maxpool1', 'Conv2d_3b_1x1', 'Conv2d_4a_3x3',
              'maxpool2', 'Mixed_5b', 'Mixed_5c', 'Mixed_5d', 'Mixed_6a', 'Mixed_6b', 'Mixed_6c', 'Mixed_6d',
              'Mixed_6e', 'Mixed_7a', 'Mixed_7b', 'Mixed_7c', 'avgpool')

    def __init__(self):
        super().__init__(num_classes=1008, aux_logits=False, transform_input=False, init_weights=False,
                         inception_blocks=[BasicConv2d, FIDInceptionA, InceptionB, FIDInceptionC,
                                           InceptionD, FIDInceptionE, InceptionAux])
        # Reassigning an existing child keeps its position, so state_dict order is unchanged.
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)

    def forward(self, x_N3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_N3HW: (N, 3, 299, 299) in [-1, 1] -> (pool3 (N, 2048), logits_nobias (N, 1008)).

        logits_nobias = pool3 @ fc.weight^T: the IS logits of the improved-GAN code and the ADM evaluator
        (softmax/logits/MatMul, no bias). Dropout is skipped (eval semantics).
        """
        if x_N3HW.ndim != 4 or tuple(x_N3HW.shape[1:]) != (3, INCEPTION_SIZE, INCEPTION_SIZE):
            raise ValueError(f'FIDInceptionV3 expects (N, 3, 299, 299) input in [-1, 1] '
                             f'(see evaluate.preprocess_uint8), got {tuple(x_N3HW.shape)}')
        h = x_N3HW
        for name in self.LAYERS:
            h = getattr(self, name)(h)
        pool3_N2048 = h.flatten(1)
        return pool3_N2048, F.linear(pool3_N2048, self.fc.weight)


def load_fid_inception(ckpt_dir='checkpoints', device='cpu') -> FIDInceptionV3:
    """FIDInceptionV3 with the pytorch-fid weights from ckpt_dir, frozen. A missing file is downloaded from
    FID_WEIGHTS_URL unless HF_HUB_OFFLINE is set; every failure is a SystemExit that says where the file comes from."""
    path = Path(ckpt_dir) / FID_WEIGHTS_NAME
    how = f'download {FID_WEIGHTS_URL} (~95 MB) and put it at {path}, or point --ckpt_dir at the folder that holds it'
    if not path.is_file():
        if hub_offline():
            raise SystemExit(f'Checkpoint {FID_WEIGHTS_NAME} (FID / IS / precision-recall) was not found at {path}, '
                             f'and HF_HUB_OFFLINE is set so it cannot be downloaded. To get it: {how}.')
        why = hub_unreachable(FID_WEIGHTS_URL)
        if why:
            raise SystemExit(f'Checkpoint {FID_WEIGHTS_NAME} was not found at {path}, and it cannot be downloaded: {why} '
                             f'(offline? set HF_HUB_OFFLINE=1). To get it: {how}.')
        try:
            with data.atomic_path(path) as tmp:
                torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(tmp), progress=True)
        except Exception as e:  # network / disk errors end in the same actionable message, with their cause
            raise SystemExit(f'Checkpoint {FID_WEIGHTS_NAME} was not found at {path} and downloading it failed '
                             f'({data.first_line(e)}). To get it: {how}.') from None
    model = FIDInceptionV3()
    try:
        sd, own = load_state_dict_file(path), model.state_dict()
        missing = [k for k in own if k not in sd]
        if all(k.endswith('num_batches_tracked') for k in missing):  # the released file lacks these (unused in eval)
            sd = {**sd, **{k: own[k] for k in missing}}
        load_checked(model, sd, path, 'the FID InceptionV3 weights (566 state_dict entries)')
    except SystemExit as e:  # a wrong or truncated file: add where the right one comes from
        raise SystemExit(f'{e.code} The right file: {FID_WEIGHTS_URL}') from None
    return frozen(model, device)


# ----------------------------------------------------------------------------------------------------------
# Feature extraction: what evaluate.py measures with (FID / IS / precision-recall, ISCS)

PIPELINES = ('adm', 'pytorch-fid')


def preprocess_uint8(images_NHWC, dtype: torch.dtype = torch.float32, device='cpu', pipeline: str = 'adm') -> torch.Tensor:
    """The FID Inception's input (N, 3, 299, 299) in [-1, 1] from uint8 (N, H, W, 3) images (array, memmap or tensor),
    computed on `device` in `dtype`. pipeline 'adm' (evaluate.py's): the ADM evaluator's TF1 legacy ResizeBilinear of
    the 0..255 values (torch-fidelity's bit-exact port), (v - 128) / 128; 'pytorch-fid': /255, F.interpolate bilinear
    (no antialias), 2x - 1 (the parity fixture's). docs/evaluation.md."""
    if pipeline not in PIPELINES:
        raise ValueError(f'pipeline must be one of {PIPELINES}, got {pipeline!r}')
    if isinstance(images_NHWC, np.ndarray):
        # 'W': a read-only memmap slice is copied (torch warns on non-writable arrays)
        images_NHWC = torch.from_numpy(np.require(images_NHWC, requirements=['C', 'W']))
    if not isinstance(images_NHWC, torch.Tensor) or images_NHWC.dtype != torch.uint8:
        raise TypeError(f'preprocess_uint8 expects a uint8 array/tensor, got '
                        f'{getattr(images_NHWC, "dtype", type(images_NHWC))}')
    if images_NHWC.ndim != 4 or images_NHWC.shape[-1] != 3:
        raise ValueError(f'preprocess_uint8 expects NHWC images with 3 channels, got {tuple(images_NHWC.shape)}')
    # contiguous: match ToTensor's NCHW layout so the resize runs the same kernel.
    x_N3HW = images_NHWC.to(device).permute(0, 3, 1, 2).contiguous().to(dtype)
    if pipeline == 'adm':  # the same operations, in the same order, as torch-fidelity's InceptionV3 extractor
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
        x_N3HW = interpolate_bilinear_2d_like_tensorflow1x(x_N3HW, size=(INCEPTION_SIZE, INCEPTION_SIZE),
                                                           align_corners=False)
        return (x_N3HW - 128) / 128
    x_N3HW = F.interpolate(x_N3HW.div(255), size=(INCEPTION_SIZE, INCEPTION_SIZE), mode='bilinear',
                           align_corners=False, antialias=False)
    return 2 * x_N3HW - 1


def inception_features(images_NHWC_uint8, model: FIDInceptionV3, batch_size: int = 64, device='cpu',
                       progress: bool = True, pipeline: str = 'adm') -> tuple[np.ndarray, np.ndarray]:
    """pool3 features float64 (N, 2048) and IS logits float64 (N, 1008, no fc bias: ADM) of uint8 (N, H, W, 3)
    images (a memmap is read batch by batch), under no_grad; the model's parameter dtype sets the compute dtype.
    The batch size changes the results only by float round-off (ADM: 64, pytorch-fid: 50)."""
    n = len(images_NHWC_uint8)
    if n == 0:
        raise ValueError('inception_features got no images')
    dtype = next(model.parameters()).dtype
    pool3_N2048 = np.empty((n, 2048), dtype=np.float64)
    logits_N1008 = np.empty((n, 1008), dtype=np.float64)
    with torch.no_grad(), data.progress(total=n, unit='img', desc='inception', disable=not progress) as bar:
        for start in range(0, n, batch_size):
            x_N3HW = preprocess_uint8(images_NHWC_uint8[start:start + batch_size], dtype=dtype, device=device,
                                      pipeline=pipeline)
            pool3_B, logits_B = model(x_N3HW)
            pool3_N2048[start:start + len(x_N3HW)] = pool3_B.double().cpu().numpy()
            logits_N1008[start:start + len(x_N3HW)] = logits_B.double().cpu().numpy()
            bar.update(len(x_N3HW))
    return pool3_N2048, logits_N1008


def vit_cls(net, x_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A timm ViT's (CLS (B, D) pre-logits features, head output (B, K)) for images (B, 3, H, W) in [-1, 1]:
    resized (bicubic, antialiased) to the ViT's input size when it differs, normalised with its pretrained_cfg.
    The head is the identity for DINO (num_classes 0), the 10-class logits for the tiny feature network."""
    size = tuple(int(s) for s in net.patch_embed.img_size)
    x = x_B3HW.float().add(1).div(2)
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode='bicubic', align_corners=False, antialias=True)
    cls_BD = net.forward_head(net.forward_features(vit_normalize(net, x)), pre_logits=True)
    return cls_BD, net.head(cls_BD)


@torch.no_grad()
def batched_features(images_NHWC_uint8, forward, batch_size=64, device='cpu', progress=True, desc='features'):
    """(features (N, D) float64, logits (N, K) float64) of uint8 images (N, H, W, 3) (a memmap is read batch by batch):
    forward maps a batch in [-1, 1] (B, 3, H, W) to (features, logits)."""
    feats, logits = [], []
    for start in data.progress(range(0, len(images_NHWC_uint8), batch_size), desc=desc, unit='batch',
                               disable=not progress):
        x = torch.from_numpy(np.require(images_NHWC_uint8[start:start + batch_size], requirements=['C', 'W'])).to(device)
        f_BD, lg_BK = forward(data.to_signed(x))
        feats.append(f_BD.double().cpu().numpy())
        logits.append(lg_BK.double().cpu().numpy())
    return np.concatenate(feats), np.concatenate(logits)


def featnet_features(images_NHWC_uint8, net, batch_size=64, device='cpu', progress=True, desc='featnet'):
    """Tiny preset FID / IS features: (CLS (N, D) float64, logits (N, K) float64) of uint8 images."""
    return batched_features(images_NHWC_uint8, lambda x: vit_cls(net, x), batch_size, device, progress, desc)


@torch.no_grad()
def encode_tokens(vae, images_NHWC_uint8, batch_size=64, device='cpu', progress=True) -> np.ndarray:
    """Ground-truth tokens of real images: uint8 (N, H, W, 3) -> int64 (N, L), every scale, scale-major."""
    out = []
    for start in data.progress(range(0, len(images_NHWC_uint8), batch_size), desc='encode reference', unit='batch',
                               disable=not progress):
        x = torch.from_numpy(np.require(images_NHWC_uint8[start:start + batch_size], requirements=['C', 'W'])).to(device)
        idx_Bl = vae.img_to_idxBl(data.to_signed(x))
        out.append(torch.cat(idx_Bl, dim=1).cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def scale_features(vae, feat_net, tokens_NL, patch_nums, batch_size=64, device='cpu', progress=True,
                   desc='ISCS features') -> np.ndarray:
    """ISCS inputs: for every sample and k = 0..K-1, the raw CLS feature of the image decoded (full resolution,
    VQ-VAE, no uint8 round trip) from the token prefix of scales 0..k. tokens_NL: (N, L) integers, L = sum(pn^2).
    Returns float32 (N, K, D)."""
    sizes = [pn * pn for pn in patch_nums]
    out = []
    for start in data.progress(range(0, len(tokens_NL), batch_size), desc=desc, unit='batch', disable=not progress):
        tok_BL = torch.from_numpy(np.asarray(tokens_NL[start:start + batch_size]).astype(np.int64)).to(device)
        imgs = vae.idxBl_to_img(list(tok_BL.split(sizes, dim=1)), same_shape=True, last_one=False)  # K x (B,3,H,W)
        out.append(torch.stack([vit_cls(feat_net, img)[0] for img in imgs], dim=1).float().cpu().numpy())
    return np.concatenate(out)
