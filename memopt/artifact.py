"""Save and load compiled models as a directory of artifacts.

    DIR/plan.json        the Plan (versioned schema)
    DIR/program.pt2      torch.export.save of the optimized program (memopt runtime ops included)
    DIR/manifest.json    memopt version, file list and the SHA-256 of every file

Written to a temporary sibling directory and renamed into place, so a crash never leaves half an
artifact. Loading verifies the manifest, every checksum and the schema version before reading
anything else, and does not need the original model's Python code: the passes that need runtime
state (the arena) are re-applied from the plan.
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


class ArtifactError(ValueError):
    """A directory that is not a loadable memopt artifact; the message says what is wrong."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(opt_module, directory: str | os.PathLike, *, exported=None, extra_files: dict | None = None) -> Path:
    """Write `opt_module` (an OptimizedModule) to `directory` atomically. `exported` is the
    ExportedProgram to store (the pipeline passes the program before arena emission)."""
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
        if exported is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.export.save(exported, str(tmp / "program.pt2"))
        for name, content in (extra_files or {}).items():
            data = content if isinstance(content, bytes) else str(content).encode()
            (tmp / name).write_bytes(data)
        files = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
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
        raise ArtifactError(f"{str(directory)!r} is not a memopt artifact: no {MANIFEST}; compile with memopt compile -o DIR")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{mpath} is corrupt ({exc.__class__.__name__}); recompile the model") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{str(directory)!r} is not a memopt artifact (format {manifest.get('format')!r})")
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


def load(directory: str | os.PathLike):
    """Load an artifact as an OptimizedModule, re-applying the arena from the plan."""
    from memopt.pipeline import OptimizedModule

    plan = load_plan(directory)
    program = Path(directory) / "program.pt2"
    if not program.is_file():
        raise ArtifactError(f"{str(directory)!r} holds a plan only (compiled with --plan-only): nothing to run")
    import memopt.runtime  # noqa: F401  (registers memopt's custom ops before deserializing)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.load(str(program))
        gm = ep.module()
    if plan.arena is not None:
        from memopt.passes.arena import ArenaPass

        gm = ArenaPass()(gm, plan).gm
    return OptimizedModule(gm, plan, {"loaded_from": str(directory)})
