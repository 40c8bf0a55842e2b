"""Sampling cost: VAR-d16 geometry (random weights), 256x256; the guidance hook's overhead and the model FLOP rate.

Prints seconds per image for plain sampling, sampling with a zero guidance hook (the cost of the hook
plumbing alone; target < 2%), and sampling with a (random, non-zero) d16 guidance injector (the paper's
"negligible overhead"; target < 5%), and their ratios; and each one's model FLOPs per second against the
machine's own large matrix product (CPU: float32; GPU: bf16, the sampler under bf16 autocast), measured between
the repeats of this one run. All from one run (interleaved repeats, median), so the ratios are meaningful on a
noisy machine. On the CPU the rates are also given per CPU-second of this process, which time slices lost to
other processes do not lower (the wall-clock figures do).

    python benchmarks/bench_sampling.py [--depth 16] [--batch 2] [--reps 3] [--threads N] [--device cpu]
"""
import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402
import perf  # noqa: E402  (benchmarks/perf.py)

p = argparse.ArgumentParser()
p.add_argument('--depth', type=int, default=16)
p.add_argument('--batch', type=int, default=2)
p.add_argument('--reps', type=int, default=3)
p.add_argument('--threads', type=int, default=0)
p.add_argument('--device', default='cpu')
p.add_argument('--tiny', action='store_true', help='tiny-preset geometry instead (quick check)')


def main():
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cuda = dev.type == 'cuda'
    vae, var = models.build_random(None if args.tiny else args.depth, dev)
    B, labels = args.batch, torch.arange(args.batch, device=dev) % var.num_classes
    zero_hook = lambda si, idx_prev: torch.zeros(idx_prev.shape[0], var.patch_nums[si] ** 2, var.C, device=dev)
    cases = {'plain': {}, 'zero hook': dict(guidance_hook=zero_hook, guidance_w=1.0)}
    inj = models.GuidanceInjector(var.C, var.patch_nums).to(dev).eval()
    torch.nn.init.normal_(inj.proj_out.weight, std=0.02)  # non-zero output, like a trained injector
    cases['injector'] = dict(guidance_hook=models.make_guidance_hook(var, inj), guidance_w=0.001)
    kw = dict(g_seed=0, cfg=1.5, top_k=900, top_p=0.96)
    amp = (lambda: torch.autocast('cuda', dtype=torch.bfloat16)) if cuda else contextlib.nullcontext

    def run(extra, n=B):
        with amp():
            var.autoregressive_infer_cfg(n, labels[:n], **kw, **extra)

    # FLOPs grow linearly with the batch: counted once per case on one image
    flop = {name: perf.count_flops(lambda: run(extra, 1))[1] for name, extra in cases.items()}
    mm_dtype, mm_n = (torch.bfloat16, 8192) if cuda else (torch.float32, 1024 if args.tiny else 4096)
    run({})  # warm-up
    wall, cpu, mm = {k: [] for k in cases}, {k: [] for k in cases}, []
    for _ in range(args.reps):
        mm.append(perf.matmul_rate(dev, mm_dtype, mm_n, reps=1))
        for name, extra in cases.items():
            w, c = perf.timed(lambda: run(extra), dev)
            wall[name].append(w / B)
            cpu[name].append(c / B)
    mm_wall, mm_cpu = statistics.median(m['wall'] for m in mm), statistics.median(m['cpu'] for m in mm)
    base = statistics.median(wall['plain'])
    geom = 'tiny' if args.tiny else f'd{args.depth}'
    print(f'VAR-{geom} geometry, {dev}, {torch.get_num_threads()} CPU threads, batch {B}, median of {args.reps}; '
          f'{str(mm_dtype)[6:]} matmul {mm_n}^3: {mm_wall / 1e9:.1f} GFLOP/s' +
          ('' if cuda else f' ({mm_cpu / 1e9:.1f} per CPU-second)'))
    for name in cases:
        t, g = statistics.median(wall[name]), flop[name]
        line = (f'  {name:10s} {t:8.3f} s/image   ratio vs plain {t / base:.4f}   {g / 1e9:8.1f} GFLOP/image   '
                f'{g / t / 1e9:8.1f} GFLOP/s = {g / t / mm_wall:.3f} of the matmul')
        if not cuda:
            tc = statistics.median(cpu[name])
            line += f'   (per CPU-second: {g / tc / 1e9:.1f} GFLOP/s = {g / tc / mm_cpu:.3f})'
        print(line)


if __name__ == '__main__':
    main()
