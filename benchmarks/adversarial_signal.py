"""What D's gradient tells the injector on the planted shift, per generator estimator, and why the two FID networks
disagree about it.

D's heads are trained by train_injector.py on the planted-shift VAR's fakes with the injector held at zero (--lr_g 0,
adversarial only), then frozen. Part 1, per estimator (soft_decode.relax modes, --g_draws): the descent direction
v = -d(-mean D(fake)) / d(g), averaged over the tokens of scales >= 1, for batches of held-out shapes (the injector's
shared output receives this): its cosine with the correction -delta per batch and of the mean over batches, the
consistency |mean v| / mean |v| over batches (1: every batch agrees), the variance of v over repeated draws on one
fixed batch relative to one straight-through Gumbel draw's, and the seconds per estimate. The CE term's gradient is
the reference row. Part 2: planted-VAR samples nudged along D's input gradient (and along random directions of the
same norm): the FID change on the feature network (D's backbone) and on the judge (a CNN D never saw).

    python benchmarks/adversarial_signal.py            # about 10 min on one core
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import checkpoints  # noqa: E402
import data  # noqa: E402
import features  # noqa: E402
import iscs  # noqa: E402
import models  # noqa: E402
import soft_decode  # noqa: E402
from perf import run  # noqa: E402  (benchmarks/perf.py)

ESTIMATORS = {'st_gumbel': ('st_gumbel', 1), 'st_gumbel x4': ('st_gumbel', 4), 'rao': ('rao', 1), 'rao x4': ('rao', 4),
              'reinmax': ('reinmax', 1), 'soft (paper)': ('soft', 1)}

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--d_steps', type=int, default=100, help='D steps on planted-shift fakes before the measurement')
p.add_argument('--batches', type=int, default=12, help='batches of 16 held-out shapes')
p.add_argument('--repeats', type=int, default=8, help='draws on one fixed batch for the variance')
p.add_argument('--rao_k', type=int, default=16)
p.add_argument('--train_args', type=str, default='', help="extra train_injector.py flags of D's training (e.g. --r1_gamma 0.2)")
p.add_argument('--estimators', nargs='+', default=list(ESTIMATORS), choices=list(ESTIMATORS))
p.add_argument('--nudge_n', type=int, default=1000, help='planted-VAR samples nudged in part 2')
p.add_argument('--out_dir', type=str, default='runs/adversarial_signal')
p.add_argument('--results', type=str, default=str(REPO / 'benchmarks' / 'results' / 'adversarial_signal'))


def trained_disc(args, out):
    """The projected D of the tiny preset with heads trained --d_steps on planted-shift fakes (injector at zero)."""
    d_dir = out / 'disc'
    if not (d_dir / 'last.pt').is_file():
        run(['train_injector.py', '--plant', 'shift', '--lambda_rec', '0', '--lr_g', '0', '--max_steps', str(args.d_steps),
             '--val_n', '0', '--sample_every', '0', '--out_dir', str(d_dir), *args.train_args.split()], out / 'disc.log')
    preset = models.PRESETS['tiny']
    D = models.ProjectedDiscriminator(checkpoints.load_eval_net('featnet'), num_classes=preset['num_classes'],
                                      norm=preset['disc_norm'], diffaug=preset['disc_aug'])
    D.load_heads_state_dict(checkpoints.torch_load(d_dir / 'last.pt')['disc_heads'])
    return D.eval().requires_grad_(False)


def cos(a, b):
    return F.cosine_similarity(a, b, dim=0).item()


def estimator_table(args, var, D, delta, batches):
    w, SN, rows = models.PRESETS['tiny']['w_train'], len(var.patch_nums), {}
    u = -delta / delta.norm()

    def direction(name, labels, idx, b, draw=0):
        scales = torch.randint(1, SN, (len(labels),), generator=torch.Generator().manual_seed(b))  # per batch
        torch.manual_seed(1000 * b + draw)  # the estimator's own noise
        if name == 'CE (reference)':
            loss = lambda logits: F.cross_entropy(logits.reshape(-1, var.V), torch.cat(idx, 1).reshape(-1))
        else:
            decode, draws = ESTIMATORS[name]
            loss = lambda logits: -D(*soft_decode.disc_fakes(var, logits, idx, labels, scales, decode, 1.0, draws,
                                                             args.rao_k)).mean()
        grad = soft_decode.guidance_gradient(var, labels, idx, w, loss)
        return -grad[:, var.first_l:].mean((0, 1))

    for name in ['CE (reference)', *args.estimators]:
        t0 = time.perf_counter()
        v_bC = torch.stack([direction(name, lab, idx, b) for b, (lab, idx) in enumerate(batches)])
        sec = (time.perf_counter() - t0) / len(batches)
        lab, idx = batches[0]
        r_rC = torch.stack([direction(name, lab, idx, 0, 1 + r) for r in range(args.repeats)])
        rel_var = (r_rC - r_rC.mean(0)).square().sum(1).mean().item() / r_rC.mean(0).square().sum().item()
        per_batch = [cos(v, u) for v in v_bC]
        rows[name] = dict(cos_per_batch_mean=statistics.mean(per_batch), cos_per_batch_min=min(per_batch),
                          cos_per_batch_max=max(per_batch), cos_of_mean=cos(v_bC.mean(0), u),
                          consistency=(v_bC.mean(0).norm() / v_bC.norm(dim=1).mean()).item(),
                          var_fixed_batch=(r_rC - r_rC.mean(0)).square().sum(1).mean().item(), rel_var_fixed_batch=rel_var,
                          s_per_estimate=sec)
        print(name, {k: round(v, 4) for k, v in rows[name].items()})
    base = rows['st_gumbel']['var_fixed_batch'] if 'st_gumbel' in rows else float('nan')
    for r in rows.values():
        r['var_ratio_to_st_gumbel'] = r['var_fixed_batch'] / base
    return rows


def nudge_table(args, var, D):
    """FIDs (feature network, judge) of planted-VAR samples moved by eps along D's input gradient or a random direction."""
    labels_N = torch.arange(args.nudge_n) % var.num_classes
    with torch.no_grad():
        x_N3HW = torch.cat([var.autoregressive_infer_cfg(len(lab), lab, g_seed=7 + i, cfg=1.5).mul(2).sub(1)
                            for i, lab in enumerate(labels_N.split(250))])
    grads = []
    for x, lab in zip(x_N3HW.split(250), labels_N.split(250)):
        x = x.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(D(x, lab).mean(1).sum(), x)[0])
    g_N3HW = torch.cat(grads)
    g_N3HW = g_N3HW / g_N3HW.flatten(1).norm(dim=1)[:, None, None, None]
    r_N3HW = torch.randn(x_N3HW.shape, generator=torch.Generator().manual_seed(0))
    r_N3HW = r_N3HW / r_N3HW.flatten(1).norm(dim=1)[:, None, None, None]
    ref, _ = data.make_shapes(10000, seed=data.REF_SHAPES_SEED)
    featnet, judge = checkpoints.load_eval_net('featnet'), checkpoints.load_eval_net('judge')
    nets = dict(featnet=lambda u8: features.featnet_features(u8, featnet, progress=False)[0],
                judge=lambda u8: features.judge_features(u8, judge, progress=False)[0])
    ref_stats = {k: iscs.feature_stats(f(ref)) for k, f in nets.items()}
    rows = []
    for kind, d_N3HW in (('D gradient', g_N3HW), ('random', r_N3HW)):
        for eps in (0.0, 1.0, 2.0, 4.0):
            x = (x_N3HW + eps * d_N3HW).clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            with torch.no_grad():
                score = torch.cat([D(data.to_signed(torch.from_numpy(c)), lab).mean(1)
                                   for c, lab in zip(np.array_split(x, 4), labels_N.split(250))]).mean().item()
            fids = {k: iscs.frechet_distance(*iscs.feature_stats(f(x)), *ref_stats[k]) for k, f in nets.items()}
            rows.append(dict(direction=kind, eps=eps, D_score=score, **{f'FID_{k}': v for k, v in fids.items()}))
            print(rows[-1])
    return rows


