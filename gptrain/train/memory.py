"""The memory plan: what one training process holds, in bytes, before any of it is allocated.

`gptrain train ... --plan` prints it; on CUDA, on a Linux CPU (the RAM available when it starts) or with
`--memory`, a run whose plan does not fit stops before its first step with one line naming the flag to change. Per process:

- parameters: float32 master weights (DDP: all N; FSDP: N/S for S shards) plus what is gathered for compute
  (FSDP: the root unit and about three Blocks at a time, everything with --no-reshard-after-forward, and the
  all-gather's buffer for the largest unit), plus autocast's bf16 copies of the weights, which backward keeps
  (DDP, or FSDP without a bf16 MixedPrecisionPolicy);
- gradients: float32 (DDP: N; FSDP: N/S, plus the largest unit's unsharded gradient and its reduce-scatter copy,
  or a full unsharded float32 copy of all of them while micro-steps accumulate without a reduce-scatter; with
  `--reduce-scatter every`, or `auto` when only that fits, every micro-step reduce-scatters and only the shard
  accumulates);
- optimizer state: AdamW's two float32 moments (8 bytes a parameter, divided by S under FSDP); with --optimizer
  muon one float32 momentum (4 bytes) for the block matrices, plus under FSDP the one matrix gathered at a time;
- activations for one micro-batch: what each Block keeps for backward, counted tensor by tensor for gptrain's
  Block (17 values of width C per token: LayerNorm inputs, the fused QKV, attention output, MLP hidden before and
  after GELU, ...; attention itself keeps only a log-sum-exp per head, as SDPA's fused kernels do), the loss's
  buffers (gptrain.loss.lm_loss: its chunked gradient in eager mode, the CPU's or the accelerator's kernel, and
  under FSDP too, whose root (the loss) is never compiled; the whole logits only when DDP compiles it), the tied
  LM head's gradient (made twice, once by the head and once by the embedding, before they are summed), and a
  working set for backward. With activation checkpointing a Block keeps only its input, and one Block at a time
  is recomputed in backward;
- a fixed runtime allowance (CUDA context and library workspaces; on CPU the interpreter and torch itself).

The sum is the plan's peak: it assumes an earlier micro-step's gradients are alive during the forward (true when
accumulating; a slight over-estimate otherwise). A run fits when the sum is at most 90% of the memory (the rest
is left to the allocator's fragmentation, which a plan of tensors cannot count: on a CPU under FSDP with
accumulation glibc keeps up to 30% more resident than the plan's training terms, while the live bytes stay 27-34%
under them). docs/ARCHITECTURE.md and benchmarks/RESULTS.md compare the plan with
measured peaks.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from gptrain.devices import inference_dtype
from gptrain.errors import GptrainError
from gptrain.loss import CHUNK_TOKENS as LOSS_CHUNK, CUDA_CHUNK_TOKENS as LOSS_CHUNK_ACCEL
from gptrain.model import GPTConfig

GiB = 1 << 30
USABLE = 0.9  # fraction of the memory a plan may fill
RUNTIME = {"cuda": 1.0 * GiB, "cpu": 0.6 * GiB, "mps": 0.6 * GiB}
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": GiB, "gb": GiB, "gib": GiB, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """'80GB', '40GiB', '512MB', '1.5T' -> bytes. GB and GiB both mean 2^30, as GPU names use them."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m and m.group(2).lower()
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise GptrainError(f"--memory {text!r} is not a size; write e.g. 80GB, 40GiB or 512MB")
    return int(float(m.group(1)) * _UNITS[unit])


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def param_count(c: GPTConfig) -> int:
    """Parameters of gptrain.model.GPT(c), tied LM head once, padded vocabulary rows included."""
    C, L = c.n_embd, c.n_layer
    per_block = 12 * C * C + 13 * C  # QKV 3C²+3C, proj C²+C, MLP 8C²+5C, two LayerNorms 4C
    return c.padded_vocab_size * C + c.block_size * C + L * per_block + 2 * C


def block_params(c: GPTConfig) -> int:
    return 12 * c.n_embd * c.n_embd + 13 * c.n_embd


