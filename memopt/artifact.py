"""Save and load compiled models as a directory of artifacts.

    DIR/plan.json            the Plan (versioned schema)
    DIR/weights.safetensors  every program's parameters and buffers (packed quantized weights, scales,
                             compressed blobs), stored once
    DIR/program.pt2          torch.export.save of the forward program (weights stripped)
    DIR/generate.pt2         decoder LMs: the generation program (static KV cache, weights stripped)
    DIR/tokenizer/           the tokenizer, when the model has one
    DIR/model.onnx           with --onnx: the forward program for ONNX Runtime
    DIR/report.html, memory.png   the plan and the memory timeline before/after, for a person
    DIR/manifest.json        memopt version, schema version, the SHA-256 and size of every file

Written to a temporary sibling directory and renamed into place, so a failure never leaves half an
artifact. Loading verifies the manifest, every checksum and the schema version before reading
anything else, and needs none of the original model's Python code: the arena is re-applied from
the plan.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from memopt.plan import PLAN_SCHEMA_VERSION, Plan

MANIFEST = "manifest.json"
FORMAT = "memopt-artifact"
PROGRAMS = ("program", "generate")


class ArtifactError(ValueError):
    """A directory that is not a loadable memopt artifact; the message says what is wrong."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _strip(v: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_like(v, device="meta")
    return torch.nn.Parameter(meta, requires_grad=False) if isinstance(v, torch.nn.Parameter) else meta


