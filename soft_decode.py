"""Differentiable decoding of token *probabilities* through the frozen VQ-VAE (AID-VAR §3.2, eq. 5).

Per-scale probability maps (B, pn_k^2, V) become code maps `probs @ codebook`, accumulated into f_hat exactly as
the VQ-VAE does (bicubic upsampling + the shared Phi convolutions) and decoded to RGB. One-hot maps give bit for
bit the hard decode `VQVAE.idxBl_to_img`, so real images and generated ones go through the same function
(`disc_images` builds both for D). The VQ-VAE is frozen, but nothing here runs under `no_grad`: gradients flow
from the image back to the probabilities.
"""
from typing import List, Optional

import torch
import torch.nn.functional as F

MODES = ('soft', 'gumbel', 'st', 'st_gumbel')


def relax(logits_BlV: torch.Tensor, mode: str = 'soft', tau: float = 1.0,
          generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Logits (B, l, V) -> differentiable token probabilities (B, l, V), rows summing to 1.

    soft: softmax(logits / tau), the expected code embedding (the paper's choice); gumbel: softmax((logits + Gumbel
    noise) / tau), a relaxed sample; st: straight-through, the hard one-hot argmax forward and the soft gradient
    backward; st_gumbel: a hard one-hot sample (the token inference would draw) forward, the gradient of the
    relaxed sample with the same noise backward."""
    if mode not in MODES:
        raise ValueError(f'decode mode must be one of {MODES}, got {mode!r}')
    if mode in ('gumbel', 'st_gumbel'):
        E = torch.empty_like(logits_BlV).exponential_(generator=generator)
        soft = ((logits_BlV - E.log()) / tau).softmax(-1)
    else:
        soft = (logits_BlV / tau).softmax(-1)
    if mode in ('soft', 'gumbel'):
        return soft
    hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
    return hard + (soft - soft.detach())  # exact one-hot values forward, soft gradient backward


def one_hot(idx_Bl: torch.Tensor, V: int, dtype=torch.float32) -> torch.Tensor:
    """Token ids (B, l) -> one-hot probabilities (B, l, V)."""
    return F.one_hot(idx_Bl, V).to(dtype)


def probs_to_h(vae, probs_BlV: torch.Tensor) -> torch.Tensor:
    """Probabilities (B, pn^2, V) -> code map (B, Cvae, pn, pn) = probs @ codebook."""
    B, l, V = probs_BlV.shape
    pn = round(l ** 0.5)
    e_BlC = probs_BlV @ vae.quantize.embedding.weight.to(probs_BlV.dtype)
    return e_BlC.transpose(1, 2).reshape(B, vae.Cvae, pn, pn)


def decode_probs(vae, probs_per_scale: List[torch.Tensor], last_one: bool = True):
    """Per-scale probabilities for scales 0..k (a prefix of patch_nums) -> RGB in [-1, 1] at full resolution.

    last_one=True: the cumulative image of scales 0..k, (B, 3, H, W); False: the list of the k+1 cumulative
    images (scale 0, scales 0..1, ...). Differentiable with respect to every probability map.
    """
    h_ls = [probs_to_h(vae, p) for p in probs_per_scale]
    return vae.embed_to_img(h_ls, all_to_max_scale=True, last_one=last_one)


def decode_mixed(vae, idx_prefix: List[torch.Tensor], probs_BlV: torch.Tensor) -> torch.Tensor:
    """Hard prefix tokens (scales 0..k-1) plus probabilities for scale k -> the cumulative image of 0..k."""
    dtype = probs_BlV.dtype
    return decode_probs(vae, [one_hot(i, vae.vocab_size, dtype) for i in idx_prefix] + [probs_BlV], last_one=True)


@torch.no_grad()
def residual_sq_dists(vae, img_B3HW: torch.Tensor):
    """The quantizer's view of real images: per scale, the squared distance of the encoder residual (after the hard
    quantisation of the coarser scales) to every code, [(B, pn^2, V)], and the tokens `img_to_idxBl` gives [(B, pn^2)]."""
    dists = []
    idx_ls = vae.quantize.f_to_idxBl_or_fhat(vae.quant_conv(vae.encoder(img_B3HW)), to_fhat=False, dists_out=dists)
    return dists, idx_ls


def entropy(probs_BlV: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of rows of probabilities."""
    return -(probs_BlV * probs_BlV.clamp_min(1e-30).log()).sum(-1).mean()


