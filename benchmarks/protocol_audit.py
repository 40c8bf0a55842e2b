"""Protocol audit: how large the protocol differences behind a reported FID are, next to a method's gain (tiny preset).

Every row is a FID change on two networks: the judge (a CNN D never saw: it decides) and the tiny feature network
(D's backbone), against --ref_n held-out shapes (seed 1000, as evaluate.py), with a 95% bootstrap interval:
1. more_smooth: the same w = 0 VAR, labels and seeds, sample.py --more_smooth on vs off (paired bootstrap). The
   authors' release samples with it always on; VAR's evaluation protocol has it off.
2. sample count: FID of disjoint class-balanced subsets of --n_small samples vs FID of the whole file, from the same
   w = 0 files: the bias of FID with N (the release's 10,000 vs the protocol's 50,000 is the same 1 : 5).
3. seed-to-seed: the w = 0 VAR at each of --seeds against the first (unpaired bootstrap: nothing shared), the
   difference an unpaired comparison shows with no method at all.
4. an injector that never trained (the release's situation: no gradient reaches it) at the release's w (--release_w,
   its hard-coded 0.001): the zero output layer this project initialises (token-identical samples), and the
   release's own case: a random output whose every guidance token has RMS 0.5 (its final LayerNorm's weight), paired
   with the w = 0 file.
5. the trained injector (--injector, the shipped one) at its validated w and at its training w, paired.
Paired rows share the labels and seeds of the w = 0 file at the first seed (checked, in the json's `paired_check`).
Finished npz files are reused, so an interrupted audit resumes. Writes benchmarks/results/protocol_audit.{md,json}.

    python benchmarks/protocol_audit.py                             # the docs/claims.md table (~15 min on 2 cores)
    python benchmarks/protocol_audit.py --n_per_class 4 --n_small 20 --ref_n 200 --bootstrap 20   # seconds
"""
import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import checkpoints  # noqa: E402
import data  # noqa: E402
import features  # noqa: E402
import iscs  # noqa: E402
import models  # noqa: E402
from perf import run  # noqa: E402  (benchmarks/perf.py)

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--n_per_class', type=int, default=200, help='samples per class (10 classes) of every file')
p.add_argument('--n_small', type=int, default=400, help='the small sample count of row 2 (a multiple of 10)')
p.add_argument('--seeds', type=int, nargs='+', default=[1234, 2345, 3456],
               help='sampling seeds of the w = 0 VAR; the first is the one every paired row shares')
p.add_argument('--release_w', type=float, default=0.001, help="the authors' release's hard-coded guidance weight")
p.add_argument('--injector', type=str, default=str(checkpoints.tiny_file('injector')), help='the trained injector of row 5')
p.add_argument('--ref_n', type=int, default=10000, help='held-out reference shapes (seed 1000)')
p.add_argument('--bootstrap', type=int, default=1000, help='bootstrap replicates of every interval')
p.add_argument('--jobs', type=int, default=2, help='sample.py runs in parallel (one thread each)')
p.add_argument('--out_dir', type=str, default='runs/protocol_audit')
p.add_argument('--results', type=str, default=str(REPO / 'benchmarks' / 'results'))
NETS = (('judge', 'FID_judge'), ('featnet', 'FID'))


def sample(out_dir, w, seed, n_per_class, flags=()):
    """sample.py's npz for w in out_dir (sampled if missing)."""
    npz = out_dir / f'samples_w{w:g}.npz'
    if not npz.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        run(['sample.py', '--w', str(w), '--num_per_class', str(n_per_class), '--seed', str(seed),
             '--out_dir', str(out_dir), *flags], out_dir / 'audit.log')
    return npz


@torch.no_grad()
def untrained_injector(path, trained_meta, w, random_out: bool):
    """An injector that never received a gradient, in the shipped injector's settings at w: the zero output layer of
    models.GuidanceInjector's init, or (random_out) the release's situation: a random output layer (PyTorch's default
    Linear init) scaled so that every guidance token has RMS 0.5, as the release's final LayerNorm (weight 0.5) gives."""
    torch.manual_seed(0)
    injector = models.GuidanceInjector(trained_meta['embed_dim'], trained_meta['patch_nums'],
                                       broadcast=trained_meta.get('broadcast', False))
    if random_out:
        injector.proj_out.reset_parameters()
        _, var = checkpoints.load_tiny()
        img, _ = data.make_shapes(64, seed=77)
        g_BLC = models.teacher_guidance(var, injector.eval(), var.vae.img_to_idxBl(data.to_signed(torch.from_numpy(img))))
        scale = 0.5 / g_BLC[:, var.first_l:].square().mean(-1).sqrt().mean()
        injector.proj_out.weight.mul_(scale)
        injector.proj_out.bias.mul_(scale)
    meta = {k: v for k, v in trained_meta.items() if k not in ('validation', 'embed_dim', 'patch_nums', 'broadcast')}
    checkpoints.save_injector(path, injector, dict(meta, w_train=w, step=0))
    return path


