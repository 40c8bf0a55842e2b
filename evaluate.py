"""Sample-quality evaluation: FID, Inception Score, precision / recall, class accuracy and ISCS.

    python evaluate.py samples/samples_w0.001.npz                    # tiny preset: --ref shapes (10k fresh shapes)
    python evaluate.py base.npz guided.npz --ref VIRTUAL_imagenet256_labeled.npz   # side by side, with differences
    python evaluate.py samples.npz --ref /data/imagenet/val_256 --no_iscs          # an image folder as reference

Prints the metrics and writes them as JSON beside each sample file (<name>.eval.json).
  FID             Fréchet distance of pool3 features (reference: its stored mu / sigma when present)
  IS              Inception Score, 10 splits of a fixed-seed shuffle of the samples (ADM: no fc bias)
  precision/recall  Kynkäänniemi et al., k = 3, reference subset of 10,000 images (the ADM reference batch size)
  class_acc       tiny preset only: share of samples the feature network classifies as their label
  dFID bootstrap  --bootstrap B: 95% interval of FID(file) - FID(first file) over B replicates that resample the
                  same rows in every file (paired), and the share of replicates in which the file has the lower FID
  ISCS            iscs.py: every S_k and FD_k; intermediate images rebuilt from the stored `tokens` through
                  the VQ-VAE, real ones from encoding the reference images; DINO ViT-S/16 CLS features
Real models (256x256 samples, `preset` d16..d30 in the npz or --depth): FID InceptionV3 (pytorch-fid weights in
--ckpt_dir), DINO ViT-S/16, the VAR VQ-VAE from --ckpt_dir. Tiny preset (32x32): the shipped feature network
stands in for Inception and DINO, the shipped tiny VQ-VAE decodes the tokens. Reference features are cached in
--cache_dir under a hash of the reference's content and of the networks' weights.

Library section (below the argument parser): the FID InceptionV3 (pytorch-fid port of TF
inception-2015-12-05), its uint8 preprocessing, batched feature extraction, Inception Score and the
Kynkäänniemi et al. (2019) improved precision / recall. The Fréchet distance and ISCS live in iscs.py.
Definitions and reference numbers: tests/fixtures/README_fid_metrics.md; ADM evaluator conventions:
DISC_SPEC.md §8.

Input pipeline = the ADM evaluator's: its TF graph resizes the 0..255 images to 299 with TF1's legacy
ResizeBilinear and normalises (v - 128) / 128; we use torch-fidelity's bit-exact port of that resize, so our
Inception features equal torch-fidelity's FeatureExtractorInceptionV3 on the same weights (tested), not
pytorch-fid's F.interpolate approximation (which moves feat64 by ~5e-5 on the test images). The network is the
same TF graph ported to PyTorch; what remains between these numbers and the TF evaluator's is float round-off
of two frameworks (run OpenAI's evaluator on the same npz for paper-exact numbers). IS and precision / recall
follow the ADM conventions (logits without fc bias, k = 3).
"""
from __future__ import annotations

import argparse
import hashlib
import json
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

import data
import iscs
import models

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('samples', nargs='+', help='npz file(s) with arr_0 uint8 (N, H, W, 3) [+ labels, tokens] (sample.py)')
p.add_argument('--ref', type=str, default=None,
               help="reference: the ADM batch (e.g. VIRTUAL_imagenet256_labeled.npz), an npz of real images, an "
                    "image folder, or 'shapes' (tiny preset default: --ref_n fresh shapes, seed 1000)")
p.add_argument('--ref_n', type=int, default=10000, help="number of reference images for --ref shapes")
p.add_argument('--depth', type=int, default=None,
               help='real-model samples without a `preset` key: any of 16/20/24/30 (they share the VQ-VAE)')
p.add_argument('--ckpt_dir', type=str, default='checkpoints', help='VQ-VAE and FID Inception weights')
p.add_argument('--dino_ckpt', type=str, default=None, help='local DINO ViT-S/16 weights (else the HF hub cache)')
p.add_argument('--random_init', action='store_true',
               help='random feature networks and the random VQ-VAE of sample.py --random_init (tests only)')
p.add_argument('--no_iscs', action='store_true', help='skip ISCS (it decodes every token prefix: the slow part)')
p.add_argument('--iscs_n', type=int, default=None,
               help='use at most this many samples and reference images for ISCS (fixed-seed subsets); default: all '
                    '(real models), 1000 (tiny preset: 6 VQ-VAE decodes + 6 feature passes per image on a CPU)')
