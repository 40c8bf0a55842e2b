"""Models of AID-VAR: the official VAR / multi-scale VQ-VAE (checkpoint-exact), the guidance injector,
the projected discriminator, the shapes data of the tiny preset, and checkpoint finding / loading.

The VQVAE and VAR follow FoundationVision/VAR (commit 78b9539) so that the official files
`vae_ch160v4096z32.pth` and `var_d{16,20,24,30}.pth` load with `strict=True` and compute the same numbers
(see ../shared/VAR_SPEC.md). Names are the official ones (`img_to_idxBl`, `idxBl_to_var_input`,
`autoregressive_infer_cfg`, `Cvae`, `patch_nums`, ...). Two deliberate differences, neither changes a
pretrained result: class dropout happens only in training mode (the official forward also drops labels in
eval), and sampling takes an optional guidance hook (the AID-VAR injector) and can return its tokens.
"""
import math
import os
from pathlib import Path
from typing import Callable, List, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils.parametrizations import spectral_norm

REPO_DIR = Path(__file__).resolve().parent
REAL_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
HF_REPO = 'FoundationVision/var'
VAE_FILE = 'vae_ch160v4096z32.pth'


# ----------------------------------------------------------------------------------------------------------
# VQ-VAE building blocks (official key names: norm1/conv1/norm2/conv2/nin_shortcut, norm/qkv/proj_out, ...)

def Normalize(in_channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample2x(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode='nearest'))


