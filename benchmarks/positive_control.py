"""Positive control: plant a known systematic error in the frozen tiny VAR, train an injector, measure what is removed.

For every planted error (models.plant_error: 'shift' moves every token feature of scales >= 1 by a fixed delta,
'logit' biases the head's logits of scales >= 1 toward one kind of code) and every arm (CE only, adversarial only,
the paper's loss), train_injector.py --plant trains an injector with the preset's defaults and 3 seeds; then
- the planted statistic's residual on 256 held-out shapes (teacher-forced, scales >= 1; 1 = untouched, 0 = removed):
    shift: |mean(w g) + delta| / |delta|, and mean(w g) split into the share of the way along -delta (1 = the
    whole correction) and the sideways part |mean(w g) orthogonal to delta| / |delta|;
    logit: |mean(guided planted VAR's logits - clean VAR's logits, centred over the vocabulary)| / |b|;
- the share of the clean-vs-planted FID gap the guided samples close, (FID_planted - FID_guided) / (FID_planted -
  FID_clean), all three from the same labels and seeds (sample.py --seed, paired), scored by evaluate.py on the
  judge (a CNN trained apart from D's backbone: the pass criterion) and on the feature network (D's backbone, beside
  it: an injector trained against D moves images along directions that network is sensitive to).
Pass (issue 25): on the shift, adversarial-only and the paper's loss each close >= 50% of the judge's gap in every
seed and leave residual <= 0.5, and the paper's loss closes at least as much as CE alone in every seed; on the logit
plant, the paper's loss closes more than CE alone in every seed. Finished runs are reused (the experiment resumes).
Writes benchmarks/results/positive_control.{md,json}.

--data self isolates D's signal from the VAR's own errors: the "real" data are 5,000 samples of the clean VAR
(so a perfect correction makes the planted VAR's samples indistinguishable from the data) and both FIDs are taken
against 2,000 other clean samples.

    python benchmarks/positive_control.py                        # the README table
    python benchmarks/positive_control.py --plants shift --arms adv --seeds 0 --steps 60    # a quick look
"""
import argparse
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import checkpoints  # noqa: E402
import data  # noqa: E402
import models  # noqa: E402
from perf import run  # noqa: E402  (benchmarks/perf.py)

ARMS = {'ce': ['--lambda_adv', '0'], 'adv': ['--lambda_rec', '0'], 'paper': []}
ARM_NAMES = {'ce': 'CE only', 'adv': 'adversarial only', 'paper': 'paper loss (adv + 0.01 CE)'}

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--plants', nargs='+', default=list(models.PLANT_STRENGTH), choices=list(models.PLANT_STRENGTH))
p.add_argument('--arms', nargs='+', default=list(ARMS), choices=list(ARMS))
p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2], help='training seeds')
p.add_argument('--steps', type=int, default=None, help='training steps (default: train_injector.py default)')
p.add_argument('--train_args', type=str, default='', help='extra train_injector.py flags for every run')
p.add_argument('--n_per_class', type=int, default=100, help='paired samples per class (10 classes)')
p.add_argument('--sample_seed', type=int, default=4321, help='sampling seed, never used for training')
p.add_argument('--jobs', type=int, default=2, help='runs in parallel (one thread each)')
p.add_argument('--data', choices=['real', 'self'], default='real', help='train on real shapes or on the clean VAR\'s samples')
p.add_argument('--out_dir', type=str, default=None, help='default: runs/positive_control[_self]')
p.add_argument('--results', type=str, default=None,
               help='writes RESULTS.md and RESULTS.json (default: benchmarks/results/positive_control[_self])')


def samples(out_dir, log, w, n_per_class, seed, flags=()):
    """sample.py's npz for w in out_dir (sampled if missing)."""
    npz = out_dir / f'samples_w{w:g}.npz'
    if not npz.is_file():
        run(['sample.py', '--w', str(w), '--num_per_class', str(n_per_class), '--seed', str(seed), '--out_dir', str(out_dir),
             *flags], log)
    return npz


