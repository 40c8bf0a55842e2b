"""Shared by the benchmarks (a module, not a script): model FLOPs, the machine's own large-matmul rate, timing,
peak memory, and running the project's scripts as logged subprocesses (`run`, `run_measured`).

Model FLOPs are counted with torch.utils.flop_counter (matmuls, convolutions, attention; no element-wise ops),
with the CPU's fused attention kernel added: the counter knows the GPU's attention kernels but not
`_scaled_dot_product_flash_attention_for_cpu`, so on the CPU it would silently count attention as 0.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils import flop_counter

_CPU_ATTENTION = {}  # op -> FLOPs from the shapes of its tensor arguments (FlopCounterMode passes shapes)
for _name, _formula in (
        ('_scaled_dot_product_flash_attention_for_cpu',
         lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v)),
        ('_scaled_dot_product_flash_attention_for_cpu_backward',
         lambda grad_out, q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_backward_flop_count(grad_out, q, k, v))):
    _op = getattr(torch.ops.aten, _name, None)
    if _op is not None:
        _CPU_ATTENTION[_op] = _formula


def count_flops(fn):
    """Runs fn() once under the FLOP counter. Returns (fn's result, FLOPs)."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as fc:
        out = fn()
    return out, fc.get_total_flops()


def sync(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(wall seconds, CPU seconds of this process) of one fn() call; waits for the GPU before and after."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def matmul_rate(device, dtype, n, reps=3):
    """FLOP/s of an n x n x n matrix product on random data (median of reps after a warm-up), as
    {'wall': FLOP/s, 'cpu': FLOP per CPU-second of this process}. The CPU figure is the one to compare with on a
    shared CPU: time slices lost to other processes do not count against it."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(3 if torch.device(device).type == 'cuda' else 1):  # warm-up (cuBLAS handles, clocks)
        a @ b
    flop = 2 * n ** 3
    ts = [timed(lambda: a @ b, device) for _ in range(reps)]
    return dict(wall=flop / statistics.median(t for t, _ in ts), cpu=flop / max(statistics.median(c for _, c in ts), 1e-9))


def peak_memory(device) -> dict:
    """Peak memory of this process so far: on the GPU torch's max allocated / reserved, on the CPU the max RSS (GiB)."""
    if torch.device(device).type == 'cuda':
        return dict(peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30,
                    peak_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30)
    return dict(peak_mem_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


REPO = Path(__file__).resolve().parents[1]


def run(cmd, log, env=None, python_args=()):
    """One run of a project script (cmd: [script, *args]) with its output in a log file (parallel runs would interleave)."""
    env = dict(os.environ, **(env or {}))
    env.setdefault('OMP_NUM_THREADS', '1')  # on small shared CPUs one thread per process is several times faster
    print('$', ' '.join(cmd), '>', log, flush=True)
    with open(log, 'a') as f:
        r = subprocess.run([sys.executable, *python_args, *cmd], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        tail = ''.join(open(log, errors='replace').readlines()[-15:])
        raise SystemExit(f'failed (exit {r.returncode}): {" ".join(cmd)}; see {log}; its last lines:\n{tail}')


# runs a script as `python script args` does (runpy, as __main__), then writes what its process measured
_MEASURED = """import json, runpy, sys
import torch
repo, out, flops = sys.argv[1:4]
sys.argv = sys.argv[4:]
sys.path[:0] = [repo, repo + '/benchmarks']
import perf
script = lambda: runpy.run_path(sys.argv[0], run_name='__main__')
res = {}
if flops == '1':
    res['flops'] = perf.count_flops(script)[1]
else:
    script()
res.update(perf.peak_memory('cuda' if torch.cuda.is_available() else 'cpu'), threads=torch.get_num_threads())
json.dump(res, open(out, 'w'))
"""


def run_measured(cmd, log, flops=False, env=None) -> dict:
    """run(cmd, log, env) with measurements made inside the script's process: its peak memory (peak_memory), its
    torch threads, and with flops=True the model FLOPs of the whole run (count_flops). The script runs as it does from
    the command line: what is measured is the script, through its flags, not functions imported from it."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / 'measured.json'
        run(cmd, log, env, python_args=('-c', _MEASURED, str(REPO), str(out), '1' if flops else '0'))
        return json.loads(out.read_text())
