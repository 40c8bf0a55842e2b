"""Discriminator probe (paper App. C, Figure 10): can D tell real from frozen-VAR images, scale by scale?

D alone (no injector), real vs frozen-VAR samples, on the cumulative image of scales 0..k at every scale k:
--space rgb the projected discriminator AID-VAR trains against, --space latent spectral-norm heads on the VQ-VAE's
f_hat (the collapse case of App. C). Writes a per-step, per-scale CSV (acc_real, acc_fake, loss_D), its plot, and
the D heads (--space rgb: usable as `train_injector.py --disc_ckpt`).

    python train_disc_probe.py --space rgb   &&   python train_disc_probe.py --space latent     # tiny preset
    python train_disc_probe.py --depth 16 --data_path /data/imagenet --space rgb       # real models (one GPU)
"""
import argparse
import csv
import math
from pathlib import Path

import torch
import torch.nn as nn

import checkpoints
import data
import models

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--depth', type=int, default=None, help='16/20/24/30: official VAR-d{depth}; default: tiny preset')
p.add_argument('--data_path', type=str, default=None, help='ImageNet root with train/ (real models only)')
p.add_argument('--ckpt_dir', type=str, default='checkpoints', help='folder of the official VAR / VQ-VAE checkpoints (real models)')
p.add_argument('--dino_ckpt', type=str, default=None, help='local DINO ViT-S/16 weights (else the HF hub cache)')
p.add_argument('--random_init', action='store_true', help='random weights (tests)')
p.add_argument('--space', choices=['rgb', 'latent'], default='rgb',
               help='D on soft-decoded RGB (the projected D of AID-VAR) or directly on the VQ-VAE latent f_hat')
p.add_argument('--steps', type=int, default=200, help='D steps')
p.add_argument('--batch_size', type=int, default=16, help='real and fake images per step (each)')
p.add_argument('--lr_d', type=float, default=2e-3, help='D learning rate (AdamW)')
p.add_argument('--disc_norm', choices=list(models.DISC_NORMS), default=None, help="D heads' norm")
p.add_argument('--disc_aug', choices=list(models.DISC_AUGS), default=None, help='DiffAugment in D')
p.add_argument('--cfg', type=float, default=1.5, help='CFG of the frozen-VAR samples')
p.add_argument('--top_k', type=int, default=None, help='top-k of the frozen-VAR samples (0: off)')
p.add_argument('--top_p', type=float, default=None, help='top-p of the frozen-VAR samples (0: off)')
p.add_argument('--out_dir', type=str, default='runs/disc_probe', help='CSV, plot and D heads go here')
p.add_argument('--overwrite', action='store_true', help="replace an earlier probe's files of the same --space in out_dir")
p.add_argument('--seed', type=int, default=0, help='weights, data order and samples')
p.add_argument('--n_tiny', type=int, default=20000, help='tiny preset: number of training shapes')
models.show_defaults(p)  # flags left at None take models.PRESETS' value (main)


class LatentDiscriminator(nn.Module):
    """Class-conditional spectral-norm heads on f_hat (B, Cvae, h, w) seen as a token sequence: (B, h*w) logits."""

    def __init__(self, Cvae, num_classes, channels=256, norm='bn'):
        super().__init__()
        self.proj = models.SpectralConv1d(Cvae, channels, kernel_size=1)
        self.head = models.DiscHead(channels, num_classes, norm=norm)

    def forward(self, f_hat_BChw, labels_B):
        return self.head(self.proj(f_hat_BChw.flatten(2)), labels_B)


def scale_inputs(vae, idx_Bl, space):
    """Tokens per scale -> the cumulative RGB images (space rgb) or latents f_hat (space latent), one per scale."""
    h_ls = vae.idxBl_to_h(idx_Bl)
    if space == 'latent':
        return vae.quantize.embed_to_fhat(h_ls, all_to_max_scale=True, last_one=False)
    return vae.embed_to_img(h_ls, all_to_max_scale=True, last_one=False)


