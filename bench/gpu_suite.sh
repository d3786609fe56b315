#!/usr/bin/env bash
# The whole GPU check in one prepared run (under 8 minutes on one H100/H200):
#   decode-1b / decode-8b  autoregressive ms/token (ours, transformers generate with a static cache, the memory
#                          floor), prompt-lookup (ngram) chain:4 and the oracle (replays the target's own greedy
#                          text: the decoder's ceiling) chain:4 and dynamic:5:8:60, random Llama 1B / 8B shapes
#   profile-8b             torch.profiler per cycle (kernel launches, graph launches, stream syncs, copies) for
#                          ngram, the oracle and a random EAGLE-3 on the 8B shape (bench/profile_cycle.py)
#   pipeline               `python train.py run.device=cuda` on the demo target, exact mode: data_gen, EAGLE-3
#                          training, eval (tau, speedup, = AR), export
#   eagle3-8b              a random EAGLE-3 drafter, dynamic tree depth 5 / top-k 8 / 60 nodes, on the 8B shape
#                          (the per-phase split: draft / verify / other)
#   train-8b               EAGLE-3 online training tokens/s and MFU on the 8B shape (formula printed)
#   exact-1b               the target drafting for itself in exact mode: tau = depth + 1, = AR n/n
# With --demo the suite runs one step instead, `demo` (under 8 minutes): experiment=gpu_demo, a ~320M-parameter
# chat Llama pretrained on the GPU (pretrain=gpu_demo, <= 3 min), data_gen with its own regenerated answers,
# EAGLE-3 trained, evaluated in exact mode and exported; then DFlash trained, evaluated and exported on the same
# data (run gpu-demo-dflash, whose data_gen links to gpu-demo's). Its tau / speedup tables go to the same report.
# Every step runs under `timeout` and the suite goes on after a failed step; the tables are built at the end
# from what each step wrote as it went (bench/gpu_report.py) into BENCHMARKS.md's GPU section and
# <results>/gpu-suite.md, and copied under $OUT when that is set.
#
#   bash bench/gpu_suite.sh                       # on the GPU machine (installs .whl/*.whl first when present)
#   bash bench/gpu_suite.sh --device cpu --tiny   # the dry run: tiny shapes on the CPU, BENCHMARKS.md untouched
#   bash bench/gpu_suite.sh --demo                # experiment=gpu_demo alone (--device cpu --tiny --demo: its dry run)
#   SUITE_BUDGET=600 bash bench/gpu_suite.sh      # seconds for all steps together (default 480 on GPU)
set -u
cd "$(dirname "$0")/.."
DEVICE=${SUITE_DEVICE:-cuda}
TINY=${SUITE_TINY:-0}
DEMO=0
ARGS="$*"
while [ $# -gt 0 ]; do
  case $1 in
    --device) DEVICE=$2; shift 2 ;;
    --tiny) TINY=1; shift ;;
    --demo) DEMO=1; shift ;;
    *) echo "error: unknown argument $1: use --device DEVICE, --tiny and --demo" >&2; exit 2 ;;
  esac
done
START=$SECONDS
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RES=${SUITE_RESULTS:-runs/gpu-suite/$STAMP}
mkdir -p "$RES"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled \
  TOKENIZERS_PARALLELISM=false
# the offline GPU machine lacks hydra, omegaconf, deepspeed, datasets and the bundled data: carried as wheels
if compgen -G ".whl/*.whl" > /dev/null; then
  echo "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: installing .whl/*.whl failed: refill .whl/ (see the GPU section of BENCHMARKS.md)" >&2; exit 2; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
[ "$DEVICE" = cpu ] || export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # DeepSpeed's op builder rejects 9.0a

if [ "$TINY" = 1 ]; then  # the dry run: same steps, tiny shapes and budgets, one thread (the CPU is shared)
  BUDGET=${SUITE_BUDGET:-900}; LIM=(120 150 300 120 120 120 150); export OMP_NUM_THREADS=1
  SMALL=tiny; LARGE=demo; VOCAB=(); PROMPTS=(--prompts 2 --max-new-tokens 16 --threads 1)
  TREE=dynamic:3:4:12; TRAIN=(--batch 2 --seq 64 --steps 2 --warmup 1 --threads 1)
  PROF=(--tokens 16 --cases ngram=chain:4 oracle=chain:4 oracle=dynamic:3:4:12 eagle3=chain:4 eagle3=dynamic:3:4:12)
  PIPE=(experiment=smoke eval.num_prompts=1 eval.max_new_tokens=8 eval.tree.depth=3 eval.tree.top_k=4
        eval.tree.total_tokens=12)
  MD=$RES/BENCHMARKS.md; cp BENCHMARKS.md "$MD"
  # experiment=gpu_demo at toy size: a 4-layer target (EAGLE-3's export needs taps inside layers 1..L-1)
  DEMO_ARGS=(pretrain.num_layers=4 pretrain.hidden_size=64 pretrain.intermediate_size=128 pretrain.num_heads=4
             pretrain.num_kv_heads=2 pretrain.seq_len=128 pretrain.batch_size=4 pretrain.max_minutes=0.1
             pretrain.max_conversations=200 pretrain.eval_tokens=4096 pretrain.heldout_prompts=4 pretrain.gen_tokens=16
             data.max_conversations=8 data.max_length=128 data.gen_max_new_tokens=16 data.batch_size=4
             train.max_steps=2 train.micro_batch_size=2 train.eval_every=0 train.save_every=2 train.eval_rows=4
             eval.num_prompts=2 eval.max_new_tokens=16 eval.tree.depth=3 eval.tree.top_k=4 eval.tree.total_tokens=12)
  DEMO_LIM=600
