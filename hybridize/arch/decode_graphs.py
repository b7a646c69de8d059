"""Decode steps of the hybrid model replayed from CUDA graphs.

Why: one decode step of a Llama-3-8B-shaped hybrid launches about 2,000 small kernels; launched one by one from
Python, the GPU is busy 8-10 ms of a 50-65 ms step (bench/profile_decode.py). Replayed from CUDA graphs, the launches
cost almost nothing.

What can be recorded: everything in a decode step has fixed shapes except the sparse layers' cache update and
attention, whose keys grow by one position per step (and whose compressed keys grow as windows fill). So a step is cut
into pieces at the sparse layers (as vLLM's piecewise graphs do):

    piece 0:  embedding, rotary tables, Lightning layers + MLPs, ... the first sparse layer's norm and q/k/v
    (eager)   that sparse layer's cache update and attention
    piece 1:  its output gate, o_proj, residual and MLP, the Lightning layers after it, ... the next sparse q/k/v
    ...
    piece n:  ..., final norm, lm_head

Each piece is one CUDA graph; the sparse attention runs eagerly between them. The graphs read inputs from buffers a
runner owns (token ids, the cache length, left padding, the attention output handed back) and read the previous
piece's outputs where its graph left them; the Lightning states are updated in place, in buffers the runner owns, to
which the cache's `states` point while it decodes through the runner.

`DecodeGraphs` (one per model instance, created lazily) decides per call whether a step may take this path, keeps one
`DecodeRunner` per (batch size, dtype, device), and counts which path each step took. A runner runs its first steps
piece by piece eagerly (Triton compiles there), then records its graphs and replays them. On the CPU, when asked
(`allow_cpu`), the runner runs the same pieces eagerly every step: the segmentation is testable without a GPU.

Copied verbatim into every exported model folder; imports only torch and the sibling files.
"""

from __future__ import annotations

import warnings
import weakref
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import torch

from .cache_hybridize import HybridCache
from .configuration_hybridize import SPARSE
from .ops import lightning_attention

try:  # exported model folder: the in-place decode step of the Lightning kernels
    from .lightning_triton import HAS_TRITON as _STEP_TRITON
    from .lightning_triton import lightning_attn_step_triton
except ImportError:
    try:
        from hybridize.kernels.lightning_triton import HAS_TRITON as _STEP_TRITON
        from hybridize.kernels.lightning_triton import lightning_attn_step_triton
    except ImportError:
        _STEP_TRITON = False

__all__ = ["DecodeGraphs", "DecodePiece", "DecodeRunner", "PieceOutputs", "lightning_step_in_place", "plan_pieces"]

# Steps a runner takes piece by piece before recording. The first compiles the Triton kernels and creates what is made
# on first use (cuBLAS handles, the Lightning decay tables), which a capture must not do; the second is a margin.
WARMUP_STEPS = 2


def lightning_step_in_place(q, k, v, log_decay, scale: float, state: torch.Tensor) -> torch.Tensor:
    """Lightning attention of a few decode tokens q, k, v (B, H, T, D) against `state` (B, H, Dk, Dv) float32, which
    is updated in place: a decode graph's kernels were recorded on that buffer. Returns o (B, H, T, Dv). The same
    kernel (so the same values) as `ops.lightning_attention` for a decode step."""
    if _STEP_TRITON and q.is_cuda:
        return lightning_attn_step_triton(q, k, v, log_decay, state, scale)
    o, new_state = lightning_attention(q, k, v, log_decay, scale=scale, initial_state=state, output_final_state=True)
    state.copy_(new_state)
    return o


# ---------------------------------------------------------------------------------------------------------------------
# The pieces of a step
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodePiece:
    """One fixed-shape stretch of a decode step: finishes the sparse layer `finishes` (output gate, o_proj, residual,
    MLP; None in the first piece, which starts with the embedding and the rotary tables), runs the Lightning layers
    `lightning` whole, then starts the sparse layer `starts` (input norm, q/k/v) or, in the last piece (None), ends
    with the final norm and lm_head."""

    index: int
    finishes: int | None
    lightning: tuple[int, ...]
    starts: int | None


def plan_pieces(layer_types) -> list[DecodePiece]:
    """The pieces of a decode step: one per sparse layer plus the last."""
    pieces, finishes, run = [], None, []
    for i, kind in enumerate(layer_types):
        if kind == SPARSE:
            pieces.append(DecodePiece(len(pieces), finishes, tuple(run), i))
            finishes, run = i, []
        else:
            run.append(i)
    pieces.append(DecodePiece(len(pieces), finishes, tuple(run), None))
    return pieces


