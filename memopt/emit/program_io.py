"""Exported programs on disk, readable as safely as a safetensors file.

`torch.export.load` trusts its archive: it unpickles sample inputs, pickled weights and opaque
constants, evaluates every shape expression with `sympy.sympify`, and `ExportedProgram.module()`
compiles the archive's `guards_code` as Python. An artifact is untrusted input, so memopt never hands
one to it. A program is written as a pt2-style zip holding only the program's JSON
(`<name>/models/<name>.json`, torch's own schema) and three small text entries; every tensor (weights,
constants, caches) lives in `weights.safetensors`. Reading it back:

1. the zip may hold exactly the expected entries (names, sizes, no encryption), nothing else;
2. the JSON is checked against an allowlist before torch sees it: every operator a node calls resolves
   to a registered `aten` / `prims` / `memopt` overload or a listed Python operator, every shape
   expression parses under a small arithmetic grammar (names, integers, + - * **, comparisons and a
   list of sympy functions: no attributes, subscripts, strings or lambdas), `guards_code` is empty,
   no custom (pickled) objects, names are identifiers or dotted paths, and node metadata is cut to the
   two string fields memopt reads;
3. torch's deserializer then rebuilds the graph from that checked JSON with the tensors memopt read
   from safetensors, matched by the program's signature (shape and dtype checked).
"""

from __future__ import annotations

import ast
import functools
import io
import json
import re
import threading
import weakref
import zipfile
from typing import Any

import torch

MAX_JSON_BYTES = 1 << 30  # a program's JSON; far above any real one, bounds a zip bomb
_ENTRIES = ("models/{n}.json", "archive_format", "archive_version", "byteorder")
_ARCHIVE_FORMAT = "memopt-program-1"
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_FQN = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*\Z")
_SYMBOL = re.compile(r"[a-z]+[0-9]+\Z")
_OP = re.compile(r"torch\.ops\.(aten|prims|memopt)\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)\Z")
_PY_OPS = {f"_operator.{n}" for n in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow",
                                      "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_")}
_TORCH_FNS = {f"torch.{n}" for n in ("sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite",
                                     "sym_sum", "sym_sqrt", "_sym_sqrt")} | {f"math.{n}" for n in (
                                         "ceil", "floor", "trunc", "sqrt")}
_SYMPY_FUNCS = {"Add", "Mul", "FloorDiv", "ModularIndexing", "Mod", "PythonMod", "CleanDiv", "CeilDiv", "IntTrueDiv",
                "FloatTrueDiv", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan",
                "StrictGreaterThan", "LessThan", "GreaterThan", "Unequality", "Equality", "And", "Or", "Not",
                "TruncToInt", "CeilToInt", "FloorToInt", "RoundToInt", "RoundDecimal", "TruncToFloat",
                "ToFloat", "Pow", "PowByNatural", "FloatPow", "Identity", "IsNonOverlappingAndDenseIndicator",
                "Integer", "Rational", "Float", "Symbol", "Piecewise", "ITE", "LShift", "RShift",
                "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or"}
_SYMPY_CONSTS = {"True", "False", "oo", "zoo", "nan", "int_oo", "I"}
_AST_OK = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.Constant, ast.Name, ast.Call, ast.Load,
           ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub, ast.UAdd, ast.BitAnd,
           ast.BitOr, ast.Invert, ast.Not, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq, ast.NotEq, ast.Tuple)
_KEEP_META = ("stack_trace", "nn_module_stack")
_MAX_EXPR_CHARS = 4096

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
          "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32,
          "int64": torch.int64, "bool": torch.bool}


class Zeros:
    """An all-zero tensor stored as its shape only (a KV cache): allocated when a program binds it, once."""

    def __init__(self, shape: list[int], dtype: torch.dtype):
        self.shape, self.dtype, self._tensor = torch.Size(shape), dtype, None

    def dim(self) -> int:
        return len(self.shape)

    def materialize(self) -> torch.Tensor:
        if self._tensor is None:
            self._tensor = torch.zeros(self.shape, dtype=self.dtype)
        return self._tensor


class ProgramError(ValueError):
    """A program file memopt refuses to read; the message says what is wrong."""