else  # limits sum to 505 s, the budget (480 s) caps the last; expected ~6 min in all
  BUDGET=${SUITE_BUDGET:-480}; LIM=(75 100 110 50 70 40 60)
  SMALL=1b; LARGE=8b; VOCAB=(--vocab 128256); PROMPTS=(--prompts 3 --max-new-tokens 64 --hf-compile-limit 45)
  # the default steps keep measuring sdpa training attention as they did before train.attention=auto (flex on
  # CUDA, compiled on first use): its compile time is not yet measured against these steps' limits
  TREE=dynamic:5:8:60; TRAIN=(--batch 4 --seq 1024 --steps 6 --warmup 2 --override train.attention=sdpa)
  PIPE=(train.attention=sdpa); PROF=(--tokens 64)
  MD=BENCHMARKS.md; DEMO_ARGS=(); DEMO_LIM=480  # the demo's own budget: 8 minutes
fi
[ "$DEMO" = 1 ] && BUDGET=${SUITE_BUDGET:-$DEMO_LIM}
EXACT=eval.exact=true  # the float32 verification that makes T=0 output equal the autoregressive one
$PY -c "import bench.bench_decode" || { echo "error: the project does not import here (see above)" >&2; exit 2; }

step() {  # step NAME LIMIT_S CMD...: bounded by timeout and by what is left of the budget; never stops the suite
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - START))) t0=$SECONDS rc
  if [ "$left" -lt 20 ]; then
    printf '%s\t200\t0\t%s\t%s\n' "$name" "$limit" "$*" >> "$RES/steps.tsv"; echo "[$name] skipped: budget spent"; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "[$name] limit ${limit}s: $*"
  timeout -k 10 "$limit" "$@" > "$RES/$name.log" 2>&1
  rc=$?
  printf '%s\t%d\t%d\t%d\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" "$*" >> "$RES/steps.tsv"
  echo "[$name] exit $rc after $((SECONDS - t0)) s"
  grep -v -i warn "$RES/$name.log" | tail -n 4
}

{ $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'transformers', transformers.__version__)"; command -v nvidia-smi > /dev/null && nvidia-smi -L; } 2>&1 | tee "$RES/env.log"
if [ "$DEMO" = 1 ]; then  # experiment=gpu_demo alone: EAGLE-3 through the whole chain, then DFlash on its data
  D=$RES/runs
  CHAIN="$PY train.py experiment=gpu_demo run.device=$DEVICE run.root=$D ${DEMO_ARGS[*]}"
  step demo "$DEMO_LIM" bash -c "$CHAIN && mkdir -p $D/gpu-demo-dflash && ln -sfn ../gpu-demo/data_gen \
$D/gpu-demo-dflash/data_gen && $CHAIN drafter=dflash export=dflash run.name=gpu-demo-dflash \
target.path=$D/gpu-demo/target_pretrain stages=[train,eval,export]"
else  # the default steps
DEC=($PY bench/bench_decode.py --device "$DEVICE" --no-write "${PROMPTS[@]}")
step decode-$SMALL "${LIM[0]}" "${DEC[@]}" --random-llama $SMALL "${VOCAB[@]}" --reference ngram oracle \
  --trees chain:4 $TREE --json "$RES/decode-$SMALL.jsonl"
step decode-$LARGE "${LIM[1]}" "${DEC[@]}" --random-llama $LARGE "${VOCAB[@]}" --reference ngram oracle \
  --trees chain:4 $TREE --json "$RES/decode-$LARGE.jsonl"
step profile-$LARGE "${LIM[6]}" $PY bench/profile_cycle.py --device "$DEVICE" --shape $LARGE "${VOCAB[@]}" "${PROF[@]}" \
  --json "$RES/profile-$LARGE.jsonl"
# shellcheck disable=SC2086  # $EXACT is zero or one override
step pipeline "${LIM[2]}" $PY train.py run.device="$DEVICE" run.root="$RES/runs" $EXACT "${PIPE[@]}"
step decode-eagle3-$LARGE "${LIM[3]}" "${DEC[@]}" --random-llama $LARGE "${VOCAB[@]}" --reference \
  --random-drafter eagle3 --trees $TREE --no-peers --json "$RES/decode-eagle3-$LARGE.jsonl"
step train-$LARGE "${LIM[4]}" $PY bench/bench_train_mfu.py --device "$DEVICE" --random-llama $LARGE \
  "${VOCAB[@]}" "${TRAIN[@]}" --json "$RES/train-$LARGE.jsonl"
step decode-exact-$SMALL "${LIM[5]}" "${DEC[@]}" --random-llama $SMALL "${VOCAB[@]}" --reference target \
  --trees chain:4 --exact --no-peers --json "$RES/decode-exact-$SMALL.jsonl"
fi

$PY bench/gpu_report.py --results "$RES" --device "$DEVICE" --benchmarks "$MD" --wall $((SECONDS - START)) \
  --command "bash bench/gpu_suite.sh${ARGS:+ $ARGS}" > "$RES/report.log" 2>&1 \
  || { echo "error: bench/gpu_report.py failed:"; tail -n 20 "$RES/report.log"; }
cat "$RES/gpu-suite.md" 2>/dev/null
echo "results: $RES (tables: $RES/gpu-suite.md; BENCHMARKS.md section updated: $MD); $((SECONDS - START)) s in all"
if [ -n "${OUT:-}" ]; then  # what comes back from the GPU machine: at most 8 files
  cp "$RES/gpu-suite.md" "$OUT/" 2>/dev/null; cp "$MD" "$OUT/BENCHMARKS.md"
  tar czf "$OUT/gpu-suite-results.tar.gz" -C "$RES" --exclude='runs/*/data_gen' --exclude='runs/*/train/checkpoints' \
    --exclude='runs/*/train/final' --exclude='runs/*/export' .
  ls -la "$OUT"
fi
