"""Per-core compute throughput of each repack step, on one 7B-sized layer (11008 × 4096), from memory.

Prints one JSON line per step: GB/s of *packed input* on one thread (``torch.set_num_threads(1)``).
No disk I/O: tensors are synthesized in memory.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from npuconv import layouts
from npuconv.memory import tune_allocator
from npuconv.model import LinearSpec, QuantizedLinear
from npuconv.packing import unpack_bitstream
from npuconv.readers.awq import unpack_gemm
from npuconv.readers.gptq import unpack_qweight
from npuconv.registry import target_class
from npuconv.writers import WriterOptions

N, K, G = 11008, 4096, 128


def timed(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def report(step: str, nbytes: int, seconds: float) -> None:
    print(json.dumps({"step": step, "input_mb": round(nbytes / 1e6, 1), "seconds": round(seconds, 4),
                      "gb_per_s_per_core": round(nbytes / seconds / 1e9, 2)}), flush=True)


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    tune_allocator()  # as the CLI does
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(-(2**31), 2**31 - 1, (K // 8, N), dtype=torch.int32, generator=gen)  # GPTQ qweight
    report("gptq unpack (qweight [K/8,N] → codes [N,K] view)", words.numel() * 4,
           timed(lambda: unpack_qweight(words, 4, K)))
    awq = torch.randint(-(2**31), 2**31 - 1, (K, N // 8), dtype=torch.int32, generator=gen)
    report("awq unpack (qweight [K,N/8] → codes [N,K] view)", awq.numel() * 4, timed(lambda: unpack_gemm(awq, N)))
    ct = torch.randint(-(2**31), 2**31 - 1, (N, K // 8), dtype=torch.int32, generator=gen)
    report("ct unpack (weight_packed [N,K/8] → codes [N,K])", ct.numel() * 4, timed(lambda: unpack_bitstream(ct, 4, K)))
    codes = unpack_qweight(words, 4, K)
    spec = LinearSpec("x", N, K, 4, G, symmetric=False, scale_dtype=torch.float16)
    layer = QuantizedLinear(spec, codes, torch.rand(N, K // G).half(), torch.randint(0, 16, (N, K // G), dtype=torch.int16))
    writer = target_class("npu-int4")(WriterOptions())
    report("npu-int4 write from GPTQ/AWQ (codes → int4pack [K,N/8] + scales/offsets)", words.numel() * 4,
           timed(lambda: writer.write_layer(layer)))
    nz_writer = target_class("npu-int4")(WriterOptions(nz=True))
    report("npu-int4 write with NZ tiles", words.numel() * 4, timed(lambda: nz_writer.write_layer(layer)))
    packed = layouts.int4pack((codes.T - 8).view(torch.int8))
    report("nd_to_nz (int32 [K,N/8], C0=8)", packed.numel() * 4, timed(lambda: layouts.nd_to_nz(packed, 8)))
    ct_layer = QuantizedLinear(spec, unpack_bitstream(ct, 4, K), layer.scale, layer.zero)
    report("npu-int4 write from CT ([N,K] codes, transposed)", ct.numel() * 4, timed(lambda: writer.write_layer(ct_layer)))
    report("gptq → npu-int4 (unpack + write)", words.numel() * 4,
           timed(lambda: writer.write_layer(QuantizedLinear(spec, unpack_qweight(words, 4, K), layer.scale, layer.zero))))
    int8 = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=gen)
    report("int8 transpose [N,K] → [K,N]", int8.numel(), timed(lambda: int8.T.contiguous()))


if __name__ == "__main__":
    main()
