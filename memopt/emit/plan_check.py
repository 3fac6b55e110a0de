"""Read the emitted programs back and check them against the Plan (the Plan is the single source of truth).

    problems = verify_plan(plan, {"program": gm_or_ep, "generate": gen_or_ep})   # [] when they agree
    check_plan(plan, programs)                                                    # ValueError listing them

What is read from the graphs, never from the passes' records:
  - weight formats: `memopt::linear_int8` / `embedding_int8` (int8; its `dynamic` flag is int8:dyn),
    `linear_int4` (group size argument, a `memopt::hadamard` input for `:had`, outlier channels for `:oF`),
    `linear_dfloat11` / `embedding_dfloat11` (lossless), `aten.linear` / `aten.embedding` (native). GPTQ and
    round-to-nearest store the same tensors: the graph cannot tell them apart, so `:gptq` is not checked;
  - placement: weights read through an offload staging slot, filled by `memopt::offload_wait` from a host
    buffer `_memopt_offload_host_<block>`;
  - KV caches: per layer the `memopt::kv_attend` op's layouts (against the layouts the decision's policy
    string resolves to, and the generator's `meta["memopt_kv"]` that generation prefills with), a plain
    `key_cache_<i>` update (full, on device), or `memopt::kv_offload_wait` from `_memopt_offload_host_kv<i>`;
  - the arena: every `slice(_memopt_arena) -> view(dtype) -> arena_view` view written by an `out=` op or a
    `copy_` sits at its planned offset within its planned size, the operator order is `plan.order`, and no
    two planned tensors live at the same op share a byte (after ExecuTorch's memory-planning verifier).

Plan rows (`LayerDecision`) name a weight's layer (`model.model.layers.0.self_attn.q_proj`) or a block
(`model.model.layers.0`); a weight or block without a row is native, on device, with a full KV cache on device.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, replace

import torch
from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef

import memopt.runtime  # noqa: F401  (registers the memopt:: ops this module reads)
from memopt.names import HOST_PREFIX, LAYER_INDEX, SLOT_PREFIX
from memopt.passes.arena import SCRATCH, arena_view
from memopt.passes.arena_kernels import INPLACE_ARGS, batch_norm_out

ARENA_ATTR = "_memopt_arena"
KV_STATE = re.compile(r"^kv_cache_(\d+)_g\d+_")
KEY_CACHE = re.compile(r"^key_cache_(\d+)$")
_NATIVE = ("native", "bf16", "fp16", "fp32")
_MAX_PER_KIND = 8  # overlap reports per program: the first few name the problem


@dataclass(frozen=True)
class WeightRead:
    """One weight as a graph op reads it. `format`: "native" | "int8" | "int4" | "lossless"; `host`: the
    host buffer it was staged from, or ""."""

    layer: str
    format: str
    dynamic: bool | None = None  # int8 linears: W8A8-dynamic; None where the op cannot say (embeddings)
    group: int = 0
    hadamard: bool = False
    outliers: int = 0  # bf16 outlier input channels (-1: some, count unknown)
    in_features: int = 0
    host: str = ""


def verify_plan(plan, programs: dict) -> list[str]:
    """Mismatches between `plan` and the emitted `programs` ({name: ExportedProgram or GraphModule}; the
    forward program is "program"), each naming the decision; empty when every decision the graphs carry is
    the Plan's."""
    rows = {d.name: d for d in plan.decisions}
    problems: list[str] = []
    modules = {name: p.module() if isinstance(p, torch.export.ExportedProgram) else p
               for name, p in programs.items() if p is not None}
    for name, gm in modules.items():
        problems += _check_weights(rows, name, gm)
    named = _names(modules)
    problems += [f"{d.name}: the plan decides on it, but no program has such a weight, block or cached layer"
                 for d in plan.decisions if not _is_named(d.name, named)]
    problems += _check_kv(plan, rows, modules)
    if "program" in modules and (plan.arena is not None or plan.order is not None):
        problems += _check_arena(plan, modules["program"])
    return problems