def fid_of(args, out_dir, log, w, sample_flags):
    """FID (and class accuracy) of sample.py's file for w in out_dir, sampling and scoring it if needed."""
    npz = samples(out_dir, log, w, args.n_per_class, args.sample_seed, sample_flags)
    js = npz.with_suffix('.eval.json')
    if not js.is_file():
        ref = ['--ref', str(args.ref)] if args.ref else []
        run(['evaluate.py', str(npz), '--no_iscs', '--json', str(js), *ref], log)
    m = json.loads(js.read_text())['results'][0]['metrics']
    return {k: m[k] for k in ('FID_judge', 'class_acc_judge', 'FID', 'class_acc')}


@torch.no_grad()
def residual(plant, injector_path, n=256):
    """The planted statistic's residual for a trained injector (1 = untouched, 0 = removed), on held-out shapes."""
    _, clean = checkpoints.load_tiny()
    _, var = checkpoints.load_tiny()
    err = models.plant_error(var, plant)
    injector, meta = checkpoints.load_injector(injector_path, var)
    w, inject = meta['w_train'], meta['inject']
    img, labels = data.make_shapes(n, seed=77)
    img, labels = data.to_signed(torch.from_numpy(img)), torch.from_numpy(labels)
    idx = var.vae.img_to_idxBl(img)
    g_BLC = models.teacher_guidance(var, injector, idx)
    if plant == 'shift':
        wg_C = (w * g_BLC[:, var.first_l:]).mean((0, 1))
        u_C = -err / err.norm()  # the direction of the correction
        along = wg_C @ u_C
        return dict(residual=((wg_C + err).norm() / err.norm()).item(), along=(along / err.norm()).item(),
                    sideways=((wg_C - along * u_C).norm() / err.norm()).item())
    x_BLCv = var.vae.quantize.idxBl_to_var_input(idx)
    add = dict(input_add_BLC=w * g_BLC) if inject == 'input' else {}
    h_BLC, cond_BD = var.forward_hidden(labels, x_BLCv, **add)
    if inject == 'head':
        h_BLC = h_BLC + w * g_BLC
    diff_BlV = (var.get_logits(h_BLC, cond_BD) - clean(labels, x_BLCv))[:, var.first_l:]
    diff_V = (diff_BlV - diff_BlV.mean(-1, keepdim=True)).mean((0, 1))
    return dict(residual=(diff_V.norm() / err.norm()).item())


def one_run(args, plant, arm, seed, out):
    run_dir = out / plant / f'{arm}_s{seed}'
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / 'control.log'
    if not (run_dir / 'done').is_file():
        steps = ['--max_steps', str(args.steps)] if args.steps else []
        data = ['--data_path', str(args.train_npz)] if args.train_npz else []
        run(['train_injector.py', '--plant', plant, '--seed', str(seed), '--out_dir', str(run_dir), '--sample_every', '0',
             '--resume', 'auto', *data, *steps, *args.train_args.split(), *ARMS[arm]], log)
        (run_dir / 'done').touch()
    w = checkpoints.load_injector(run_dir / 'injector.safetensors', checkpoints.load_tiny()[1])[1]['w_train']
    res = dict(residual(plant, run_dir / 'injector.safetensors'), w=w)
    res.update(fid_of(args, run_dir / 'samples', log, w, ['--plant', plant, '--injector', str(run_dir / 'injector.safetensors')]))
    return res


def passes(row, arms):
    """The pass criterion of an arm (None where it has none: CE only, adversarial-only on the logit plant), read on
    the judge's gap."""
    if row['arm'] == 'ce':
        return None
    ce = arms.get('ce', {}).get('gap_closed_judge')
    if row['plant'] == 'shift':
        ok = all(c >= 0.5 for c in row['gap_closed_judge']) and all(r <= 0.5 for r in row['residual'])
        return ok and (row['arm'] != 'paper' or ce is None or all(p >= c for p, c in zip(row['gap_closed_judge'], ce)))
    if row['arm'] != 'paper' or ce is None:  # the logit plant's criterion is on the paper's loss only
        return None
    return all(p > c for p, c in zip(row['gap_closed_judge'], ce))


