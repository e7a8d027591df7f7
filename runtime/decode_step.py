"""The device-resident decode step: the backend's run, the sampler and the input advance, on the logits' device.

    start:    sample the prefill's last logits, write the token and the lengths into ``state.inputs``
    advance:  run_decode(state.inputs) -> logits_B1V -> sample -> ids = token, pos/write/nonpad += 1 -> pack

``state.inputs`` is the backend's int64 [4, B] decode input tensor (ids, positions, write indices, valid
lengths), so a step reads what the previous one wrote without leaving the device. Every row advances every
step: a finished row rewrites rows past its output (the loop bounds the steps so nothing passes max_seq) and
the host discards what it makes. Tokens and log-probs of each step are packed into one [2, B] tensor (without
log-probs the token row of the inputs is sent as it is) and reach the host through a ``TokenChannel``: on CUDA a ring of pinned buffers and events, read one step behind,
so the device never waits for the host; on the CPU at once.

On a backend whose decode step may be captured (``Backend.capturable``: ONNX Runtime on CUDA with a dialect
that reads no value on the host), ``advance`` is one CUDA graph replay of the whole step; elsewhere the same
code runs eagerly. At most ``MAX_CAPTURED`` steps are captured per backend (each graph keeps its memory);
later states run eagerly, with one warning. A state keeps its steps (one per sampling config), so a caller
that passes the same state to ``generate`` again replays the same graph.
"""

from __future__ import annotations

import warnings
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .backend import Backend, StepState
from .cuda_graph import CapturedStep, can_capture_generators
from .sampler import Sampler, SamplingConfig

MAX_CAPTURED = 16  # captured decode steps per backend


