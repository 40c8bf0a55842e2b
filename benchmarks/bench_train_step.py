"""Cost of one AID-VAR training step, --inject input vs --inject head (VAR-d16 geometry, random weights, CPU).

Each mode runs in its own subprocess so that its peak memory (max RSS) is its own. Prints seconds per step
(median over --steps after one warm-up step), peak memory, and the input/head ratios from this one run.

    python benchmarks/bench_train_step.py [--depth 16] [--batch 2] [--steps 3]
    python benchmarks/bench_train_step.py --tiny           # tiny-preset geometry, quick
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

p = argparse.ArgumentParser()
p.add_argument('--depth', type=int, default=16)
p.add_argument('--tiny', action='store_true')
p.add_argument('--batch', type=int, default=2)
p.add_argument('--steps', type=int, default=3)
p.add_argument('--mode', choices=['input', 'head'], default=None, help='internal: run one mode and print JSON')


def run_mode(args):
    from accelerate import Accelerator
    import models
    import train_injector as ti
    argv = ['--random_init', '--inject', args.mode, '--global_batch_size', str(args.batch), '--mixed_precision', 'no']
    if not args.tiny:
        argv += ['--depth', str(args.depth)]
    targs = ti.resolve_args(argv)
    acc = Accelerator(cpu=True)
    vae, var, D, G = ti.build_everything(targs, 'cpu')
    opt_g = torch.optim.AdamW(G.parameters(), lr=targs.lr_g)
    opt_d = torch.optim.AdamW(D.head_parameters(), lr=targs.lr_d)
    side = var.patch_nums[-1] * vae.downsample
    img = torch.rand(args.batch, 3, side, side) * 2 - 1
    labels = torch.arange(args.batch) % var.num_classes
    targs.real_temps = ti.real_temperatures(targs, torch.utils.data.TensorDataset(img, labels), var, 'cpu', n=args.batch)
    times = []
    for step in range(args.steps + 1):
        t0 = time.perf_counter()
        ti.train_step(step + 1, img, labels, vae, var, D, G, opt_d, opt_g, targs, acc, lambda *a: None)  # R1 off at odd steps
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:  # the FLOPs of one step, for GPU estimates (README)
        ti.train_step(1, img, labels, vae, var, D, G, opt_d, opt_g, targs, acc, lambda *a: None)
    print(json.dumps(dict(s_per_step=statistics.median(times[1:]), peak_rss_gb=peak, threads=torch.get_num_threads(),
                          gflop_per_step=fc.get_total_flops() / 1e9,
                          var_params=sum(q.numel() for q in var.parameters()))))


def main():
    args = p.parse_args()
    if args.mode:
        return run_mode(args)
    res = {}
    for mode in ('input', 'head'):
        cmd = [sys.executable, __file__, '--mode', mode, '--batch', str(args.batch), '--steps', str(args.steps), '--depth', str(args.depth)]
        out = subprocess.run(cmd + (['--tiny'] if args.tiny else []), capture_output=True, text=True, check=True).stdout
        res[mode] = json.loads(out.strip().splitlines()[-1])
    geom = 'tiny' if args.tiny else f'd{args.depth}'
    print(f'AID-VAR training step, VAR-{geom} geometry, random weights, CPU ({res["input"]["threads"]} threads), '
          f'per-device batch {args.batch}, median of {args.steps}')
    for mode, r in res.items():
        print(f'  --inject {mode:5s}  {r["s_per_step"]:8.2f} s/step   peak RSS {r["peak_rss_gb"]:6.2f} GB   '
              f'{r["gflop_per_step"]:9.1f} GFLOP/step (a step without R1)')
    print(f'  ratio input/head: time {res["input"]["s_per_step"] / res["head"]["s_per_step"]:.2f}x, '
          f'memory {res["input"]["peak_rss_gb"] / res["head"]["peak_rss_gb"]:.2f}x')


if __name__ == '__main__':
    main()
