"""What AID-VAR costs on one GPU, in one command: random weights in the official shapes, nothing downloaded.
Prints one table and writes it as JSON (--out, rewritten after every row, so a killed run keeps what it measured).

Rows:
  matmul              the machine's own large matrix product: bf16 8192^3 on the GPU (float32 on the CPU)
  sampling_d16, _d30  sample.py's sampler (bf16 autocast, cfg 1.5, top-k 900, top-p 0.96, VQ-VAE decode included)
                      at a batch that fills the GPU (halved on out-of-memory): images/s plain and with a random,
                      non-zero guidance injector at w = 0.001 (time ratio), model FLOPs per second (counted once per
                      configuration with torch.utils.flop_counter) over the matmul rate, peak memory
  decode_d16          the VQ-VAE decode alone, NCHW vs channels-last input (the sampler decodes channels-last)
  train_d16_input, train_d16_head, train_d24_input, train_d24_head
                      train_injector.py itself, in a subprocess (--random_init, bf16, per-GPU batch 32, no R1): s/step
                      from its log.jsonl (median after one warm-up step) and the run's peak GPU memory (the paper
                      reports 14.8 GB at d16)
  fid_inception       evaluate.py's FID InceptionV3 on 256x256 uint8 samples, resize to 299 included: images/s
  dino                DINO ViT-S/16 CLS features (features.vit_cls, resize to 224 included) of 256x256 images: images/s
  iscs                ISCS per 1,000 generated samples: 10 prefix decodes + 10 DINO passes per sample
                      (features.scale_features, timed on one batch and scaled) + iscs.py's joint statistics and 9
                      Frechet distances (timed on 1,000 rows); the reference side is cached by evaluate.py
Each row is guarded: a failure (out of memory, say) is printed in full and recorded in its row, the other rows still
run, and the exit status is 1. --tiny runs the same code on the CPU with the tiny geometry and small batches
(seconds; tests/test_gpu_check.py); the row names stay, the rows' info says what ran.

    python benchmarks/gpu_check.py --out gpu_check.json            # one H200: about 3 minutes
    python benchmarks/gpu_check.py --only sampling train --out x.json
    python benchmarks/gpu_check.py --tiny --out /tmp/gpu_check.json
"""
import argparse
import contextlib
import gc
import importlib.util
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import checkpoints  # noqa: E402
import data  # noqa: E402
import features  # noqa: E402
import models  # noqa: E402
import perf  # noqa: E402  (benchmarks/perf.py)

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--out', type=str, default=None, help='JSON file for the table')
p.add_argument('--tiny', action='store_true', help='tiny geometry and small batches (CPU, seconds): the CI smoke run')
p.add_argument('--device', type=str, default=None, help='default: cuda if there is one, else cpu')
p.add_argument('--only', nargs='*', default=None, help='run only the rows whose names start with these (and matmul)')
p.add_argument('--reps', type=int, default=None, help='timed repeats per measurement (default 3; --tiny 1)')

# per-GPU sizes (H200, 139 GiB) and the tiny smoke run's
SIZES = {
    'real': dict(sample_batch={16: 256, 30: 128}, train_batch=32, mm_n=8192, feat_batch=256, feat_n=1024,
                 iscs_batch=64, iscs_stats_n=1000),
    'tiny': dict(sample_batch={16: 2, 30: 2}, train_batch=2, mm_n=512, feat_batch=2, feat_n=2,
                 iscs_batch=2, iscs_stats_n=1000),
}


