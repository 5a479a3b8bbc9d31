import json, sys
import torch
from transformers import AutoModelForCausalLM
from benchmarks.stream_merge_equality import compare
a = torch.load(sys.argv[1])
m = AutoModelForCausalLM.from_pretrained(sys.argv[2])
b = m.state_dict()
print(json.dumps(compare(b, a)))
pre = AutoModelForCausalLM.from_pretrained(sys.argv[3]).state_dict()
# how far PAVE moved the merge from plain TA (pretrained + sum of task vectors), to show the check is not vacuous
tas = [AutoModelForCausalLM.from_pretrained(p).state_dict() for p in sys.argv[4:]]
ta = {k: pre[k] + sum(t[k] - pre[k] for t in tas) for k in pre}
print("streamed vs plain TA:", json.dumps(compare(b, ta)))
