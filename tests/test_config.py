"""CompileConfig: one frozen, validated value that the CLI and the Python API both build; pass order as data;
the stage loop; the import graph has no cycles."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from memopt.config import PASS_RULES, CompileConfig, resolve_passes

ROOT = Path(__file__).resolve().parents[1]


def test_json_round_trip():
    cfg = CompileConfig(target="rtx-4090", seq=64, quantize="int4:g32", kv="kivi:k4v2:g32:r32", offload=["model.layers.1"],
                        offload_kv=[0, "model.layers.2"], budget="3MiB", kv_host=True, calibration=["a text"])
    again = CompileConfig.from_json(json.loads(json.dumps(cfg.to_json())))
    assert again == cfg and again.passes == ("quantize", "offload", "kv_offload", "kv", "arena")
    with pytest.raises(ValueError, match="unknown compile config fields"):
        CompileConfig.from_json({**cfg.to_json(), "bogus": 1})


@pytest.mark.parametrize("listed, implied, want", [
    (("arena",), ("quantize",), ("quantize", "arena")),
    (("arena",), ("quantize", "offload", "kv_offload", "kv"), ("quantize", "offload", "kv_offload", "kv", "arena")),
    (("quantize",), ("offload",), ("quantize", "offload")),
    ((), ("kv",), ("kv",)),
])
def test_passes_are_placed_by_the_rules(listed, implied, want):
    got = resolve_passes(listed, implied)
    assert got == want
    for i, p in enumerate(got):  # every rule holds
        assert all(got.index(q) < i for q in PASS_RULES[p] if q in got)


@pytest.mark.parametrize("listed, fragment", [(("arena", "quantize"), "list it last"),
                                              (("offload", "quantize"), "list quantize before offload"),
                                              (("fuse",), "unknown pass 'fuse'")])
def test_bad_pass_orders_are_one_line(listed, fragment):
    with pytest.raises(ValueError, match=fragment):
        CompileConfig(passes=listed)


def test_invalid_specs_fail_when_the_config_is_built():
    with pytest.raises(ValueError, match="int3"):
        CompileConfig(quantize="int3")
    with pytest.raises(ValueError, match="seq"):
        CompileConfig(seq=0)
    with pytest.raises(TypeError, match="bogus"):
        CompileConfig.from_kwargs(bogus=1)


def test_cli_and_api_build_the_same_config(monkeypatch, tmp_path):
    """`memopt compile` parses flags into a CompileConfig and calls compile_model with it."""
    import memopt.pipeline
    from memopt.cli import main

    seen = {}

    def fake_compile(model, example_inputs=None, config=None, **kwargs):
        seen["config"] = config
        raise ValueError("stop here")

    monkeypatch.setattr(memopt.pipeline, "compile_model", fake_compile)
    rc = main(["compile", "demo", "--seq", "32", "--quantize", "int8", "--kv", "kivi:4:g16:r16", "--offload",
               "model.layers.1", "-o", str(tmp_path / "out")])
    assert rc == 2
    assert seen["config"] == CompileConfig(seq=32, quantize="int8", kv="kivi:4:g16:r16", offload=("model.layers.1",))


def test_stages_are_a_list():
    from memopt.pipeline import STAGES

    names = [name for name, _, _ in STAGES]
    assert names[0] == "capture" and names[-1] == "plan"
    passes = [n for n in names if n in PASS_RULES]
    assert passes == sorted(passes, key=list(PASS_RULES).index)  # the loop runs passes in a valid order


def _imports(path: Path, package: str) -> set[str]:
    """memopt modules `path` imports, at module level or inside functions (a deferred import that closes a
    cycle is still a cycle: the two modules cannot be understood apart)."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("memopt")}
        elif isinstance(node, ast.ImportFrom) and node.module:
            mod = node.module if node.level == 0 else ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [node.module])
            if mod.startswith("memopt"):
                out.add(mod)
                out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def _modules() -> dict[str, Path]:
    roots = {"memopt": ROOT / "memopt", "memopt.passes": ROOT / "passes", "memopt.solvers": ROOT / "solvers"}
    mods = {}
    for prefix, root in roots.items():
        for p in root.rglob("*.py"):
            rel = p.relative_to(root).with_suffix("")
            parts = [x for x in rel.parts if x != "__init__"]
            mods[".".join([prefix, *parts])] = p
    return mods


def test_no_import_cycles():
    """Imports between memopt modules form no cycle."""
    mods = _modules()
    graph = {m: {i for i in _imports(p, m if p.name == "__init__.py" else m.rsplit(".", 1)[0]) if i in mods and i != m}
             for m, p in mods.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*stack, m, n])}")
            if n not in state:
                visit(n, [*stack, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_each_program_is_exported_once_after_its_passes(monkeypatch):
    """Quantize + offload + KV offload + KV compression: each program is exported once, when captured, and
    made a program again once after all its rewrite passes (the passes hand GraphModules to each other), not
    once per pass: lifted back without tracing (`memopt.lift`); the Plan still says what the programs hold."""
    import torch

    import memopt.capture as cap
    from memopt.capture import clear_captures
    from memopt.pipeline import compile_model

    clear_captures()  # an earlier test's trace of demo would otherwise be reused (no capture export at all)
    exported, lifted = [], []
    real, real_lift = torch.export.export, cap.lift

    def counting(module, *args, **kwargs):
        exported.append(type(module).__name__)
        return real(module, *args, **kwargs)

    def lifting(gm, like):
        ep = real_lift(gm, like)
        lifted.append(ep is not None)
        return ep

    monkeypatch.setattr(torch.export, "export", counting)
    monkeypatch.setattr(cap, "lift", lifting)
    result = compile_model("demo", seq=32, quantize="int8", offload=["model.layers.1"], offload_kv=[0], kv="kivi:4")
    assert result.plan.passes == ("quantize", "offload", "kv_offload", "kv", "arena")
    assert exported == ["CausalLMLogits", "StaticCacheDecoder"]  # capture: the forward and generation programs
    assert lifted == [True, True]  # after the passes: each program lifted back once, none traced again
    rows = {d.name: d for d in result.plan.decisions}
    assert rows["model.model.layers.1"].placement == "host"
    assert rows["model.model.layers.0"].kv_placement == "host"
    layers = [d for name, d in rows.items() if re.fullmatch(r"model\.model\.layers\.\d+", name)]
    assert len(layers) >= 2 and all(d.kv_policy.startswith("kivi:k4v4:") for d in layers if d.kv_placement != "host")
    prompt = torch.tensor([[5, 17, 99, 4, 8, 21]])
    assert result.module.generate(prompt, 4).shape == (1, 4)