p.add_argument('--pr_ref_n', type=int, default=10000,
               help='reference subset for precision / recall (ADM: the 10,000 images of its reference batch)')
p.add_argument('--is_splits', type=int, default=10, help='Inception Score splits (ADM: 10 of 5,000)')
p.add_argument('--batch_size', type=int, default=64, help='images per feature-network pass (ADM: 64)')
p.add_argument('--cache_dir', type=str, default='.cache/evaluate', help='reference feature cache')
p.add_argument('--json', type=str, default=None, help='also write all results (and differences) to this file')
p.add_argument('--bootstrap', type=int, default=0,
               help='paired bootstrap replicates of the FID differences to the first file (0: off); the files must be '
                    'paired: the same labels, sample.py --seed and --batch_size, so row j of every file is the same draw')
p.add_argument('--cpu', action='store_true', help='run on CPU even if a GPU is present')

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

PIPELINES = ('adm', 'pytorch-fid')


def preprocess_uint8(images_NHWC, dtype: torch.dtype = torch.float32, device='cpu', pipeline: str = 'adm') -> torch.Tensor:
    """The FID Inception's input from uint8 images.

    Args:
        images_NHWC: uint8 (N, H, W, 3) numpy array (memmap fine) or tensor, values 0..255.
        dtype: float dtype of the result (float64 for the parity test).
        device: where the resize runs; the uint8 batch is moved first (4x less traffic).
        pipeline: 'adm' (default, what evaluate.py uses): the ADM evaluator's TF graph, i.e. the 0..255 values
            resized to 299 with TF1's legacy ResizeBilinear (source = dest * in / out, no half-pixel centres;
            torch-fidelity's interpolate_bilinear_2d_like_tensorflow1x, bit-exact on CPU), then (v - 128) / 128,
            exactly as torch-fidelity's FeatureExtractorInceptionV3 feeds the same network.
            'pytorch-fid': /255 (as ToTensor), F.interpolate bilinear with align_corners=False and
            antialias=False, then 2x - 1 (pytorch-fid's approximation; the parity fixture was made with it).
    Returns:
        x_N3HW: (N, 3, 299, 299) in [-1, 1].
    """
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
                       progress: bool = True, pipeline: str = 'adm') -> tuple[np.ndarray, np.ndarray]:
    """pool3 features and IS logits of uint8 images, batched under no_grad (preprocess_uint8's `pipeline`:
    the ADM evaluator's TF1 resize by default).

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
    with torch.no_grad(), data.progress(total=n, unit='img', desc='inception', disable=not progress) as bar:
        for start in range(0, n, batch_size):
            x_N3HW = preprocess_uint8(images_NHWC_uint8[start:start + batch_size], dtype=dtype, device=device,
                                      pipeline=pipeline)
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


# --------------------------------------------------------------------------------------
# Command line: reading sample / reference files
# --------------------------------------------------------------------------------------

REF_SHAPES_SEED = 1000  # held out: pretrain_tiny.py trains on seed 0 and validates on seed 1
TINY_RES = 32
REAL_RES = 256
REAL_CLASSES = 1000  # ImageNet
IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.tif', '.tiff')
CACHE_VERSION = 2  # bump when a cached quantity changes definition (2: the ADM / TF1 resize for FID)


def center_crop_arr(pil_image, image_size):
    """ADM's reference preprocessing (guided-diffusion image_datasets.py): BOX-halve while the short side
    is >= 2x the target, BICUBIC-resize the short side to image_size, centre crop. Returns uint8 (S, S, 3)."""
    from PIL import Image
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    y, x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[y:y + image_size, x:x + image_size]


def load_reference(spec: str, resolution: int, ref_n: int) -> dict:
    """The reference set. Returns dict(images uint8 (N,S,S,3) or None, stats {'mu','sigma'} or None,
    hash (content sha256, hex), desc (one line))."""
    from PIL import Image
    if spec == 'shapes':
        if resolution != TINY_RES:
            raise SystemExit(f"--ref shapes is the tiny preset's reference (32x32); these samples are "
                             f"{resolution}x{resolution}: pass the ADM reference batch, a real-image npz or a folder")
        if ref_n < 2:
            raise SystemExit(f'--ref_n must be >= 2, got {ref_n}')
        images, _ = data.make_shapes(ref_n, seed=REF_SHAPES_SEED, size=resolution)
        key = f'shapes|n={ref_n}|seed={REF_SHAPES_SEED}|size={resolution}'  # generated deterministically
        return dict(images=images, stats=None, hash=hashlib.sha256(key.encode()).hexdigest(),
                    desc=f'{ref_n} shapes (seed {REF_SHAPES_SEED})')
    path = Path(spec)
    if path.is_dir():
        files = sorted(f for f in path.rglob('*') if f.suffix.lower() in IMAGE_EXTS and f.is_file())
        if len(files) < 2:
            raise SystemExit(f'--ref {path}: an image folder needs at least 2 images ({", ".join(IMAGE_EXTS)}), found {len(files)}')
        h = hashlib.sha256(f'folder|size={resolution}'.encode())
        images = np.empty((len(files), resolution, resolution, 3), dtype=np.uint8)
        for i, f in enumerate(data.progress(files, desc='reference images', unit='img')):
            h.update(str(f.relative_to(path)).encode())
            data.sha256_file(f, h)
            with Image.open(f) as im:
                images[i] = center_crop_arr(im.convert('RGB'), resolution)
        return dict(images=images, stats=None, hash=h.hexdigest(), desc=f'{len(files)} images from {path}')
    if path.suffix != '.npz' and not path.is_file():
        raise SystemExit(f"--ref {spec}: not 'shapes', an existing .npz file, or an image folder")
    keys = data.npz_keys(path)
    images = None
    if 'arr_0' in keys:
        images = data.npz_array(path, 'arr_0')
        data.check_images(path, images)
        if images.shape[1] != resolution:
            data._fail(path, f'reference images are {images.shape[1]}x{images.shape[2]} but the samples are '
                        f'{resolution}x{resolution}')
    stats = None
    if 'mu' in keys and 'sigma' in keys:  # ADM rule: a reference npz with `mu` carries whole-dataset statistics
        stats = dict(mu=np.asarray(data.npz_array(path, 'mu'), dtype=np.float64),
                     sigma=np.asarray(data.npz_array(path, 'sigma'), dtype=np.float64))
    if images is None and stats is None:
        data._fail(path, f"neither reference images (arr_0) nor statistics (mu, sigma) (keys: {', '.join(keys)})")
    n = len(images) if images is not None else 0
    return dict(images=images, stats=stats, hash=data.sha256_file(path).hexdigest(),
                desc=f'{path.name} ({n} images{", stored mu/sigma" if stats else ""})')


# --------------------------------------------------------------------------------------
# Command line: networks and feature extraction
# --------------------------------------------------------------------------------------

def fingerprint(module: nn.Module) -> str:
    """sha256 (16 hex) of a network's weights: part of every cache key, so new weights never reuse old features."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def vit_cls(net, x_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A timm ViT's CLS (pre-logits) features and head output for images in [-1, 1].

    x_B3HW: (B, 3, H, W) in [-1, 1]; resized (bicubic, antialiased) to the ViT's input size when it
    differs, then normalised with the net's pretrained_cfg mean / std. Returns (cls (B, D), head (B, K));
    the head is the identity for DINO (num_classes 0), the 10-class logits for the tiny feature network.
    """
    size = tuple(int(s) for s in net.patch_embed.img_size)
    x = x_B3HW.float().add(1).div(2)
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode='bicubic', align_corners=False, antialias=True)
    cls_BD = net.forward_head(net.forward_features(models.vit_normalize(net, x)), pre_logits=True)
    return cls_BD, net.head(cls_BD)


@torch.no_grad()
def featnet_features(images_NHWC_uint8, net, batch_size=64, device='cpu', progress=True, desc='featnet'):
    """Tiny preset FID / IS features: (CLS (N, D) float64, logits (N, K) float64) of uint8 images."""
    n = len(images_NHWC_uint8)
    feats, logits = [], []
    for start in data.progress(range(0, n, batch_size), desc=desc, unit='batch', disable=not progress):
        x = torch.from_numpy(np.require(images_NHWC_uint8[start:start + batch_size], requirements=['C', 'W'])).to(device)
        cls_BD, head_BK = vit_cls(net, data.to_signed(x))
        feats.append(cls_BD.double().cpu().numpy())
        logits.append(head_BK.double().cpu().numpy())
    return np.concatenate(feats), np.concatenate(logits)


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
def scale_features(vae, phi_net, tokens_NL, patch_nums, batch_size=64, device='cpu', progress=True,
                   desc='ISCS features') -> np.ndarray:
    """ISCS inputs: for every sample and k = 0..K-1, the raw CLS feature of the image decoded (full
    resolution, VQ-VAE, no uint8 round trip) from the token prefix of scales 0..k.

    tokens_NL: (N, L) integer tokens, L = sum(pn^2). Returns float32 (N, K, D)."""
    sizes = [pn * pn for pn in patch_nums]
    out = []
    for start in data.progress(range(0, len(tokens_NL), batch_size), desc=desc, unit='batch', disable=not progress):
        tok_BL = torch.from_numpy(np.asarray(tokens_NL[start:start + batch_size]).astype(np.int64)).to(device)
        imgs = vae.idxBl_to_img(list(tok_BL.split(sizes, dim=1)), same_shape=True, last_one=False)  # K x (B,3,H,W)
        out.append(torch.stack([vit_cls(phi_net, img)[0] for img in imgs], dim=1).float().cpu().numpy())
    return np.concatenate(out)


def fixed_subset(n: int, m, seed=0) -> np.ndarray:
    """Sorted indices of a fixed-seed subset of size min(n, m) (all indices when m is None or >= n)."""
    if m is None or m >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))


class Evaluator:
    """The networks of one preset and the metrics of one sample set against one reference (cached).

    preset 'tiny': the feature network gives FID / PR features (CLS, 128-d), IS and class-accuracy logits
    (10 classes) and ISCS features; 'real': FID InceptionV3 (pool3 2048-d, 1008 no-bias logits) and DINO
    ViT-S/16 (ISCS). ISCS networks (VQ-VAE, DINO) load on first use.
    """

    def __init__(self, preset: str, args, device):
        self.preset, self.args, self.device = preset, args, device
        self.resolution = TINY_RES if preset == 'tiny' else REAL_RES
        self.patch_nums = tuple(models.TINY['patch_nums'] if preset == 'tiny' else models.REAL_PATCH_NUMS)
        self.cache_dir = Path(args.cache_dir)
        self._vae = self._phi = None
        torch.manual_seed(1)  # --random_init: the same random feature networks every run
        if preset == 'tiny':
            self.net = (models.build_featnet() if args.random_init else models.load_featnet()).to(device).eval()
            self.feat_desc = 'tiny feature network CLS (pre-logits, 128-d); IS / class accuracy: its 10-class logits'
        else:
            self.net = (FIDInceptionV3() if args.random_init else load_fid_inception(args.ckpt_dir, device))
            self.net = self.net.to(device).eval().requires_grad_(False)
            self.feat_desc = 'FID InceptionV3 pool3 (2048-d); IS: 1008 logits without fc bias'
        self.net_fp = fingerprint(self.net)

    # ---- networks
    def features(self, images_NHWC_uint8, desc):
        """(feats (N, D), logits (N, K)) float64 of uint8 images, on this preset's FID network."""
        if self.preset == 'tiny':
            f, lg = featnet_features(images_NHWC_uint8, self.net, self.args.batch_size, self.device, desc=desc)
        else:
            f, lg = inception_features(images_NHWC_uint8, self.net, self.args.batch_size, self.device)
        if not (np.isfinite(f).all() and np.isfinite(lg).all()):
            raise SystemExit(f'{desc}: the feature network produced NaN / inf features (broken weights?)')
        return f, lg

    def vae(self):
        if self._vae is None:
            if self.args.random_init:  # the VQ-VAE of sample.py --random_init (it does not depend on the depth)
                self._vae = models.build_random(None if self.preset == 'tiny' else 16, self.device)[0]
            elif self.preset == 'tiny':
                self._vae = models.load_tiny(self.device)[0]
            else:  # only the VQ-VAE: the VAR of any depth shares it
                self._vae = models.load_vae(self.args.ckpt_dir, self.device)
        return self._vae

    def phi(self):
        if self._phi is None:
            torch.manual_seed(1)
            if self.preset == 'tiny':
                net = self.net
            else:
                net = models.build_backbone_dino(pretrained=False) if self.args.random_init else \
                    models.build_backbone_dino(ckpt=self.args.dino_ckpt)
            self._phi = models.frozen(net, self.device)
        return self._phi

    # ---- reference side (cached)
    def _cached(self, kind, key_parts, compute):
        key = hashlib.sha256('|'.join(map(str, (CACHE_VERSION, kind) + tuple(key_parts))).encode()).hexdigest()[:24]
        path = self.cache_dir / f'{kind}_{key}.npz'
        if path.is_file():
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}, True
        out = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}.npz')
        np.savez(tmp, **out)
        os.replace(tmp, path)
        return out, False

    def ref_fid(self, ref):
        """{'mu', 'sigma', 'pr_feats'} of the reference on the FID network; stored ADM stats win for mu / sigma."""
        def compute():
            out = {}
            if ref['images'] is not None:
                sub = fixed_subset(len(ref['images']), self.args.pr_ref_n)
                feats, _ = self.features(ref['images'], 'reference features')
                out['mu'], out['sigma'] = iscs.feature_stats(feats)
                out['pr_feats'] = feats[sub]
            return out
        out, hit = self._cached('fid', (ref['hash'], self.net_fp, self.resolution, self.args.pr_ref_n), compute)
        if hit:
            print(f'[evaluate] reference features from the cache ({self.cache_dir})')
        out['stats_from'] = f'{len(ref["images"])} reference images' if ref['images'] is not None else None
        stored = ref['stats']
        if stored is not None:
            if self.preset == 'real' and stored['mu'].shape == (2048,) and stored['sigma'].shape == (2048, 2048):
                out['mu'], out['sigma'] = stored['mu'], stored['sigma']
                out['stats_from'] = 'stored mu / sigma of the reference file (ADM convention)'
            else:
                print(f'[evaluate] the reference\'s stored mu {stored["mu"].shape} does not fit this preset\'s '
                      f'features: ignored')
        return out

    def ref_iscs(self, ref):
        """Per-transition joint statistics of the real set: encode -> tokens -> prefix images -> features."""
        vae, phi = self.vae(), self.phi()

        def compute():
            sub = fixed_subset(len(ref['images']), self.args.iscs_n)
            tokens = encode_tokens(vae, ref['images'][sub] if len(sub) < len(ref['images']) else ref['images'],
                                   self.args.batch_size, self.device)
            feats = scale_features(vae, phi, tokens, self.patch_nums, self.args.batch_size, self.device,
                                   desc='ISCS reference')
            stats = iscs.joint_stats(feats)
            return dict(mu=np.stack([m for m, _ in stats]), sigma=np.stack([s for _, s in stats]),
                        n=np.array(len(sub)))
        out, hit = self._cached('iscs', (ref['hash'], fingerprint(vae), fingerprint(phi), self.resolution,
                                         self.args.iscs_n), compute)
        if hit:
            print(f'[evaluate] ISCS reference statistics from the cache ({self.cache_dir})')
        return [(m, s) for m, s in zip(out['mu'], out['sigma'])], int(out['n'])

    # ---- one sample file
    def evaluate(self, path, smp, ref, ref_fid) -> tuple[dict, np.ndarray]:
        """(the result dict, the (N, D) FID features of the samples)."""
        a, warnings, skipped = self.args, [], {}
        images, n = smp['images'], len(smp['images'])
        res = dict(samples=str(path), n=n, resolution=int(images.shape[1]), preset=self.preset,
                   sampling=smp['meta'], random_init=a.random_init,
                   reference=dict(spec=a.ref, desc=ref['desc'], sha256=ref['hash'][:16], fid_stats=ref_fid['stats_from']),
                   features=dict(fid_is_pr=self.feat_desc), metrics={}, iscs=None, skipped=skipped, warnings=warnings,
                   settings=dict(is_splits=a.is_splits, is_shuffle_seed=0, pr_k=3, pr_ref_n=None, iscs_n=a.iscs_n,
                                 iscs_eps=iscs.FD_EPS))
        meta_random = (smp['meta'] or {}).get('random_init')
        if meta_random is not None and bool(meta_random) != a.random_init:
            warnings.append(f'the samples were made with{"" if meta_random else "out"} --random_init but are evaluated '
                            f'with{"" if a.random_init else "out"} it: their tokens decode through another VQ-VAE')
        feats, logits = self.features(images, f'features {Path(path).name}')
        d = feats.shape[1]
        if n < d:
            warnings.append(f'only {n} samples for {d}-d features: the covariance is rank-deficient and FID is '
                            f'biased and noisy (use >= {d}; the protocol uses 50,000)')
        m = res['metrics']
        if 'mu' in ref_fid:
            mu, sigma = iscs.feature_stats(feats)
            m['FID'] = iscs.frechet_distance(mu, sigma, ref_fid['mu'], ref_fid['sigma'])
        else:
            skipped['FID'] = 'the reference has neither images nor statistics for this feature network'
        splits = min(a.is_splits, n)
        if splits < a.is_splits:
            warnings.append(f'IS over {splits} splits instead of {a.is_splits}: only {n} samples')
        m['IS'], m['IS_std'] = inception_score(logits, splits=splits, shuffle_seed=0)
        res['settings']['is_splits'] = splits
        if 'pr_feats' not in ref_fid:
            skipped['precision_recall'] = 'the reference file has no images (arr_0), only statistics'
        elif min(n, len(ref_fid['pr_feats'])) <= 3:
            skipped['precision_recall'] = f'k = 3 needs more than 3 samples and reference images ({n}, {len(ref_fid["pr_feats"])})'
        else:
            m['precision'], m['recall'] = precision_recall(ref_fid['pr_feats'], feats, k=3, device=self.device)
            res['settings']['pr_ref_n'] = len(ref_fid['pr_feats'])
        if self.preset == 'tiny' and smp['labels'] is not None:
            m['class_acc'] = float(np.mean(logits.argmax(1) == smp['labels']))
        res['metrics']['ISCS'] = None
        reason = self.iscs_skip_reason(smp, ref)
        if reason:
            skipped['ISCS'] = reason
            return res, feats
        ref_stats, n_real = self.ref_iscs(ref)
        sub = fixed_subset(n, a.iscs_n)
        tokens = smp['tokens'] if len(sub) == n else smp['tokens'][sub]
        gen = scale_features(self.vae(), self.phi(), tokens, self.patch_nums, a.batch_size, self.device,
                             desc=f'ISCS {Path(path).name}')
        out = iscs.iscs_from_stats(ref_stats, iscs.joint_stats(gen))
        dj = 2 * gen.shape[2]
        if min(len(sub), n_real) < dj:
            warnings.append(f'ISCS from {len(sub)} samples / {n_real} reference images for {dj}-d joint features: '
                            f'rank-deficient covariances, the FD_k are biased and noisy (use >= {dj})')
        if out['clipped_k']:
            warnings.append(f'ISCS: FD_k < {iscs.FD_EPS} (round-off level) at k = {out["clipped_k"]}: S_k capped at '
                            f'{1 / iscs.FD_EPS:g} (generated and real sets practically identical?)')
        m['ISCS'] = out['ISCS']
        res['iscs'] = dict(out, n_gen=len(sub), n_real=n_real)
        res['features']['iscs'] = ('tiny feature network CLS' if self.preset == 'tiny' else 'DINO ViT-S/16 CLS (384-d)') + \
            ', L2-normalised; images decoded from token prefixes through the VQ-VAE'
        return res, feats

    def iscs_skip_reason(self, smp, ref):
        a = self.args
        if a.no_iscs:
            return '--no_iscs'
        tok = smp['tokens']
        if tok is None:
            return "the file has no 'tokens' (per-scale token maps, written by sample.py); the other metrics are unaffected"
        L, V = sum(pn * pn for pn in self.patch_nums), models.TINY['V'] if self.preset == 'tiny' else 4096
        if tok.ndim != 2 or tok.shape != (len(smp['images']), L) or not np.issubdtype(tok.dtype, np.integer):
            return f'tokens have shape {tuple(tok.shape)} / dtype {tok.dtype}; this preset needs ({len(smp["images"])}, {L}) integers'
        lo, hi = int(np.min(tok)), int(np.max(tok))
        if lo < 0 or hi >= V:
            return f'tokens range over {lo}..{hi}, outside the VQ-VAE vocabulary 0..{V - 1}'
        if smp['images'].shape[1] != self.resolution:
            return f'{smp["images"].shape[1]}x{smp["images"].shape[1]} samples; the VQ-VAE decodes {self.resolution}x{self.resolution}'
        if ref['images'] is None:
            return 'the reference has no images to encode into real tokens (statistics only)'
        return None


