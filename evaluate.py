"""Sample-quality evaluation: FID, Inception Score, precision / recall, class accuracy (tiny preset) and ISCS.

    python evaluate.py samples/samples_w0.001.npz                    # tiny preset: --ref shapes (10k fresh shapes)
    python evaluate.py base.npz guided.npz --ref VIRTUAL_imagenet256_labeled.npz   # side by side, with differences
    python evaluate.py samples.npz --ref /data/imagenet/val_256 --no_iscs          # an image folder as reference

Prints one column per file (and its difference to the first) and writes <name>.eval.json beside each file.
Metric definitions, the input pipeline (the ADM evaluator's; bit-exact with torch-fidelity), the networks of each
preset and the reference cache: docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import scipy.special
import torch

import checkpoints
import data
import features
import iscs
import models

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('samples', nargs='+', help='npz file(s) with arr_0 uint8 (N, H, W, 3) [+ labels, tokens] (sample.py)')
p.add_argument('--ref', type=str, default=None,
               help="reference: the ADM batch (e.g. VIRTUAL_imagenet256_labeled.npz), an npz of real images, an "
                    "image folder, or 'shapes' (tiny preset default: --ref_n fresh shapes, seed 1000)")
p.add_argument('--ref_n', type=int, default=10000, help="number of reference images for --ref shapes")
p.add_argument('--depth', type=int, default=None,
               help='real-model samples without a `preset` key: any of 16/20/24/30 (they share the VQ-VAE)')
p.add_argument('--ckpt_dir', type=str, default='checkpoints', help='VQ-VAE and FID Inception weights')
p.add_argument('--dino_ckpt', type=str, default=None, help='local DINO ViT-S/16 weights (else the HF hub cache)')
p.add_argument('--random_init', action='store_true',
               help='random feature networks and the random VQ-VAE of sample.py --random_init (tests only)')
p.add_argument('--no_iscs', action='store_true', help='skip ISCS (it decodes every token prefix: the slow part)')
p.add_argument('--iscs_n', type=int, default=None,
               help='use at most this many samples and reference images for ISCS (fixed-seed subsets); default: all '
                    '(real models), 1000 (tiny preset: 6 VQ-VAE decodes + 6 feature passes per image on a CPU)')
p.add_argument('--pr_ref_n', type=int, default=10000,
               help='reference subset for precision / recall (ADM: the 10,000 images of its reference batch)')
p.add_argument('--is_splits', type=int, default=10, help='Inception Score splits (ADM: 10 of 5,000)')
p.add_argument('--batch_size', type=int, default=64, help='images per feature-network pass (ADM: 64)')
p.add_argument('--cache_dir', type=str, default='.cache/evaluate', help='reference feature cache')
p.add_argument('--json', type=str, default=None, help='also write all results (and differences) to this file')
p.add_argument('--bootstrap', type=int, default=0,
               help='paired bootstrap replicates of the FID differences to the first file (0: off); the files must be '
                    'paired: the same labels, sample.py --seed and --batch_size, so row j of every file is the same draw')
p.add_argument('--cpu', action='store_true', help='run on CPU even if a GPU is present')
models.show_defaults(p)  # every --help line ends with its default

CACHE_VERSION = 2  # bump when a cached quantity changes definition (2: the ADM / TF1 resize for FID)
ADM_REF_URL = ('https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/'
               'VIRTUAL_imagenet256_labeled.npz')


def main(argv=None):
    args = p.parse_args(argv)
    device = torch.device('cuda' if torch.cuda.is_available() and not args.cpu else 'cpu')
    # flags, headers and the small members of every file first: nothing is inflated before a check could refuse it
    samples = [(path, data.load_samples(path, images=False)) for path in args.samples]
    preset = check_samples(samples, args)
    if args.ref is None and not preset.tiny:
        raise SystemExit(f'--ref is required for real-model samples: the ADM reference batch '
                         f'VIRTUAL_imagenet256_labeled.npz ({ADM_REF_URL}), an npz of real images, or an image folder')
    if args.ref == 'shapes' and not preset.tiny:
        raise SystemExit(f"--ref shapes is the tiny preset's reference (32x32); these samples are {preset.resolution}x"
                         f"{preset.resolution}: pass the ADM reference batch, a real-image npz or a folder")
    args.ref = 'shapes' if args.ref is None else args.ref
    args.iscs_n = preset.iscs_n if args.iscs_n is None else args.iscs_n
    for path, smp in samples:
        smp['images'] = data.npz_array(path, 'arr_0')
    ev = Evaluator(preset, args, device)
    ref = data.load_reference(args.ref, preset.resolution, args.ref_n)
    print(f'[evaluate] {preset.name} preset{" (random networks)" if args.random_init else ""}, reference: '
          f'{ref["desc"]}, device {device}')
    ref_fid = ev.ref_fid(ref)
    if args.bootstrap and 'mu' not in ref_fid:
        raise SystemExit('--bootstrap needs the reference FID statistics (the reference has none)')
    results, feats = [], []
    for path, smp in samples:
        res, f = ev.evaluate(path, smp, ref, ref_fid)
        results.append(res)
        feats.append(f)
    diffs = print_results(results)  # before any file is written: a folder that refuses the json loses nothing
    out = dict(results=results, differences_to_first=diffs)
    for name, key, mu in (('FID', 'fid_bootstrap', 'mu'), ('FID_judge', 'fid_judge_bootstrap', 'judge_mu')):
        if not args.bootstrap or mu not in ref_fid:
            continue
        out[key] = iscs.paired_fid_bootstrap([f[name] for f in feats], ref_fid[mu], ref_fid[mu.replace('mu', 'sigma')],
                                             args.bootstrap)
        for path, bs, d in zip(args.samples[1:], out[key], diffs[name]):
            print(f'[evaluate] {name}({Path(path).name}) - {name}({Path(args.samples[0]).name}) = {d:+.3f}, paired '
                  f'bootstrap 95% interval [{bs["ci95"][0]:+.3f}, {bs["ci95"][1]:+.3f}], lower in '
                  f'{100 * bs["p_lower"]:.1f}% of {bs["n_boot"]} replicates')
    for (path, _), res in zip(samples, results):
        write_json(json_path(path), res)
        print(f'[evaluate] wrote {json_path(path)}')
    if args.json:
        write_json(args.json, out)
    return results


# ---------------------------------------- sample files: one preset, fit for it, paired for --bootstrap

def check_samples(samples, args):
    """The preset of the sample files (models.resolve_preset); SystemExit for what would silently give wrong numbers."""
    def preset_name(smp):  # the npz `preset` key, else --depth, else the resolution
        if smp['preset'] is not None:
            return 'tiny' if smp['preset'] == 'tiny' else 'real'
        tiny_size = smp['shape'][1] == models.PRESETS['tiny']['resolution']
        return 'tiny' if args.depth is None and tiny_size else 'real'
    names = {preset_name(smp) for _, smp in samples}
    if len(names) > 1:
        raise SystemExit('the sample files mix tiny-preset (32x32) and real-model samples; evaluate them separately')
    tags = {smp['preset'] for _, smp in samples}
    tag = tags.pop() if len(tags) == 1 else None
    depth = int(tag[1:]) if tag and re.fullmatch(r'd\d+', tag) else args.depth
    preset = models.resolve_preset(depth, names.pop())
    if args.bootstrap:
        if len(samples) < 2:
            raise SystemExit('--bootstrap compares files with the first one: give a baseline and at least one more file')
        check_paired(samples)
    name, S, n_classes = preset.name, preset.resolution, preset.num_classes
    for path, smp in samples:
        if smp['shape'][1] != S:
            data.refuse(path, f'{smp["shape"][1]}x{smp["shape"][1]} images; the {name} preset evaluates '
                             f'{S}x{S} samples' + (' (set --depth for real-model samples without a preset key)'
                                                   if name == 'tiny' else ''))
    for path, smp in samples:
        bad = [] if smp['labels'] is None else np.unique(smp['labels'][(smp['labels'] < 0) | (smp['labels'] >= n_classes)])
        if len(bad):
            data.refuse(path, f'{len(bad)} label value(s) outside the classes 0..{n_classes - 1} of the {name} preset '
                             f'(e.g. {bad[:5].tolist()}); wrong labels would silently give class_acc 0')
    return preset


def check_paired(samples) -> None:
    """SystemExit unless every sample file is row-paired with the first (count, labels, seed, batch size)."""
    (p0, s0), rest = samples[0], samples[1:]
    for path, smp in rest:
        why = None
        if smp['shape'][0] != s0['shape'][0]:
            why = f'{smp["shape"][0]} samples vs {s0["shape"][0]}'
        elif (smp['labels'] is None) != (s0['labels'] is None) or \
                (smp['labels'] is not None and not np.array_equal(smp['labels'], s0['labels'])):
            why = 'different labels'
        elif smp['meta'] and s0['meta']:
            diff = [k for k in ('seed', 'batch_size') if smp['meta'].get(k) != s0['meta'].get(k)]
            why = ', '.join(f'{k} {smp["meta"].get(k)} vs {s0["meta"].get(k)}' for k in diff) or None
        if why:
            raise SystemExit(f'--bootstrap needs paired sample files (sample.py with the same --seed, --batch_size '
                             f'and labels); {path} and {p0} differ: {why}')


# ---------------------------------------- a preset's networks, the cached reference statistics, one file's metrics

# what each network's features are, for the json
FEATURE_DESC = dict(featnet='tiny feature network CLS (pre-logits, 128-d); IS / class accuracy: its 10-class logits',
                    inception='FID InceptionV3 pool3 (2048-d); IS: 1008 logits without fc bias',
                    judge="the judge CNN (models.build_judge, trained apart from D's backbone): penultimate 128-d, "
                          '10-class logits')
ISCS_DESC = dict(featnet='tiny feature network CLS', dino='DINO ViT-S/16 CLS (384-d)')


class Evaluator:
    """FID / IS / precision-recall features from the preset's fid_net (tiny: the tiny feature network, CLS 128-d and
    10-class logits, and the judge beside it; real: FID InceptionV3, pool3 2048-d and 1008 no-bias logits); ISCS from
    the VQ-VAE and the preset's feature network (checkpoints.load_feature_net), both loaded on first use."""

    def __init__(self, preset, args, device):
        self.preset, self.args, self.device = preset, args, device
        self.cache_dir, self._vae, self._feat_net = Path(args.cache_dir), None, None
        torch.manual_seed(1)  # --random_init: the same random feature networks every run
        self.fid_net = checkpoints.load_eval_net(preset.fid_net, args.random_init, args.ckpt_dir, device)
        # tiny: the feature network is D's backbone; the judge is a network D never saw
        self.judge = checkpoints.load_eval_net('judge', args.random_init, device=device) if preset.judge else None

    def features(self, images_NHWC_uint8, desc):
        """(feats (N, D), logits (N, K)) float64 of uint8 images on fid_net."""
        return features.extract(self.preset.fid_net, images_NHWC_uint8, self.fid_net, self.args.batch_size, self.device,
                                desc=desc)

    def judge_features(self, images_NHWC_uint8, desc):
        return features.extract('judge', images_NHWC_uint8, self.judge, device=self.device, desc=desc)

    def vae(self):
        # random: the VQ-VAE of sample.py --random_init; real: the VQ-VAE alone (the VARs of every depth share it)
        if self._vae is None:
            a = self.args
            self._vae = checkpoints.load_frozen(self.preset, a.ckpt_dir, self.device, a.random_init, vae_only=True)[0]
        return self._vae

    def feat_net(self):
        if self._feat_net is None:
            torch.manual_seed(1)
            same = self.preset.feature_net == self.preset.fid_net  # tiny: one network for both
            net = self.fid_net if same else checkpoints.load_feature_net(self.preset, not self.args.random_init,
                                                                         self.args.dino_ckpt)
            self._feat_net = models.frozen(net, self.device)
        return self._feat_net

    def cached(self, kind, key_parts, compute):
        """(compute()'s {name: array}, whether it came from the cache): stored in --cache_dir under a hash of
        CACHE_VERSION, kind and key_parts (the reference's content and the networks' weights among them)."""
        key = hashlib.sha256('|'.join(map(str, (CACHE_VERSION, kind) + tuple(key_parts))).encode()).hexdigest()[:24]
        path = self.cache_dir / f'{kind}_{key}.npz'
        if path.is_file():
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}, True
        out = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        data.save_npz(path, out)
        return out, False

    def ref_fid(self, ref):
        """{'mu', 'sigma', 'pr_feats', 'stats_from'} of the reference on fid_net; stored ADM stats win for mu / sigma."""
        def compute():
            if ref['images'] is None:
                return {}
            feats, _ = self.features(ref['images'], 'reference features')
            mu, sigma = iscs.feature_stats(feats)
            return dict(mu=mu, sigma=sigma, pr_feats=feats[fixed_subset(len(feats), self.args.pr_ref_n)])
        key = (ref['hash'], fingerprint(self.fid_net), self.preset.resolution, self.args.pr_ref_n)
        out, hit = self.cached('fid', key, compute)
        if hit:
            print(f'[evaluate] reference features from the cache ({self.cache_dir})')
        out['stats_from'] = f'{len(ref["images"])} reference images' if ref['images'] is not None else None
        if self.judge is not None and ref['images'] is not None:
            def judge_stats():
                mu, sigma = iscs.feature_stats(self.judge_features(ref['images'], 'reference judge features')[0])
                return dict(mu=mu, sigma=sigma)
            js, _ = self.cached('judge', (ref['hash'], fingerprint(self.judge), self.preset.resolution), judge_stats)
            out['judge_mu'], out['judge_sigma'] = js['mu'], js['sigma']
        stored = ref['stats']
        if stored is not None:
            if self.preset.fid_net == 'inception' and stored['mu'].shape == (2048,) and stored['sigma'].shape == (2048, 2048):
                out['mu'], out['sigma'] = stored['mu'], stored['sigma']
                out['stats_from'] = 'stored mu / sigma of the reference file (ADM convention)'
            else:
                print(f'[evaluate] the reference\'s stored mu {stored["mu"].shape} does not fit this preset\'s '
                      f'features: ignored')
        return out

    def ref_iscs(self, ref):
        """Per-transition joint statistics of the real set: encode -> tokens -> prefix images -> features."""
        vae, feat_net, a = self.vae(), self.feat_net(), self.args

        def compute():
            sub = fixed_subset(len(ref['images']), a.iscs_n)
            tokens = features.encode_tokens(vae, ref['images'][sub] if len(sub) < len(ref['images']) else ref['images'],
                                   a.batch_size, self.device)
            feats = features.scale_features(vae, feat_net, tokens, self.preset.patch_nums, a.batch_size, self.device,
                                   desc='ISCS reference')
            stats = iscs.joint_stats(feats)
            return dict(mu=np.stack([m for m, _ in stats]), sigma=np.stack([s for _, s in stats]), n=np.array(len(sub)))
        key = (ref['hash'], fingerprint(vae), fingerprint(feat_net), self.preset.resolution, a.iscs_n)
        out, hit = self.cached('iscs', key, compute)
        if hit:
            print(f'[evaluate] ISCS reference statistics from the cache ({self.cache_dir})')
        return [(m, s) for m, s in zip(out['mu'], out['sigma'])], int(out['n'])

    def evaluate(self, path, smp, ref, ref_fid) -> tuple[dict, dict]:
        """(the result dict, {'FID': (N, D) FID features of the samples[, 'FID_judge': the judge's]})."""
        a, warnings, skipped = self.args, [], {}
        images, n = smp['images'], len(smp['images'])
        res = dict(samples=str(path), n=n, resolution=int(images.shape[1]), preset=self.preset.name,
                   sampling=smp['meta'], random_init=a.random_init,
                   reference=dict(spec=a.ref, desc=ref['desc'], sha256=ref['hash'][:16], fid_stats=ref_fid['stats_from']),
                   features=dict(fid_is_pr=FEATURE_DESC[self.preset.fid_net]), metrics={}, iscs=None, skipped=skipped, warnings=warnings,
                   settings=dict(is_splits=a.is_splits, is_shuffle_seed=0, pr_k=3, pr_ref_n=None, iscs_n=a.iscs_n,
                                 iscs_eps=iscs.FD_EPS))
        m, settings = res['metrics'], res['settings']
        meta_random = (smp['meta'] or {}).get('random_init')
        if meta_random is not None and bool(meta_random) != a.random_init:
            warnings.append(f'the samples were made with{"" if meta_random else "out"} --random_init but are evaluated '
                            f'with{"" if a.random_init else "out"} it: their tokens decode through another VQ-VAE')
        feats, logits = self.features(images, f'features {Path(path).name}')
        d = feats.shape[1]
        if n < d:
            warnings.append(f'only {n} samples for {d}-d features: the covariance is rank-deficient and FID is '
                            f'biased and noisy (use >= {d}; the protocol uses 50,000)')
        if 'mu' in ref_fid:
            m['FID'] = iscs.frechet_distance(*iscs.feature_stats(feats), ref_fid['mu'], ref_fid['sigma'])
        else:
            skipped['FID'] = 'the reference has neither images nor statistics for this feature network'
        settings['is_splits'] = splits = min(a.is_splits, n)
        if splits < a.is_splits:
            warnings.append(f'IS over {splits} splits instead of {a.is_splits}: only {n} samples')
        m['IS'], m['IS_std'] = inception_score(logits, splits=splits, shuffle_seed=0)
        if 'pr_feats' not in ref_fid:
            skipped['precision_recall'] = 'the reference file has no images (arr_0), only statistics'
        elif min(n, len(ref_fid['pr_feats'])) <= 3:
            skipped['precision_recall'] = f'k = 3 needs more than 3 samples and reference images ({n}, {len(ref_fid["pr_feats"])})'
        else:
            m['precision'], m['recall'] = precision_recall(ref_fid['pr_feats'], feats, k=3, device=self.device)
            settings['pr_ref_n'] = len(ref_fid['pr_feats'])
        if self.preset.fid_net == 'featnet' and smp['labels'] is not None:  # it classifies the preset's classes
            m['class_acc'] = float(np.mean(logits.argmax(1) == smp['labels']))
        feats = dict(FID=feats)
        if 'judge_mu' in ref_fid:
            feats['FID_judge'], jlogits = self.judge_features(images, f'judge features {Path(path).name}')
            m['FID_judge'] = iscs.frechet_distance(*iscs.feature_stats(feats['FID_judge']), ref_fid['judge_mu'],
                                                   ref_fid['judge_sigma'])
            res['features']['judge'] = FEATURE_DESC['judge']
            if smp['labels'] is not None:
                m['class_acc_judge'] = float(np.mean(jlogits.argmax(1) == smp['labels']))
        m['ISCS'] = None
        reason = self.iscs_skip_reason(smp, ref)
        if reason:
            skipped['ISCS'] = reason
            return res, feats
        ref_stats, n_real = self.ref_iscs(ref)
        sub = fixed_subset(n, a.iscs_n)
        tokens = smp['tokens'] if len(sub) == n else smp['tokens'][sub]
        gen = features.scale_features(self.vae(), self.feat_net(), tokens, self.preset.patch_nums, a.batch_size, self.device,
                             desc=f'ISCS {Path(path).name}')
        out = iscs.iscs_from_stats(ref_stats, iscs.joint_stats(gen))
        dj = 2 * gen.shape[2]
        if min(len(sub), n_real) < dj:
            warnings.append(f'ISCS from {len(sub)} samples / {n_real} reference images for {dj}-d joint features: '
                            f'rank-deficient covariances, the FD_k are biased and noisy (use >= {dj})')
        if out['clipped_k']:
            warnings.append(f'ISCS: FD_k < {iscs.FD_EPS} (round-off level) at k = {out["clipped_k"]}: S_k capped at '
                            f'{1 / iscs.FD_EPS:g} (generated and real sets practically identical?)')
        m['ISCS'] = out['ISCS']
        res['iscs'] = dict(out, n_gen=len(sub), n_real=n_real)
        res['features']['iscs'] = ISCS_DESC[self.preset.feature_net] + \
            ', L2-normalised; images decoded from token prefixes through the VQ-VAE'
        return res, feats

    def iscs_skip_reason(self, smp, ref):
        if self.args.no_iscs:
            return '--no_iscs'
        tok, n = smp['tokens'], len(smp['images'])  # the resolution is checked by check_samples
        if tok is None:
            return "the file has no 'tokens' (per-scale token maps, written by sample.py); the other metrics are unaffected"
        L, V = sum(pn * pn for pn in self.preset.patch_nums), self.preset.V
        if tok.ndim != 2 or tok.shape != (n, L) or not np.issubdtype(tok.dtype, np.integer):
            return f'tokens have shape {tuple(tok.shape)} / dtype {tok.dtype}; this preset needs ({n}, {L}) integers'
        lo, hi = int(np.min(tok)), int(np.max(tok))
        if lo < 0 or hi >= V:
            return f'tokens range over {lo}..{hi}, outside the VQ-VAE vocabulary 0..{V - 1}'
        if ref['images'] is None:
            return 'the reference has no images to encode into real tokens (statistics only)'
        return None