def check_plan(plan, programs: dict) -> None:
    """Raise ValueError listing every mismatch `verify_plan` finds."""
    problems = verify_plan(plan, programs)
    if problems:
        raise ValueError(f"the plan differs from the emitted programs in {len(problems)} place(s) (a memopt bug; "
                         "please report it):\n  " + "\n  ".join(problems))


def _names(modules: dict) -> set:
    """Every weight layer the programs read and the modules enclosing it, the host buffers of offloaded blocks
    and the indices of cached layers."""
    named: set = set()
    for gm in modules.values():
        for r in weight_reads(gm):
            parts = r.layer.split(".")
            named.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        named.update(n.args[1].target for n in gm.graph.nodes if n.target is torch.ops.memopt.offload_wait.default)
        named.update(kv_reads(gm))
    return named


def _is_named(name: str, named: set) -> bool:
    m = LAYER_INDEX.search(name)
    return name in named or HOST_PREFIX + name.replace(".", "_") in named or bool(m and int(m.group(1)) in named)


def kv_policy_spec(policy) -> str:
    """The `parse_kv_spec` string of one layer's KV policy with every parameter ("kivi:k4v2:g32:r128",
    "streaming:4:28", "h2o:64", "full"); ValueError for a policy no such string describes (per-head groups,
    composed techniques)."""
    from memopt.kv import (
        H2OConfig,
        KVCachePolicy,
        SnapKVConfig,
        StreamingConfig,
        parse_kv_spec,
    )

    spec = None
    if isinstance(policy, KVCachePolicy):
        e, q = policy.eviction, policy.quant
        if e is None:
            spec = "full" if q is None else q.spec
        elif q is None and isinstance(e, StreamingConfig):
            spec = f"streaming:{e.sinks}:{e.window}"
        elif q is None and isinstance(e, (H2OConfig, SnapKVConfig)):
            spec = f"{'h2o' if isinstance(e, H2OConfig) else 'snapkv'}:{e.budget_tokens}"
    if spec is None or parse_kv_spec(spec) != policy:
        raise ValueError(f"KV policy {policy!r} has no kv_policy string (parse_kv_spec reads full, kivi:..., "
                         "streaming:<sinks>:<window>, h2o:<budget>, snapkv:<budget>)")
    return spec


# ---------------------------------------------------------------- weights and placement
def _views_to_attr(node) -> fx.Node | None:
    while isinstance(node, fx.Node) and node.op == "call_function" and node.args:
        node = node.args[0]
    return node if isinstance(node, fx.Node) and node.op == "get_attr" else None


def weight_reads(gm: fx.GraphModule) -> list[WeightRead]:
    """Every linear / embedding weight the graph reads, with its format and where it was staged from."""
    ops = torch.ops.memopt
    where = {ops.linear_int8.default: 1, ops.linear_int4.default: 1, ops.linear_dfloat11.default: 1,
             torch.ops.aten.linear.default: 1, ops.embedding_int8.default: 0, ops.embedding_dfloat11.default: 0,
             torch.ops.aten.embedding.default: 0, ops.grouped_linear_int8.default: 1,
             ops.grouped_linear_int4.default: 1}
    grouped = (ops.grouped_linear_int8.default, ops.grouped_linear_int4.default)  # fused MoE experts
    waits: dict[str, str] = {}  # staging slot -> the host buffer last waited for
    offload = gm.meta.get("memopt_offload", {}).get("blocks", {})
    out = []
    for node in gm.graph.nodes:
        if node.target is ops.offload_wait.default:
            waits[node.args[0].target] = node.args[1].target
        if node.op != "call_function" or node.target not in where or len(node.args) <= where[node.target]:
            continue
        w = node.args[where[node.target]]
        attr = _views_to_attr(w)
        if attr is None:
            continue  # not a weight (e.g. a linear of two activations)
        host = ""
        if attr.target.rpartition(".")[2].startswith(SLOT_PREFIX):
            host = waits.get(attr.target, "?")
            fqn = _staged_fqn(offload, host, w) or _scope(node) + ".weight"
        else:
            fqn = attr.target
        layer = re.sub(r"_(q|sm)$", "", fqn)
        layer = layer if node.target in grouped else layer.rpartition(".")[0]  # fused experts: a layer per weight
        out.append(_read(node, layer, host))
    return out


