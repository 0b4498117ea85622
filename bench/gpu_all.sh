#!/usr/bin/env bash
# Every GPU benchmark in one command, for a fresh one-GPU machine (see docs/performance.md):
#   bash bench/gpu_all.sh              # full size; about 5 minutes on one H100
#   bash bench/gpu_all.sh --dry-run    # tiny sizes on the CPU, the same code paths (tested)
# It installs the wheels carried in .whl/ (bench/fetch_gpu_wheels.sh) when present, makes its own
# inputs (generated videos, synthetic caches), runs each part with a time limit, and prints one
# markdown table; the table, each part's JSON and log go to $OUT (default bench/out). A part that
# fails or times out says so in its row; the others still run.
set -u
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ $DRY = 0 ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # the GPU machine's Python
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu_site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/gpu_site${PYTHONPATH:+:$PYTHONPATH}
fi

if [ $DRY = 1 ]; then
  DEVICE=cpu
  EXTRACT=(--videos 2 --video-frames 10 --size 96x72 --backbone resnet18 --image-size 64
           --resize 72 --workers 0)
  SPEED=(--channels 16 --size 4 --train-episodes 1 --eval-episodes 4 --batch-episodes 4
         --test-episodes 5000)
  STAGES=(--small --baseline)
  DECODER=auto  # no CUDA here: picks the CPU decoders and says so (the same code path)
  LIMIT=300
else
  DEVICE=cuda
  EXTRACT=(--videos 160 --video-frames 48 --size 320x240)
  SPEED=(--channels 2048 --size 7 --train-episodes 60 --warmup 5 --eval-episodes 5000
         --batch-episodes 64 --test-episodes 5000)
  # UCF101-like clips (175 frames); each stage alone and the whole pipeline, before and after
  STAGES=(--setups resnet50@224:320 --video-frames 175 --rounds 1 --baseline)
  DECODER=gpu  # NVDEC (PyNvVideoCodec from bench/gpu_wheels.txt; untested on hardware so far)
  LIMIT=300
fi

part() {  # part NAME COMMAND...: run with a time limit, keep its log and exit status
  local name=$1; shift
  echo "== $name: $*"
  timeout "$LIMIT" "$@" > "$OUT/$name.log" 2>&1
  echo $? > "$OUT/$name.rc"
  tail -n 12 "$OUT/$name.log"
}

"$PY" - <<'PYEOF' > "$OUT/machine.json"
import json, platform, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
print(json.dumps({"gpu": gpu, "torch": torch.__version__, "python": platform.python_version(),
                  "cpus": __import__("os").cpu_count()}))
PYEOF
part extract "$PY" bench/extract_throughput.py --device $DEVICE "${EXTRACT[@]}" \
  --json "$OUT/extract.json"
part extract_gpudec "$PY" bench/extract_throughput.py --device $DEVICE "${EXTRACT[@]}" \
  --decoder $DECODER --json "$OUT/extract_gpudec.json"
part stages "$PY" bench/extract_stages.py --device $DEVICE "${STAGES[@]}" \
  --json "$OUT/stages.json"
part speed "$PY" bench/train_eval_speed.py --device $DEVICE "${SPEED[@]}" \
  --json "$OUT/speed.json"
"$PY" bench/gpu_table.py "$OUT" | tee "$OUT/table.md"
