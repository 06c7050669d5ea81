#!/usr/bin/env bash
# FlashAttention-4 (and cuDNN frontend's block-sparse attention) for the GPU machine, which has no internet and
# receives at most 64 MiB per call (the working tree, about 7 MB, included).
#
# Here (internet, any CPU machine):
#   bash scripts/stage_fa4.sh download     # pinned wheels -> .fa4/wheels/ (Python 3.12, x86_64, CUDA 13 flavour)
#   bash scripts/stage_fa4.sh pack         # one site tree, tar | xz -9e (256 MiB window), split into .fa4/parts/
# On the GPU machine (one part per call; the machine must stay warm between the calls, idle_release_s is ~30 s):
#   run(command="bash scripts/stage_fa4.sh receive", carry=[".fa4/parts/fa4.tar.xz.part-aa", ".fa4/parts/MANIFEST"])
#   run(command="bash scripts/stage_fa4.sh receive && DEADLINE=400 bash scripts/gpu_check.sh fa4",
#       carry=[".fa4/parts/fa4.tar.xz.part-ab", ".fa4/parts/MANIFEST"])
#   `receive` keeps each part under /tmp/fa4_parts (outside the tree: ignored paths not named in carry survive on a
#   warm machine, but /tmp is simpler), and once every part in MANIFEST is there with its sha256, unpacks the site
#   tree to /tmp/site-fa4. gpu_check.sh's fa4 step then puts it on PYTHONPATH (`stage_fa4.sh env`).
#
# Measured 2026-12-07 (cp312 manylinux_2_28 wheels): nvidia-cutlass-dsl-libs-cu13 4.8.1 is 91.95 MB as a wheel
# (zstd -19: 91.25 MB, xz -9: 91.18 MB: the wheel is already deflated); unpacked 237.1 MB, almost all in two
# stripped x86_64 libraries (_cutlass_ir.cu13...so 193.2 MB: the MLIR compiler; cu13/lib/libcute_dsl_runtime.so
# 43.6 MB, loaded at import), nothing per GPU architecture to strip (the only other platforms are 71 KB aarch64/QNX
# stubs). Unpacked as tar: zstd -19 --long=27 64.8 MB, xz -9e 62.2 MB. The whole FA4 stack below (without
# cuda-bindings and cudnn-frontend) as one tar.xz with a 256 MiB window: 58.3 MB. With the working tree that is
# already past 64 MiB, hence the split into parts of PART_MIB (default 40) MiB. With everything in WHEELS (13 wheels,
# 122.5 MB; cudnn-frontend, cuda-bindings, libs-core and protobuf included) `pack` gave 70.0 MB in two parts,
# 40 MiB + 26.8 MiB (about 10 minutes of one core for xz), unpacking to 347 MB in 5 s; receive checked here.
# The site tree goes first on PYTHONPATH, so its cuda-bindings / protobuf / einops shadow the machine's own.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STAGE="$ROOT/.fa4"
PY_VERSION="${PY_VERSION:-3.12}"
PLATFORM="${PLATFORM:-manylinux_2_28_x86_64}"
PART_MIB="${PART_MIB:-40}"
# Pinned: flash-attn-4 is a pre-release whose block-sparse API moves (4.0.0b40 is what dit_accel.kernels.fa4 was
# written against); cutlass-dsl 4.8.1 in its CUDA 13 flavour matches the lent H200 (torch 2.11.0+cu130, driver 580).
# cuda-bindings is what nvidia-cutlass-dsl-libs-base needs when torch does not bring it. nvidia-cutlass-dsl-libs-core
# (1.6 MB) holds the DSL's Python package itself (cutlass/__init__.py, cutlass/cute/): neither nvidia-cutlass-dsl nor
# libs-base/libs-cu13 4.8.1 contain it, and nothing in their metadata pulls it in, so a plain --no-deps download of
# "flash-attn-4's dependencies" misses it (import flash_attn.cute then fails with "No module named 'cutlass.cute'");
# it wants protobuf. Checked here on the CPU: with these wheels unpacked (cp311 variants) `import flash_attn.cute`
# and the dit_accel.kernels.fa4 mask_mod factory work. cudnn-frontend is optional (WITH_CUDNN=0 leaves it out: it
# adds about 11.6 MB; its block-sparse attention also imports cuda.bindings).
WHEELS=(
  "flash-attn-4==4.0.0b40" "nvidia-cutlass-dsl==4.8.1" "nvidia-cutlass-dsl-libs-base==4.8.1"
  "nvidia-cutlass-dsl-libs-core==4.8.1" "nvidia-cutlass-dsl-libs-cu13==4.8.1" "protobuf==7.36.2"
  "quack-kernels==0.6.5" "apache-tvm-ffi==0.1.15.post2"
  "torch-c-dlpack-ext==0.1.5" "einops==0.8.1" "cuda-bindings==13.5.0" "cuda-pathfinder==1.9.1"
)
[ "${WITH_CUDNN:-1}" = 1 ] && WHEELS+=("nvidia-cudnn-frontend==1.32.0")
SITE_DEV=/tmp/site-fa4
PARTS_DEV=/tmp/fa4_parts

