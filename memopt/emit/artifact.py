"""Save and load compiled models as a directory of artifacts, safe to share.

    DIR/plan.json            the Plan (versioned schema)
    DIR/weights.safetensors  every tensor of every program (packed quantized weights, scales, compressed
                             blobs, constants), stored once; all-zero buffers (KV caches) only as shapes
    DIR/program.pt2          the forward program's graph (JSON in a zip; no tensors, no pickles)
    DIR/generate.pt2         decoder LMs: the generation program (static KV cache), likewise
    DIR/tokenizer/           the tokenizer's JSON / text files, when the model has one
    DIR/model.onnx           with --onnx: the forward program for ONNX Runtime
    DIR/report.html, memory.png   the plan and the memory timeline before/after, for a person
    DIR/manifest.json        memopt version, schema version, the SHA-256 and size of every file
    DIR/manifest.sig         optional: HMAC-SHA256 of manifest.json under a key the user holds

An artifact is untrusted input. Loading reads only files the manifest lists, under names memopt
writes, each checked against its SHA-256 (small files are hashed and parsed from the same bytes); it
never unpickles, evaluates or imports anything from the artifact: programs are rebuilt from checked
JSON (`memopt.emit.program_io`), tensors come from safetensors, the tokenizer loads without remote code.
The manifest's hashes guard against corruption; against an adversary who can rewrite the whole
directory, sign the manifest (`key=`) and verify with the same key. Written to a temporary sibling
and swapped into place atomically (`memopt.emit.outdir`), so DIR always holds a complete artifact.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch

from memopt.emit.module import assemble  # noqa: F401  (memopt.emit.artifact.assemble: re-exported)
from memopt.names import is_state
from memopt.emit.outdir import (
    FORMAT,
    MANIFEST,
    check_output,
    check_space,
    new_tmp,
    recover,
    swap_in,
    write_error,
)
from memopt.planning.plan import PLAN_SCHEMA_VERSION, Plan
from memopt.emit.program_io import DTYPES, ProgramError, Zeros, dump_program
from memopt.emit.program_io import load_program as _load_program_blob

SIGNATURE = "manifest.sig"
PROGRAMS = ("program", "generate")
_TOP_FILES = {"plan.json", "weights.safetensors", "program.pt2", "generate.pt2", "model.onnx", "report.html",
              "memory.png"}
_TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "chat_template.json", "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json",
                    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model"}
_SHA = re.compile(r"[0-9a-f]{64}\Z")
_STAGE_DIR = re.compile(r"stage[0-9]{1,4}\Z")  # memopt.emit.stages: `stage<r>/manifest.json` pins stage r's files
_ZEROS_MIN_BYTES = 4096
_MAX_SMALL_FILE = 1 << 30


class ArtifactError(ValueError):
    """A directory that is not a loadable memopt artifact; the message says what is wrong."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- saving


def _collect(ep, weights: dict[str, torch.Tensor], prefix: str, state: set[str]) -> None:
    """Every tensor of `ep` (parameters, buffers, constants) into `weights`, shared by name across programs
    when equal, else kept under `prefix::name`. `state` gets the keys of buffers the program writes (KV
    caches, their counters, staging slots): saved as empty, whatever a run left in them."""
    from memopt.runtime.quant_ops import canonicalize_int4_

    canonicalize_int4_([*ep.state_dict.values(), *ep.constants.values()])  # store the layout every device reads
    mutated = set(ep.graph_signature.buffers_to_mutate.values()) | {  # caches may be constants written in place
        n for n in [*ep.state_dict, *ep.constants] if is_state(n)}
    for name, t in [*ep.state_dict.items(), *ep.constants.items()]:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"program {prefix} holds a non-tensor constant {name!r} ({type(t).__name__}); "
                             "memopt artifacts store tensors only")
        key = name
        if name in mutated:  # shared with the other program only when it is the very same buffer (staging slots)
            if key in weights and weights[key].untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
                key = f"{prefix}::{name}"
            state.add(key)
        elif key in weights and not (weights[key].shape == t.shape and weights[key].dtype == t.dtype
                                     and torch.equal(weights[key], t.detach())):
            key = f"{prefix}::{name}"
        weights[key] = t.detach()


