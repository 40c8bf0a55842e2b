"""The tiny-preset AID-VAR experiment: does the trained injector beat the frozen VAR, paired, over seeds?

1. Baseline: the frozen VAR's samples (sample.py --w 0) for --n_per_class x 10 labels from --sample_seed.
   w = 0 never calls the injector, so one baseline file is the w = 0 of every run (sample.py's tests pin this).
2. For every variant (default flags and the cheap ablations) and training seed: train an injector
   (train_injector.py), sample the same labels and seeds at each guided w, evaluate every npz against
   held-out real shapes (evaluate.py: FID and class accuracy on the judge, a CNN D never saw, which decides; FID /
   IS / precision / recall / class accuracy on the tiny feature network, D's backbone, beside it; ISCS with its
   per-scale S_k).
   The default variant runs --seeds at the full --w sweep; the ablations run --ablation_seeds at --ablation_w.
3. D on RGB vs latent: train_disc_probe.py --space rgb|latent, final per-scale accuracies.
Independent runs go --jobs at a time (one thread each: 2 cores -> 2 jobs). The evaluation seed
(--sample_seed) is never used for training or tuning; the reference shapes are seed 1000.
Writes benchmarks/results/tiny_experiment.{json,md}: mean ± std over training seeds, the paired FID change (and,
per run, its paired-bootstrap 95% interval: evaluate.py --bootstrap),
and the per-scale ISCS curve. A finished run's files are reused, so an interrupted experiment resumes.

    python benchmarks/tiny_experiment.py                                      # benchmarks/results/tiny_experiment.md (about 1 h on 2 cores)
    python benchmarks/tiny_experiment.py --seeds 0 --variants default --n_per_class 50 --steps 100   # quick look
"""
import argparse
import csv
import json
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from perf import REPO, run  # benchmarks/perf.py
VARIANTS = {
    'default': [],
    'decode_soft': ['--decode', 'soft', '--real_decode', 'soft'],  # the paper's soft fakes and soft reals
    'decode_gumbel': ['--decode', 'gumbel'],
    'decode_st': ['--decode', 'st'],
    'inject_head': ['--inject', 'head'],
    'context_rollout': ['--context', 'rollout'],
    'broadcast': ['--broadcast'],
    'ce_only': ['--lambda_adv', '0'],  # the reconstruction term alone: what the adversarial term adds to it
}
METRICS = ('FID_judge', 'class_acc_judge', 'FID', 'IS', 'precision', 'recall', 'class_acc', 'ISCS')

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2], help='training seeds of the default variant')
p.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
p.add_argument('--w', type=float, nargs='+', default=[0.0001, 0.001, 0.01, 0.1], help='guided weights (default variant)')
p.add_argument('--ablation_seeds', type=int, nargs='+', default=[0])
p.add_argument('--ablation_w', type=float, nargs='+', default=[0.001, 0.1], help='guided weights of the ablations (0.1: the tiny training w)')
p.add_argument('--n_per_class', type=int, default=200, help='samples per class (10 classes): 2,000 by default')
p.add_argument('--sample_seed', type=int, default=1234, help='evaluation seed: never used for training or tuning')
p.add_argument('--steps', type=int, default=None, help='training steps (default: train_injector.py default)')
p.add_argument('--train_args', type=str, default='', help='extra train_injector.py flags for every run')
p.add_argument('--probe_steps', type=int, default=100, help='train_disc_probe.py steps (0 skips the RGB/latent probe)')
p.add_argument('--bootstrap', type=int, default=1000, help="paired-bootstrap replicates of every run's FID change (0: off)")
p.add_argument('--jobs', type=int, default=2, help='runs in parallel (one thread each)')
p.add_argument('--out_dir', type=str, default='runs/tiny_experiment')
p.add_argument('--results', type=str, default=str(REPO / 'benchmarks' / 'results'))


def evaluate(npz, log):
    js = npz.with_suffix('.eval.json')
    if not js.is_file():
        run(['evaluate.py', str(npz), '--json', str(js)], log)
    return flat(json.loads(js.read_text()))


def flat(result):
    """The headline numbers of one evaluate.py --json result (one entry per sample file in 'results')."""
    r = result['results'][0]
    out = {k: r['metrics'].get(k) for k in METRICS}
    out['S_k'] = r['iscs']['S_k'] if r.get('iscs') else None
    return out


def samples_npz(out_dir, w):
    """The file sample.py writes for guidance weight w."""
    return out_dir / f'samples_w{w:g}.npz'


def sample(args, out_dir, ws, log, injector=None):
    missing = [w for w in ws if not samples_npz(out_dir, w).is_file()]
    if missing:
        inj = ['--injector', str(injector)] if injector else []
        run(['sample.py', *inj, '--w', *map(str, missing), '--num_per_class', str(args.n_per_class),
             '--seed', str(args.sample_seed), '--out_dir', str(out_dir)], log)
    return [samples_npz(out_dir, w) for w in ws]


