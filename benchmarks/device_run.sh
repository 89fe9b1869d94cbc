#!/usr/bin/env bash
# device_run.sh: everything one GPU session needs, in one command, logging under $OUT.
#   1. carried wheels (platformdirs) installed to /tmp/site
#   2. prebuild of the specs the tests need, in parallel (16 cores)
#   3. GPU tests (pytest tests/gpu), then compute-sanitizer on a small config
#   4. benchmarks (JIT costs, peers, the original FlashAttention README benchmark, long
#      sequences, attention variants), results under $OUT/results/<gpu>/
# Usage (on the device): bash benchmarks/device_run.sh [steps...]
#   steps: build test test80 sanitize profile sweep kernels overhead jit peers original long
#          variants ab sdpa hf hfbench cp cpbench decode decodebench decodeprof decodesweep
#          prefill (chunked prefill's tests and benchmark alone)
#          testws wssweep wsdrop wsab wsres wsprof (the sm90ws forward family) dropout dropouterr softcap
#          bwdwide (the wgmma backward at d 160-256)
#   (default: build test sanitize jit peers)
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export FLASHJIT_CACHE_DIR=${FLASHJIT_CACHE_DIR:-/tmp/flashjit-cache}
STEPS=${*:-build test sanitize jit peers}
# Variant specs (window, softcap, ALiBi, sink; prebuild's --window/--softcap/--alibi/--sink take
# yes/no/both, default no), 84 in all. variant_specs_a: softcap, ALiBi, sink alone and the
# sliding windows (also what benchmarks/bench_variants.py runs), every variant at once in the
# mma.sync family at d 64/128, the dropout-mask probe; variant_specs_b: the combinations
# tests/gpu/test_variants.py uses (Gemma 2, gpt-oss, every variant at once, with dropout) and
# the mma.sync family's own head dims, the persistent grid's variant cases. $1: prebuild --jobs.
pb() { python3 -m flashjit.prebuild --kernel fwd bwd "$@"; }
EVERY_VARIANT="--causal yes --window yes --softcap yes --alibi yes --sink yes"
variant_specs_a() {
  pb --jobs $1 --dtype bf16 --head-dim 64 128 --causal both --softcap yes
  pb --jobs $1 --dtype bf16 --head-dim 64 128 --causal both --alibi yes
  pb --jobs $1 --dtype bf16 --head-dim 64 128 --causal both --sink yes
  pb --jobs $1 --dtype fp16 bf16 --head-dim 64 128 --causal both --window yes
  pb --jobs $1 --family sm80 --dtype fp16 bf16 --head-dim 64 128 $EVERY_VARIANT
}
variant_specs_b() {
  pb --jobs $1 --dtype fp16 --head-dim 32 64 96 128 $EVERY_VARIANT
  pb --jobs $1 --dtype bf16 --head-dim 32 96 --causal no --window yes
  pb --jobs $1 --dtype bf16 --head-dim 128 256 --causal yes --window yes --softcap yes
  pb --jobs $1 --dtype bf16 --head-dim 160 256 $EVERY_VARIANT
  pb --jobs $1 --dtype fp16 --head-dim 224 $EVERY_VARIANT
  pb --jobs $1 --dtype fp16 bf16 --head-dim 64 --causal yes --window yes --sink yes
  pb --jobs $1 --dtype bf16 --head-dim 128 --causal yes --softcap yes --sink yes
  pb --jobs $1 --dtype bf16 --head-dim 128 --causal no --window yes --sink yes
  pb --jobs $1 --dtype bf16 --head-dim 128 --causal no --softcap yes --alibi yes
  pb --jobs $1 --dtype fp16 --head-dim 64 --causal no --softcap yes
  pb --jobs $1 --dtype bf16 --head-dim 64 128 $EVERY_VARIANT --dropout yes
  pb --jobs $1 --family sm80 --dtype bf16 --head-dim 64 $EVERY_VARIANT --dropout yes
}
# Both lists in two streams of 8 jobs (most lines hold only 2-8 specs); their logs are appended
# to $1 and removed ($OUT returns only a few files), their summary lines printed.
variant_specs() {
  variant_specs_a 8 > "$OUT/prebuild_variants_a.log" 2>&1 &
  variant_specs_b 8 > "$OUT/prebuild_variants_b.log" 2>&1
  wait
  cat "$OUT"/prebuild_variants_[ab].log >> "$1"
  grep -h "^built \|^FAILED\|^error" "$OUT"/prebuild_variants_[ab].log
  rm -f "$OUT"/prebuild_variants_[ab].log
}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
for step in $STEPS; do
  echo "=== $step $(date +%T)"
  case $step in
    build)
      python3 -m flashjit.prebuild --kernel ${KERNELS:-fwd bwd} --dtype fp16 bf16 --causal both --head-dim ${HEAD_DIMS:-32 64 96 128 160 192 224 256} \
        --dropout no --jobs 16 2>&1 | tee "$OUT/prebuild.log" | tail -n 3
      python3 -m flashjit.prebuild --kernel dropout_mask 2>&1 | tee -a "$OUT/prebuild.log" | tail -n 1
      # dropout specs the tests use
      python3 -m flashjit.prebuild --kernel ${KERNELS:-fwd bwd} --dtype fp16 bf16 --head-dim 64 128 \
        --causal both --dropout yes --jobs 16 2>&1 | tee -a "$OUT/prebuild.log" | tail -n 3
      # on sm90a the forward and backward at d 64/128 are the sm90 family: the sm80 one too, for test80
      FLASHJIT_KERNEL_FAMILY=sm80 python3 -m flashjit.prebuild --kernel fwd bwd --dtype fp16 bf16 --head-dim 64 128 \
        --causal both --dropout both --jobs 16 2>&1 | tee -a "$OUT/prebuild.log" | tail -n 3
      variant_specs "$OUT/prebuild.log" ;;
    test)
      timeout ${TEST_TIMEOUT:-400} python3 -m pytest -q --maxfail=25 -p no:cacheprovider tests/gpu ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest_gpu.log" | tail -n 30 ;;
    test80)  # the sm80 (mma.sync) forward and backward where the sm90 family would serve (d 64/128 on sm90a)
      FLASHJIT_KERNEL_FAMILY=sm80 timeout ${TEST_TIMEOUT:-400} python3 -m pytest -q --maxfail=25 -p no:cacheprovider \
        tests/gpu/test_fwd.py tests/gpu/test_bwd.py -k "grid or random or varlen or gqa or dropout_matches" 2>&1 \
        | tee "$OUT/pytest_gpu_sm80.log" | tail -n 30 ;;
    testws)  # the warp-specialised Hopper forward alone (csrc/sm90ws, the default forward on sm90a
             # at d 64-256): its specs, the forward tests through it, racecheck/synccheck on a
             # small config (quicker than build + test when only that kernel changed)
      FLASHJIT_KERNEL_FAMILY=sm90ws python3 -m flashjit.prebuild --kernel fwd --dtype fp16 bf16 \
        --head-dim ${WS_DIMS:-64 96 128 160 192 224 256} --causal both --dropout ${WS_DROPOUT_SPECS:-no} --jobs 16 2>&1 | tail -n 1
      FLASHJIT_KERNEL_FAMILY=sm90ws timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -x -p no:cacheprovider \
        tests/gpu/test_fwd.py -k "grid or random or varlen or gqa or lengths" 2>&1 | tee "$OUT/pytest_ws.log" | tail -n 15
      for tool in ${WS_SANITIZERS:-racecheck synccheck}; do
        FLASHJIT_KERNEL_FAMILY=sm90ws timeout 200 compute-sanitizer --tool $tool --error-exitcode 1 \
          python3 tests/gpu/sanitize_small.py 2>&1 | tail -n 4 | tee "$OUT/sanitizer_ws_$tool.log"
      done ;;
    wssweep)  # sm90ws forward tiles (head dim:block_n,stages,consumers) against the default
              # families and cuDNN: bf16, 1k/8k, causal and not (benchmarks/ws_time.py)
      WS_TILES=${WS_TILES:-"64:128,3,1 64:128,3,2 64:128,3,3 128:64,2,1 128:128,3,2 192:64,3,2 256:64,2,2"}
      FLASHJIT_KERNEL_FAMILY=sm90 python3 -m flashjit.prebuild --kernel fwd --dtype bf16 --head-dim 64 128 \
        --causal both --jobs 4 2>&1 | tail -n 1 &
      FLASHJIT_KERNEL_FAMILY=sm80 python3 -m flashjit.prebuild --kernel fwd --dtype bf16 --head-dim 192 256 \
        --causal both --jobs 4 2>&1 | tail -n 1 &
      for dt in $WS_TILES; do
        FLASHJIT_KERNEL_FAMILY=sm90ws python3 -m flashjit.prebuild --kernel fwd --dtype bf16 \
          --head-dim ${dt%%:*} --causal both --tile ${dt#*:} --jobs 4 2>&1 | tail -n 1 &
      done
      wait
      FLASHJIT_KERNEL_FAMILY=sm90 python3 benchmarks/ws_time.py 2>&1 | tee -a "$OUT/ws_sweep.log"
      WS_DIMS="192 256" FLASHJIT_KERNEL_FAMILY=sm80 python3 benchmarks/ws_time.py 2>&1 | tee -a "$OUT/ws_sweep.log"
      for dt in $WS_TILES; do
        WS_DIMS=${dt%%:*} FLASHJIT_KERNEL_FAMILY=sm90ws FLASHJIT_FWD_TILE=${dt#*:} python3 benchmarks/ws_time.py \
          2>&1 | sed "s/^/tile ${dt#*:}: /" | tee -a "$OUT/ws_sweep.log"
      done ;;
    softcap)  # the variant specs and tests (quicker than build + test when only the variants'
              # code changed), then softcap's forward overhead (ws_time.py, bf16, SOFTCAPS)
      variant_specs "$OUT/prebuild.log"
      pb --jobs 16 --dtype bf16 --head-dim ${WS_DIMS:-64 128 256} --causal both --softcap both 2>&1 | tail -n 1
      timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider tests/gpu/test_variants.py \
        ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest_variants.log" | tail -n 8
      for c in ${SOFTCAPS:-30 50}; do
        WS_DIMS="${WS_DIMS:-64 128 256}" WS_SEQLENS="${WS_SEQLENS:-1024 8192}" WS_SOFTCAP=$c \
          python3 benchmarks/ws_time.py 2>&1 | tee -a "$OUT/ws_softcap.log"
      done ;;
    wsdrop)  # the sm90ws forward with dropout against without (bf16; d 64: its two consumers and
             # the three-consumer tile, which spills), and forward + backward at d 192/256
      FLASHJIT_KERNEL_FAMILY=sm90ws python3 -m flashjit.prebuild --kernel fwd --dtype bf16 --head-dim 64 128 \
        --causal both --dropout both --jobs 8 2>&1 | tail -n 1 &
      FLASHJIT_KERNEL_FAMILY=sm90ws python3 -m flashjit.prebuild --kernel fwd --dtype bf16 --head-dim 64 \
        --causal both --dropout both --tile 128,3,3 --jobs 4 2>&1 | tail -n 1 &
      python3 -m flashjit.prebuild --kernel fwd bwd --dtype bf16 --head-dim 192 256 --causal both --jobs 6 2>&1 | tail -n 1 &
      wait
      WS_DROPOUT=0.1 python3 benchmarks/ws_time.py 2>&1 | tee -a "$OUT/ws_dropout.log"
      WS_DIMS=64 WS_DROPOUT=0.1 FLASHJIT_FWD_TILE=128,3,3 python3 benchmarks/ws_time.py 2>&1 \
        | sed "s/^/tile 128,3,3: /" | tee -a "$OUT/ws_dropout.log"
      timeout 300 python3 benchmarks/bench_peers.py --out "$OUT/results" --modes fwd_bwd --dtypes bf16 \
        --head-dims 192 256 2>&1 | tail -n 16 ;;
    dropout)  # the dropout mask (common/dropout.cuh) in every family: its specs, the dropout
              # tests (default families, then sm80), the forward's dropout cost (ws_time.py)
      pb --jobs 8 --dtype fp16 bf16 --head-dim 64 128 --causal both --dropout yes 2>&1 | tail -n 1 &
      FLASHJIT_KERNEL_FAMILY=sm80 pb --jobs 8 --dtype fp16 bf16 --head-dim 64 128 --causal both \
        --dropout yes 2>&1 | tail -n 1 &
      wait
      pb --jobs 8 --dtype bf16 --head-dim 64 128 $EVERY_VARIANT --dropout yes 2>&1 | tail -n 1 &
      pb --jobs 4 --family sm80 --dtype bf16 --head-dim 64 $EVERY_VARIANT --dropout yes 2>&1 | tail -n 1 &
      python3 -m flashjit.prebuild --kernel dropout_mask 2>&1 | tail -n 1 &
      pb --jobs 4 --dtype bf16 --head-dim 64 128 --causal both 2>&1 | tail -n 1 &
      wait
      timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider tests/gpu -k dropout 2>&1 \
        | tee "$OUT/pytest_dropout.log" | tail -n 8
      FLASHJIT_KERNEL_FAMILY=sm80 timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider \
        tests/gpu/test_bwd.py -k dropout 2>&1 | tee "$OUT/pytest_dropout_sm80.log" | tail -n 4
      WS_DROPOUT=0.1 python3 benchmarks/ws_time.py 2>&1 | tee -a "$OUT/ws_dropout.log" ;;
    dropouterr)  # dropout gradient errors over many mask draws against the 2x criterion
                 # (benchmarks/dropout_errors.py: d 64, causal shapes with short rows); with a
                 # carried .baseline checkout, its flashjit too (JIT-compiled on first use)
      pb --jobs 8 --dtype fp16 bf16 --head-dim 64 --causal both --dropout yes 2>&1 | tail -n 1 &
      python3 -m flashjit.prebuild --kernel dropout_mask 2>&1 | tail -n 1 &
      if [ -d .baseline/flashjit ]; then  # the baseline's specs, in parallel
        (cd .baseline && export FLASHJIT_CACHE_DIR=/tmp/flashjit-cache-baseline PYTHONPATH=/tmp/site:$PWD/.baseline
         pb --jobs 8 --dtype fp16 bf16 --head-dim 64 --causal both --dropout yes 2>&1 | tail -n 1
         python3 -m flashjit.prebuild --kernel dropout_mask 2>&1 | tail -n 1) &
      fi
      wait
      timeout ${DROPOUTERR_TIMEOUT:-300} python3 benchmarks/dropout_errors.py ${DROPOUTERR_ARGS:-} 2>&1 \
        | tee "$OUT/dropout_errors.log" | tail -n 60
      if [ -d .baseline/flashjit ]; then  # the same against an older checkout (carry .baseline)
        FLASHJIT_CACHE_DIR=/tmp/flashjit-cache-baseline timeout ${DROPOUTERR_TIMEOUT:-300} \
          python3 benchmarks/dropout_errors.py --tree .baseline ${DROPOUTERR_ARGS:-} 2>&1 \
          | tee "$OUT/dropout_errors_baseline.log" | tail -n 60
      fi ;;
    wsab)  # the sm90ws forward of this tree against .baseline's (carry .baseline): ws_time.py
           # run from each tree (its own flashjit, csrc and binary cache), alternating, WS_ROUNDS times (2)
           # (WS_DROPOUT=p / WS_SOFTCAP=c: with dropout / softcap against without, in each tree)
      rm -rf /tmp/ab_base && mkdir -p /tmp/ab_base && cp -r .baseline/flashjit .baseline/csrc benchmarks /tmp/ab_base/
      for tree in /tmp/ab_base $PWD; do
        (cd $tree && export FLASHJIT_CACHE_DIR=/tmp/flashjit-cache-ab-$(basename $tree) PYTHONPATH=/tmp/site:$tree
         FLASHJIT_KERNEL_FAMILY=sm90ws pb --jobs 8 --kernel fwd --dtype bf16 --head-dim ${WS_DIMS:-64 128} \
           --causal both --dropout $([ -n "${WS_DROPOUT:-}" ] && echo both || echo no) \
           --softcap $([ -n "${WS_SOFTCAP:-}" ] && echo both || echo no) 2>&1 | tail -n 1) &
      done
      wait
      for round in $(seq 1 ${WS_ROUNDS:-2}); do
        for tree in /tmp/ab_base $PWD; do
          name=$([ $tree = $PWD ] && echo new || echo baseline)
          (cd $tree && FLASHJIT_CACHE_DIR=/tmp/flashjit-cache-ab-$(basename $tree) PYTHONPATH=/tmp/site:$tree \
             python3 benchmarks/ws_time.py 2>&1 | sed "s/^/$name round $round: /") | tee -a "$OUT/ws_ab.log"
        done
      done ;;
    wsres)  # the forward with inputs that require grad (it also writes O's rounding residual for
            # the backward) against without, and cuDNN's with them: WS_RESIDUAL=1 ws_time.py
      WS_RESIDUAL=1 WS_SEQLENS="${WS_SEQLENS:-512 1024 2048 8192}" timeout 300 python3 \
        benchmarks/ws_time.py 2>&1 | tee "$OUT/ws_residual.log" ;;
    wsprof)  # ncu of the sm90ws forward (bf16, 8k, d 64 and 128): stall reasons, issue and pipe
             # use, and the hottest SASS instructions by warp-stall samples (profile_ws.py);
             # WSPROF_BWD=1: the sm90 backward's dK/dV kernel instead (plus shared-memory use)
      if [ -n "${WSPROF_BWD:-}" ]; then wsprof_k=dk_dv; wsprof_run="--backward"
      else wsprof_k=flash_fwd_ws; wsprof_run=""; fi
      for d in ${WSPROF_DIMS:-64 128}; do
        timeout 200 ncu --clock-control none --launch-skip 2 --launch-count 1 -k regex:$wsprof_k \
          --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
          --section ComputeWorkloadAnalysis --section SourceCounters --import-source no \
          ${WSPROF_BWD:+--section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables} \
          -f -o /tmp/wsprof_d$d python3 benchmarks/profile_ws.py run --head-dim $d $wsprof_run > /dev/null 2>&1
        ncu -i /tmp/wsprof_d$d.ncu-rep --page details > "$OUT/ncu_ws_d$d.log" 2>&1
        ncu -i /tmp/wsprof_d$d.ncu-rep --page source --csv --print-source sass > /tmp/wsprof_src_d$d.csv 2>&1
        python3 benchmarks/profile_ws.py summary /tmp/wsprof_src_d$d.csv --top ${WSPROF_TOP:-45} \
          > "$OUT/ncu_ws_hot_d$d.log" 2>&1
        grep -E "Duration|Compute \(SM\) Throughput|Issue Slots Busy|Issued Ipc|No Eligible|Warp Cycles Per Issued|Pipe Utilization|Tensor" "$OUT/ncu_ws_d$d.log" | head -20
        head -c 6000 "$OUT/ncu_ws_hot_d$d.log"
      done ;;
    sanitize)
      for tool in memcheck racecheck; do
        timeout 300 compute-sanitizer --tool $tool --error-exitcode 1 python3 tests/gpu/sanitize_small.py 2>&1 | tail -n 8 | tee "$OUT/sanitizer_$tool.log"
      done ;;
    profile)
      python3 -X importtime -c "import torch; import flashjit" 2>&1 | sort -t'|' -k2 -n | tail -n 25 > "$OUT/profile.txt"
      python3 -m cProfile -s cumtime benchmarks/first_call.py fwd 2>&1 | head -n 60 >> "$OUT/profile.txt"
      python3 -m cProfile -s tottime benchmarks/first_call.py fwd 2>&1 | head -n 40 >> "$OUT/profile.txt"
      grep RESULT "$OUT/profile.txt" ;;
    bwdwide)  # the wgmma backward at d 160-256 (column halves; BWDWIDE_DIMS): its specs, the
              # backward and variant tests there, memcheck of its calls, and its time against the
              # mma.sync backward (tile_sweep, FLASHJIT_KERNEL_FAMILY=sm80), bf16
      dims=${BWDWIDE_DIMS:-160 192 224 256}
      pb --jobs 16 --dtype fp16 bf16 --head-dim $dims --causal both --dropout both 2>&1 | tail -n 1
      for d in $dims; do pb --jobs 16 --dtype bf16 --head-dim $d $EVERY_VARIANT 2>&1 | tail -n 1; done
      pb --jobs 16 --dtype bf16 --head-dim 256 --causal yes --window yes --softcap yes 2>&1 | tail -n 1
      timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider tests/gpu/test_bwd.py \
        tests/gpu/test_variants.py -k "($(echo $dims | sed 's/ / or /g')) and not causal_shapes" 2>&1 | tee "$OUT/pytest_bwd_wide.log" | tail -n 15
      timeout 150 compute-sanitizer --tool memcheck --error-exitcode 1 python3 \
        tests/gpu/sanitize_small.py $dims 2>&1 | tail -n 4 | tee "$OUT/sanitizer_memcheck_bwd_wide.log"
      for fam in sm80 sm90; do
        FLASHJIT_KERNEL_FAMILY=$fam SWEEP_HEAD_DIMS="$dims" SWEEP_SEQLENS="${BWDWIDE_SEQLENS:-4096 16384}" timeout 150 python3 \
          benchmarks/tile_sweep.py bwd:csrc 2>&1 | sed "s/^variant/$fam variant/" | tee -a "$OUT/bwd_wide_time.log"
      done ;;
    sweep)
      timeout ${SWEEP_TIMEOUT:-400} python3 benchmarks/tile_sweep.py ${SWEEP:-128,64,4,2} 2>&1 | tee "$OUT/sweep.log" ;;
    kernels)  # per-kernel GPU times, flashjit vs SDPA flash (diagnostic)
      for cfg in "--d 128 --causal" "--d 128" "--d 64 --causal" "--d 64"; do
        timeout 120 python3 benchmarks/kernel_times.py --seqlen ${KERNELS_SEQLEN:-1024} $cfg 2>&1
      done | tee "$OUT/kernel_times.log" | grep "us$" ;;
    overhead)
      timeout 300 python3 benchmarks/bench_overhead.py ${OVERHEAD_ARGS:-} 2>&1 | tee "$OUT/overhead${OVERHEAD_ARGS:+_profile}.md" ;;
    jit)
      timeout 400 python3 benchmarks/bench_jit.py --out "$OUT/results" 2>&1 | tail -n 20 ;;
    peers)
      timeout ${PEERS_TIMEOUT:-400} python3 benchmarks/bench_peers.py --out "$OUT/results" ${PEERS_ARGS:-} 2>&1 | tee "$OUT/peers.log" | tail -n 70 ;;
    original)
      timeout ${ORIGINAL_TIMEOUT:-360} python3 benchmarks/benchmark_flash_attention.py --out "$OUT/results" ${ORIGINAL_ARGS:-} 2>&1 | tail -n 60 ;;
    long)
      timeout ${LONG_TIMEOUT:-300} python3 benchmarks/bench_long.py --out "$OUT/results" ${LONG_ARGS:-} 2>&1 | tail -n 25 ;;
    ab)  # the restructure: this tree against .baseline (an older checkout) in one run: bit-identical
         # outputs and per-kernel times (carry .baseline)
      timeout ${AB_TIMEOUT:-500} python3 benchmarks/ab_trees.py --baseline .baseline --out "$OUT/results" 2>&1 | tee "$OUT/ab.log" | tail -n 60 ;;
    variants)  # sliding window at 8k-128k; softcap/ALiBi/sink overhead; FlexAttention (builds its specs first if missing)
      timeout ${VARIANTS_TIMEOUT:-300} python3 benchmarks/bench_variants.py --out "$OUT/results" ${VARIANTS_ARGS:-} 2>&1 | tail -n 90 ;;
    sdpa)  # F.scaled_dot_product_attention through flashjit vs SDPA flash (FA2 port) and cuDNN
      timeout ${SDPA_TIMEOUT:-240} python3 benchmarks/bench_sdpa_provider.py --out "$OUT/results" ${SDPA_ARGS:-} 2>&1 | tail -n 30 ;;
    hf)  # HF transformers integration (flashjit/integrations/transformers.py): its specs, then its tests
      pb --jobs 16 --dtype bf16 --head-dim 64 --causal yes --window both --softcap both 2>&1 | tail -n 1
      pb --jobs 16 --dtype bf16 --head-dim 64 --causal yes --window both --sink yes 2>&1 | tail -n 1
      timeout ${HF_TIMEOUT:-300} python3 -m pytest -q -rs -p no:cacheprovider tests/gpu/test_transformers.py 2>&1 \
        | tee "$OUT/pytest_transformers.log" | tail -n 15 ;;
    hfbench)  # a ~1B random Llama: training step and prefill, flashjit vs sdpa (vs flash_attention_2)
      timeout ${HFBENCH_TIMEOUT:-300} python3 benchmarks/bench_transformers.py --out "$OUT/results" ${HFBENCH_ARGS:-} 2>&1 | tail -n 25 ;;
    cp|cpbench)  # two GPUs (nvidia-h200-x2): torch's context parallelism over flashjit (cp: tests,
                 # cpbench: benchmark); NVLink multicast off
      export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
      python3 -c "import torch; print('GPUs:', torch.cuda.device_count())"
      pb --jobs 32 --dtype fp16 bf16 --head-dim 64 128 --causal both 2>&1 | tail -n 1
      if [ $step = cp ]; then
        timeout ${CP_TIMEOUT:-500} python3 -m pytest -q -rs -s -p no:cacheprovider tests/gpu/test_context_parallel.py 2>&1 \
          | tee "$OUT/pytest_context_parallel.log" | grep -v "^\[rank" | tail -n 20
      else
        timeout ${CPBENCH_TIMEOUT:-540} python3 -m torch.distributed.run --standalone --nproc-per-node 2 \
          benchmarks/bench_context_parallel.py --out "$OUT/results" ${CPBENCH_ARGS:-} 2>&1 | grep -v "^\[rank" | tail -n 40
      fi ;;
    decodeprof)  # where decode time goes: kernel list per call (profiler), copy bandwidths,
                 # ncu counters of flashjit's and cuDNN's kernels on one large shape
      python3 -m flashjit.prebuild --kernel decode --dtype bf16 --head-dim 128 --causal no 2>&1 | tail -n 1
      timeout 240 python3 benchmarks/profile_decode.py 2>&1 | tee "$OUT/profile_decode.log" | tail -n 80
      timeout 200 ncu --clock-control none --launch-skip 2 --launch-count 4 --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats \
        python3 benchmarks/profile_decode.py --ncu-shape ${NCU_SHAPE:-gqa,64,4096} > "$OUT/ncu_decode.log" 2>&1
      grep -E "^  [a-z_]+.*\(|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Stall|L1/TEX Hit|L2 Hit" "$OUT/ncu_decode.log" | head -80 ;;
    decodesweep)  # decode tuning: num_splits per shape, then decode tiles (block_n, stages, loader: 1 cp.async, 2 bulk)
      TILES=${DECODE_TILES:-64,3,1 64,3,2}
      for t in $TILES; do
        python3 -m flashjit.prebuild --kernel decode --dtype bf16 --head-dim 128 --causal no --tile $t 2>&1 | tail -n 1 &
      done
      python3 -m flashjit.prebuild --kernel decode --dtype bf16 --head-dim 128 --causal no 2>&1 | tail -n 1
      wait
      timeout 200 python3 benchmarks/sweep_decode.py splits 2>&1 | tee "$OUT/sweep_splits.log"
      timeout 200 python3 benchmarks/sweep_decode.py tiles $TILES 2>&1 | tee "$OUT/sweep_tiles.log" ;;
    decode|decodebench|prefill)  # KV cache (flash_attn_with_kvcache, csrc/splitkv): specs, then
                         # tests and sanitizers (decode), the benchmark (decodebench), or the
                         # chunked-prefill tests and benchmark alone (prefill: the paged forward)
      dk() { python3 -m flashjit.prebuild --kernel decode --jobs 16 "$@" 2>&1 | tail -n 1; }
      dk --dtype fp16 --head-dim 64 128 --causal no
      dk --dtype bf16 --head-dim 128 256 --causal both
      dk --dtype bf16 --head-dim 192 --causal no
      dk --dtype bf16 --head-dim 128 --causal yes --window both --sink both
      dk --dtype bf16 --head-dim 128 --causal no --softcap yes --alibi yes
      dk --dtype bf16 --head-dim 128 --causal yes --window yes --softcap yes --alibi yes --sink yes
      # chunked prefill runs the forward kernel (ops.PREFILL_MIN_QUERIES): contiguous, and paged
      # (the _paged specs of tests/gpu/test_kvcache.py's prefill cases and sanitize_decode.py)
      fk() { python3 -m flashjit.prebuild --kernel fwd --jobs 4 "$@" 2>&1 | tail -n 1; }
      fk --dtype bf16 --head-dim 128 --causal yes &
      fk --dtype bf16 --head-dim 128 --causal both --paged yes &
      fk --dtype bf16 --head-dim 128 --causal yes --window yes --paged yes &
      fk --dtype fp16 --head-dim 64 --causal no --paged yes &
      fk --dtype bf16 --head-dim 256 --causal yes --paged yes &
      fk --dtype bf16 --head-dim 192 --causal no --paged yes &
      fk --dtype bf16 --head-dim 128 --causal yes --paged yes --family sm80 &
      wait
      if [ $step = prefill ]; then
        timeout 200 python3 -m pytest -q -rs -p no:cacheprovider tests/gpu/test_kvcache.py -k prefill 2>&1 \
          | tee "$OUT/pytest_kvcache_prefill.log" | tail -n 15
        timeout 150 python3 benchmarks/bench_decode.py --chunks-only --out "$OUT/results" 2>&1 \
          | tee "$OUT/decode_chunks.log" | tail -n 16
      elif [ $step = decode ]; then
        timeout ${DECODE_TIMEOUT:-300} python3 -m pytest -q -rs -p no:cacheprovider tests/gpu/test_kvcache.py 2>&1 \
          | tee "$OUT/pytest_kvcache.log" | tail -n 25
        for tool in memcheck racecheck; do
          timeout 200 compute-sanitizer --tool $tool --error-exitcode 1 python3 tests/gpu/sanitize_decode.py 2>&1 \
            | tail -n 6 | tee "$OUT/sanitizer_decode_$tool.log"
        done
      else
        timeout ${DECODEBENCH_TIMEOUT:-300} python3 benchmarks/bench_decode.py --out "$OUT/results" ${DECODEBENCH_ARGS:-} 2>&1 \
          | tee "$OUT/decode_bench.log" | tail -n 60
      fi ;;
  esac
done
# The device returns at most 8 files from $OUT: results (tables, JSON, plots) travel as one archive.
if [ -d "$OUT/results" ]; then
  tar czf "$OUT/results.tgz" -C "$OUT" results && rm -rf "$OUT/results"
fi
echo "=== done $(date +%T)"