def _staged_fqn(offload: dict, host: str, view: fx.Node) -> str | None:
    """The weight FQN the offload record stores at this slot offset (the record only names it)."""
    start = view
    while start.op == "call_function" and start.target is not torch.ops.aten.slice.Tensor:
        start = start.args[0]
    offset = start.args[2] if start.op == "call_function" else None
    for block in offload.values():
        if block.get("host") == host:
            return next((f for f, layout in block.get("weights", {}).items() if layout[0] == offset), None)
    return None


def _scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else node.name


def _read(node: fx.Node, layer: str, host: str) -> WeightRead:
    ops, t = torch.ops.memopt, node.target
    if t in (ops.linear_int8.default, ops.embedding_int8.default, ops.grouped_linear_int8.default):
        dyn = bool(node.args[4]) if t is not ops.embedding_int8.default and len(node.args) > 4 else (
            None if t is ops.embedding_int8.default else False)
        return WeightRead(layer, "int8", dynamic=dyn, host=host)
    if t in (ops.linear_int4.default, ops.grouped_linear_int4.default):
        x, idx = node.args[0], node.args[6] if len(node.args) > 6 else None
        if isinstance(x, fx.Node) and x.target is torch.ops.aten.copy_.default and _arena_span(x.args[0]):
            x = x.args[1]  # the input as computed, before the arena pass copied it into the arena
        val = idx.meta.get("val") if isinstance(idx, fx.Node) else None
        k = node.args[0].meta.get("val").shape[-1] if "val" in node.args[0].meta else 0
        return WeightRead(layer, "int4", group=int(node.args[4]), host=host, in_features=int(k),
                          hadamard=isinstance(x, fx.Node) and x.target is ops.hadamard.default,
                          outliers=int(val.numel()) if val is not None else -int(idx is not None))
    if t in (ops.linear_dfloat11.default, ops.embedding_dfloat11.default):
        return WeightRead(layer, "lossless", host=host)
    return WeightRead(layer, "native", host=host)


def _format_problem(fmt: str, r: WeightRead) -> str:
    """Why weight read `r` is not in format `fmt` ("" when it is)."""
    from memopt.passes.quant_config import (
        Int4WeightConfig,
        Int8WeightConfig,
        parse_quantize_spec,
    )

    if fmt in _NATIVE:
        return "" if r.format == "native" else f"the graph reads it as {r.format}"
    try:
        cfg = parse_quantize_spec(fmt)
    except ValueError:
        return f"format {fmt!r} is not a weight format"
    if r.format != cfg.kind:
        return f"the graph reads it as {r.format}"
    if isinstance(cfg, Int8WeightConfig) and r.dynamic is not None and r.dynamic != cfg.dynamic_activations:
        return f"the graph's int8 op has dynamic activations {r.dynamic}"
    if isinstance(cfg, Int4WeightConfig):
        want_outliers = max(1, round(cfg.outlier_fraction * r.in_features)) if cfg.outlier_fraction else 0
        counted = r.in_features and r.outliers >= 0  # -1: outlier channels whose count the graph does not say
        if (cfg.group_size, cfg.hadamard) != (r.group, r.hadamard) or bool(want_outliers) != bool(r.outliers) \
                or (want_outliers and counted and want_outliers != r.outliers):
            return (f"the graph's int4 op has group {r.group}, hadamard {r.hadamard}, {r.outliers} outlier "
                    "channels")
    return ""


def _block_format(name: str, fmt: str, inside: list[WeightRead], program: str) -> list[str]:
    """A block row's weight_format: the one format of its quantized weights, "native" when none is
    quantized, "mixed" when they differ (its weights' own rows say which)."""
    quantized = [r for r in inside if r.format != "native"]
    kinds = {(r.format, r.dynamic, r.group, r.hadamard, bool(r.outliers)) for r in quantized}
    if fmt in _NATIVE:
        bad = quantized[0].format if quantized else ""
    elif fmt == "mixed":
        bad = "" if len(kinds) > 1 else "one format"
    else:
        wrong = [r for r in quantized if _format_problem(fmt, r)]
        bad = f"{wrong[0].layer} as {wrong[0].format}" if wrong else ("" if quantized else "no quantized weight")
    if not bad:
        return []
    return [f"{name}: plan weight_format {fmt!r} for the block, but {program!r} reads {bad}"]