def one_run(args, variant, seed, ws, out):
    """Train, sample the guided w's, evaluate. Returns {w: metrics}."""
    run_dir = out / f'{variant}_s{seed}'
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / 'experiment.log'
    if not (run_dir / 'done').is_file():  # written after training finished (an interrupted run resumes from last.pt)
        steps = ['--max_steps', str(args.steps)] if args.steps else []
        run(['train_injector.py', '--seed', str(seed), '--out_dir', str(run_dir), '--sample_every', '0',
             '--resume', 'auto', *steps, *args.train_args.split(), *VARIANTS[variant]], log)
        (run_dir / 'done').touch()
    npzs = sample(args, run_dir / 'samples', ws, log, injector=run_dir / 'injector.safetensors')
    return {w: evaluate(npz, log) for w, npz in zip(ws, npzs)}


def probe(args, out):
    """Final per-scale D accuracy (mean of real/fake) of train_disc_probe.py in RGB and latent space."""
    res = {}
    for space in ('rgb', 'latent'):
        csv_path = out / 'probe' / f'probe_{space}.csv'
        if not csv_path.is_file():
            (out / 'probe').mkdir(parents=True, exist_ok=True)
            run(['train_disc_probe.py', '--space', space, '--steps', str(args.probe_steps), '--out_dir', str(out / 'probe')],
                out / 'probe' / f'{space}.log')
        rows = list(csv.DictReader(csv_path.open()))
        last = max(int(r['step']) for r in rows)
        tail = [r for r in rows if int(r['step']) > last - 20]  # the last 20 steps, per scale
        scales = sorted({int(r['scale']) for r in tail})
        res[space] = {k: statistics.mean((float(r['acc_real']) + float(r['acc_fake'])) / 2 for r in tail if int(r['scale']) == k)
                      for k in scales}
    return res


def bootstrap(args, out, base_npz, runs):
    """Paired-bootstrap 95% interval of each run's FID change: one evaluate.py --bootstrap call over the baseline and
    every run (runs: {name: npz}). Returns {name: dict(ci95=[lo, hi], p_lower=share of replicates below the baseline)}."""
    d = out / 'bootstrap'
    d.mkdir(parents=True, exist_ok=True)
    links = []
    for name, npz in {'baseline': base_npz, **runs}.items():
        link = d / f'{name}.npz'  # evaluate.py writes its per-file json beside the link, not over the run's own
        if not link.is_symlink():
            link.symlink_to(npz)
        links.append(link)
    js = d / f'bootstrap{args.bootstrap}.json'
    cached = json.loads(js.read_text()) if js.is_file() else None
    if cached is None or [Path(r['samples']).name for r in cached['results']] != [x.name for x in links]:
        run(['evaluate.py', *map(str, links), '--no_iscs', '--bootstrap', str(args.bootstrap), '--json', str(js)],
            d / 'experiment.log')
        cached = json.loads(js.read_text())
    return {name: dict(featnet=a, judge=b) for name, a, b in zip(runs, cached['fid_bootstrap'], cached['fid_judge_bootstrap'])}


def mean_std(vals):
    vals = [v for v in vals if v is not None]
    return (statistics.mean(vals), statistics.pstdev(vals)) if vals else None