class Downsample2x(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x):
        # asymmetric padding (right and bottom only) is what the checkpoints were trained with
        return self.conv(F.pad(x, pad=(0, 1, 0, 1), mode='constant', value=0))


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels, dropout=0.0):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention, softmax(q^T k * C^-0.5)."""

    def __init__(self, in_channels):
        super().__init__()
        self.C = in_channels
        self.norm = Normalize(in_channels)
        self.qkv = nn.Conv2d(in_channels, 3 * in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, 1, C, H * W).transpose(-1, -2).unbind(1)  # (B,1,HW,C)
        h = F.scaled_dot_product_attention(q, k, v, scale=int(C) ** -0.5)
        return x + self.proj_out(h.transpose(-1, -2).reshape(B, C, H, W))


class Encoder(nn.Module):
    def __init__(self, *, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, dropout=0.0, in_channels=3,
                 z_channels=32, using_sa=True, using_mid_sa=True):
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if i_level == self.num_resolutions - 1 and using_sa:
                    attn.append(AttnBlock(block_in))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample2x(block_in)
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in) if using_mid_sa else nn.Identity()
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h = down.block[i_block](h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, *, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, dropout=0.0, in_channels=3,
                 z_channels=32, using_sa=True, using_mid_sa=True):
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in) if using_mid_sa else nn.Identity()
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):  # key index = resolution level, 0 = finest
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if i_level == self.num_resolutions - 1 and using_sa:
                    attn.append(AttnBlock(block_in))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample2x(block_in)
            self.up.insert(0, up)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = up.block[i_block](h)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------------------
# Multi-scale residual quantizer

class Phi(nn.Conv2d):
    """Phi(h) = (1 - r) h + r conv(h): the per-scale refinement applied to every up-sampled code map."""

    def __init__(self, embed_dim, quant_resi):
        super().__init__(embed_dim, embed_dim, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h_BChw):
        return h_BChw.mul(1 - self.resi_ratio) + super().forward(h_BChw).mul_(self.resi_ratio)


class PhiPartiallyShared(nn.Module):
    def __init__(self, qresi_ls: nn.ModuleList):
        super().__init__()
        self.qresi_ls = qresi_ls
        K = len(qresi_ls)
        # float64 numpy arithmetic on purpose: it decides exact ties (SN=10, si=2 and 7) like the official code
        self.ticks = np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)

    def index(self, at_from_0_to_1: float) -> int:
        return int(np.argmin(np.abs(self.ticks - at_from_0_to_1)).item())

    def __getitem__(self, at_from_0_to_1: float) -> Phi:
        return self.qresi_ls[self.index(at_from_0_to_1)]


def _up(x, HW):
    """Scale-to-latent upsampling of the official quantizer: torch bicubic (a=-0.75), align_corners=False."""
    return F.interpolate(x, size=(HW, HW), mode='bicubic')


def _down(x, pn):
    """Latent-to-scale downsampling: area (adaptive average pooling, overlapping windows)."""
    return F.interpolate(x, size=(pn, pn), mode='area')


class VectorQuantizer2(nn.Module):
    def __init__(self, vocab_size, Cvae, using_znorm=False, beta=0.25, default_qresi_counts=0,
                 v_patch_nums=REAL_PATCH_NUMS, quant_resi=0.5, share_quant_resi=4):
        super().__init__()
        if using_znorm:
            raise NotImplementedError('using_znorm=True (cosine codebook) is not used by any released VAR checkpoint')
        self.vocab_size, self.Cvae, self.using_znorm, self.v_patch_nums = vocab_size, Cvae, using_znorm, tuple(v_patch_nums)
        self.quant_resi_ratio = quant_resi
        if share_quant_resi != 4:
            raise NotImplementedError('only share_quant_resi=4 (the released configuration) is implemented')
        self.quant_resi = PhiPartiallyShared(nn.ModuleList([Phi(Cvae, quant_resi) for _ in range(share_quant_resi)]))
        # persistent but unused at inference; the official checkpoints carry it, so strict loading needs it
        self.register_buffer('ema_vocab_hit_SV', torch.full((len(self.v_patch_nums), vocab_size), fill_value=0.0))
        self.beta = beta
        self.embedding = nn.Embedding(vocab_size, Cvae)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # one VAE file serves models with other patch_nums (the official quantizer does the same swap)
        key = prefix + 'ema_vocab_hit_SV'
        if key in state_dict and state_dict[key].shape[0] != self.ema_vocab_hit_SV.shape[0]:
            state_dict[key] = torch.zeros_like(self.ema_vocab_hit_SV, device='cpu')  # unused at inference
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def phi(self, si: int, SN: int) -> Phi:
        return self.quant_resi[si / (SN - 1)]

    def _sq_dists(self, z_NC):
        # same expression as the official code so that near-ties break identically
        E = self.embedding.weight
        d = torch.sum(z_NC.square(), dim=1, keepdim=True) + torch.sum(E.square(), dim=1, keepdim=False)
        return d.addmm_(z_NC, E.T, alpha=-2, beta=1)

    def _nearest_code(self, z_NC):
        return torch.argmin(self._sq_dists(z_NC), dim=1)

    def forward(self, f_BChw):
        """VQ-VAE training pass: returns (f_hat with a straight-through gradient, vq loss, [idx per scale])."""
        B, C, H, W = f_BChw.shape
        f_no_grad = f_BChw.detach()
        f_rest, f_hat = f_no_grad.clone(), torch.zeros_like(f_no_grad)
        SN, loss, idx_ls = len(self.v_patch_nums), 0.0, []
        for si, pn in enumerate(self.v_patch_nums):
            z = _down(f_rest, pn) if si != SN - 1 else f_rest
            idx_N = self._nearest_code(z.permute(0, 2, 3, 1).reshape(-1, C))
            h = self.embedding(idx_N).view(B, pn, pn, C).permute(0, 3, 1, 2)
            h = self.phi(si, SN)(_up(h, H) if si != SN - 1 else h)
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            loss = loss + self.beta * F.mse_loss(f_hat.detach(), f_BChw) + F.mse_loss(f_hat, f_no_grad)
            idx_ls.append(idx_N.view(B, pn * pn))
        return (f_hat.detach() - f_no_grad) + f_BChw, loss / SN, idx_ls

    @torch.no_grad()
    def f_to_idxBl_or_fhat(self, f_BChw, to_fhat: bool, v_patch_nums=None, dists_out=None) -> List[torch.Tensor]:
        """f (B,Cvae,H,W) -> per scale: tokens (B, ph*pw) int64, or the cumulative f_hat (B,Cvae,H,W).

        dists_out: a list that receives, per scale, the squared distances of the residual to every code (B, ph*pw, V)
        (AID-VAR's soft-decoded real images; not in the official code).
        """
        B, C, H, W = f_BChw.shape
        f_rest, f_hat = f_BChw.detach().clone(), torch.zeros_like(f_BChw)
        patch_hws = [(pn, pn) if isinstance(pn, int) else (pn[0], pn[1]) for pn in (v_patch_nums or self.v_patch_nums)]
        if patch_hws[-1] != (H, W):
            raise ValueError(f'the last patch size {patch_hws[-1]} must equal the latent size {(H, W)}')
        SN, out = len(patch_hws), []
        for si, (ph, pw) in enumerate(patch_hws):
            z = F.interpolate(f_rest, size=(ph, pw), mode='area') if si != SN - 1 else f_rest
            d_NV = self._sq_dists(z.permute(0, 2, 3, 1).reshape(-1, C))
            idx_N = torch.argmin(d_NV, dim=1)
            if dists_out is not None:
                dists_out.append(d_NV.view(B, ph * pw, -1))
            h = self.embedding(idx_N.view(B, ph, pw)).permute(0, 3, 1, 2)
            h = F.interpolate(h, size=(H, W), mode='bicubic').contiguous() if si != SN - 1 else h.contiguous()
            h = self.phi(si, SN)(h)
            f_hat.add_(h)
            f_rest.sub_(h)
            out.append(f_hat.clone() if to_fhat else idx_N.reshape(B, ph * pw))
        return out

    def embed_to_fhat(self, ms_h_BChw: List[torch.Tensor], all_to_max_scale=True, last_one=False):
        """Per-scale code maps [(B,Cvae,pn,pn)] -> cumulative f_hat per scale (list) or the last one.

        A prefix (the first k+1 scales) is allowed: it gives the latent of scales 0..k, as used for the
        intermediate images of AID-VAR's discriminator and of ISCS.
        """
        B, H, SN = ms_h_BChw[0].shape[0], self.v_patch_nums[-1], len(self.v_patch_nums)
        ls_f_hat = []
        if all_to_max_scale:
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, H, H)
            for si in range(len(ms_h_BChw)):
                h = ms_h_BChw[si]
                h = _up(h, H) if si < SN - 1 else h
                f_hat = f_hat + self.phi(si, SN)(h)
                ls_f_hat.append(f_hat)
        else:  # grows f_hat at native resolution (rarely used official path)
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, self.v_patch_nums[0], self.v_patch_nums[0])
            for si, pn in enumerate(self.v_patch_nums[:len(ms_h_BChw)]):
                f_hat = _up(f_hat, pn)
                f_hat = f_hat + self.phi(si, SN)(ms_h_BChw[si])
                ls_f_hat.append(f_hat)
        return ls_f_hat[-1] if last_one else ls_f_hat

    def idxBl_to_var_input(self, gt_ms_idx_Bl: List[torch.Tensor]) -> torch.Tensor:
        """Ground-truth tokens per scale -> teacher-forcing input (B, L - first_l, Cvae)."""
        B, C, H, SN = gt_ms_idx_Bl[0].shape[0], self.Cvae, self.v_patch_nums[-1], len(self.v_patch_nums)
        f_hat = self.embedding.weight.new_zeros(B, C, H, H)
        next_scales = []
        for si in range(SN - 1):
            pn = self.v_patch_nums[si]
            h = _up(self.embedding(gt_ms_idx_Bl[si]).transpose(1, 2).reshape(B, C, pn, pn), H)
            f_hat = f_hat + self.phi(si, SN)(h)
            next_scales.append(_down(f_hat, self.v_patch_nums[si + 1]).view(B, C, -1).transpose(1, 2))
        return torch.cat(next_scales, dim=1)

    def get_next_autoregressive_input(self, si: int, SN: int, f_hat, h_BChw):
        """Adds scale si's code map to f_hat (in place) and returns (f_hat, next scale's input map)."""
        HW = self.v_patch_nums[-1]
        if si != SN - 1:
            f_hat.add_(self.phi(si, SN)(_up(h_BChw, HW)))
            return f_hat, _down(f_hat, self.v_patch_nums[si + 1])
        f_hat.add_(self.phi(si, SN)(h_BChw))
        return f_hat, f_hat


class VQVAE(nn.Module):
    """The multi-scale VQ-VAE of VAR. Images in [-1, 1] of side `downsample * patch_nums[-1]`.

    `ch_mult` (not an official argument) lets the tiny preset use 4x downsampling; the default is the
    official (1, 1, 2, 2, 4), i.e. 16x.
    """

    def __init__(self, vocab_size=4096, z_channels=32, ch=128, dropout=0.0, beta=0.25, using_znorm=False,
                 quant_conv_ks=3, quant_resi=0.5, share_quant_resi=4, default_qresi_counts=0,
                 v_patch_nums=REAL_PATCH_NUMS, test_mode=True, ch_mult=(1, 1, 2, 2, 4)):
        super().__init__()
        self.test_mode = test_mode
        self.V, self.Cvae = vocab_size, z_channels
        ddconfig = dict(dropout=dropout, ch=ch, z_channels=z_channels, in_channels=3, ch_mult=tuple(ch_mult),
                        num_res_blocks=2, using_sa=True, using_mid_sa=True)
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.vocab_size = vocab_size
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.quantize = VectorQuantizer2(vocab_size=vocab_size, Cvae=self.Cvae, using_znorm=using_znorm, beta=beta,
                                         default_qresi_counts=default_qresi_counts, v_patch_nums=v_patch_nums,
                                         quant_resi=quant_resi, share_quant_resi=share_quant_resi)
        self.quant_conv = nn.Conv2d(self.Cvae, self.Cvae, quant_conv_ks, stride=1, padding=quant_conv_ks // 2)
        self.post_quant_conv = nn.Conv2d(self.Cvae, self.Cvae, quant_conv_ks, stride=1, padding=quant_conv_ks // 2)
        if test_mode:
            self.eval()
            self.requires_grad_(False)

    @property
    def patch_nums(self):
        return self.quantize.v_patch_nums

    def forward(self, img_B3HW):
        """Training pass: (reconstruction in [-1,1]-ish, unclamped; vq loss)."""
        f_hat, vq_loss, _ = self.quantize(self.quant_conv(self.encoder(img_B3HW)))
        return self.decoder(self.post_quant_conv(f_hat)), vq_loss

    def fhat_to_img(self, f_hat_BChw):
        """f_hat (B,Cvae,h,w) -> image (B,3,H,W) clamped to [-1, 1] (the official decode)."""
        return self.decoder(self.post_quant_conv(f_hat_BChw)).clamp(-1, 1)

    def img_to_idxBl(self, inp_img_no_grad, v_patch_nums=None) -> List[torch.Tensor]:
        """Image (B,3,H,W) in [-1,1] -> tokens per scale [(B, pn^2) int64]."""
        f = self.quant_conv(self.encoder(inp_img_no_grad))
        return self.quantize.f_to_idxBl_or_fhat(f, to_fhat=False, v_patch_nums=v_patch_nums)

    def idxBl_to_h(self, ms_idx_Bl: List[torch.Tensor]) -> List[torch.Tensor]:
        """Tokens per scale [(B, pn^2)] -> code maps [(B, Cvae, pn, pn)]."""
        B, out = ms_idx_Bl[0].shape[0], []
        for idx_Bl in ms_idx_Bl:
            pn = round(idx_Bl.shape[1] ** 0.5)
            out.append(self.quantize.embedding(idx_Bl).transpose(1, 2).reshape(B, self.Cvae, pn, pn))
        return out

    def idxBl_to_img(self, ms_idx_Bl, same_shape=True, last_one=False):
        """Tokens per scale -> the image (last_one) or the list of SN cumulative images, in [-1, 1]."""
        return self.embed_to_img(self.idxBl_to_h(ms_idx_Bl), all_to_max_scale=same_shape, last_one=last_one)

    def embed_to_img(self, ms_h_BChw, all_to_max_scale, last_one=False):
        if last_one:
            return self.fhat_to_img(self.quantize.embed_to_fhat(ms_h_BChw, all_to_max_scale, last_one=True))
        return [self.fhat_to_img(f) for f in self.quantize.embed_to_fhat(ms_h_BChw, all_to_max_scale, last_one=False)]

    def img_to_reconstructed_img(self, x, v_patch_nums=None, last_one=False):
        f = self.quant_conv(self.encoder(x))
        ls_f_hat = self.quantize.f_to_idxBl_or_fhat(f, to_fhat=True, v_patch_nums=v_patch_nums)
        if last_one:
            return self.fhat_to_img(ls_f_hat[-1])
        return [self.fhat_to_img(f_hat) for f_hat in ls_f_hat]


# ----------------------------------------------------------------------------------------------------------
# VAR transformer

class FFN(nn.Module):
    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate='tanh'))


class SelfAttention(nn.Module):
    """Cosine attention with a learned per-head logit scale; optional KV cache for sampling."""

    def __init__(self, embed_dim=768, num_heads=12, attn_l2_norm=True):
        super().__init__()
        assert embed_dim % num_heads == 0
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), fill_value=4.0).log())
            self.max_scale_mul = math.log(100)  # a python float: rounds to the parameter's dtype, as the official default-dtype tensor does
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer('zero_k_bias', torch.zeros(embed_dim))
        self.mat_qkv = nn.Linear(embed_dim, embed_dim * 3, bias=False)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.caching, self.cached_k, self.cached_v, self.cache_len, self.max_len = False, None, None, 0, 0

    def kv_caching(self, enable: bool, max_len: int = 0):
        """Sampling mode: the keys / values of earlier scales are kept, in a buffer of max_len tokens."""
        if enable and max_len <= 0:
            raise ValueError('kv_caching(True, max_len): max_len (the total number of tokens) must be positive')
        self.caching, self.cached_k, self.cached_v, self.cache_len, self.max_len = enable, None, None, 0, max_len

    def forward(self, x, attn_bias):
        B, L, C = x.shape
        qkv = F.linear(x, self.mat_qkv.weight, torch.cat((self.q_bias, self.zero_k_bias, self.v_bias)))
        q, k, v = qkv.view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B,H,L,c)
        if self.attn_l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        if self.caching:  # earlier scales' keys/values are reused, never recomputed (nor copied again: no torch.cat)
            if self.cached_k is None:
                self.cached_k = k.new_empty(B, self.num_heads, self.max_len, self.head_dim)
                self.cached_v = v.new_empty(B, self.num_heads, self.max_len, self.head_dim)
            n = self.cache_len + L
            self.cached_k[:, :, self.cache_len:n], self.cached_v[:, :, self.cache_len:n] = k, v
            k, v, self.cache_len = self.cached_k[:, :, :n], self.cached_v[:, :, :n], n
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class AdaLNSelfAttn(nn.Module):
    def __init__(self, embed_dim, cond_dim, num_heads, mlp_ratio=4.0, drop_path=0.0, norm_eps=1e-6, attn_l2_norm=True):
        super().__init__()
        self.C, self.drop_path_rate = embed_dim, drop_path
        self.attn = SelfAttention(embed_dim, num_heads, attn_l2_norm)
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio))
        self.ln_eps = norm_eps
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 6 * embed_dim))

    def _drop_path(self, x):
        if self.drop_path_rate == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], 1, 1).bernoulli_(1 - self.drop_path_rate)
        return x * keep / (1 - self.drop_path_rate)

    def modulation(self, cond_BD):
        """AdaLN parameters of cond_BD: (gamma1, gamma2, 1 + scale1, 1 + scale2, shift1, shift2), each (B, 1, C)."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)
        return gamma1, gamma2, scale1.add(1), scale2.add(1), shift1, shift2

    def forward(self, x, cond_BD, attn_bias, mod=None):
        """mod: modulation(cond_BD), when the caller has it already (the sampler: the same at every scale)."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.modulation(cond_BD) if mod is None else mod
        ln = lambda t: F.layer_norm(t, (self.C,), eps=self.ln_eps)
        x = x + self._drop_path(self.attn(ln(x).mul(scale1).add_(shift1), attn_bias=attn_bias).mul_(gamma1))
        x = x + self._drop_path(self.ffn(ln(x).mul(scale2).add_(shift2)).mul(gamma2))
        return x


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C, D, norm_eps=1e-6):
        super().__init__()
        self.C, self.ln_eps = C, norm_eps
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(D, 2 * C))

    def modulation(self, cond_BD):
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return scale.add(1), shift

    def forward(self, x_BLC, cond_BD, mod=None):
        scale, shift = self.modulation(cond_BD) if mod is None else mod
        return F.layer_norm(x_BLC, (self.C,), eps=self.ln_eps).mul(scale).add_(shift)


def sample_with_top_k_top_p_(logits_BlV, top_k=0, top_p=0.0, rng=None, num_samples=1):
    """Masks logits in place (top-k, then nucleus) and draws (B, l, num_samples) token ids."""
    B, l, V = logits_BlV.shape
    if 0 < top_k < V:  # top_k >= V keeps every token (the official code would raise)
        thr = logits_BlV.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < thr, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        sorted_idx_to_remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        sorted_idx_to_remove[..., -1:] = False
        logits_BlV.masked_fill_(sorted_idx_to_remove.scatter(sorted_idx.ndim - 1, sorted_idx, sorted_idx_to_remove), -torch.inf)
    replacement = num_samples >= 0
    return torch.multinomial(logits_BlV.softmax(dim=-1).view(-1, V), num_samples=abs(num_samples),
                             replacement=replacement, generator=rng).view(B, l, abs(num_samples))


def gumbel_softmax_with_rng(logits, tau=1.0, dim=-1, rng=None):
    if rng is None:
        return F.gumbel_softmax(logits=logits, tau=tau, hard=False, dim=dim)
    gumbels = -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_(generator=rng).log()
    return ((logits + gumbels) / tau).softmax(dim)


GuidanceHook = Callable[[int, torch.Tensor], Optional[torch.Tensor]]


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 -> float32; float32 and float64 unchanged (guidance is added in at least float32)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class VAR(nn.Module):
    """Next-scale-prediction transformer (official VAR). Holds the VQVAE by reference, not as a submodule."""

    def __init__(self, vae_local: VQVAE, num_classes=1000, depth=16, embed_dim=1024, num_heads=16, mlp_ratio=4.0,
                 drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, norm_eps=1e-6, shared_aln=False,
                 cond_drop_rate=0.1, attn_l2_norm=False, patch_nums=REAL_PATCH_NUMS,
                 flash_if_available=True, fused_if_available=True):
        super().__init__()
        if shared_aln:
            raise NotImplementedError('shared_aln=True (the 512px var_d36) is out of scope')
        if drop_rate > 0 or attn_drop_rate > 0:
            raise NotImplementedError('dropout is 0 in every released VAR')
        assert embed_dim % num_heads == 0
        self.Cvae, self.V = vae_local.Cvae, vae_local.vocab_size
        self.depth, self.C, self.D, self.num_heads = depth, embed_dim, embed_dim, num_heads
        self.cond_drop_rate = cond_drop_rate
        self.patch_nums = tuple(patch_nums)
        self.L = sum(pn ** 2 for pn in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.begin_ends, cur = [], 0
        for pn in self.patch_nums:
            self.begin_ends.append((cur, cur + pn ** 2))
            cur += pn ** 2
        self.num_stages_minus_1 = len(self.patch_nums) - 1
        self.vae_proxy = (vae_local,)  # a tuple hides it from nn.Module: no vae keys in VAR's state_dict
        self.vae_quant_proxy = (vae_local.quantize,)
        self.num_classes = num_classes

        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, self.C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, self.L, self.C))
        d = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(self.patch_nums)]).view(1, self.L, 1)
        dT = d.transpose(1, 2)
        self.register_buffer('lvl_1L', dT[:, 0].contiguous())
        self.register_buffer('attn_bias_for_masking',
                             torch.where(d >= dT, 0.0, -torch.inf).reshape(1, 1, self.L, self.L).contiguous())
        self.word_embed = nn.Linear(self.Cvae, self.C)
        self.class_emb = nn.Embedding(self.num_classes + 1, self.C)
        self.lvl_embed = nn.Embedding(len(self.patch_nums), self.C)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device='cpu')]
        self.blocks = nn.ModuleList([AdaLNSelfAttn(self.C, self.D, num_heads, mlp_ratio, dpr[i], norm_eps, attn_l2_norm)
                                     for i in range(depth)])
        self.head_nm = AdaLNBeforeHead(self.C, self.D, norm_eps)
        self.head = nn.Linear(self.C, self.V)

    @property
    def vae(self) -> VQVAE:
        return self.vae_proxy[0]

    def init_weights(self, init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02):
        """The official from-scratch initialisation (used only by pretrain_tiny.py)."""
        std = math.sqrt(1 / self.C / 3)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=std)
        self.head.weight.data.mul_(init_head)
        self.head.bias.data.zero_()
        self.head_nm.ada_lin[-1].weight.data.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.data.zero_()
        for b in self.blocks:
            b.attn.proj.weight.data.div_(math.sqrt(2 * self.depth))
            b.ffn.fc2.weight.data.div_(math.sqrt(2 * self.depth))
            b.ada_lin[-1].weight.data[2 * self.C:].mul_(init_adaln)
            b.ada_lin[-1].weight.data[:2 * self.C].mul_(init_adaln_gamma)
            b.ada_lin[-1].bias.data.zero_()
            if hasattr(b.attn, 'scale_mul_1H11'):
                b.attn.scale_mul_1H11.data.fill_(math.log(4.0))
            b.attn.q_bias.data.zero_()
            b.attn.v_bias.data.zero_()

    def get_logits(self, h_BLC, cond_BD):
        """Final hidden state -> logits (B, L, V); low-precision logits are promoted to float32."""
        return at_least_fp32(self.head(self.head_nm(h_BLC, cond_BD)))

    def forward_hidden(self, label_B, x_BLCv_wo_first_l, input_add_BLC=None):
        """Teacher-forced pass up to the head. Returns (h_BLC, cond_BD).

        input_add_BLC: optional (B, L, C) added to the token features entering the blocks (AID-VAR's
        `--inject input`; its rows of scale 0 should be zero).
        """
        B = x_BLCv_wo_first_l.shape[0]
        if self.training and self.cond_drop_rate > 0:
            label_B = torch.where(torch.rand(B, device=label_B.device) < self.cond_drop_rate, self.num_classes, label_B)
        cond_BD = self.class_emb(label_B)
        sos = cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
        x_BLC = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l)), dim=1)
        x_BLC = x_BLC + self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC
        if input_add_BLC is not None:  # in float32: a bf16 sum would round away much of a small w * g
            x_BLC = at_least_fp32(x_BLC) + at_least_fp32(input_add_BLC)
        main_type = torch.matmul(x_BLC.new_ones(8, 8), x_BLC.new_ones(8, 8)).dtype  # autocast's compute dtype
        # the residual stream stays in x's dtype (float32 under autocast, as in the KV-cached sampler); the
        # blocks' matmuls still run in main_type
        cond, attn_bias = cond_BD.to(main_type), self.attn_bias_for_masking.to(main_type)
        for b in self.blocks:
            x_BLC = b(x_BLC, cond, attn_bias)
        return x_BLC, cond_BD

    def forward(self, label_B, x_BLCv_wo_first_l):
        """Teacher forcing: labels (B,), input (B, L-first_l, Cvae) from `idxBl_to_var_input` -> logits (B, L, V)."""
        h_BLC, cond_BD = self.forward_hidden(label_B, x_BLCv_wo_first_l)
        return self.get_logits(h_BLC, cond_BD)

    @torch.no_grad()
    def autoregressive_infer_cfg(self, B: int, label_B: Optional[Union[int, torch.LongTensor]], g_seed: Optional[int] = None,
                                 cfg=1.5, top_k=0, top_p=0.0, more_smooth=False, guidance_hook: Optional[GuidanceHook] = None,
                                 guidance_w: float = 0.0, inject: str = 'input', ret_idx: bool = False):
        """Samples B images (B, 3, H, W) in [0, 1] with classifier-free guidance, scale by scale (KV cache).

        guidance_hook(si, idx_prev_Bl) -> (B, pn_si^2, C) or None is called for every scale si >= 1 with the
        tokens sampled at scale si-1; its output times `guidance_w` is added to scale si's token features
        (`inject='input'`) or to its final hidden state before the head (`inject='head'`), on both CFG halves.
        With no hook nothing extra runs. ret_idx=True also returns the tokens [(B, pn^2) int64 per scale].
        """
        if inject not in ('input', 'head'):
            raise ValueError(f"inject must be 'input' or 'head', got {inject!r}")
        dev = self.lvl_1L.device
        rng = None if g_seed is None else torch.Generator(device=dev).manual_seed(g_seed)
        if label_B is None:
            uniform = torch.full((1, self.num_classes), 1.0 / self.num_classes, device=dev)
            label_B = torch.multinomial(uniform, num_samples=B, replacement=True, generator=rng).reshape(B)
        elif isinstance(label_B, int):
            label_B = torch.full((B,), self.num_classes if label_B < 0 else label_B, device=dev)
        sos = cond_BD = self.class_emb(torch.cat((label_B, torch.full_like(label_B, self.num_classes)), dim=0))
        lvl_pos = self.lvl_embed(self.lvl_1L) + self.pos_1LC
        next_token_map = sos.unsqueeze(1).expand(2 * B, self.first_l, -1) + self.pos_start.expand(2 * B, self.first_l, -1) \
            + lvl_pos[:, :self.first_l]
        cur_L, SN, vq = 0, len(self.patch_nums), self.vae_quant_proxy[0]
        f_hat = sos.new_zeros(B, self.Cvae, self.patch_nums[-1], self.patch_nums[-1])
        idx_ls = []
        for b in self.blocks:
            b.attn.kv_caching(True, self.L)
        # the condition is the same at every scale: its AdaLN parameters are computed once, not once per scale
        mods, head_mod = [b.modulation(cond_BD) for b in self.blocks], self.head_nm.modulation(cond_BD)
        for si, pn in enumerate(self.patch_nums):
            ratio = si / self.num_stages_minus_1
            cur_L += pn * pn
            g = None
            if guidance_hook is not None and si > 0:
                g = guidance_hook(si, idx_ls[-1])
                if g is not None:  # w * g in float32, added to the float32 token features / hidden state
                    g = (guidance_w * at_least_fp32(g)).repeat(2, 1, 1)
                    if inject == 'input':
                        next_token_map = at_least_fp32(next_token_map) + g
            x = next_token_map
            for b, mod in zip(self.blocks, mods):
                x = b(x, cond_BD, None, mod)
            if g is not None and inject == 'head':
                x = at_least_fp32(x) + g
            logits_BlV = at_least_fp32(self.head(self.head_nm(x, cond_BD, head_mod)))  # get_logits, modulation reused
            t = cfg * ratio
            logits_BlV = (1 + t) * logits_BlV[:B] - t * logits_BlV[B:]
            idx_Bl = sample_with_top_k_top_p_(logits_BlV, rng=rng, top_k=top_k, top_p=top_p, num_samples=1)[:, :, 0]
            idx_ls.append(idx_Bl)
            if not more_smooth:
                h_BChw = vq.embedding(idx_Bl)
            else:
                gum_t = max(0.27 * (1 - ratio * 0.95), 0.005)
                h_BChw = gumbel_softmax_with_rng(logits_BlV.mul(1 + ratio), tau=gum_t, dim=-1, rng=rng) @ vq.embedding.weight.unsqueeze(0)
            h_BChw = h_BChw.transpose(1, 2).reshape(B, self.Cvae, pn, pn)
            f_hat, next_token_map = vq.get_next_autoregressive_input(si, SN, f_hat, h_BChw)
            if si != self.num_stages_minus_1:
                next_token_map = next_token_map.view(B, self.Cvae, -1).transpose(1, 2)
                next_token_map = self.word_embed(next_token_map) + lvl_pos[:, cur_L:cur_L + self.patch_nums[si + 1] ** 2]
                next_token_map = next_token_map.repeat(2, 1, 1)
        for b in self.blocks:
            b.attn.kv_caching(False)
        # channels-last decode: measured 15% faster on CPU (oneDNN convolutions, no layout reorders); pixels move by
        # float round-off only (the tokens are final by now)
        img = self.vae.fhat_to_img(f_hat.contiguous(memory_format=torch.channels_last)).add(1).mul(0.5).contiguous()
        return (img, idx_ls) if ret_idx else img


def build_vae_var(device='cpu', patch_nums=REAL_PATCH_NUMS, V=4096, Cvae=32, ch=160, share_quant_resi=4,
                  num_classes=1000, depth=16, shared_aln=False, attn_l2_norm=True, flash_if_available=True,
                  fused_if_available=True, init=False, ch_mult=(1, 1, 2, 2, 4), embed_dim=None, num_heads=None):
    """The official builder: VQVAE + VAR-d{depth} (width 64*depth, depth heads) unless embed_dim/num_heads are given.

    Pass device='meta' to build without memory (d30 has 2B parameters). init=True runs the from-scratch init.
    """
    heads = num_heads or depth
    width = embed_dim or depth * 64
    with torch.device(device):
        vae = VQVAE(vocab_size=V, z_channels=Cvae, ch=ch, test_mode=True, share_quant_resi=share_quant_resi,
                    v_patch_nums=patch_nums, ch_mult=ch_mult)
        var = VAR(vae_local=vae, num_classes=num_classes, depth=depth, embed_dim=width, num_heads=heads,
                  mlp_ratio=4.0, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1 * depth / 24, norm_eps=1e-6,
                  shared_aln=shared_aln, cond_drop_rate=0.1, attn_l2_norm=attn_l2_norm, patch_nums=patch_nums,
                  flash_if_available=flash_if_available, fused_if_available=fused_if_available)
    if init:
        var.init_weights()
    return vae, var


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
# Colours come from two small palettes (plus a little jitter) rather than the whole RGB cube: with
# uniform RGB the tiny VQ-VAE spent its whole CPU budget on colour and still came out two-tone, and the
# VAR then drew blobs. With a dozen colours the budget goes into the shapes, which is what the method and
# the metrics are about.
_FILL_PALETTE = np.array([[0.90, 0.15, 0.15], [0.15, 0.75, 0.20], [0.20, 0.35, 0.95], [0.95, 0.85, 0.15],
                          [0.85, 0.25, 0.85], [0.15, 0.85, 0.85], [0.98, 0.55, 0.10], [0.97, 0.97, 0.97],
                          [0.08, 0.08, 0.08]], dtype=np.float64)
_BG_PALETTE = np.array([[0.25, 0.28, 0.35], [0.55, 0.50, 0.42], [0.30, 0.42, 0.30], [0.72, 0.72, 0.70],
                        [0.45, 0.30, 0.35], [0.35, 0.48, 0.62]], dtype=np.float64)


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
    # Background base / fill colours: palette entries + jitter, resampled until the luminance gap is
    # large, so the shape stays readable while the background itself is low-contrast.
    def draw_colours(m):
        b = _BG_PALETTE[rng.integers(0, len(_BG_PALETTE), m)] + rng.uniform(-0.04, 0.04, (m, 3))
        f = _FILL_PALETTE[rng.integers(0, len(_FILL_PALETTE), m)] + rng.uniform(-0.04, 0.04, (m, 3))
        return b, f
    base, fill = draw_colours(n)
    bad = np.abs((fill - base) @ _LUMA) < 0.25
    while bad.any():
        base[bad], fill[bad] = draw_colours(int(bad.sum()))
        bad = np.abs((fill - base) @ _LUMA) < 0.25
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


def to_signed(img_NHW3_u8: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the range every model here takes."""
    return img_NHW3_u8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class ShapesDataset(torch.utils.data.Dataset):
    """The shapes set as a Dataset; generated once in __init__, no augmentation.

    Items: (img float32 tensor (3, size, size) in [-1, 1], label int in [0, 10)).
    """

    def __init__(self, n, seed, size=32):
        images, labels = make_shapes(n, seed, size)
        self.images_NHW3 = torch.from_numpy(images)
        self.labels = torch.from_numpy(labels)

    @classmethod
    def from_npz(cls, path):
        """The same in-memory dataset from an npz with arr_0 (N, H, W, 3) uint8 and labels (N,)."""
        path = Path(path)
        if not path.is_file():
            raise SystemExit(f'--data_path {path}: no such npz file.')
        with np.load(path, allow_pickle=False) as f:
            if 'arr_0' not in f.files or 'labels' not in f.files:
                raise SystemExit(f'--data_path {path} has {f.files}; training needs arr_0 (images) and labels.')
            ds = cls.__new__(cls)
            ds.images_NHW3, ds.labels = torch.from_numpy(f['arr_0']), torch.from_numpy(f['labels']).long()
        return ds

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img_3HW = to_signed(self.images_NHW3[i:i + 1])[0]
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
# D's (norm, augmentation) per preset: StyleGAN-T's for the real models; none on the tiny preset, where with them D
# is at chance on its own fakes (README, positive control)
DISC_DEFAULTS = {'real': ('bn', 'diffaug'), 'tiny': ('none', 'none')}


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
            preset that shift is most of what separates them from the reals (README: D learns with 'none').
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

        Returns: guidance (B, pn_si^2, C) in feat's dtype (unbounded; scaled by w at use).
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
# AIDVAR_TINY_DIR / AIDVAR_TINY_PRESET point every script at other tiny weights (e.g. a pretrain_tiny.py staging run)
TINY_PRESET = os.environ.get('AIDVAR_TINY_PRESET', 'v1')
TINY = TINY_PRESETS[TINY_PRESET]
TINY_DIR = Path(os.environ.get('AIDVAR_TINY_DIR', REPO_DIR / 'weights'))
TINY_FILES = dict(vae='tiny_vae.pt', var='tiny_var.pt', featnet='tiny_featnet.pt', injector='tiny_injector.pt')
REAL_DEPTHS = (16, 20, 24, 30)