def check_paired(samples) -> None:
    """SystemExit unless every sample file is row-paired with the first (count, labels, seed, batch size)."""
    (p0, s0), rest = samples[0], samples[1:]
    for path, smp in rest:
        why = None
        if len(smp['images']) != len(s0['images']):
            why = f'{len(smp["images"])} samples vs {len(s0["images"])}'
        elif (smp['labels'] is None) != (s0['labels'] is None) or \
                (smp['labels'] is not None and not np.array_equal(smp['labels'], s0['labels'])):
            why = 'different labels'
        elif smp['meta'] and s0['meta']:
            diff = [k for k in ('seed', 'batch_size') if smp['meta'].get(k) != s0['meta'].get(k)]
            why = ', '.join(f'{k} {smp["meta"].get(k)} vs {s0["meta"].get(k)}' for k in diff) or None
        if why:
            raise SystemExit(f'--bootstrap needs paired sample files (sample.py with the same --seed, --batch_size '
                             f'and labels); {path} and {p0} differ: {why}')


def paired_fid_bootstrap(feats_list, ref_mu, ref_sigma, n_boot: int, seed: int = 0) -> list:
    """Paired bootstrap of FID(set i) - FID(set 0), i >= 1: every replicate resamples the same rows in every set.

    feats_list: [(N, D)] features of row-paired sample sets; ref_mu (D,), ref_sigma (D, D): the reference.
    Resampling with replacement inflates each FID, but the same way for every set, so the difference keeps its
    meaning; the reference is held fixed (the sample noise of a paired comparison, not of the reference).
    Returns per set i >= 1: dict(ci95=[2.5th, 97.5th percentile], p_lower=share of replicates where set i has the
    lower FID, n_boot).
    """
    rng = np.random.default_rng(seed)
    n = len(feats_list[0])
    d_BI = np.empty((n_boot, len(feats_list) - 1))
    for b in data.progress(range(n_boot), desc='paired bootstrap', dynamic_ncols=True):
        idx = rng.integers(0, n, n)
        fids = [iscs.frechet_distance(*iscs.feature_stats(f[idx]), ref_mu, ref_sigma) for f in feats_list]
        d_BI[b] = np.asarray(fids[1:]) - fids[0]
    return [dict(ci95=[float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))], p_lower=float(np.mean(d < 0)),
                 n_boot=n_boot) for d in d_BI.T]


