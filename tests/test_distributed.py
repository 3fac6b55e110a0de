"""Pipeline stages on torch.distributed (gloo, CPU): memopt.emit.stages compiles one program pair per stage,
memopt.serve.distributed runs them under torchrun, one process per stage.

Oracles: the single-process compile of the same model with the same options (forward logits allclose, greedy
tokens identical), and its weights and KV cache, which the stages must partition by layer (each rank holds
exactly its layers' tensors, byte for byte).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from memopt.emit.stages import (
    StageSpec,
    compile_stages,
    even_split,
    save_stages,
    split_from_plan,
    stage_specs,
)
from memopt.frontend.sources import ModelSource
from memopt.pipeline import compile_model
from memopt.planning.plan import Plan
from memopt.serve.distributed import StageError, _state_bytes, launch

N_LAYERS = 5
RUN_TIMEOUT_S = 60  # every wait of every rank; a deadlock fails the test in a minute, not 5


@pytest.fixture(scope="module")
def llama():
    """A 5-layer, 64-wide random-init Llama (seeded) as a ModelSource."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    return ModelSource("tiny-llama", LlamaForCausalLM(cfg).eval(), "causal_lm", cfg)


def _ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _owner(name: str, specs: tuple[StageSpec, ...]) -> int | None:
    """The stage that must hold tensor `name` (None: every stage may: rotary tables)."""
    m = re.search(r"(?:layers\.|_cache_|cache_)(\d+)(?:\.|_|$)", name)
    if m:
        return next(s.index for s in specs if s.first <= int(m.group(1)) < s.last)
    if "embed_tokens" in name:
        return 0
    if "lm_head" in name or name.endswith(("norm.weight", "norm.bias")):
        return len(specs) - 1
    return None


# ---------------------------------------------------------------- splits (no processes)
@pytest.mark.parametrize("split, fragment", [
    ([], "at least 1 stage (0 devices given)"),
    ([(0, 2), (3, 5)], "stage 1 covers layers [3, 5)"),
    ([(0, 2), (2, 2), (2, 5)], "stage 1 holds no decoder layer"),
    ([(0, 2), (2, 4)], "the last stage must end at 5"),
    ([(0, 3, 1)], "a (first, last) pair"),
    ([(0, 2.5), (2.5, 5)], "a (first, last) pair"),
])
def test_bad_splits_are_one_line(split, fragment):
    with pytest.raises(ValueError) as info:
        stage_specs(split, N_LAYERS)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_splits():
    assert even_split(5, 2) == [(0, 3), (3, 5)] and even_split(5, 5)[-1] == (4, 5)
    specs = stage_specs([(0, 0), (0, 5), (5, 5)], 5)  # embedding-only first stage, head-only last stage
    assert [(s.embed, s.head, len(s.layers)) for s in specs] == [(True, False, 0), (False, False, 5),
                                                                 (False, True, 0)]
    for bad in (0, 6, True):
        with pytest.raises(ValueError, match="stages"):
            even_split(5, bad)


def test_split_from_the_split_planner(llama):
    from memopt.planning.split import plan_split

    plan = plan_split(llama, target="1x(rtx-4090)+1x(rtx-3090)", seq=64, tensor_parallel=1)
    split = split_from_plan(plan, N_LAYERS)
    specs = stage_specs(split, N_LAYERS)  # a valid split, as the planner's ranges say
    for dev, spec in zip(sorted(plan.devices, key=lambda d: d.stage), specs):
        assert ("embed" in dev.layers) == spec.embed and ("head" in dev.layers) == spec.head
        assert all(str(i) in dev.layers or "-" in dev.layers for i in spec.layers)


