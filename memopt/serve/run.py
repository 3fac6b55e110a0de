"""`memopt run DIR`: load an artifact and run it with PyTorch or ONNX Runtime."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from memopt.emit.artifact import ArtifactError, load, load_plan


def _example_inputs(plan, directory: Path) -> tuple:
    """Inputs of the compiled shape, read from the plan (random token ids / values, seeded)."""
    from memopt.emit.program_io import DTYPES

    spec = plan.inputs
    if not spec:
        raise ArtifactError(f"{directory} records no input shapes; pass --inputs FILE")
    gen = torch.Generator().manual_seed(0)
    out = []
    for item in spec:
        dtype = DTYPES[item["dtype"]]  # checked when the plan was read
        if dtype.is_floating_point:
            out.append(torch.randn(item["shape"], generator=gen).to(dtype))
        elif item.get("role") == "mask":
            out.append(torch.ones(item["shape"], dtype=dtype))
        else:
            out.append(torch.randint(3, max(item.get("high", 100), 4), item["shape"], generator=gen, dtype=dtype))
    return tuple(out)


def _read_inputs(path: str) -> tuple:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"inputs file {path!r} does not exist; pass a .safetensors or .pt file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        d = load_file(str(p))
        return tuple(d[k] for k in sorted(d))
    obj = torch.load(str(p), weights_only=True)
    if isinstance(obj, torch.Tensor):
        return (obj,)
    if isinstance(obj, dict):
        return tuple(obj[k] for k in sorted(obj))
    return tuple(obj)


def _describe(outputs) -> dict:
    outs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    res = {}
    for i, o in enumerate(outs):
        o = torch.as_tensor(o)
        f = o.float()
        res[f"output{i}"] = {"shape": list(o.shape), "dtype": str(o.dtype).replace("torch.", ""),
                             "mean": float(f.mean()), "std": float(f.std()) if f.numel() > 1 else 0.0}
    return res


def run_artifact(directory: str, *, prompt: str | None = None, inputs: str | None = None, engine: str = "torch",
                 max_new_tokens: int = 48, device: str = "cpu", key: bytes | None = None,
                 timeout_s: float | None = None) -> dict:
    directory_p = Path(directory)
    plan = load_plan(directory_p, key=key)
    if plan.stages:  # a pipeline artifact: this process is one rank under torchrun (memopt.serve.distributed)
        return _pipeline_rank(directory_p, plan, prompt, inputs, engine, max_new_tokens, device, key, timeout_s)
    if prompt is not None:
        if engine != "torch":
            raise ValueError("--prompt runs the generation program with --engine torch; ONNX runs the forward program")
        module = load(directory_p, device=device, key=key)
        if module.generator is None:
            raise ValueError(f"{plan.model} is not a decoder LM; run it with --inputs FILE instead of --prompt")
        t0 = time.perf_counter()
        text = module.chat(prompt, max_new_tokens=max_new_tokens)
        return {"model": plan.model, "prompt": prompt, "text": text, "engine": "torch", "device": device,
                "seconds": time.perf_counter() - t0}
    args = _read_inputs(inputs) if inputs else _example_inputs(plan, directory_p)
    t0 = time.perf_counter()
    if engine == "onnx":
        from memopt.emit.artifact import read_onnx

        outputs = read_onnx(directory_p, key=key)(args)
    else:
        module = load(directory_p, device=device, key=key)
        outputs = module(*(a.to(device) if isinstance(a, torch.Tensor) else a for a in args))
    return {"model": plan.model, "engine": engine, "outputs": _describe(outputs), "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------- pipeline artifacts (memopt.serve.distributed)
def _pipeline_job(plan, directory: Path, prompt, inputs, engine: str) -> dict:
    """What a pipeline run does: generate from `prompt`, else a forward pass on `inputs` or example inputs."""
    if engine != "torch":
        raise ValueError("a pipeline artifact runs with --engine torch only")
    if prompt is not None:
        return {"prompt": prompt}
    return {"forward_ids": (_read_inputs(inputs) if inputs else _example_inputs(plan, directory))[0]}


def _pipeline_summary(out: dict) -> dict:
    """Rank 0's result as JSON: "text"/"tokens" (lists) or "outputs" described, without tensors or weight tables."""
    res = {k: v for k, v in out.items() if k not in ("logits", "tokens", "weights")}
    if isinstance(out.get("tokens"), torch.Tensor):
        res["tokens"] = out["tokens"].tolist()
    if isinstance(out.get("logits"), torch.Tensor):
        res["outputs"] = _describe(out["logits"])
    res["ranks"] = [{k: v for k, v in r.items() if k != "weights"} for r in res.get("ranks", ())]
    return res


def _pipeline_rank(directory: Path, plan, prompt, inputs, engine, max_new_tokens, device, key, timeout_s) -> dict:
    from memopt.serve.distributed import run_staged, under_torchrun

    if not under_torchrun():
        n = len(plan.stages)
        raise ValueError(f"{str(directory)!r} holds a pipeline of {n} stages, one process each: run memopt run "
                         f"{directory} --launch, or torchrun --nproc-per-node {n} -m memopt run {directory}")
    job = _pipeline_job(plan, directory, prompt, inputs, engine)
    out = run_staged(directory, max_new_tokens=max_new_tokens, device=device, timeout_s=timeout_s, key=key, **job)
    return _pipeline_summary(out) if out["rank"] == 0 else {"quiet": True}


def launch_artifact(directory: str, *, nproc: int | None = None, prompt: str | None = None, inputs: str | None = None,
                    engine: str = "torch", max_new_tokens: int = 48, device: str = "cpu", key_file: str | None = None,
                    timeout_s: float | None = None) -> dict:
    """`memopt run DIR --launch`: a pipeline artifact, one process per stage (`distributed.launch`); rank 0's
    summary."""
    from memopt.serve.distributed import _read_key, launch

    directory_p = Path(directory)
    job = _pipeline_job(load_plan(directory_p, key=_read_key(key_file)), directory_p, prompt, inputs, engine)
    return _pipeline_summary(launch(directory_p, nproc=nproc, max_new_tokens=max_new_tokens, device=device,
                                    timeout_s=timeout_s, key_file=key_file, **job))
