"""The `memopt` command line: a thin layer that parses, builds configs and calls the library."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from memopt.frontend.units import fmt_bytes, fmt_rate

EPILOG = ("MODEL is demo (default), minilm, smollm2, a preset (e.g. llama-3-8b), a Hugging Face model "
          "directory, a .gguf file, or path/to/file.py:factory")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="demo", help="model source (default: demo)")
    p.add_argument("--target", default="h100-80gb", help="target device (see `memopt targets`) or custom:mem=..,bw=..")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--seq", type=int, default=None, help="sequence / context length (default: min(512, model max))")
    p.add_argument("--dtype", default=None, help="override the model dtype: float32, bfloat16, float16")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memopt", description="A compiler for memory: make a PyTorch model fit.",
                                     epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="account for every byte of a model at a batch and context", epilog=EPILOG)
    _common(p)
    p.add_argument("--plot", metavar="FILE.png", help="write a memory-over-time chart")
    p.add_argument("--tensors", type=int, default=0, metavar="N", help="also list the N largest tensors")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("compile", help="capture, plan and rewrite a model; write an artifact directory",
                       epilog=EPILOG)
    _common(p)
    p.add_argument("-o", "--output", default=None, metavar="DIR", help="artifact directory to write")
    p.add_argument("--budget", default=None, metavar="BYTES",
                   help="memory budget, e.g. 20GiB: plan weight formats, placement and KV bits to fit it")
    p.add_argument("--objective", default="latency", choices=("latency", "quality"))
    p.add_argument("--max-quality-loss", type=float, default=None, metavar="X",
                   help="cap on the summed quality penalty of the budget plan")
    p.add_argument("--plan-only", action="store_true",
                   help="plan without weights (presets, config dirs, GGUF headers): print the plan, write plan.json")
    p.add_argument("--devices", type=int, default=None, metavar="N",
                   help="N devices of --target per node (or write --target 4xh100-80gb, 2x(rtx-4090), "
                        "1x(rtx-4090)+1x(rtx-3090)); with --plan-only the plan splits the model across them, --budget "
                        "per device; with -o, one pipeline stage per device (memopt run DIR --launch)")
    p.add_argument("--nodes", type=int, default=None, metavar="M",
                   help="with --plan-only: M nodes, each with the devices --target names")
    p.add_argument("--network", default=None, metavar="LINK",
                   help="with --nodes: the link between nodes (ib-ndr400, ib-hdr200, eth-100g, eth-10g; default: "
                        "the devices' own)")
    p.add_argument("--tensor-parallel", type=int, default=None, metavar="T",
                   help="with several devices: force this tensor-parallel degree (default: the planner's choice)")
    p.add_argument("--passes", default="arena", help="comma-separated passes, in order (default: arena)")
    p.add_argument("--quantize", default=None, metavar="FORMAT",
                   help="weight format: int8, int8:dyn, int4[:gN][:gptq][:had][:oF] (had: Hadamard-rotated "
                        "inputs; F: fraction of 16-bit outlier input channels), lossless; with --budget, "
                        "how the plan's int4 layers are quantized (int4:gptq:had)")
    p.add_argument("--quantize-skip", action="append", default=[], metavar="PATTERN",
                   help="layer name or glob to keep unquantized (repeatable)")
    p.add_argument("--calibration", default=None, metavar="FILE.txt",
                   help="text for GPTQ / outlier calibration, one sample per line (default: memopt's bundled "
                        "English text; models without a tokenizer calibrate on their example inputs)")
    p.add_argument("--solver", default="cbc", choices=("cbc", "highs", "greedy"), help="arena solver (default cbc)")
    p.add_argument("--time-limit", type=float, default=10.0, metavar="S", help="solver time limit in seconds")
    p.add_argument("--kv", default=None, metavar="POLICY",
                   help="decoders: compressed KV cache for generation, e.g. kivi:4, kivi:k4v2:g32:r128:s4, "
                        "streaming:4:508, h2o:256, snapkv:256")
    p.add_argument("--reorder", action="store_true",
                   help="reorder operators for a lower activation peak when the schedule solver finds one")
    p.add_argument("--offload", action="append", default=[], metavar="BLOCK",
                   help="keep this block's weights on host memory, prefetched one block ahead (repeatable; globs ok)")
    p.add_argument("--offload-kv", action="append", default=[], metavar="LAYER",
                   type=lambda s: int(s) if s.isdigit() else s,
                   help="decoders: keep this layer's KV cache on host memory, streamed one layer ahead "
                        "(index or pattern; repeatable)")
    p.add_argument("--kv-host", action="store_true",
                   help="with --budget: let the plan put 16-bit KV caches on host memory")
    p.add_argument("--max-cache", type=int, default=None, metavar="TOKENS",
                   help="decoders: KV-cache capacity of the generation program (default min(2048, context))")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx for ONNX Runtime")
    p.add_argument("--force", action="store_true",
                   help="replace -o DIR even when it is an existing directory that is not a memopt artifact")
    p.add_argument("--sign-key", default=None, metavar="FILE",
                   help="sign the manifest with the key in FILE (HMAC-SHA256); load with --key FILE")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("run", help="load an artifact directory and run it")
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--prompt", default=None, help="decoders: generate a reply to this text")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--inputs", default=None, metavar="FILE",
                   help="a .safetensors or .pt file of input tensors (default: the compiled example shape, random)")
    p.add_argument("--engine", default="torch", choices=("torch", "onnx"), help="torch (default) or onnx")
    p.add_argument("--device", default="cpu", help="torch engine: run on this device, e.g. cuda (offloaded "
                                                   "weights and KV caches stay in pinned host memory)")
    p.add_argument("--key", default=None, metavar="FILE", help="refuse the artifact unless its manifest is "
                                                                "signed with the key in FILE")
    p.add_argument("--json", action="store_true")
    # pipeline artifacts (compile --devices N / --target NxDEVICE -o DIR): one process per stage
    p.add_argument("--launch", action="store_true",
                   help="a pipeline artifact: start one process per stage and run it (or launch them yourself: "
                        "torchrun --nproc-per-node N -m memopt run DIR)")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="with --launch: processes to start (default and only choice: the artifact's stages)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="pipeline artifacts: seconds any rank waits for another before it stops with an error "
                        "(default 300)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("verify", help="check an artifact (manifest, every file's SHA-256, signature) without "
                                      "running or deserializing anything")
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--key", default=None, metavar="FILE", help="also check the manifest's signature under this key")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("targets", help="list the built-in target devices")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_targets)
    return parser


def cmd_inspect(args: argparse.Namespace) -> int:
    from memopt.analysis.inspect import format_report, inspect_model, plot_timeline

    report = inspect_model(args.model, target=args.target, batch=args.batch, seq=args.seq, dtype=args.dtype,
                           quiet=args.json)
    if args.plot:
        plot_timeline(report, args.plot)
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        print(format_report(report, top=args.tensors))
        if args.plot:
            print(f"wrote {args.plot}")
    return 0


def cmd_plan_only(args: argparse.Namespace) -> int:
    from types import SimpleNamespace

    from memopt.emit.artifact import save
    from memopt.planning.budget import format_budget_table
    from memopt.planning.split import plan_split

    # one device: exactly plan_budget; several (4xh100-80gb, --devices, --nodes): split across them
    plan = plan_split(args.model, target=args.target, devices=args.devices, nodes=args.nodes, network=args.network,
                      budget_bytes=args.budget, batch=args.batch, seq=args.seq, objective=args.objective,
                      max_quality_loss=args.max_quality_loss, kv_host=args.kv_host,
                      tensor_parallel=args.tensor_parallel)
    if args.output:
        save(SimpleNamespace(plan=plan.to_plan(), tokenizer=None), args.output)
    if args.json:
        print(json.dumps({**plan.to_json(), "output": args.output}, indent=1))
    else:
        print(format_budget_table(plan))
        if args.output:
            print(f"wrote {args.output} (plan only)")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from memopt.emit.artifact import save
    from memopt.config import CompileConfig
    from memopt.pipeline import compile_model

    if args.plan_only:
        return cmd_plan_only(args)
    for flag in ("nodes", "network"):
        if getattr(args, flag, None) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} plans several nodes, which only --plan-only does for now; "
                             "add --plan-only")
    from memopt.planning.split import is_multi_device

    if args.devices is not None or args.tensor_parallel is not None or is_multi_device(args.target):
        return cmd_compile_stages(args)
    if not args.output:
        raise ValueError("memopt compile needs -o DIR for the artifact (or --plan-only to only print the plan)")
    from memopt.emit.outdir import check_output

    check_output(args.output, force=args.force)  # before any work: never destroy data, fail early
    key = _read_key(args.sign_key)
    config = CompileConfig(
        target=args.target, passes=tuple(p.strip() for p in args.passes.split(",") if p.strip()), batch=args.batch,
        seq=args.seq, dtype=args.dtype, quantize=args.quantize, quantize_skip=tuple(args.quantize_skip),
        calibration=args.calibration, arena_solver=args.solver, time_limit_s=args.time_limit, reorder=args.reorder,
        max_cache=args.max_cache, kv=args.kv, offload=tuple(args.offload), offload_kv=tuple(args.offload_kv),
        budget=args.budget, objective=args.objective, max_quality_loss=args.max_quality_loss, kv_host=args.kv_host)
    result = compile_model(args.model, config=config, verbose=not args.json)
    out = save(result.module, args.output, programs=result.programs, onnx=args.onnx, report=result,
               force=args.force, key=key)
    plan = result.plan
    summary = {"output": str(out), "model": plan.model, "target": plan.target, "passes": list(plan.passes),
               "batch": plan.batch, "seq": plan.seq, **plan.predictions, "notes": result.notes}
    if plan.arena is not None:
        a = plan.arena
        summary["arena"] = {"size_bytes": a.size_bytes, "lower_bound_bytes": a.lower_bound_bytes,
                            "greedy_size_bytes": a.greedy_size_bytes, "tensors": len(a.offsets),
                            "solver": {"name": a.solver.name, "status": a.solver.status,
                                       "time_s": a.solver.time_s, "gap": a.solver.gap}}
    if "budget" in plan.predictions:
        summary["budget"] = plan.predictions["budget"]
        summary["decisions"] = [{"name": d.name, "format": d.weight_format, "bytes": d.bytes} for d in plan.decisions]
    if args.json:
        print(json.dumps(summary, indent=1, default=str))
        return 0
    print(f"compiled {plan.model} for {plan.target} (batch {plan.batch}, seq {plan.seq}), passes: {', '.join(plan.passes)}")
    if plan.arena is not None:
        a = plan.arena
        print(f"  arena            {fmt_bytes(a.size_bytes):>12}  ({len(a.offsets)} intermediates, one buffer)")
        print(f"  lower bound      {fmt_bytes(a.lower_bound_bytes):>12}  (live-set bound for this op order)")
        print(f"  greedy best-fit  {fmt_bytes(a.greedy_size_bytes):>12}")
        print(f"  solver           {a.solver.name}: {a.solver.status}, {a.solver.time_s:.2f} s, gap {a.solver.gap:.2%}")
    measured = plan.predictions.get("budget", {}).get("measured")
    if measured:  # the budget's promise, checked on the programs (memopt/emit/fits.py)
        b = plan.predictions["budget"]
        print(f"  fits             {fmt_bytes(measured['total_bytes']):>12}  on the device, budget "
              f"{fmt_bytes(b['budget_bytes'])} (plan predicted {fmt_bytes(measured['predicted_bytes'])})")
    for note in result.notes:
        print(f"  {note}")
    print(f"wrote {out}")
    return 0


def cmd_compile_stages(args: argparse.Namespace) -> int:
    """compile -o DIR for several devices: one pipeline stage per device (memopt.emit.stages)."""
    from memopt.config import CompileConfig
    from memopt.emit.outdir import check_output
    from memopt.emit.stages import StageSpec, compile_devices, describe, save_stages
    from memopt.frontend.targets import parse_cluster

    if not args.output:
        raise ValueError("memopt compile for several devices needs -o DIR for the artifact (or --plan-only to only "
                         "print the plan)")
    for flag in ("budget", "onnx"):
        if getattr(args, flag):
            raise ValueError(f"--{flag} compiles for one device; for several, drop it (--plan-only plans formats per "
                             "device)")
    check_output(args.output, force=args.force)
    key = _read_key(args.sign_key)
    device = parse_cluster(args.target, devices=args.devices).devices[0].name
    config = CompileConfig(
        target=device, passes=tuple(p.strip() for p in args.passes.split(",") if p.strip()), batch=args.batch,
        seq=args.seq, dtype=args.dtype, quantize=args.quantize, quantize_skip=tuple(args.quantize_skip),
        calibration=args.calibration, arena_solver=args.solver, time_limit_s=args.time_limit, reorder=args.reorder,
        max_cache=args.max_cache, kv=args.kv, offload=tuple(args.offload), offload_kv=tuple(args.offload_kv))
    result = compile_devices(args.model, config, target=args.target, devices=args.devices,
                             tensor_parallel=args.tensor_parallel, verbose=not args.json)
    out = save_stages(result, args.output, force=args.force, key=key)
    plan = result.plan
    rows = [{**rec, "weights_bytes": p.get("weights_bytes"), "kv_cache_bytes": p.get("kv_cache_bytes")}
            for rec, p in zip(plan.stages, plan.predictions["stages"])]
    if args.json:
        print(json.dumps({"output": str(out), "model": plan.model, "target": plan.target, "stages": rows,
                          "notes": result.notes}, indent=1, default=str))
        return 0
    print(f"compiled {plan.model} as {len(rows)} pipeline stages for {plan.target} (batch {plan.batch}, "
          f"seq {plan.seq})")
    for r in rows:
        what = describe(StageSpec.from_json(r, "plan"))
        print(f"  stage {r['stage']} on {r['target']:<12} {what:<40} weights {fmt_bytes(r['weights_bytes'] or 0):>10}"
              f"  KV cache {fmt_bytes(r['kv_cache_bytes'] or 0):>10}")
    for note in result.notes:
        print(f"  {note}")
    print(f"wrote {out} (run it: memopt run {out} --launch)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from memopt.serve.run import run_artifact

    if args.launch:  # a pipeline artifact, one process per stage (memopt.serve.distributed)
        from memopt.serve.run import launch_artifact

        summary = launch_artifact(args.directory, nproc=args.nproc, prompt=args.prompt, inputs=args.inputs,
                                  engine=args.engine, max_new_tokens=args.max_new_tokens, device=args.device,
                                  key_file=args.key, timeout_s=args.timeout)
    elif args.nproc is not None:
        raise ValueError("--nproc goes with --launch (memopt run DIR --launch --nproc N)")
    else:
        summary = run_artifact(args.directory, prompt=args.prompt, inputs=args.inputs, engine=args.engine,
                               max_new_tokens=args.max_new_tokens, device=args.device, key=_read_key(args.key),
                               timeout_s=args.timeout)
    if summary.get("quiet"):  # a pipeline rank other than 0: rank 0 prints
        return 0
    if args.json:
        print(json.dumps(summary, indent=1))
    elif "text" in summary:
        print(summary["text"])
    else:
        for name, info in summary["outputs"].items():
            print(f"{name}: shape {info['shape']} {info['dtype']}  mean {info['mean']:.6g}  std {info['std']:.6g}")
        print(f"({summary['engine']}, {summary['seconds']:.3f} s)")
    return 0


def _read_key(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        key = open(path, "rb").read().strip()
    except OSError as exc:
        raise ValueError(f"cannot read key file {path!r} ({exc.strerror}); pass a readable file") from None
    if not key:
        raise ValueError(f"key file {path!r} is empty; put a secret in it")
    return key


def cmd_verify(args: argparse.Namespace) -> int:
    from memopt.emit.stages import verify_stages  # artifact.verify, and every stage of a pipeline artifact

    manifest = verify_stages(args.directory, key=_read_key(args.key))
    files = manifest["files"]
    total = sum(f["bytes"] for f in files.values())
    signed = " and its signature" if args.key else ""
    print(f"ok: {args.directory}: {len(files)} files ({fmt_bytes(total)}){signed} verified; nothing was run")
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    from memopt.frontend.targets import get_target, target_names

    targets = [get_target(n) for n in target_names()]
    if args.json:
        print(json.dumps([t.to_json() for t in targets], indent=1))
        return 0
    print(f"{'name':<11}{'memory':>12}{'bandwidth':>13}{'bf16':>14}{'fp32':>14}{'host link':>13}  description")
    for t in targets:
        print(f"{t.name:<11}{fmt_bytes(t.memory_bytes):>12}{fmt_rate(t.bandwidth):>13}"
              f"{fmt_rate(t.flops_for('bf16'), 'FLOP/s'):>14}{fmt_rate(t.flops_for('fp32'), 'FLOP/s'):>14}"
              f"{fmt_rate(t.host_link):>13}  {t.description}")
    print("\nany other device: --target custom:mem=24GiB,bw=1TB/s,bf16=165T,fp32=80T,host=32GB/s")
    return 0


_LEAST = {"batch": (1, "a batch size"), "seq": (1, "a number of tokens"), "max_cache": (1, "a number of tokens"),
          "tensors": (0, "how many tensors to list")}


def _check_numbers(args: argparse.Namespace) -> None:
    """Sizes and limits, refused by flag name before any model is loaded."""
    from memopt.frontend.units import parse_bytes

    for name, (least, what) in _LEAST.items():
        value = getattr(args, name, None)
        if value is not None and value < least:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {value}; pass {what}")
    limit = getattr(args, "time_limit", None)
    if limit is not None and not (math.isfinite(limit) and limit > 0):
        raise ValueError(f"--time-limit must be a finite number of seconds > 0, got {limit}; pass e.g. --time-limit 10")
    loss = getattr(args, "max_quality_loss", None)
    if loss is not None and not (math.isfinite(loss) and loss >= 0):
        raise ValueError(f"--max-quality-loss must be a finite number >= 0, got {loss}")
    budget = getattr(args, "budget", None)
    if budget is not None and parse_bytes(budget, what="--budget") <= 0:
        raise ValueError(f"--budget must be a positive byte count, got {budget!r}; pass e.g. --budget 20GiB")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        _check_numbers(args)
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as exc:
        if os.environ.get("MEMOPT_DEBUG"):
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"memopt: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
