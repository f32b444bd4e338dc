"""Static SASS of the CUDA kernels without a GPU: instructions per tile and spills in the hot loop.

Compiles a kernel file with the NVRTC wheel (``pip install '.[kernels-check]'``) to an
sm_90 cubin, disassembles it with ``nvdisasm`` (``pip install nvidia-cuda-nvdisasm``,
or any CUDA toolkit's), and for each entry point prints the hot loop (the largest loop
with tensor-core instructions): its size, its HMMA (or HGMMA: --wgmma) count, instructions per one, the
opcode mix, and spill instructions (LDL/STL) in it and in the whole function.

    python3 bench/sass_counts.py attention_fwd.cu 128 [--fwd-tiles 4,2,64] [--full-tiles] [--wgmma]

``--full-tiles`` compiles with the element mask of mixed tiles switched off (text
replacement, analysis only), so the loop is the path a full tile takes: the per-tile
instruction count that the GPU's own counters (ncu: ``smsp__inst_executed``) sum up.
Static counts from one NVRTC version; the GPU machine's may schedule differently.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile

from mpiring.backends import cupy_

_FULL_TILES = {  # analysis only: mixed tiles treated as full, so the loop is the full-tile path
    "attention_fwd.cu": ("    const bool mixed = tile_class(t) == 2;", "    const bool mixed = false;"),
    "attention_bwd.cu": ("      const bool mixed = tile_class(t) == 2;", "      const bool mixed = false;"),
}


def _nvdisasm() -> str:
    found = shutil.which("nvdisasm")
    if found:
        return found
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    for root in spec.submodule_search_locations if spec else []:
        for dirpath, _, files in os.walk(root):
            if "nvdisasm" in files:
                return os.path.join(dirpath, "nvdisasm")
    raise SystemExit("nvdisasm not found: pip install nvidia-cuda-nvdisasm (or put a CUDA toolkit on PATH)")


def cubin(kernel_file: str, head_dim: int, tiles=None, full_tiles: bool = False, wgmma: bool = False) -> bytes:
    from cuda.pathfinder import load_nvidia_dynamic_lib

    lib = ctypes.CDLL(load_nvidia_dynamic_lib("nvrtc").abs_path)
    sources = cupy_.kernel_sources()
    if full_tiles:
        old, new = _FULL_TILES[kernel_file]
        if old not in sources[kernel_file]:
            raise SystemExit(f"--full-tiles: {old.strip()!r} not found in {kernel_file}")
        sources = {**sources, kernel_file: sources[kernel_file].replace(old, new)}
    code = cupy_._inline_header(sources[kernel_file], sources)
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), kernel_file.encode(), 0, None, None):
        raise SystemExit("nvrtcCreateProgram failed")
    options = list(cupy_.compile_options(kernel_file, head_dim, tiles, wgmma=wgmma))
    if not wgmma:  # (the wgmma variants carry their own sm_90a)
        options.append("--gpu-architecture=sm_90")
    rc = lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*(o.encode() for o in options)))
    if rc:
        raise SystemExit(f"NVRTC failed ({rc})")
    size = ctypes.c_size_t()
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetCUBIN(prog, buf)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return buf.raw


def functions(sass: str) -> dict[str, list[str]]:
    """Entry point → its lines."""
    parts = re.split(r"^\s*\.text\.(\w+):\s*$", sass, flags=re.MULTILINE)
    return {parts[i]: parts[i + 1].splitlines() for i in range(1, len(parts) - 1, 2)}


def hot_loop(lines: list[str]):
    """(instructions [(address, text)], (start, end) of the largest loop with HMMA)."""
    ins, labels = [], {}
    pending = []
    for line in lines:
        m = re.match(r"\s*\.(L_x_\d+):", line)
        if m:
            pending.append(m.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            address = int(m.group(1), 16)
            for name in pending:
                labels[name] = address
            pending = []
            ins.append((address, m.group(2).strip()))
    loops = []
    for address, text in ins:
        m = re.search(r"BRA.*?`\(\.(L_x_\d+)\)", text)
        if m and labels.get(m.group(1), address + 1) < address:
            loops.append((labels[m.group(1)], address))
    hot = [(a, b) for a, b in loops if any("MMA" in t for x, t in ins if a <= x <= b)]  # HMMA or HGMMA
    return ins, max(hot, key=lambda r: r[1] - r[0]) if hot else None


def _opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kernel_file", choices=cupy_.KERNEL_FILES)
    p.add_argument("head_dim", type=int)
    p.add_argument("--fwd-tiles", default=None, help="forward tiles warps,mi,bn (default: TILES)")
    p.add_argument("--full-tiles", action="store_true", help="mixed tiles compiled as full (the full-tile path)")
    p.add_argument("--function", default=None, help="only this entry point")
    p.add_argument("--wgmma", action="store_true", help="the Hopper (sm_90a) variant of the kernel file")
    args = p.parse_args()
    tiles = None
    if args.fwd_tiles:
        tiles = {args.head_dim: {**cupy_.TILES[args.head_dim], "fwd": tuple(int(x) for x in args.fwd_tiles.split(","))}}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin(args.kernel_file, args.head_dim, tiles, args.full_tiles, args.wgmma))
        sass = subprocess.run([_nvdisasm(), "-c", path], capture_output=True, text=True, check=True).stdout
    for name, lines in functions(sass).items():
        if args.function and name != args.function:
            continue
        ins, loop = hot_loop(lines)
        spills = [t for _, t in ins if re.search(r"\b(LDL|STL)", t)]
        if loop is None:
            print(f"{name}: {len(ins)} instructions, no loop with HMMA; spill instructions {len(spills)}")
            continue
        body = [t for a, t in ins if loop[0] <= a <= loop[1]]
        ops = collections.Counter(_opcode(t) for t in body)
        hmma = sum(v for k, v in ops.items() if k.startswith(("HMMA", "HGMMA")))  # per warp / per warpgroup
        in_loop = sum(1 for t in body if re.search(r"\b(LDL|STL)", t))
        print(f"{name}: hot loop {len(body)} instructions, {hmma} HMMA ({len(body) / max(hmma, 1):.2f} per HMMA); "
              f"spill instructions {in_loop} in the loop, {len(spills)} in all")
        print("   " + ", ".join(f"{k} {v}" for k, v in ops.most_common(16)))


if __name__ == "__main__":
    sys.exit(main())
