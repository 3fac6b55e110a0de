"""Run a pipeline artifact (`memopt.emit.stages`) on torch.distributed: one process per stage.

    memopt run DIR --launch [--nproc N] [--prompt TEXT]          # starts the ranks for you
    torchrun --nproc-per-node N -m memopt run DIR [--prompt TEXT]  # or launch them yourself (rank 0 prints)

Rank r loads only stage r (`DIR/stage<r>`, a complete artifact whose files it alone hashes and reads) and
moves it to its device (CPU: gloo; `--device cuda`: NCCL, `cuda:<local rank>`). The data path is plain
point-to-point `send`/`recv` of the hidden states (batch, T, hidden) from rank r to rank r+1:

  - forward: rank 0 embeds the token ids and runs its layers; each next rank runs its layers on what it
    receives; the last rank's logits (batch, T, vocab) are sent back to rank 0;
  - generation (greedy, as `memopt.serve.generate.generate`): the prompt goes through the pipeline in
    prefill chunks (the whole prompt in one call for a compressed KV cache, which is emptied first), then one
    token per step; every stage keeps the KV cache of its own layers only, addressed by `cache_position`;
    the last rank picks each token (argmax) and broadcasts it to every rank, so rank 0 feeds it back in and
    every rank stops at the same step (max_new_tokens, or every row at an end-of-sequence id).

`torch.distributed.pipelining` is not used: its schedules (GPipe, 1F1B, ...) pipeline micro-batches of a
training or prefill step and have no schedule for token-by-token decoding with a cache, which is the
sequential dependency above; with one request in flight each stage waits on the one before it anyway.

No process hangs: the process group is created with a timeout (`timeout_s`, default 300 s), every
send/recv/collective waits with it, and a rank that dies breaks its peers' sockets at once. Failures are
one line each: before any work every rank reports whether it loaded its stage (a missing or corrupt stage
file, a stage that is not its rank's) and whether the job fits its stage (the KV cache's capacity); all
ranks then raise the same `StageError` naming the rank at fault. A peer that dies or hangs mid-run is named
by the rank that waited for it. `launch` starts the ranks itself with the environment torchrun gives them
(RANK, WORLD_SIZE, MASTER_ADDR and a free MASTER_PORT, one intra-op thread each), as torchrun `--standalone`
would but without its agent process (which took ~3 s of every launch: its own start and its teardown), waits,
stops the others when one fails (as torchrun does), and turns the ranks' error files and exit codes (a rank
killed by a signal) into one error. Each rank is a process of its own, forked from a rank server that has
imported what a rank needs (`RANK_PRELOAD`, ~3 s a process) once, on the first launch, and serves the launches
after it from the same process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0
_MSG_BYTES = 1024
_HEADER = 16  # [mode, batch, prompt_len, max_new_tokens, prefill_chunk, forward_seq, compressed, n_eos, eos x 8]
_MAX_EOS = _HEADER - 8
_FORWARD, _GENERATE = 1, 2
_GLOO_PREFIX = re.compile(r"^\[[^\]]*\.cc:\d+\]\s*")  # "[.../pair.cc:537] Read error ..."


class StageError(RuntimeError):
    """A pipeline run that cannot go on; the message names the rank at fault and what to do."""


# ---------------------------------------------------------------- one rank
class _Peers:
    """This rank's links: point-to-point and collective calls that each wait at most `timeout_s`."""

    def __init__(self, rank: int, world: int, device: torch.device, timeout_s: float):
        self.rank, self.world, self.device, self.timeout = rank, world, device, timedelta(seconds=timeout_s)

    def _wait(self, start, peer: str, what: str) -> None:
        """Start (`start()`: a p2p or collective call with `peer`: "rank 1", "another rank") and wait for it. Starting
        is inside the guard too: gloo raises there when the peer's socket is already closed (a rank killed while
        this one was busy)."""
        limit = f"{self.timeout.total_seconds():g} s"
        try:
            done = start().wait(timeout=self.timeout)
        except Exception as exc:  # gloo / NCCL raise several types for a closed socket or a timeout
            text = _first_line(exc)
            if "timed out" in text.lower() or "timeout" in text.lower():
                raise StageError(f"rank {self.rank}: {what}: {peer} did not answer within {limit} (it hung or "
                                 "is far slower; raise --timeout if it is only slow)") from None
            raise StageError(f"rank {self.rank}: {what}: lost {peer} (it stopped or died; see its own error): "
                             f"{_GLOO_PREFIX.sub('', text).split('. ')[0]}") from None
        if done is False:
            raise StageError(f"rank {self.rank}: {what}: {peer} did not answer within {limit} (it hung)")

    def send(self, t: torch.Tensor, dst: int, what: str) -> None:
        self._wait(lambda: dist.isend(t.contiguous(), dst), f"rank {dst}", f"sending {what}")

    def recv(self, shape, dtype: torch.dtype, src: int, what: str) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        self._wait(lambda: dist.irecv(buf, src), f"rank {src}", f"receiving {what}")
        return buf

    def broadcast(self, t: torch.Tensor, src: int, what: str) -> torch.Tensor:
        peer = f"rank {src}" if src != self.rank else "another rank"
        self._wait(lambda: dist.broadcast(t, src, async_op=True), peer, f"broadcasting {what}")
        return t

    def agree(self, error: str | None, what: str) -> None:
        """Every rank says whether it can go on; if one cannot, all raise its error (the lowest rank's)."""
        msg = (error or "").encode()[:_MSG_BYTES - 1]
        mine = torch.zeros(_MSG_BYTES, dtype=torch.uint8)
        mine[0] = 1 if error else 0
        if msg:
            mine[1:1 + len(msg)] = torch.frombuffer(bytearray(msg), dtype=torch.uint8)
        mine = mine.to(self.device)
        everyone = [torch.zeros_like(mine) for _ in range(self.world)]
        self._wait(lambda: dist.all_gather(everyone, mine, async_op=True), "another rank", what)
        for r, t in enumerate(everyone):
            t = t.cpu()
            if int(t[0]):
                text = bytes(t[1:].tolist()).rstrip(b"\x00").decode(errors="replace")
                raise StageError(text if text.startswith(f"rank {r}:") else f"rank {r}: {text}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:240]


def _state_bytes(module) -> dict:
    """What this rank's stage holds: its weight tensors (by name, shared ones once) and its KV cache, in bytes."""
    from memopt.names import is_state

    seen, weights, kv = set(), {}, 0
    for program in (module.gm, module.generator):
        if program is None:
            continue
        for name, t in [*program.named_parameters(), *program.named_buffers()]:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if key in seen or not t.numel():
                continue
            seen.add(key)
            if is_state(name):
                kv += t.nbytes if "cumulative_length" not in name else 0
            elif not name.startswith("_memopt_arena"):
                weights[name] = t.nbytes
    return {"weights": weights, "weights_bytes": sum(weights.values()), "kv_cache_bytes": kv}


def load_stage(directory: Path, rank: int, world: int, device: torch.device, key: bytes | None):
    """Rank `rank`'s stage of the pipeline artifact `directory` (its plan checked against the top plan)."""
    from memopt.emit.artifact import load, load_plan
    from memopt.emit.stages import STAGE_DIR, StageSpec, stage_records

    plan = load_plan(directory, key=key)
    specs = stage_records(plan, f"plan.json of {str(directory)!r}")
    if not specs:
        raise ValueError(f"{str(directory)!r} is a one-device artifact; run it with memopt run DIR (no torchrun)")
    if len(specs) != world:
        raise ValueError(f"{str(directory)!r} has {len(specs)} pipeline stages but {world} processes were launched; "
                         f"launch --nproc-per-node {len(specs)}")
    module = load(directory / STAGE_DIR.format(rank), device=device, key=key)
    where = f"{STAGE_DIR.format(rank)}/plan.json of {str(directory)!r}"
    own = [StageSpec.from_json(d, where) for d in module.plan.stages]
    if own != [specs[rank]]:
        raise ValueError(f"{STAGE_DIR.format(rank)} of {str(directory)!r} is not stage {rank} of its plan; "
                         "recompile the model")
    return plan, plan.stages[rank], module


def _device(device: str, local_rank: int) -> torch.device:
    from memopt.emit.device import check_device

    dev = check_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda" and dev.index >= torch.cuda.device_count():
        raise ValueError(f"rank {local_rank} needs {dev} but this node has {torch.cuda.device_count()} CUDA "
                         "device(s); NCCL needs one GPU per stage (use --device cpu, or fewer stages)")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def run_rank(directory, *, input_ids: torch.Tensor | None = None, max_new_tokens: int = 0,
             forward_ids: torch.Tensor | None = None, device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S,
             key: bytes | None = None, eos_token_id=None, prefill_chunk: int = 512) -> dict:
    """This process's part of a pipeline run (torchrun's environment says which rank it is). Rank 0 gives
    the job: `forward_ids` (batch, seq) for a forward pass and/or `input_ids` (batch, prompt_len) with
    `max_new_tokens` for greedy generation; other ranks pass nothing. Returns on every rank
    {"rank", "stage", ...what it holds}, with "tokens" (batch, n) on every rank and "logits" on rank 0."""
    from memopt.emit.stages import STAGE_DIR

    timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise ValueError(f"--timeout must be a number of seconds > 0, got {timeout_s!r}")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    dev = _device(device, int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    try:
        peers = _Peers(rank, world, dev, timeout_s)
        error, header, record, module = None, torch.zeros(_HEADER, dtype=torch.long), None, None
        try:
            plan, record, module = load_stage(Path(directory), rank, world, dev, key)
            if rank == 0:
                compressed = bool(plan.pass_configs.get("pipeline", {}).get("kv_compressed"))
                header = _header(forward_ids, input_ids, max_new_tokens, eos_token_id, prefill_chunk, compressed)
        except Exception as exc:  # ArtifactError, ProgramError, a bad job: told to every rank
            error = f"rank {rank}: {_first_line(exc)}"
        peers.agree(error, f"loading stage {rank} ({STAGE_DIR.format(rank)})")
        header = peers.broadcast(header.to(dev), 0, "the job").cpu()
        peers.agree(_fits(module, header, rank), "checking the job")
        out = {"rank": rank, "stage": rank, "layers": record["layers"], **_state_bytes(module)}
        with torch.inference_mode():
            if int(header[0]) & _FORWARD:
                out["logits"] = _forward(module, peers, record, header, forward_ids)
            if int(header[0]) & _GENERATE:
                out["tokens"] = _generate(module, peers, record, header, input_ids)
        return out
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # gloo's "Connection closed by peer" when a peer died: the rank's own result or error
            pass  # (raised above) is what it reports, not the teardown's


def _header(forward_ids, input_ids, max_new_tokens: int, eos_token_id, prefill_chunk: int,
            compressed: bool) -> torch.Tensor:
    """The job every rank follows, as one tensor rank 0 broadcasts (see `_HEADER`); `compressed`: some stage
    holds a compressed KV cache, so the prompt goes in one call."""
    mode = (_FORWARD if forward_ids is not None else 0) | (_GENERATE if input_ids is not None else 0)
    if not mode:
        raise ValueError("nothing to run: pass forward_ids and/or input_ids (a prompt)")
    for name, ids in (("forward_ids", forward_ids), ("input_ids", input_ids)):
        if ids is not None and (ids.dim() != 2 or ids.dtype != torch.long or not ids.numel()):
            raise ValueError(f"{name} must be a non-empty (batch, seq) tensor of token ids, got "
                             f"{ids.dtype} {list(ids.shape)}")
    if input_ids is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                  or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if forward_ids is not None and input_ids is not None and forward_ids.shape[0] != input_ids.shape[0]:
        raise ValueError("forward_ids and input_ids must have the same batch size")
    eos = sorted(eos_token_id if isinstance(eos_token_id, (list, tuple, set, frozenset)) else
                 ([] if eos_token_id is None else [eos_token_id]))[:_MAX_EOS]
    batch = (input_ids if input_ids is not None else forward_ids).shape[0]
    prompt_len, new = (input_ids.shape[1], max_new_tokens) if input_ids is not None else (0, 0)
    seq = forward_ids.shape[1] if forward_ids is not None else 0
    h = [mode, batch, prompt_len, new, prefill_chunk, seq, int(compressed), len(eos), *eos]
    return torch.tensor(h + [0] * (_HEADER - len(h)), dtype=torch.long)


def _fits(module, header: torch.Tensor, rank: int) -> str | None:
    """This stage's objection to the job (its KV cache too small, its forward program of another shape)."""
    from memopt.serve.generate import capacity_tokens

    mode, batch, n_prompt, max_new, _, seq = (int(x) for x in header[:6])
    if mode & _GENERATE:
        capacity = capacity_tokens(module.generator)
        need = n_prompt + max_new - 1
        if capacity is not None and need > capacity:
            return (f"rank {rank}: the prompt ({n_prompt} tokens) + max_new_tokens ({max_new}) needs {need} cached "
                    f"tokens; this stage's KV cache holds {capacity}: recompile with a larger --max-cache")
    if mode & _FORWARD and module.plan.inputs:
        shape = list(module.plan.inputs[0]["shape"])
        if shape[:2] != [batch, seq]:
            return (f"rank {rank}: the forward program was compiled for batch {shape[0]}, seq {shape[1]}; got "
                    f"batch {batch}, seq {seq}: recompile with --batch {batch} --seq {seq}")
    return None


def _dtype(record: dict) -> torch.dtype:
    from memopt.emit.program_io import DTYPES

    if record.get("dtype") not in DTYPES:
        raise StageError(f"plan.json records hidden states of dtype {record.get('dtype')!r}; recompile the model")
    return DTYPES[record["dtype"]]


def _forward(module, peers: _Peers, record: dict, header: torch.Tensor, ids) -> torch.Tensor | None:
    rank, last = peers.rank, peers.world - 1
    batch, seq = int(header[1]), int(header[5])
    dtype, hidden = _dtype(record), int(record["hidden_size"])
    x = ids.to(peers.device) if rank == 0 else peers.recv((batch, seq, hidden), dtype, rank - 1,
                                                          "the forward pass's hidden states")
    out = module(x)
    if rank < last:
        peers.send(out, rank + 1, "the forward pass's hidden states")
    elif last > 0:
        peers.send(out, 0, "the logits")
    if rank == 0 and last > 0:
        return peers.recv((batch, seq, int(record["vocab_size"])), dtype, last, "the logits")
    return out if rank == 0 else None


def _generate(module, peers: _Peers, record: dict, header: torch.Tensor, prompt) -> torch.Tensor:
    """Greedy decoding through the pipeline (see the module doc); every rank returns the tokens (batch, n)."""
    from memopt.serve.decode_program import decode_program
    from memopt.serve.generate import reset_cache

    rank, last = peers.rank, peers.world - 1
    batch, n_prompt, max_new, chunk, _, compressed_anywhere, n_eos = (int(x) for x in header[1:8])
    eos = header[8:8 + n_eos].clone()
    gm = module.generator
    compressed = "memopt_kv" in gm.meta
    if compressed:
        reset_cache(gm)
    program, dtype, hidden = decode_program(gm), _dtype(record), int(record["hidden_size"])
    key = "input_ids" if rank == 0 else "inputs_embeds"

    def step(ids_or_none, start: int, count: int, what: str):
        x = ids_or_none.to(peers.device) if rank == 0 else peers.recv((batch, count, hidden), dtype, rank - 1, what)
        out = program(**{key: x}, cache_position=torch.arange(start, start + count, device=peers.device))
        if rank < last:
            peers.send(out, rank + 1, what)
            return None
        return out[:, -1]

    logits = None
    # the prompt: one chunk per call, the same split on every rank (a compressed cache: the whole prompt)
    per_call = n_prompt if compressed_anywhere else chunk
    for start in range(0, n_prompt, per_call):
        count = min(per_call, n_prompt - start)
        logits = step(prompt[:, start:start + count] if rank == 0 else None, start, count,
                      f"the hidden states of the prompt's tokens {start}..{start + count - 1}")
    out, done = [], torch.zeros(batch, dtype=torch.bool)
    for i in range(max_new):
        token = (logits.argmax(-1, keepdim=True) if rank == last else
                 torch.zeros((batch, 1), dtype=torch.long, device=peers.device))
        token = peers.broadcast(token.to(torch.long), last, f"new token {i}")
        out.append(token.cpu())
        _test_fault(rank, i)
        if n_eos:
            done |= torch.isin(token[:, 0].cpu(), eos)
            if bool(done.all()):
                break
        if i + 1 < max_new:
            logits = step(token, n_prompt + i, 1, f"the hidden states of new token {i}")
    return torch.cat(out, dim=1)


def _test_fault(rank: int, step: int) -> None:
    """Tests make a rank die (MEMOPT_TEST_FAULT=rank:step) or hang (rank:step:hang) at a new token, to prove
    its peers stop with one clear error."""
    spec = os.environ.get("MEMOPT_TEST_FAULT", "").split(":")
    if spec[:2] == [str(rank), str(step)]:
        if spec[2:] == ["hang"]:
            time.sleep(3600)
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- the launcher
def launch(directory, *, nproc: int | None = None, prompt: str | None = None, input_ids: torch.Tensor | None = None,
           forward_ids: torch.Tensor | None = None, max_new_tokens: int = 48, device: str = "cpu",
           timeout_s: float | None = None, key_file: str | None = None, env: dict | None = None) -> dict:
    """Run the pipeline artifact `directory` on `nproc` ranks (one process per stage, `nproc` = the number of
    stages; see the module doc) and return rank 0's result: "text" and "tokens" for a `prompt`, "tokens"
    (batch, n) for `input_ids` (greedy, `max_new_tokens`), "logits" for `forward_ids` (batch, seq), plus
    "ranks": what each rank's stage held. `env`: extra environment for the ranks. Raises StageError (one line)
    when a rank fails."""
    from memopt.emit.artifact import load_plan
    from memopt.emit.stages import stage_records

    directory = Path(directory)
    key = _read_key(key_file)
    plan = load_plan(directory, key=key)
    specs = stage_records(plan, f"plan.json of {str(directory)!r}")
    if not specs:
        raise ValueError(f"{str(directory)!r} is a one-device artifact: run it with memopt run DIR (no --launch)")
    if prompt is None and input_ids is None and forward_ids is None:
        raise ValueError("nothing to run: pass a prompt, input_ids (to generate from) or forward_ids")
    if nproc is None:
        nproc = len(specs)
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be the number of stages ({len(specs)}), got {nproc!r}")
    if nproc != len(specs):
        raise ValueError(f"{str(directory)!r} has {len(specs)} pipeline stages; --nproc {nproc} cannot run it: pass "
                         f"--nproc {len(specs)} (one process per stage)")
    timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise ValueError(f"--timeout must be a number of seconds > 0, got {timeout_s!r}")
    with tempfile.TemporaryDirectory(prefix="memopt-launch-") as tmp:
        job = Path(tmp)
        tensors = {k: v.detach().cpu().clone() for k, v in (("input_ids", input_ids), ("forward_ids", forward_ids))
                   if v is not None}
        if tensors:
            from safetensors.torch import save_file

            save_file(tensors, str(job / "inputs.safetensors"))
        spec = {"prompt": prompt, "max_new_tokens": max_new_tokens, "device": device, "timeout_s": timeout_s,
                "key_file": str(Path(key_file).resolve()) if key_file else None, "inputs": sorted(tensors)}
        (job / "job.json").write_text(json.dumps(spec))
        ends = _spawn(str(directory.resolve()), nproc, job, env or {})
        return _collect(job, nproc, ends)


STOP_GRACE_S = 0.5  # after a rank fails, how long the others get to stop on their own before they are stopped


# What a rank imports before it reads its stage (~3 s: torch, its distributed package, the program deserializer,
# memopt's ops): the rank server imports it once, and each rank is forked from it ready (`_spawn`).
RANK_PRELOAD = ("memopt.serve.distributed", "memopt.emit.artifact", "memopt.runtime", "torch._export.serde.serialize")
_SERVER_LOCK = threading.Lock()


def _rank_context():
    """The multiprocessing context ranks start from: a fork server (a clean process that has imported
    `RANK_PRELOAD` and runs nothing else, so forking it is safe), started by the first launch of this process and
    kept for the next; "spawn" where there is no fork."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    with _SERVER_LOCK:
        ctx.set_forkserver_preload(list(RANK_PRELOAD))  # (read when the server starts; a no-op once it runs)
    return ctx


@contextlib.contextmanager
def _without_main():
    """While a rank starts: no `__main__` for multiprocessing to import again in it. A rank runs `_rank_main` and
    nothing of the launching program (multiprocessing would run the top level of a script without a
    `__name__ == "__main__"` guard once more in each rank; torchrun's ranks never did)."""
    import types

    with _SERVER_LOCK:
        main = sys.modules.get("__main__")
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            yield
        finally:
            if main is not None:
                sys.modules["__main__"] = main


def _rank_main(directory: str, job: str, env: dict, cwd: str, log: str) -> None:
    """One rank, forked from the rank server: the environment, working directory and output a `torchrun` worker
    would have (`env` replaces the server's), then `_worker_main`; its return value is the exit code."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    threads = env.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:  # (read by OpenMP when a process starts; this one did not)
        torch.set_num_threads(int(threads))
    sys.exit(_worker_main([directory, job]))


def _spawn(directory: str, nproc: int, job: Path, env: dict) -> list[tuple[int, bool]]:
    """Run `nproc` ranks on `directory` with torchrun's environment for them (a free port on this host), each
    writing its output to `job/rank<r>.log`, and wait for all. The ranks are forked from the rank server
    (`_rank_context`; each is a process of its own, as under torchrun). When one fails (a non-zero exit or a
    signal), the others get `STOP_GRACE_S` to stop on their own (a dead peer breaks their sockets at once; a hung
    one does not) and are then terminated (killed 5 s later). Returns each rank's (exit code, negative for a
    signal; whether this launcher stopped it)."""
    import socket

    with socket.socket() as sock:  # a free port for rank 0's store (torchrun --standalone picks one the same way)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = {**os.environ, **env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0"}
    base.setdefault("OMP_NUM_THREADS", "1")  # as torchrun sets it for several processes on one host
    ctx = _rank_context()
    procs, codes, stopped, failed_at = [], {}, set(), None
    try:
        for r in range(nproc):
            proc = ctx.Process(target=_rank_main, name=f"memopt-rank{r}", args=(
                directory, str(job), {**base, "RANK": str(r), "LOCAL_RANK": str(r)}, os.getcwd(),
                str(job / f"rank{r}.log")))
            with _without_main():
                proc.start()
            procs.append(proc)
        while len(codes) < nproc:
            for r, proc in enumerate(procs):
                if r not in codes and proc.exitcode is not None:
                    codes[r] = proc.exitcode
                    if proc.exitcode and failed_at is None:
                        failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > STOP_GRACE_S:
                for r, proc in enumerate(procs):
                    if r not in codes and r not in stopped:
                        stopped.add(r)
                        proc.terminate()
                if time.monotonic() - failed_at > STOP_GRACE_S + 5:
                    for r, proc in enumerate(procs):
                        if r not in codes:
                            proc.kill()
            time.sleep(0.02)
    finally:  # (an interrupted launcher leaves no rank behind)
        for proc in procs:
            if proc.exitcode is None:
                proc.kill()
            proc.join()
    return [(codes.get(r, procs[r].exitcode), r in stopped) for r in range(nproc)]


def _collect(job: Path, nproc: int, ends: list[tuple[int, bool]]) -> dict:
    """Rank 0's result, or one StageError from the ranks' error files and exit codes (`_spawn`'s)."""
    errors = {}
    for r in range(nproc):
        p = job / f"error_rank{r}.txt"
        if p.is_file():
            errors[r] = p.read_text().strip()
    result = job / "result.json"
    if all(code == 0 for code, _ in ends) and result.is_file() and not errors:
        out = json.loads(result.read_text())
        tensors = job / "result.safetensors"
        if tensors.is_file():
            from safetensors.torch import load_file

            out.update(load_file(str(tensors)))
        out["ranks"] = [json.loads((job / f"rank{r}.json").read_text()) for r in range(nproc)
                        if (job / f"rank{r}.json").is_file()]
        return out
    dead = _killed_rank(ends)
    own = [m for r, m in sorted(errors.items()) if m.startswith(f"rank {r}:") and not _PEER_ERROR.search(m)]
    if own:
        raise StageError(own[0])
    if dead is not None:
        waited = next((m for m in errors.values()), None)
        raise StageError(f"rank {dead[0]} died ({dead[1]})" + (f"; {waited}" if waited else "") +
                         "; no process was left running")
    if errors:
        raise StageError(next(iter(errors.values())))
    r = next((r for r, (code, _) in enumerate(ends) if code), 0)
    log = (job / f"rank{r}.log").read_text(errors="replace") if (job / f"rank{r}.log").is_file() else ""
    tail = [line for line in log.strip().splitlines() if line.strip()][-3:]
    raise StageError(f"rank {r} exited with code {ends[r][0]} and no rank reported an error: "
                     f"{' | '.join(tail)[:400] or 'no output'}")


_PEER_ERROR = re.compile(r": (lost (rank \d+|another rank)|(rank \d+|another rank) did not answer) ")


def _killed_rank(ends: list[tuple[int, bool]]) -> tuple[int, str] | None:
    """The lowest rank a signal ended that the launcher did not stop, and how it ended."""
    for r, (code, stopped) in enumerate(ends):
        if code is not None and code < 0 and not stopped:
            try:
                return r, f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return r, f"exit code {code}"
    return None


def _read_key(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ValueError(f"cannot read key file {path!r} ({exc.strerror}); pass a readable file") from None
    if not key:
        raise ValueError(f"key file {path!r} is empty; put a secret in it")
    return key


def run_job(directory, job: str) -> dict:
    """A worker under `launch`: run this rank's part of the job in `job/job.json`, write rank 0's result
    (result.json, result.safetensors), this rank's holdings (rank<r>.json) or its error (error_rank<r>.txt)."""
    job_dir = Path(job)
    spec = json.loads((job_dir / "job.json").read_text())
    rank = int(os.environ.get("RANK", "0"))
    try:
        tensors = {}
        if rank == 0 and spec["inputs"]:
            from safetensors.torch import load_file

            tensors = load_file(str(job_dir / "inputs.safetensors"))
        out = run_staged(directory, prompt=spec["prompt"], max_new_tokens=spec["max_new_tokens"],
                         device=spec["device"], timeout_s=spec["timeout_s"], key=_read_key(spec["key_file"]),
                         input_ids=tensors.get("input_ids"), forward_ids=tensors.get("forward_ids"))
    except Exception as exc:
        msg = _first_line(exc)
        (job_dir / f"error_rank{rank}.txt").write_text(msg if msg.startswith("rank ") else f"rank {rank}: {msg}")
        raise
    held = {k: out.pop(k) for k in ("weights", "weights_bytes", "kv_cache_bytes", "layers") if k in out}
    (job_dir / f"rank{rank}.json").write_text(json.dumps({"rank": rank, **held}))
    if rank == 0:
        tensors = {k: out.pop(k).contiguous() for k in ("logits", "tokens") if isinstance(out.get(k), torch.Tensor)}
        if tensors:
            from safetensors.torch import save_file

            save_file(tensors, str(job_dir / "result.safetensors"))
        (job_dir / "result.json").write_text(json.dumps(out, default=str))
    return out


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def run_staged(directory, *, prompt: str | None = None, input_ids: torch.Tensor | None = None,
               forward_ids: torch.Tensor | None = None, max_new_tokens: int = 48, device: str = "cpu",
               timeout_s: float | None = None, key: bytes | None = None) -> dict:
    """One rank of `memopt run DIR` for a pipeline artifact, under torchrun: rank 0 generates from a `prompt`
    (tokenized with the artifact's tokenizer) or `input_ids`, and/or runs `forward_ids` forward (the other
    ranks' arguments are not read). Returns `run_rank`'s result; rank 0's also has "text" for a prompt, the
    model's name and the number of stages."""
    from memopt.emit.artifact import _load_tokenizer, load_plan, verify

    if not under_torchrun():
        plan = load_plan(directory, key=key)
        n = len(plan.stages)
        raise ValueError(f"{str(directory)!r} holds a pipeline of {n} stages, one process each: run memopt run "
                         f"{directory} --launch, or torchrun --nproc-per-node {n} -m memopt run {directory}")
    directory = Path(directory)
    rank = int(os.environ["RANK"])
    tokenizer, eos, plan = None, None, None
    if rank == 0:
        plan = load_plan(directory, key=key)
        if prompt is not None:
            files = verify(directory, key=key)["files"]
            if not any(n.startswith("tokenizer/") for n in files):
                raise ValueError(f"{plan.model} has no tokenizer in {str(directory)!r}; run it without --prompt")
            from memopt.serve.generate import chat_ids

            tokenizer = _load_tokenizer(directory, files)
            input_ids, eos = chat_ids(tokenizer, prompt), tokenizer.eos_token_id
    t0 = time.perf_counter()
    out = run_rank(directory, input_ids=input_ids, forward_ids=forward_ids,
                   max_new_tokens=max_new_tokens if input_ids is not None else 0, device=device,
                   timeout_s=timeout_s, key=key, eos_token_id=eos)
    out["seconds"] = time.perf_counter() - t0
    if rank == 0:
        if tokenizer is not None:
            out["text"] = tokenizer.decode(out["tokens"][0], skip_special_tokens=True)
        out.update(model=plan.model, engine="torch", device=device, stages=len(plan.stages))
    return out


def _worker_main(argv: list[str]) -> int:
    """`python -m memopt.serve.distributed DIR JOB`: one rank under `launch` (errors go to the job directory)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if len(argv) != 2:
        print("usage: torchrun ... -m memopt.serve.distributed DIR JOB (memopt run DIR --launch does this)",
              file=sys.stderr)
        return 2
    try:
        run_job(argv[0], argv[1])
    except Exception as exc:  # written to the job directory by run_job; one line on stderr too
        print(f"memopt: error: {_first_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