def hub_offline() -> bool:
    return os.environ.get('HF_HUB_OFFLINE', '0').strip().lower() in ('1', 'true', 'yes', 'on')


HUB_CHECK_TIMEOUT = 3.0  # seconds; huggingface_hub itself retries 5 times with back-off (~25 s offline)


def hub_unreachable() -> Optional[str]:
    """None if the Hugging Face hub (or the HTTPS proxy in use) accepts a TCP connection within HUB_CHECK_TIMEOUT
    seconds, else why not. Run before hf_hub_download, so an offline machine without HF_HUB_OFFLINE=1 fails in
    seconds instead of after the hub client's retries."""
    import socket
    import threading
    from urllib.parse import urlsplit
    from huggingface_hub import constants
    proxy = next((os.environ[k] for k in ('HTTPS_PROXY', 'https_proxy', 'ALL_PROXY', 'all_proxy') if os.environ.get(k)), None)
    url = urlsplit(proxy if proxy else constants.ENDPOINT)
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
                         f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}. The file is probably truncated '
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



# ----------------------------------------------------------------------------------------------------------
# AID-VAR glue: guidance from token maps, injector files, data

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


PLANT_STRENGTH = dict(shift=2.0, logit=4.0)  # each moves the shipped tiny VAR's FID by ~+22 (500 samples)


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


