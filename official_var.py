"""The official VAR and its multi-scale VQ-VAE (FoundationVision/VAR, commit 78b9539), ported checkpoint-exactly.

`vae_ch160v4096z32.pth` and `var_d{16,20,24,30}.pth` load with `strict=True` and compute the same numbers
(docs/exactness.md; tests/test_var_parity.py). Names are the official ones. Two deliberate differences, neither
changes a pretrained result: class dropout happens only in training mode, and sampling takes an optional guidance
hook (the AID-VAR injector) and can return its tokens. models.py re-exports everything here.
"""
import math
from typing import Callable, List, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REAL_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


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
        # in place on fresh tensors: no extra full-resolution temporaries (the decoder's largest non-conv cost on CPU);
        # values and gradients unchanged (test_resnet_block_in_place_keeps_values_and_gradients)
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
        return h.add_(self.nin_shortcut(x))


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
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


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
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


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
