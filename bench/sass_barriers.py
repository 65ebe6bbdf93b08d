"""Scoreboards of a kernel's loads, read from a cubin without a GPU or cuobjdump (nvcc's ptxas is
enough): for each SASS instruction of the kernels whose name matches, its mnemonic (from a table of
sm_90 opcodes learned from cuobjdump output), destination register, the dependency barrier it sets
(wb), the read barrier (rb), the barriers it waits on (wait mask, bit i = barrier i) and its stall
count. A use of a load's result waits on the load's barrier; loads that share a barrier are waited
for together (h200_2026-11-29i: RopeSmallKernel's x loads and frequency loads all set barrier 5,
so the angles waited for x).

    nvcc -O3 -std=c++17 -arch=sm_90 -cubin -Icsrc csrc/rope/rope_cuda.cu -o /tmp/rope.cubin
    python3 bench/sass_barriers.py /tmp/rope.cubin 'RopeSmallKernelI13__nv_bfloat16S._Li8ELb1ELb0E.*Li2E' [--all]
    python3 bench/sass_barriers.py --learn sass.txt.gz   # refresh the table from `cuobjdump -sass` text

Control bits (the top 23 bits of each 128-bit instruction): stall [105:108], yield [109],
write barrier [110:112], read barrier [113:115], wait mask [116:121], reuse [122:125]; 7 = none.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import struct
import sys

TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sass_opcodes_sm90.json")
SHOWN = ("LDG", "STG", "LDC", "EXIT", "BRA", "BSSY", "BSYNC", "MUFU", "I2F")


def learn(path: str) -> int:
    """Opcode (low 12 bits) -> mnemonics, from `cuobjdump -sass` text, merged into TABLE."""
    text = (gzip.open(path, "rt") if path.endswith(".gz") else open(path)).read().split("\n")
    table = {int(k): set(v) for k, v in json.load(open(TABLE)).items()} if os.path.exists(TABLE) else {}
    for line in text:
        m = re.match(r"\s*/\*[0-9a-f]{4}\*/\s+(.*?)\s*/\* (0x[0-9a-f]+) \*/", line)
        if not m:
            continue
        ins = re.sub(r"^@!?U?P[T0-9]+\s+", "", m.group(1).strip().rstrip(";").strip())
        if ins:
            table.setdefault(int(m.group(2), 16) & 0xFFF, set()).add(ins.split()[0].split(".")[0])
    json.dump({str(k): sorted(v) for k, v in sorted(table.items())}, open(TABLE, "w"), indent=0)
    print(f"{len(table)} opcodes in {TABLE}")
    return 0


def sections(data: bytes):
    """(name, offset, size) of each section of an ELF64 file."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    raw = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = raw[shstrndx][4]
    for name, _typ, _flags, _addr, off, size in raw:
        end = data.index(b"\0", strtab + name)
        yield data[strtab + name:end].decode(), off, size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cubin", nargs="?")
    ap.add_argument("pattern", nargs="?", default=".", help="regex on the mangled kernel name")
    ap.add_argument("--all", action="store_true", help="every instruction (default: memory, control, waits)")
    ap.add_argument("--learn", metavar="SASS_TEXT")
    args = ap.parse_args()
    if args.learn:
        return learn(args.learn)
    if not args.cubin:
        ap.error("a cubin is needed")
    ops = {int(k): "/".join(v) for k, v in json.load(open(TABLE)).items()}
    data = open(args.cubin, "rb").read()
    pat = re.compile(args.pattern)
    for name, off, size in sections(data):
        if not name.startswith(".text.") or not pat.search(name):
            continue
        print(f"== {name[6:]}: {size // 16} instructions")
        for k in range(size // 16):
            lo, hi = struct.unpack_from("<QQ", data, off + 16 * k)
            mn = ops.get(lo & 0xFFF, f"?{lo & 0xFFF:03x}")
            wb, rb, wait, stall = (hi >> 46) & 7, (hi >> 49) & 7, (hi >> 52) & 0x3F, (hi >> 41) & 0xF
            pred = (lo >> 12) & 0xF
            if args.all or mn in SHOWN or wait:
                guard = "" if pred == 7 else f" @{'!' if pred & 8 else ''}P{pred & 7}"
                print(f"{16 * k:05x} {mn:<9s} R{(lo >> 16) & 0xFF:<3d} wb={wb if wb != 7 else '-'} "
                      f"rb={rb if rb != 7 else '-'} wait={wait:06b} stall={stall}{guard}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
