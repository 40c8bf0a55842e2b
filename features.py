"""Evaluation features: the FID InceptionV3 (pytorch-fid's port of TF inception-2015-12-05, the network FID / IS /
precision-recall are defined on; docs/evaluation.md), its ADM input pipeline, and the feature extractors evaluate.py
and the benchmarks measure with (tiny feature network, judge, ISCS scale features)."""
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.inception import (BasicConv2d, Inception3, InceptionA, InceptionAux, InceptionB, InceptionC,
                                          InceptionD, InceptionE)

import data
import models

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
                       progress: bool = True, desc: str = 'inception', pipeline: str = 'adm') -> tuple[np.ndarray, np.ndarray]:
    """pool3 features float64 (N, 2048) and IS logits float64 (N, 1008, no fc bias: ADM) of uint8 (N, H, W, 3)
    images (a memmap is read batch by batch), under no_grad; the model's parameter dtype sets the compute dtype.
    The batch size changes the results only by float round-off (ADM: 64, pytorch-fid: 50)."""
    n = len(images_NHWC_uint8)
    if n == 0:
        raise ValueError('inception_features got no images')
    dtype = next(model.parameters()).dtype
    pool3_N2048 = np.empty((n, 2048), dtype=np.float64)
    logits_N1008 = np.empty((n, 1008), dtype=np.float64)
    with torch.no_grad(), data.progress(total=n, unit='img', desc=desc, disable=not progress) as bar:
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
    cls_BD = net.forward_head(net.forward_features(models.vit_normalize(net, x)), pre_logits=True)
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


def judge_features(images_NHWC_uint8, net, batch_size=256, device='cpu', progress=True, desc='judge'):
    """The judge's (penultimate features (N, 128) float64, logits (N, 10) float64) of uint8 images (N, 32, 32, 3)."""
    def forward(x_B3HW):
        f_BD = net[:-1](x_B3HW)
        return f_BD, net[-1](f_BD)
    return batched_features(images_NHWC_uint8, forward, batch_size, device, progress, desc)


EXTRACTORS = dict(featnet=featnet_features, judge=judge_features, inception=inception_features)


def extract(name: str, images_NHWC_uint8, net, batch_size=None, device='cpu', progress=True, desc=None):
    """(features (N, D) float64, logits (N, K) float64) of uint8 images (N, H, W, 3) on the evaluation network `name`
    (checkpoints.EVAL_NETS: 'featnet', 'judge', 'inception'; batch_size None: that extractor's default); SystemExit if
    the network gives NaN / inf."""
    kw = {} if batch_size is None else dict(batch_size=batch_size)
    f, lg = EXTRACTORS[name](images_NHWC_uint8, net, device=device, progress=progress, desc=desc or name, **kw)
    if not (np.isfinite(f).all() and np.isfinite(lg).all()):
        raise SystemExit(f'{desc or name}: the {name} network produced NaN / inf features (broken weights?)')
    return f, lg
