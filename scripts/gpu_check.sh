#!/usr/bin/env bash
# On a CUDA machine, in under 5 minutes: the tests' CUDA cases, then a short study on CUDA with bf16 autocast,
# printing its figures: Fashion-MNIST when its IDX .gz files are in $FASHION_MNIST_DIR (default:
# /usr/share/datasets/fashion-mnist, Debian's dataset-fashion-mnist), else the BN-CNN on MNIST-1D (generated).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: run this on a GPU machine"
print("torch", torch.__version__, "on", torch.cuda.get_device_name(), "bf16:", torch.cuda.is_bf16_supported())
PY
$PY -m pytest -q -rs -k "cuda" tests
tmp=$(mktemp -d)
start=$(date +%s)
fashion=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
if [ -d "$fashion" ]; then
  data=(data=fashion_mnist data.train_subset=null data.root="$fashion" data.download=false)
else
  data=(data=mnist1d model=cnn)
fi
$PY -m tuner trainer.device=cuda trainer.bf16=true trainer.pack=1 study.n_trials=${TRIALS:-30} "${data[@]}" \
  study.storage="sqlite:///$tmp/gpu.db" study.output_dir="$tmp/out" hydra.run.dir="$tmp/hydra"
echo "gpu_check: ${data[*]} study on CUDA with trainer.pack=1, $(( $(date +%s) - start )) s wall"
# Packs chosen by the probe on this GPU (trainer.pack=auto, the default, logs each shape's rates and choice), then
# one babysat model.
start=$(date +%s)
$PY -m tuner trainer.device=cuda trainer.pack=auto study.n_trials=${TRIALS:-30} "${data[@]}" study.name=gpu-auto \
  study.storage="sqlite:///$tmp/gpu.db" study.output_dir="$tmp/auto" hydra.run.dir="$tmp/hydra-auto"
echo "gpu_check: the same study with trainer.pack=auto, $(( $(date +%s) - start )) s wall"
$PY -m tuner.babysit trainer.device=cuda trainer.epochs=3 "${data[@]}" study.storage="sqlite:///$tmp/gpu.db" \
  babysit.dir="$tmp/babysit" hydra.run.dir="$tmp/hydra-babysit"