def main():
    args = p.parse_args()
    out = REPO / args.out_dir
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    # the baseline first and alone: it also fills the reference-feature cache the parallel evaluations share
    (out / 'baseline').mkdir(parents=True, exist_ok=True)
    base_log = out / 'baseline' / 'experiment.log'
    base = evaluate(sample(args, out / 'baseline', [0.0], base_log)[0], base_log)
    # variant -> (training seeds, guided w's): the default gets the full sweep, each ablation the cheap setting
    plan = {v: (args.seeds, args.w) if v == 'default' else (args.ablation_seeds, args.ablation_w) for v in args.variants}
    with ThreadPoolExecutor(args.jobs) as ex:
        futures = {(v, s): ex.submit(one_run, args, v, s, ws, out) for v, (seeds, ws) in plan.items() for s in seeds}
        probe_res = ex.submit(probe, args, out).result() if args.probe_steps else {}
        res = {k: f.result() for k, f in futures.items()}

    rows = {'baseline (frozen VAR) w=0': {k: (base[k], 0.0) for k in METRICS if base[k] is not None}}
    rows['baseline (frozen VAR) w=0'].update(dFID=(0.0, 0.0), dFID_judge=(0.0, 0.0))
    curves = {'w=0': base['S_k']}
    for v, (seeds, ws) in plan.items():
        for w in ws:
            per = [res[(v, s)][w] for s in seeds]
            row = {k: mean_std([m[k] for m in per]) for k in METRICS}
            row['dFID'] = mean_std([m['FID'] - base['FID'] for m in per])
            row['dFID_judge'] = mean_std([m['FID_judge'] - base['FID_judge'] for m in per])
            row['n_seeds'] = len(seeds)
            rows[f'{v} w={w:g}'] = {k: x for k, x in row.items() if x is not None}
            if v == 'default':
                curves[f'w={w:g}'] = [statistics.mean(c) for c in zip(*[m['S_k'] for m in per])] if per[0]['S_k'] else None
    npz = {f'{v}_s{s}_w{w:g}': samples_npz(out / f'{v}_s{s}' / 'samples', w)
           for v, (seeds, ws) in plan.items() for s in seeds for w in ws}
    boot = bootstrap(args, out, samples_npz(out / 'baseline', 0.0), npz) if args.bootstrap else {}
    (results / 'tiny_experiment.json').write_text(json.dumps(dict(
        args=vars(args), rows=rows, iscs_S_k=curves, probe_acc_per_scale=probe_res, fid_bootstrap=boot,
        raw={f'{v}_s{s}': {f'{w:g}': m for w, m in r.items()} for (v, s), r in res.items()}, baseline=base), indent=1))

    n = args.n_per_class * 10
    lines = [f'Tiny preset, paired: {n} samples per row from the same labels and seeds (sample seed {args.sample_seed}); '
             f'default variant over training seeds {args.seeds}, ablations over {args.ablation_seeds}: mean ± std over '
             f'training seeds. dFID = FID(w) - FID(w=0), negative is better; judge: the CNN D never saw (it decides), '
             f'featnet: the tiny feature network, D\'s backbone.', '',
             '| run | seeds | judge FID | judge dFID | judge class acc | featnet FID | featnet dFID | IS | precision | '
             'recall | featnet class acc | ISCS |', '|' + ' --- |' * 12]
    for name, r in rows.items():
        def cell(k, f='{:.3f}'):
            if k not in r:
                return '-'
            return f.format(r[k][0]) + (' ± ' + f.replace('+', '').format(r[k][1]) if r.get('n_seeds', 1) > 1 else '')
        lines.append(f'| {name} | {r.get("n_seeds", "-")} | {cell("FID_judge", "{:.2f}")} | {cell("dFID_judge", "{:+.2f}")} | '
                     f'{cell("class_acc_judge")} | {cell("FID", "{:.2f}")} | {cell("dFID", "{:+.2f}")} | '
                     f'{cell("IS")} | {cell("precision")} | {cell("recall")} | {cell("class_acc")} | {cell("ISCS")} |')
    if boot:
        lines += ['', f'Each run alone: its FID change with the 95% interval of a paired bootstrap ({args.bootstrap} '
                      f'replicates resampling the same rows of the baseline and the run; the reference held fixed) and the '
                      f'share of replicates in which the run beats the baseline:', '',
                  '| run | seed | judge dFID | 95% interval | P(lower) | featnet dFID | 95% interval | P(lower) |',
                  '|' + ' --- |' * 8]
        for v, (seeds, ws) in plan.items():
            for w in ws:
                for s in seeds:
                    cells = []
                    for net, key in (('judge', 'FID_judge'), ('featnet', 'FID')):
                        b = boot[f'{v}_s{s}_w{w:g}'][net]
                        cells.append(f'{res[(v, s)][w][key] - base[key]:+.2f} | [{b["ci95"][0]:+.2f}, {b["ci95"][1]:+.2f}] | '
                                     f'{b["p_lower"]:.3f}')
                    lines.append(f'| {v} w={w:g} | {s} | ' + ' | '.join(cells) + ' |')
    if any(c for c in curves.values()):
        K = len(next(c for c in curves.values() if c))
        lines += ['', 'ISCS per transition (S_k = 1 / FD_k, higher = more consistent), default variant, mean over seeds:', '',
                  '| w | ' + ' | '.join(f'S_{k + 1}' for k in range(K)) + ' |', '|' + ' --- |' * (K + 1)]
        lines += [f'| {w} | ' + ' | '.join(f'{x:.2f}' for x in c) + ' |' for w, c in curves.items() if c]
    if probe_res:
        K = max(len(v) for v in probe_res.values())
        lines += ['', f'D probe (train_disc_probe.py, {args.probe_steps} steps): real/fake accuracy per scale, last 20 steps:',
                  '', '| space | ' + ' | '.join(f'scale {k}' for k in sorted(probe_res['rgb'])) + ' |', '|' + ' --- |' * (K + 1)]
        lines += [f'| {s} | ' + ' | '.join(f'{a:.3f}' for a in accs.values()) + ' |' for s, accs in probe_res.items()]
    (results / 'tiny_experiment.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
