#!/bin/bash
# The GPU benchmarks in one run, hangjia beside the stock baseline on the same
# random-weight Qwen3-14B checkpoint (kept on a tmpfs between runs on the same machine).
#   bash bench/gpu_run.sh train serve          # phases: stocktrain train trainb stockserve serve long guided app nf4 paged fp8 profile multi
# Wheels in .whl/ (and its sub-folders) are installed first (what the machine's image lacks);
# BASELINE names the folder of the stock baseline scripts (make_ckpt.py, bench_train.py,
# bench_infer.py); the tokenizer the model folder needs (app, multi) comes from TOKENIZER.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; export OUT
START=$(date +%s); DEADLINE=${DEADLINE:-580}
BASELINE=${BASELINE:-.baseline}; TOKENIZER=${TOKENIZER:-.gpu-tok}
WHEELS=$(ls ${WHEELS_DIR:-.whl}/*.whl ${WHEELS_DIR:-.whl}/*/*.whl 2>/dev/null)
if [ -n "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $WHEELS \
    || { echo "wheel install failed"; exit 1; }
fi
export PYTHONPATH=/tmp/site:$PWD
CKDIR=/mnt/q14b
mountpoint -q $CKDIR || { mkdir -p $CKDIR && mount -t tmpfs -o size=40g tmpfs $CKDIR; } || CKDIR=/root/q14b
CKPT=$CKDIR/ckpt
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__, torch.cuda.get_device_name())" | tee -a $OUT/env.txt
phase() {  # phase NAME MIN_SECONDS cmd...
  local name=$1 need=$2; shift 2
  local now left; now=$(date +%s); left=$((DEADLINE - (now - START)))
  if [ $left -lt $need ]; then echo "=== SKIP $name: ${left}s left < ${need}s"; return 0; fi
  echo "=== $name start (${left}s left): $*"
  timeout $left "$@" > >(tee -a "$OUT/$name.log" | grep -E "^RESULT|^\||Error|error|Traceback" | cut -c1-600) 2>&1
  echo "=== $name rc=$? took $(( $(date +%s) - now ))s"
}
tokenizer_to() {  # the tokenizer's files into a model folder (a .gz is unpacked: it travels smaller)
  for f in $TOKENIZER/*; do
    case $f in *.gz) [ -f "$1/$(basename $f .gz)" ] || gunzip -c $f > "$1/$(basename $f .gz)" ;; *) cp -n $f "$1/" ;; esac
  done
}
[ -f $CKPT/COMPLETE ] || phase ckpt 60 python3 $BASELINE/make_ckpt.py --ckpt $CKPT --bf16-batches ""
for P in "$@"; do
  case $P in
    stocktrain) phase stocktrain 100 python3 $BASELINE/bench_train.py --ckpt $CKPT --r 64 --alpha 16 --targets q_proj,k_proj,v_proj --seqlens ${STOCK_SEQS:-2048} ;;
    train)      for SEQ in ${TRAIN_SEQS:-2048}; do  # TRAIN_VARIANTS_<seq> picks the variants per length
                  V=TRAIN_VARIANTS_$SEQ; phase train 120 python3 bench/gpu_train.py --model $CKPT --seq $SEQ ${!V:+--variants ${!V}}
                done ;;
    trainb)     for V in ${TRAINB_VARIANTS//,/ }; do  # a process each: compiled layers cannot be undone
                  phase trainb 100 python3 bench/gpu_train.py --model $CKPT --seq 2048 --variants $V; done ;;
    stockserve) phase stockserve 100 python3 $BASELINE/bench_infer.py --ckpt $CKPT --mode 4bit --batches ${STOCK_BATCHES:-1,8} ;;
    serve)      phase serve 100 python3 bench/gpu_serve.py --model $CKPT ${SERVE_ARGS:-} ;;
    long)       phase long 150 python3 bench/gpu_long.py --model $CKPT ${LONG_ARGS:-} ;;
    guided)     tokenizer_to $CKPT  # the guide compiles its grammar for the model's tokenizer
                phase guided 120 python3 bench/guided_cost.py --model $CKPT ${GUIDED_ARGS:-} ;;
    app)        tokenizer_to $CKPT  # the app loads the tokenizer from the model folder
                phase app 200 python3 bench/app_gpu.py --model $CKPT ${APP_ARGS:-} ;;
    nf4)        phase nf4 60 python3 bench/nf4_kernel.py ;;
    paged)      phase paged 40 python3 bench/paged_attention.py ;;
    fp8)        phase fp8 60 python3 bench/fp8_weights.py ;;
    profile)    phase profile 60 python3 bench/gpu_profile.py --model $CKPT ;;
    multi)      tokenizer_to $CKPT  # the recipe loads the tokenizer from the model folder
                phase multi 120 python3 bench/gpu_multi.py --model $CKPT --gpus ${GPUS:-2} ;;
    *) echo "unknown phase $P" ;;
  esac
done
echo "=== all done after $(( $(date +%s) - START ))s"
