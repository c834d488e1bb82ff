"""Offline instruction counts of the fused decode attention's history loop, on a CPU-only machine.

Compiles the split kernel for the H100 (sm_90) with the Triton and ptxas that the local install
ships, with the tables the benchmark's Llama-8B-shaped quantizers give at each bit rate and the
settings a GPU run would use (inline PTX on, programmatic dependent launch, the default register
cap), then disassembles it and counts the SASS instructions of each loop that issues tensor-core
products (the history loop first, then the exact tokens' loop), per thread and per block of
tokens. Prints a table; writes JSON.

    python benchmarks/kernel_sass.py --bits 4 2.25 --out benchmarks/results/kernel_sass.json
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.kernels import DIM, HKV, HQ, SINKS, WINDOW, quantizer_pair  # noqa: E402
from spectralquant.kernels import triton_attention  # noqa: E402
from spectralquant.kernels.random_cache import random_compressed_kv  # noqa: E402

TYPES = {torch.int32: "i32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
         torch.int64: "i64", torch.uint8: "u8"}
SASS_LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
BINDIR = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def split_kernel_launch(bits: float, context: int) -> tuple[tuple, dict]:
    """The arguments the split kernel is launched with for a batch-1 attention at ``bits``."""
    launched = {}

    class Capture:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.setdefault("split", (args, kwargs))

            return launch

    kv = random_compressed_kv(1, HKV, DIM, context - WINDOW, WINDOW, SINKS, dtype=torch.bfloat16, encode=False,
                              quantizers=quantizer_pair(bits))
    query = torch.randn(1, HQ, 1, DIM, dtype=torch.bfloat16)
    split, combine = triton_attention._split_kernel, triton_attention._combine_kernel
    triton_attention._split_kernel = triton_attention._combine_kernel = Capture()
    try:
        triton_attention.compressed_attention_triton(query, kv)
    finally:
        triton_attention._split_kernel, triton_attention._combine_kernel = split, combine
    return launched["split"]


def compile_sm90(args: tuple, kwargs: dict, maxnreg: int) -> bytes:
    """The cubin of the split kernel for sm_90, specialized as a launch with these arguments would be
    (pointer and int arguments divisible by 16 marked so, ints equal to 1 made constants)."""
    fn = triton_attention._split_kernel
    names = fn.arg_names
    consts = {k: v for k, v in kwargs.items() if k in names}
    consts.update(PTX=True, PDL=True)
    signature, attrs = {}, {}
    for i, (name, a) in enumerate(zip(names, args)):
        if isinstance(a, torch.Tensor):
            signature[name] = "*" + TYPES[a.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, bool):
            signature[name] = "i1"
        elif isinstance(a, int):
            if a == 1:
                consts[name] = 1
            else:
                signature[name] = "i32"
                if a % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    signature.update({k: "constexpr" for k in consts})
    signature = {n: signature[n] for n in names}
    src = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=kwargs["num_warps"], maxnreg=maxnreg))
    return kernel.asm["cubin"]


def tool(name: str, *args: str) -> str:
    return subprocess.run([str(BINDIR / name), *args], capture_output=True, text=True, check=True).stdout


def mma_loops(sass: str) -> list[collections.Counter]:
    """Instruction histograms (opcode without modifiers) of the loops that contain ``HMMA``."""
    ins = [(int(m.group(1), 16), m.group(2), line) for line in sass.splitlines() if (m := SASS_LINE.match(line))]
    loops = []
    for addr, op, line in ins:
        target = re.search(r"0x([0-9a-f]+)", line.split("BRA", 1)[1]) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < addr:
            body = collections.Counter(o.split(".")[0] for a, o, _ in ins if int(target.group(1), 16) <= a <= addr)
            if body["HMMA"]:
                loops.append(body)
    return loops


def measure(bits: float, context: int) -> dict:
    args, kwargs = split_kernel_launch(bits, context)
    crosses = kwargs["K_CROSSES"] or kwargs["V_CROSSES"]
    maxnreg = triton_attention.TUNING["maxnreg"][crosses]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "split.cubin"
        cubin.write_bytes(compile_sm90(args, kwargs, maxnreg))
        sass = tool("cuobjdump", "-sass", str(cubin))
        usage = tool("cuobjdump", "-res-usage", str(cubin)).strip().splitlines()[-1].strip()
    loops = mma_loops(sass)
    return dict(bits=bits, block_t=kwargs["BT"], maxnreg=maxnreg, resources=usage,
                loops=[dict(instructions=sum(c.values()), opcodes=dict(c.most_common())) for c in loops])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=float, nargs="+", default=[4.0, 3.5, 2.75, 2.25])
    p.add_argument("--context", type=int, default=4096, help="tokens of the attention whose launch is compiled")
    p.add_argument("--out", default=None, help="JSON path")
    args = p.parse_args()
    rows = []
    print(f"Triton {triton.__version__}, sm_90; per thread per block of tokens")
    for bits in args.bits:
        row = measure(bits, args.context)
        rows.append(row)
        print(f"{bits:>5g} bits ({row['resources']})")
        for i, loop in enumerate(row["loops"]):
            top = " ".join(f"{k}:{v}" for k, v in list(loop["opcodes"].items())[:14])
            print(f"   loop {i}: {loop['instructions']:5d}  {top}")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(triton=triton.__version__, target="sm_90", rows=rows), indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
