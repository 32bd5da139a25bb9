#!/usr/bin/env bash
# The checks that need a GPU, as one script for a lent GPU machine (its python3 holds a CUDA
# PyTorch; nothing else is installed there): the CUDA tests of tests/test_device.py, then the
# same short ResNet-18 run on the GPU and on the CPU (the embedded digits data, so no data set
# has to travel), whose summaries give the speed ratio. Everything lands in ${OUT:-gpu_check}/.
#
#   OUT=/tmp/gpu_check scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-gpu_check}"
mkdir -p "$out"
if ! python3 -c "import torch, sys; ok = torch.cuda.is_available(); print(torch.__version__, \
torch.cuda.get_device_name(0) if ok else 'no CUDA GPU'); sys.exit(0 if ok else 1)" \
    2>&1 | tee "$out/device.txt"; then
  echo "gpu_check: PyTorch sees no CUDA GPU here; nothing to check" >&2
  exit 1
fi
python3 -m pytest -q -p no:cacheprovider tests/test_device.py 2>&1 | tee "$out/test_device.log"
tests=${PIPESTATUS[0]}
run=(model.name=resnet18 run.rounds="${ROUNDS:-5}" run.eval_every=5 algorithm.density=0.1
     federation.num_clients=20 federation.clients_per_round=5 train.local_epochs=1)
for device in cuda cpu; do
  python3 -m ssfl.cli run "${run[@]}" "run.device=\"$device\"" --out "$out/run_$device" \
    --no-progress 2>&1 | tee "$out/run_$device.log"
done
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
s = {d: json.loads((out / f"run_{d}" / "summary.json").read_text()) for d in ("cuda", "cpu")}
line = (f"ResNet-18, digits, {s['cuda']['rounds']} rounds: {s['cuda']['device']} "
        f"{s['cuda']['samples_per_second']:.0f} samples/s, cpu {s['cpu']['samples_per_second']:.0f}"
        f" samples/s ({s['cuda']['samples_per_second'] / s['cpu']['samples_per_second']:.1f}x); "
        f"final accuracy {s['cuda']['final_accuracy']:.4f} (gpu) vs {s['cpu']['final_accuracy']:.4f} (cpu)")
print(line)
(out / "speed.txt").write_text(line + "\n")
PY
exit "$tests"