def match_temperature(d_NV: torch.Tensor, target: float, stat=entropy, lo=1e-6, hi=1e3, iters=60) -> float:
    """The temperature T at which stat(softmax(-d / T)) equals `target`, for a stat that grows with T (the mean
    entropy by default); bisection in log T."""
    for _ in range(iters):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if stat((-d_NV / mid).softmax(-1)) < target else (lo, mid)
    return (lo * hi) ** 0.5


def disc_images(var, logits_BLV, ctx_idx, gt_idx, labels_B, scales, decode, tau, real_probs=None):
    """AID-VAR's discriminator inputs: fake (context prefix one-hot + relaxed guided scale k, differentiable) and real
    (ground-truth prefix one-hot + scale k: `real_probs[k]` if given, the paper's soft-decoded reals, else one-hot)
    cumulative images of scales 0..k.

    logits_BLV: guided logits of every scale; ctx_idx / gt_idx: per-scale context / ground-truth tokens (B, pn^2).
    scales: (B,) scale index k >= 1 per sample ('random') or None for every k >= 1 for every sample ('all').
    real_probs: optional per-scale soft labels of the real images [(B, pn^2, V)] (`real_soft_labels`).
    Returns fake (N,3,H,W), real (N,3,H,W), labels (N,), grouped by k.
    """
    vae, B, SN = var.vae, labels_B.shape[0], len(var.patch_nums)
    groups = [(k, torch.arange(B, device=labels_B.device)) for k in range(1, SN)] if scales is None else \
        [(k, (scales == k).nonzero().squeeze(1)) for k in range(1, SN) if (scales == k).any()]
    fakes, reals, labs = [], [], []
    for k, sel in groups:
        bg, ed = var.begin_ends[k]
        probs = relax(logits_BLV[sel, bg:ed], decode, tau)
        fakes.append(decode_mixed(vae, [c[sel] for c in ctx_idx[:k]], probs))
        with torch.no_grad():
            if real_probs is None:
                reals.append(vae.idxBl_to_img([g[sel] for g in gt_idx[:k + 1]], last_one=True))
            else:
                reals.append(decode_mixed(vae, [g[sel] for g in gt_idx[:k]], real_probs[k][sel].to(probs.dtype)))
        labs.append(labels_B[sel])
    return torch.cat(fakes), torch.cat(reals), torch.cat(labs)


@torch.no_grad()
def real_soft_labels(vae, img_B3HW, temps):
    """Soft labels of real images (paper §3.2): per scale, softmax(-|residual - code|^2 / T_k) over the codebook.
    Returns (probs [(B, pn^2, V)], ground-truth tokens [(B, pn^2)])."""
    dists, idx_ls = residual_sq_dists(vae, img_B3HW)
    return [(-d / t).softmax(-1) for d, t in zip(dists, temps)], idx_ls


REAL_MATCH = ('entropy', 'norm')


@torch.no_grad()
def matched_real_temperatures(var, img_B3HW, labels_B, decode_tau=1.0, match='entropy'):
    """Per-scale temperatures at which the real soft labels are as soft as the frozen VAR's teacher-forced
    probabilities softmax(logits / decode_tau) on the same images: the same mean entropy ('entropy'), or the same
    mean norm of the expected code ('norm': as blurred in code space)."""
    dists, idx_ls = residual_sq_dists(var.vae, img_B3HW)
    logits_BLV = var(labels_B, var.vae.quantize.idxBl_to_var_input(idx_ls)).float()
    E_VC = var.vae.quantize.embedding.weight.float()
    stat = entropy if match == 'entropy' else lambda p: -(p @ E_VC).norm(dim=-1).mean()
    return [match_temperature(d.reshape(-1, d.shape[-1]), stat((logits_BLV[:, bg:ed] / decode_tau).softmax(-1)).item(), stat)
            for d, (bg, ed) in zip(dists, var.begin_ends)]