def fingerprint(module: torch.nn.Module) -> str:
    """16 hex of checkpoints.weights_sha256: part of every cache key, so new weights never reuse old features."""
    return checkpoints.weights_sha256(module)[:16]


def fixed_subset(n: int, m, seed=0) -> np.ndarray:
    """Sorted indices of a fixed-seed subset of size min(n, m) (all indices when m is None or >= n)."""
    if m is None or m >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))


# ---------------------------------------- Inception Score, precision / recall (FID, its paired bootstrap, ISCS: iscs.py)

def inception_score_per_split(logits_NK, splits: int = 10, shuffle_seed: int | None = 0) -> np.ndarray:
    """Per-chunk Inception Scores, float64 (splits,). See inception_score."""
    logits_NK = np.asarray(logits_NK, dtype=np.float64)
    if logits_NK.ndim != 2:
        raise ValueError(f'inception_score expects (N, K) logits, got shape {logits_NK.shape}')
    n = logits_NK.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f'inception_score needs 1 <= splits <= N, got splits={splits}, N={n}')
    if not np.isfinite(logits_NK).all():
        raise ValueError('inception_score: logits contain NaN or inf')
    if shuffle_seed is not None:
        logits_NK = logits_NK[np.random.default_rng(shuffle_seed).permutation(n)]
    # Log-domain: p * (log p - log p_y) stays finite when some p underflow to 0.
    logp_NK = scipy.special.log_softmax(logits_NK, axis=1)
    p_NK = np.exp(logp_NK)
    scores = np.empty(splits, dtype=np.float64)
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        logpy_K = scipy.special.logsumexp(logp_NK[lo:hi], axis=0) - np.log(hi - lo)
        kl_B = np.sum(p_NK[lo:hi] * (logp_NK[lo:hi] - logpy_K), axis=1)
        scores[i] = np.exp(np.mean(kl_B))
    return scores