def _write_weights(weights: dict[str, torch.Tensor], path: Path, state: set[str] = frozenset()) -> None:
    """safetensors with tied tensors stored once (aliases); program state (`state`: KV caches,
    staging slots) and large all-zero tensors stored as shapes only (metadata `memopt`: {"aliases", "zeros"}),
    zeros when loaded."""
    from safetensors.torch import save_file

    tensors, aliases, zeros, by_storage = {}, {}, {}, {}
    for name, t in weights.items():
        dtype = _dtype_name(t.dtype)
        if dtype is not None and (name in state or (t.numel() * t.element_size() >= _ZEROS_MIN_BYTES
                                                    and not t.any())):
            zeros[name] = {"shape": list(t.shape), "dtype": dtype}
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in by_storage:
            aliases[name] = by_storage[key]  # tied weights are stored once
            continue
        if key is not None:
            by_storage[key] = name
        tensors[name] = t.contiguous().clone() if not t.is_contiguous() else t
    # one metadata key: safetensors writes its metadata map in no fixed order, and artifacts are byte-stable
    save_file(tensors, str(path), metadata={"memopt": json.dumps({"aliases": aliases, "zeros": zeros})})


def _dtype_name(dtype: torch.dtype) -> str | None:
    return next((k for k, v in DTYPES.items() if v == dtype), None)


def _tensor_bytes(programs: dict) -> int:
    seen, total = set(), 0
    for ep in programs.values():
        for t in [*ep.state_dict.values(), *ep.constants.values()]:
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def _save_tokenizer(tokenizer, directory: Path) -> None:
    """The tokenizer's files memopt reads back (JSON / text / sentencepiece), nothing else."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        keep = [p for p in Path(tmp).iterdir() if p.name in _TOKENIZER_FILES and p.is_file()]
        if keep:
            directory.mkdir()
            for p in keep:
                (directory / p.name).write_bytes(p.read_bytes())


def _sign(manifest_bytes: bytes, key: bytes) -> str:
    return hmac.new(key, manifest_bytes, hashlib.sha256).hexdigest()


def save(opt_module, directory: str | os.PathLike, *, programs: dict | None = None, tokenizer=None,
         onnx: bool = False, report=None, force: bool = False, key: bytes | None = None) -> Path:
    """Write `opt_module` (an OptimizedModule) and its exported `programs` ({"program": ep,
    "generate": ep}) to `directory`, atomically. An existing directory that is not a memopt artifact is
    refused unless `force`. `key`: sign the manifest (HMAC-SHA256; `load(..., key=key)` checks it)."""
    directory = check_output(directory, force=force)
    programs = programs if programs is not None else getattr(opt_module, "programs", None)
    for name in programs or {}:
        if name not in PROGRAMS:
            raise ValueError(f"program name must be one of {PROGRAMS}, got {name!r}")
    need = _tensor_bytes(programs or {}) * (2 if onnx else 1)
    check_space(directory, need)
    tmp = new_tmp(directory)
    try:
        plan: Plan = opt_module.plan
        (tmp / "plan.json").write_text(json.dumps(plan.to_json(), indent=1, default=str))
        weights: dict[str, torch.Tensor] = {}
        state: set[str] = set()
        for name, ep in (programs or {}).items():
            _collect(ep, weights, name, state)
            (tmp / f"{name}.pt2").write_bytes(dump_program(ep, name))
        if weights:
            _write_weights(weights, tmp / "weights.safetensors", state)
        _fault_point("after-weights")
        tokenizer = tokenizer if tokenizer is not None else getattr(opt_module, "tokenizer", None)
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp / "tokenizer")
        if onnx:
            from memopt.emit.onnx_export import export_onnx

            export_onnx(programs["program"], tmp / "model.onnx")
        if report is not None:
            from memopt.emit.report import write_report

            write_report(report, tmp)
        files = {p.relative_to(tmp).as_posix(): {"sha256": _sha256(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        write_manifest(tmp, files, key)
        _fault_point("before-swap")
        swap_in(tmp, directory)
    except BaseException as exc:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        err = write_error(exc, directory) if isinstance(exc, Exception) else None
        if err is not None:
            raise err from None
        raise
    return directory


def write_manifest(directory: Path, files: dict, key: bytes | None) -> None:
    """`directory`'s manifest listing `files` ({name: {"sha256", "bytes"}}), and its signature with `key`."""
    from memopt import __version__

    manifest = {"format": FORMAT, "memopt_version": __version__, "plan_schema_version": PLAN_SCHEMA_VERSION,
                "files": files}
    manifest_bytes = json.dumps(manifest, indent=1).encode()
    (directory / MANIFEST).write_bytes(manifest_bytes)
    if key is not None:
        (directory / SIGNATURE).write_text(json.dumps({"alg": "hmac-sha256", "sig": _sign(manifest_bytes, key)}))


