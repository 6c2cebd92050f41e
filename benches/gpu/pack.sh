#!/usr/bin/env bash
# Here (no GPU needed): builds the CUDA binary and the kernel/model test binaries, and packs
# them xz-compressed into build/gpu-carry for benches/gpu/run.sh (carry `build/gpu-carry`).
#   benches/gpu/pack.sh            binaries
#   benches/gpu/pack.sh model      the default GGUF in two halves, build/gpu-model{1,2}
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = "model" ]; then
  # build/gpu-model1 and build/gpu-model2: the default GGUF in two halves (carry one per run).
  model=$(scripts/fetch-model)
  half=$(( ($(stat -c %s "$model") + 1) / 2 ))
  mkdir -p build/gpu-model1 build/gpu-model2
  head -c "$half" "$model" > build/gpu-model1/model.part1
  tail -c +$((half + 1)) "$model" > build/gpu-model2/model.part2
  exit 0
fi
out=build/gpu-carry
rm -rf "$out"
mkdir -p "$out"
bin=$(scripts/build-cuda)
xz -T2 -6 -c "$bin" > "$out/pagoda.xz"
scripts/build-cuda -p pagoda-benches --bin gpu-bench >/dev/null
strip -o build/cuda/gpu-bench build/cuda/target/release/gpu-bench
xz -T2 -6 -c build/cuda/gpu-bench > "$out/gpu-bench.xz"
# Test binaries: kernels (paged attention vs CPU) and model parity, built like the binary.
tests=$(scripts/build-cuda test -p pagoda-kernels -p pagoda-tests 2>&1 |
  sed -n 's/.*Executable tests\/\(paged\|parity\|quant_formats\|lora_bgmv\|lora_parity\)\.rs (\(.*\))/\1 \2/p')
while read -r name path; do
  strip -o "build/cuda/test-$name" "$path"
  xz -T2 -6 -c "build/cuda/test-$name" > "$out/test-$name.xz"
done <<< "$tests"
ls -la "$out"