def subset_fids(feats_ND, labels_N, n_small, mu, sigma):
    """FIDs of the disjoint class-balanced subsets of n_small rows (n_small / 10 per class, in file order)."""
    per = n_small // 10
    rows_C = [np.flatnonzero(labels_N == c) for c in range(10)]
    k = min(len(r) for r in rows_C) // per
    return [iscs.frechet_distance(*iscs.feature_stats(feats_ND[np.concatenate([r[j * per:(j + 1) * per] for r in rows_C])]),
                                  mu, sigma) for j in range(k)]


def main():
    args = p.parse_args()
    if args.n_small % 10 or not 10 <= args.n_small < 10 * args.n_per_class:
        raise SystemExit(f'--n_small must be a multiple of 10 below the file size {10 * args.n_per_class}, got {args.n_small}')
    out = REPO / args.out_dir
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    trained_meta = checkpoints.read_injector_meta(args.injector)
    val = trained_meta.get('validation') or {}
    s0 = args.seeds[0]
    (out / 'injectors').mkdir(parents=True, exist_ok=True)
    inj_zero = untrained_injector(out / 'injectors' / 'zero.safetensors', trained_meta, args.release_w, False)
    inj_rand = untrained_injector(out / 'injectors' / 'random.safetensors', trained_meta, args.release_w, True)
    n = args.n_per_class
    jobs = {f'w0_seed{s}': (out / f'w0_seed{s}', 0.0, s, ()) for s in args.seeds}
    jobs.update({
        'more_smooth': (out / 'more_smooth', 0.0, s0, ('--more_smooth',)),
        'untrained_zero': (out / 'untrained_zero', args.release_w, s0, ('--injector', str(inj_zero))),
        'untrained_random': (out / 'untrained_random', args.release_w, s0, ('--injector', str(inj_rand))),
        'trained_w_train': (out / 'trained', trained_meta['w_train'], s0, ('--injector', args.injector)),
    })
    if val.get('validated_w') not in (None, 0.0, trained_meta['w_train']):  # 0: the w = 0 file itself; w_train: above
        jobs['trained_validated'] = (out / 'trained_validated', val['validated_w'], s0, ('--injector', args.injector))
    with ThreadPoolExecutor(args.jobs) as ex:
        npz = dict(zip(jobs, ex.map(lambda j: sample(j[0], j[1], j[2], n, j[3]), jobs.values())))
    t_sample = time.time() - t0

    smp = {k: data.load_samples(f) for k, f in npz.items()}
    base = smp[f'w0_seed{s0}']
    paired_keys = [k for k in jobs if jobs[k][2] == s0 and k != f'w0_seed{s0}']
    paired_check = {k: bool(np.array_equal(smp[k]['labels'], base['labels']) and smp[k]['meta']['seed'] == base['meta']['seed'])
                    for k in paired_keys}
    if not all(paired_check.values()):
        raise SystemExit(f'paired rows do not share the labels and seeds of the w = 0 file: {paired_check}')
    ref = data.load_reference('shapes', base['images'].shape[1], args.ref_n)
    feats, ref_stats = {}, {}
    for name, _ in NETS:
        net = checkpoints.load_eval_net(name)
        ref_stats[name] = iscs.feature_stats(features.extract(name, ref['images'], net, desc=f'reference ({name})')[0])
        feats[name] = {k: features.extract(name, s['images'], net, desc=f'{k} ({name})')[0] for k, s in smp.items()}
    fid = {name: {k: iscs.frechet_distance(*iscs.feature_stats(f), *ref_stats[name]) for k, f in fs.items()}
           for name, fs in feats.items()}

    def change(key, against, paired):
        """FID(key) - FID(against) on both networks, with its bootstrap interval."""
        row = {}
        for name, _ in NETS:
            b = iscs.paired_fid_bootstrap([feats[name][against], feats[name][key]], *ref_stats[name], args.bootstrap,
                                          paired=paired)[0]
            row[name] = dict(FID=fid[name][key], change=fid[name][key] - fid[name][against], ci95=b['ci95'],
                             p_lower=b['p_lower'])
        return row

    rows = {'more_smooth on vs off (w = 0, paired)': change('more_smooth', f'w0_seed{s0}', True)}
    size = {}
    for name, _ in NETS:
        small = [f for s in args.seeds for f in subset_fids(feats[name][f'w0_seed{s}'], smp[f'w0_seed{s}']['labels'],
                                                            args.n_small, *ref_stats[name])]
        full = [fid[name][f'w0_seed{s}'] for s in args.seeds]
        size[name] = dict(small=small, full=full, bias=statistics.mean(small) - statistics.mean(full),
                          small_std=statistics.stdev(small) if len(small) > 1 else 0.0)
    for s in args.seeds[1:]:
        rows[f'seed {s} vs seed {s0} (w = 0, unpaired)'] = change(f'w0_seed{s}', f'w0_seed{s0}', False)
    rows[f'untrained injector, zero output layer, w = {args.release_w:g} (paired)'] = change('untrained_zero', f'w0_seed{s0}', True)
    rows[f'untrained injector, random output (RMS 0.5, the release\'s), w = {args.release_w:g} (paired)'] = change('untrained_random', f'w0_seed{s0}', True)
    if 'trained_validated' in jobs:
        rows[f'trained injector at its validated w = {val["validated_w"]:g} (paired)'] = change('trained_validated', f'w0_seed{s0}', True)
    rows[f'trained injector at its training w = {trained_meta["w_train"]:g} (paired)'] = change('trained_w_train', f'w0_seed{s0}', True)
    identical = bool(np.array_equal(smp['untrained_zero']['tokens'], base['tokens']))
    wall = time.time() - t0
    (results / 'protocol_audit.json').write_text(json.dumps(dict(
        args=vars(args), rows=rows, sample_count=size, fid=fid, paired_check=paired_check,
        untrained_zero_tokens_identical=identical, trained_validation=val, npz={k: str(f.relative_to(REPO) if f.is_relative_to(REPO) else f) for k, f in npz.items()},
        cost=dict(wall_s=wall, sampling_s=t_sample)), indent=1))

    N = 10 * n
    lines = [f'Tiny preset, {N} samples per file (w = 0 VAR at sample seeds {args.seeds}; paired rows share the labels '
             f'and seeds of seed {s0}); FID against {args.ref_n} held-out shapes; judge: the CNN D never saw, featnet: '
             f'D\'s backbone. Change = FID(row) - FID(w = 0, seed {s0}); 95% bootstrap interval ({args.bootstrap} '
             f'replicates; paired rows resample the same rows in both files, unpaired ones each file on its own).', '',
             '| row | judge FID | judge change | 95% interval | featnet FID | featnet change | 95% interval |',
             '|' + ' --- |' * 7, f'| w = 0, seed {s0} (the baseline) | {fid["judge"][f"w0_seed{s0}"]:.2f} | - | - | '
             f'{fid["featnet"][f"w0_seed{s0}"]:.2f} | - | - |']
    for name, r in rows.items():
        lines.append(f'| {name} | ' + ' | '.join(f'{r[k]["FID"]:.2f} | {r[k]["change"]:+.2f} | [{r[k]["ci95"][0]:+.2f}, '
                                                  f'{r[k]["ci95"][1]:+.2f}]' for k, _ in NETS) + ' |')
    lines += ['', f'FID with the sample count (same w = 0 files, seeds {args.seeds}): {args.n_small} samples '
                  f'({len(size["judge"]["small"])} disjoint class-balanced subsets) vs all {N}:', '',
              f'| network | FID at {args.n_small} (mean ± std) | FID at {N} (mean) | bias |', '|' + ' --- |' * 4]
    lines += [f'| {k} | {statistics.mean(v["small"]):.2f} ± {v["small_std"]:.2f} | {statistics.mean(v["full"]):.2f} | '
              f'{v["bias"]:+.2f} |' for k, v in size.items()]
    lines += ['', f'The zero-output untrained injector gives token-identical samples: {identical}. The trained injector\'s '
                  f'own validation: {val.get("verdict", "none")} (validated w = {val.get("validated_w", "-")}'
                  f'{"; a validated w of 0 is the baseline file itself" if not val.get("validated_w") else ""}).',
              f'Cost: {wall:.0f} s wall ({t_sample:.0f} s sampling, {args.jobs} jobs of one thread).']
    (results / 'protocol_audit.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