# ---------------------------------------------------------------- writing
_SERIALIZING = threading.Lock()
_SKIP = threading.local()
# graph -> (what its JSON was made from, the JSON): programs of kept traces share their graph, and an artifact
# saved again (a loaded one, several outputs) has the same programs; torch's serializer takes ~1 s per program
# of a tiny model (most of it a deep copy of the whole serialized tree), this dictionary a few milliseconds
_DUMPED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def dump_program(ep, name: str) -> bytes:
    """The zip bytes of `ep`'s graph and signature: no tensors, no sample inputs, no guards code. The same
    program gives the same bytes (entries dated 1980-01-01, as reproducible builds date them)."""
    graph, made_from = ep.graph_module.graph, _json_inputs(ep)
    held = _DUMPED.get(graph)
    if held is not None and held[0] == made_from:
        text = held[1]
    else:
        text = _program_json(ep)
        _DUMPED[graph] = (made_from, text)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for entry, data in ((f"models/{name}.json", text), ("archive_format", _ARCHIVE_FORMAT),
                            ("archive_version", "1"), ("byteorder", "little")):
            info = zipfile.ZipInfo(f"{name}/{entry}", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o600 << 16  # as writestr(name, ...) sets it
            z.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    return buf.getvalue()


def _program_json(ep) -> str:
    from torch._export.serde import serialize as serde

    with _SERIALIZING:  # the fields are swapped on the shared program, and torch's serializer edits its graph
        saved = ep._guards_code, ep._example_inputs  # for a while: one program at a time (concurrent saves of a
        ep._guards_code, ep._example_inputs = [], None  # module raced: "Node ... is not added to the side table")
        check = getattr(serde, "canonicalize", None)
        if check is not None:  # torch's serializer canonicalizes a deep copy of what it wrote as a self-test and
            serde.canonicalize = functools.partial(_unchecked, check)  # throws it away: 60% of its time, skipped
            _SKIP.on = True  # on this thread (tests/test_security.py checks the JSON is the same)
        try:
            artifact = serde.serialize(ep, serialize_state_dict=False, serialize_constants=False)
        finally:
            ep._guards_code, ep._example_inputs = saved
            if check is not None:
                serde.canonicalize, _SKIP.on = check, False
    program = json.loads(artifact.exported_program)
    for node in program["graph_module"]["graph"]["nodes"]:
        node["metadata"] = {k: v for k, v in node.get("metadata", {}).items() if k in _KEEP_META}
    return json.dumps(program, separators=(",", ":"))


def _unchecked(check, ep, constants=None):
    """torch's `canonicalize` for every caller but `_program_json`'s serializer (whose result it drops)."""
    return ep if getattr(_SKIP, "on", False) else check(ep, constants)


def _json_inputs(ep) -> tuple:
    """Everything of `ep` its program JSON is made from: the graph's code, each node's value (dtype, shape,
    strides) and kept metadata, the signature, shape constraints, module call graph and dialect."""
    def value(v):
        if isinstance(v, torch.Tensor):
            return str(v.dtype), str(tuple(v.shape)), str(v.stride()), str(v.device)
        if isinstance(v, (list, tuple)):
            return tuple(value(x) for x in v)
        return repr(v)

    nodes = tuple((n.name, value(n.meta.get("val")), repr([n.meta.get(k) for k in _KEEP_META]))
                  for n in ep.graph.nodes)
    return (ep.graph_module.code, nodes, str(ep.graph_signature), repr(ep.range_constraints),
            repr(ep.module_call_graph), ep.dialect, torch.__version__)


# ---------------------------------------------------------------- reading


def read_program_json(blob: bytes, name: str, where: str) -> dict:
    """The program JSON from the zip `blob`, after checking the archive holds only what memopt writes."""
    try:
        z = zipfile.ZipFile(io.BytesIO(blob))
        infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ProgramError(f"{where} is not a program archive ({exc}); recompile the model") from None
    expected = {f"{name}/" + e.format(n=name) for e in _ENTRIES}
    seen = {i.filename for i in infos}
    if seen != expected or len(infos) != len(expected):
        extra = sorted(seen - expected) or sorted(expected - seen)
        raise ProgramError(f"{where} holds unexpected archive entries {extra[:3]}; memopt reads only programs "
                           "it wrote (no sample inputs, pickles or tensors inside); recompile the model")
    for info in infos:
        if info.flag_bits & 0x1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ProgramError(f"{where}: entry {info.filename} is encrypted or uses an unknown compression")
        if info.file_size > MAX_JSON_BYTES:
            raise ProgramError(f"{where}: entry {info.filename} claims {info.file_size} bytes; refusing")
    try:
        fmt = z.read(f"{name}/archive_format").decode()
        if fmt != _ARCHIVE_FORMAT:
            raise ProgramError(f"{where} has archive format {fmt[:40]!r}, not {_ARCHIVE_FORMAT!r}; recompile the "
                               "model with this memopt")
        return json.loads(z.read(f"{name}/models/{name}.json"))
    except (zipfile.BadZipFile, UnicodeDecodeError, json.JSONDecodeError, EOFError, OSError) as exc:
        raise ProgramError(f"{where} is corrupt ({type(exc).__name__}); recompile the model") from None


def check_program_json(program: Any, where: str) -> None:
    """Refuse anything in a program's JSON that could make torch run code; see the module docstring."""
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise ProgramError(f"{where}: not an exported program")
    if program.get("guards_code"):
        raise ProgramError(f"{where} carries guards_code (Python source torch would compile); memopt writes none")
    for v in program.get("verifiers") or []:
        if not isinstance(v, str) or not _IDENT.match(v):
            raise ProgramError(f"{where}: bad verifier name {str(v)[:40]!r}")
    for k in program.get("range_constraints") or {}:
        if not _SYMBOL.match(k):
            raise ProgramError(f"{where}: bad symbol name {k[:40]!r} in range_constraints")
    gm = program["graph_module"]
    graph = gm.get("graph")
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
        raise ProgramError(f"{where}: the program has no graph")
    if graph.get("custom_obj_values"):
        raise ProgramError(f"{where} holds custom objects (pickled); memopt writes none")
    for node in graph["nodes"]:
        if not isinstance(node, dict):
            raise ProgramError(f"{where}: a graph node is not an object")
        check_target(node.get("target"), where)
        meta = node.get("metadata") or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ProgramError(f"{where}: node metadata must be strings")
        node["metadata"] = {k: v for k, v in meta.items() if k in _KEEP_META}
    for spec in (gm.get("signature") or {}).get("input_specs", []):
        if isinstance(spec, dict) and ("custom_obj" in spec):
            raise ProgramError(f"{where}: the program takes a custom (pickled) object; memopt writes none")
    _walk(program, where)


def _walk(obj: Any, where: str, key: str = "") -> None:
    """Every shape expression, name and custom-object reference anywhere in the JSON."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("as_custom_obj", "as_custom_objs", "custom_obj"):
                raise ProgramError(f"{where}: custom (pickled) objects are refused")
            if k == "expr_str":
                check_expr(v, where)
            elif k == "name" and isinstance(v, str) and not _IDENT.match(v):
                raise ProgramError(f"{where}: bad value name {v[:40]!r}")
            elif k in ("parameter_name", "buffer_name", "tensor_constant_name", "fqn") and isinstance(v, str) \
                    and v and not _FQN.match(v):
                raise ProgramError(f"{where}: bad attribute path {v[:40]!r}")
            _walk(v, where, k)
    elif isinstance(obj, list):
        for v in obj:
            _walk(v, where, key)


def check_target(target: Any, where: str) -> None:
    """An operator a node may call: a registered aten/prims/memopt overload, or a listed Python op."""
    if not isinstance(target, str):
        raise ProgramError(f"{where}: a node's target is not a string")
    if target in _PY_OPS or target in _TORCH_FNS:
        return
    m = _OP.match(target)
    if m is not None:
        ns, op, overload = m.groups()
        if not (op.startswith("__") and op not in _DUNDER_OPS) and not overload.startswith("_") \
                and op not in _FILE_OPS:
            packet = _packet(ns, op)
            if isinstance(packet, torch._ops.OpOverloadPacket) and overload in packet.overloads():
                return
    raise ProgramError(f"{where} calls {target[:80]!r}, which is not an operator memopt emits; refusing to load")


def _packet(ns: str, op: str):
    """The registered overload packet `ns::op`, or None (a lookup in the dispatcher: loads nothing)."""
    if ns == "memopt":
        import memopt.runtime  # noqa: F401  (registers memopt's ops)
    try:
        return getattr(getattr(torch.ops, ns), op)
    except (AttributeError, RuntimeError):
        return None


_FILE_OPS = {"from_file"}  # aten ops that read a path: an artifact touches nothing outside its directory
_DUNDER_OPS = {"__and__", "__or__", "__xor__", "__lshift__", "__rshift__", "__not__", "__iand__", "__ior__",
               "__ixor__", "__ilshift__", "__irshift__"}


def check_expr(expr: Any, where: str) -> None:
    """A shape expression sympy may parse: arithmetic over symbols, integers and listed functions only."""
    if not isinstance(expr, str) or len(expr) > _MAX_EXPR_CHARS:
        raise ProgramError(f"{where}: a shape expression is not a short string")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError):
        raise ProgramError(f"{where}: shape expression {expr[:60]!r} does not parse") from None
    symbol_parts = set()
    for node in ast.walk(tree):
        if _is_symbol_call(node):  # Symbol('s58', positive=True, integer=True)
            symbol_parts.update(id(n) for n in ast.walk(node) if n is not node)
            continue
        if id(node) in symbol_parts:
            continue
        ok = isinstance(node, _AST_OK)
        if isinstance(node, ast.Constant):
            ok = type(node.value) in (int, float, bool)
        elif isinstance(node, ast.Name):
            ok = bool(_SYMBOL.match(node.id)) or node.id in _SYMPY_FUNCS or node.id in _SYMPY_CONSTS
        elif isinstance(node, ast.Call):
            ok = isinstance(node.func, ast.Name) and node.func.id in _SYMPY_FUNCS and not node.keywords
        if not ok:
            raise ProgramError(f"{where}: shape expression {expr[:60]!r} has a {type(node).__name__} outside the "
                               "allowed arithmetic; refusing to load")


def _is_symbol_call(node: ast.AST) -> bool:
    """`Symbol('s0', positive=True, integer=True)`: a symbol name and boolean assumptions, nothing else."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Symbol"
            and len(node.args) == 1 and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str) and bool(_SYMBOL.match(node.args[0].value))
            and all(k.arg in _ASSUMPTIONS and isinstance(k.value, ast.Constant) and type(k.value.value) is bool
                    for k in node.keywords))


