"""Every public function works as the *first* moe_ops call of a fresh process.

The compiled extension and the backends load lazily, so a function that reaches for
``torch.ops.moe_ops.<op>`` before anything loaded them fails (or, worse, silently takes a slower
path) only in a fresh process -- never inside a test session where earlier tests loaded them.
One subprocess imports torch and moe_ops, then forks a child per snippet, so each child starts
with nothing loaded, exactly as a user's script does.
"""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> code run as the first moe_ops call; it must run and print nothing to stderr. Each checks
# its result against the reference (computed *after* the call under test).
SNIPPETS = {
    "topk_gating": """
        L = torch.randn(6, 8)
        w, i = moe_ops.topk_gating(L, 2)
        rw, ri = reference.topk_gating(L, 2, "softmax", False, 0, 0, None, 1.0)
        assert torch.equal(i, ri) and torch.allclose(w, rw)""",
    "permute": """
        x = torch.randn(6, 16); ids = torch.randint(0, 4, (6, 2))
        got = moe_ops.permute(x, ids, 4)
        want = reference.permute(x, ids.int(), 4, 1)
        assert all(torch.equal(a, b) for a, b in zip(got, want))""",
    "unpermute": """
        y = torch.randn(12, 16); rows = torch.randperm(12).int(); w = torch.rand(6, 2)
        assert torch.allclose(moe_ops.unpermute(y, rows, w), reference.unpermute(y, rows, w, 2))""",
    "capacity_dispatch": """
        x = torch.randn(6, 16); ids = torch.randint(0, 4, (6, 2))
        got = moe_ops.capacity_dispatch(x, ids, 4, 3)
        want = reference.capacity_dispatch(x, ids.int(), 4, 3, "kmajor")
        assert all(torch.equal(a, b) for a, b in zip(got, want))""",
    "capacity_combine": """
        buf = torch.randn(4, 3, 16); ids = torch.randint(0, 4, (6, 2)).int()
        pos = torch.randint(-1, 3, (6, 2)).int(); w = torch.rand(6, 2)
        assert torch.allclose(moe_ops.capacity_combine(buf, ids, pos, w),
                              reference.capacity_combine(buf, ids, pos, w))""",
    "grouped_gemm": """
        a = torch.randn(10, 16); b = torch.randn(3, 16, 8); offs = torch.tensor([0, 2, 7, 10]).int()
        assert torch.allclose(moe_ops.grouped_gemm(a, b, offs), reference.grouped_gemm(a, b, offs, False),
                              atol=1e-5)""",
    "grouped_gemm_wgrad": """
        a = torch.randn(10, 16); dc = torch.randn(10, 8); offs = torch.tensor([0, 2, 7, 10]).int()
        assert torch.allclose(moe_ops.grouped_gemm_wgrad(a, dc, offs, 3),
                              reference.grouped_gemm_wgrad(a, dc, offs, 3), atol=1e-5)""",
    "moe_forward": """
        x = torch.randn(6, 32); L = torch.randn(6, 4)
        wgu = torch.randn(4, 16, 32) / 6; wd = torch.randn(4, 32, 8) / 3
        out = moe_ops.moe_forward(x, L, wgu, wd, 2)
        assert torch.allclose(out, moe_ops.moe_forward(x, L, wgu, wd, 2, backend="reference"), atol=1e-4)""",
    "pack_experts": """
        wgu = torch.randn(4, 64, 32, dtype=torch.bfloat16); wd = torch.randn(4, 32, 32, dtype=torch.bfloat16)
        pk = moe_ops.pack_experts(wgu, wd)
        x = torch.randn(6, 32, dtype=torch.bfloat16); L = torch.randn(6, 4)
        out = moe_ops.moe_forward(x, L, wgu, wd, 2, packed=pk).float()
        ref = moe_ops.moe_forward(x.double(), L.double(), wgu.double(), wd.double(), 2, backend="reference")
        assert (out - ref).abs().max() <= 0.05 * ref.abs().max()""",
    "MoE.pack_for_cpu": """
        torch.manual_seed(0)
        m = moe_ops.MoE(32, 16, 4, 2, dtype=torch.bfloat16).pack_for_cpu()
        x = torch.randn(6, 32, dtype=torch.bfloat16)
        with torch.no_grad():
            out = m(x)
            m.pack_for_cpu(False)
            assert torch.allclose(out.float(), m(x).float(), atol=0.02, rtol=0.02)""",
    "MoE": """
        m = moe_ops.MoE(32, 16, 4, 2)
        m(torch.randn(6, 32)).sum().backward()""",
    "to_local_ids": """
        ids = torch.tensor([[0, 5], [3, 7]])
        assert moe_ops.to_local_ids(ids, (4, 8)).tolist() == [[-1, 1], [-1, 3]]""",
    "expert_capacity": """
        assert moe_ops.expert_capacity(64, 2, 8, 1.25) == 20""",
    "build_info": """
        info = moe_ops.build_info()
        assert info["native"] and "cpu" in info["backends"], info""",
    "available_backends": """
        assert "cpu" in moe_ops.available_backends("permute", "cpu")""",
    "load_errors": """
        assert "cpu" not in moe_ops.load_errors(), moe_ops.load_errors()""",
}

_DRIVER = """
import os, sys, traceback
import torch, moe_ops
from moe_ops import reference
snippets = {snippets!r}
failed = []
for name, code in snippets.items():
    pid = os.fork()
    if pid == 0:
        try:
            exec(code, {{"torch": torch, "moe_ops": moe_ops, "reference": reference}})
        except BaseException:
            sys.stderr.write(f"--- {{name}}\\n" + traceback.format_exc())
            sys.stderr.flush()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failed.append(name)
print("FAILED:" + ",".join(failed))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_every_public_function_works_as_the_first_call():
    snippets = {n: textwrap.dedent(c) for n, c in SNIPPETS.items()}
    env = {k: v for k, v in os.environ.items() if k != "MOE_OPS_BACKEND"}
    proc = subprocess.run([sys.executable, "-c", _DRIVER.format(snippets=snippets)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("FAILED:"), proc.stderr[-6000:]
