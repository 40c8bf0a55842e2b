"""Sampling cost of the guidance hook: VAR-d16 geometry (random weights), CPU, 256x256.

Prints seconds per image for plain sampling, sampling with a zero guidance hook (the cost of the hook
plumbing alone; target < 2%), and sampling with a (random, non-zero) d16 guidance injector (the paper's
"negligible overhead"; target < 5%), and their ratios, all measured in this one run (interleaved repeats,
median), so the ratios are meaningful on a noisy machine.

    python benchmarks/bench_sampling.py [--depth 16] [--batch 2] [--reps 3] [--threads N]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument('--depth', type=int, default=16)
p.add_argument('--batch', type=int, default=2)
p.add_argument('--reps', type=int, default=3)
p.add_argument('--threads', type=int, default=0)
p.add_argument('--tiny', action='store_true', help='tiny-preset geometry instead (quick check)')


def main():
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    vae, var = models.build_random(None if args.tiny else args.depth)
    B, labels = args.batch, torch.arange(args.batch) % var.num_classes
    zero_hook = lambda si, idx_prev: torch.zeros(idx_prev.shape[0], var.patch_nums[si] ** 2, var.C)
    cases = {'plain': {}, 'zero hook': dict(guidance_hook=zero_hook, guidance_w=1.0)}
    if hasattr(models, 'GuidanceInjector'):
        inj = models.GuidanceInjector(var.C, var.patch_nums).eval()
        torch.nn.init.normal_(inj.proj_out.weight, std=0.02)  # non-zero output, like a trained injector
        cases['injector'] = dict(guidance_hook=models.make_guidance_hook(var, inj), guidance_w=0.001)
    times = {k: [] for k in cases}
    kw = dict(g_seed=0, cfg=1.5, top_k=900, top_p=0.96)
    var.autoregressive_infer_cfg(B, labels, **kw)  # warm-up
    for _ in range(args.reps):
        for name, extra in cases.items():
            t0 = time.perf_counter()
            var.autoregressive_infer_cfg(B, labels, **kw, **extra)
            times[name].append((time.perf_counter() - t0) / B)
    base = statistics.median(times['plain'])
    geom = 'tiny' if args.tiny else f'd{args.depth}'
    print(f'VAR-{geom} geometry, {torch.get_num_threads()} CPU threads, batch {B}, median of {args.reps}')
    for name, t in times.items():
        print(f'  {name:10s} {statistics.median(t):8.3f} s/image   ratio vs plain {statistics.median(t) / base:.4f}')


if __name__ == '__main__':
    main()
