"""Differentiable decoding of token *probabilities* through the frozen VQ-VAE (AID-VAR §3.2, eq. 5).

Per-scale probability maps (B, pn_k^2, V) become code maps `probs @ codebook`, which are accumulated into
f_hat exactly as the VQ-VAE does (bicubic upsampling + the shared Phi convolutions) and decoded to RGB.
One-hot maps give bit-for-bit the hard decode `VQVAE.idxBl_to_img`, so real images (ground-truth tokens)
and generated ones (soft probabilities) go through the same function (`disc_images` builds both for D). Gradients flow from the image back
to the probabilities: the VQ-VAE's weights are frozen, but nothing here runs under `no_grad`.

Relaxations (`relax`):
  soft    softmax(logits / tau): the expected code embedding (the paper's choice);
  gumbel  softmax((logits + Gumbel noise) / tau): a relaxed sample;
  st      straight-through: the forward pass is the hard one-hot argmax, the backward pass the soft gradient.
"""
from typing import List, Optional

import torch
import torch.nn.functional as F

MODES = ('soft', 'gumbel', 'st')


def relax(logits_BlV: torch.Tensor, mode: str = 'soft', tau: float = 1.0,
          generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Logits (B, l, V) -> differentiable token probabilities (B, l, V), rows summing to 1."""
    if mode not in MODES:
        raise ValueError(f'decode mode must be one of {MODES}, got {mode!r}')
    if mode == 'gumbel':
        E = torch.empty_like(logits_BlV).exponential_(generator=generator)
        return ((logits_BlV - E.log()) / tau).softmax(-1)
    soft = (logits_BlV / tau).softmax(-1)
    if mode == 'soft':
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


def disc_images(var, logits_BLV, ctx_idx, gt_idx, labels_B, scales, decode, tau):
    """AID-VAR's discriminator inputs: fake (prefix one-hot + relaxed scale k, differentiable) and real (ground
    truth) cumulative images of scales 0..k.

    logits_BLV: guided logits of every scale; ctx_idx / gt_idx: per-scale context / ground-truth tokens (B, pn^2).
    scales: (B,) scale index k >= 1 per sample ('random') or None for every k >= 1 for every sample ('all').
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
            reals.append(vae.idxBl_to_img([g[sel] for g in gt_idx[:k + 1]], last_one=True))
        labs.append(labels_B[sel])
    return torch.cat(fakes), torch.cat(reals), torch.cat(labs)
