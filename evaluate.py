"""Sample-quality evaluation: FID, Inception Score, precision / recall.

Library section: the FID InceptionV3 (pytorch-fid port of TF inception-2015-12-05),
its uint8 preprocessing, batched feature extraction, Inception Score and the
Kynkäänniemi et al. (2019) improved precision / recall. The Fréchet distance itself
lives in iscs.py. Definitions and reference numbers:
shared/fixtures/README_fid_metrics.md; ADM evaluator conventions: DISC_SPEC.md §8.

Input pipeline = pytorch-fid (bilinear resize to 299 in PyTorch), not the ADM/TF
graph's legacy resize; numbers are therefore close to, not identical with, the
ADM evaluator's. IS and precision / recall follow the ADM conventions (logits
without fc bias, k = 3).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import scipy.special
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.inception import (BasicConv2d, Inception3, InceptionA, InceptionAux, InceptionB,
                                          InceptionC, InceptionD, InceptionE)
from tqdm import tqdm

FID_WEIGHTS_NAME = 'pt_inception-2015-12-05-6726825d.pth'
FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                   + FID_WEIGHTS_NAME)
INCEPTION_SIZE = 299

# The 16 named stages whose outputs the parity fixture records (stage_means).
STAGES = ('Conv2d_1a_3x3', 'Conv2d_2a_3x3', 'Conv2d_2b_3x3', 'Conv2d_3b_1x1', 'Conv2d_4a_3x3',
          'Mixed_5b', 'Mixed_5c', 'Mixed_5d', 'Mixed_6a', 'Mixed_6b', 'Mixed_6c', 'Mixed_6d',
          'Mixed_6e', 'Mixed_7a', 'Mixed_7b', 'Mixed_7c')
_MAXPOOL_AFTER = {'Conv2d_2b_3x3': 'maxpool1', 'Conv2d_4a_3x3': 'maxpool2'}


# --------------------------------------------------------------------------------------
# FID InceptionV3
# --------------------------------------------------------------------------------------

def _fid_avg_pool(x_NCHW: torch.Tensor) -> torch.Tensor:
    # TF's avg-pool ignores padded zeros; torchvision's default (count_include_pad=True)
    # counts them, which is the classic silent FID bug.
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
    """InceptionE with the TF pooling branch: avg (count_include_pad=False) or, for
    Mixed_7c, a 3x3 stride-1 max-pool (a quirk of the TF graph that FID is defined on)."""

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

    torchvision ``Inception3(num_classes=1008, aux_logits=False, transform_input=False)``
    with the pooling branches of Mixed_5b..5d, 6b..6e, 7b swapped for avg-pool with
    count_include_pad=False and Mixed_7c for max-pool. BatchNorm eps is 0.001
    (torchvision's BasicConv2d default). state_dict: the 566 keys of
    ``pt_inception-2015-12-05-6726825d.pth`` in module order.
    """

    def __init__(self):
        super().__init__(num_classes=1008, aux_logits=False, transform_input=False, init_weights=False,
                         inception_blocks=[BasicConv2d, FIDInceptionA, InceptionB, FIDInceptionC,
                                           InceptionD, FIDInceptionE, InceptionAux])
        # Reassigning an existing child keeps its position, so state_dict order is unchanged.
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)

    def _run(self, x_N3HW: torch.Tensor, taps: dict | None) -> torch.Tensor:
        if x_N3HW.ndim != 4 or tuple(x_N3HW.shape[1:]) != (3, INCEPTION_SIZE, INCEPTION_SIZE):
            raise ValueError(f'FIDInceptionV3 expects (N, 3, 299, 299) input in [-1, 1] '
                             f'(see preprocess_uint8), got {tuple(x_N3HW.shape)}')
        h = x_N3HW
        for name in STAGES:
            if taps is not None and name == 'Mixed_6d':
                # sFID tap (ADM 'mixed_6/conv'): Mixed_6d's 1x1 branch, first 7 channels, HWC order.
                b1x1_NCHW = self.Mixed_6d.branch1x1(h)
                taps['spatial_mixed6d_b1x1_first7_nhwc'] = b1x1_NCHW[:, :7].permute(0, 2, 3, 1).flatten(1)
            h = getattr(self, name)(h)
            if taps is None:
                if name in _MAXPOOL_AFTER:
                    h = getattr(self, _MAXPOOL_AFTER[name])(h)
                continue
            taps['stage_means'][name] = h.mean((2, 3))
            if name in _MAXPOOL_AFTER:
                h = getattr(self, _MAXPOOL_AFTER[name])(h)
            # pytorch-fid's 64/192/768-d features: spatial means of the block outputs.
            if name == 'Conv2d_2b_3x3':
                taps['feat64'] = F.adaptive_avg_pool2d(h, 1).flatten(1)
            elif name == 'Conv2d_4a_3x3':
                taps['feat192'] = F.adaptive_avg_pool2d(h, 1).flatten(1)
            elif name == 'Mixed_6e':
                taps['feat768'] = F.adaptive_avg_pool2d(h, 1).flatten(1)
        return self.avgpool(h).flatten(1)

    def forward(self, x_N3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_N3HW: (N, 3, 299, 299) in [-1, 1] -> (pool3 (N, 2048), logits_nobias (N, 1008)).

        logits_nobias = pool3 @ fc.weight^T: the IS logits of the improved-GAN code and the
        ADM evaluator (softmax/logits/MatMul, no bias). Dropout is skipped (eval semantics).
        """
        pool3_N2048 = self._run(x_N3HW, None)
        return pool3_N2048, F.linear(pool3_N2048, self.fc.weight)

    def forward_taps(self, x_N3HW: torch.Tensor) -> dict:
        """All parity-test outputs for (N, 3, 299, 299) input in [-1, 1]. Returns a dict:
        feat64 (N, 64), feat192 (N, 192), feat768 (N, 768), pool3 (N, 2048),
        logits (N, 1008) with fc bias, logits_nobias (N, 1008),
        spatial_mixed6d_b1x1_first7_nhwc (N, 2023), and stage_means: {stage: (N, C)}
        = spatial mean of each of the 16 STAGES' outputs (before any max/avg pool).
        """
        taps = {'stage_means': {}}
        pool3_N2048 = self._run(x_N3HW, taps)
        taps['pool3'] = pool3_N2048
        taps['logits'] = self.fc(pool3_N2048)
        taps['logits_nobias'] = F.linear(pool3_N2048, self.fc.weight)
        return taps


# --------------------------------------------------------------------------------------
# Preprocessing, weights, features
# --------------------------------------------------------------------------------------

def preprocess_uint8(images_NHWC, dtype: torch.dtype = torch.float32, device='cpu') -> torch.Tensor:
    """pytorch-fid input pipeline for uint8 images.

    Args:
        images_NHWC: uint8 (N, H, W, 3) numpy array (memmap fine) or tensor, values 0..255.
        dtype: float dtype of the result (float64 for the parity test).
        device: where the resize runs; the uint8 batch is moved first (4x less traffic).
    Returns:
        x_N3HW: (N, 3, 299, 299) in [-1, 1]: /255 (as ToTensor), bilinear resize with
        align_corners=False and antialias=False, then 2x - 1.
    """
    if isinstance(images_NHWC, np.ndarray):
        images_NHWC = torch.from_numpy(np.ascontiguousarray(images_NHWC))
    if not isinstance(images_NHWC, torch.Tensor) or images_NHWC.dtype != torch.uint8:
        raise TypeError(f'preprocess_uint8 expects a uint8 array/tensor, got '
                        f'{getattr(images_NHWC, "dtype", type(images_NHWC))}')
    if images_NHWC.ndim != 4 or images_NHWC.shape[-1] != 3:
        raise ValueError(f'preprocess_uint8 expects NHWC images with 3 channels, got {tuple(images_NHWC.shape)}')
    # contiguous: match ToTensor's NCHW layout so the resize runs the same kernel.
    x_N3HW = images_NHWC.to(device).permute(0, 3, 1, 2).contiguous().to(dtype).div(255)
    x_N3HW = F.interpolate(x_N3HW, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode='bilinear',
                           align_corners=False, antialias=False)
    return 2 * x_N3HW - 1


def _offline() -> bool:
    return os.environ.get('HF_HUB_OFFLINE', '').strip().lower() in {'1', 'true', 'yes', 'on'}


def _missing_weights_message(path: Path, reason: str) -> str:
    return (f'FID Inception weights not found: {path} ({reason}).\n'
            f'FID/IS/precision-recall need {FID_WEIGHTS_NAME} (pytorch-fid port of TF '
            f'inception-2015-12-05, ~95 MB). Download it on a machine with network access from\n'
            f'  {FID_WEIGHTS_URL}\n'
            f'and copy it to {path} (or pass the folder holding it as ckpt_dir).')


def _check_state_dict(sd, model: nn.Module, path: Path) -> dict:
    """Returns sd completed with missing num_batches_tracked buffers, or raises SystemExit
    with a one-paragraph description of what the file holds instead."""
    head = f'{path} is not a {FID_WEIGHTS_NAME} state_dict'
    if not isinstance(sd, Mapping):
        raise SystemExit(f'{head}: it holds a {type(sd).__name__}, not a dict of tensors.')
    expected = model.state_dict()
    # The real file may lack the BatchNorm num_batches_tracked counters (unused in eval).
    missing = [k for k in expected if k not in sd and not k.endswith('.num_batches_tracked')]
    unexpected = [k for k in sd if k not in expected]
    problems = []
    if missing:
        problems.append(f'{len(missing)} expected keys missing (first: {missing[0]!r})')
    if unexpected:
        problems.append(f'{len(unexpected)} unexpected keys (first: {unexpected[0]!r})')
    for k, ref in expected.items():
        if k not in sd:
            continue
        v = sd[k]
        if not isinstance(v, torch.Tensor):
            problems.append(f'{k!r} is a {type(v).__name__}, not a tensor')
            break
        if v.shape != ref.shape:
            problems.append(f'first shape mismatch {k!r}: {tuple(v.shape)} instead of {tuple(ref.shape)}')
            break
    if problems:
        raise SystemExit(f'{head}: it has {len(sd)} entries (expected {len(expected)}); '
                         + '; '.join(problems) + f'. Replace it with the file from {FID_WEIGHTS_URL}')
    return {k: sd[k] if k in sd else expected[k] for k in expected}


def load_fid_inception(ckpt_dir='checkpoints', device='cpu') -> FIDInceptionV3:
    """FIDInceptionV3 with the pytorch-fid weights, in eval mode, requires_grad False.

    Looks for ``<ckpt_dir>/pt_inception-2015-12-05-6726825d.pth``; if absent and not
    offline (HF_HUB_OFFLINE unset), downloads it from the pytorch-fid release
    (temp file, then atomic rename). Missing-and-offline, a failed download, or a file
    that is not this network's state_dict -> SystemExit with a short explanation.
    """
    path = Path(ckpt_dir) / FID_WEIGHTS_NAME
    if not path.is_file():
        if _offline():
            raise SystemExit(_missing_weights_message(path, 'HF_HUB_OFFLINE is set, not downloading'))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f'{path.name}.part{os.getpid()}')
        try:
            torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(tmp), progress=True)
            os.replace(tmp, path)
        except Exception as e:  # network/disk errors become the same actionable message
            tmp.unlink(missing_ok=True)
            raise SystemExit(_missing_weights_message(
                path, f'download failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}')) from None
    try:
        sd = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated / not a torch file: report it, don't dump a traceback
        first_line = str(e).splitlines()[0] if str(e) else ''
        raise SystemExit(f'{path} could not be read as a PyTorch weight file ({type(e).__name__}: '
                         f'{first_line}); it may be truncated. Delete it and re-download {FID_WEIGHTS_URL}') from None
    model = FIDInceptionV3()
    model.load_state_dict(_check_state_dict(sd, model, path), strict=True)
    return model.to(device).eval().requires_grad_(False)


def inception_features(images_NHWC_uint8, model: FIDInceptionV3, batch_size: int = 64, device='cpu',
                       progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """pool3 features and IS logits of uint8 images, batched under no_grad.

    Args:
        images_NHWC_uint8: uint8 (N, H, W, 3) array (a memmap is read batch by batch) or tensor.
        model: FIDInceptionV3 already on ``device``; its parameter dtype sets the compute dtype.
        batch_size: images per forward pass (ADM: 64, pytorch-fid: 50; results don't depend on it
            beyond float round-off).
    Returns:
        pool3_N2048: float64 (N, 2048); logits_N1008: float64 (N, 1008), no fc bias (ADM IS).
    """
    n = len(images_NHWC_uint8)
    if n == 0:
        raise ValueError('inception_features got no images')
    dtype = next(model.parameters()).dtype
    pool3_N2048 = np.empty((n, 2048), dtype=np.float64)
    logits_N1008 = np.empty((n, 1008), dtype=np.float64)
    with torch.no_grad(), tqdm(total=n, unit='img', desc='inception', disable=not progress) as bar:
        for start in range(0, n, batch_size):
            x_N3HW = preprocess_uint8(images_NHWC_uint8[start:start + batch_size], dtype=dtype, device=device)
            pool3_B, logits_B = model(x_N3HW)
            pool3_N2048[start:start + len(x_N3HW)] = pool3_B.double().cpu().numpy()
            logits_N1008[start:start + len(x_N3HW)] = logits_B.double().cpu().numpy()
            bar.update(len(x_N3HW))
    return pool3_N2048, logits_N1008


# --------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------

def inception_score_per_split(logits_NK, splits: int = 10, shuffle_seed: int | None = 0) -> np.ndarray:
    """Per-chunk Inception Scores, float64 (splits,). See inception_score."""
    logits_NK = np.asarray(logits_NK, dtype=np.float64)
    if logits_NK.ndim != 2:
        raise ValueError(f'inception_score expects (N, K) logits, got shape {logits_NK.shape}')
    n = logits_NK.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f'inception_score needs 1 <= splits <= N, got splits={splits}, N={n}')
    if not np.isfinite(logits_NK).all():
        raise ValueError('inception_score: logits contain NaN or inf')
    if shuffle_seed is not None:
        logits_NK = logits_NK[np.random.default_rng(shuffle_seed).permutation(n)]
    # Log-domain: p * (log p - log p_y) stays finite when some p underflow to 0.
    logp_NK = scipy.special.log_softmax(logits_NK, axis=1)
    p_NK = np.exp(logp_NK)
    scores = np.empty(splits, dtype=np.float64)
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        logpy_K = scipy.special.logsumexp(logp_NK[lo:hi], axis=0) - np.log(hi - lo)
        kl_B = np.sum(p_NK[lo:hi] * (logp_NK[lo:hi] - logpy_K), axis=1)
        scores[i] = np.exp(np.mean(kl_B))
    return scores


def inception_score(logits_NK, splits: int = 10, shuffle_seed: int | None = 0) -> tuple[float, float]:
    """Inception Score (improved-GAN / ADM definition), README_fid_metrics.md §5.

    p = softmax over all K classes; the N rows are split into contiguous chunks
    [i*N//splits, (i+1)*N//splits); per chunk exp(mean KL(p || mean p)).

    Args:
        logits_NK: (N, K) logits, float; for ADM parity the no-bias logits from inception_features.
        splits: number of chunks (ADM: chunks of 5000 = 10 for 50k samples).
        shuffle_seed: if not None, rows are first permuted with np.random.default_rng(seed):
            sample files are often class-ordered, and chunks of few classes collapse IS.
            None = chunks in file order (the fixture's reference numbers).
    Returns:
        (mean, std) over chunks, std with ddof 0 (np.std).
    """
    scores = inception_score_per_split(logits_NK, splits, shuffle_seed)
    return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------------------
# Improved precision / recall
# --------------------------------------------------------------------------------------

def _sq_dists(a_AD: torch.Tensor, b_BD: torch.Tensor) -> torch.Tensor:
    # Same expansion as the ADM evaluator; exact enough in float64 for ball membership.
    return (a_AD * a_AD).sum(1)[:, None] + (b_BD * b_BD).sum(1)[None, :] - 2 * (a_AD @ b_BD.T)


def kth_nn_sq_radii(feats_ND: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Squared distance of each row to its k-th nearest neighbour within the set, self excluded
    (= index k of the row's ascending distances including the zero self-distance).

    feats_ND: (N, D) float tensor, N > k. Distances are built block x block; a running
    top-(k+1) per row keeps memory at one block. Returns (N,) tensor.
    """
    n = feats_ND.shape[0]
    if not 0 < k < n:
        raise ValueError(f'k must satisfy 0 < k < N, got k={k}, N={n}')
    radii2_N = torch.empty(n, dtype=feats_ND.dtype, device=feats_ND.device)
    for r0 in range(0, n, block):
        rows_BD = feats_ND[r0:r0 + block]
        best_BK = rows_BD.new_empty((rows_BD.shape[0], 0))
        for c0 in range(0, n, block):
            cand_BC = torch.cat([best_BK, _sq_dists(rows_BD, feats_ND[c0:c0 + block])], 1)
            best_BK = torch.topk(cand_BC, min(k + 1, cand_BC.shape[1]), dim=1, largest=False, sorted=True).values
        radii2_N[r0:r0 + block] = best_BK[:, k]
    return radii2_N


def _fraction_covered(query_QD: torch.Tensor, ref_RD: torch.Tensor, ref_radii2_R: torch.Tensor,
                      block: int) -> float:
    # Share of query points inside at least one reference ball (inclusive <=).
    hit_Q = torch.zeros(query_QD.shape[0], dtype=torch.bool, device=query_QD.device)
    for q0 in range(0, query_QD.shape[0], block):
        for r0 in range(0, ref_RD.shape[0], block):
            d2_BC = _sq_dists(query_QD[q0:q0 + block], ref_RD[r0:r0 + block])
            hit_Q[q0:q0 + block] |= (d2_BC <= ref_radii2_R[None, r0:r0 + block]).any(1)
    return hit_Q.double().mean().item()


def precision_recall(real_ND, fake_MD, k: int = 3, block: int = 10000, device='cpu') -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), ADM evaluator convention.

    Each point's ball has as radius the distance to its k-th nearest neighbour in its own
    set (self excluded). precision = share of fake rows inside some real ball; recall =
    share of real rows inside some fake ball; membership inclusive (<=). Squared
    Euclidean distances in float64, computed in block x block tiles (ADM: 10000).

    Args:
        real_ND: (N, D) real features (e.g. pool3 of the reference batch).
        fake_MD: (M, D) sample features.
        k: neighbourhood size (ADM: 3).
        block: tile edge; memory is O(block^2) float64.
        device: torch device for the distance tiles.
    Returns:
        (precision, recall), each in [0, 1].
    """
    real_ND = torch.as_tensor(np.asarray(real_ND, dtype=np.float64), device=device)
    fake_MD = torch.as_tensor(np.asarray(fake_MD, dtype=np.float64), device=device)
    if real_ND.ndim != 2 or fake_MD.ndim != 2 or real_ND.shape[1] != fake_MD.shape[1]:
        raise ValueError(f'precision_recall expects (N, D) and (M, D) features, got '
                         f'{tuple(real_ND.shape)} and {tuple(fake_MD.shape)}')
    # NaN distances compare False and would silently lower both numbers.
    if not (torch.isfinite(real_ND).all() and torch.isfinite(fake_MD).all()):
        raise ValueError('precision_recall: features contain NaN or inf')
    real_radii2_N = kth_nn_sq_radii(real_ND, k, block)
    fake_radii2_M = kth_nn_sq_radii(fake_MD, k, block)
    precision = _fraction_covered(fake_MD, real_ND, real_radii2_N, block)
    recall = _fraction_covered(real_ND, fake_MD, fake_radii2_M, block)
    return precision, recall