@dataclass(frozen=True)
class Plan:
    """The bytes one process holds; `total(checkpointing, micro_batch)` and `largest_micro_batch` answer what-ifs."""
    model: GPTConfig
    parallel: str
    world_size: int
    shards: int  # processes a tensor is sharded over (1 for DDP)
    micro_batch: int
    seq_len: int
    rows_per_process: int  # sequences per optimizer step per process (= micro_batch × accumulation)
    checkpointing: str
    compute_bytes: int  # 2 (bf16 autocast / mixed precision) or 4
    mixed_precision: bool  # FSDP gathers bf16 parameters
    compile: bool
    reshard_after_forward: bool
    device_type: str
    reduce_scatter: str  # FSDP under accumulation: "last", "every", or "auto" (every when only that fits)
    memory: int | None
    memory_source: str
    optimizer_name: str = "adamw"  # or "muon": one float32 momentum buffer for each block matrix

    # --- the parts
    @property
    def n_params(self) -> int:
        return param_count(self.model)

    @property
    def accumulation(self) -> int:
        return self.rows_per_process // self.micro_batch

    def params(self) -> int:
        n, c = self.n_params, self.model
        if self.parallel == "ddp":
            held = 4 * n
        else:
            gathered_bytes = 2 if self.mixed_precision else 4
            root = n - c.n_layer * block_params(c)
            units = n if not self.reshard_after_forward else root + min(3, c.n_layer) * block_params(c)
            # plus the all-gather's own buffer for the unit being gathered (copied out into its parameters)
            held = 4 * n / self.shards + gathered_bytes * (units + self._largest_unit())
        autocast_copies = 2 * n if self.compute_bytes == 2 and not self.mixed_precision else 0
        return int(held + autocast_copies)

    def grads(self, accumulation: int | None = None, reduce_scatter: str | None = None) -> int:
        n = self.n_params
        if self.parallel == "ddp":
            return 4 * n
        accumulation = self.accumulation if accumulation is None else accumulation
        every = (reduce_scatter or self.reduce_scatter) == "every"
        # a unit's unsharded gradient and the reduce-scatter's flattened copy of it; when micro-steps accumulate
        # without reducing, every unsharded gradient stays (float32) until the last one
        unsharded = (4 * n + 4 * self._largest_unit()) if accumulation > 1 and not every \
            else 2 * 4 * self._largest_unit()
        return int(4 * n / self.shards + unsharded)

    def reduce_scatter_mode(self, checkpointing: str | None = None, micro_batch: int | None = None) -> str:
        """"last" or "every": --reduce-scatter auto reduce-scatters every micro-step (more communication) only when
        FSDP accumulates and keeping the unsharded gradients would not fit."""
        if self.reduce_scatter != "auto":
            return self.reduce_scatter
        if self.parallel != "fsdp" or self.memory is None:
            return "last"
        return "last" if self._total(checkpointing, micro_batch, "last") <= self.usable else "every"

    def _largest_unit(self) -> int:
        """Parameters of the largest FSDP unit: the root (embeddings, final LayerNorm) or one Block."""
        c = self.model
        return max(self.n_params - c.n_layer * block_params(c), block_params(c))

    def optimizer(self) -> int:
        """AdamW: two float32 moments a parameter. Muon: one float32 momentum buffer for each block matrix (12C² a
        layer), AdamW's two for the rest; under FSDP plus the largest matrix (4C²) gathered whole, in float32, and
        its orthogonalized copy, one matrix at a time."""
        if self.optimizer_name != "muon":
            return int(8 * self.n_params / self.shards)
        c = self.model
        matrices = 12 * c.n_embd * c.n_embd * c.n_layer
        gathered = 2 * 4 * 4 * c.n_embd * c.n_embd if self.parallel == "fsdp" else 0
        return int((4 * matrices + 8 * (self.n_params - matrices)) / self.shards + gathered)

    def runtime(self) -> int:
        return int(RUNTIME.get(self.device_type, RUNTIME["cpu"]))

    def activations(self, checkpointing: str | None = None, micro_batch: int | None = None) -> int:
        c, dt = self.model, self.compute_bytes
        checkpointing = checkpointing or self.checkpointing
        tokens = (micro_batch or self.micro_batch) * self.seq_len
        C, L, V = c.n_embd, c.n_layer, c.vocab_size
        # per token of one Block: LayerNorm inputs stay in the float32 residual stream; the other 15 widths
        # (LN outputs, QKV 3C, attention output and its projection input 2C, MLP 4C + 4C) in the compute dtype
        block = 2 * 4 * C + 15 * dt * C + 4 * c.n_head
        if checkpointing == "blocks":
            kept = L * 4 * C + block  # every Block's input, plus the one being recomputed
        else:
            kept = L * block
        embed_and_head = 4 * C + 4 * C + dt * C  # embedding sum, final LayerNorm input and output
        backward = 4 * C + 2 * 4 * dt * C  # gradient of the residual stream and of the MLP hidden layer
        Vp = c.padded_vocab_size
        if self.compile and self.parallel == "ddp":  # FSDP compiles each Block, never the root with the loss
            loss = tokens * V * (dt + 4)  # the logits and their float32 upcast
        elif self.device_type == "cpu":
            loss = tokens * C * dt + V * C * 4 + min(tokens, LOSS_CHUNK) * V * 4 * (2 if dt == 2 else 1)
        else:  # the accelerator kernel: dx, dW (float32) and one product in the compute dtype, a chunk's float32
            # logits (softmax in place) and their copy in the compute dtype
            loss = tokens * C * dt + Vp * C * (4 + dt) + min(tokens, LOSS_CHUNK_ACCEL) * Vp * (4 + dt)
        # the tied head's gradient exists twice in backward (the LM head's and the embedding's, then their sum)
        tied_grads = 2 * c.padded_vocab_size * C * 4
        return int(tokens * (kept + embed_and_head + backward) + loss + tied_grads)

    def total(self, checkpointing: str | None = None, micro_batch: int | None = None) -> int:
        return self._total(checkpointing, micro_batch, self.reduce_scatter_mode(checkpointing, micro_batch))

    def _total(self, checkpointing, micro_batch, reduce_scatter: str) -> int:
        micro_batch = micro_batch or self.micro_batch
        return (self.params() + self.grads(self.rows_per_process // micro_batch, reduce_scatter) + self.optimizer()
                + self.runtime() + self.activations(checkpointing, micro_batch))

    @property
    def usable(self) -> int | None:
        return None if self.memory is None else int(self.memory * USABLE)

    def fits(self, checkpointing: str | None = None, micro_batch: int | None = None) -> bool | None:
        return None if self.memory is None else self.total(checkpointing, micro_batch) <= self.usable

    def largest_micro_batch(self, checkpointing: str | None = None) -> int | None:
        """The largest micro-batch dividing this process's rows per step that fits (None: none fits or no memory)."""
        if self.memory is None:
            return None
        for b in sorted((d for d in range(1, self.rows_per_process + 1) if self.rows_per_process % d == 0),
                        reverse=True):
            if self.fits(checkpointing, b):
                return b
        return None


def plan_for(model: GPTConfig, cfg, world_size: int, device_type: str, memory: int | None = None,
             memory_source: str = "") -> Plan:
    """The plan of a run with TrainConfig `cfg` on `world_size` processes of `device_type`."""
    from gptrain.train.trainer import grad_accum_steps
    accum = grad_accum_steps(cfg, world_size)
    # auto as the trainer chooses it (planning for a GPU from a machine without one: bf16)
    auto_bf16 = device_type == "cuda" or inference_dtype(device_type) == torch.bfloat16
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if auto_bf16 else "float32")
    compile = cfg.compile if cfg.compile is not None else device_type == "cuda"
    fsdp = cfg.parallel == "fsdp"
    shards = (cfg.fsdp_shard_size or world_size) if fsdp else 1
    if memory is None and cfg.memory:
        memory, memory_source = parse_bytes(cfg.memory), f"--memory {cfg.memory}"
    return Plan(model=model, parallel=cfg.parallel, world_size=world_size, shards=shards,
                micro_batch=cfg.micro_batch_size, seq_len=cfg.seq_len, rows_per_process=cfg.micro_batch_size * accum,
                checkpointing=cfg.activation_checkpointing, compute_bytes=2 if dtype == "bfloat16" else 4,
                mixed_precision=fsdp and device_type == "cuda" and dtype == "bfloat16", compile=compile,
                reshard_after_forward=cfg.reshard_after_forward, device_type=device_type,
                reduce_scatter=cfg.reduce_scatter if fsdp else "last", memory=memory, memory_source=memory_source,
                optimizer_name=getattr(cfg, "optimizer", "adamw"))