def _save_program(ep, path: Path, weights: dict[str, torch.Tensor], prefix: str) -> None:
    """torch.export.save with the state dict replaced by meta tensors; the real tensors go to `weights`
    (shared by name across programs when equal, else kept under `prefix`)."""
    from memopt.runtime.quant_ops import canonicalize_int4_

    real = dict(ep.state_dict)
    canonicalize_int4_([*real.values(), *ep.constants.values()])  # store the layout every device reads
    for name, t in real.items():
        key = name
        if key in weights and not (weights[key].shape == t.shape and weights[key].dtype == t.dtype
                                   and torch.equal(weights[key], t.detach())):
            key = f"{prefix}::{name}"
        weights[key] = t.detach()
    ep._state_dict = {k: _strip(v) for k, v in real.items()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.export.save(ep, str(path))
    finally:
        ep._state_dict = real


def _write_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tensors, aliases, by_storage = {}, {}, {}
    for name, t in weights.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in by_storage:
            aliases[name] = by_storage[key]  # tied weights are stored once
            continue
        if key is not None:
            by_storage[key] = name
        tensors[name] = t.contiguous().clone() if not t.is_contiguous() else t
    save_file(tensors, str(path), metadata={"memopt_aliases": json.dumps(aliases)})


def save(opt_module, directory: str | os.PathLike, *, programs: dict | None = None, tokenizer=None,
         onnx: bool = False, report=None) -> Path:
    """Write `opt_module` (an OptimizedModule) and its exported `programs` ({"program": ep,
    "generate": ep}) to `directory`, atomically."""
    from memopt import __version__

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ArtifactError(f"output path {str(directory)!r} exists and is not a directory; choose another -o")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    tmp.chmod(0o755)
    try:
        plan: Plan = opt_module.plan
        (tmp / "plan.json").write_text(json.dumps(plan.to_json(), indent=1, default=str))
        weights: dict[str, torch.Tensor] = {}
        programs = programs if programs is not None else getattr(opt_module, "programs", None)
        for name, ep in (programs or {}).items():
            if name not in PROGRAMS:
                raise ValueError(f"program name must be one of {PROGRAMS}, got {name!r}")
            _save_program(ep, tmp / f"{name}.pt2", weights, name)
        if weights:
            _write_weights(weights, tmp / "weights.safetensors")
        tokenizer = tokenizer if tokenizer is not None else getattr(opt_module, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
        if onnx:
            from memopt.onnx_export import export_onnx

            export_onnx(programs["program"], tmp / "model.onnx")
        if report is not None:
            from memopt.report import write_report

            write_report(report, tmp)
        files = {str(p.relative_to(tmp)): {"sha256": _sha256(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {"format": FORMAT, "memopt_version": __version__, "plan_schema_version": PLAN_SCHEMA_VERSION,
                    "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def verify(directory: str | os.PathLike) -> dict:
    """Check the manifest and every checksum; return the manifest. Raises ArtifactError."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"artifact directory {str(directory)!r} does not exist")
    mpath = directory / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{str(directory)!r} is not a memopt artifact: no {MANIFEST}; "
                            "write one with memopt compile -o DIR")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{mpath} is corrupt ({exc.__class__.__name__}); recompile the model") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{str(directory)!r} is not a memopt artifact (manifest format "
                            f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("plan_schema_version")
    if version != PLAN_SCHEMA_VERSION:
        raise ArtifactError(f"artifact plan schema version {version!r} is not supported by this memopt (reads "
                            f"{PLAN_SCHEMA_VERSION}); recompile with this memopt or upgrade memopt")
    for name, info in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"artifact file {name} is missing from {str(directory)!r}; recompile the model")
        if path.stat().st_size != info["bytes"] or _sha256(path) != info["sha256"]:
            raise ArtifactError(f"artifact file {name} in {str(directory)!r} fails its SHA-256 check (corrupt or "
                                "modified); recompile the model")
    return manifest


def load_plan(directory: str | os.PathLike) -> Plan:
    verify(directory)
    d = json.loads((Path(directory) / "plan.json").read_text())
    if d.get("version") != PLAN_SCHEMA_VERSION:
        raise ArtifactError(f"plan.json schema version {d.get('version')!r} is not supported (this memopt reads "
                            f"{PLAN_SCHEMA_VERSION}); recompile the model with this memopt")
    return Plan.from_json(d)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        aliases = json.loads((f.metadata() or {}).get("memopt_aliases", "{}"))
    for name, target in aliases.items():
        tensors[name] = tensors[target]
    return tensors


def load_program(directory: Path, name: str, weights: dict[str, torch.Tensor]):
    """torch.export.load one program and put its real weights back."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.load(str(directory / f"{name}.pt2"))
    for key, stub in list(ep.state_dict.items()):
        t = weights.get(f"{name}::{key}", weights.get(key))
        if t is None:
            raise ArtifactError(f"weights.safetensors has no tensor {key!r} for {name}.pt2; recompile the model")
        ep.state_dict[key] = torch.nn.Parameter(t, requires_grad=False) if isinstance(stub, torch.nn.Parameter) else t
    return ep


def load(directory: str | os.PathLike, device: str | torch.device | None = None):
    """Load an artifact as an OptimizedModule (with `.generator` for decoders), re-applying the arena;
    `device` (e.g. "cuda") moves it there, host-offloaded buffers staying in pinned host memory."""
    from memopt.placement import check_device

    target = check_device(device) if device is not None else None  # a bad device fails before any loading
    directory = Path(directory)
    plan = load_plan(directory)
    if not (directory / "program.pt2").is_file():
        raise ArtifactError(f"{str(directory)!r} holds a plan only (compiled with --plan-only): nothing to run")
    import memopt.runtime  # noqa: F401  (registers memopt's custom ops before deserializing)

    weights = _read_weights(directory / "weights.safetensors") if (directory / "weights.safetensors").is_file() else {}
    programs = {"program": load_program(directory, "program", weights)}
    if (directory / "generate.pt2").is_file():
        programs["generate"] = load_program(directory, "generate", weights)
    tokenizer = None
    if (directory / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory / "tokenizer"), local_files_only=True)
    module = assemble(plan, programs, tokenizer, {"loaded_from": str(directory)})
    if target is not None and target != torch.device("cpu"):
        from memopt.placement import to_device

        module = to_device(module, target)
    return module


def assemble(plan: Plan, programs: dict, tokenizer=None, report: dict | None = None):
    """An OptimizedModule from exported `programs` ({"program": ep[, "generate": ep]}) and their plan: the
    arena re-applied to the forward program, the compressed cache's layouts attached to the generator."""
    from memopt.pipeline import OptimizedModule

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = programs["program"].module()
        generator = None
        if "generate" in programs:
            generator = programs["generate"].module()
            kv = plan.pass_configs.get("kv")
            if isinstance(kv, dict) and kv.get("meta"):
                generator.meta["memopt_kv"] = kv["meta"]  # the compressed cache's layouts, for generate
    if plan.arena is not None:
        from memopt.passes.arena import ArenaPass

        gm = ArenaPass()(gm, plan).gm
    module = OptimizedModule(gm, plan, report or {}, generator=generator, tokenizer=tokenizer)
    module.programs = programs
    return module
