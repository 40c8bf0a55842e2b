"""The tiny-preset AID-VAR experiment: does the trained injector beat the frozen VAR, paired, over seeds?

For every variant (default flags and the cheap ablations) and training seed: train an injector
(train_injector.py), sample the same labels and seeds with w = 0 (the baseline) and each guided w
(sample.py --w 0 w1 w2 ...), and evaluate every npz against held-out real shapes (evaluate.py: FID / IS /
precision / recall with the tiny feature network, class accuracy, ISCS). The evaluation seed (--sample_seed)
is never used for training or tuning. D on RGB vs latent comes from train_disc_probe.py.
Writes benchmarks/results/tiny_experiment.{json,md}: mean and spread over training seeds, and the per-scale
ISCS curve.

    python benchmarks/tiny_experiment.py                                      # the README table (hours on 2 cores)
    python benchmarks/tiny_experiment.py --seeds 0 --variants default --n_per_class 50 --steps 100   # quick look
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    'default': [],
    'decode_gumbel': ['--decode', 'gumbel'],
    'decode_st': ['--decode', 'st'],
    'inject_head': ['--inject', 'head'],
    'context_rollout': ['--context', 'rollout'],
    'broadcast': ['--broadcast'],
}
METRICS = ('FID', 'IS', 'precision', 'recall', 'class_acc', 'ISCS')

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2], help='training seeds')
p.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
p.add_argument('--w', type=float, nargs='+', default=[0.0001, 0.001, 0.01, 0.1], help='guided weights (w=0 is always added)')
p.add_argument('--n_per_class', type=int, default=200, help='samples per class (10 classes): 2,000 by default')
p.add_argument('--sample_seed', type=int, default=1234, help='evaluation seed: never used for training or tuning')
p.add_argument('--steps', type=int, default=None, help='training steps (default: train_injector.py default)')
p.add_argument('--probe_steps', type=int, default=200, help='train_disc_probe.py steps (0 skips the RGB/latent probe)')
p.add_argument('--out_dir', type=str, default='runs/tiny_experiment')
p.add_argument('--results', type=str, default=str(REPO / 'benchmarks' / 'results'))


def run(cmd):
    print('$', ' '.join(cmd), flush=True)
    env = dict(os.environ)
    env.setdefault('OMP_NUM_THREADS', '1')  # on small shared CPUs one thread per process is several times faster
    subprocess.run([sys.executable, *cmd], cwd=REPO, check=True, env=env)


def one_run(args, variant, seed, out):
    """Train, sample paired, evaluate. Returns {w: metrics dict}."""
    run_dir = out / f'{variant}_s{seed}'
    if not (run_dir / 'injector.pt').is_file():
        steps = ['--max_steps', str(args.steps)] if args.steps else []
        run(['train_injector.py', '--seed', str(seed), '--out_dir', str(run_dir), '--sample_every', '0', *steps,
             *VARIANTS[variant]])
    ws = [0.0] + list(args.w)
    run(['sample.py', '--injector', str(run_dir / 'injector.pt'), '--w', *map(str, ws), '--num_per_class',
         str(args.n_per_class), '--seed', str(args.sample_seed), '--out_dir', str(run_dir / 'samples')])
    res = {}
    for w in ws:
        npz = run_dir / 'samples' / f'samples_w{w:g}.npz'
        js = npz.with_suffix('.eval.json')
        run(['evaluate.py', str(npz), '--json', str(js)])
        res[w] = json.loads(js.read_text())
    return res


def flat(metrics):
    """The headline numbers of one evaluate.py --json result (one entry per sample file in 'results')."""
    r = metrics['results'][0]
    out = {k: r['metrics'].get(k) for k in METRICS}
    out['S_k'] = r['iscs']['S_k'] if r.get('iscs') else None
    return out


def summarise(all_res, args):
    rows = {}
    for variant, per_seed in all_res.items():
        for w in [0.0] + list(args.w):
            vals = {k: [flat(per_seed[s][w])[k] for s in per_seed if flat(per_seed[s][w])[k] is not None] for k in METRICS}
            deltas = [flat(per_seed[s][w])['FID'] - flat(per_seed[s][0.0])['FID'] for s in per_seed]
            rows[f'{variant} w={w:g}'] = {k: (statistics.mean(v), statistics.pstdev(v)) for k, v in vals.items() if v}
            rows[f'{variant} w={w:g}']['dFID'] = (statistics.mean(deltas), statistics.pstdev(deltas))
    return rows


def main():
    args = p.parse_args()
    out = REPO / args.out_dir
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    all_res = {v: {s: one_run(args, v, s, out) for s in args.seeds} for v in args.variants}
    rows = summarise(all_res, args)
    probe = {}
    if args.probe_steps:
        for space in ('rgb', 'latent'):
            run(['train_disc_probe.py', '--space', space, '--steps', str(args.probe_steps), '--out_dir', str(out / 'probe')])
            probe[space] = str(out / 'probe' / f'probe_{space}.csv')
    (results / 'tiny_experiment.json').write_text(json.dumps(dict(args=vars(args), rows=rows, raw=all_res, probe=probe),
                                                             indent=1, default=str))
    lines = [f'Tiny preset, paired samples ({args.n_per_class * 10} per w, sample seed {args.sample_seed}), '
             f'training seeds {args.seeds}: mean ± std over seeds.', '',
             '| run | FID | dFID vs w=0 | IS | precision | recall | class acc | ISCS |', '|' + ' --- |' * 8]
    for name, r in rows.items():
        cell = lambda k, f='{:.3f}': (f.format(r[k][0]) + ' ± ' + f.format(r[k][1])) if k in r else '-'
        lines.append(f'| {name} | {cell("FID")} | {cell("dFID")} | {cell("IS")} | {cell("precision")} | '
                     f'{cell("recall")} | {cell("class_acc")} | {cell("ISCS", "{:.4g}")} |')
    (results / 'tiny_experiment.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