def main():
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    D = trained_disc(args, out)
    _, var = checkpoints.load_tiny()
    delta = models.plant_error(var, 'shift')
    img, lab = data.make_shapes(16 * args.batches, seed=77)
    img, lab = data.to_signed(torch.from_numpy(img)), torch.from_numpy(lab)
    with torch.no_grad():
        batches = [(lab[i:i + 16], var.vae.img_to_idxBl(img[i:i + 16])) for i in range(0, len(lab), 16)]
    est = estimator_table(args, var, D, delta, batches)
    nudge = nudge_table(args, var, D) if args.nudge_n else []
    lines = [f'`python benchmarks/{Path(__file__).name} {" ".join(sys.argv[1:])}`: D trained {args.d_steps} steps on '
             f'planted-shift fakes (extra flags `{args.train_args or "none"}`); {args.batches} batches of 16 held-out shapes; variance over {args.repeats} draws on '
             f'one batch; {(time.time() - t0) / 60:.1f} min on one core.', '',
             '| estimator | cos(v, -delta) per batch: mean [min, max] | cos of the mean | consistency | variance on one '
             'batch vs st_gumbel | s / estimate |', '|' + ' --- |' * 6]
    for name, r in est.items():
        lines.append(f'| {name} | {r["cos_per_batch_mean"]:.3f} [{r["cos_per_batch_min"]:.2f}, {r["cos_per_batch_max"]:.2f}] | '
                     f'{r["cos_of_mean"]:.3f} | {r["consistency"]:.3f} | {r["var_ratio_to_st_gumbel"]:.3f} | '
                     f'{r["s_per_estimate"]:.2f} |')
    lines += [] if not nudge else ['', f'{args.nudge_n} planted-VAR samples (cfg 1.5) moved by eps (L2 norm per image, pixels in [-1, 1]):', '',
              '| direction | eps | D score | featnet FID (D\'s backbone) | judge FID |', '|' + ' --- |' * 5]
    lines += [f'| {r["direction"]} | {r["eps"]:g} | {r["D_score"]:.3f} | {r["FID_featnet"]:.2f} | {r["FID_judge"]:.2f} |'
              for r in nudge]
    res = Path(args.results)
    data.atomic_save('\n'.join(lines) + '\n', res.with_suffix('.md'))
    data.atomic_save(json.dumps(dict(args=vars(args), estimators=est, nudge=nudge), indent=1) + '\n', res.with_suffix('.json'))
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