def _fault_point(step: str) -> None:
    """Tests kill the writer here (MEMOPT_TEST_KILL_AT=step) to prove DIR stays complete."""
    if os.environ.get("MEMOPT_TEST_KILL_AT") == step:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- verifying


def _check_name(name: object, where: Path) -> str:
    if not isinstance(name, str) or name.startswith("/") or "\\" in name or "\x00" in name or any(
            part in ("", ".", "..") for part in name.split("/")):
        raise ArtifactError(f"manifest of {str(where)!r} lists an unsafe path {str(name)[:60]!r}; refusing to load")
    top, _, rest = name.partition("/")
    if not ((not rest and top in _TOP_FILES) or (top == "tokenizer" and rest in _TOKENIZER_FILES)
            or (_STAGE_DIR.match(top) and rest == MANIFEST)):  # a pipeline stage: an artifact of its own
        raise ArtifactError(f"manifest of {str(where)!r} lists {name[:60]!r}, a file memopt never writes; refusing "
                            "to load")
    return name


def _real_file(directory: Path, name: str) -> Path:
    """`directory/name` as a regular file inside `directory`: no symlink on the way, nothing outside."""
    path = directory
    for part in name.split("/"):
        path = path / part
        if path.is_symlink():
            raise ArtifactError(f"artifact file {name} in {str(directory)!r} is a symbolic link; refusing to load")
    if not path.is_file():
        raise ArtifactError(f"artifact file {name} is missing from {str(directory)!r}; recompile the model")
    return path


def _read_manifest(directory: Path, key: bytes | None) -> tuple[dict, dict]:
    if not directory.is_dir():
        hint = recover(directory)
        if hint is None:
            raise ArtifactError(f"artifact directory {str(directory)!r} does not exist")
    mpath = directory / MANIFEST
    if mpath.is_symlink() or not mpath.is_file():
        raise ArtifactError(f"{str(directory)!r} is not a memopt artifact: no {MANIFEST}; "
                            "write one with memopt compile -o DIR")
    raw = mpath.read_bytes()
    if key is not None:
        _check_signature(directory, raw, key)
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{mpath} is corrupt ({exc.__class__.__name__}); recompile the model") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{str(directory)!r} is not a memopt artifact (manifest format "
                            f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("plan_schema_version")
    if version != PLAN_SCHEMA_VERSION:
        raise ArtifactError(f"artifact plan schema version {version!r} is not supported by this memopt (reads "
                            f"{PLAN_SCHEMA_VERSION}); recompile with this memopt or upgrade memopt")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactError(f"manifest of {str(directory)!r} has no 'files' table (got "
                            f"{type(files).__name__}); recompile the model")
    for name, info in files.items():
        _check_name(name, directory)
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str) or not _SHA.match(info["sha256"]) \
                or type(info.get("bytes")) is not int or info["bytes"] < 0:
            raise ArtifactError(f"manifest entry {name!r} of {str(directory)!r} needs 'sha256' (64 hex digits) and "
                                "'bytes' (an integer); recompile the model")
    if "plan.json" not in files:
        raise ArtifactError(f"manifest of {str(directory)!r} does not list plan.json; recompile the model")
    return manifest, files


