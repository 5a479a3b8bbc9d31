"""The one lazy safetensors reader (io/safetensors.py) reads a statistics file and a sharded
checkpoint (written by transformers or by our ShardWriter) exactly as the safetensors library does,
and names the file at fault for a checkpoint that is incomplete or inconsistent."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from fusion_bench_pave.io.safetensors import INDEX, LazyTensors, ShardWriter
from fusion_bench_pave.io.statistics import save_stats
from fusion_bench_pave.pave.covariance import CovarianceStats
from reference.tiny_models import decoder


def library_read(directory) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint directory, read by the safetensors library."""
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            tensors |= {key: f.get_tensor(key) for key in f.keys()}
    return tensors


def assert_reads_like_the_library(lazy: LazyTensors, expected: dict[str, torch.Tensor]) -> None:
    assert sorted(lazy) == sorted(expected) and len(lazy) == len(expected)
    assert lazy.nbytes == sum(t.numel() * t.element_size() for t in expected.values())
    for name, tensor in expected.items():
        read = lazy[name]
        assert read.dtype == tensor.dtype and torch.equal(read, tensor), name


def test_a_statistics_file_reads_checked(tmp_path):
    g = torch.Generator().manual_seed(0)
    xtx = {"enc.q": torch.randn(6, 6, dtype=torch.float64, generator=g), "enc.fc2": torch.randn(9, 9, generator=g)}
    stats = CovarianceStats(xtx=xtx, count={"enc.q": 4, "enc.fc2": 4}, input_of={"enc.q": "enc.q", "enc.fc2": "enc.fc2"})
    with open(tmp_path / "s.safetensors", "wb") as handle:
        save_stats(handle, stats)
    lazy = LazyTensors(tmp_path / "s.safetensors")
    assert lazy.checked and list(lazy) == ["enc.q", "enc.fc2"]  # written order kept
    assert_reads_like_the_library(lazy, xtx)
    assert json.loads(lazy.metadata["count"]) == stats.count and "crc32" not in lazy.metadata


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_transformers_sharded_checkpoint_reads_like_the_library(tmp_path, dtype):
    model = decoder("qwen2", num_hidden_layers=2).to(dtype)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / INDEX).exists() and len(list(tmp_path.glob("*.safetensors"))) >= 2
    lazy = LazyTensors(tmp_path)
    assert not lazy.checked  # the library writes no checksums
    assert list(lazy) == list(json.loads((tmp_path / INDEX).read_text())["weight_map"])  # the index's order
    assert_reads_like_the_library(lazy, library_read(tmp_path))
    assert "model.layers.0.self_attn.q_proj.bias" in lazy and "model.layers.0.mlp.up_proj.bias" not in lazy


def test_shard_writer_output_reads_back_exactly(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {
        "a": torch.randn(40, 30, generator=g).to(torch.bfloat16), "b": torch.randn(50, 20, generator=g, dtype=torch.float64),
        "ids": torch.arange(300), "mask": torch.rand(70, generator=g) > 0.5, "half": torch.randn(3, 4, generator=g).half(),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
    }
    writer = ShardWriter(tmp_path / "sharded", max_shard_bytes=4000)
    (tmp_path / "sharded").mkdir()
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    writer.close()
    index = json.loads((tmp_path / "sharded" / INDEX).read_text())
    assert len(set(index["weight_map"].values())) == 3 and index["metadata"]["total_size"] == LazyTensors(tmp_path / "sharded").nbytes
    assert_reads_like_the_library(LazyTensors(tmp_path / "sharded"), tensors)
    assert_reads_like_the_library(LazyTensors(tmp_path / "sharded"), library_read(tmp_path / "sharded"))
    single = ShardWriter(tmp_path / "single")
    (tmp_path / "single").mkdir()
    single.add("a", tensors["a"])
    single.close()
    assert sorted(p.name for p in (tmp_path / "single").iterdir()) == ["model.safetensors"]
    assert_reads_like_the_library(LazyTensors(tmp_path / "single"), {"a": tensors["a"]})


def test_an_incomplete_or_inconsistent_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weights"):
        LazyTensors(tmp_path)
    decoder("mistral", num_hidden_layers=2).save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    index = json.loads((tmp_path / INDEX).read_text())
    index["weight_map"]["model.extra.weight"] = shards[0].name
    (tmp_path / INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"index\.json does not match its shards \(tensors \['model\.extra\.weight'\]"):
        LazyTensors(tmp_path)
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{shards[1].name}: corrupt or truncated safetensors file"):
        LazyTensors(tmp_path)
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=shards[1].name):
        LazyTensors(tmp_path)


def test_shard_writers_of_two_ranks_write_the_files_of_one_writer(tmp_path):
    """Ranks that claim the same groups agree on every shard; each writes its own (shard i: rank i % 2),
    only the tensors it claimed are asked of it, and together they write one writer's files."""
    g = torch.Generator().manual_seed(2)
    groups = [{f"g{i}.{part}": torch.randn(10 + i, 7, generator=g) for part in ("w", "u", "v")} for i in range(6)]

    def write(out, rank, world_size):
        out.mkdir(exist_ok=True)
        writer, computed = ShardWriter(out, max_shard_bytes=2500, rank=rank, world_size=world_size), []
        for group in groups:
            if writer.claim({name: t.numel() * t.element_size() for name, t in group.items()}):
                computed.append(next(iter(group)))
                for name, tensor in group.items():
                    writer.write(name, tensor)
        writer.close()
        return computed

    one = write(tmp_path / "one", 0, 1)
    halves = [write(tmp_path / "two", rank, 2) for rank in (0, 1)]
    files = lambda d: {p.name: p.read_bytes() for p in sorted(d.iterdir())}  # noqa: E731
    assert files(tmp_path / "two") == files(tmp_path / "one") and len(files(tmp_path / "one")) >= 4  # 3+ shards + index
    assert sorted(halves[0] + halves[1]) == sorted(one) and halves[0] and halves[1] and not set(halves[0]) & set(halves[1])
    shard_of = json.loads((tmp_path / "one" / INDEX).read_text())["weight_map"]
    assert all(len({shard_of[name] for name in group}) == 1 for group in groups)  # a group is never split
    writer = ShardWriter(tmp_path / "three", max_shard_bytes=2500)
    (tmp_path / "three").mkdir()
    writer.claim({"x": 4})
    with pytest.raises(ValueError, match=r"tensor 'y' \(4 bytes\) was not claimed"):
        writer.write("y", torch.zeros(1))
