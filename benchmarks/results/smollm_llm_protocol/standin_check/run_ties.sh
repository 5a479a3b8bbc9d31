#!/bin/bash
cd /work/wt/smollm
export PYTHONPATH=$PWD FUSION_BENCH_PAVE_CACHE=/tmp/smollm_sub
R=/tmp/smollm_sub/runs
OVR="method.rho=0.998291015625 method.allocation=uniform method.eps0=0.01 method.eps_tol=0.01 method.num_samples=16 method.num_rows=null method.max_length=96 method.batch_size=16 method.calibration_padding=longest method.mask_padding=true method.sample_order=random method.seed=42"
/usr/bin/time -v fusion_bench method=pave_causal_lm 'method.merger={_target_:fusion_bench.method.TiesMergingAlgorithm,scaling_factor:0.6,threshold:20,remove_keys:[],merge_func:sum}' modelpool=zoo_smollm $OVR method.output_path=$R/streamed_pave_ties > $R/streamed_ties.log 2>&1
date -u > $R/ties_done