# ---------------------------------------------------------------- stages in one process
def test_stages_hold_their_layers_and_chain_to_the_model(llama, tmp_path):
    """Fast: two stages compiled and run one after the other in this process equal the one-process compile,
    each holding exactly its layers' tensors; the plan records the stages and round-trips."""
    opts = {"passes": (), "seq": 12, "max_cache": 32}
    staged = compile_stages(llama, [(0, 2), (2, N_LAYERS)], **opts)
    ref = compile_model(llama, **opts)
    ids = _ids(1, 12, 1)
    with torch.no_grad():
        hidden = staged.stages[0].module(ids)
        assert hidden.shape == (1, 12, 64)
        torch.testing.assert_close(staged.stages[1].module(hidden), ref.module(ids), rtol=0, atol=0)
    want = _state_bytes(ref.module)
    for spec, stage in zip(staged.specs, staged.stages):
        held = _state_bytes(stage.module)
        mine = {n: b for n, b in held["weights"].items() if _owner(n, staged.specs) is not None}
        assert mine == {n: b for n, b in want["weights"].items() if _owner(n, staged.specs) == spec.index}
        assert held["kv_cache_bytes"] * N_LAYERS == want["kv_cache_bytes"] * len(spec.layers)
    plan = staged.plan
    assert [s["layers"] for s in plan.stages] == [[0, 2], [2, N_LAYERS]]
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    out = save_stages(staged, tmp_path / "art")
    from memopt.emit.artifact import load_plan
    from memopt.emit.stages import verify_stages

    assert load_plan(out) == plan
    files = verify_stages(out)["files"]
    assert {"plan.json", "stage0/manifest.json", "stage1/program.pt2", "stage1/weights.safetensors"} <= set(files)
    for nproc, fragment in ((0, "--nproc must be the number of stages (2), got 0"),  # refused before any process
                            (3, "has 2 pipeline stages; --nproc 3 cannot run it: pass --nproc 2")):
        with pytest.raises(ValueError) as info:
            launch(out, nproc=nproc, input_ids=ids, max_new_tokens=2)
        assert fragment in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------- under torchrun
CASES = [  # (id, split, compile options)
    ("2-stages", [(0, 3), (3, 5)], {}),
    ("3-stages", [(0, 1), (1, 3), (3, 5)], {}),
    ("embed-only+head-only", [(0, 0), (0, 5), (5, 5)], {}),
    ("int8", [(0, 2), (2, 5)], {"quantize": "int8"}),
    ("int4", [(0, 1), (1, 3), (3, 5)], {"quantize": "int4"}),
    ("kivi", [(0, 2), (2, 5)], {"kv": "kivi:4"}),
    ("int8+kivi-2bit+arena", [(0, 1), (1, 3), (3, 5)],
     {"quantize": "int8", "kv": "kivi:k4v2:g32:r32", "passes": ("arena",)}),
]


