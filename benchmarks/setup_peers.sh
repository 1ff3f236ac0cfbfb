#!/usr/bin/env bash
# Create the virtual environments of the peer implementations that benchmarks/run.py compares against.
#
#   bash benchmarks/setup_peers.sh              # dalle2 venv; diffusers: reuse the main env when it has unCLIP
#   bash benchmarks/setup_peers.sh --force      # rebuild the venvs from scratch
#   bash benchmarks/setup_peers.sh --no-lock    # resolve DALLE2-pytorch's dependencies afresh (no constraints file)
#
# benchmarks/envs/dalle2     DALLE2-pytorch 1.15.6. It requires open-clip-torch<3 (the main env has 3.3), so it
#                            cannot share the main env. Nothing else needed pinning on 2026-11-25; the versions it
#                            was checked with are in benchmarks/dalle2-constraints.txt and are used as constraints.
# benchmarks/envs/diffusers  only when the main env's diffusers lacks the unCLIP classes (0.42.1 still has them
#                            under diffusers.pipelines.deprecated.unclip; then run.py uses the main interpreter).
#
# torch 2.14.1 / torchvision 0.29.1 come from local disk (pip's configured find-links / extra index), the rest
# from PyPI. The same torch everywhere keeps the comparison about the code, not the kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
ENVS=benchmarks/envs
FORCE=0
LOCK=(-c benchmarks/dalle2-constraints.txt)
for arg in "$@"; do
  case "$arg" in
    --force) FORCE=1 ;;
    --no-lock) LOCK=() ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done
mkdir -p "$ENVS"
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)

make_venv() {  # NAME
  local dir="$ENVS/$1"
  if [[ $FORCE == 1 ]]; then rm -rf "$dir"; fi
  if [[ ! -x "$dir/bin/python" ]]; then
    "$PY" -m venv "$dir"
  fi
  "$dir/bin/python" -m pip install -q --upgrade "pip>=24" wheel
  "$dir/bin/python" -m pip install -q "${TORCH_PINS[@]}"
}

echo "== dalle2-pytorch -> $ENVS/dalle2"
make_venv dalle2
"$ENVS/dalle2/bin/python" -m pip install -q "${TORCH_PINS[@]}" dalle2-pytorch==1.15.6 "open-clip-torch>=2.0,<3" \
  ${LOCK[@]+"${LOCK[@]}"}
"$ENVS/dalle2/bin/python" -c "import torch, dalle2_pytorch, open_clip; from importlib.metadata import version as v; \
print('dalle2-pytorch', v('dalle2-pytorch'), '| torch', torch.__version__, '| open_clip', open_clip.__version__)"

echo "== diffusers"
if python3 -c "from diffusers import UNet2DConditionModel, UNet2DModel, PriorTransformer, UnCLIPScheduler, UnCLIPPipeline; \
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel" 2>/dev/null; then
  echo "the main env's diffusers $(python3 -c 'import diffusers; print(diffusers.__version__)') has the unCLIP classes: reusing it (no venv)"
else
  make_venv diffusers
  "$ENVS/diffusers/bin/python" -m pip install -q "${TORCH_PINS[@]}" "diffusers==0.42.1" "transformers>=4.25" accelerate
fi
echo "done"