case "${1:-}" in
  download)
    mkdir -p "$STAGE/wheels"
    python3 -m pip download --no-deps --pre --only-binary=:all: --python-version "$PY_VERSION" \
      --platform "$PLATFORM" -d "$STAGE/wheels" "${WHEELS[@]}"
    ls -l "$STAGE/wheels"
    ;;
  pack)
    rm -rf "$STAGE/site" "$STAGE/parts" && mkdir -p "$STAGE/site" "$STAGE/parts"
    for w in "$STAGE"/wheels/*.whl; do python3 -m zipfile -e "$w" "$STAGE/site"; done  # a wheel is a zip of its site
    rm -rf "$STAGE/site"/nvidia_cutlass_dsl/cu13/lib/stubs  # aarch64 / QNX stubs
    tar -C "$STAGE/site" -cf - . | xz -T1 --lzma2=preset=9e,dict=256MiB -c >"$STAGE/fa4.tar.xz"
    (cd "$STAGE/parts" && split -b "${PART_MIB}M" "$STAGE/fa4.tar.xz" fa4.tar.xz.part- && sha256sum fa4.tar.xz.part-* >MANIFEST)
    rm -f "$STAGE/fa4.tar.xz"
    ls -l "$STAGE/parts"; cat "$STAGE/parts/MANIFEST"
    ;;
  receive)
    mkdir -p "$PARTS_DEV"
    cp -f "$STAGE"/parts/MANIFEST "$PARTS_DEV"/ 2>/dev/null || true
    for p in "$STAGE"/parts/fa4.tar.xz.part-*; do [ -f "$p" ] && cp -f "$p" "$PARTS_DEV"/; done
    [ -f "$PARTS_DEV/MANIFEST" ] || { echo "stage_fa4: no MANIFEST yet (carry .fa4/parts/MANIFEST)"; exit 1; }
    if [ -d "$SITE_DEV/flash_attn/cute" ]; then echo "stage_fa4: $SITE_DEV ready"; exit 0; fi
    missing=$(cd "$PARTS_DEV" && awk '{print $2}' MANIFEST | while read -r f; do [ -f "$f" ] || echo "$f"; done)
    if [ -n "$missing" ]; then echo "stage_fa4: holding $(ls "$PARTS_DEV" | grep -c part-) part(s); waiting for: $missing"; exit 0; fi
    (cd "$PARTS_DEV" && sha256sum -c --quiet MANIFEST)
    mkdir -p "$SITE_DEV" && cat "$PARTS_DEV"/fa4.tar.xz.part-* | xz -dc | tar -C "$SITE_DEV" -xf -
    echo "stage_fa4: unpacked to $SITE_DEV ($(du -sm "$SITE_DEV" | cut -f1) MB)"
    ;;
  env)  # for eval: the site tree and the path its .pth file would have added (no site.addsitedir for --target)
    [ -d "$SITE_DEV/flash_attn/cute" ] && echo "export PYTHONPATH=$SITE_DEV:$SITE_DEV/nvidia_cutlass_dsl/dsl_packages\${PYTHONPATH:+:\$PYTHONPATH}"
    ;;
  *) echo "usage: $0 download|pack|receive|env" >&2; exit 2 ;;
esac
