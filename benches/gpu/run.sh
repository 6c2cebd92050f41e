#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with the CUDA build carried in
# build/gpu-carry and the model halves in build/gpu-model{1,2} (made by benches/gpu/pack.sh): kernel and model checks against their
# CPU references on the GPU, then the default model on the GPU.
#   benches/gpu/run.sh checks      kernel + parity tests (CPU and CUDA in one body)
#   benches/gpu/run.sh model PART  store a part of the default GGUF under /tmp/pagoda (parts 1, 2)
#   benches/gpu/run.sh generate    join the parts and generate with it on the GPU
#   benches/gpu/run.sh bench       gpu-bench (random weights, real shapes) and the Hugging Face
#                                  transformers baseline on the same shapes, in one run
#   benches/gpu/run.sh lora        offline throughput with 0, 1, 8 and 64 distinct random rank-16
#                                  adapters (Llama-3-8B shape), one engine, back to back
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
carry=build/gpu-carry
stash=/tmp/pagoda
mkdir -p "$stash/bin" "$stash/models"
for f in "$carry"/*.xz; do
  [ -e "$f" ] || continue
  xz -dc "$f" > "$stash/bin/$(basename "$f" .xz)" && chmod +x "$stash/bin/$(basename "$f" .xz)"
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case "${1:-checks}" in
  checks)
    for t in "$stash"/bin/test-*; do
      echo "== $(basename "$t")"
      "$t" --test-threads=1 2>&1 | tail -n 15
    done
    ;;
  model)
    cp "build/gpu-model$2/model.part$2" "$stash/models/" && ls -la "$stash/models"
    ;;
  generate)
    cat "$stash"/models/model.part1 "$stash"/models/model.part2 > "$stash/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    sha256sum "$stash/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    export PAGODA_HOME=$stash
    for args in "--device cuda" "--device cuda --dequantize" "--device cuda --dequantize --dtype f32" "--device cpu"; do
      echo "== pagoda generate $args"
      "$stash/bin/pagoda" generate $args --prompt "What is the capital of France?" --max-tokens 64 2>&1 | grep -v "^\s*$" | tail -n 4
      "$stash/bin/pagoda" generate $args --raw --prompt "Once upon a time" --max-tokens 200 2>&1 | grep "done" | tail -n 1
    done
    ;;
  bench)
    b="$stash/bin/gpu-bench"
    timeout 60 "$b" --shape smollm2-135m --num-requests 256 --prompt-len 128 --gen-len 128 --batch1-steps 256
    timeout 270 "$b" --shape llama3-8b --num-requests "${2:-512}" --prompt-len 512 --gen-len 256
    timeout 60 python3 benches/gpu/hf_baseline.py --shape smollm2-135m --batch 1 --gen-len 128
    timeout 150 python3 benches/gpu/hf_baseline.py --shape llama3-8b --batch 1 32 --gen-len 128
    ;;
  lora)
    timeout 500 "$stash/bin/gpu-bench" --shape llama3-8b --batch1-steps 32 --num-requests "${2:-256}" \
      --prompt-len 128 --gen-len 128 --lora-adapters 0 1 8 64 0 --lora-rank 16
    ;;
esac
