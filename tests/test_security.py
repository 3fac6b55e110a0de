"""Artifacts are untrusted input: a tampered artifact whose manifest is re-hashed, as an attacker would,
never runs code on load or run (a marker file is never created) and fails with one clean line; the good
artifact still loads and runs identically. Writing never destroys data."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from memopt.emit.artifact import ArtifactError, load, save, verify
from memopt.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
IDS = torch.tensor([[5, 17, 99, 4]])


@pytest.fixture(scope="session")
def good(tmp_path_factory):
    """One compiled demo artifact (int8, with a generation program and a tokenizer-free plan) and what it
    computes; every test works on a copy."""
    from memopt.pipeline import compile_model

    result = compile_model("demo", seq=16, quantize="int8", max_cache=64)
    out = save(result.module, tmp_path_factory.mktemp("good") / "art", programs=result.programs)
    args = result.captured.example_inputs
    return out, args, result.module(*args), result.module.generate(IDS, 5)


@pytest.fixture
def art(good, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(good[0], dst)
    return dst


class _Payload:
    """Unpickling this creates `path`: the proof that code ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _rehash(d: Path, drop: tuple[str, ...] = (), add: tuple[str, ...] = ()) -> None:
    """What an attacker does after editing files: recompute the manifest so every checksum matches."""
    m = json.loads((d / "manifest.json").read_text())
    for name in drop:
        m["files"].pop(name)
    for name in [*m["files"], *add]:
        data = (d / name).read_bytes()
        m["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (d / "manifest.json").write_text(json.dumps(m))


def _edit_zip(path: Path, edit) -> None:
    """Rewrite the zip at `path`: `edit(entries: dict[name, bytes])` changes the entries in place."""
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    edit(entries)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n, b in entries.items():
            z.writestr(n, b)
    path.write_bytes(buf.getvalue())


def _edit_json(path: Path, name: str, edit) -> None:
    def change(entries):
        key = f"{name}/models/{name}.json"
        program = json.loads(entries[key])
        edit(program)
        entries[key] = json.dumps(program).encode()

    _edit_zip(path, change)


def _sample_inputs(d, marker):  # 1: a pickle where torch would read sample inputs
    payload = pickle.dumps(_Payload(marker))
    _edit_zip(d / "program.pt2", lambda e: e.update({"program/data/sample_inputs/model.pt": payload}))
    _rehash(d)


def _pickled_weight(d, marker):  # 2: a weight marked use_pickle
    config = {"config": {"model.lm_head.weight_q": {"path_name": "weight_0", "is_param": False, "use_pickle": True}}}
    _edit_zip(d / "program.pt2", lambda e: e.update({
        "program/data/weights/model_weights_config.json": json.dumps(config).encode(),
        "program/data/weights/weight_0": pickle.dumps(_Payload(marker))}))
    _rehash(d)


def _opaque_constant(d, marker):  # 3: an opaque (pickled) constant
    _edit_zip(d / "generate.pt2", lambda e: e.update({"generate/data/constants/custom_obj_0":
                                                          pickle.dumps(_Payload(marker))}))
    _rehash(d)


def _custom_obj_in_graph(d, marker):  # 3b: the graph asks for a custom object
    def edit(p):
        p["graph_module"]["graph"]["custom_obj_values"] = {"obj0": {"name": "obj0", "class_fqn": "os.system"}}

    _edit_json(d / "program.pt2", "program", edit)
    _rehash(d)


def _expr_code(d, marker):  # 4: a shape expression that is Python
    def edit(p):
        for v in p["graph_module"]["graph"]["sym_int_values"].values():
            v["as_expr"] = {"expr_str": f"__import__('builtins').open({str(marker)!r}, 'w')", "hint": None}

    _edit_json(d / "generate.pt2", "generate", edit)
    _rehash(d)


def _unlisted_program(d, marker):  # 4b: generate.pt2 not in the manifest, with an evil expression: never read
    _expr_code(d, marker)
    _rehash(d, drop=("generate.pt2",))


def _guards_code(d, marker):  # 6: guards_code, which ExportedProgram.module() compiles as Python
    _edit_json(d / "program.pt2", "program",
               lambda p: p.update(guards_code=[f"open({str(marker)!r}, 'w') is None"]))
    _rehash(d)


def _evil_target(d, marker):  # 7: a node that calls a Python function
    def edit(p):
        node = p["graph_module"]["graph"]["nodes"][0]
        node["target"] = "builtins.open"

    _edit_json(d / "program.pt2", "program", edit)
    _rehash(d)


def _tokenizer_remote_code(d, marker):  # 5: tokenizer auto_map to the artifact's own Python (unlisted)
    tok = d / "tokenizer"
    tok.mkdir()
    (tok / "tokenization_evil.py").write_text(f"open({str(marker)!r}, 'w')\n")
    (tok / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    _rehash(d, add=("tokenizer/tokenizer_config.json",))


def _tokenizer_listed_code(d, marker):  # 5b: ... and listed in the manifest
    _tokenizer_remote_code(d, marker)
    _rehash(d, add=("tokenizer/tokenization_evil.py",))


def _traversal(d, marker):  # the manifest names a path outside the directory
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["../outside.json"] = {"sha256": "0" * 64, "bytes": 0}
    (d / "manifest.json").write_text(json.dumps(m))


def _symlink(d, marker):  # a listed file that is a symbolic link out of the directory
    outside = d.parent / "outside.json"
    outside.write_bytes((d / "plan.json").read_bytes())
    (d / "plan.json").unlink()
    (d / "plan.json").symlink_to(outside)


ATTACKS = [  # (tamper, loads anyway?, a fragment of the one-line error)
    (_sample_inputs, False, "unexpected archive entries"),
    (_pickled_weight, False, "unexpected archive entries"),
    (_opaque_constant, False, "unexpected archive entries"),
    (_custom_obj_in_graph, False, "custom objects"),
    (_expr_code, False, "shape expression"),
    (_unlisted_program, True, None),
    (_guards_code, False, "guards_code"),
    (_evil_target, False, "builtins.open"),
    (_tokenizer_remote_code, None, None),
    (_tokenizer_listed_code, False, "a file memopt never writes"),
    (_traversal, False, "unsafe path"),
    (_symlink, False, "symbolic link"),
]


@pytest.mark.parametrize("tamper, loads, fragment", ATTACKS, ids=[a[0].__name__.strip("_") for a in ATTACKS])
def test_tampered_artifact_never_runs_code(tamper, loads, fragment, art, good, tmp_path):
    marker = tmp_path / "PWNED"
    tamper(art, marker)
    try:
        module = load(art)
    except ArtifactError as exc:
        assert loads is not True, f"should have loaded: {exc}"
        assert fragment is None or fragment in str(exc), str(exc)
        assert "\n" not in str(exc)
    else:
        assert loads is not False, "a tampered artifact loaded"
        assert torch.equal(module(*good[1]), good[2])
        if tamper is _unlisted_program:
            assert module.generator is None  # the unlisted file was never read
    assert not marker.exists(), "the artifact ran code while loading"
    rc = main(["run", str(art), "--json"])
    assert not marker.exists(), "the artifact ran code while running"
    assert rc in (0, 2)


def test_good_artifact_still_loads_and_runs_identically(art, good):
    module = load(art)
    assert torch.equal(module(*good[1]), good[2])
    assert torch.equal(module.generate(IDS, 5), good[3])
    with zipfile.ZipFile(art / "generate.pt2") as z:  # the program holds JSON only: no tensors, no pickles
        assert all(n.endswith((".json", "archive_format", "archive_version", "byteorder")) for n in z.namelist())


def test_programs_read_as_torch_reads_them(good):
    """memopt's JSON -> schema reader (type hints looked up once per class) builds the very dataclasses torch's
    `_dict_to_dataclass` builds, for both programs of an artifact."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import _dict_to_dataclass

    from memopt.emit.program_io import _to_dataclass

    for name in ("program", "generate"):
        with zipfile.ZipFile(good[0] / f"{name}.pt2") as z:
            data = json.loads(z.read(f"{name}/models/{name}.json"))
        assert _to_dataclass(schema.ExportedProgram, data) == _dict_to_dataclass(schema.ExportedProgram, data)


def test_a_program_is_serialized_again_only_when_it_changed(good, monkeypatch):
    """Saving a program again writes the JSON kept for its graph (torch's serializer is not called again), the
    same bytes; a change to what the JSON is made from (here a node's kept metadata) serializes it again, as a
    program never saved would be."""
    from memopt.emit import program_io

    ep = load(good[0]).programs["program"]
    calls, real = [], program_io._program_json
    monkeypatch.setattr(program_io, "_program_json", lambda p: calls.append(p) or real(p))
    first = program_io.dump_program(ep, "program")
    assert program_io.dump_program(ep, "program") == first and len(calls) == 1
    node = next(n for n in ep.graph.nodes if n.op == "call_function")
    node.meta["stack_trace"] = "changed"
    changed = program_io.dump_program(ep, "program")
    assert len(calls) == 2 and changed != first
    program_io._DUMPED.clear()
    assert program_io.dump_program(ep, "program") == changed and len(calls) == 3


def test_a_program_is_serialized_as_torch_serializes_it(good):
    """The program JSON skips torch's serializer's self-test (canonicalizing a deep copy of what it wrote, then
    dropping the copy): the same JSON as with it, and torch's `canonicalize` still canonicalizes for anyone else."""
    from torch._export.serde import serialize as serde

    from memopt.emit import program_io

    ep = load(good[0]).programs["generate"]
    calls, real = [], serde.canonicalize

    def counting(program, constants=None):
        calls.append(1)
        return real(program, constants)

    try:
        serde.canonicalize = counting
        mine = program_io._program_json(ep)
        assert calls == [] and serde.canonicalize is counting  # skipped, and put back
        saved = ep._guards_code, ep._example_inputs
        ep._guards_code, ep._example_inputs = [], None
        try:
            theirs = serde.serialize(ep, serialize_state_dict=False, serialize_constants=False)
        finally:
            ep._guards_code, ep._example_inputs = saved
        assert calls == [1]  # torch's own call checked its canonical form
    finally:
        serde.canonicalize = real
    program = json.loads(theirs.exported_program)
    for node in program["graph_module"]["graph"]["nodes"]:
        node["metadata"] = {k: v for k, v in node.get("metadata", {}).items() if k in program_io._KEEP_META}
    assert mine == json.dumps(program, separators=(",", ":"))


def test_kv_cache_zeros_are_not_stored(good):
    """Caches are all zeros when saved: stored as shapes, allocated when loaded."""
    from safetensors import safe_open

    with safe_open(str(good[0] / "weights.safetensors"), "pt") as f:
        zeros = json.loads(f.metadata()["memopt"])["zeros"]
        stored = set(f.keys())
    assert any("cache" in n for n in zeros) and not any(n in stored for n in zeros)


def test_signed_manifest(good, tmp_path, capsys):
    key_file = tmp_path / "key"
    key_file.write_bytes(b"team secret")
    module = load(good[0])
    signed = save(module, tmp_path / "signed", key=b"team secret")
    assert torch.equal(load(signed, key=b"team secret")(*good[1]), good[2])
    with pytest.raises(ArtifactError, match="does not match this key"):
        load(signed, key=b"another key")
    with pytest.raises(ArtifactError, match="not signed"):
        load(good[0], key=b"team secret")
    # an attacker edits a file and re-hashes the manifest: the signature catches it
    (signed / "plan.json").write_text((signed / "plan.json").read_text().replace('"demo"', '"evil"'))
    _rehash(signed)
    assert main(["verify", str(signed)]) == 0  # hashes alone cannot tell
    capsys.readouterr()
    assert main(["verify", str(signed), "--key", str(key_file)]) == 2
    err = capsys.readouterr().err
    assert "does not match this key" in err and err.count("\n") == 1


def test_verify_cli(good, tmp_path, capsys):
    assert main(["verify", str(good[0])]) == 0
    assert "ok" in capsys.readouterr().out
    bad = tmp_path / "bad"
    shutil.copytree(good[0], bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["files"] = list(m["files"])
    (bad / "manifest.json").write_text(json.dumps(m))
    assert main(["verify", str(bad)]) == 2
    assert "'files' table" in capsys.readouterr().err


MALFORMED = [  # (what to break, the one-line message fragment)
    ("entry without bytes", lambda d: _manifest(d, lambda m: m["files"]["plan.json"].pop("bytes")), "'bytes'"),
    ("files as a list", lambda d: _manifest(d, lambda m: m.update(files=list(m["files"]))), "'files' table"),
    ("truncated program", lambda d: _truncate(d, "program.pt2"), "not a program archive"),
    ("truncated weights", lambda d: _truncate(d, "weights.safetensors"), "weights.safetensors"),
    ("unknown dtype", lambda d: _plan(d, lambda p: p["inputs"][0].update(dtype="os.system")), "unknown dtype"),
    ("plan not JSON", lambda d: (d / "plan.json").write_text("{nope") or _rehash(d), "plan.json"),
    ("manifest not JSON", lambda d: (d / "manifest.json").write_text("{nope"), "is corrupt"),
    ("decisions malformed", lambda d: _plan(d, lambda p: p.update(decisions=[{"bogus": 1}])), "malformed"),
    ("huge zero buffer", lambda d: _huge_zeros(d), "do not belong together"),
]


def _huge_zeros(d: Path) -> None:
    """A KV cache declared as 2**50 zeros: refused by its shape, never allocated."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(d / "weights.safetensors"), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    extra = json.loads(meta["memopt"])
    name = next(n for n in extra["zeros"] if "key_cache" in n)
    extra["zeros"][name]["shape"] = [1 << 20, 1 << 20, 1 << 10]
    save_file(tensors, str(d / "weights.safetensors"), metadata={"memopt": json.dumps(extra)})
    _rehash(d)


def _manifest(d: Path, edit) -> None:
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))


def _truncate(d: Path, name: str) -> None:
    p = d / name
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    _rehash(d)


def _plan(d: Path, edit) -> None:
    p = json.loads((d / "plan.json").read_text())
    edit(p)
    (d / "plan.json").write_text(json.dumps(p))
    _rehash(d)


@pytest.mark.parametrize("what, breaks, fragment", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_artifacts_are_one_clean_error(what, breaks, fragment, art, capsys):
    breaks(art)
    with pytest.raises(ArtifactError) as info:
        load(art)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert main(["run", str(art)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memopt: error:") and err.count("\n") == 1 and fragment in err


# ---------------------------------------------------------------- writing never destroys data


def test_output_refuses_a_directory_that_is_not_an_artifact(good, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert main(["compile", "demo", "--seq", "8", "-o", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "not a memopt artifact" in err and "--force" in err and err.count("\n") == 1
    assert (mine / "thesis.tex").read_text() == "years of work"
    module = load(good[0])
    with pytest.raises(ValueError, match="not a memopt artifact"):
        save(module, mine)
    save(module, mine, force=True)
    assert not (mine / "thesis.tex").exists() and verify(mine)
    save(module, mine)  # replacing an artifact needs no --force


@pytest.mark.parametrize("out, fragment", [(".", "current directory"), ("file.txt/out", "is a file"),
                                           ("file.txt", "not a directory")])
def test_output_paths_refused_before_work(out, fragment, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    assert main(["compile", "demo", "--seq", "8", "-o", out]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_output_read_only(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    assert main(["compile", "demo", "--seq", "8", "-o", str(ro / "out")]) == 2
    assert "not writable" in capsys.readouterr().err


def _resave(src: Path, dst: Path, env: dict) -> subprocess.CompletedProcess:
    code = f"import memopt; memopt.save(memopt.load({str(src)!r}), {str(dst)!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["after-weights", "before-swap"])
def test_killed_writer_leaves_the_old_artifact(point, good, art, tmp_path):
    """A writer killed (SIGKILL) half-way through or just before the swap: DIR still holds the complete old
    artifact; the killed writer's temporary directory is cleaned up by the next write."""
    before = (art / "manifest.json").read_bytes()
    proc = _resave(good[0], art, {**ENV, "MEMOPT_TEST_KILL_AT": point})
    assert proc.returncode == -9
    assert (art / "manifest.json").read_bytes() == before and verify(art)
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".art.tmp-")]
    assert stale, "the killed writer should have left its temporary directory"
    save(load(good[0]), art)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".art.")]


def test_interrupted_two_rename_swap_is_recovered(art, good, tmp_path):
    """Where renameat2 is missing, a crash between the two renames leaves DIR absent and `.DIR.old-*`
    complete: loading (or the next write) puts it back."""
    os.rename(art, tmp_path / ".art.old-999999-x")
    assert torch.equal(load(art)(*good[1]), good[2])
    assert not (tmp_path / ".art.old-999999-x").exists()


@pytest.mark.slow  # over 5 s on one core: the full suite runs it
def test_concurrent_writers(good, tmp_path):
    module = load(good[0])
    errors = []

    def write():
        try:
            for _ in range(3):
                save(module, tmp_path / "shared")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert verify(tmp_path / "shared")
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]


@pytest.mark.slow
def test_disk_full_is_one_line_and_writes_nothing(good, tmp_path):
    """A write that hits the file-size limit (EFBIG, as a full disk gives ENOSPC): one line, nothing left."""
    script = ("import resource, signal, memopt\n"
              f"m = memopt.load({str(good[0])!r})\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
              "try:\n"
              f"    memopt.save(m, {str(tmp_path / 'out')!r})\n"
              "except ValueError as exc:\n"
              "    print(type(exc).__name__, exc)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("OutputError") and "File too large" in proc.stdout, proc.stdout
    assert proc.stdout.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