# --------------------------------------------------------------------------------------
# Command line: output
# --------------------------------------------------------------------------------------

ROWS = [('FID', 'lower'), ('IS', 'higher'), ('precision', 'higher'), ('recall', 'higher'),
        ('class_acc', 'higher'), ('ISCS', 'higher')]


def table_rows(res: dict) -> dict:
    rows = {name: res['metrics'].get(name) for name, _ in ROWS}
    if res['iscs']:
        for k, s, fd in zip(res['iscs']['k'], res['iscs']['S_k'], res['iscs']['FD_k']):
            rows[f'S_{k}'] = s
            rows[f'FD_{k}'] = fd
    return rows


def print_results(results: list) -> dict:
    """Prints one column per file (and differences to the first); returns {row: [values]} with the diffs."""
    tables = [table_rows(r) for r in results]
    names = list(dict.fromkeys(k for t in tables for k in t))
    better = dict(ROWS)
    better.update({k: 'higher' for k in names if k.startswith('S_')})
    better.update({k: 'lower' for k in names if k.startswith('FD_')})
    heads = [Path(r['samples']).name for r in results]
    heads += [f'{h} - {heads[0]}' for h in heads[1:]]
    width = max(12, *(len(h) for h in heads)) + 2
    fmt = lambda v: '-' if v is None else f'{v:.4f}' if abs(v) < 1e4 else f'{v:.4g}'
    print(f'{"metric":12s} {"better":7s}' + ''.join(f'{h:>{width}s}' for h in heads))
    diffs = {}
    for name in names:
        vals = [t.get(name) for t in tables]
        d = [None if v is None or vals[0] is None else v - vals[0] for v in vals[1:]]
        diffs[name] = d
        print(f'{name:12s} {better.get(name, ""):7s}' + ''.join(f'{fmt(v):>{width}s}' for v in vals + d))
    for r in results:
        for what, why in r['skipped'].items():
            print(f'[evaluate] {Path(r["samples"]).name}: {what} skipped: {why}')
        for w in r['warnings']:
            print(f'[evaluate] warning ({Path(r["samples"]).name}): {w}')
    return diffs


