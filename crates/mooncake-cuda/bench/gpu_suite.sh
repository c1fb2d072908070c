#!/usr/bin/env bash
# The whole GPU suite in one go (docs/gpu.md): the device conformance suite, the store's
# VRAM test, and `mooncake bench transfer` with its same-run baselines, plus NCCL send/recv.
#
#   gpu_suite.sh BIN_DIR OUT_DIR
#
# BIN_DIR holds `mooncake` (built with --features cuda), `cuda-gpu` (mooncake-cuda's
# tests/gpu.rs binary), `store-gpu` (mooncake-store's tests/gpu.rs binary) and
# `nccl_sendrecv.py`; optionally `py/mooncake` (the Python package with `_native.abi3.so` built
# with --features cuda) and `pytests` (crates/mooncake-py/tests). Logs and one JSON line per
# benchmark (bench.jsonl) land in OUT_DIR.
set -u
BIN=$(cd "$1" && pwd)
OUT=$2
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export RUST_LOG=${RUST_LOG:-warn}
MC="$BIN/mooncake"
step() { echo "=== $* ($(date +%T))"; }

step machine
nvidia-smi --query-gpu=index,name,memory.total,driver_version,pci.bus_id --format=csv
nvidia-smi topo -m || true

step "device conformance suite (mooncake-cuda tests/gpu.rs)"
"$BIN/cuda-gpu" --ignored --test-threads=1 2>&1 | tee "$OUT/cuda-gpu.log" | grep -E "^test |test result|panicked|FAILED"
step "store VRAM put/get (mooncake-store tests/gpu.rs)"
"$BIN/store-gpu" --ignored --exact gpu_kv_blocks 2>&1 | tee "$OUT/store-gpu.log" | grep -E "^test |test result|panicked|FAILED"

META=http://127.0.0.1:18080/metadata
"$MC" metadata-server --host 127.0.0.1 --port 18080 >"$OUT/metadata.log" 2>&1 &
MDPID=$!
sleep 1

# bench NAME PROTOCOL TARGET_LOC INIT_LOC OP BLOCK BATCH [extra initiator args...]
bench() {
    local name=$1 proto=$2 tloc=$3 iloc=$4 op=$5 block=$6 batch=$7
    shift 7
    step "bench $name: $proto $op $iloc -> target $tloc, block $block x $batch, separate processes"
    local seg="t-$name"
    "$MC" bench transfer --role target --protocol "$proto" --metadata "$META" --segment "$seg" \
        --location cpu:0 --target-location "$tloc" --block-size "$block" --batch-size "$batch" \
        >"$OUT/target-$name.log" 2>&1 &
    local tpid=$!
    for _ in $(seq 100); do grep -q '^segment' "$OUT/target-$name.log" 2>/dev/null && break; sleep 0.2; done
    timeout 120 "$MC" bench transfer --role initiator --protocol "$proto" --metadata "$META" \
        --segment "$seg" --location "$iloc" --target-location "$tloc" --op "$op" --block-size "$block" --batch-size "$batch" \
        --duration 3 --baseline --json "$@" 2>&1 | tee "$OUT/bench-$name.log" | grep -v '^{'
    tail -n1 "$OUT/bench-$name.log" | grep '^{' >>"$OUT/bench.jsonl"
    kill "$tpid" 2>/dev/null; wait "$tpid" 2>/dev/null
}

bench ipc-g2g   nvlink_intra cuda:1 cuda:0 write 64M 16
bench ipc-g2g-r nvlink_intra cuda:1 cuda:0 read  64M 16
bench ipc-h2d   nvlink_intra cuda:0 cpu:0  write 64M 16 --pinned
bench ipc-d2h   nvlink_intra cuda:0 cpu:0  read  64M 16 --pinned
bench tcp-g2g   tcp          cuda:1 cuda:0 write 4M 32
bench tcp-g2g-r tcp          cuda:1 cuda:0 read  4M 32
bench tcp-h2h   tcp          cpu:0  cpu:0  write 4M 32
kill $MDPID 2>/dev/null

if [ -d "$BIN/py/mooncake" ] && [ -d "$BIN/pytests" ]; then
    step "python: torch CUDA tensors registered directly, store put/get of GPU KV blocks"
    (cd "$BIN/pytests" && PYTHONPATH="$BIN/py" MOONCAKE_BIN="$MC" timeout 300 \
        python3 -m pytest -q -p no:cacheprovider test_gpu.py test_gpu_direct.py 2>&1 |
        tee "$OUT/pytest.log" | tail -n 15)
fi

step "nccl send/recv 1 GiB (baseline)"
timeout 180 python3 "$BIN/nccl_sendrecv.py" --size-mib 1024 --iters 20 2>&1 | tee "$OUT/nccl.log" | tail -n1
step done
