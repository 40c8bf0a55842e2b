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

MODES = ('soft', 'gumbel', 'st', 'st_gumbel', 'rao', 'reinmax')


def relax(logits_BlV: torch.Tensor, mode: str = 'soft', tau: float = 1.0,
          generator: Optional[torch.Generator] = None, rao_k: int = 16) -> torch.Tensor:
    """Logits (B, l, V) -> differentiable token probabilities (B, l, V), rows summing to 1.

    soft: softmax(logits / tau), the expected code embedding (the paper's choice); gumbel: softmax((logits + Gumbel
    noise) / tau), a relaxed sample; st: straight-through, the hard one-hot argmax forward and the soft gradient
    backward; st_gumbel: a hard one-hot sample (the token inference would draw) forward, the gradient of the
    relaxed sample with the same noise backward; rao: the same hard sample forward, the st_gumbel gradient averaged
    over rao_k Gumbel draws conditioned on that sample (Gumbel-Rao, Paulus et al. 2020: lower variance, same mean);
    reinmax: a hard sample forward, ReinMax's second-order gradient backward (Liu et al. 2023)."""
    if mode not in MODES:
        raise ValueError(f'decode mode must be one of {MODES}, got {mode!r}')
    if mode == 'rao':
        return gumbel_rao(logits_BlV, tau, rao_k, generator)
    if mode == 'reinmax':
        return reinmax(logits_BlV, tau, generator)
    if mode in ('gumbel', 'st_gumbel'):
        E = torch.empty_like(logits_BlV).exponential_(generator=generator)
        soft = ((logits_BlV - E.log()) / tau).softmax(-1)
    else:
        soft = (logits_BlV / tau).softmax(-1)
    if mode in ('soft', 'gumbel'):
        return soft
    hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
    return hard + (soft - soft.detach())  # exact one-hot values forward, soft gradient backward


def gumbel_rao(logits_BlV, tau=1.0, k=16, generator=None):
    """A hard one-hot sample of softmax(logits) forward; backward, the mean gradient of softmax((logits + G) / tau)
    over k Gumbel perturbations G drawn conditioned on the sample being their argmax (Paulus et al. 2020, eq. 6)."""
    with torch.no_grad():
        lf_BlV = logits_BlV.float()
        E = torch.empty((k + 1, *lf_BlV.shape), device=lf_BlV.device).exponential_(generator=generator)
        hard_BlV = F.one_hot(lf_BlV.sub(E[0].log()).argmax(-1), lf_BlV.shape[-1]).to(lf_BlV.dtype)  # a Gumbel-max sample
        E = E[1:]  # fresh draws for the conditional perturbations
        logZ = lf_BlV.logsumexp(-1, keepdim=True)
        E_i = (E * hard_BlV).sum(-1, keepdim=True)  # the sampled code's exponential
        # the perturbed logits given the argmax: the top one ~ Gumbel(logZ), the others truncated below it
        top = logZ - E_i.log()
        rest = -torch.logaddexp(-top, (E.log() - lf_BlV))
        noise = torch.where(hard_BlV.bool(), top, rest) - lf_BlV
    soft = torch.stack([((logits_BlV + n.to(logits_BlV.dtype)) / tau).softmax(-1) for n in noise]).mean(0)
    hard_BlV = hard_BlV.to(soft.dtype)
    return hard_BlV + (soft - soft.detach())


def reinmax(logits_BlV, tau=1.0, generator=None):
    """ReinMax (Liu et al. 2023, Alg. 2): a hard sample of softmax(logits) forward; backward, the gradient of
    2 pi_1 - pi_0 / 2 with pi_0 = softmax(logits), pi_1 = softmax(logits) with the value (D + softmax(logits / tau)) / 2."""
    pi0 = logits_BlV.softmax(-1)
    with torch.no_grad():
        E = torch.empty_like(logits_BlV, dtype=torch.float32).exponential_(generator=generator)
        hard_BlV = F.one_hot(logits_BlV.float().sub(E.log()).argmax(-1), logits_BlV.shape[-1]).to(pi0.dtype)
        shifted = (hard_BlV + (logits_BlV / tau).softmax(-1)) / 2
    pi1 = ((shifted.log() - logits_BlV).detach() + logits_BlV).softmax(-1)
    surrogate = 2 * pi1 - pi0 / 2
    return hard_BlV + (surrogate - surrogate.detach())


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


def match_temperature(d_NV: torch.Tensor, target: float, lo=1e-6, hi=1e3, iters=60) -> float:
    """The temperature T at which the mean entropy of softmax(-d / T) equals `target` (it grows with T); bisection in
    log T."""
    for _ in range(iters):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if entropy((-d_NV / mid).softmax(-1)) < target else (lo, mid)
    return (lo * hi) ** 0.5


