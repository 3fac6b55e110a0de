"""The generation program as generation runs it (the loop itself is `memopt.serve.generate`).

Generation runs `decode_program(generator)`: the same tensors (weights, caches) under a graph rewritten for
decoding, built once per program; the program itself is left as compiled and saved:
  - each layer's `scaled_dot_product_attention` over `repeat_kv` of its whole static cache becomes
    `memopt::cache_attend`: only the slots written so far, grouped-query heads read in place (no copy of
    the cache per step, no attention over empty slots);
  - the LM head runs on the last position only (generation reads no other logits), so a prefill chunk
    does not compute (chunk, vocab) logits;
  - export's dtype assertions and casts to the dtype a tensor already has are dropped;
  - memopt's KV and quantized-linear ops are called as the plain functions they run (`kv_ops.attend`,
    `quant_ops.int4_linear`, ...), without the dispatcher's Python layers (~5 us a call, ~90 us for
    `kv_attend`'s list of state tensors): the program runs eagerly, for inference only (no autograd, no tracing).
"""

from __future__ import annotations

import weakref

import torch
from torch import fx

from memopt.runtime import kv_ops, quant_ops

_SDPA = torch.ops.aten.scaled_dot_product_attention.default
_INDEX_COPY = torch.ops.aten.index_copy_.default
_ASSERT_METADATA = torch.ops.aten._assert_tensor_metadata.default
_TO_DTYPE = torch.ops.aten.to.dtype
_REPEAT_VIEWS = {torch.ops.aten.unsqueeze.default, torch.ops.aten.expand.default, torch.ops.aten.reshape.default,
                 torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.clone.default,
                 torch.ops.aten.contiguous.default, torch.ops.aten.alias.default}
_HEAD_OPS = ("aten.linear.default", "memopt.linear_int8.default", "memopt.linear_int4.default",
             "memopt.linear_dfloat11.default")
_PROGRAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # generator -> {every_position: (code, program)}
_DIRECT = {torch.ops.memopt.kv_attend.default: kv_ops.attend,  # op -> the plain function it runs
           torch.ops.memopt.cache_attend.default: kv_ops.attend_cache,
           torch.ops.memopt.linear_int8.default: quant_ops.int8_linear,
           torch.ops.memopt.linear_int4.default: quant_ops.int4_linear}


def decode_program(generator: fx.GraphModule, *, every_position: bool = False) -> fx.GraphModule:
    """`generator` as generation runs it (see the module doc): its logits are (batch, 1, vocab), those of the
    last position (`every_position`: (batch, T, vocab), the LM head left whole, for teacher forcing). Cached per
    program (rebuilt when its code changes); shares every tensor with it."""
    if not isinstance(generator, fx.GraphModule):
        return generator
    code = generator.code
    cached = _PROGRAMS.get(generator, {}).get(every_position)
    if cached is not None and cached[0] == code:
        return cached[1]
    graph = fx.Graph()
    graph._codegen = generator.graph._codegen
    value, output = graph.graph_copy(generator.graph, {}, return_output_node=True)
    graph.output(value, output.type)
    attended = sum(_attend_written_slots(graph, sdpa) for sdpa in list(graph.nodes) if sdpa.target is _SDPA)
    sliced = not every_position and _last_position_logits(graph)
    dropped = _drop_no_ops(graph)
    direct = [node for node in graph.nodes if node.target in _DIRECT]
    for node in direct:
        node.target = _DIRECT[node.target]
    if not (attended or sliced or dropped or direct):
        program = generator
    else:
        program = fx.GraphModule(generator, graph, class_name="DecodeProgram")
        program.meta = generator.meta
    _PROGRAMS.setdefault(generator, {})[every_position] = (code, program)
    return program


def _repeat_source(node, heads: int):
    """The (batch, kv_heads, slots, head_dim) tensor `node` repeats to `heads` heads (transformers'
    `repeat_kv`: unsqueeze(2), expand, reshape), with the view nodes in between; (None, []) otherwise."""
    chain = []
    while node.op == "call_function" and node.target in _REPEAT_VIEWS:
        if node.target is torch.ops.aten.unsqueeze.default and node.args[1] != 2:
            return None, []
        chain.append(node)
        node = node.args[0]
    src, dst = node.meta.get("val"), chain[0].meta.get("val") if chain else node.meta.get("val")
    if src is None or dst is None or src.dim() != 4 or dst.dim() != 4 or heads % src.shape[1]:
        return None, []
    if dst.shape[1] != heads or (src.shape[0], src.shape[2], src.shape[3]) != (dst.shape[0], dst.shape[2],
                                                                              dst.shape[3]):
        return None, []
    return node, chain


def _attend_written_slots(graph: fx.Graph, sdpa: fx.Node) -> bool:
    """Replace `sdpa` by `memopt::cache_attend` when it reads a static cache just updated by index_copy_ on
    the slot dimension (through `repeat_kv`); True when it did."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    args = dict(zip(names, sdpa.args), **sdpa.kwargs)
    q = args["query"].meta.get("val") if isinstance(args["query"], fx.Node) else None
    if q is None or args.get("dropout_p", 0.0) or args.get("is_causal", False) or args.get("enable_gqa", False):
        return False
    (k, k_chain), (v, v_chain) = (_repeat_source(args[x], q.shape[1]) for x in ("key", "value"))
    if k is None or v is None or any(n.target is not _INDEX_COPY or n.args[1] != 2 for n in (k, v)):
        return False
    with graph.inserting_before(sdpa):
        new = graph.call_function(torch.ops.memopt.cache_attend.default,
                                  (args["query"], k, v, args.get("attn_mask"), k.args[2], args.get("scale")))
    new.meta = dict(sdpa.meta)
    sdpa.replace_all_uses_with(new)
    graph.erase_node(sdpa)
    for node in k_chain + v_chain:
        if not node.users:
            graph.erase_node(node)
    return True


def _drop_no_ops(graph: fx.Graph) -> int:
    """Remove what does nothing at run time: export's dtype assertions and casts of a tensor to the dtype it
    already has (transformers writes ~250 per SmolLM2 step, each a dispatch). Returns how many."""
    dropped = 0
    for node in list(graph.nodes):
        if node.target is _ASSERT_METADATA and not node.users:
            graph.erase_node(node)
            dropped += 1
        elif node.target is _TO_DTYPE and len(node.args) == 2 and not node.kwargs and isinstance(node.args[0], fx.Node):
            val = node.args[0].meta.get("val")
            if isinstance(val, torch.Tensor) and val.dtype == node.args[1]:
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
                dropped += 1
    return dropped


def _last_position_logits(graph: fx.Graph) -> bool:
    """Feed the LM head (the linear producing the program's output, (batch, T, vocab)) only the last
    position's hidden state; True when it did."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    outs = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    head = outs[0] if outs else None
    if not isinstance(head, fx.Node) or str(head.target) not in _HEAD_OPS or len(head.users) != 1:
        return False
    x = head.args[0]
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if val is None or val.dim() != 3:
        return False
    with graph.inserting_before(head):
        last = graph.call_function(torch.ops.aten.slice.Tensor, (x, 1, -1, 9223372036854775807))
    head.replace_input_with(x, last)
    return True


def tokens_per_call(generator) -> int | None:
    """The fixed number of tokens the generation program takes per call (a static capture: 1), or None
    when that dimension is dynamic."""
    for node in generator.graph.nodes:
        if node.op == "placeholder" and "input_ids" in node.name:
            val = node.meta.get("val")
            if val is not None and val.dim() == 2 and isinstance(val.shape[1], int):
                return val.shape[1]
    return None