_ASSUMPTIONS = {"positive", "integer", "nonnegative", "real", "finite", "negative", "nonpositive", "rational"}


def load_program(blob: bytes, name: str, tensors: dict[str, torch.Tensor], where: str):
    """An ExportedProgram from checked JSON and `tensors` (keys `name::fqn` or `fqn`)."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer

    program = read_program_json(blob, name, where)
    check_program_json(program, where)
    try:
        serialized = _to_dataclass(schema.ExportedProgram, program)
        state_dict, constants = _bind(serialized.graph_module, name, tensors, where)
        return ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, None)
    except ProgramError:
        raise
    except Exception as exc:  # malformed but checked JSON: torch's own errors, one line
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ProgramError(f"{where} is malformed ({type(exc).__name__}: {msg[:120]}); recompile the model") \
            from None


def _to_dataclass(cls, data):
    """torch's `serialize._dict_to_dataclass` (JSON -> the schema's dataclasses), the same rules, with each class's
    type hints looked up once: torch resolves them (`typing.get_type_hints`) at every node of every graph, which
    was a fifth of loading a program."""
    kind, info = _schema_kind(cls)
    if kind == "optional":
        return None if data is None else _to_dataclass(info, data)
    if kind == "union":
        if not isinstance(data, dict) or len(data) != 1:
            raise ValueError(f"a {info[0].__name__} is one {{field: value}}, got {type(data).__name__}")
        (field, value), = data.items()
        if not isinstance(field, str):
            raise ValueError(f"a {info[0].__name__}'s field name is a string, got {type(field).__name__}")
        return info[0].create(**{field: _to_dataclass(info[1][field], value)})
    if kind == "dataclass":
        return info[0](**{f: _to_dataclass(t, data[f]) for f, t in info[1] if f in data})
    if isinstance(data, list):
        return [_to_dataclass(info[0], d) for d in data] if data else data
    if isinstance(data, dict):
        return {k: _to_dataclass(info[1], v) for k, v in data.items()}
    if info[2] is float:
        return float(data)
    return data


_KINDS: dict = {}


def _schema_kind(cls) -> tuple[str, Any]:
    """How `_to_dataclass` reads `cls` (a schema class, a string or forward reference to one, a typing form),
    computed once per class."""
    try:
        return _KINDS[cls]
    except (KeyError, TypeError):  # TypeError: an unhashable typing form (none in the schema): not cached
        pass
    import dataclasses
    import types
    import typing

    from torch._export.serde import schema
    from torch._export.serde.union import _Union

    resolved = cls
    while isinstance(resolved, (str, typing.ForwardRef)):
        name = resolved.__forward_arg__ if isinstance(resolved, typing.ForwardRef) else resolved
        resolved = getattr(schema, name, None)
        if resolved is None:
            raise ValueError(f"unknown schema type {name!r}")
    while typing.get_origin(resolved) is typing.Annotated:
        resolved = resolved.__origin__
    args = typing.get_args(resolved)
    if typing.get_origin(resolved) in (typing.Union, types.UnionType) and type(None) in args:
        if len(args) != 2:
            raise ValueError(f"schema type {resolved} is not Optional[X]")
        kind = ("optional", args[0])
    elif isinstance(resolved, type) and issubclass(resolved, _Union):
        kind = ("union", (resolved, typing.get_type_hints(resolved, globalns=vars(schema))))
    elif dataclasses.is_dataclass(resolved):
        hints = typing.get_type_hints(resolved, globalns=vars(schema))
        kind = ("dataclass", (resolved, tuple((f.name, hints[f.name]) for f in dataclasses.fields(resolved))))
    else:  # a list (element type first) or dict (value type second) form, or a plain value type
        kind = ("value", (args[0] if args else None, args[1] if len(args) > 1 else None, resolved))
    try:
        _KINDS[cls] = kind
    except TypeError:
        pass
    return kind


def _bind(gm, name: str, tensors: dict, where: str) -> tuple[dict, dict]:
    """The state dict and constants the signature asks for, from `tensors`, checked against the graph."""
    values = gm.graph.tensor_values
    state_dict, constants = {}, {}
    for spec in gm.signature.input_specs:
        kind = spec.type
        if kind == "parameter":
            arg, fqn, table, param = spec.parameter.arg, spec.parameter.parameter_name, state_dict, True
        elif kind == "buffer":
            arg, fqn, param = spec.buffer.arg, spec.buffer.buffer_name, False
            table = state_dict if spec.buffer.persistent else constants
        elif kind == "tensor_constant":
            const = spec.tensor_constant
            arg, fqn, table, param = const.arg, const.tensor_constant_name, constants, False
        else:
            continue
        t = tensors.get(f"{name}::{fqn}", tensors.get(fqn))
        if t is None:
            raise ProgramError(f"weights.safetensors has no tensor {fqn!r} for {where}; recompile the model")
        _check_meta(t, values.get(arg.name), fqn, where)
        if isinstance(t, Zeros):  # allocated only once its shape is known to be the graph's
            t = t.materialize()
        table[fqn] = torch.nn.Parameter(t, requires_grad=False) if param else t
    return state_dict, constants


def _check_meta(t: torch.Tensor | Zeros, meta, fqn: str, where: str) -> None:
    if meta is None:
        if isinstance(t, Zeros):
            raise ProgramError(f"{where} gives no shape for the zero buffer {fqn!r}; refusing to allocate it")
        return
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    sizes = [s.as_int if s.type == "as_int" else None for s in meta.sizes]
    if isinstance(t, Zeros) and None in sizes:
        raise ProgramError(f"{where} gives a symbolic shape for the zero buffer {fqn!r}; refusing to allocate it")
    dtype = _SERIALIZE_TO_TORCH_DTYPE.get(meta.dtype)
    if (dtype is not None and t.dtype != dtype) or len(sizes) != t.dim() or any(
            s is not None and s != d for s, d in zip(sizes, t.shape)):
        raise ProgramError(f"tensor {fqn!r} in weights.safetensors is {t.dtype} {list(t.shape)} but {where} expects "
                           f"{dtype} {sizes}; the artifact's files do not belong together")