def atomic_save(obj, path):
    """Writes through a temporary file + rename, so a kill mid-write never leaves a broken file: str as text,
    bytes as they are, anything else with torch.save."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    if isinstance(obj, str):
        tmp.write_text(obj)
    elif isinstance(obj, bytes):
        tmp.write_bytes(obj)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def save_injector(path, injector, meta: dict):
    """The released injector: {'meta': {depth, patch_nums, embed_dim, inject, w_train, broadcast, ...}, 'state_dict'}."""
    sd = {k: v.detach().float().cpu() for k, v in injector.state_dict().items()}
    atomic_save({'meta': dict(meta, embed_dim=injector.embed_dim, patch_nums=list(injector.patch_nums),
                              broadcast=injector.broadcast), 'state_dict': sd}, path)


def load_injector(path, var: VAR, device='cpu'):
    """Loads an injector file written by train_injector.py and checks it fits `var`. Returns (injector, meta)."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f'Injector file {path} does not exist (train one with `python train_injector.py`).')
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated or not a torch file: say so instead of a pickle traceback
        raise SystemExit(f'{path} is not a readable injector file ({type(e).__name__}); it is probably truncated.') from e
    if not (isinstance(obj, dict) and 'meta' in obj and 'state_dict' in obj):
        what = describe_state_dict(obj) if isinstance(obj, dict) and all(torch.is_tensor(v) for v in obj.values()) else type(obj).__name__
        raise SystemExit(f'{path} is not an AID-VAR injector file (it is {what}); use the injector.pt written by train_injector.py.')
    meta = obj['meta']
    if meta['embed_dim'] != var.C or tuple(meta['patch_nums']) != tuple(var.patch_nums):
        raise SystemExit(f'{path} is an injector for a VAR of width {meta["embed_dim"]} (depth {meta.get("depth")}), '
                         f'patch_nums {tuple(meta["patch_nums"])}, but the VAR in use has width {var.C}, patch_nums '
                         f'{tuple(var.patch_nums)}.')
    inj = GuidanceInjector(meta['embed_dim'], meta['patch_nums'], broadcast=meta.get('broadcast', False))
    load_checked(inj, obj['state_dict'], path, 'a guidance injector')
    return frozen(inj, device), meta