def _check_weights(rows: dict, program: str, gm: fx.GraphModule) -> list[str]:
    problems, reads = [], weight_reads(gm)
    for r in reads:
        d = rows.get(r.layer)
        why = _format_problem(d.weight_format if d else "native", r)
        if why:
            problems.append(f"{r.layer}: plan weight_format {d.weight_format if d else 'native (no decision)'!r}, "
                            f"but {why} in {program!r}")
        if d is not None and (d.placement == "host") != bool(r.host):
            problems.append(f"{r.layer}: plan placement {d.placement!r}, but {program!r} reads its weight from "
                            + (f"host buffer {r.host}" if r.host else "device memory"))
    hosts = {n.args[1].target for n in gm.graph.nodes if n.target is torch.ops.memopt.offload_wait.default}
    layers = {r.layer for r in reads}
    for name, d in rows.items():
        host_attr = HOST_PREFIX + name.replace(".", "_")
        if host_attr in hosts and d.placement != "host":
            problems.append(f"{name}: plan placement {d.placement!r}, but {program!r} stages the block from "
                            f"host buffer {host_attr}")
        elif d.placement == "host" and host_attr not in hosts and name not in layers:
            problems.append(f"{name}: plan placement 'host', but {program!r} has no host buffer {host_attr}")
        inside = [r for r in reads if r.layer.startswith(name + ".")]
        if name not in layers and inside:
            problems += _block_format(name, d.weight_format, inside, program)
    for host in sorted(hosts - {HOST_PREFIX + n.replace(".", "_") for n, d in rows.items() if d.placement == "host"}):
        problems.append(f"{host}: {program!r} stages a block from this host buffer, but no plan decision "
                        "places that block on host")
    return problems


# ---------------------------------------------------------------- KV caches
def kv_reads(gm: fx.GraphModule) -> dict[int, tuple[str, tuple]]:
    """layer -> ("device" | "host", layouts): the compressed layouts of a `kv_attend` layer, () for a full cache."""
    from memopt.kv.layout import layouts_from_str

    out = {}
    for node in gm.graph.nodes:
        if node.target is torch.ops.memopt.kv_attend.default:
            m = next((KV_STATE.match(s.target) for s in node.args[3] if KV_STATE.match(s.target)), None)
            if m:
                out[int(m.group(1))] = ("device", layouts_from_str(node.args[5]))
        elif node.target is torch.ops.aten.index_copy_.default and node.args[0].op == "get_attr":
            m = KEY_CACHE.match(node.args[0].target)
            if m:
                out[int(m.group(1))] = ("device", ())
        elif node.target is torch.ops.memopt.kv_offload_wait.default:
            out[int(node.args[2])] = ("host", ())
    return out


def _expected_layouts(spec: str, layer: int, found: tuple, context: int | None) -> tuple | str:
    from memopt.kv import parse_kv_spec

    try:
        policy = parse_kv_spec(spec)
    except ValueError as err:
        return f"kv_policy {spec!r} does not parse ({err})"
    if not found:
        return () if policy == parse_kv_spec("full") else f"kv_policy {spec!r}, but the cache is full (16-bit)"
    heads, head_dim = sum(x.n_heads for x in found), found[0].head_dim
    try:
        want = policy.layer_layouts(layer, heads, head_dim, context or 1)
        # the model's attention (sliding window, soft-capping), as KVCompressionPass read it from the graph
        want = tuple(x.for_attention(found[0].sliding, found[0].softcap) for x in want)
    except ValueError as err:
        return f"kv_policy {spec!r} does not fit the cache ({err})"
    return tuple(replace(x, rope_inv_freq=(), **({} if context else {"blocks": 0})) for x in want)


