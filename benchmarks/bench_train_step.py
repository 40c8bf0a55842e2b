"""Cost of one AID-VAR training step, --inject input vs --inject head (VAR-d16 geometry, random weights, CPU).

train_injector.py runs as a script in its own subprocess per mode, so that its peak memory (max RSS) is its own.
Prints seconds per step (from its log.jsonl: median over --steps after one warm-up step), peak memory, the FLOPs of
one step (two more runs, of 1 and 2 steps, under the FLOP counter: the difference) and the input/head ratios.

    python benchmarks/bench_train_step.py [--depth 16] [--batch 2] [--steps 3]
    python benchmarks/bench_train_step.py --tiny           # tiny-preset geometry, quick
"""
import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import data  # noqa: E402
import models  # noqa: E402
import perf  # noqa: E402  (benchmarks/perf.py)

p = argparse.ArgumentParser()
p.add_argument('--depth', type=int, default=16)
p.add_argument('--tiny', action='store_true')
p.add_argument('--batch', type=int, default=2)
p.add_argument('--steps', type=int, default=3)


def measure(args, mode, tmp):
    """s/step, peak RSS, threads and GFLOP per step of train_injector.py --inject mode (R1 off: a step without R1)."""
    preset = models.resolve_preset(None if args.tiny else args.depth)
    n, side = max(args.batch, 64), preset.resolution  # 64 images: the soft reals' temperature match
    images = np.random.default_rng(0).integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    data.save_npz(tmp / 'data.npz', dict(arr_0=images, labels=np.arange(n) % preset.num_classes))
    argv = ['train_injector.py', '--random_init', '--inject', mode, '--global_batch_size', str(args.batch),
            '--r1_gamma', '0', '--sample_every', '0', '--num_workers', '0', '--mixed_precision', 'no',
            '--data_path', str(tmp / 'data.npz')] + ([] if args.tiny else ['--depth', str(args.depth)])
    env = dict(OMP_NUM_THREADS=str(torch.get_num_threads()), CUDA_VISIBLE_DEVICES='')  # the CPU, its default threads
    run = lambda steps, out, flops: perf.run_measured(argv + ['--max_steps', str(steps), '--out_dir', str(tmp / out)],
                                                      tmp / f'{out}.log', flops=flops, env=env)
    res = run(args.steps + 1, 'timed', False)
    rows = [json.loads(line) for line in open(tmp / 'timed' / 'log.jsonl')]
    flops = run(2, 'flops2', True)['flops'] - run(1, 'flops1', True)['flops']  # the second step's FLOPs
    return dict(s_per_step=statistics.median(args.batch / r['img_per_s'] for r in rows[1:]), peak_rss_gb=res['peak_mem_gib'],
                threads=res['threads'], gflop_per_step=flops / 1e9)


def main():
    args = p.parse_args()
    res = {}
    for mode in ('input', 'head'):
        with tempfile.TemporaryDirectory() as tmp:
            res[mode] = measure(args, mode, Path(tmp))
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