def fmt(vals, f='{:.2f}'):
    return ' / '.join(f.format(v) for v in vals)


def main():
    args = p.parse_args()
    suffix = '_self' if args.data == 'self' else ''
    out = Path(args.out_dir or f'runs/positive_control{suffix}')
    args.results = args.results or str(REPO / 'benchmarks' / 'results' / f'positive_control{suffix}')
    args.train_npz = args.ref = None
    if args.data == 'self':  # the clean VAR's own samples: 5,000 to train on, 2,000 as the FID reference
        out.mkdir(parents=True, exist_ok=True)
        args.train_npz = samples(out / 'data', out / 'data.log', 0, 500, 11)
        args.ref = samples(out / 'reference', out / 'data.log', 0, 200, 12)
    base = {}
    for plant in args.plants:  # the paired reference points: clean and planted VAR, no injector
        d = out / plant
        d.mkdir(parents=True, exist_ok=True)
        base[plant] = dict(clean=fid_of(args, d / 'clean', d / 'baseline.log', 0, []),
                           planted=fid_of(args, d / 'planted', d / 'baseline.log', 0, ['--plant', plant]))
    jobs = [(plant, arm, seed) for plant in args.plants for arm in args.arms for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = dict(zip(jobs, pool.map(lambda j: one_run(args, *j, out), jobs)))
    rows, lines = [], ['| planted error | arm | residual per seed | along -delta; sideways (of abs(delta)) | judge FID per seed '
                       '| judge gap closed | featnet FID per seed | featnet gap closed | passes |', '|' + ' --- |' * 9]
    for plant in args.plants:
        b0, gap = base[plant], {}
        for key in ('FID_judge', 'FID'):
            c0, c1 = b0['clean'][key], b0['planted'][key]
            gap[key] = lambda f, c0=c0, c1=c1: (c1 - f) / (c1 - c0)
        for arm in args.arms:
            rs = [runs[(plant, arm, s)] for s in args.seeds]
            row = dict(plant=plant, arm=arm, seeds=args.seeds, w=rs[0]['w'], baseline=b0,
                       **{k: [r[k] for r in rs] for k in rs[0] if k != 'w'})
            row['gap_closed_judge'] = [gap['FID_judge'](f) for f in row['FID_judge']]
            row['gap_closed_featnet'] = [gap['FID'](f) for f in row['FID']]
            rows.append(row)
        for row in rows[-len(args.arms):]:
            row['passes'] = passes(row, {r['arm']: r for r in rows[-len(args.arms):]})
            split = f'{fmt(row["along"])}; {fmt(row["sideways"])}' if 'along' in row else '-'
            lines.append('| ' + ' | '.join([
                f'{plant} (judge {b0["clean"]["FID_judge"]:.1f} clean, {b0["planted"]["FID_judge"]:.1f} planted; featnet '
                f'{b0["clean"]["FID"]:.1f} / {b0["planted"]["FID"]:.1f})', ARM_NAMES[row['arm']],
                f'{fmt(row["residual"])} (mean {statistics.mean(row["residual"]):.2f})', split,
                fmt(row['FID_judge'], '{:.1f}'), fmt(row['gap_closed_judge'], '{:.0%}'), fmt(row['FID'], '{:.1f}'),
                fmt(row['gap_closed_featnet'], '{:.0%}'), {None: '-', True: 'yes', False: 'no'}[row['passes']]]) + ' |')
    table = '\n'.join(lines)
    print(table)
    res = Path(args.results)
    res.parent.mkdir(parents=True, exist_ok=True)
    header = (f'Positive control (`python benchmarks/{Path(__file__).name} {" ".join(sys.argv[1:])}`): data {args.data}, '
              f'seeds {args.seeds}, {10 * args.n_per_class} paired samples (seed {args.sample_seed}), extra flags '
              f'`{args.train_args or "none"}`.\n\n')
    data.atomic_save(header + table + '\n', res.with_suffix('.md'))
    data.atomic_save(json.dumps(dict(args=vars(args), rows=rows),
                                  indent=1, default=str) + '\n', res.with_suffix('.json'))


if __name__ == '__main__':
    main()