def _check_kv(plan, rows: dict, modules: dict) -> list[str]:
    problems, seen = [], set()
    by_layer: dict[int, list] = {}
    for d in rows.values():
        m = LAYER_INDEX.search(d.name)
        if m:
            by_layer.setdefault(int(m.group(1)), []).append(d)
        elif d.kv_policy not in ("full", "") or d.kv_placement != "device":
            problems.append(f"{d.name}: plan gives it KV decisions ({d.kv_policy!r}, {d.kv_placement!r}), but it "
                            "is not a layer with a KV cache")
    context = plan.pass_configs.get("kv", {}).get("meta", {}).get("context") if isinstance(
        plan.pass_configs.get("kv"), dict) else None
    for program, gm in modules.items():
        meta = gm.meta.get("memopt_kv") or {}
        ctx = meta.get("context", context)
        for layer, (where, found) in sorted(kv_reads(gm).items()):
            seen.add(layer)
            for d in by_layer.get(layer, []) or [None]:
                name, spec = (d.name, d.kv_policy) if d else (f"layer {layer}", "full")
                placement = d.kv_placement if d else "device"
                if placement != where:
                    problems.append(f"{name}: plan kv_placement {placement!r}, but {program!r} keeps layer "
                                    f"{layer}'s cache on {where}")
                want = _expected_layouts(spec, layer, found, ctx)
                got = tuple(replace(x, rope_inv_freq=(), **({} if ctx else {"blocks": 0})) for x in found)
                if isinstance(want, str) or want != got:
                    problems.append(f"{name}: plan kv_policy {spec!r}, but {program!r} caches layer {layer} as "
                                    + (want if isinstance(want, str) else _layouts_text(found)))
            recorded = (meta.get("layers") or {}).get(layer, (meta.get("layers") or {}).get(str(layer)))
            if found and recorded is not None and _strip(recorded.get("layouts")) != _strip(found):
                problems.append(f"layer {layer}: {program!r}'s meta['memopt_kv'] layouts (what generation prefills "
                                "with) differ from its kv_attend op's")
    for layer, ds in sorted(by_layer.items()):
        for d in ds:
            if layer not in seen and (d.kv_policy not in ("full", "") or d.kv_placement != "device"):
                problems.append(f"{d.name}: plan kv_policy {d.kv_policy!r} / kv_placement {d.kv_placement!r}, but "
                                f"no program caches layer {layer}")
    return problems


def _strip(layouts) -> tuple:
    from memopt.kv.layout import layouts_from_str

    found = layouts_from_str(layouts) if isinstance(layouts, str) else tuple(layouts or ())
    return tuple(replace(x, rope_inv_freq=()) for x in found)


def _layouts_text(found: tuple) -> str:
    if not found:
        return "a full 16-bit cache"
    return "; ".join(f"heads {list(x.heads)}: {x.key_bits}/{x.value_bits} bits, group {x.group}, residual "
                     f"{x.residual}, sinks {x.sinks}, {x.blocks} blocks" for x in found)


# ---------------------------------------------------------------- arena and operator order
# the arena pass's view chain: slice -> view(dtype) -> arena_view (as_strided before arena_view)
_VIEWS = (arena_view, torch.ops.aten.as_strided.default, torch.ops.aten.view.dtype, torch.ops.aten.slice.Tensor)


def _arena_span(node) -> tuple[int, int] | None:
    """(start, end) bytes of an `arena_view(view(slice(_memopt_arena, 0, start, end), dtype))` view
    (`as_strided` in programs from before `arena_view`)."""
    if not (isinstance(node, fx.Node) and node.target in _VIEWS[:2]):
        return None
    typed = node.args[0]
    raw = typed.args[0] if typed.target is torch.ops.aten.view.dtype else None
    if raw is None or raw.target is not torch.ops.aten.slice.Tensor or raw.args[0].op != "get_attr" \
            or raw.args[0].target != ARENA_ATTR:
        return None
    return int(raw.args[2]), int(raw.args[3])


def _arena_node(node: fx.Node) -> bool:
    """A node the arena pass inserted: a view of the arena, or a copy into one."""
    if node.target is torch.ops.aten.copy_.default:
        return _arena_span(node.args[0]) is not None
    base = node
    while base.op == "call_function" and base.target in _VIEWS:
        base = base.args[0]
    return base is not node and base.op == "get_attr" and base.target == ARENA_ATTR


