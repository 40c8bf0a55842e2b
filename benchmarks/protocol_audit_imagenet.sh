#!/usr/bin/env bash
# The protocol audit on ImageNet (benchmarks/protocol_audit.py is its tiny-preset twin; docs/claims.md reads both):
# the same frozen VAR-d$DEPTH sampled under VAR's evaluation protocol (50 per class = 50,000, more_smooth off) and
# under the authors' release's protocol for its guided numbers (10 per class = 10,000, more_smooth on), plus the
# paired more_smooth effect at 50,000 and, with INJECTOR set, the trained injector at w = 0.001 under VAR's protocol.
# Every FID against the ADM reference batch; paired rows get a 95% paired-bootstrap interval.
#   DEPTH=16 REF=VIRTUAL_imagenet256_labeled.npz [INJECTOR=runs/injector/injector.safetensors] [GPUS=8] \
#       bash benchmarks/protocol_audit_imagenet.sh
# Cost: 110,000 VAR-d$DEPTH samples (160,000 with INJECTOR) at the rate `python benchmarks/gpu_check.py --only
# sampling` measures, plus one Inception pass per sample; results in $OUT/*.eval.json and $OUT/audit_*.json.
set -euo pipefail
DEPTH=${DEPTH:-16}
REF=${REF:?set REF to the ADM reference batch VIRTUAL_imagenet256_labeled.npz}
GPUS=${GPUS:-8}
OUT=${OUT:-runs/protocol_audit_d$DEPTH}
SEED=${SEED:-0}
launch="accelerate launch --multi_gpu --num_processes $GPUS"
[ "$GPUS" = 1 ] && launch=python

# VAR's protocol (the paper's baselines: the VAR README's numbers) and the same seeds with more_smooth on (paired)
$launch sample.py --depth "$DEPTH" --w 0 --num_per_class 50 --seed "$SEED" --out_dir "$OUT/var_protocol"
$launch sample.py --depth "$DEPTH" --w 0 --num_per_class 50 --seed "$SEED" --more_smooth --out_dir "$OUT/var_protocol_smooth"
# the release's protocol of its guided samples: 10 per class, more_smooth on (its injector never trained: w = 0 is
# what its code can deliver)
$launch sample.py --depth "$DEPTH" --w 0 --num_per_class 10 --seed "$SEED" --more_smooth --out_dir "$OUT/release_protocol"
python evaluate.py "$OUT/var_protocol/samples_w0.npz" "$OUT/var_protocol_smooth/samples_w0.npz" --depth "$DEPTH" \
    --ref "$REF" --no_iscs --bootstrap 1000 --json "$OUT/audit_more_smooth.json"
python evaluate.py "$OUT/release_protocol/samples_w0.npz" --depth "$DEPTH" --ref "$REF" --no_iscs \
    --json "$OUT/audit_release_protocol.json"
if [ -n "${INJECTOR:-}" ]; then  # the method's gain under VAR's protocol, paired with the w = 0 file above
    $launch sample.py --depth "$DEPTH" --injector "$INJECTOR" --w 0.001 --num_per_class 50 --seed "$SEED" \
        --out_dir "$OUT/var_protocol"
    python evaluate.py "$OUT/var_protocol/samples_w0.npz" "$OUT/var_protocol/samples_w0.001.npz" --depth "$DEPTH" \
        --ref "$REF" --no_iscs --bootstrap 1000 --json "$OUT/audit_injector.json"
fi
echo "FID under VAR's protocol, with more_smooth, and under the release's 10k protocol: $OUT/audit_*.json"
