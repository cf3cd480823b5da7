#!/usr/bin/env bash
# Build `retune` and `retune-bench` with the CUDA tensor backend on a machine without a GPU or a
# system CUDA, from pinned CUDA 13.0 PyPI wheels (PTX a 13.0 driver accepts), and
# leave stripped binaries in dist/retune-cuda and dist/retune-bench-cuda. Recipe: ../shared/notes/cuda-build.md.
# Run time needs the driver's libcuda.so.1 and CUDA 13 libcublas/libcublasLt/
# libcurand/libcudart (PyTorch's cu13 wheels carry them; scripts/gpu/run.sh finds them).
set -euo pipefail
cd "$(dirname "$0")/.."
CU_VENV=${CU_VENV:-/opt/cu13}
LINK=${CUDA_LINK_DIR:-/opt/cudalink}
if [ ! -x "$CU_VENV/bin/pip" ]; then
  python3 -m venv "$CU_VENV"
fi
"$CU_VENV/bin/pip" install -q "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" \
  "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-crt==13.0.88" "nvidia-cuda-cccl==13.0.85" \
  "nvidia-cublas==13.0.2.14" "nvidia-curand==10.4.0.35" "nvidia-cuda-nvrtc==13.0.88"
CU=$("$CU_VENV/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
mkdir -p "$LINK"
for n in cudart.so.13 nvrtc.so.13 curand.so.10 cublasLt.so.13 cublas.so.13; do
  ln -sf "$CU/lib/lib$n" "$LINK/lib${n%%.so*}.so"
done
export PATH=$CU/bin:$PATH CUDA_ROOT=$CU CUDA_PATH=$CU CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} LIBRARY_PATH=$LINK
# the driver stub (soname libcuda.so.1): every cu* symbol cudarc references; the
# real driver replaces it at run time
if [ ! -f "$LINK/libcuda.so" ]; then
  cargo build --release -p retune-engine --features cuda
  nm target/release/deps/libcudarc-*.rlib 2>/dev/null | awk '$1=="U" && $2 ~ /^cu[A-Z]/ {print $2}' \
    | sort -u | awk '{print "int "$1"(void){return 999;}"}' > "$LINK/stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so" "$LINK/stub.c"
fi
cargo build --release -p retune-server -p retune-bench --features cuda
mkdir -p dist
cp target/release/retune dist/retune-cuda
cp target/release/retune-bench dist/retune-bench-cuda
for b in dist/retune-cuda dist/retune-bench-cuda; do
  strip "$b"
  # compressed copy for carrying to a GPU machine (the PTX text compresses ~3.5x)
  gzip -9 -c "$b" > "$b.gz"
  ls -l "$b" "$b.gz"
done
