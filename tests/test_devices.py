"""Device placement: statistics collection, purification, SMILE upscaling + forward and PAVE end to
end on every device of the `device` fixture (the CPU everywhere, CUDA where available), each against
a CPU float64 reference. On the CPU they pin the device-generic code paths; on a GPU they are the
correctness half of benchmarks/gpu_check.sh."""

from __future__ import annotations

import torch
from lightning import Fabric
from pave_helpers import make_pool
from torch import nn

from fusion_bench_pave.pave import PAVE
from fusion_bench_pave.pave.covariance import CovarianceStats, collect_covariance
from fusion_bench_pave.pave.purification import PurifySettings, purify
from fusion_bench_pave.smile.decompose import smile_tensors
from fusion_bench_pave.smile.linear import SmileLinear
from reference.smile_forward import naive_forward


def rel_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.detach().cpu().double(), reference.detach().cpu().double()
    return float((value - reference).norm() / reference.norm())


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 12), nn.GELU(), nn.Linear(12, 8))


def statistics_on(device: torch.device, model: nn.Module, batches: list[torch.Tensor]) -> CovarianceStats:
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model.to(device)

        def forward(self, x):
            return self.net(x)

    return collect_covariance(Wrapped(), [({"x": b.to(device)}, None) for b in batches])


def test_statistics_on_the_device_equal_stored_float64_activations(device):
    model, batches = mlp(), [torch.randn(7, 5, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    stored: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda m, args, out, n=n: stored.setdefault(n, []).append(args[0]))
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for hook in hooks:
        hook.remove()
    stats = statistics_on(device, model, batches)
    assert all(xtx.device.type == device.type and xtx.dtype == torch.float64 for xtx in stats.xtx.values())
    for name, xs in stored.items():
        x = torch.cat(xs).reshape(-1, xs[0].shape[-1]).double()
        # float64 sums of the rows of a float32 forward; on a GPU its float32 kernels round the
        # deeper layers' inputs differently, by ~1e-7 relative, which bounds the difference
        assert rel_err(stats.covariance(f"net.{name}"), x.T @ x / len(x)) < (1e-12 if device.type == "cpu" else 1e-5)


def test_purification_on_the_device_equals_the_cpu(device):
    batches = [torch.randn(40, 12, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    tasks = {f"task{t}": mlp(seed=t + 1) for t in range(2)}
    stats = {t: statistics_on(torch.device("cpu"), m, batches) for t, m in tasks.items()}
    weights = {t: {l: m.get_submodule(l.removeprefix("net.")).weight.data for l in stats[t].layers}
               for t, m in tasks.items()}
    settings = PurifySettings(rho=0.7, eps0=0.01)
    cpu, cpu_ranks, _ = purify(weights, stats, settings)
    on_device = {t: CovarianceStats({k: v.to(device) for k, v in s.xtx.items()}, dict(s.count), dict(s.input_of))
                 for t, s in stats.items()}
    moved = {t: {l: w.to(device) for l, w in layers.items()} for t, layers in weights.items()}
    purified, ranks, _ = purify(moved, on_device, settings)
    assert ranks == cpu_ranks and min(r for rs in ranks.values() for r in rs.values()) < 8
    for t in weights:
        for layer, weight in purified[t].items():
            assert weight.device.type == device.type
            # float64 eigh on another device: the 1e-6 accuracy target per layer
            assert rel_err(weight, cpu[t][layer]) <= 1e-6, (t, layer)


def test_smile_upscaling_and_forward_on_the_device_equal_the_naive_cpu_forward(device):
    g = torch.Generator().manual_seed(0)
    w0, b0 = torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
    ws = [w0 + 0.1 * torch.randn(24, 16, generator=g) for _ in range(3)]
    bs = [b0 + 0.1 * torch.randn(24, generator=g) for _ in range(3)]
    layer = SmileLinear(16, 24, 3, 4, 6, 2).to(device)
    layer.load_state_dict(smile_tensors(w0.to(device), [w.to(device) for w in ws], b0.to(device),
                                        [b.to(device) for b in bs], 4, 6, True))
    x = torch.randn(2, 5, 16, generator=g)
    reference = SmileLinear(16, 24, 3, 4, 6, 2)
    reference.load_state_dict(smile_tensors(w0, ws, b0, bs, 4, 6, True))
    with torch.no_grad():
        y = layer(x.to(device))
        expected = naive_forward(reference.double(), x.double())
    assert y.device.type == device.type
    # float32 forward through float32 SVD factors vs float64 per-token reference (see gpu_check TOL)
    assert rel_err(y, expected) < 1e-5


def test_pave_end_to_end_with_its_fabric_on_the_device(device):
    settings = dict(merger={"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 0.3},
                    rho=0.75, num_samples=12, batch_size=4, eps0=0.01)
    runs = {}
    for where in dict.fromkeys(["cpu", device.type]):
        algorithm = PAVE(**settings)
        algorithm.fabric = Fabric(accelerator=where, devices=1)
        runs[where] = (algorithm.run(make_pool("clip"))["model"].state_dict(), algorithm.extras["ranks"])
    (cpu, cpu_ranks), (dev, dev_ranks) = runs["cpu"], runs[device.type]
    assert dev_ranks == cpu_ranks
    for key, value in cpu.items():
        assert rel_err(dev[key], value) <= 1e-6 if value.norm() > 0 else torch.equal(dev[key], value), key