class Check:
    def __init__(self, args):
        self.args, self.tiny = args, args.tiny
        self.dev = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
        self.cuda = self.dev.type == 'cuda'
        self.size = SIZES['tiny' if args.tiny else 'real']
        self.reps = args.reps or (1 if args.tiny else 3)
        self.rows, self.mm = [], None
        self.t_start = time.perf_counter()

    # ---- plumbing
    def amp(self):
        """The sampler's and the training step's precision: bf16 autocast on the GPU, float32 on the CPU."""
        return torch.autocast('cuda', dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.dev)

    def peak_gib(self) -> dict:
        return perf.peak_memory(self.dev)

    def mem_note(self):
        return 'torch.cuda.max_memory_allocated / _reserved' if self.cuda else 'CPU: the process max RSS so far'

    def median_time(self, fn):
        return statistics.median(perf.timed(fn, self.dev)[0] for _ in range(self.reps))

    def build(self, depth):
        """(vae, var) frozen on the device, random from-scratch weights (built there: no CPU init of 2B parameters)."""
        torch.manual_seed(0)
        if self.tiny:
            vae, var = models.build_tiny(device=self.dev, init=True)
        else:
            vae, var = models.build_vae_var(device=self.dev, depth=depth, init=True)
        return models.frozen(vae, self.dev), models.frozen(var, self.dev)

    def row(self, name, fn, *args):
        if self.args.only and name != 'matmul' and not any(name.startswith(o) for o in self.args.only):
            return
        print(f'[gpu_check] {name} ...', flush=True)
        t0 = time.perf_counter()
        try:
            metrics, info = fn(*args)
            r = dict(name=name, ok=True, metrics=metrics, info=info)
        except (Exception, SystemExit) as e:  # recorded in the row and printed in full; the other rows still run
            traceback.print_exc()
            print(f'\n!!!!!!!! [gpu_check] {name} FAILED: {type(e).__name__}: {e}\n', file=sys.stderr, flush=True)
            r = dict(name=name, ok=False, error=f'{type(e).__name__}: {e}', metrics={}, info={})
        r['seconds'] = time.perf_counter() - t0
        self.rows.append(r)
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        print(f'[gpu_check] {name}: {"ok" if r["ok"] else "FAILED"} in {r["seconds"]:.1f} s  {fmt(r)}', flush=True)
        self.write()

    def write(self):
        if not self.args.out:
            return
        res = dict(device=torch.cuda.get_device_name(self.dev) if self.cuda else f'cpu ({torch.get_num_threads()} threads)',
                   torch=torch.__version__, tiny=self.tiny, seconds=time.perf_counter() - self.t_start, rows=self.rows)
        Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(self.args.out).write_text(json.dumps(res, indent=1))

    # ---- rows
    def matmul(self):
        dtype = torch.bfloat16 if self.cuda else torch.float32
        n = self.size['mm_n']
        self.mm = perf.matmul_rate(self.dev, dtype, n, reps=10 if self.cuda else 3)
        m = dict(tflop_per_s=self.mm['wall'] / 1e12)
        if not self.cuda:
            m['tflop_per_cpu_s'] = self.mm['cpu'] / 1e12
        return m, dict(dtype=str(dtype), n=n, note='median of timed products after warm-up, random data')

    def sampling(self, depth):
        vae, var = self.build(depth)
        inj = models.GuidanceInjector(var.C, var.patch_nums).to(self.dev).eval()
        torch.nn.init.normal_(inj.proj_out.weight, std=0.02)  # non-zero guidance, like a trained injector
        guided = dict(guidance_hook=models.make_guidance_hook(var, inj), guidance_w=0.001)
        kw = dict(g_seed=0, cfg=1.5, top_k=900, top_p=0.96)

        def run(n, extra):
            with self.amp():
                var.autoregressive_infer_cfg(n, torch.arange(n, device=self.dev) % var.num_classes, **kw, **extra)

        batch, oom = self.size['sample_batch'][depth], []
        while True:  # the batch that fits (the guided run needs a little more memory)
            try:
                self.reset_peak()
                run(batch, guided)  # also the warm-up
                break
            except torch.cuda.OutOfMemoryError as e:
                print(f'[gpu_check] sampling d{depth}: out of memory at batch {batch} ({e}); halving', flush=True)
            oom.append(batch)  # (outside the except block, so that the failed call's frames are freed)
            batch //= 2
            for b in var.blocks:
                b.attn.kv_caching(False)  # the interrupted call's key/value buffers
            gc.collect()
            torch.cuda.empty_cache()
            if batch < 1:
                raise RuntimeError(f'sampling d{depth} runs out of memory even at batch 1')
        mem = self.peak_gib()
        flop = perf.count_flops(lambda: run(1, {}))[1]  # FLOPs grow linearly with the batch
        flop_g = perf.count_flops(lambda: run(1, guided))[1]
        tp, tg, cp = [], [], []
        for _ in range(self.reps):  # interleaved
            w, c = perf.timed(lambda: run(batch, {}), self.dev)
            tp.append(w)
            cp.append(c)
            tg.append(perf.timed(lambda: run(batch, guided), self.dev)[0])
        tp, tg, cp = statistics.median(tp), statistics.median(tg), statistics.median(cp)
        m = dict(batch=batch, images_per_s=batch / tp, images_per_s_guided=batch / tg, guided_time_ratio=tg / tp,
                 gflop_per_image=flop / 1e9, gflop_per_image_guided=flop_g / 1e9, model_tflop_per_s=flop * batch / tp / 1e12,
                 frac_of_matmul=flop * batch / tp / self.mm['wall'], **mem)
        if not self.cuda:
            m['frac_of_matmul_cpu_s'] = flop * batch / cp / self.mm['cpu']
        return m, dict(geometry='tiny' if self.tiny else f'd{depth}', precision='bf16 autocast' if self.cuda else 'float32',
                       oom_batches=oom, sampling=kw, memory=self.mem_note())

    def decode(self, depth):
        vae, var = self.build(depth)
        del var
        batch, pn = self.size['sample_batch'][depth], vae.quantize.v_patch_nums[-1]
        f = torch.randn(batch, vae.Cvae, pn, pn, device=self.dev)
        m = {}
        for name, fmt_ in (('nchw', torch.contiguous_format), ('channels_last', torch.channels_last)):
            x = f.contiguous(memory_format=fmt_)
            with torch.no_grad(), self.amp():
                vae.fhat_to_img(x)  # warm-up
                m[f'images_per_s_{name}'] = batch / self.median_time(lambda: vae.fhat_to_img(x))
        m['channels_last_speedup'] = m['images_per_s_channels_last'] / m['images_per_s_nchw']
        return m, dict(batch=batch, geometry='tiny' if self.tiny else f'd{depth} VQ-VAE')

    def train(self, depth, inject):
        """train_injector.py run as a script (no import of it): what is timed is the script's own step."""
        batch, steps = self.size['train_batch'], 1 + self.reps  # one warm-up step
        preset, n = models.resolve_preset(None if self.tiny else depth), max(batch, 64)  # 64: the soft reals' temperatures
        side = preset.resolution
        with tempfile.TemporaryDirectory() as tmp:
            images = np.random.default_rng(0).integers(0, 256, (n, side, side, 3), dtype=np.uint8)
            data.save_npz(f'{tmp}/data.npz', dict(arr_0=images, labels=np.arange(n) % preset.num_classes))
            argv = ['--random_init', '--inject', inject, '--global_batch_size', str(batch), '--max_steps', str(steps),
                    '--r1_gamma', '0', '--sample_every', '0', '--ckpt_every', str(steps), '--num_workers', '0',
                    '--data_path', f'{tmp}/data.npz', '--out_dir', f'{tmp}/run',
                    '--mixed_precision', 'bf16' if self.cuda else 'no'] + ([] if self.tiny else ['--depth', str(depth)])
            # the script takes the GPU when there is one: --device cpu hides it; same torch threads as this process
            env = dict(OMP_NUM_THREADS=str(torch.get_num_threads()), **({} if self.cuda else dict(CUDA_VISIBLE_DEVICES='')))
            mem = perf.run_measured(['train_injector.py', *argv], f'{tmp}/train.log', env=env)
            rows = [json.loads(line) for line in open(f'{tmp}/run/log.jsonl')]
            config = json.loads(Path(f'{tmp}/run/config.json').read_text())
        t = statistics.median(batch / r['img_per_s'] for r in rows[1:])
        return (dict(batch=batch, s_per_step=t, images_per_s=batch / t, **{k: v for k, v in mem.items() if k.startswith('peak')}),
                dict(geometry='tiny' if self.tiny else f'd{depth}', inject=inject, context=config['context'],
                     decode=config['decode'], precision='bf16' if self.cuda else 'float32',
                     memory=self.mem_note().replace('so far', 'of the whole run') + ' (train_injector.py process)',
                     note='steps without R1; the paper reports 14.8 GB at d16'))

    def fid_inception(self):
        net = features.FIDInceptionV3().to(self.dev).eval().requires_grad_(False)
        batch, n = self.size['feat_batch'], self.size['feat_n']
        u8 = np.random.default_rng(0).integers(0, 256, (n, 256, 256, 3), dtype=np.uint8)
        # the ADM resize needs torch-fidelity; without it the pytorch-fid resize (same cost class) is timed
        pipeline = 'adm' if importlib.util.find_spec('torch_fidelity') else 'pytorch-fid'
        feats = lambda x: features.inception_features(x, net, batch, self.dev, progress=False, pipeline=pipeline)
        feats(u8[:batch])
        return (dict(images_per_s=n / self.median_time(lambda: feats(u8))),
                dict(batch=batch, n=n, pipeline=pipeline, precision=str(next(net.parameters()).dtype)))

    def dino(self):
        torch.manual_seed(0)
        net = models.frozen(models.build_dino(), self.dev)
        batch, n = self.size['feat_batch'], self.size['feat_n']
        x = torch.rand(batch, 3, 256, 256, device=self.dev) * 2 - 1

        def feats():
            with torch.no_grad():
                for _ in range(n // batch):
                    features.vit_cls(net, x)
        with torch.no_grad():
            features.vit_cls(net, x)
        return dict(images_per_s=n // batch * batch / self.median_time(feats)), dict(batch=batch, precision='float32')

    def iscs(self):
        import iscs
        batch, n_stats = self.size['iscs_batch'], self.size['iscs_stats_n']
        torch.manual_seed(0)
        vae = models.build_tiny(init=True)[0] if self.tiny else models.build_vae_var(device=self.dev, depth=16)[0]
        feat_net = models.build_featnet() if self.tiny else models.build_dino()
        vae, feat_net = models.frozen(vae, self.dev), models.frozen(feat_net, self.dev)
        pns = vae.quantize.v_patch_nums
        rng = np.random.default_rng(0)
        tok = rng.integers(0, vae.vocab_size, (batch, sum(pn * pn for pn in pns)))
        feats = lambda t: features.scale_features(vae, feat_net, t, pns, batch, self.dev, progress=False)
        D = feats(tok[:1]).shape[-1]  # warm-up
        t_feat = self.median_time(lambda: feats(tok)) / batch * 1000
        real = rng.standard_normal((n_stats, len(pns), D)).astype(np.float32)
        gen = rng.standard_normal((n_stats, len(pns), D)).astype(np.float32)
        ref = iscs.joint_stats(real)  # cached by evaluate.py: not part of the cost per sample file
        t0 = time.perf_counter()
        iscs.iscs_from_stats(ref, iscs.joint_stats(gen))
        t_stats = (time.perf_counter() - t0) * 1000 / n_stats
        return (dict(s_per_1000_samples=t_feat + t_stats, features_s_per_1000=t_feat, stats_s_per_1000=t_stats),
                dict(scales=len(pns), feature_dim=D, batch=batch, stats_rows=n_stats,
                     feature_net='tiny feature network' if self.tiny else 'DINO ViT-S/16 (random)'))


def fmt(r):
    if not r['ok']:
        return r['error'][:200]
    return '  '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in r['metrics'].items())


def main():
    args = p.parse_args()
    c = Check(args)
    print(f'[gpu_check] {c.dev} ({torch.cuda.get_device_name(c.dev) if c.cuda else f"{torch.get_num_threads()} threads"}), '
          f'torch {torch.__version__}, {"tiny" if c.tiny else "real"} sizes, {c.reps} timed repeats', flush=True)
    c.row('matmul', c.matmul)
    for depth in (16, 30):
        c.row(f'sampling_d{depth}', c.sampling, depth)
    c.row('decode_d16', c.decode, 16)
    for depth in (16, 24):
        for inject in ('input', 'head'):
            c.row(f'train_d{depth}_{inject}', c.train, depth, inject)
    c.row('fid_inception', c.fid_inception)
    c.row('dino', c.dino)
    c.row('iscs', c.iscs)
    c.write()
    print(f'\nAID-VAR GPU check: {c.dev}, torch {torch.__version__}, {"TINY (CPU smoke run)" if c.tiny else "real sizes"}, '
          f'{time.perf_counter() - c.t_start:.0f} s')
    for r in c.rows:
        print(f'  {r["name"]:16s} {"ok    " if r["ok"] else "FAILED"} {fmt(r)}')
    bad = [r['name'] for r in c.rows if not r['ok'] or not all(math.isfinite(v) for v in r['metrics'].values())]
    if bad:
        print(f'\n!!!!!!!! [gpu_check] FAILED rows: {", ".join(bad)} (errors above and in the JSON)', file=sys.stderr)
        sys.exit(1)


if __name__ == '__main__':
    main()
