"""One decode GEMV (int4 g128, M = 1, or M rows) launched a few times with its tuned config: the target
of an Nsight Compute run (benchmarks/README.md).   ncu ... python3 ncu_target.py K N [BITS [M]]"""
import sys

import torch

from qruntime.kernels.layout import prepare
from qruntime.kernels.qmatmul import qmatmul_accumulate
from qruntime.quantizers.rtn import quantize_rtn

k, n = int(sys.argv[1]), int(sys.argv[2])
bits = int(sys.argv[3]) if len(sys.argv) > 3 else 4
m = int(sys.argv[4]) if len(sys.argv) > 4 else 1
lin = prepare(quantize_rtn(torch.randn(n, k, device="cuda") * 0.02, bits, 128, False), torch.device("cuda"), torch.float16)
x = torch.randn(m, k, device="cuda", dtype=torch.float16)
out = torch.zeros(m, n, device="cuda")
print("config", lin.splitk_config(m))
for _ in range(5):
    qmatmul_accumulate(x, lin, out)
torch.cuda.synchronize()
