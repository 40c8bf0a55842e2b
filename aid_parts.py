"""AID-VAR parts: shapes data, DiffAugment, projected discriminator, guidance injector.

(Section of models.py; kept import-free of other repo files so it can be pasted in.)
"""
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

# ======================================================================================
# Shapes: the tiny preset's procedural, class-conditional image set
# ======================================================================================

# Every shape is defined in canonical coordinates (u, v), v pointing up, and fits inside the
# unit disc; rendering maps it to a random centre, circumradius and rotation.
SHAPE_CLASSES = (
    'circle',    # rho <= 0.9
    'square',    # regular 4-gon, circumradius 1 (half side 0.707)
    'triangle',  # equilateral, circumradius 1 (inradius 0.5)
    'ring',      # annulus 0.55 <= rho <= 1: a circle with a hole, so holes must be drawn
    'cross',     # plus sign: two bars of half-width 0.28, half-length 0.95
    'star',      # pentagram outline (five-pointed star), outer radius 1, inner radius 0.382
    'hexagon',   # regular 6-gon, circumradius 1: close to a circle, needs corners right
    'heart',     # implicit heart (x^2+y^2-1)^3 - x^2 y^3 <= 0, rescaled into the unit disc
    'crescent',  # unit disc minus the disc of radius 0.8 centred at (0.45, 0)
    'diamond',   # rhombus |u|/0.55 + |v| <= 1: elongated, so it never looks like the square
)
_SUPERSAMPLE = 4
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _inside_regular_polygon(u, v, n):
    """Regular n-gon, circumradius 1, a vertex on +u: intersection of n half-planes (no atan2: fast)."""
    apothem = np.float32(np.cos(np.pi / n))
    inside = None
    for k in range(n):
        phi = (2 * k + 1) * np.pi / n
        h = u * np.float32(np.cos(phi)) + v * np.float32(np.sin(phi)) <= apothem
        inside = h if inside is None else inside & h
    return inside


def _inside_star(u, v):
    # Pentagram (outer radius 1, tip on +v): the 5 edge lines have normals pointing at the tips and
    # distance cos(72deg) from the centre; the inner pentagon is inside all 5 half-planes, each
    # spike inside exactly 4, everything outside in at most 3.
    d = np.float32(np.cos(2 * np.pi / 5))
    count = np.zeros(u.shape, dtype=np.uint8)
    for k in range(5):
        phi = np.pi / 2 + 2 * np.pi * k / 5
        count += u * np.float32(np.cos(phi)) + v * np.float32(np.sin(phi)) <= d
    return count >= 4


def _inside_shape(cls, u, v):
    """Boolean inside-mask of class `cls` at canonical coordinates u, v (same-shape float arrays)."""
    name = SHAPE_CLASSES[cls]
    if name == 'circle':
        return u * u + v * v <= 0.81
    if name == 'square':
        return _inside_regular_polygon(u, v, 4)
    if name == 'triangle':
        # vertex on +v (rotate the +u-vertex polygon by 90 degrees)
        return _inside_regular_polygon(v, -u, 3)
    if name == 'ring':
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.55 ** 2)
    if name == 'cross':
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.28) & (av <= 0.95)) | ((av <= 0.28) & (au <= 0.95))
    if name == 'star':
        return _inside_star(u, v)
    if name == 'hexagon':
        return _inside_regular_polygon(u, v, 6)
    if name == 'heart':
        # the raw curve spans x in [-1.14, 1.14], y in [-1, 1.24]; centre (0, 0.15), radius 1.32
        x2, y = (u * 1.32) ** 2, v * 1.32 + 0.15
        t = x2 + y * y - 1
        return t * t * t <= x2 * y * y * y
    if name == 'crescent':
        return (u * u + v * v <= 1.0) & ((u - 0.45) ** 2 + v * v >= 0.64)
    if name == 'diamond':
        return np.abs(u) / 0.55 + np.abs(v) <= 1.0
    raise ValueError(f'unknown shape class {cls}')