def _check_arena(plan, gm: fx.GraphModule) -> list[str]:
    """Order, offsets and lifetimes of the forward program: with the arena applied (`_memopt_arena` views)
    or as planned (the exported program the arena is re-applied to at load)."""
    problems = []
    ops = [n for n in gm.graph.nodes if n.op == "call_function"]
    kept = [n for n in ops if not _arena_node(n)]
    writes: dict[str, list[tuple[fx.Node, tuple[int, int] | None]]] = {}
    names = []
    for node in kept:
        span = _arena_span(node.kwargs.get("out"))
        # an out= op replaced the planned op: the arena pass keeps its name (a program it was re-applied to
        # after loading may not: then any planned name matches there)
        names.append(node.meta.get("memopt_replaces") if span else node.meta.get("memopt_replaces", node.name))
    order = list(plan.order) if plan.order is not None else None
    if order is None:
        problems.append("plan.order is missing: the forward program's operator order is not in the plan")
    elif len(order) != len(names) or any(a is not None and a != b for a, b in zip(names, order)):
        k = next((i for i, (a, b) in enumerate(zip(names, order)) if a is not None and a != b), min(len(names),
                                                                                                  len(order)))
        problems.append(f"plan.order differs from the forward program's operator order at op {k}: plan "
                        f"{order[k] if k < len(order) else '<end>'!r}, graph "
                        f"{(names[k] or kept[k].name) if k < len(names) else '<end>'!r}")
    arena = plan.arena
    if arena is None:
        return problems + (["the forward program writes into an arena, but the plan has none"]
                           if any(n.op == "get_attr" and n.target == ARENA_ATTR for n in gm.graph.nodes) else [])
    applied = any(n.op == "get_attr" and n.target == ARENA_ATTR for n in gm.graph.nodes)
    by_name = {n.name: n for n in ops}
    for i, node in enumerate(kept):
        span = _arena_span(node.kwargs.get("out"))
        if span and (node.meta.get("memopt_replaces") or (order is not None and i < len(order))):
            writes.setdefault(node.meta.get("memopt_replaces") or order[i], []).append((node, span))
    for node in ops:
        if node.target is torch.ops.aten.copy_.default and _arena_span(node.args[0]):
            src = node.args[1]
            name = f"{src.args[0].name}[{src.args[1]}]" if src.target is operator.getitem else src.name
            writes.setdefault(name, []).append((node, _arena_span(node.args[0])))
        if _arena_span(node.kwargs.get("scratch")):  # an op's scratch, live while it runs
            writes.setdefault(node.meta.get("memopt_replaces", node.name) + SCRATCH, []).append(
                (node, _arena_span(node.kwargs["scratch"])))
    if not applied:  # the planned program: each planned tensor is a node (or one output of one)
        for name in arena.offsets:
            node = by_name.get(name.partition("[")[0].removesuffix(SCRATCH))
            if node is not None:
                users = [u for u in node.users if u.target is operator.getitem and f"{node.name}[{u.args[1]}]" == name]
                writes[name] = [(u, None) for u in users] if "[" in name else [(node, None)]
    else:
        size = gm.get_buffer(ARENA_ATTR).numel()
        if size != arena.size_bytes:
            problems.append(f"arena: plan size_bytes {arena.size_bytes}, but the forward program's arena holds "
                            f"{size} bytes")
    for name in sorted(set(arena.offsets) - set(writes)):
        problems.append(f"arena tensor {name}: planned at offset {arena.offsets[name]}, but the forward program "
                        + ("writes no arena view for it" if applied else "has no such tensor"))
    for name in sorted(set(writes) - set(arena.offsets)):
        problems.append(f"arena tensor {name}: the forward program writes it into the arena, but the plan has no "
                        "offset for it")
    for name, ws in writes.items():
        for _, span in ws:
            if span is None or name not in arena.offsets:
                continue
            if span[0] != arena.offsets[name]:
                problems.append(f"arena tensor {name}: plan offset {arena.offsets[name]}, but the forward program "
                                f"writes it at offset {span[0]}")
            if span[1] - span[0] > arena.sizes.get(name, 0):
                problems.append(f"arena tensor {name}: plan size {arena.sizes.get(name, 0)} bytes, but the forward "
                                f"program writes {span[1] - span[0]}")
    inplace = frozenset(name for name, ws in writes.items() if any(_elementwise(node) for node, _ in ws))
    lifetimes, pos = _lifetimes(gm, ops, writes), {n: i for i, n in enumerate(ops)}
    lifetimes.update({name: (pos[ws[0][0]],) * 2 for name, ws in writes.items() if name.endswith(SCRATCH)})
    return problems + _overlaps(arena, lifetimes, inplace)