def detected_memory(device: str) -> tuple[int | None, str]:
    """(bytes, description) of what one process may use: a CUDA device's memory; on CPU the RAM available now
    (Linux: /proc/meminfo's MemAvailable, or a cgroup's remaining limit if lower), shared by this node's processes;
    (None, '') where it cannot be told."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return None, ""
        props = torch.cuda.get_device_properties(torch.device(device))
        return int(props.total_memory), f"{props.name}, detected"
    if device != "cpu":
        return None, ""
    available = _host_available()
    if available is None:
        return None, ""
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    shared = f", shared by {local} processes" if local > 1 else ""
    return available // local, f"RAM available now{shared}"


def _host_available(meminfo: str = "/proc/meminfo", cgroup: str = "/sys/fs/cgroup") -> int | None:
    """Bytes of RAM this process can still take: MemAvailable, capped by a cgroup v2 limit (max − current)."""
    try:
        fields = dict(line.split(":", 1) for line in Path(meminfo).read_text().splitlines() if ":" in line)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    try:
        limit = Path(cgroup, "memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int(Path(cgroup, "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return max(available, 0)


def describe(p: Plan) -> str:
    """The plan as the table `--plan` prints."""
    c = p.model
    how = (f"fsdp over {p.world_size} process{'es' if p.world_size > 1 else ''} ({p.shards} shards"
           + (f" × {p.world_size // p.shards} replicas" if p.shards != p.world_size else "") + "), "
           + ("reshard after forward" if p.reshard_after_forward else "no reshard after forward")
           if p.parallel == "fsdp" else f"ddp over {p.world_size} process{'es' if p.world_size > 1 else ''}")
    prec = ("bf16 compute, fp32 reduce" if p.mixed_precision else "bf16 autocast" if p.compute_bytes == 2
            else "float32")
    compiled = (", compiled" if p.parallel == "ddp" else ", Blocks compiled") if p.compile else ""
    lines = [f"memory plan for {p.device_type.upper() if p.device_type != 'cpu' else 'the CPU'}: "
             f"{c.n_layer}L/{c.n_head}H/{c.n_embd}C, {p.n_params / 1e6:,.1f}M parameters, "
             f"T={p.seq_len}; {how}; {prec}{compiled}; micro-batch {p.micro_batch} × "
             f"{p.accumulation} accumulation per process",
             f"{'per process':<40}{'checkpointing none':>20}{'checkpointing blocks':>22}"]
    rs = (lambda ck: f" (reduce-scatter {p.reduce_scatter_mode(ck)})") if p.parallel == "fsdp" and p.accumulation > 1 \
        else (lambda ck: "")
    for name, fn in (("parameters", lambda ck: p.params()),
                     ("gradients", lambda ck: p.grads(reduce_scatter=p.reduce_scatter_mode(ck))),
                     (f"optimizer state ({'Muon + AdamW' if p.optimizer_name == 'muon' else 'AdamW'})",
                      lambda ck: p.optimizer()),
                     (f"activations (micro-batch {p.micro_batch})", lambda ck: p.activations(ck)),
                     ("runtime allowance", lambda ck: p.runtime()), ("total", lambda ck: p.total(ck))):
        lines.append(f"  {name:<38}{gib(fn('none')):>20}{gib(fn('blocks')):>22}")
    if p.memory is None:
        lines.append("memory: not known here (pass --memory 80GB) — no micro-batch advice")
    else:
        lines.append(f"memory: {gib(p.memory)} ({p.memory_source}); the plan may fill {USABLE:.0%} = {gib(p.usable)}")
        for ck in ("none", "blocks"):
            chosen = " (this run)" if ck == p.checkpointing else ""
            b = p.largest_micro_batch(ck)
            fit = "fits" if p.fits(ck) else "does not fit"
            best = (f"largest micro-batch that fits: {b} (accumulation {p.rows_per_process // b}"
                    + (f", reduce-scatter {p.reduce_scatter_mode(ck, b)}" if p.parallel == "fsdp" and
                       p.rows_per_process // b > 1 else "") + ")" if b else "no micro-batch fits")
            if b and p.reduce_scatter == "auto" and p.reduce_scatter_mode(ck, b) == "every":
                last = dataclasses.replace(p, reduce_scatter="last").largest_micro_batch(ck)
                best += f"; reduce-scatter on the last micro-step only: {last or 'none fits'}"
            lines.append(f"  checkpointing {ck}{chosen}: micro-batch {p.micro_batch} {fit}{rs(ck)}; {best}")
    return "\n".join(lines)


def advice(p: Plan) -> str:
    """What to change when the plan does not fit: the flag and its value."""
    b = p.largest_micro_batch()
    if b:
        return f"use --micro-batch-size {b} (the largest that fits)"
    tips = []
    if p.checkpointing == "none" and p.largest_micro_batch("blocks"):
        tips.append(f"--activation-checkpointing blocks (then --micro-batch-size up to {p.largest_micro_batch('blocks')})")
    if p.parallel == "ddp":
        tips.append("--parallel fsdp")
    elif p.shards < p.world_size:
        tips.append("--fsdp-shard-size 0 (shard over all processes)")
    tips.append("more processes")
    return "use " + ", or ".join(tips)


def require_fit(model: GPTConfig, cfg, env) -> Plan | None:
    """The run's plan when its memory is known (CUDA, host RAM on Linux, or --memory); GptrainError, one line, when
    it does not fit: stopping before the first step beats the kernel's OOM killer minutes later, without a word."""
    memory, source = (parse_bytes(cfg.memory), f"--memory {cfg.memory}") if cfg.memory else detected_memory(env.device)
    if memory is None:
        return None
    p = plan_for(model, cfg, env.world_size, env.device_type, memory, source)
    if not p.fits():
        small = ("; for a model this CPU trains in minutes: --preset tiny"
                 if env.device_type == "cpu" and p.n_params > 50e6 else "")
        raise GptrainError(f"the memory plan needs {gib(p.total())} per process, more than {USABLE:.0%} of the "
                           f"{gib(memory)} available ({source}): {advice(p)}; `--plan` shows the figures{small}")
    return p
