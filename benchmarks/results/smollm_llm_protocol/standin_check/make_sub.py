"""A stand-in SmolLM2 zoo: the real pretrained SmolLM2-as-Mistral, trimmed to its first LAYERS decoder layers, and real prompt data, with each 'fine-tuned'
model = pretrained + a seeded random delta on every decoder-layer Linear (||tau||/||W|| = 1.3%, as the zoo)."""
import shutil, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file

main, side, z = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]) / "zoo" / "smollm-v1"
LAYERS = int(sys.argv[4])
z.mkdir(parents=True)
shutil.copytree(main / "data" / "rt_sentiment", z / "data" / "rt_sentiment")
for t in ["election_author", "news_sci"]:
    shutil.copytree(side / "data" / t, z / "data" / t)
from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained(main / "pretrained")
m.model.layers = m.model.layers[:LAYERS]
m.config.num_hidden_layers = LAYERS
m.save_pretrained(z / "pretrained")
AutoTokenizer.from_pretrained(main / "pretrained").save_pretrained(z / "pretrained")
sd = load_file(str(z / "pretrained" / "model.safetensors"))
for i, t in enumerate(["rt_sentiment", "election_author", "news_sci"]):
    g = torch.Generator().manual_seed(i)
    out = {}
    for k, w in sd.items():
        if ".layers." in k and k.endswith("proj.weight"):
            d = torch.randn(w.shape, generator=g) * (0.013 * w.norm() / w.numel() ** 0.5)
            out[k] = (w + d).contiguous()
        else:
            out[k] = w.clone()
    d = z / "models" / t
    d.mkdir(parents=True)
    for f in (z / "pretrained").iterdir():
        if f.name in ("config.json", "generation_config.json"):
            shutil.copy(f, d / f.name)
    save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})
# the original config with fewer layers (save_pretrained of the trimmed model writes layer_types: null,
# which the Mistral config then rejects)
import json
config = json.loads((main / "pretrained" / "config.json").read_text())
config["num_hidden_layers"] = LAYERS
for d in [z / "pretrained", *(z / "models").iterdir()]:
    (d / "config.json").write_text(json.dumps(config, indent=2))
(z / "COMPLETE").write_text("recipe 1\n")
print(z)