def _lifetimes(gm: fx.GraphModule, ops: list, writes: dict) -> dict[str, tuple[int, int]]:
    """[first write, last read] op indices per planned tensor, reads followed through views and in-place ops;
    graph outputs live to the end."""
    pos = {n: i for i, n in enumerate(ops)}
    out = {}
    for name, ws in writes.items():
        start, end = len(ops), -1
        for node, _ in ws:
            start, end = min(start, pos[node]), max(end, pos[node])
            todo = [node]
            while todo:
                for user in todo.pop().users:
                    if user.op == "output":
                        end = len(ops)
                    elif user.op == "call_function":
                        end = max(end, pos[user])
                        if _aliases(user, node):
                            todo.append(user)
        out[name] = (start, end)
    return out


def _aliases(user: fx.Node, node: fx.Node) -> bool:
    """`user`'s result is `node`'s storage: a getitem, or a view / in-place op of its first argument whose
    schema says so and whose FakeTensors agree (an `out=` op aliases its `out`, not its inputs)."""
    if user.target is operator.getitem:
        return True
    schema = getattr(user.target, "_schema", None)
    if not user.args or user.args[0] is not node or schema is None or not schema.returns \
            or schema.returns[0].alias_info is None or not schema.arguments or schema.arguments[0].alias_info is None:
        return False
    val, src = user.meta.get("val"), node.meta.get("val")
    if isinstance(val, torch.Tensor) and isinstance(src, torch.Tensor):
        try:
            return StorageWeakRef(val.untyped_storage()) == StorageWeakRef(src.untyped_storage())
        except Exception:  # no storage to compare: trust the schema
            return True
    return True


def _elementwise(node: fx.Node) -> bool:
    """An op that may write its result over an input of the same bytes (the arena pass's in-place pairs)."""
    packet = getattr(getattr(node.target, "overloadpacket", None), "__name__", "")
    return packet in INPLACE_ARGS or node.target is batch_norm_out


def _overlaps(arena, lifetimes: dict[str, tuple[int, int]], inplace: frozenset = frozenset()) -> list[str]:
    """Planned tensors live at one op that share bytes; a tensor of `inplace` may take over exactly the bytes
    of one whose last read is the op writing it (an elementwise op writing over its dying input)."""
    problems, live = [], []
    for name, (start, end) in lifetimes.items():
        off, size = arena.offsets.get(name), arena.sizes.get(name, 0)
        if off is None or size <= 0:
            continue
        if off < 0 or off % arena.alignment or off + size > arena.size_bytes:
            problems.append(f"arena tensor {name}: plan bytes [{off}, {off + size}) are not aligned to "
                            f"{arena.alignment} inside the {arena.size_bytes}-byte arena")
        live.append((start, end, off, off + size, name))
    live.sort()
    active: list[tuple] = []
    for s, e, lo, hi, name in live:
        active = [x for x in active if x[1] >= s]
        for _, e2, lo2, hi2, name2 in active:
            if name in inplace and e2 == s and (lo2, hi2) == (lo, hi):
                continue
            if lo < hi2 and lo2 < hi and len(problems) < _MAX_PER_KIND:
                problems.append(f"arena tensors {name2} and {name} are live at the same op but share bytes: plan "
                                f"[{lo2}, {hi2}) and [{lo}, {hi})")
        active.append((s, e, lo, hi, name))
    return problems


__all__ = ["verify_plan", "check_plan", "kv_policy_spec", "weight_reads", "kv_reads", "WeightRead"]
