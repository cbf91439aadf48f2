"""One decode GEMV (int4 g128, M = 1) launched a few times with its tuned config: the target of an
Nsight Compute run (benchmarks/README.md).   ncu ... python3 ncu_target.py K N [BITS]"""
import sys

import torch

from qruntime.kernels.layout import prepare
from qruntime.kernels.qmatmul import qmatmul_accumulate
from qruntime.quantizers.rtn import quantize_rtn

k, n = int(sys.argv[1]), int(sys.argv[2])
bits = int(sys.argv[3]) if len(sys.argv) > 3 else 4
lin = prepare(quantize_rtn(torch.randn(n, k, device="cuda") * 0.02, bits, 128, False), torch.device("cuda"), torch.float16)
x = torch.randn(1, k, device="cuda", dtype=torch.float16)
out = torch.zeros(1, n, device="cuda")
print("config", lin.splitk_config(1))
for _ in range(5):
    qmatmul_accumulate(x, lin, out)
torch.cuda.synchronize()
