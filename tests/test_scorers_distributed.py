"""The weight-error sweep on a local Ray cluster with two workers gives the
table of one process, bit for bit; a worker's refusal reaches the user as
bitalloc's own error."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import char_tokenizer, tiny_llama

from bitalloc import api
from bitalloc.errors import BadWeightsError
from bitalloc.scorers.distributed import RaySettings, ray_runner

ray = pytest.importorskip("ray")  # `make test` installs it (the test extra); a bare install may lack it


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _checkpoint(path, **overrides):
    tiny_llama(seed=5, tie_word_embeddings=False, num_hidden_layers=3, **overrides).save_pretrained(
        path, max_shard_size="40KB")
    char_tokenizer().save_pretrained(path)
    return str(path)


def _table(folder: str, tmp_path, name: str, ray_settings: RaySettings | None):
    before = os.environ.get("BITALLOC_CACHE")
    os.environ["BITALLOC_CACHE"] = str(tmp_path / f"cache-{name}")  # each measures afresh
    try:
        loaded = api.load(folder, stream=True, progress=False)
        settings = api.PlanSettings(api.Budget(3.5), ray=ray_settings)
        out = tmp_path / f"table-{name}.json"
        api.plan(settings=settings, loaded=loaded, out=str(tmp_path / f"plan-{name}.json"), save_table=str(out),
                 progress=False)
        return out.read_bytes()
    finally:
        if before is None:
            del os.environ["BITALLOC_CACHE"]
        else:
            os.environ["BITALLOC_CACHE"] = before


def test_two_ray_workers_give_the_single_process_table(cluster, tmp_path):
    folder = _checkpoint(tmp_path / "model")
    one = _table(folder, tmp_path, "one", None)
    two = _table(folder, tmp_path, "ray", RaySettings(workers=2, threads=1))
    assert one == two
    table = json.loads(two)
    assert len(table["units"]) == 3 * 7 and all(len(u["distortion"]) == len(table["options"])
                                                for u in table["units"].values())


def test_the_rows_come_from_two_worker_processes(cluster, tmp_path):
    from bitalloc.model.loading import resolve_source

    folder = _checkpoint(tmp_path / "model")
    loaded = api.load(folder, stream=True, progress=False)
    options = api.preflight(loaded, api.check_streamable(api.PlanSettings(api.Budget(3.5))))[0]
    run = ray_runner(resolve_source(folder), RaySettings(workers=2, threads=1))
    rows = list(run(loaded.inventory.units, ["mse"], options, False))
    assert sorted(name for name, _, _ in rows) == sorted(u.name for u in loaded.inventory.units)
    assert len(run.pids) == 2 and os.getpid() not in run.pids
    for name, row, norm2 in rows[:3]:  # a row measured here, in this process, is the same
        unit = loaded.inventory.unit(name)
        ctx = api.scoring_context(loaded, api.check_streamable(api.PlanSettings(api.Budget(3.5))), options,
                                  progress=False)
        assert ctx._unit_errors(unit, ["mse"]) == row and ctx._norms_seen[name] == norm2


def test_nan_weights_found_by_a_worker_are_bitallocs_error(cluster, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    _checkpoint(folder)
    shard = next(f for f in sorted(folder.glob("*.safetensors"))
                 if "model.layers.2.mlp.up_proj.weight" in load_file(str(f)))
    tensors = load_file(str(shard))
    tensors["model.layers.2.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(BadWeightsError, match="model.layers.2.mlp.up_proj.weight holds 1 NaN"):
        _table(str(folder), tmp_path, "nan", RaySettings(workers=2, threads=1))
    assert torch.isnan(load_file(str(shard))["model.layers.2.mlp.up_proj.weight"][0, 0])
