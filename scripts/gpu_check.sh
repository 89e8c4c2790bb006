#!/usr/bin/env bash
# The GPU check (docs/pretrain.md): the GPU figures the project has never measured, in one log.
#
#   bash scripts/gpu_check.sh [LOG]        (LOG default: $OUT/gpu_check.log, else ./gpu_check.log)
#
# Written to fit a 10-minute slot on one H100 (not yet run on a GPU): bench.py for vit_b / vit_s / resnet50 at 224 px (bf16; the tokenizer in
# fp32 as before and in bf16 as now; with and without --compile), a torchrun pre-training run of 300
# steps in bf16 on the built-in data, 50 steps in fp16, short bf16 fine-tuning and segmentation runs
# from that pre-training, and the fp32 / bf16 / fp16 token agreement of the trained tokenizer.
# timm / torchvision ratios are printed by bench.py only where those packages happen to be installed.
set -uo pipefail
usage() {
    cat <<'EOF'
usage: bash scripts/gpu_check.sh [LOG]

The GPU figures of docs/pretrain.md in one log (about 10 minutes on one H100): bench.py for vit_b,
vit_s and resnet50 at 224 px (bf16, with and without --compile), a 300-step bf16 and a 50-step fp16
torchrun pre-training on the built-in data, short fine-tuning and segmentation runs from it, and the
trained tokenizer's fp32 / bf16 / fp16 token agreement.

  LOG         the log to write (default: $OUT/gpu_check.log if OUT is set, else ./gpu_check.log);
              a relative path is taken from the folder you run the script in
  -h, --help  this text

Needs a CUDA device visible to torch: without one it stops before any work (exit status 2).
EOF
}
case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_check.sh: error: unknown option $1 (--help shows the usage)" >&2; exit 2 ;;
esac
if [ $# -gt 1 ]; then
    echo "gpu_check.sh: error: one LOG path at most, got $# arguments (--help shows the usage)" >&2; exit 2
fi
# before any work: every step below needs a GPU, and a CPU run would fill the log with failures
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check.sh: error: no CUDA device visible to torch (torch.cuda.is_available() is False, or" \
         "torch does not import): run it on a GPU machine; CPU timings come from bench.py" >&2
    exit 2
fi
LOG=${1:-${OUT:-.}/gpu_check.log}
case "$LOG" in /*) ;; *) LOG="$PWD/$LOG" ;; esac  # before the cd below: relative to the caller's folder
cd "$(dirname "$0")/.."
: > "$LOG" || { echo "gpu_check.sh: error: cannot write the log $LOG" >&2; exit 2; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
echo "gpu_check.sh: writing $LOG"
step() {  # step LIMIT_SECONDS CMD...: the command, its exit status and its last lines (no bars)
    local limit=$1; shift
    echo "+ $*" >> "$LOG"
    timeout "$limit" "$@" > "$TMP/out" 2>&1
    echo "exit $?" >> "$LOG"
    grep -v '^ "\|^{$\|^}$\|it/s\]$\|s/it\]$' "$TMP/out" | tr '\r' '\n' | grep -v 'it/s\|s/it' | tail -25 >> "$LOG"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git rev-parse --short HEAD; } >> "$LOG" 2>&1

# pre-training step, ViT-B/16 at 224 px, DALL-E-sized tokenizer, generator 256 x 4, batch 64 (recipe imagenet)
step 300 python bench.py --recipe imagenet --steps 10 --amp bf16 --tokenizer-dtype fp32   # the earlier settings
step 300 python bench.py --recipe imagenet --steps 10 --amp bf16                          # tokenizer in bf16, NHWC, fused AdamW
step 300 python bench.py --recipe imagenet --steps 10 --amp bf16 --batch-size 128
step 400 python bench.py --recipe imagenet --steps 10 --amp bf16 --compile
step 300 python bench.py --recipe imagenet --steps 10 --amp bf16 --arch vit_s --batch-size 128
step 400 python bench.py --recipe imagenet --steps 10 --amp bf16 --arch vit_s --batch-size 128 --compile
step 300 python bench.py --recipe imagenet --steps 10 --amp bf16 --arch resnet50 --batch-size 128
step 400 python bench.py --recipe imagenet --steps 10 --amp bf16 --arch resnet50 --batch-size 128 --compile

# real runs: torchrun, bf16 for 300 steps, fp16 for 50, then the downstream stages in bf16
step 600 torchrun --nproc_per_node 1 pretrain.py --amp bf16 --max-steps 300 --output-dir "$TMP/bf16"
step 300 torchrun --nproc_per_node 1 pretrain.py --amp fp16 --max-steps 50 --knn-k 0 \
    --dvae "$TMP/bf16/tokenizer/checkpoint-latest.pth" --output-dir "$TMP/fp16"
step 300 torchrun --nproc_per_node 1 finetune.py --init "$TMP/bf16/backbone.pth" --amp bf16 --max-steps 100 \
    --output-dir "$TMP/ft"
step 300 torchrun --nproc_per_node 1 segment.py --init "$TMP/bf16/backbone.pth" --amp bf16 --iters 100 \
    --output-dir "$TMP/seg"
step 120 python - "$TMP/bf16/tokenizer/checkpoint-latest.pth" <<'PY'
import sys, torch, data, dvae
enc, dec = (m.cuda() for m in dvae.load_tokenizer(sys.argv[1]))
ds = data.SyntheticShapes("val", size=64)
x = torch.stack([data.to_tensor(ds.sample(i)[0].resize((32, 32))) for i in range(1024)]).cuda()
ref = dvae.tokenize(enc, x)
for dtype in (torch.bfloat16, torch.float16):
    agree = (dvae.tokenize(enc, x, dtype) == ref).float().mean().item()
    diff = (dvae.decode(dec, ref, dtype) - dvae.decode(dec, ref)).abs().max().item()
    print(f"{dtype}: token agreement with fp32 {100 * agree:.2f}%, decode max abs diff {diff:.2e}")
PY
echo "done" >> "$LOG"
echo "gpu_check.sh: done; log: $LOG"