@pytest.mark.slow
@pytest.mark.parametrize("split, extra", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_pipeline_equals_one_process(llama, tmp_path, split, extra):
    """N processes (gloo): forward logits allclose, greedy tokens identical to the one-process compile with
    the same options; each rank holds exactly its layers' weights and KV cache."""
    opts = {"passes": (), "batch": 2, "seq": 16, "max_cache": 128, **extra}
    staged = compile_stages(llama, split, **opts)
    ref = compile_model(llama, **opts)
    out = save_stages(staged, tmp_path / "art")
    fwd, prompt = _ids(2, 16, 1), _ids(2, 9, 2)
    with torch.no_grad():
        want_logits = ref.module(fwd)
    want_tokens = ref.module.generate(prompt, 10)
    got = launch(out, forward_ids=fwd, input_ids=prompt, max_new_tokens=10, timeout_s=RUN_TIMEOUT_S)
    torch.testing.assert_close(got["logits"], want_logits, rtol=1e-5, atol=1e-5)
    assert got["tokens"].tolist() == want_tokens.tolist()
    want = _state_bytes(ref.module)
    assert [r["rank"] for r in got["ranks"]] == list(range(len(split)))
    for spec, held in zip(staged.specs, got["ranks"]):
        mine = {n: b for n, b in held["weights"].items() if _owner(n, staged.specs) is not None}
        assert mine == {n: b for n, b in want["weights"].items() if _owner(n, staged.specs) == spec.index}, spec
        assert held["kv_cache_bytes"] * N_LAYERS == want["kv_cache_bytes"] * len(spec.layers)
    assert sum(r["kv_cache_bytes"] for r in got["ranks"]) == want["kv_cache_bytes"]


@pytest.fixture(scope="module")
def two_stages(llama, tmp_path_factory):
    staged = compile_stages(llama, [(0, 2), (2, N_LAYERS)], passes=(), seq=16, max_cache=64)
    return save_stages(staged, tmp_path_factory.mktemp("two") / "art")


def _no_rank_left(directory) -> None:
    """No process runs `directory` (a rank started by torchrun or by hand names it), and no rank forked from this
    process's rank server (`launch`'s: its ranks show the server's command line) is still alive."""
    import psutil

    left = [p for p in psutil.process_iter(["cmdline"]) if str(directory) in " ".join(p.info["cmdline"] or [])]
    for child in psutil.Process().children():
        try:
            if "forkserver" in " ".join(child.cmdline()):
                left += [p for p in child.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
        except psutil.NoSuchProcess:
            pass
    assert not left, f"processes left running: {[p.pid for p in left]}"


@pytest.mark.slow
@pytest.mark.parametrize("fault, timeout_s, pattern", [
    ("1:2", RUN_TIMEOUT_S, r"^rank 1 died \(killed by SIGKILL\)"),
    ("0:3", RUN_TIMEOUT_S, r"^rank 0 died \(killed by SIGKILL\)"),
    ("1:2:hang", 4, r"^rank 0: .*: rank 1 did not answer within 4 s \(it hung"),
])
def test_a_rank_that_dies_or_hangs_is_one_error(two_stages, fault, timeout_s, pattern):
    t0 = time.perf_counter()
    with pytest.raises(StageError) as info:
        launch(two_stages, input_ids=_ids(1, 5, 0), max_new_tokens=8, timeout_s=timeout_s,
               env={"MEMOPT_TEST_FAULT": fault})
    assert re.search(pattern, str(info.value)) and "\n" not in str(info.value), str(info.value)
    assert time.perf_counter() - t0 < 60
    _no_rank_left(two_stages)


@pytest.mark.slow
def test_a_missing_stage_file_is_one_error(two_stages, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(two_stages, broken)
    (broken / "stage1" / "generate.pt2").unlink()
    with pytest.raises(StageError) as info:
        launch(broken, input_ids=_ids(1, 5, 0), max_new_tokens=4, timeout_s=RUN_TIMEOUT_S)
    assert str(info.value) == f"rank 1: artifact file generate.pt2 is missing from '{broken / 'stage1'}'; " \
                              "recompile the model"
    (broken / "stage1" / "manifest.json").unlink()  # the top manifest pins each stage's: refused before any rank
    with pytest.raises(ValueError, match=r"^artifact file stage1/manifest.json is missing from"):
        launch(broken, input_ids=_ids(1, 5, 0), max_new_tokens=4, timeout_s=RUN_TIMEOUT_S)
    _no_rank_left(broken)


@pytest.mark.slow
def test_cli_compile_devices_and_run(llama, tmp_path):
    """memopt compile HF_DIR --target 2xa100-80gb -o DIR; memopt run DIR --launch; torchrun -m memopt run DIR;
    memopt verify DIR; and a plain memopt run DIR says how to run it."""
    model_dir, out = tmp_path / "tiny", tmp_path / "out"
    llama.model.save_pretrained(model_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def memopt(*args, cmd=(sys.executable, "-m", "memopt")):
        return subprocess.run([*cmd, *map(str, args)], check=False, capture_output=True, text=True, env=env,
                              timeout=600)

    done = memopt("compile", model_dir, "--target", "2xa100-80gb", "--seq", "16", "--max-cache", "64",
                  "--quantize", "int8", "-o", out)
    assert done.returncode == 0, done.stderr
    assert "2 pipeline stages" in done.stdout and (out / "stage1" / "generate.pt2").is_file()
    launched = memopt("run", out, "--launch", "--json", "--timeout", RUN_TIMEOUT_S)
    assert launched.returncode == 0, launched.stderr
    summary = json.loads(launched.stdout)
    assert summary["stages"] == 2 and summary["outputs"]["output0"]["shape"] == [1, 16, 256]
    own = memopt("-m", "memopt", "run", out, "--json", cmd=(sys.executable, "-m", "torch.distributed.run",
                                                             "--standalone", "--nproc-per-node", "2"))
    assert own.returncode == 0, own.stderr
    assert json.loads(own.stdout)["outputs"] == summary["outputs"]  # rank 0 alone prints
    verified = memopt("verify", out)
    assert verified.returncode == 0 and verified.stdout.startswith(f"ok: {out}: 11 files")
    plain = memopt("run", out)
    assert plain.returncode == 2 and "holds a pipeline of 2 stages, one process each: run memopt run" in plain.stderr