@dataclass
class PieceOutputs:
    """What a piece leaves for the eager attention after it and for the next piece."""

    hidden: torch.Tensor  # (B, 1, hidden) residual stream before the started sparse layer (its input)
    sparse_x: torch.Tensor | None = None  # the started sparse layer's normed input (its output gate reads it)
    q: torch.Tensor | None = None  # its queries, keys, values (B, H|Hkv, 1, D)
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, 1, vocab), last piece only


@dataclass
class DecodeIO:
    """The tensors the pieces of one runner read and write. `ids`, `past` and `pad` are buffers the runner writes
    before each step, `attn_out` one it writes between pieces; the rest are set by the pieces (by their recording, when
    replayed: fixed addresses)."""

    ids: torch.Tensor  # (B, 1) the new tokens
    past: torch.Tensor  # (1,) tokens in the cache before this step, padding included
    pad: torch.Tensor  # (B,) left padding of each sequence
    attn_out: torch.Tensor | None = None  # (B, H, 1, D) the last sparse attention's output, handed to the next piece
    positions: torch.Tensor | None = None  # (B, 1) and the rotary tables (B, 1, D), from the first piece
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    outputs: list[PieceOutputs | None] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------------
# One batch size
# ---------------------------------------------------------------------------------------------------------------------
class DecodeRunner:
    """Decode steps of one (batch size, dtype, device) through the pieces of `plan_pieces`; on CUDA recorded as one
    graph per piece after `WARMUP_STEPS` eager steps. The model supplies the pieces' arithmetic (`decode_piece`,
    `decode_attention`); the runner owns the buffers, the binding of a cache to them, the recording and the replay.

    Binding: the graphs update the Lightning states in this runner's buffers, so before a step the cache's `states`
    must be those buffers. A cache whose states are other tensors (after prefill, `reorder_cache`,
    `batch_select_indices`, an eager step) has them copied in; a cache that held the buffers before another cache
    came gets copies of its states back, so two caches never share one buffer."""

    def __init__(self, pieces: list[DecodePiece], lightning_layers: list[int], batch: int, device: torch.device,
                 pool_of) -> None:
        self.pieces = pieces
        self.lightning_layers = lightning_layers
        self.device = device
        self._pool_of = pool_of  # device -> graph memory pool, shared by the model's runners
        with torch.inference_mode(False):  # buffers written in and out of inference mode
            self.io = DecodeIO(ids=torch.zeros(batch, 1, dtype=torch.long, device=device),
                               past=torch.zeros(1, dtype=torch.long, device=device),
                               pad=torch.zeros(batch, dtype=torch.long, device=device),
                               outputs=[None] * len(pieces))
        self.states: dict[int, torch.Tensor] = {}  # layer -> Lightning state buffer, allocated at the first bind
        self.graphs: list | None = None
        self.steps_taken = 0
        self.capture_error: str | None = None
        self._owner = None  # weakref to the cache whose states are the buffers
        self._bound_pad = None  # the cache.pad tensor last copied into io.pad

    # --- binding ---------------------------------------------------------------------------------------------------
    def bind(self, cache: HybridCache) -> str | None:
        """Make `cache` decode through this runner's buffers. Returns why it cannot (the step then runs eagerly;
        whatever was bound so far holds the cache's own values, so the eager step is unaffected), or None."""
        owner = self._owner() if self._owner is not None else None
        if owner is not cache:
            if owner is not None:
                self._release(owner)
            self._owner, self._bound_pad = weakref.ref(cache), None
        for i in self.lightning_layers:
            state, buf = cache.states[i], self.states.get(i)
            if state is buf:
                continue
            if state is None:
                return "a Lightning layer of the cache holds no state"
            if buf is None:
                if self.graphs is not None:  # recorded on other buffers
                    return "the cache's states do not fit the recorded graphs"
                with torch.inference_mode(False):
                    buf = self.states[i] = torch.empty(state.shape, dtype=torch.float32, device=state.device)
            if state.shape != buf.shape or state.device != buf.device:
                return "the cache's Lightning states do not fit this runner"
            buf.copy_(state)
            cache.states[i] = buf
        if cache.pad is not self._bound_pad:
            if cache.pad.shape != self.io.pad.shape:
                return "the cache's batch differs from the input's"
            self.io.pad.copy_(cache.pad)
            self._bound_pad = cache.pad
        return None

    def _release(self, cache: HybridCache) -> None:
        """Give a cache that leaves the buffers its own copies of its states."""
        for i, buf in self.states.items():
            if cache.states[i] is buf:
                cache.states[i] = buf.clone()

    # --- one step --------------------------------------------------------------------------------------------------
    def step(self, model, input_ids: torch.Tensor, cache: HybridCache, capture: bool) -> tuple[torch.Tensor, str]:
        """One decode step of a bound cache: (logits (B, 1, vocab), "graph" or "segmented")."""
        io = self.io
        io.ids.copy_(input_ids)
        io.past.fill_(cache.seq_len)
        if capture and self.graphs is None and self.capture_error is None and self.steps_taken >= WARMUP_STEPS:
            self._record(model, cache)
        replay = self.graphs is not None
        for piece in self.pieces:
            if replay:
                self.graphs[piece.index].replay()
            else:
                model.decode_piece(piece, io, cache)
            if piece.starts is not None:
                self._hand_over(model.decode_attention(piece, io, cache))
        cache.seq_len += 1
        self.steps_taken += 1
        logits = io.outputs[-1].logits
        # a replayed graph writes its logits into the same memory next step: the caller gets its own copy
        return (logits.clone(), "graph") if replay else (logits, "segmented")

    def _hand_over(self, attn: torch.Tensor) -> None:
        """The eager attention's output into the buffer the next piece reads."""
        if self.io.attn_out is None:
            with torch.inference_mode(False):
                self.io.attn_out = torch.empty(attn.shape, dtype=attn.dtype, device=attn.device)
        self.io.attn_out.copy_(attn)

    def _record(self, model, cache: HybridCache) -> None:
        """One CUDA graph per piece, in the order they replay, in the model's shared memory pool. Recording runs no
        kernel: the step goes on by replaying. A failure leaves this runner stepping eagerly, with a warning."""
        graphs = []
        try:
            with torch.cuda.device(self.device):
                pool = self._pool_of(self.device)
                for piece in self.pieces:
                    graph = torch.cuda.CUDAGraph()
                    # thread_local: CUDA work of other threads (a streamer, a data loader) does not break the capture
                    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                        model.decode_piece(piece, self.io, cache)
                    graphs.append(graph)
        except Exception as e:  # noqa: BLE001 - out of memory is re-raised, anything else falls back to eager steps
            if isinstance(e, torch.OutOfMemoryError):
                raise
            self.capture_error = f"{type(e).__name__}: {str(e)[:300]}"
            warnings.warn(f"hybridize: recording the decode step as CUDA graphs failed ({self.capture_error}); "
                          "decoding this batch size without graphs", RuntimeWarning, stacklevel=3)
            return
        self.graphs = graphs