def make_shapes(n, seed, size=32, chunk=256):
    """Generate the procedural shapes data set: one anti-aliased shape on a soft background.

    Args:
        n: number of images. seed: int, fully determines the output. size: image side in pixels.
        chunk: images rendered at once (memory only; the output does not depend on it).
    Returns:
        images: uint8 ndarray (n, size, size, 3) in [0, 255].
        labels: int64 ndarray (n,), balanced over the 10 SHAPE_CLASSES (counts differ by <= 1).
    """
    rng = np.random.default_rng(seed)
    K = len(SHAPE_CLASSES)
    labels = rng.permutation(np.arange(n) % K).astype(np.int64)

    # All per-image parameters are drawn up front so the result is independent of `chunk`.
    radius = rng.uniform(0.2, 0.4, n) * size                 # circumradius: 40-80% of the side
    margin = radius + 0.5
    cy = margin + rng.uniform(0, 1, n) * (size - 2 * margin)  # bounding disc fully inside
    cx = margin + rng.uniform(0, 1, n) * (size - 2 * margin)
    theta = rng.uniform(0, 2 * np.pi, n)
    # Background base / fill colours: resample until the luminance gap is large, so the shape
    # stays readable while the background itself is low-contrast.
    base = rng.uniform(0.15, 0.85, (n, 3))
    fill = rng.uniform(0.0, 1.0, (n, 3))
    bad = np.abs((fill - base) @ _LUMA) < 0.4
    while bad.any():
        base[bad] = rng.uniform(0.15, 0.85, (bad.sum(), 3))
        fill[bad] = rng.uniform(0.0, 1.0, (bad.sum(), 3))
        bad = np.abs((fill - base) @ _LUMA) < 0.4
    grad_delta = rng.uniform(-0.08, 0.08, (n, 3))        # colour gradient: base -/+ delta
    grad_angle = rng.uniform(0, 2 * np.pi, n)
    tex_freq = rng.uniform(1.5, 4.0, n)                  # faint stripes, cycles per image
    tex_angle = rng.uniform(0, 2 * np.pi, n)
    tex_phase = rng.uniform(0, 2 * np.pi, n)

    # pixel-centre grids in pixel units: full-res for the background, supersampled for coverage
    pix = (np.arange(size, dtype=np.float32) + 0.5)
    sub = (np.arange(size * _SUPERSAMPLE, dtype=np.float32) + 0.5) / _SUPERSAMPLE
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    f32 = lambda a: a.astype(np.float32)[:, None, None]
    # Render in class-sorted order so every chunk holds a few contiguous same-class runs
    # (slices, not fancy-index copies of the big supersampled arrays).
    order = np.argsort(labels, kind='stable')
    S = size * _SUPERSAMPLE
    for s in range(0, n, chunk):
        ids = order[s:s + chunk]
        m, lab = len(ids), labels[ids]
        # background: linear colour ramp + faint sinusoidal texture (same on all channels)
        yy, xx = (pix[None, :, None] - size / 2) / size, (pix[None, None, :] - size / 2) / size
        ramp = 2 * (np.cos(f32(grad_angle[ids])) * xx + np.sin(f32(grad_angle[ids])) * yy)
        tex = 0.03 * np.sin(2 * np.pi * f32(tex_freq[ids]) *
                            (np.cos(f32(tex_angle[ids])) * xx + np.sin(f32(tex_angle[ids])) * yy)
                            + f32(tex_phase[ids]))
        bg_mHW3 = (base[ids, None, None, :].astype(np.float32)
                   + ramp[..., None] * grad_delta[ids, None, None, :].astype(np.float32)
                   + tex[..., None])
        # coverage: inside-test on the 4x supersampled grid, averaged down (anti-aliasing).
        # Rotate by -theta and scale to the unit disc; image y points down, canonical v up.
        # Factors are folded into the small (m,1,S)/(m,S,1) terms: one full-size op per coordinate.
        dy = sub[None, :, None] - f32(cy[ids])
        dx = sub[None, None, :] - f32(cx[ids])
        a_, b_ = f32(np.cos(theta[ids]) / radius[ids]), f32(np.sin(theta[ids]) / radius[ids])
        u = (a_ * dx) - (b_ * dy)
        v = (-b_ * dx) - (a_ * dy)
        inside = np.empty((m, S, S), dtype=bool)
        starts = np.concatenate([[0], np.flatnonzero(np.diff(lab)) + 1, [m]])
        for r0, r1 in zip(starts[:-1], starts[1:]):
            inside[r0:r1] = _inside_shape(int(lab[r0]), u[r0:r1], v[r0:r1])
        # sum each run of 4 horizontal sub-samples: read the 4 bytes as one uint32; multiplying by
        # 0x01010101 adds all four bytes into the top byte (numpy reduces tiny axes slowly)
        counts = (inside.view(np.uint32) * np.uint32(0x01010101)) >> np.uint32(24)
        counts = counts.astype(np.uint8)
        counts = counts.reshape(m, size, _SUPERSAMPLE, size).sum(2, dtype=np.uint8)
        cov_mHW1 = counts[..., None].astype(np.float32) / _SUPERSAMPLE ** 2
        img = bg_mHW3 * (1 - cov_mHW1) + fill[ids, None, None, :].astype(np.float32) * cov_mHW1
        # clip only guards the background ramp/texture overshooting [0, 1] by a few levels
        images[ids] = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return images, labels


