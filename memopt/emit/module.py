"""The emitted model: `OptimizedModule`, an ordinary `nn.Module` around the compiled programs, and
`assemble`, which builds one from exported programs and their Plan (after a compile, a load, or a move to
another device)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from memopt.names import HOST_PREFIX
from memopt.planning.plan import Plan


class OptimizedModule(nn.Module):
    """The emitted model: an ordinary `nn.Module`, callable like the original, with `.plan`.
    Decoders also carry `.generator` (the generation program) and `.tokenizer` when known."""

    def __init__(self, gm: torch.fx.GraphModule, plan: Plan, report: dict | None = None,
                 generator: torch.fx.GraphModule | None = None, tokenizer=None):
        super().__init__()
        self.gm = gm
        self.generator = generator
        self.plan = plan
        self.report = report or {}
        self.tokenizer = tokenizer

    def forward(self, *args, **kwargs):
        if self.plan.arena is not None:
            self._check_shapes(args)
        _prepare_kernels(self)
        with torch.no_grad():  # an inference artifact; out= ops refuse autograd
            return self.gm(*args, **kwargs)

    def _check_shapes(self, args: tuple) -> None:
        """The arena is planned for one shape: say so clearly instead of failing inside the graph."""
        for i, (a, spec) in enumerate(zip(args, self.plan.inputs)):
            if isinstance(a, torch.Tensor) and list(a.shape) != list(spec["shape"]):
                dims = spec["shape"]
                hint = f" (recompile with --batch {a.shape[0]} --seq {a.shape[1]})" if len(dims) == 2 else ""
                raise ValueError(f"input {i} has shape {list(a.shape)} but this module's arena was planned for "
                                 f"{dims}{hint}; arena plans are per shape")

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, **kwargs) -> torch.Tensor:
        """Greedy new tokens (batch, n) after `input_ids` (batch, prompt_len)."""
        from memopt.serve.generate import generate

        if self.generator is None:
            raise ValueError(f"{self.plan.model} was not compiled as a decoder LM; it has no generation program")
        input_ids = input_ids.to(_device_of(self.generator))
        _prepare_kernels(self)
        eos = kwargs.pop("eos_token_id", getattr(self.tokenizer, "eos_token_id", None))
        return generate(self.generator, input_ids, max_new_tokens, eos_token_id=eos, **kwargs)

    def chat(self, prompt: str, max_new_tokens: int = 64) -> str:
        """Generate a reply to `prompt` (chat template applied when the tokenizer has one)."""
        from memopt.serve.generate import chat_ids

        if self.tokenizer is None:
            raise ValueError(f"{self.plan.model} has no tokenizer; pass token ids to generate() instead")
        new = self.generate(chat_ids(self.tokenizer, prompt), max_new_tokens)
        return self.tokenizer.decode(new[0], skip_special_tokens=True)


def _prepare_kernels(module: nn.Module) -> None:
    """int4 weights into the CPU kernel's layout before a run, in place and outside any op (a no-op once done;
    skipped while torch.compile traces: the compiled program reads whichever layout the weights hold)."""
    if not torch.compiler.is_compiling():
        from memopt.runtime.quant_ops import prepare_int4_kernel_layout_

        prepare_int4_kernel_layout_(module)


def _device_of(program: nn.Module) -> torch.device:
    """Where the program computes: its first tensor not left in host memory by an offload pass."""
    for name, t in [*program.named_parameters(), *program.named_buffers()]:
        if HOST_PREFIX not in name:
            return t.device
    return torch.device("cpu")


def assemble(plan: Plan, programs: dict, tokenizer=None, report: dict | None = None):
    """An OptimizedModule from exported `programs` ({"program": ep[, "generate": ep]}) and their plan: the
    arena re-applied to the forward program, the compressed cache's layouts attached to the generator."""
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
