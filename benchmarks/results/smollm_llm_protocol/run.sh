#!/bin/bash
# SmolLM2 zoo under the LLM protocol: in-memory TA + PAVE+TA, streamed PAVE+TA and PAVE+TIES, evaluation
# run from the repository root; the zoo must exist (ensure_zoo('smollm'), about 50 min on 2 cores)
set -ex
ROOT=$PWD
OUT=$ROOT/benchmarks/results/smollm_llm_protocol
LOGS=/tmp/smollm_llm; mkdir -p $LOGS  # logs and checkpoints stay outside the repository
OVR="method.rho=0.998291015625 method.allocation=uniform method.eps0=0.01 method.eps_tol=0.01 method.regularization=doubling method.floor_factor=1.5 method.num_samples=64 method.num_rows=null method.max_length=96 method.batch_size=16 method.calibration_padding=longest method.mask_padding=true method.sample_order=random method.seed=42 method.calibration_split=train"
/usr/bin/time -v python -m benchmarks.smollm_llm_protocol inmemory --out $OUT > $LOGS/inmemory.log 2>&1
cd $LOGS
/usr/bin/time -v fusion_bench method=pave_ta_causal_lm modelpool=zoo_smollm $OVR method.merger.scaling_factor=1.0 method.output_path=$LOGS/streamed_pave_ta > $LOGS/streamed_ta.log 2>&1
/usr/bin/time -v fusion_bench method=pave_causal_lm modelpool=zoo_smollm $OVR method.output_path=$LOGS/streamed_pave_ties \
  'method.merger={_target_:fusion_bench.method.TiesMergingAlgorithm,scaling_factor:0.6,threshold:20,remove_keys:[],merge_func:sum}' > $LOGS/streamed_ties.log 2>&1
cd $ROOT
/usr/bin/time -v python -m benchmarks.smollm_llm_protocol streamed --out $OUT --compare "PAVE + Task Arithmetic (streamed)" \
  --checkpoint "PAVE + Task Arithmetic (streamed)=$LOGS/streamed_pave_ta" "PAVE + TIES-Merging (streamed)=$LOGS/streamed_pave_ties" > $LOGS/streamed_eval.log 2>&1