def scale_groups(scales, SN):
    """[(k, indices of the samples whose scale is k)] for the k >= 1 that occur in scales (B,)."""
    return [(k, (scales == k).nonzero().squeeze(1)) for k in range(1, SN) if (scales == k).any()]


def disc_fakes(var, logits_BLV, ctx_idx, labels_B, scales, decode, tau, draws=1, rao_k=16):
    """The fakes of disc_images alone, `draws` relaxed samples per image from the same logits (one VAR pass):
    (fake (draws * N, 3, H, W), labels), draw-major (rows [d * N, (d + 1) * N) are draw d, grouped by k)."""
    vae, SN = var.vae, len(var.patch_nums)
    fakes, labs = [], []
    for _ in range(draws):
        for k, sel in scale_groups(scales, SN):
            bg, ed = var.begin_ends[k]
            probs = relax(logits_BLV[sel, bg:ed], decode, tau, rao_k=rao_k)
            fakes.append(decode_mixed(vae, [c[sel] for c in ctx_idx[:k]], probs))
            labs.append(labels_B[sel])
    return torch.cat(fakes), torch.cat(labs)


def disc_images(var, logits_BLV, ctx_idx, gt_idx, labels_B, scales, decode, tau, real_probs=None, rao_k=16):
    """AID-VAR's discriminator inputs: fake (context prefix one-hot + relaxed guided scale k, differentiable) and real
    (ground-truth prefix one-hot + scale k: `real_probs[k]` if given, the paper's soft-decoded reals, else one-hot)
    cumulative images of scales 0..k.

    logits_BLV: guided logits of every scale; ctx_idx / gt_idx: per-scale context / ground-truth tokens (B, pn^2).
    scales: (B,) scale index k >= 1 per sample.
    real_probs: optional per-scale soft labels of the real images [(B, pn^2, V)] (`real_soft_labels`).
    Returns fake (N,3,H,W), real (N,3,H,W), labels (N,), grouped by k.
    """
    vae, SN = var.vae, len(var.patch_nums)
    fake, labs = disc_fakes(var, logits_BLV, ctx_idx, labels_B, scales, decode, tau, rao_k=rao_k)
    reals = []
    with torch.no_grad():
        for k, sel in scale_groups(scales, SN):
            if real_probs is None:
                reals.append(vae.idxBl_to_img([g[sel] for g in gt_idx[:k + 1]], last_one=True))
            else:
                reals.append(decode_mixed(vae, [g[sel] for g in gt_idx[:k]], real_probs[k][sel].to(torch.promote_types(logits_BLV.dtype, torch.float32))))
    return fake, torch.cat(reals), labs


@torch.no_grad()
def real_soft_labels(vae, img_B3HW, temps):
    """Soft labels of real images (paper §3.2): per scale, softmax(-|residual - code|^2 / T_k) over the codebook.
    Returns (probs [(B, pn^2, V)], ground-truth tokens [(B, pn^2)])."""
    dists, idx_ls = residual_sq_dists(vae, img_B3HW)
    return [(-d / t).softmax(-1) for d, t in zip(dists, temps)], idx_ls


@torch.no_grad()
def matched_real_temperatures(var, img_B3HW, labels_B, decode_tau=1.0):
    """Per-scale temperatures at which the real soft labels are as soft as the frozen VAR's teacher-forced
    probabilities softmax(logits / decode_tau) on the same images: the same mean entropy."""
    dists, idx_ls = residual_sq_dists(var.vae, img_B3HW)
    logits_BLV = var(labels_B, var.vae.quantize.idxBl_to_var_input(idx_ls)).float()
    return [match_temperature(d.reshape(-1, d.shape[-1]), entropy((logits_BLV[:, bg:ed] / decode_tau).softmax(-1)).item())
            for d, (bg, ed) in zip(dists, var.begin_ends)]


def guidance_gradient(var, labels_B, idx_Bl, w, loss_of_logits):
    """What a loss tells the injector: d loss / d(g) at g = 0 for guidance w * g added to the token features of scales
    >= 1 (--inject input) of a teacher-forced pass on idx_Bl; loss_of_logits maps its logits (B, L, V) to a scalar,
    e.g. -D(disc_fakes(...)).mean() (the adversarial term) or the token CE. Returns (B, L, C), zero on scale 0."""
    B, dev = labels_B.shape[0], labels_B.device
    zero_B1C = torch.zeros(B, var.first_l, var.C, device=dev)
    g_BlC = torch.zeros(B, var.L - var.first_l, var.C, device=dev, requires_grad=True)
    with torch.no_grad():
        x_BLCv = var.vae.quantize.idxBl_to_var_input(idx_Bl)
    h_BLC, cond_BD = var.forward_hidden(labels_B, x_BLCv, input_add_BLC=w * torch.cat([zero_B1C, g_BlC], 1))
    grad, = torch.autograd.grad(loss_of_logits(var.get_logits(h_BLC, cond_BD)), g_BlC)
    return torch.cat([zero_B1C, grad], 1)
