"""Can the discriminator see the fakes AID-VAR trains it on? (tiny preset, D alone, no injector)

train_injector.py's fakes are the ground-truth prefix plus the frozen VAR's relaxed (soft) scale k, decoded to RGB;
its reals are the same decode of the ground-truth tokens (hard), or with scale k soft-decoded at the VAR's entropy
(--real_decode soft, paper §3.2). This builds --n such pairs from training shapes (one
random k >= 1 per image), trains D's heads alone on all but --n_eval pairs, and scores the held-out pairs by how often
D rates a real above its own fake (pair accuracy; chance 0.5). It does so for the StyleGAN-T D and with its ghost
batch norm and / or DiffAugment switched off (train_injector.py --disc_norm / --disc_aug), every variant from the same
initial heads and batches. With soft reals the fake and the real differ only in how scale k is made soft (the VAR's
softmax vs the quantizer's distances): pair accuracy well above chance there, and not with sampled tokens against hard
reals, means D separates them by the decode route, not by the VAR's errors. Also reported: the pixel MSE between
fake and real per scale, and the same D on sampled (hard) instead of soft tokens at scale k (the tiny defaults'
fakes, train_injector.py --decode st_gumbel).

    python benchmarks/disc_teacher_fakes.py          # ~10 minutes on 2 cores -> benchmarks/results/disc_teacher_fakes.md
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import checkpoints  # noqa: E402
import data  # noqa: E402
import models  # noqa: E402
import soft_decode  # noqa: E402

# (name, fakes, reals, disc_norm, disc_aug)
VARIANTS = [('StyleGAN-T D (default)', 'soft', 'real', 'bn', 'diffaug'),
            ('sampled tokens at scale k', 'hard', 'real', 'bn', 'diffaug'),
            ('sampled tokens, none / none (the tiny defaults)', 'hard', 'real', 'none', 'none'),
            ('--disc_aug none', 'soft', 'real', 'bn', 'none'), ('--disc_norm none', 'soft', 'real', 'none', 'diffaug'),
            ('--disc_norm none --disc_aug none', 'soft', 'real', 'none', 'none'),
            ('none / none, soft reals (paper §3.2)', 'soft', 'real_soft', 'none', 'none')]
REALS = dict(real='hard', real_soft='soft')

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--n', type=int, default=2000, help='pairs in all')
p.add_argument('--n_eval', type=int, default=400, help='held-out pairs (a multiple of 80)')
p.add_argument('--steps', type=int, default=250, help="D steps (train_injector.py's tiny default: 250)")
p.add_argument('--batch_size', type=int, default=16)
p.add_argument('--lr_d', type=float, default=2e-3)
p.add_argument('--seed', type=int, default=0)
p.add_argument('--out', type=str, default=str(REPO / 'benchmarks' / 'results' / 'disc_teacher_fakes.md'))


@torch.no_grad()
def make_pairs(vae, var, n, seed):
    """n training shapes -> real (hard), real_soft, soft fake, hard fake (n, 3, 32, 32) in [-1, 1], labels (n,),
    scale k (n,).

    Built by train_injector.py's own soft_decode.disc_images; the hard fakes take tokens sampled from the VAR's
    scale-k distribution, fed as one-hot logits through the 'st' relaxation (whose forward value is the one-hot).
    """
    ds = data.build_train_data(None, n_tiny=n)
    g = torch.Generator().manual_seed(seed)
    out = {key: [] for key in ('real', 'real_soft', 'soft', 'hard', 'label', 'k')}
    img0, lab0 = data.to_signed(ds.images_NHW3[:64]), ds.labels[:64]  # train_injector.real_temperatures' recipe
    temps = soft_decode.matched_real_temperatures(var, img0, lab0, 1.0)
    for i in range(0, n, 100):
        img, lab = data.to_signed(ds.images_NHW3[i:i + 100]), ds.labels[i:i + 100]
        gt = vae.img_to_idxBl(img)
        h, cond = var.forward_hidden(lab, vae.quantize.idxBl_to_var_input(gt))
        logits_BLV = var.get_logits(h, cond)
        ks = torch.randint(1, len(var.patch_nums), (len(lab),), generator=g)
        sampled_BL = torch.multinomial(logits_BLV.softmax(-1).flatten(0, 1), 1, generator=g).view(logits_BLV.shape[:2])
        real_probs = soft_decode.real_soft_labels(vae, img, temps)[0]
        soft, real_soft, labels = soft_decode.disc_images(var, logits_BLV, gt, gt, lab, ks, 'soft', 1.0, real_probs)
        hard, real, _ = soft_decode.disc_images(var, soft_decode.one_hot(sampled_BL, var.V), gt, gt, lab, ks, 'st', 1.0)
        for key, v in (('real', real), ('real_soft', real_soft), ('soft', soft), ('hard', hard), ('label', labels),
                       ('k', ks.sort(stable=True).values)):  # disc_images groups the samples by k
            out[key].append(v)
    return {key: torch.cat(v) for key, v in out.items()}


def pair_accuracy(D, real, fake, labels, chunk=80):
    """Share of pairs with D(real) > D(fake) (mean logit), one D call per side and chunk as in training."""
    with torch.no_grad():
        r = torch.cat([D(real[i:i + chunk], labels[i:i + chunk]).mean(1) for i in range(0, len(real), chunk)])
        f = torch.cat([D(fake[i:i + chunk], labels[i:i + chunk]).mean(1) for i in range(0, len(real), chunk)])
    return r > f


def train_and_score(args, pairs, fakes, reals, norm, aug, featnet):
    torch.manual_seed(args.seed)  # the same initial heads for every variant
    D = models.ProjectedDiscriminator(featnet, num_classes=10, norm=norm, diffaug=aug == 'diffaug')
    opt = torch.optim.AdamW(D.head_parameters(), lr=args.lr_d, betas=(0.9, 0.999), weight_decay=1e-5)
    n_train = len(pairs['label']) - args.n_eval
    batches = torch.Generator().manual_seed(args.seed)
    D.train()
    for _ in range(args.steps):
        j = torch.randint(0, n_train, (args.batch_size,), generator=batches)
        loss = F.relu(1 - D(pairs[reals][j], pairs['label'][j])).mean() + \
            F.relu(1 + D(pairs[fakes][j], pairs['label'][j])).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(D.head_parameters()), 0.5)  # as train_injector.py
        opt.step()
    D.eval()
    held = slice(n_train, None)
    return pair_accuracy(D, pairs[reals][held], pairs[fakes][held], pairs['label'][held])


def main():
    args = p.parse_args()
    if args.n_eval % 80 or args.n_eval >= args.n:
        raise SystemExit(f'--n_eval must be a multiple of 80 and smaller than --n ({args.n_eval}, {args.n})')
    vae, var = checkpoints.load_tiny()
    featnet = checkpoints.load_eval_net('featnet')
    t0 = time.perf_counter()
    pairs = make_pairs(vae, var, args.n, args.seed)
    print(f'[D teacher fakes] {args.n} pairs in {time.perf_counter() - t0:.0f} s')
    K = len(var.patch_nums)
    k_eval = pairs['k'][args.n - args.n_eval:]
    lines = [f'D alone on the fakes of train_injector.py (ground-truth prefix + the frozen tiny VAR\'s relaxed scale k), '
             f'{args.n - args.n_eval} training pairs, {args.steps} steps of batch {args.batch_size}, lr {args.lr_d}; '
             f'pair accuracy (real rated above its own fake) on {args.n_eval} held-out pairs, chance 0.5.', '',
             'Pixel MSE between fake and real (images in [-1, 1]):', '',
             '| fakes | reals | ' + ' | '.join(f'k={k}' for k in range(1, K)) + ' |', '|' + ' --- |' * (K + 1)]
    for fakes, reals in (('soft', 'real'), ('hard', 'real'), ('soft', 'real_soft')):
        mse = [(pairs[fakes] - pairs[reals])[pairs['k'] == k].square().mean().item() for k in range(1, K)]
        lines.append(f'| {fakes} | {REALS[reals]} | ' + ' | '.join(f'{m:.4f}' for m in mse) + ' |')
    lines += ['', '| D | fakes | reals | pair accuracy | ' + ' | '.join(f'k={k}' for k in range(1, K)) + ' |',
              '|' + ' --- |' * (K + 3)]
    for name, fakes, reals, norm, aug in VARIANTS:
        t0 = time.perf_counter()
        ok = train_and_score(args, pairs, fakes, reals, norm, aug, featnet)
        per_k = [ok[k_eval == k].float().mean().item() for k in range(1, K)]
        lines.append(f'| {name} | {fakes} | {REALS[reals]} | {ok.float().mean().item():.3f} | '
                     + ' | '.join(f'{a:.2f}' for a in per_k) + ' |')
        print(lines[-1], f'({time.perf_counter() - t0:.0f} s)', flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
