"""Does the verdict depend on which judge reads it? Every sample file of the given run folders (positive_control.py,
tiny_experiment.py) scored by the shipped judge and by a second judge trained the same way from another init and
data seed (pretrain_tiny.py --stage judge --seed 1 --judge_data_seed 8, trained into --judge2_dir if missing).

    python benchmarks/judge_agreement.py runs/positive_control runs/tiny_experiment
"""
import argparse
import json
import sys
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
p.add_argument('run_dirs', nargs='+', help='folders searched for samples_w*.npz')
p.add_argument('--judge2_dir', type=str, default='runs/judge2')
p.add_argument('--out', type=str, default='runs/judge_agreement.json')


def main():
    args = p.parse_args()
    torch.set_num_threads(1)
    j2_path = Path(args.judge2_dir) / checkpoints.TINY_FILES['judge']
    if not j2_path.is_file():
        run(['pretrain_tiny.py', '--stage', 'judge', '--seed', '1', '--judge_data_seed', '8', '--out_dir', args.judge2_dir],
            Path(args.judge2_dir).with_suffix('.log'))
    j2 = models.build_judge()
    checkpoints.load_checked(j2, checkpoints.load_state_dict_file(j2_path), j2_path, 'the second judge')
    judges = dict(judge=checkpoints.load_eval_net('judge'), judge2=models.frozen(j2, 'cpu'))
    ref, _ = data.make_shapes(10000, seed=data.REF_SHAPES_SEED)
    stats = {n: iscs.feature_stats(features.judge_features(ref, j, progress=False)[0]) for n, j in judges.items()}
    out = {}
    for d in args.run_dirs:
        for f in sorted(Path(d).rglob('samples_w*.npz')):
            with np.load(f) as z:
                x = z['arr_0']
            out[str(f)] = {n: iscs.frechet_distance(*iscs.feature_stats(features.judge_features(x, j, progress=False)[0]),
                                                    *stats[n]) for n, j in judges.items()}
            print(f, {k: round(v, 1) for k, v in out[str(f)].items()}, flush=True)
    data.atomic_save(json.dumps(out, indent=1) + '\n', args.out)


if __name__ == '__main__':
    main()
