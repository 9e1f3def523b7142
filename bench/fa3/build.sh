#!/bin/bash
# Builds bench/fa3/libfa3.so: FlashAttention-3's Hopper forward kernels (bf16 and fp16, head_dim 64, 128 and 256,
# causal and not) with fa3_shim.cu's C entry point, using the nvcc flags of FA3's hopper/setup.py and its switches
# for everything the benchmark does not run (varlen, split, paged K/V, softcap, pack_gqa, local, fp8, backward).
#   bench/fa3/build.sh <flash-attention checkout> <CUTLASS checkout at its csrc/cutlass commit>
# About 3 minutes on 2 cores. Then: PYTHONPATH=bench/fa3:python python -m dhp.bench --backends cudnn,fa2,fa3
set -euo pipefail
fa=$(realpath "$1"); cutlass=$(realpath "$2"); here=$(dirname "$(realpath "$0")")
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
flags=(-O3 -std=c++17 --use_fast_math -lineinfo -DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED -DCUTLASS_ENABLE_GDC_FOR_SM90
  -DCUTLASS_DEBUG_TRACE_LEVEL=0 -DNDEBUG -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr -Xcompiler -fPIC
  -gencode arch=compute_90a,code=sm_90a -I"$fa/hopper" -I"$cutlass/include")
for off in BACKWARD PAGEDKV SPLIT APPENDKV LOCAL SOFTCAP PACKGQA FP8 VARLEN HDIM96 HDIM192 SM8x; do
  flags+=(-DFLASHATTENTION_DISABLE_$off)
done
flags+=(-DFLASH_ATTENTION_DISABLE_HDIMDIFF64 -DFLASH_ATTENTION_DISABLE_HDIMDIFF192)
sources=("$here/fa3_shim.cu")
for dim in 64 128 256; do
  for dtype in bf16 fp16; do sources+=("$fa/hopper/instantiations/flash_fwd_hdim${dim}_${dtype}_sm90.cu"); done
done
printf '%s\n' "${sources[@]}" | xargs -P "$(nproc)" -I{} sh -c 'nvcc "$@" -c "{}" -o "'"$work"'/$(basename "{}" .cu).o"' _ "${flags[@]}"
nvcc -shared -o "$here/libfa3.so" "$work"/*.o
echo "hopper/ at ${FA3_COMMIT:-$(git -C "$fa" rev-parse --short HEAD 2>/dev/null || echo unknown)}, \
$(nvcc --version | grep -o 'release [0-9.]*' | sed 's/release/nvcc/')" > "$here/libfa3.version"
echo "built $here/libfa3.so"
