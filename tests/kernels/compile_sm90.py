"""Compile the Triton kernels for sm_90 (Hopper) without a GPU and report registers, spills and shared memory.

Run as a script (not under ``TRITON_INTERPRET``): ``python tests/kernels/compile_sm90.py``. It prints one JSON line
per kernel variant: {"name", "ok", "error", "registers", "spill_stack", "shared"}. Used by test_compile_sm90.py; also
handy when changing a kernel on a machine without a GPU (Triton ships ptxas and cuobjdump for this).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dit_accel.kernels import triton_block_sparse as tbs

TARGET = GPUTarget("cuda", 90, 32)
POINTERS = {"Q", "K", "V", "O", "OS", "OF", "OL", "X", "OUT", "PHIK", "RES"}
F32_POINTERS = {"LSE", "MASS", "LSES", "LSEF", "S", "Z", "STOT", "ZTOT", "KPAD", "RHO"}
I32_POINTERS = {"LUT", "CNT", "NLUT", "NCNT", "MLUT", "MCNT", "IDX", "KGRP"}
I64_POINTERS = {"QGRP"}


def _signature(fn, dtype: str, consts: dict, desc: str | None) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in POINTERS:
            sig[name] = f"*{dtype}"
        elif name in F32_POINTERS:
            sig[name] = "*fp32"
        elif name in I32_POINTERS:
            sig[name] = "*i32"
        elif name in I64_POINTERS:
            sig[name] = "*i64"
        elif name in ("k_desc", "v_desc"):
            sig[name] = desc or f"*{dtype}"
        elif name in ("qk_scale", "tau", "rho_add"):
            sig[name] = "fp32"
        elif name in ("SCORES",):
            sig[name] = "*fp32"
        elif name in ("MASK_IN", "FORCED", "MASK_OUT"):
            sig[name] = "*i8"
        else:
            sig[name] = "i32"
    return sig


def _resources(kernel) -> tuple[int | None, int | None]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
        fh.write(kernel.asm["cubin"])
    out = subprocess.run([tool, "--dump-resource-usage", fh.name], capture_output=True, text=True).stdout
    os.unlink(fh.name)
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    return (int(regs.group(1)) if regs else None), (int(stack.group(1)) if stack else None)


def attention_variant(kind: str, dtype: str, head: int, block_m: int, block_n: int, cfg: dict, extra: dict) -> tuple:
    fn = {"bsa": tbs._bsa_fwd, "pair": tbs._pair_fwd, "sla": tbs._sla_fwd}[kind]
    consts = dict(
        BLOCK_M=cfg["tile_m"], LUT_BLOCK_M=block_m, BLOCK_N=block_n, TILE_N=cfg["tile_n"], HEAD_D=head,
        HEAD_DV=head, USE_TMA=cfg["tma"], MASK_N=True, MASK_KV=not cfg["tma"], PAD_D=False, FP32=dtype == "fp32",
        HAS_KPAD=False,
    )  # fmt: skip
    if kind == "bsa":
        consts.update(HAS_GROUPS=False, GROUP_WORDS=1, HAS_RESHAPE=False, RHO_CLAMP=False, RES_CHUNK=32)
    consts.update(extra)
    desc = f"tensordesc<{dtype}[1, 1, {cfg['tile_n']}, {head}]>" if cfg["tma"] else None
    return fn, _signature(fn, dtype, consts, desc), consts, cfg["num_warps"], cfg["num_stages"]


def variants():
    bsa_extra = dict(WRITE_LSE=True, WRITE_MASS=False, MASS_ATOMIC=False)
    for head in (64, 128):
        cfg = tbs._default_config("bsa", 128, 128, head, False)
        yield f"bsa-default-d{head}", attention_variant("bsa", "bf16", head, 128, 128, cfg, bsa_extra)
        reshape = dict(bsa_extra, HAS_RESHAPE=True, RHO_CLAMP=True)  # Re-ttention's epilogue: still no spills
        yield f"bsa-default-reshape-d{head}", attention_variant("bsa", "bf16", head, 128, 128, cfg, reshape)
        kpad = dict(bsa_extra, HAS_KPAD=True)  # a key-padding mask (HunyuanVideo's padded prompt): still no spills
        yield f"bsa-default-kpad-d{head}", attention_variant("bsa", "bf16", head, 128, 128, cfg, kpad)
        for words in (1, 2):  # VMoBA's token-level chunk gating, up to 64 and 128 chunks
            groups = dict(bsa_extra, HAS_GROUPS=True, GROUP_WORDS=words)
            yield f"bsa-default-groups{words}-d{head}", attention_variant("bsa", "bf16", head, 128, 128, cfg, groups)
        tma = dict(cfg, tma=True, num_stages=3)
        yield f"bsa-tma-d{head}", attention_variant("bsa", "bf16", head, 128, 128, tma, bsa_extra)
        cfg = tbs._default_config("pair", 128, 128, head, False)
        yield f"pair-default-d{head}", attention_variant("pair", "bf16", head, 128, 128, cfg, {})
        yield f"pair-kpad-d{head}", attention_variant("pair", "bf16", head, 128, 128, cfg, dict(HAS_KPAD=True))
        cfg = tbs._default_config("sla", 64, 64, head, False)
        yield f"sla-default-d{head}", attention_variant("sla", "bf16", head, 64, 64, cfg, dict(PHI=0))
        yield f"sla-kpad-d{head}", attention_variant("sla", "bf16", head, 64, 64, cfg, dict(PHI=0, HAS_KPAD=True))
    mass = dict(WRITE_LSE=True, WRITE_MASS=True, MASS_ATOMIC=True)
    cfg = dict(tbs._default_config("bsa", 128, 64, 64, False), tile_m=64, num_warps=4)
    yield "bsa-mass-atomic-fp16-d64", attention_variant("bsa", "fp16", 64, 128, 64, cfg, mass)
    yield "bsa-mass-kpad-fp16-d64", attention_variant("bsa", "fp16", 64, 128, 64, cfg, dict(mass, HAS_KPAD=True))
    for mode in (0, 1, 2):
        consts = dict(MODE=mode, HAS_FORCED=mode == 1, WRITE_MASK=mode != 0, WRITE_LUT=True, WIDTH=1024)
        yield f"select-mode{mode}", (tbs._select_lut, _signature(tbs._select_lut, "fp32", consts, None), consts, 4, 1)
    for kp in (False, True):
        consts = dict(POOL=128, TILE=64, HEAD_D=128, HAS_KPAD=kp)
        yield "pool" + "-kpad" * kp, (tbs._pool_mean, _signature(tbs._pool_mean, "bf16", consts, None), consts, 4, 1)
    consts = dict(TILE=64, HEAD_D=128)
    yield "gather", (tbs._gather_tokens, _signature(tbs._gather_tokens, "bf16", consts, None), consts, 4, 1)
    for kp in (False, True):
        consts = dict(CHUNK=2048, BLOCK_N=64, HEAD_D=128, HEAD_DV=128, PHI=0, FP32=False, HAS_KPAD=kp)
        yield "kv-stats" + "-kpad" * kp, (tbs._kv_stats, _signature(tbs._kv_stats, "bf16", consts, None), consts, 8, 1)
    consts = dict(BLOCK_M=64, LUT_BLOCK_M=64, KB=64, HEAD_D=128, FP32=False)
    sig = _signature(tbs._kept_mass_fwd, "bf16", consts, None) | {
        "MEAN": "*fp32", "VAR": "*fp32", "LOGC": "*fp32", "ALPHA": "*fp32", "OUTSIDE": "*i8", "scale": "fp32"
    }  # fmt: skip
    yield "kept-mass", (tbs._kept_mass_fwd, sig, consts, 8, 1)


def main() -> None:
    only = sys.argv[1:]
    for name, (fn, sig, consts, warps, stages) in variants():
        if only and not any(o in name for o in only):
            continue
        row = {"name": name, "ok": False, "error": "", "registers": None, "spill_stack": None, "shared": None}
        try:
            src = ASTSource(fn=fn, signature=sig, constexprs=consts)
            kernel = triton.compile(src, target=TARGET, options={"num_warps": warps, "num_stages": stages})
            row["registers"], row["spill_stack"] = _resources(kernel)
            row["shared"] = kernel.metadata.shared
            row["ok"] = True
        except Exception as exc:  # reported, the caller decides
            row["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