class ShapesDataset(torch.utils.data.Dataset):
    """The shapes set as a Dataset; generated once in __init__, no augmentation.

    Items: (img float32 tensor (3, size, size) in [-1, 1], label int in [0, 10)).
    """

    def __init__(self, n, seed, size=32):
        images, labels = make_shapes(n, seed, size)
        self.images_NHW3 = torch.from_numpy(images)
        self.labels = torch.from_numpy(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img_3HW = self.images_NHW3[i].permute(2, 0, 1).float().div(127.5).sub(1.0)
        return img_3HW, int(self.labels[i])


# ======================================================================================
# DiffAugment (Zhao et al. 2020), as used by StyleGAN-T's discriminator
# ======================================================================================

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


# ======================================================================================
# Projected discriminator (StyleGAN-T) on a frozen timm ViT
# ======================================================================================

DINO_MODEL = 'vit_small_patch16_224.dino'
DINO_HF_REPO = 'timm/vit_small_patch16_224.dino'
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _hub_offline():
    from huggingface_hub import constants
    env = os.environ.get('HF_HUB_OFFLINE', '').strip().upper()
    return bool(constants.HF_HUB_OFFLINE) or env in ('1', 'ON', 'YES', 'TRUE')


def _load_state_dict_file(path):
    path = Path(path)
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file
        sd = load_file(str(path), device='cpu')
    else:
        sd = torch.load(str(path), map_location='cpu', weights_only=True)
    # unwrap the usual containers; the official DINO file is already a plain timm-named dict
    for key in ('state_dict', 'model', 'teacher'):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
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
    model = timm.create_model(DINO_MODEL, pretrained=False, num_classes=0)
    if ckpt is None and not pretrained:
        return model.eval()
    how_to = (f'To get it, run once with network access (the weights are fetched from the Hugging Face '
              f'repo {DINO_HF_REPO} into the hub cache), or download model.safetensors from that repo '
              f'(e.g. `huggingface-cli download {DINO_HF_REPO} model.safetensors --local-dir checkpoints`) '
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
            if _hub_offline():
                raise SystemExit(f'DINO ViT-S/16 weights ({DINO_MODEL}) are not available offline: no '
                                 f'model.safetensors for {DINO_HF_REPO} in the Hugging Face cache {hub_dir}, '
                                 f'and HF_HUB_OFFLINE is set. {how_to}')
            try:
                path = hf_hub_download(DINO_HF_REPO, 'model.safetensors', cache_dir=cache_dir)
            except Exception as e:  # network / hub failures: report them, do not print a traceback
                raise SystemExit(f'DINO ViT-S/16 weights ({DINO_MODEL}) could not be downloaded from '
                                 f'{DINO_HF_REPO} into {hub_dir} ({type(e).__name__}: {e}). {how_to}') from e
    model.load_state_dict(_load_state_dict_file(path), strict=True)
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


class _ConvBlock(nn.Sequential):
    def __init__(self, channels, kernel_size):
        super().__init__(
            SpectralConv1d(channels, channels, kernel_size, padding=kernel_size // 2, padding_mode='circular'),
            BatchNormLocal(channels),
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
    """

    def __init__(self, channels, num_classes, cmap_dim=64):
        super().__init__()
        self.num_classes, self.cmap_dim = num_classes, cmap_dim
        self.main = nn.Sequential(_ConvBlock(channels, 1), _ResidualBlock(_ConvBlock(channels, 9)))
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


class ProjectedDiscriminator(nn.Module):
    """StyleGAN-T projected discriminator: frozen timm ViT + trainable per-tap heads.

    Args:
        backbone: timm VisionTransformer with a CLS token (DINO ViT-S/16, or the tiny feature ViT).
            Frozen (requires_grad False, always eval) but differentiable: gradients reach the image.
        num_classes: label count for the projection (0 = unconditional).
        hooks: block indices to tap; default for depth d: [d//4-1, d//2-1, 3d//4-1, d-1].
        hook_patch: also tap the block-0 input (patch embedding + position embedding, with CLS).
        cmap_dim: projection dimension. diffaug: apply DiffAugment in every forward (real and fake).
        p_crop: probability of a random backbone-size crop when the input is larger than that.
    Output of forward: raw logits (B, n_taps * T), T = patch tokens; head order = blocks then patch tap.
    """

    def __init__(self, backbone, num_classes, hooks=None, cmap_dim=64, diffaug=True, p_crop=0.5,
                 hook_patch=True):
        super().__init__()
        if not getattr(backbone, 'has_class_token', False):
            raise ValueError('ProjectedDiscriminator needs a ViT with a CLS token (its readout adds CLS to every token)')
        depth = len(backbone.blocks)
        if hooks is None:
            hooks = [depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1, depth - 1]
        hooks = sorted(int(h) for h in hooks)
        if hooks[0] < 0 or hooks[-1] >= depth:
            raise ValueError(f'hooks {hooks} out of range for a backbone with {depth} blocks')
        self.hooks, self.hook_patch = hooks, hook_patch
        self.num_classes, self.diffaug, self.p_crop = num_classes, diffaug, p_crop
        self.backbone = backbone.eval().requires_grad_(False)
        size = backbone.patch_embed.img_size
        self.img_size = (int(size[0]), int(size[1]))
        self.num_tokens = int(np.prod(backbone.patch_embed.grid_size))
        cfg = getattr(backbone, 'pretrained_cfg', None) or {}
        self.register_buffer('mean', torch.tensor(cfg.get('mean', _IMAGENET_MEAN)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(cfg.get('std', _IMAGENET_STD)).view(1, 3, 1, 1), persistent=False)
        n_taps = len(hooks) + int(hook_patch)
        self.heads = nn.ModuleList([DiscHead(backbone.embed_dim, num_classes, cmap_dim) for _ in range(n_taps)])

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

    def forward(self, img_B3HW, labels_B):
        """img_B3HW in [-1, 1] (any size), labels_B int64 in [0, num_classes) -> logits (B, n_taps*T).

        Call separately on real and fake batches: BatchNormLocal mixes samples within a call.
        """
        x = img_B3HW
        if self.diffaug:
            x = diff_augment(x)
        x = (x + 1) / 2
        S_h, S_w = self.img_size
        if x.shape[-2] > S_h and x.shape[-1] > S_w and self.p_crop > 0 and torch.rand(()) < self.p_crop:
            oy = int(torch.randint(0, x.shape[-2] - S_h + 1, ()))  # one offset for the whole batch
            ox = int(torch.randint(0, x.shape[-1] - S_w + 1, ()))
            x = x[..., oy:oy + S_h, ox:ox + S_w]
        if tuple(x.shape[-2:]) != self.img_size:
            x = F.interpolate(x, size=self.img_size, mode='area')
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        feats = self.backbone_features(x)
        return torch.cat([head(f, labels_B) for head, f in zip(self.heads, feats)], dim=1)


# ======================================================================================
# Guidance injector
# ======================================================================================

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

        Returns: guidance (B, pn_si^2, C) in feat's dtype (unbounded; scaled by w at use).
        """
        if not 1 <= si < len(self.patch_nums):
            raise ValueError(f'scale index {si} not in [1, {len(self.patch_nums) - 1}] (scale 0 is never guided)')
        p_prev, p = self.patch_nums[si - 1], self.patch_nums[si]
        B, l, C = feat_BlC.shape
        if l != p_prev * p_prev or C != self.embed_dim:
            raise ValueError(f'expected features (B, {p_prev * p_prev}, {self.embed_dim}) for scale {si - 1}, '
                             f'got {tuple(feat_BlC.shape)}')
        x = self.proj_in(feat_BlC)
        x_BCpp = x.transpose(1, 2).reshape(B, C, p_prev, p_prev)
        x_BCpp = F.interpolate(x_BCpp, size=(p, p), mode='bilinear', align_corners=False)
        x = x_BCpp.flatten(2).transpose(1, 2)                                   # (B, p*p, C)
        x = x + sincos_pos_embed_2d(p, C, device=x.device, dtype=x.dtype)
        for blk in self.blocks:
            x = blk(x)
        g_BLC = self.proj_out(self.norm_out(x))
        if self.broadcast:
            g_BLC = g_BLC.mean(dim=1, keepdim=True).expand(B, p * p, C)
        return g_BLC