def build_train_data(depth: Optional[int], data_path=None, n_tiny=20000, tiny_seed=0):
    """Training images: the shapes set (tiny preset), ImageNet's train/ folder (official VAR transform), or, for
    either preset, the images and labels of an npz file (sample.py's format: e.g. a VAR's own samples as data)."""
    if data_path is not None and str(data_path).endswith('.npz'):
        return ShapesDataset.from_npz(data_path)
    if depth is None:
        if data_path is not None:
            raise SystemExit(f'--data_path {data_path} is for the real models (--depth 16/20/24/30); the tiny preset '
                             f'trains on generated shapes (--n_tiny) or on an npz file (--data_path X.npz), so a folder '
                             f'would be ignored. Drop it, or add --depth.')
        return ShapesDataset(n_tiny, seed=tiny_seed)
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    root = Path(data_path or '') / 'train'
    if data_path is None or not root.is_dir():
        raise SystemExit(f'ImageNet not found: --data_path must be a folder with train/ (and val/) class subfolders; '
                         f'looked for {root.resolve() if data_path else "(no --data_path given)"}.')
    if not any(p.is_dir() for p in root.iterdir()):
        raise SystemExit(f'{root} has no class subfolders: it is empty or not an ImageNet layout (train/<wnid>/*.JPEG).')
    reso = 256
    tf = T.Compose([T.Resize(round(1.125 * reso), interpolation=T.InterpolationMode.LANCZOS), T.RandomCrop(reso),
                    T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])  # -> [-1, 1]
    return ImageFolder(str(root), transform=tf)


# ----------------------------------------------------------------------------------------------------------
# Progress bars

PROGRESS_MININTERVAL_PIPE = 30.0  # seconds between updates when the output is a log file or a pipe


def progress_mininterval(file=None) -> float:
    """tqdm's default 0.1 s on a terminal; 30 s when the output is not a tty (a log gets a line per update)."""
    import sys
    file = file if file is not None else sys.stderr
    try:
        tty = file.isatty()
    except (AttributeError, ValueError):  # closed or file-like objects without isatty
        tty = False
    return 0.1 if tty else PROGRESS_MININTERVAL_PIPE


def progress(*args, **kwargs):
    """tqdm with mininterval = progress_mininterval(its output): every progress bar of the scripts goes through here."""
    from tqdm import tqdm
    kwargs.setdefault('mininterval', progress_mininterval(kwargs.get('file')))
    return tqdm(*args, **kwargs)
