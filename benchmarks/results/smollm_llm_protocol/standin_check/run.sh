#!/bin/bash
cd /work/wt/smollm
export PYTHONPATH=$PWD FUSION_BENCH_PAVE_CACHE=/tmp/smollm_sub
R=/tmp/smollm_sub/runs; mkdir -p $R
OVR="method.rho=0.998291015625 method.allocation=uniform method.eps0=0.01 method.eps_tol=0.01 method.num_samples=16 method.num_rows=null method.max_length=96 method.batch_size=16 method.calibration_padding=longest method.mask_padding=true method.sample_order=random method.seed=42"
date -u > $R/start
/usr/bin/time -v python /tmp/smollm_sub/inmem.py pave_ta method.merger.scaling_factor=1.0 method.num_samples=16 $R/inmem_pave_ta.pt > $R/inmem.log 2>&1 &
/usr/bin/time -v fusion_bench method=pave_ta_causal_lm modelpool=zoo_smollm $OVR method.output_path=$R/streamed_pave_ta > $R/streamed_ta.log 2>&1 &
wait
date -u > $R/done