def json_path(sample_path) -> Path:
    sample_path = Path(sample_path)
    return sample_path.with_name(sample_path.stem + '.eval.json')


def _write_json(path, obj):
    tmp = Path(path).with_name(f'.{Path(path).name}.tmp{os.getpid()}')
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False, default=float) + '\n')
    os.replace(tmp, path)


def preset_of(smp, args) -> str:
    """'tiny' or 'real', from the npz `preset` key, --depth, or the resolution."""
    if smp['preset'] is not None:
        return 'tiny' if smp['preset'] == 'tiny' else 'real'
    if args.depth is not None:
        return 'real'
    return 'tiny' if smp['images'].shape[1] == TINY_RES else 'real'


def main(argv=None):
    args = p.parse_args(argv)
    device = torch.device('cuda' if torch.cuda.is_available() and not args.cpu else 'cpu')
    samples = [(path, data.load_samples(path)) for path in args.samples]  # every file is checked before any work
    presets = {preset_of(smp, args) for _, smp in samples}
    if len(presets) > 1:
        raise SystemExit('the sample files mix tiny-preset (32x32) and real-model samples; evaluate them separately')
    preset = presets.pop()
    if args.bootstrap:
        if len(samples) < 2:
            raise SystemExit('--bootstrap compares files with the first one: give a baseline and at least one more file')
        check_paired(samples)
    resolution = TINY_RES if preset == 'tiny' else REAL_RES
    for path, smp in samples:
        if smp['images'].shape[1] != resolution:
            data._fail(path, f'{smp["images"].shape[1]}x{smp["images"].shape[1]} images; the {preset} preset evaluates '
                        f'{resolution}x{resolution} samples'
                        + (' (set --depth for real-model samples without a preset key)' if preset == 'tiny' else ''))
    n_classes = models.TINY['num_classes'] if preset == 'tiny' else REAL_CLASSES
    for path, smp in samples:
        labels = smp['labels']
        if labels is not None and ((labels < 0) | (labels >= n_classes)).any():
            bad = np.unique(labels[(labels < 0) | (labels >= n_classes)])
            data._fail(path, f'{len(bad)} label value(s) outside the classes 0..{n_classes - 1} of the {preset} preset '
                        f'(e.g. {bad[:5].tolist()}); wrong labels would silently give class_acc 0')
    if args.ref is None:
        if preset != 'tiny':
            raise SystemExit('--ref is required for real-model samples: the ADM reference batch '
                             'VIRTUAL_imagenet256_labeled.npz (https://openaipublic.blob.core.windows.net/diffusion/'
                             'jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz), an npz of real '
                             'images, or an image folder')
        args.ref = 'shapes'
    if args.iscs_n is None and preset == 'tiny':
        args.iscs_n = 1000
    ev = Evaluator(preset, args, device)
    ref = load_reference(args.ref, resolution, args.ref_n)
    print(f'[evaluate] {preset} preset{" (random networks)" if args.random_init else ""}, reference: {ref["desc"]}, '
          f'device {device}')
    ref_fid = ev.ref_fid(ref)
    if args.bootstrap and 'mu' not in ref_fid:
        raise SystemExit('--bootstrap needs the reference FID statistics (the reference has none)')
    results, feats = [], []
    for path, smp in samples:
        res, f = ev.evaluate(path, smp, ref, ref_fid)
        _write_json(json_path(path), res)
        results.append(res)
        feats.append(f)
    diffs = print_results(results)
    out = dict(results=results, differences_to_first=diffs)
    if args.bootstrap:
        out['fid_bootstrap'] = paired_fid_bootstrap(feats, ref_fid['mu'], ref_fid['sigma'], args.bootstrap)
        for path, bs, d in zip(args.samples[1:], out['fid_bootstrap'], diffs['FID']):
            print(f'[evaluate] FID({Path(path).name}) - FID({Path(args.samples[0]).name}) = {d:+.3f}, paired bootstrap '
                  f'95% interval [{bs["ci95"][0]:+.3f}, {bs["ci95"][1]:+.3f}], lower in {100 * bs["p_lower"]:.1f}% of '
                  f'{bs["n_boot"]} replicates')
    for path, _ in samples:
        print(f'[evaluate] wrote {json_path(path)}')
    if args.json:
        _write_json(args.json, out)
    return results


if __name__ == '__main__':
    main()
