"""Feature-extraction throughput of evaluate.py on CPU (or --device cuda), random weights.

Measures images/s of every network evaluate.py runs, in one process, interleaved repeats (median), and
prints the ratios to the tiny feature network, so the numbers stay meaningful on a noisy machine:
  featnet       the tiny preset's feature ViT on 32x32 uint8 samples (FID / IS / PR, tiny)
  inception     FID InceptionV3 on 256x256 uint8 samples (resize to 299 included; FID / IS / PR, real models)
  dino          DINO ViT-S/16 CLS on 256x256 decoded images (resize to 224 included; ISCS features, real models)
  iscs_tiny     ISCS per tiny sample: 6 prefix decodes through the tiny VQ-VAE + 6 featnet passes
  iscs_real     (--real_vae) ISCS per real sample: 10 decodes through the 256x256 VQ-VAE + 10 DINO passes
Speed does not depend on the weights, so random ones are used (nothing to download).

    python benchmarks/bench_eval.py [--batch 16] [--reps 3] [--threads N] [--real_vae] [--device cpu]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import features  # noqa: E402
import models  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument('--batch', type=int, default=16)
p.add_argument('--reps', type=int, default=3)
p.add_argument('--threads', type=int, default=0)
p.add_argument('--device', default='cpu')
p.add_argument('--real_vae', action='store_true', help='also time ISCS on the 256x256 VQ-VAE (slow on CPU)')


def main():
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev, B = torch.device(args.device), args.batch
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    u8_tiny = rng.integers(0, 256, (B, 32, 32, 3), dtype=np.uint8)
    u8_real = rng.integers(0, 256, (B, 256, 256, 3), dtype=np.uint8)
    featnet = models.frozen(models.build_featnet(), dev)
    inception = models.frozen(features.FIDInceptionV3(), dev)
    dino = models.frozen(models.build_dino(), dev)
    x_real = torch.rand(B, 3, 256, 256, device=dev) * 2 - 1
    vae_t, _ = models.build_tiny()
    vae_t = models.frozen(vae_t, dev)
    L_t = sum(pn * pn for pn in models.TINY['patch_nums'])
    tok_t = rng.integers(0, models.TINY['V'], (B, L_t))

    cases = {
        'featnet': lambda: features.featnet_features(u8_tiny, featnet, B, dev, progress=False),
        'inception': lambda: features.inception_features(u8_real, inception, B, dev, progress=False),
        'dino': lambda: features.vit_cls(dino, x_real),
        'iscs_tiny': lambda: features.scale_features(vae_t, featnet, tok_t, models.TINY['patch_nums'], B, dev,
                                                     progress=False),
    }
    if args.real_vae:
        vae_r, _ = models.build_vae_var(device='meta', depth=16)
        vae_r = models.frozen(vae_r.to_empty(device=dev), dev)
        for prm in vae_r.parameters():
            torch.nn.init.normal_(prm, std=0.02)
        tok_r = rng.integers(0, 4096, (B, sum(pn * pn for pn in models.REAL_PATCH_NUMS)))
        cases['iscs_real'] = lambda: features.scale_features(vae_r, dino, tok_r, models.REAL_PATCH_NUMS, B, dev,
                                                             progress=False)
    times = {k: [] for k in cases}
    with torch.no_grad():
        for fn in cases.values():  # warm-up
            fn()
        for _ in range(args.reps):
            for name, fn in cases.items():
                if dev.type == 'cuda':
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if dev.type == 'cuda':
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
    rate = {k: B / statistics.median(t) for k, t in times.items()}
    print(f'evaluate.py feature extraction, {dev}, {torch.get_num_threads()} threads, batch {B}, median of {args.reps}')
    for name, r in rate.items():
        print(f'  {name:10s} {r:9.2f} images/s   {1000 / r:8.2f} ms/image   ratio to featnet {r / rate["featnet"]:.4f}')
    print(f'  inception / dino speed ratio {rate["inception"] / rate["dino"]:.3f}; ISCS costs '
          f'{rate["featnet"] / rate["iscs_tiny"]:.1f}x a featnet pass per tiny sample')


if __name__ == '__main__':
    main()