def plot_curves(rows, SN, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    for ax, key in zip(axes, ('acc_real', 'acc_fake')):
        for k in range(SN):
            pts = [(r['step'], r[key]) for r in rows if r['scale'] == k]
            ax.plot([s for s, _ in pts], [a for _, a in pts], label=f'scale {k}')
        ax.set_title(key)
        ax.set_xlabel('step')
        ax.axhline(0.5, color='grey', lw=0.5)
    axes[0].set_ylabel('accuracy')
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = p.parse_args(argv)
    preset = models.apply_preset(args)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.steps < 1 or args.batch_size < 1:
        raise SystemExit(f'--steps and --batch_size must be >= 1, got {args.steps} and {args.batch_size}')
    out_dir = Path(args.out_dir)
    outputs = [out_dir / f'{n}_{args.space}.{ext}' for n, ext in (('probe', 'csv'), ('probe', 'png'), ('disc_heads', 'pt'))]
    held = [f.name for f in outputs if f.exists()]
    if held and not args.overwrite:
        raise SystemExit(f'{out_dir} already holds a --space {args.space} probe ({", ".join(held)}); choose another '
                         f'--out_dir or pass --overwrite. Nothing was written.')
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = data.build_train_data(args.depth, args.data_path, n_tiny=args.n_tiny)
    torch.manual_seed(args.seed)
    vae, var = checkpoints.load_frozen(preset, args.ckpt_dir, device, args.random_init, args.seed)
    if args.space == 'rgb':
        backbone = checkpoints.load_feature_net(preset, not args.random_init, args.dino_ckpt)
        D = models.ProjectedDiscriminator(backbone, num_classes=var.num_classes, norm=args.disc_norm,
                                          diffaug=args.disc_aug).to(device)
        params = list(D.head_parameters())
    else:
        D = LatentDiscriminator(var.Cvae, var.num_classes, norm=args.disc_norm).to(device)
        params = list(D.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr_d, betas=(0.9, 0.999), weight_decay=1e-5)
    SN, B = len(var.patch_nums), args.batch_size
    loader = torch.utils.data.DataLoader(dataset, batch_size=B, shuffle=True, drop_last=True, num_workers=0,
                                         generator=torch.Generator().manual_seed(args.seed))
    rows, step = [], 0
    D.train()
    with data.progress(total=args.steps, desc=f'D probe ({args.space})', dynamic_ncols=True) as bar:
        while step < args.steps:
            for img_B3HW, labels_B in loader:
                if step >= args.steps:
                    break
                img_B3HW, labels_B = img_B3HW.to(device), labels_B.to(device)
                with torch.no_grad():
                    real_idx = vae.img_to_idxBl(img_B3HW)
                    _, fake_idx = var.autoregressive_infer_cfg(B, labels_B, cfg=args.cfg, top_k=args.top_k,
                                                               top_p=args.top_p, ret_idx=True)
                    reals, fakes = scale_inputs(vae, real_idx, args.space), scale_inputs(vae, fake_idx, args.space)
                # one D call per scale and side: ghost batch norm must not mix real with fake or scales
                out_r = [D(x, labels_B) for x in reals]
                out_f = [D(x, labels_B) for x in fakes]
                loss_k = [models.hinge_d_loss(r, f) for r, f in zip(out_r, out_f)]
                loss = sum(loss_k) / SN
                if not math.isfinite(loss.item()):
                    raise SystemExit(f'[D probe] step {step + 1}: loss_D = {loss.item()}; stopped.')
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                for k in range(SN):
                    rows.append(dict(step=step, scale=k, acc_real=(out_r[k] > 0).float().mean().item(),
                                     acc_fake=(out_f[k] < 0).float().mean().item(), loss_D=loss_k[k].item()))
                last = rows[-SN:]
                bar.set_postfix(loss=f'{loss.item():.3f}', acc_r=f'{sum(r["acc_real"] for r in last) / SN:.2f}',
                                acc_f=f'{sum(r["acc_fake"] for r in last) / SN:.2f}', refresh=False)
                bar.update(1)
    with open(out_dir / f'probe_{args.space}.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot_curves(rows, SN, out_dir / f'probe_{args.space}.png')
    heads = D.heads_state_dict() if args.space == 'rgb' else D.state_dict()
    data.atomic_save({'disc_heads': heads, 'meta': dict(space=args.space, depth=args.depth, steps=step, norm=args.disc_norm)},
                       out_dir / f'disc_heads_{args.space}.pt')
    tail = rows[-SN * min(20, step):]
    print(f'[D probe] {args.space}: mean accuracy over the last {min(20, step)} steps, per scale:')
    for k in range(SN):
        ks = [r for r in tail if r['scale'] == k]
        print(f'  scale {k}: acc_real {sum(r["acc_real"] for r in ks) / len(ks):.3f}  '
              f'acc_fake {sum(r["acc_fake"] for r in ks) / len(ks):.3f}')
    return rows


if __name__ == '__main__':
    main()
