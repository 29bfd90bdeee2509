"""permute / unpermute bandwidth vs Tensor.copy_ on CPU (1 thread, process CPU time: robust on a
shared machine). Bytes = read + written.

    PYTHONPATH=. python bench/cpu_permute.py
"""
import torch, time, sys, statistics
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))
import moe_ops, moe_ops._C
ops = torch.ops.moe_ops
torch.set_num_threads(1)
for T, E, k, H in ((512, 64, 2, 1024), (4096, 64, 8, 1024)):
    x = torch.randn(T, H).bfloat16()
    ids = torch.topk(torch.randn(T, E), k).indices.int()
    w = torch.rand(T, k)
    p = ops.permute(x, ids, E, 1)
    y = torch.randn(p[0].shape).bfloat16()
    S = T * k
    mv = S * H * 2  # bytes of x_sorted / y_sorted rows
    perm_bytes = S * H * 2 + S * H * 2     # read T*k rows (gathered), write T*k rows
    unp_bytes = S * H * 2 + T * H * 2      # read T*k rows, write T rows
    src = torch.randn(S, H).bfloat16(); dst = torch.empty_like(src)
    f = {"permute": lambda: ops.permute(x, ids, E, 1), "unpermute": lambda: ops.unpermute(y, p[3], w, k),
         "copy_": lambda: dst.copy_(src)}
    b = {"permute": perm_bytes, "unpermute": unp_bytes, "copy_": 2 * S * H * 2}
    res = {n: [] for n in f}
    for n in f: f[n]()
    for _ in range(21):
        for n in f:
            t0 = time.process_time(); f[n](); res[n].append(time.process_time() - t0)
    print(f"T={T} E={E} k={k} H={H} bf16 threads={torch.get_num_threads()} load={open('/proc/loadavg').read().split()[0]}")
    bw = {}
    for n in f:
        m = statistics.median(res[n]); bw[n] = b[n] / m / 1e9
        print(f"  {n:10s} median {m*1e3:8.3f} ms  {bw[n]:6.2f} GB/s (read+write)")
    for n in ("permute", "unpermute"):
        print(f"  {n} / copy_ bandwidth = {bw[n] / bw['copy_']:.2f}")