def inception_score(logits_NK, splits: int = 10, shuffle_seed: int | None = 0) -> tuple[float, float]:
    """Inception Score (improved-GAN / ADM definition): (mean, std with ddof 0) over chunks of the per-chunk
    exp(mean KL(p || mean p)), p = softmax of (N, K) logits (ADM parity: features.inception_features' no-bias logits), chunks
    [i*N//splits, (i+1)*N//splits). shuffle_seed: rows first permuted with np.random.default_rng(seed), since sample
    files are often class-ordered and chunks of few classes collapse IS; None: file order (the fixture's numbers)."""
    scores = inception_score_per_split(logits_NK, splits, shuffle_seed)
    return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(a_AD: torch.Tensor, b_BD: torch.Tensor) -> torch.Tensor:
    # Same expansion as the ADM evaluator; exact enough in float64 for ball membership.
    return (a_AD * a_AD).sum(1)[:, None] + (b_BD * b_BD).sum(1)[None, :] - 2 * (a_AD @ b_BD.T)


def kth_nn_sq_radii(feats_ND: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """(N,) squared distance of each row of (N, D) to its k-th nearest neighbour in the set, self excluded (index k
    of the row's ascending distances with the zero self-distance); block x block tiles with a running top-(k+1)."""
    n = feats_ND.shape[0]
    if not 0 < k < n:
        raise ValueError(f'k must satisfy 0 < k < N, got k={k}, N={n}')
    radii2_N = torch.empty(n, dtype=feats_ND.dtype, device=feats_ND.device)
    for r0 in range(0, n, block):
        rows_BD = feats_ND[r0:r0 + block]
        best_BK = rows_BD.new_empty((rows_BD.shape[0], 0))
        for c0 in range(0, n, block):
            cand_BC = torch.cat([best_BK, _sq_dists(rows_BD, feats_ND[c0:c0 + block])], 1)
            best_BK = torch.topk(cand_BC, min(k + 1, cand_BC.shape[1]), dim=1, largest=False, sorted=True).values
        radii2_N[r0:r0 + block] = best_BK[:, k]
    return radii2_N


def _fraction_covered(query_QD: torch.Tensor, ref_RD: torch.Tensor, ref_radii2_R: torch.Tensor,
                      block: int) -> float:
    # Share of query points inside at least one reference ball (inclusive <=).
    hit_Q = torch.zeros(query_QD.shape[0], dtype=torch.bool, device=query_QD.device)
    for q0 in range(0, query_QD.shape[0], block):
        for r0 in range(0, ref_RD.shape[0], block):
            d2_BC = _sq_dists(query_QD[q0:q0 + block], ref_RD[r0:r0 + block])
            hit_Q[q0:q0 + block] |= (d2_BC <= ref_radii2_R[None, r0:r0 + block]).any(1)
    return hit_Q.double().mean().item()


def precision_recall(real_ND, fake_MD, k: int = 3, block: int = 10000, device='cpu') -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), ADM evaluator convention: each point's ball reaches
    its k-th nearest neighbour in its own set (self excluded); precision = share of fake rows (M, D) inside some real
    ball, recall = share of real rows (N, D) inside some fake ball (inclusive <=). Squared distances in float64, in
    block x block tiles (ADM: 10000) on `device`."""
    real_ND = torch.as_tensor(np.asarray(real_ND, dtype=np.float64), device=device)
    fake_MD = torch.as_tensor(np.asarray(fake_MD, dtype=np.float64), device=device)
    if real_ND.ndim != 2 or fake_MD.ndim != 2 or real_ND.shape[1] != fake_MD.shape[1]:
        raise ValueError(f'precision_recall expects (N, D) and (M, D) features, got '
                         f'{tuple(real_ND.shape)} and {tuple(fake_MD.shape)}')
    # NaN distances compare False and would silently lower both numbers.
    if not (torch.isfinite(real_ND).all() and torch.isfinite(fake_MD).all()):
        raise ValueError('precision_recall: features contain NaN or inf')
    real_radii2_N = kth_nn_sq_radii(real_ND, k, block)
    fake_radii2_M = kth_nn_sq_radii(fake_MD, k, block)
    precision = _fraction_covered(fake_MD, real_ND, real_radii2_N, block)
    recall = _fraction_covered(real_ND, fake_MD, fake_radii2_M, block)
    return precision, recall


# ---------------------------------------- output

ROWS = [('FID', 'lower'), ('IS', 'higher'), ('precision', 'higher'), ('recall', 'higher'),
        ('class_acc', 'higher'), ('FID_judge', 'lower'), ('class_acc_judge', 'higher'), ('ISCS', 'higher')]


def print_results(results: list) -> dict:
    """Prints one column per file (and differences to the first); returns {row: [values]} with the diffs."""
    tables = []
    for res in results:
        rows = {name: res['metrics'].get(name) for name, _ in ROWS}
        if res['iscs']:
            for k, s, fd in zip(res['iscs']['k'], res['iscs']['S_k'], res['iscs']['FD_k']):
                rows[f'S_{k}'], rows[f'FD_{k}'] = s, fd
        tables.append(rows)
    names = list(dict.fromkeys(k for t in tables for k in t))
    better = dict(ROWS, **{k: 'higher' if k.startswith('S_') else 'lower' for k in names if k.startswith(('S_', 'FD_'))})
    heads = [Path(r['samples']).name for r in results]
    heads += [f'{h} - {heads[0]}' for h in heads[1:]]
    width = max(12, *(len(h) for h in heads)) + 2
    fmt = lambda v: '-' if v is None else f'{v:.4f}' if abs(v) < 1e4 else f'{v:.4g}'
    print(f'{"metric":16s} {"better":7s}' + ''.join(f'{h:>{width}s}' for h in heads))
    diffs = {}
    for name in names:
        vals = [t.get(name) for t in tables]
        d = [None if v is None or vals[0] is None else v - vals[0] for v in vals[1:]]
        diffs[name] = d
        print(f'{name:16s} {better.get(name, ""):7s}' + ''.join(f'{fmt(v):>{width}s}' for v in vals + d))
    for r in results:
        for what, why in r['skipped'].items():
            print(f'[evaluate] {Path(r["samples"]).name}: {what} skipped: {why}')
        for w in r['warnings']:
            print(f'[evaluate] warning ({Path(r["samples"]).name}): {w}')
    return diffs


def json_path(sample_path) -> Path:
    sample_path = Path(sample_path)
    return sample_path.with_name(sample_path.stem + '.eval.json')


def write_json(path, obj):
    """Atomic; says in one line when it replaces a result against another reference, and when it cannot write."""
    path = Path(path)
    try:
        old = json.loads(path.read_text()).get('reference') if path.is_file() else None
    except (ValueError, OSError, AttributeError):
        old = None
    new = obj.get('reference') if 'reference' in obj else None
    if old and new and old.get('sha256') != new.get('sha256'):
        print(f'[evaluate] {path}: replacing the result against {old.get("desc")} with this one against {new.get("desc")}')
    try:
        data.atomic_save(json.dumps(obj, indent=1, sort_keys=False, default=float) + '\n', path)
    except OSError as e:
        raise SystemExit(f'[evaluate] could not write {path} ({e.strerror or e}); the metrics are printed above') from None


if __name__ == '__main__':
    main()
