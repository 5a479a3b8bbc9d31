import sys, time, json
import torch
from benchmarks.reproduce import compose, instantiate
from benchmarks.smollm_llm_protocol import LLM_PROTOCOL
merger, extra, out = sys.argv[1], sys.argv[2:-1], sys.argv[-1]
cfg = compose([f"method={merger}", "modelpool=zoo_smollm", *LLM_PROTOCOL, "method.cache_dir=null", *extra])
modelpool, algorithm = instantiate(cfg.modelpool), instantiate(cfg.method)
t = time.perf_counter()
result = algorithm.run(modelpool)
print("merge seconds", time.perf_counter() - t)
torch.save(result["model"].state_dict(), out)
print("kept", json.dumps(result["pave"].get("kept_ratio") if isinstance(result["pave"], dict) else str(result["pave"])[:300]))