# ---------------------------------------------------------------------------------------------------------------------
# One model
# ---------------------------------------------------------------------------------------------------------------------
def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return compiler is not None and compiler.is_compiling()


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # older torch: no device argument (CUDA)
        return device_type == "cuda" and torch.is_autocast_enabled()


def _hooked(modules) -> bool:
    """Whether forward hooks are registered on any of `modules` or globally: hooks run Python in a forward that a
    replay would skip."""
    nn_module = torch.nn.modules.module
    if getattr(nn_module, "_global_forward_hooks", None) or getattr(nn_module, "_global_forward_pre_hooks", None):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _structure_refusal(model, modules, tensors, device: torch.device) -> str | None:
    """Why the model as built cannot decode through graphs (checked once per new cache, not per step)."""
    if any(t.device != device for t in tensors):
        return "weights on another device than the input, or on several"
    if any(hasattr(m, "_hf_hook") for m in modules):
        return "accelerate hooks (offloading or a device map)"
    if (getattr(model, "peft_config", None) or getattr(model, "_hf_peft_config_loaded", False)
            or any(type(m).__module__.startswith("peft.") for m in modules)):
        return "PEFT adapters (they switch at run time)"
    return None


class DecodeGraphs:
    """The decode-graph machinery of one model instance (`HybridForCausalLM.decode_graphs`).

    `step` runs a decode step through a `DecodeRunner` or refuses it (None: the caller runs its eager forward), for:
    the config switch off, no filled HybridCache, training, autograd, a device other than CUDA (unless `allow_cpu`),
    inside torch.compile (not counted) or a CUDA graph capture, autocast, forward hooks, accelerate hooks, PEFT
    adapters, weights on other devices; argument-level reasons come from the caller. `paths` counts the steps taken
    ("graph", "segmented"), `refusals` the eager ones by reason.

    Runners are kept per (batch, dtype, device), at most `max_runners` (least recently used dropped); each holds the
    Lightning states of one batch in float32 (B x layers x H x D x D) as long as it lives. `reset()` drops them all.
    When a new cache arrives, the model's modules and weights are looked at again: if any was replaced or moved, the
    recorded graphs (which read the old memory) are dropped.
    """

    max_runners = 8

    def __init__(self, *, allow_cpu: bool = False, capture: bool = True) -> None:
        self.allow_cpu = allow_cpu  # run the segmented step on the CPU, never captured (tests of the segmentation)
        self.capture = capture  # False: segmented eager steps on CUDA too (debugging)
        self.paths: Counter = Counter()
        self.refusals: Counter = Counter()
        self._runners: OrderedDict = OrderedDict()
        self._pools: dict = {}
        self._seen = None  # weakref to the last cache inspected for
        self._modules: tuple = ()
        self._signature = None
        self._structure = None  # refusal fixed by the model's structure

    def __deepcopy__(self, memo):  # a copied model records its own graphs
        return DecodeGraphs(allow_cpu=self.allow_cpu, capture=self.capture)

    def __getstate__(self):  # graphs and buffers stay behind when the model is pickled
        return {"allow_cpu": self.allow_cpu, "capture": self.capture}

    def __setstate__(self, state):
        self.__init__(**state)

    def reset(self) -> None:
        """Drop every runner (their graphs, buffers and pools). Caches bound to a runner keep their states."""
        self._runners.clear()
        self._pools.clear()
        self._seen = self._signature = self._structure = None
        self._modules = ()

    @property
    def runners(self) -> dict:
        return dict(self._runners)

    def step(self, model, input_ids, cache, call_refusal: str | None = None) -> torch.Tensor | None:
        """Logits (B, 1, vocab) of one decode step through the pieces (graphs on CUDA), the cache advanced; or None
        when this step must run eagerly (`call_refusal`: the caller's reason about the arguments)."""
        if _compiling():  # torch.compile traces the eager forward: nothing here is touched
            return None
        reason = call_refusal or self._refusal(model, input_ids, cache)
        runner = None
        if reason is None:
            runner = self._runner(model, input_ids)
            reason = runner.bind(cache)
        if reason is not None:
            self.refusals[reason] += 1
            return None
        logits, path = runner.step(model, input_ids, cache, capture=self.capture and input_ids.is_cuda)
        self.paths[path] += 1
        return logits

    def _refusal(self, model, input_ids, cache) -> str | None:
        if not getattr(model.config, "decode_cuda_graphs", True):
            return "switched off (config.decode_cuda_graphs)"
        if getattr(model.config, "lightning_window", 0):  # the window store is rebuilt each step: not graphed yet
            return "Lightning window branch (config.lightning_window)"
        if not isinstance(cache, HybridCache) or cache.seq_len == 0 or cache.pad is None:
            return "no filled HybridCache"
        if model.training:
            return "training"
        if torch.is_grad_enabled():
            return "autograd"
        if input_ids.device.type != "cuda" and not self.allow_cpu:
            return "not on CUDA"
        if input_ids.is_cuda and torch.cuda.is_current_stream_capturing():
            return "inside a CUDA graph capture"
        if _autocast_on(input_ids.device.type):
            return "autocast"
        if self._seen is None or self._seen() is not cache:  # a new generation: look at the model again
            self._inspect(model, input_ids.device)
            self._seen = weakref.ref(cache)
        if self._structure is not None:
            return self._structure
        if _hooked(self._modules):
            return "forward hooks"
        return None

    def _inspect(self, model, device: torch.device) -> None:
        modules = tuple(model.modules())
        tensors = [*model.parameters(), *model.buffers()]
        signature = (tuple(map(id, modules)), tuple((t.data_ptr(), t.dtype) for t in tensors))
        if signature != self._signature:  # replaced or moved weights: the recorded kernels read the old memory
            self._runners.clear()
            self._signature = signature
        self._modules = modules
        self._structure = _structure_refusal(model, modules, tensors, device)

    def _runner(self, model, input_ids) -> DecodeRunner:
        key = (input_ids.shape[0], model.dtype, input_ids.device)
        runner = self._runners.get(key)
        if runner is None:
            types = model.config.layer_types
            lightning = [i for i, kind in enumerate(types) if kind != SPARSE]
            runner = self._runners[key] = DecodeRunner(plan_pieces(types), lightning, input_ids.shape[0],
                                                       input_ids.device, self._pool)
            while len(self._runners) > self.max_runners:
                self._runners.popitem(last=False)
        self._runners.move_to_end(key)
        return runner

    def _pool(self, device: torch.device):
        if device not in self._pools:
            self._pools[device] = torch.cuda.graph_pool_handle()
        return self._pools[device]