def _check_signature(directory: Path, manifest_bytes: bytes, key: bytes) -> None:
    spath = directory / SIGNATURE
    if spath.is_symlink() or not spath.is_file():
        raise ArtifactError(f"{str(directory)!r} is not signed ({SIGNATURE} missing) but a key was given; refusing")
    try:
        sig = json.loads(spath.read_text())["sig"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ArtifactError(f"{SIGNATURE} of {str(directory)!r} is malformed; refusing") from None
    if not isinstance(sig, str) or not hmac.compare_digest(sig, _sign(manifest_bytes, key)):
        raise ArtifactError(f"the signature of {str(directory)!r} does not match this key: the artifact was "
                            "modified or signed with another key; refusing")


def verify(directory: str | os.PathLike, *, key: bytes | None = None) -> dict:
    """Check the manifest (and its signature when `key` is given) and every listed file's size and
    SHA-256, without running or deserializing anything; return the manifest. Raises ArtifactError."""
    directory = Path(directory)
    manifest, files = _read_manifest(directory, key)
    for name, info in files.items():
        path = _real_file(directory, name)
        if path.stat().st_size != info["bytes"] or _sha256(path) != info["sha256"]:
            raise ArtifactError(f"artifact file {name} in {str(directory)!r} fails its SHA-256 check (corrupt or "
                                "modified); recompile the model")
    return manifest


def read_verified(directory: Path, files: dict, name: str) -> bytes:
    """The bytes of a listed file, hashed from the very bytes returned (no read-after-check gap)."""
    if name not in files:
        raise ArtifactError(f"{name} is not listed in the manifest of {str(directory)!r}; recompile the model")
    path = _real_file(directory, name)
    info = files[name]
    if info["bytes"] > _MAX_SMALL_FILE or path.stat().st_size != info["bytes"]:
        raise ArtifactError(f"artifact file {name} in {str(directory)!r} fails its size check; recompile the model")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise ArtifactError(f"artifact file {name} in {str(directory)!r} fails its SHA-256 check (corrupt or "
                            "modified); recompile the model")
    return data


# ---------------------------------------------------------------- loading


def _json_object(data: bytes, name: str, directory: Path) -> dict:
    try:
        d = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{name} of {str(directory)!r} is not JSON; recompile the model") from None
    if not isinstance(d, dict):
        raise ArtifactError(f"{name} of {str(directory)!r} is not a JSON object; recompile the model")
    return d


def _plan_from(data: bytes, directory: Path) -> Plan:
    d = _json_object(data, "plan.json", directory)
    if d.get("version") != PLAN_SCHEMA_VERSION:
        raise ArtifactError(f"plan.json schema version {d.get('version')!r} is not supported (this memopt reads "
                            f"{PLAN_SCHEMA_VERSION}); recompile the model with this memopt")
    for spec in d.get("inputs") or []:
        if not isinstance(spec, dict) or spec.get("dtype") not in DTYPES:
            dtype = spec.get("dtype") if isinstance(spec, dict) else spec
            raise ArtifactError(f"plan.json of {str(directory)!r} records an input of unknown dtype {dtype!r}; "
                                "recompile the model")
    try:
        return Plan.from_json(d)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ArtifactError(f"plan.json of {str(directory)!r} is malformed ({type(exc).__name__}: "
                            f"{str(exc)[:100]}); recompile the model") from None


def load_plan(directory: str | os.PathLike, *, key: bytes | None = None) -> Plan:
    directory = Path(directory)
    files = verify(directory, key=key)["files"]
    return _plan_from(read_verified(directory, files, "plan.json"), directory)


def _read_weights(path: Path, where: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
        extra = json.loads(meta.get("memopt", "{}"))
        extra = extra if isinstance(extra, dict) else {}
        aliases, zeros = extra.get("aliases", {}), extra.get("zeros", {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"weights.safetensors of {str(where)!r} is unreadable ({type(exc).__name__}: "
                            f"{str(exc)[:100]}); recompile the model") from None
    if not isinstance(aliases, dict) or not isinstance(zeros, dict):
        raise ArtifactError(f"weights.safetensors of {str(where)!r} has malformed metadata; recompile the model")
    for name, t in tensors.items():  # packed-weight kernels (e.g. _weight_int8pack_mm) need aligned rows
        if t.numel() and t.data_ptr() % 64:
            tensors[name] = t.clone()
    for name, target in aliases.items():
        if target not in tensors:
            raise ArtifactError(f"weights.safetensors of {str(where)!r}: alias {name!r} names no tensor")
        tensors[name] = tensors[target]
    for name, spec in zeros.items():
        try:
            shape, dtype = [int(s) for s in spec["shape"]], DTYPES[spec["dtype"]]
            if any(s < 0 for s in shape):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"weights.safetensors of {str(where)!r}: zero buffer {name!r} is malformed") from None
        tensors[name] = Zeros(shape, dtype)  # allocated once a program's graph vouches for its shape
    return tensors


def load_program(directory: Path, name: str, weights: dict[str, torch.Tensor], files: dict | None = None):
    """One program rebuilt from its checked JSON, with its tensors from `weights`."""
    directory = Path(directory)
    if files is None:
        _, files = _read_manifest(directory, None)
    blob = read_verified(directory, files, f"{name}.pt2")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _load_program_blob(blob, name, weights, f"{name}.pt2 of {str(directory)!r}")
    except ProgramError as exc:
        raise ArtifactError(str(exc)) from None


def _load_tokenizer(directory: Path, files: dict):
    """The tokenizer from its listed, verified files, copied to a private directory first (nothing
    unlisted is read), with `auto_map` dropped and remote code refused."""
    from transformers import AutoTokenizer

    names = [n for n in files if n.startswith("tokenizer/")]
    with tempfile.TemporaryDirectory() as tmp:
        for n in names:
            data = read_verified(directory, files, n)
            if n == "tokenizer/tokenizer_config.json":
                data = _clean_tokenizer_config(data, directory)
            (Path(tmp) / n.split("/", 1)[1]).write_bytes(data)
        try:
            return AutoTokenizer.from_pretrained(tmp, local_files_only=True, trust_remote_code=False)
        except Exception as exc:  # transformers raises many types for a bad file; one line for all
            raise ArtifactError(f"the tokenizer of {str(directory)!r} does not load ({type(exc).__name__}: "
                                f"{str(exc).strip().splitlines()[0][:100] if str(exc).strip() else ''})") from None


def _clean_tokenizer_config(data: bytes, directory: Path) -> bytes:
    config = _json_object(data, "tokenizer/tokenizer_config.json", directory)
    config.pop("auto_map", None)  # remote code: never
    cls = config.get("tokenizer_class")
    if cls is not None and (not isinstance(cls, str) or not re.fullmatch(r"[A-Za-z0-9_]+", cls)):
        raise ArtifactError(f"tokenizer/tokenizer_config.json of {str(directory)!r} names tokenizer class "
                            f"{str(cls)[:40]!r}; refusing")
    return json.dumps(config).encode()


_ONNX_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}


def read_onnx(directory: str | os.PathLike, *, key: bytes | None = None):
    """`model.onnx` as a function of input tensors, after checking it reads nothing outside itself (no
    external data files) and uses only standard and ONNX Runtime contrib operator domains."""
    import onnx

    from memopt.emit.onnx_export import run_onnx

    directory = Path(directory)
    files = verify(directory, key=key)["files"]
    if "model.onnx" not in files:
        raise ArtifactError(f"{str(directory)!r} has no model.onnx; compile with --onnx")
    data = read_verified(directory, files, "model.onnx")
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ArtifactError(f"model.onnx of {str(directory)!r} does not parse ({type(exc).__name__})") from None
    graphs = [model.graph, *(a.g for n in model.graph.node for a in n.attribute if a.HasField("g"))]
    for g in graphs:
        for t in [*g.initializer, *(a.t for n in g.node for a in n.attribute if a.HasField("t"))]:
            if t.data_location == onnx.TensorProto.EXTERNAL or t.external_data:
                raise ArtifactError(f"model.onnx of {str(directory)!r} references external data "
                                    f"({t.name!r}); memopt writes self-contained models; refusing")
        for n in g.node:
            if n.domain not in _ONNX_DOMAINS:
                raise ArtifactError(f"model.onnx of {str(directory)!r} uses operator domain {n.domain[:40]!r}; "
                                    "refusing (custom-op libraries are never loaded)")
    for f in model.functions:
        raise ArtifactError(f"model.onnx of {str(directory)!r} defines function {f.name[:40]!r}; refusing")
    return lambda args: run_onnx(data, args)


def load(directory: str | os.PathLike, device: str | torch.device | None = None, *, key: bytes | None = None):
    """Load an artifact as an OptimizedModule (with `.generator` for decoders), re-applying the arena;
    `device` (e.g. "cuda") moves it there, host-offloaded buffers staying in pinned host memory. `key`:
    the manifest must carry a valid signature under it."""
    from memopt.emit.device import check_device

    target = check_device(device) if device is not None else None  # a bad device fails before any loading
    directory = Path(directory)
    files = verify(directory, key=key)["files"]
    plan = _plan_from(read_verified(directory, files, "plan.json"), directory)
    if "program.pt2" not in files:
        raise ArtifactError(f"{str(directory)!r} holds a plan only (compiled with --plan-only): nothing to run")
    import memopt.runtime  # noqa: F401  (memopt's custom ops, which the programs call)

    weights = {}
    if "weights.safetensors" in files:
        weights = _read_weights(_real_file(directory, "weights.safetensors"), directory)
    programs = {"program": load_program(directory, "program", weights, files)}
    if "generate.pt2" in files:
        programs["generate"] = load_program(directory, "generate", weights, files)
    tokenizer = _load_tokenizer(directory, files) if any(n.startswith("tokenizer/") for n in files) else None
    module = assemble(plan, programs, tokenizer, {"loaded_from": str(directory)})
    if target is not None and target != torch.device("cpu"):
        from memopt.emit.device import to_device

        module = to_device(module, target)
    return module