class TokenChannel:
    """Tokens (and log-probs) of each step, device -> host, in order. ``push`` takes [1, B] int64 token ids or
    [2, B] float64 tokens + log-probs; ``pop`` gives int64 tokens and float32 log-probs (NaN when not sent).
    CPU: read when pushed."""

    lookahead = 0  # steps the loop may launch beyond the one the host reads next

    def __init__(self, batch: int) -> None:
        self._queue: deque[Any] = deque()
        self._nan = np.full(batch, np.nan, dtype=np.float32)
        self._nan.flags.writeable = False  # shared by every step without log-probs

    def clear(self) -> None:
        self._queue.clear()

    def push(self, rows: Any) -> None:
        self._queue.append(rows.numpy().copy())

    def _unpack(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(rows) == 1:  # the int64 token row itself
            return rows[0], self._nan
        return rows[0].astype(np.int64), rows[1].astype(np.float32)

    def pop(self) -> tuple[np.ndarray, np.ndarray]:
        return self._unpack(self._queue.popleft())


class CudaTokenChannel(TokenChannel):
    """A ring of pinned buffers, each filled by an async copy on the step's stream and an event."""

    lookahead = 1

    def __init__(self, batch: int, stream: Any, rows: Any, slots: int = 3) -> None:
        import torch

        super().__init__(batch)
        self._stream = stream
        self._pinned = torch.empty(slots, *rows.shape, dtype=rows.dtype, pin_memory=True)
        self._events = [torch.cuda.Event() for _ in range(slots)]
        self._next = 0

    def push(self, rows: Any) -> None:
        import torch

        slot = self._next % len(self._events)
        self._next += 1
        with torch.cuda.stream(self._stream):
            self._pinned[slot].copy_(rows, non_blocking=True)
            self._events[slot].record(self._stream)
        self._queue.append(slot)

    def pop(self) -> tuple[np.ndarray, np.ndarray]:
        slot = self._queue.popleft()
        self._events[slot].synchronize()
        return self._unpack(self._pinned[slot].numpy().copy())  # the slot is rewritten two steps later


@contextmanager
def _one_cpu_thread() -> Iterator[None]:
    """The step's torch work on [B, V] rows runs on one thread: measured on a busy 2-core machine, torch's OpenMP
    reductions over 2 x 512 logits took 8 ms with 2 threads (waiting for a descheduled one) and 4 us with one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class DecodeStep:
    """One state's decode step for one sampling config (see the module docstring)."""

    def __init__(self, backend: Backend, state: StepState, sampling: SamplingConfig) -> None:
        import torch

        self.backend, self.state, self.config = backend, state, sampling
        device = state.inputs.device
        self.sampler = Sampler(sampling, state.batch, backend.manifest.config.vocab_size, backend="torch",
                               device=device)
        # what reaches the host each step: tokens + log-probs packed [2, B], or the token row of the inputs itself
        # (the copy is queued before the next step rewrites it)
        self._ids, self._lengths = state.inputs[0], state.inputs[1:]  # views made once: the step runs per token
        self._logits: Any = None  # the backend's last [B, 1, V] logits and its [B, V] view
        self._logits_BV: Any = None
        self.packed = torch.zeros(2, state.batch, dtype=torch.float64, device=device) if sampling.logprobs else None
        self.sent = self.packed if sampling.logprobs else state.inputs[:1]
        self.stream = backend.stream or (torch.cuda.current_stream(device) if device.type == "cuda" else None)
        self.channel = (CudaTokenChannel(state.batch, self.stream, self.sent) if device.type == "cuda"
                        else TokenChannel(state.batch))
        self._graph: CapturedStep | None = None
        self._eager_steps = 0

    @classmethod
    def of(cls, backend: Backend, state: StepState, sampling: SamplingConfig) -> "DecodeStep":
        """The state's step for this config, made once and kept in ``state.steps``."""
        step = state.steps.get(sampling)
        if step is None:
            step = state.steps[sampling] = cls(backend, state, sampling)
        return step

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def on_stream(self) -> Any:
        """CUDA: the backend's stream, on which every kernel of the step goes."""
        import contextlib

        import torch

        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def _sampling_ctx(self) -> Any:
        """CPU: the sampler's small [B, V] ops on one thread (the backend's run keeps its own threads)."""
        import contextlib

        return _one_cpu_thread() if self.stream is None else contextlib.nullcontext()

    def start(self, prompts: Sequence[Sequence[int]], last_BV: Any, lens_B: np.ndarray) -> None:
        """Choose token 0 from the prefill's last logits and point the inputs at each sequence's end."""
        import torch

        self.channel.clear()
        self.sampler.reset(prompts)
        lens = torch.from_numpy(np.stack([lens_B, lens_B, lens_B + 1]).astype(np.int64))
        with self.on_stream(), self._sampling_ctx(), torch.no_grad():
            self.state.inputs[1:].copy_(lens.to(self.state.inputs.device, non_blocking=False))
            self._choose(last_BV.to(self.state.inputs.device))
        self.channel.push(self.sent)

    def advance(self, fix: Callable[[Any, Any], None] | None = None) -> None:
        """One decode step on the device; its tokens are queued on the channel. ``fix(logits_BV, ids_B)``, when
        given, runs after the step (outside any captured graph) and may overwrite rows of the chosen tokens
        ``ids_B`` before they are sent and fed to the next step (the scheduler's rows that sample on their own)."""
        import torch

        if self._graph is None and self._should_capture():
            self._capture()
        if self._graph is not None:
            self._graph.replay()
        else:
            with self.on_stream(), torch.no_grad():
                self._body()
            self._eager_steps += 1
        if fix is not None:
            with self.on_stream(), torch.no_grad(), self._sampling_ctx():
                fix(self._logits_BV, self._ids)
                if self.packed is not None:
                    self.packed[0].copy_(self._ids)
        self.channel.push(self.sent)

    def place(self, rows: Sequence[int], inputs_4R: np.ndarray) -> None:
        """Write the decode inputs of some rows (columns of ``state.inputs``: token, position, write index, valid
        length), on the step's stream: a sequence joins (or a free row is rewound) without touching the others,
        so a captured step replays as it is."""
        import torch

        values = torch.from_numpy(np.ascontiguousarray(inputs_4R, dtype=np.int64))
        index = torch.as_tensor(list(rows), dtype=torch.int64)
        with self.on_stream():
            device = self.state.inputs.device
            self.state.inputs.index_copy_(1, index.to(device), values.to(device))

    # ------------------------------------------------------------------------------------------------ body

    def _choose(self, logits_BV: Any) -> None:
        result = self.sampler.sample(logits_BV)
        if self.config.has_penalties:
            self.sampler.observe(result.tokens)
        self._ids.copy_(result.tokens)
        if self.packed is not None:
            self.packed[0].copy_(result.tokens)
            self.packed[1].copy_(result.logprobs)

    def _body(self) -> Any:
        logits = self.backend.run_decode(self.state)
        if logits is not self._logits:  # a backend with a fixed logits buffer returns the same tensor each step
            self._logits, self._logits_BV = logits, logits[:, 0]
        with self._sampling_ctx():
            self._choose(self._logits_BV)
            self._lengths.add_(1)
        return self.sent

    # --------------------------------------------------------------------------------------------- capture

    def _should_capture(self) -> bool:
        # the first decode step runs eagerly: it binds the decode buffers and warms the backend up
        if self._eager_steps < 1 or not self.backend.capturable(self.state):
            return False
        if not self.config.greedy and not can_capture_generators():
            return False
        if self.backend.captured_steps >= MAX_CAPTURED:
            if self.backend.captured_steps == MAX_CAPTURED:
                self.backend.captured_steps += 1
                warnings.warn(f"{self.backend.artifact}: more than {MAX_CAPTURED} decode steps captured on one "
                              f"backend; new states decode without a CUDA graph (pass state= to generate to "
                              f"reuse one)", stacklevel=4)
            return False
        return True

    def _capture(self) -> None:
        import torch

        st = self.sampler._state
        generators = [] if self.config.greedy else [st._gen]
        with torch.no_grad():
            self._graph = CapturedStep(self._body, self.stream, [self.state.inputs, st.counts], generators)
        self.backend.captured_steps += 1
