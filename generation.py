"""The frame loop of MOSS-TTS-Nano over slots: prefill a prompt into slots, then one frame for all of them at once.

A *slot* is one row of the preallocated caches. A *group* is what one upstream `generate` call decodes together: one
or more slots with one set of generation settings and one source of random numbers, which stops when none of its
rows continues. `generate` runs one group of B rows; the engine (engine.py) runs many one-row groups that join and
leave between frames.

One frame (spec tts.md §6.2), for the first N slots together:

    global step (one new row per slot; fixed shape)  ->  local step 0  ->  text head rows 9 / 7  ->  text decision
    ->  ONE host sync: which rows continue, which logits were not finite
    ->  audio noise for the groups that continue  ->  local steps 1..nq, each with its audio head and sampling
    ->  the row each continuing slot feeds to the next global step: [9, frame]

The prompt's last row is fed by the first global step (prefill writes the rows before it), so every frame starts the
same way for every slot. A row that stopped inside a group that goes on feeds a masked pad row, as upstream.

Random numbers: a group draws upstream's shapes from its generator ([rows, 2] for the text decision, then
[rows, codebook] per channel, only once it is known to continue), so `generate` after `torch.manual_seed(s)` draws
exactly what upstream draws, and a group's draws never depend on the other groups (sampling.py).

Nothing here knows about audio, threads or requests: see engine.py for those.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .devices import compile_backend, capture_graph, graph_supported
from .gpt2_decoder import KVCache, attention_function
from .onnx_audio_phase import PhaseInputs, audio_phase_graph
from .onnx_global_step import global_step_graph
from .prefix_store import PrefixStore
from .sampling import (RowSettings, SettingError, SlotSettings, draw_channel_noise, draw_noise, filters_candidates,
                       sample_rows, validate_sampling_args)

logger = logging.getLogger(__name__)

# The local decoder's rows of the 2-way text decision, in upstream's order: index 0 = continue, 1 = stop.
CONTINUE_INDEX, STOP_INDEX = 0, 1
STEP_MODES = ("eager", "compile", "graph")
# Compiled and captured steps read the global cache up to a multiple of this, and run slot counts rounded up to a
# power of two, so that one compile or capture serves many frames.
READ_LENGTH_BUCKET = 256
# The stable code of a group that ended because a logit of it was not finite (FrameOutput.error_code; the engine's
# ErrorEvent.code), and its message (which `inference`'s float32 retry recognises by "Non-finite").
NON_FINITE_LOGITS = "non_finite_logits"
NON_FINITE_MESSAGE = "Non-finite logits during generation (inf or nan); try float32 or another backend"


@dataclass(frozen=True)
class GenerationSettings:
    """The generation arguments of one group (upstream's names; defaults are the model methods', spec §6.4)."""

    nq: int | None = None
    max_new_frames: int = 300
    do_sample: bool = False
    text_temperature: float = 1.5
    text_top_p: float = 1.0
    text_top_k: int = 50
    audio_temperature: float = 1.7
    audio_top_p: float = 0.8
    audio_top_k: int = 25
    audio_repetition_penalty: float = 1.0

    def checked(self, n_vq: int) -> "GenerationSettings":
        """A copy with nq resolved (None -> n_vq), after checking every value.

        Raises:
            SettingError (a ValueError): naming the bad argument and what it accepts.
        """
        nq = n_vq if self.nq is None else self.nq
        if isinstance(nq, bool) or not isinstance(nq, int) or not 1 <= nq <= n_vq:
            raise SettingError("nq", f"nq={self.nq!r}; expected None or an integer in 1..{n_vq}")
        if isinstance(self.max_new_frames, bool) or not isinstance(self.max_new_frames, int) or self.max_new_frames < 0:
            raise SettingError("max_new_frames", f"max_new_frames={self.max_new_frames!r}; expected an integer >= 0")
        for name in ("text_top_k", "audio_top_k"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise SettingError(name, f"{name}={value!r}; expected an integer (0 or less: no top-k filter)")
        validate_sampling_args(self.do_sample, self.text_temperature, name="text_")
        validate_sampling_args(self.do_sample, self.audio_temperature, self.audio_repetition_penalty, name="audio_")
        return GenerationSettings(**{**self.__dict__, "nq": nq})

    def text_row(self) -> tuple:
        return (self.do_sample, self.text_temperature, self.text_top_k, self.text_top_p, 1.0)

    def audio_row(self) -> tuple:
        return (self.do_sample, self.audio_temperature, self.audio_top_k, self.audio_top_p,
                self.audio_repetition_penalty)


@dataclass
class Group:
    """Slots decoded as one generate call.

    Attributes:
        slots: the slot of each row.
        settings: checked GenerationSettings.
        generator: where its random numbers come from (None: the device's global generator).
        frames: frames produced so far.
        finished: per row, whether it chose audio_end (host copy, updated at every sync).
    """

    slots: list[int]
    settings: GenerationSettings
    generator: torch.Generator | None = None
    frames: int = 0
    finished: list[bool] = field(default_factory=list)
    guard: Any = None  # a runaway_guards.RunawayGuard asked after every frame; None (default): no checks

    @property
    def at_limit(self) -> bool:
        return self.frames >= self.settings.max_new_frames

    def rows_of(self, table: torch.Tensor) -> torch.Tensor:
        """The group's rows of a per-slot table [S, ...] -> [rows, ...] (a view: the slots are contiguous)."""
        first = self.slots[0]
        return table[first:first + len(self.slots)]


@dataclass
class FrameOutput:
    """What one frame gave one group.

    Attributes:
        group: the group.
        codes: long [rows, n_vq] on the device (audio pad for rows that stopped and for channels >= nq), or None when
            the group stopped at this frame's decision (no frame is produced then).
        active: per row, whether the row produced this frame (host).
        text_logits: [rows, 2] raw continue/stop logits of this frame's decision (device); None when the group
            ended at its frame limit without a decision.
        error: a message when a logit of this group was not finite.
        done: the group has left the decoder (stopped, failed, or reached max_new_frames).
        error_code: NON_FINITE_LOGITS with an error (a stable name for callers that report or count errors).
    """

    group: Group
    codes: torch.Tensor | None
    active: list[bool]
    text_logits: torch.Tensor | None
    error: str | None = None
    done: bool = False
    error_code: str | None = None


@dataclass
class PromptFill:
    """A prompt being prefilled into one slot (`SlotDecoder.begin`, then `fill` runs its chunks, then `join`).

    Attributes:
        slot: where it goes.
        prompt: long [T, n_vq + 1].
        embedded: [1, T, C], the prompt's input rows.
        attention: the global decoder's attention function.
        shared: leading rows prefilled apart and stored (0: none; a stored prefix already copied in has no chunks).
        chunks: the (first, stop) row ranges still to prefill, in order.
    """

    slot: int
    prompt: torch.Tensor
    embedded: torch.Tensor
    attention: Callable
    shared: int
    chunks: list[tuple[int, int]]

    @property
    def rows_left(self) -> int:
        return sum(stop - first for first, stop in self.chunks)


class PhaseRunner:
    """Runs one fixed-shape phase of the frame loop eagerly, compiled or captured in a device graph.

    A phase is a function without arguments that reads persistent buffers (the caches, the slot tables, the noise)
    and writes persistent buffers, so a compiled or captured version built for one key (rows in use, read length,
    settings flags, ...) is right for every later call with that key, and a graph replay sees the same memory.
    `state` names the tensors the phase mutates besides its outputs (cache positions and key masks, repetition
    history): a capture's warm-up runs are undone by restoring them. Any failure to compile or capture logs one line
    and falls back to eager for good.

    Args:
        name: for log lines ("decision phase", "audio phase").
        mode: one of STEP_MODES.
        device: where the phase runs.
    """

    def __init__(self, name: str, mode: str, device: torch.device) -> None:
        if mode not in STEP_MODES:
            raise ValueError(f"step mode {mode!r}; expected one of {STEP_MODES}")
        self.name, self.mode, self.device = name, mode, device
        self._built: dict[tuple, Callable[[], None]] = {}

    def __call__(self, key: tuple, phase: Callable[[], None], state: tuple = ()) -> None:
        """Run `phase` (or its compiled/captured version built for `key` on the first call with that key)."""
        if self.mode == "eager":
            phase()
            return
        if key not in self._built:
            self._built[key] = self._build(phase, state)
        self._built[key]()

    def _build(self, phase: Callable[[], None], state: tuple) -> Callable[[], None]:
        try:
            if self.mode == "compile":
                compiled = torch.compile(phase, backend=compile_backend(self.device), fullgraph=True, dynamic=False)
                return self._guarded(compiled, phase, state)
            replay = self._capture(phase, state)
        except Exception as error:  # backend-specific errors (dynamo, CUDA graphs, aclgraph): all mean "run eager"
            return self._fall_back(phase, error)
        if replay is None:
            return self._fall_back(phase, RuntimeError(f"no graph capture on {self.device}"))
        return replay

    def _capture(self, phase, state):
        """Capture `phase`, then put back the state its warm-up runs changed (what they wrote elsewhere sits at
        masked positions or in outputs that the real run overwrites)."""
        saved = [tensor.clone() for tensor in state]
        try:
            return capture_graph(self.device, phase)
        finally:
            for tensor, value in zip(state, saved):
                tensor.copy_(value)

    def _guarded(self, compiled, eager, state) -> Callable[[], None]:
        """The compiled phase, whose first call (where compiling happens) falls back to eager on any failure."""
        runner = {"run": None}

        def run() -> None:
            if runner["run"] is not None:
                return runner["run"]()
            saved = [tensor.clone() for tensor in state]
            try:
                compiled()
                runner["run"] = compiled
            except Exception as error:  # see _build
                for tensor, value in zip(state, saved):  # undo whatever the failed call changed
                    tensor.copy_(value)
                runner["run"] = self._fall_back(eager, error)
                eager()

        return run

    def _fall_back(self, eager, error: BaseException) -> Callable[[], None]:
        reason = (str(error).splitlines() or [""])[0]
        logger.warning("%s of the %s failed (%s: %s); running it eagerly", self.mode, self.name,
                       type(error).__name__, reason)
        self.mode = "eager"
        self._built.clear()
        return eager


class SlotDecoder:
    """The caches, per-slot tables and the frame loop for `num_slots` slots of one model.

    Args:
        model: a MossTTSNanoForCausalLM (its device and dtype are used as they are).
        num_slots: rows of the caches.
        capacity: global cache positions per slot (prompt rows + frames).
        attention: (global, local) backend names, resolved for the model's device and dtype.
        step_mode: "eager", "compile" or "graph" (devices.py says whether graphs exist; else eager).
        prefixes: where prompts' shared prefixes are kept (prefix_store.py); None: every prompt is prefilled whole,
            as upstream's generate does.
    """

    def __init__(self, model, num_slots: int, capacity: int, attention: tuple[str, str], step_mode: str = "eager",
                 prefixes: PrefixStore | None = None):
        config = model.config
        self.model = model
        self.n_vq = int(config.n_vq)
        self.num_slots = num_slots
        self.capacity = capacity
        self.codebook = max(config.audio_codebook_sizes)
        self.pad = int(config.audio_pad_token_id)
        weight = model.transformer.ln_f.weight
        self.device = weight.device
        self.local_dtype = model.local_transformer.ln_f.weight.dtype
        if step_mode == "graph" and not graph_supported(self.device):
            logger.warning("graph capture is not available on %s; decode steps run eagerly", self.device)
            step_mode = "eager"
        self.global_cache = KVCache.for_decoder(model.transformer, num_slots, capacity)
        self.local_cache = KVCache.for_decoder(model.local_transformer, num_slots, self.n_vq + 1)
        self.attention = (attention_function(attention[0]), attention_function(attention[1]))
        self.decision_phase = PhaseRunner("decision phase", step_mode, self.device)
        self.audio_phase = PhaseRunner("audio phase", step_mode, self.device)
        graphs = (global_step_graph(model), audio_phase_graph(model)) if step_mode == "eager" else (None, None)
        self.global_graph, self.audio_graph = graphs  # int8 where ONNX Runtime runs them faster (onnx_graph.py)
        self._allocate_tables(model, weight.dtype)
        self.groups: list[Group] = []
        self.prefixes = prefixes

    def _allocate_tables(self, model, dtype) -> None:
        """Per-slot buffers, allocated once (S slots, C hidden, V codebook)."""
        slots, device, hidden = self.num_slots, self.device, model.config.gpt2_config.n_embd
        self.next_input = torch.zeros(slots, 1, hidden, dtype=dtype, device=device)  # the row each slot feeds next
        self.valid = torch.zeros(slots, dtype=torch.bool, device=device)  # whether that row is real
        self.occupied = torch.zeros(slots, dtype=torch.bool, device=device)
        self.finished = torch.zeros(slots, dtype=torch.bool, device=device)
        self.nq = torch.zeros(slots, dtype=torch.long, device=device)
        self.local_input = torch.zeros(slots, 1, hidden, dtype=self.local_dtype, device=device)
        self.channels = torch.arange(self.n_vq, device=device)
        self.tokens = torch.full((slots, self.n_vq), self.pad, dtype=torch.long, device=device)
        self.seen = torch.zeros(slots, self.n_vq, self.codebook, dtype=torch.bool, device=device)
        # float32 row sums of the latest text / audio logits, [1 + n_vq, S]: finite iff every logit is (checked at
        # the next sync); channel-major so that each channel writes a contiguous row.
        self.logit_sums = torch.zeros(1 + self.n_vq, slots, dtype=torch.float32, device=device)
        # Which rows of logit_sums count for each slot: the text row and the channels below the slot's nq (a channel
        # beyond it is computed only when a neighbour's nq reaches it, so checking it would make one request's
        # failure depend on the others).
        self.checked = torch.zeros(1 + self.n_vq, slots, dtype=torch.bool, device=device)
        self.text_noise = torch.ones(slots, 2, dtype=torch.float32, device=device)
        self.audio_noise = torch.ones(self.n_vq, slots, self.codebook, dtype=torch.float32, device=device)
        # Outputs of the decision phase (text logits, choice, should-continue) and of the audio phase (codes).
        self.text_logits = torch.zeros(slots, 2, dtype=self.local_dtype, device=device)
        self.choice = torch.zeros(slots, dtype=torch.long, device=device)
        self.should_continue = torch.zeros(slots, dtype=torch.bool, device=device)
        self.codes = torch.full((slots, self.n_vq), self.pad, dtype=torch.long, device=device)
        self.text_settings = SlotSettings(slots, 2, device)
        self.audio_settings = SlotSettings(slots, self.codebook, device)
        config = model.config
        self.candidates = torch.tensor([config.audio_assistant_slot_token_id, config.audio_end_token_id],
                                       device=device)
        self.text_weight = model.text_lm_head.weight[self.candidates].to(self.local_dtype)  # [2, C]
        self.lengths = [0] * slots  # host: the next global write index of each slot
        self.valid_host = [False] * slots
        self.owner: list[Group | None] = [None] * slots

    # ------------------------------------------------------------------------------------------------------------
    # Joining and leaving

    def free_slots(self) -> list[int]:
        return [slot for slot, owner in enumerate(self.owner) if owner is None]

    @torch.no_grad()
    def start(self, group: Group, prompts: list[torch.Tensor], attention: str, shared_rows: int = 0) -> int:
        """Prefill each row's prompt rows [T, n_vq + 1] (real rows only) into the group's slots; the group joins.

        `begin`, `fill` and `join` in one call (each prompt prefilled in as few chunks as the prefix store allows).

        Args:
            group: with free, contiguous slots, one per prompt, and checked settings (max_new_frames >= 1).
            prompts: long [T_i, n_vq + 1] per row.
            attention: the global decoder's backend name.
            shared_rows: leading rows of each prompt that other prompts share (a voice; `prompting.shared_prefix_
                rows`); with a prefix store they are prefilled apart from the rest, or copied from the store.

        Returns:
            the prompt rows that ran through the decoder (stored prefix rows are not counted).

        Raises:
            ValueError: a prompt longer than the capacity allows with the group's max_new_frames.
        """
        fills = self.begin(group, prompts, attention, shared_rows)
        prefilled = self.fill(fills)
        self.join(group, fills)
        return prefilled

    def begin(self, group: Group, prompts: list[torch.Tensor], attention: str, shared_rows: int = 0,
              chunk_rows: int | None = None) -> list[PromptFill]:
        """Start prefilling the group's prompts (one per slot; arguments as `start`): each slot is forgotten, a
        stored prefix copied in, and the rest cut into chunks that `fill` runs, one call each; `join` then seats
        the group.

        The chunks are rows [a, a + chunk_rows) counted from the start of each part (the shared rows, then the rest),
        so where they fall depends on the prompt alone, never on when `fill` runs them: the same prompt gives the same
        keys and values however its chunks are spread over ticks. chunk_rows None: each part in one call.
        """
        assert group.slots == list(range(group.slots[0], group.slots[0] + len(prompts)))
        assert all(self.owner[slot] is None for slot in group.slots)
        needed = max(prompt.shape[0] for prompt in prompts) + group.settings.max_new_frames
        if needed > self.capacity:
            raise ValueError(f"a prompt of {needed - group.settings.max_new_frames} rows plus max_new_frames="
                             f"{group.settings.max_new_frames} needs {needed} positions; this decoder holds "
                             f"{self.capacity} per stream")
        if chunk_rows is not None and chunk_rows < 1:
            raise ValueError(f"chunk_rows {chunk_rows}; expected a number of rows >= 1, or None")
        return [self._begin_slot(slot, prompt, attention_function(attention), shared_rows, chunk_rows)
                for slot, prompt in zip(group.slots, prompts)]

    def fill(self, fills: list[PromptFill], chunks: int | None = None) -> int:
        """Run up to `chunks` chunks (None: all) of `fills`, in order. Returns the rows that ran."""
        ran = 0
        for prompt_fill in fills:
            while prompt_fill.chunks and (chunks is None or chunks > 0):
                ran += self._fill_chunk(prompt_fill)
                chunks = None if chunks is None else chunks - 1
        return ran

    def join(self, group: Group, fills: list[PromptFill]) -> None:
        """Seat the group whose prompts `fills` holds, all prefilled: its slots run from the next frame."""
        assert not any(prompt_fill.chunks for prompt_fill in fills), "join before every chunk was prefilled"
        group.finished = [False] * len(fills)
        for prompt_fill in fills:
            slot = prompt_fill.slot
            self.next_input[slot] = prompt_fill.embedded[0, -1:]
            self.lengths[slot] = prompt_fill.embedded.shape[1] - 1
            self.valid_host[slot] = True
            self.valid[slot] = self.occupied[slot] = True
            self.owner[slot] = group
        rows = slice(group.slots[0], group.slots[-1] + 1)
        self.text_settings.set(rows, group.settings.text_row())
        self.audio_settings.set(rows, group.settings.audio_row())
        self.nq[rows] = group.settings.nq
        self.checked[0, rows] = True
        self.checked[1:, rows] = (self.channels < group.settings.nq)[:, None]
        self.groups.append(group)

    def rows_to_prefill(self, prompt: torch.Tensor, shared_rows: int = 0) -> int:
        """The rows `start` would run through the decoder for `prompt` now (without counting a store lookup)."""
        shared = self._shared_rows(prompt, shared_rows)
        stored = shared and self.prefixes.peek(prompt[:shared])
        return prompt.shape[0] - 1 - (shared if stored else 0)

    def _shared_rows(self, prompt: torch.Tensor, shared_rows: int) -> int:
        """Rows prefilled apart (0: the prompt is prefilled whole): only with a store, and only before the last row
        (which the first frame feeds)."""
        return shared_rows if self.prefixes is not None and 0 < shared_rows < prompt.shape[0] - 1 else 0

    def _begin_slot(self, slot: int, prompt: torch.Tensor, attention: Callable, shared_rows: int,
                    chunk_rows: int | None) -> PromptFill:
        """Forget slot `slot`, copy a stored prefix in, and list the chunks of the prompt's rows but the last (which
        the first frame feeds)."""
        self._forget(slot)
        embedded = self.model._embed_rows(prompt[None].to(self.device))  # [1, T, C]
        shared, end = self._shared_rows(prompt, shared_rows), prompt.shape[0] - 1
        parts = [(0, shared), (shared, end)] if shared else [(0, end)]
        if shared:
            stored = self.prefixes.find(prompt[:shared])
            if stored is not None:
                self.global_cache.write_prefix(slot, stored.keys, stored.values)
                parts = parts[1:]
        return PromptFill(slot, prompt, embedded, attention, shared, _chunks(parts, chunk_rows))

    def _fill_chunk(self, prompt_fill: PromptFill) -> int:
        """Prefill the next chunk of `prompt_fill`; the chunk that completes a shared prefix stores it."""
        first, stop = prompt_fill.chunks.pop(0)
        self.model.transformer.prefill(prompt_fill.embedded[:, first:stop], self.global_cache, prompt_fill.slot,
                                       prompt_fill.attention, start=first)
        if stop == prompt_fill.shared:
            self.prefixes.add(prompt_fill.prompt[:stop], *self.global_cache.prefix(prompt_fill.slot, stop))
        return stop - first

    def _forget(self, slot: int) -> None:
        """Put everything slot `slot` holds back to its initial value, so that its new owner's codes cannot depend on
        the previous owner (whose logits may have been non-finite).

        Both caches are cleared, values included (`KVCache.clear`): a decode step reads the slot's global cache up to
        the longest row's length, and the local decoder reads all n_vq + 1 positions every step, so stale entries sit
        under the mask, where a stale NaN would still give 0 x NaN. The tables the frame loop writes before it reads
        them are reset too, so that a slot's state at admission is one fixed value. Costs one memset of the slot's
        caches (on a 2-core CPU about 8 ms for the released model in float32 at 1024 positions).
        """
        rows = slice(slot, slot + 1)
        self.global_cache.clear(rows)
        self.local_cache.clear(rows)
        for table, value in ((self.valid, False), (self.occupied, False), (self.finished, False), (self.seen, False),
                             (self.tokens, self.pad), (self.codes, self.pad), (self.text_noise, 1.0),
                             (self.local_input, 0.0), (self.next_input, 0.0), (self.text_logits, 0.0),
                             (self.choice, 0), (self.should_continue, False)):
            table[slot] = value
        for table, value in ((self.logit_sums, 0.0), (self.audio_noise, 1.0), (self.checked, False)):
            table[:, slot] = value

    def finish(self, group: Group) -> None:
        """The group leaves: its slots become free (their cache entries are masked, their sampling settings cleared;
        the next owner clears the rest at admission, `_forget`)."""
        for slot in group.slots:
            self.owner[slot] = None
            self.valid_host[slot] = False
            self.lengths[slot] = 0
        for table in (self.valid, self.occupied):
            group.rows_of(table).fill_(False)
        group.rows_of(self.global_cache.positions).fill_(0)
        rows = slice(group.slots[0], group.slots[-1] + 1)
        self.text_settings.clear(rows)
        self.audio_settings.clear(rows)
        self.groups.remove(group)

    # ------------------------------------------------------------------------------------------------------------
    # One frame

    @torch.no_grad()
    def frame(self) -> list[FrameOutput]:
        """One frame for every group (spec §6.2). Groups that stop, fail or reach their limit leave."""
        rows = self._rows_in_use()
        self._run_decision_phase(rows)
        continues, nonfinite = self._sync(rows)
        text_logits = self.text_logits[:rows].clone()
        outputs = [self._decide(group, continues, nonfinite, text_logits) for group in list(self.groups)]
        going = [output for output in outputs if not output.done]
        if going:
            self._draw_audio_noise([output.group for output in going])
            self._run_audio_phase(rows)
            codes = self.codes[:rows].clone()
            self._advance_host(rows, continues)
            for output in going:
                output.codes = output.group.rows_of(codes)
            guarded = [output for output in going if output.group.guard is not None]
            if guarded:
                self._end_guarded_rows(guarded, codes[:, 0].tolist())
        return outputs + self._retire_at_limit()

    def _end_guarded_rows(self, guarded: list[FrameOutput], channel0: list[int]) -> None:
        """Rows that their group's guard ends are marked finished, so the next decision stops them as if the model
        had chosen to. `channel0`: codebook 0 of every row, one host copy per frame, only when a group is guarded
        (on an accelerator it waits for the frame's audio phase)."""
        for output in guarded:
            first = output.group.slots[0]
            rows = channel0[first:first + len(output.group.slots)]
            for row in output.group.guard.observe(rows, output.active):
                self.finished[first + row] = True

    def _rows_in_use(self) -> int:
        """Rows the frame runs: up to the last occupied slot; compiled and captured steps round that up to a power of
        two (at most num_slots), so that streams joining and leaving reuse a few builds (the extra rows are free
        slots: masked, and cleared by their next owner)."""
        used = max(group.slots[-1] for group in self.groups) + 1
        return used if self.decision_phase.mode == "eager" else min(self.num_slots, 1 << (used - 1).bit_length())

    def _live(self, rows: int) -> list[bool]:
        return [owner is not None for owner in self.owner[:rows]]

    def _read_length(self, rows: int) -> int:
        longest = max(self.lengths[:rows]) + 1
        bucketed = min(self.capacity, -(-longest // READ_LENGTH_BUCKET) * READ_LENGTH_BUCKET)
        return longest if self.decision_phase.mode == "eager" else bucketed

    # The decision phase: global step, local step 0, text head, text decision (everything before the sync).

    def _run_decision_phase(self, rows: int) -> None:
        self._draw_text_noise()
        settings = self.text_settings.rows(rows, self._live(rows))
        read_length = self._read_length(rows)
        key = (rows, read_length, settings.any_sample, settings.all_sample, settings.any_top_p,
               settings.all_top_p, settings.max_top_k, settings.all_top_k, settings.same_top_k)
        state = (self.global_cache.positions, self.global_cache.key_mask, self.local_cache.positions,
                 self.local_cache.key_mask, self.finished)
        self.decision_phase(key, lambda: self._decision(rows, read_length, settings), state)

    def _draw_text_noise(self) -> None:
        for group in self.groups:
            if group.settings.do_sample:
                group.rows_of(self.text_noise).copy_(draw_noise(len(group.slots), 2, group.generator, self.device))

    def _decision(self, rows: int, read_length: int, settings: RowSettings) -> None:
        self.local_cache.reset(slice(0, rows))
        inputs = (self.next_input[:rows], self.valid[:rows], self.global_cache)
        if self.global_graph is None:
            global_hidden = self.model.transformer.decode_step(*inputs, read_length, self.attention[0])
            hidden = self._local_step(rows, global_hidden, 0)
        else:  # the global step and local step 0 in one ONNX Runtime call
            hidden = self.global_graph.step(*inputs, self.local_cache)[1]
        logits = torch.nn.functional.linear(hidden, self.text_weight)
        torch.sum(logits, dim=-1, dtype=torch.float32, out=self.logit_sums[0, :rows])
        self.text_logits[:rows] = logits
        noise = self.text_noise[:rows] if settings.any_sample else None
        choice = sample_rows(logits, settings, noise)
        self.choice[:rows] = choice
        self.should_continue[:rows] = (choice == CONTINUE_INDEX) & ~self.finished[:rows] & self.occupied[:rows]
        self.finished[:rows] |= choice == STOP_INDEX

    def _local_step(self, rows: int, slot_input: torch.Tensor, position: int) -> torch.Tensor:
        """Local decoder step `position` (0: the text decision, c + 1: channel c) of every row: [N, C] -> [N, C]."""
        self.local_input[:rows, 0] = slot_input.to(self.local_dtype)
        return self.model.local_transformer.lockstep_step(self.local_input[:rows], self.local_cache, position,
                                                          self.attention[1])

    def _sync(self, rows: int) -> tuple[list[bool], list[bool]]:
        """The frame's one host sync: per row, whether it continues, and whether a logit of it (this frame's text
        decision, the previous frame's audio channels) was not finite."""
        return tuple(torch.stack((self.should_continue[:rows], self._nonfinite(rows))).tolist())

    def _nonfinite(self, rows: int) -> torch.Tensor:
        """bool [rows]: whether a checked logit sum of the slot (its text row, its channels below nq) is not finite."""
        return (~torch.isfinite(self.logit_sums[:, :rows]) & self.checked[:, :rows]).any(dim=0)

    def _decide(self, group: Group, continues: list[bool], nonfinite: list[bool], text_logits) -> FrameOutput:
        """The group's output of this frame's decision; a group that stops or fails leaves the decoder."""
        active = [continues[slot] for slot in group.slots]
        group.finished = [done or not now for done, now in zip(group.finished, active)]
        output = FrameOutput(group, None, active, group.rows_of(text_logits))
        if any(nonfinite[slot] for slot in group.slots):
            output.error, output.error_code = NON_FINITE_MESSAGE, NON_FINITE_LOGITS
        if output.error is not None or not any(active):
            output.done = True
            self.finish(group)
        else:
            group.frames += 1
        return output

    def _retire_at_limit(self) -> list[FrameOutput]:
        """Groups that just made their max_new_frames-th frame leave, after a check of their last audio logits
        (one extra sync, only at the end of a group)."""
        ended = [group for group in self.groups if group.at_limit]
        if not ended:
            return []
        bad = self._nonfinite(self.num_slots).tolist()
        outputs = []
        for group in ended:
            failed = any(bad[slot] for slot in group.slots)
            self.finish(group)
            outputs.append(FrameOutput(group, None, [False] * len(group.slots), None, NON_FINITE_MESSAGE if failed
                                       else None, done=True, error_code=NON_FINITE_LOGITS if failed else None))
        return outputs

    def _draw_audio_noise(self, groups: list[Group]) -> None:
        """After the sync: each sampling group's noise per channel, in upstream's order (channel 0 first)."""
        for group in groups:
            if group.settings.do_sample:
                nq, rows = group.settings.nq, len(group.slots)
                noise = draw_channel_noise(nq, rows, self.codebook, group.generator, self.device)
                self.audio_noise[:nq, group.slots[0]:group.slots[0] + rows].copy_(noise)

    # The audio phase: local steps 1..nq with the audio heads and sampling, and the next rows (after the sync).

    def _run_audio_phase(self, rows: int) -> None:
        settings = self.audio_settings.rows(rows, self._live(rows))
        nq_max = max(group.settings.nq for group in self.groups)
        if self.audio_graph is not None and self._graph_runs(settings, nq_max):
            self._audio_channels_graph(rows, settings)
            return
        every_row_full = min(group.settings.nq for group in self.groups) == nq_max
        key = (rows, nq_max, every_row_full, settings.any_sample, settings.all_sample, settings.any_top_p,
               settings.all_top_p, settings.max_top_k, settings.all_top_k, settings.same_top_k, settings.any_penalty)
        state = (self.local_cache.positions, self.local_cache.key_mask, self.seen)
        self.audio_phase(key, lambda: self._audio_channels(rows, nq_max, every_row_full, settings), state)

    def _graph_runs(self, settings: RowSettings, nq_max: int) -> bool:
        """Whether the ONNX audio phase covers this frame: every channel, and sampled rows filtered on their top-k
        candidates (the torch phase's `_filter_candidates` path)."""
        return nq_max == self.n_vq and (filters_candidates(settings) or not settings.any_sample)

    def _audio_channels_graph(self, rows: int, settings: RowSettings) -> None:
        """`_audio_channels` in one ONNX Runtime call (onnx_audio_phase.py): the same inputs, codes and bookkeeping."""
        row_embedding = self.model.transformer.wte(self.candidates[self.choice[:rows]])  # [N, C]
        nq_mask = (self.channels < self.nq[:rows, None]).t()[:, :, None].to(row_embedding.dtype)  # [16, N, 1]
        keys, values = self.local_cache.keys[0][:rows, :, :1], self.local_cache.values[0][:rows, :, :1]
        codes, sums, row_embedding = self.audio_graph.run(PhaseInputs(
            row_embedding, keys, values, self.audio_noise[:, :rows], self.seen[:rows], nq_mask, settings.temperature,
            settings.repetition_penalty, settings.top_p, settings.kth, settings.top_p_on, settings.do_sample,
            max(settings.max_top_k, 1)))
        self.tokens[:rows] = codes
        self.seen[:rows].scatter_(2, codes[:, :, None], True)
        self.logit_sums[1:, :rows] = sums.t()
        self._end_audio_phase(rows, row_embedding)

    def _audio_channels(self, rows: int, nq_max: int, every_row_full: bool, settings: RowSettings) -> None:
        """Local steps 1..nq: channel c's head and sampling, fed the previous slot's embedding (spec §6.2); then the
        frame's codes and the row each slot feeds next.

        The next row's embedding, wte(text token) + the channels' code embeddings, is summed in the order
        `_embed_rows` adds them (so it is bit-identical to embedding the row later).
        """
        row_embedding = self.model.transformer.wte(self.candidates[self.choice[:rows]])  # [N, C]
        slot_input = row_embedding
        for channel in range(nq_max):
            logits = self.model.audio_lm_heads[channel](self._local_step(rows, slot_input, channel + 1))  # [N, V]
            torch.sum(logits, dim=-1, dtype=torch.float32, out=self.logit_sums[channel + 1, :rows])
            seen = self.seen[:rows, channel, : logits.shape[-1]]
            noise = self.audio_noise[channel, :rows, : logits.shape[-1]] if settings.any_sample else None
            token = sample_rows(logits, settings, noise, seen)
            seen.scatter_(1, token[:, None], True)
            self.tokens[:rows, channel] = token
            slot_input = self.model.audio_embeddings[channel](token)
            if not every_row_full:  # rows whose nq does not reach this channel add exact zeros (a pad code)
                slot_input = slot_input * (self.nq[:rows, None] > channel).to(slot_input.dtype)
            row_embedding = row_embedding + slot_input
        self._end_audio_phase(rows, row_embedding)

    def _end_audio_phase(self, rows: int, row_embedding: torch.Tensor) -> None:
        """The row each slot feeds next, the frame's codes (pads past a row's nq or where it stopped), validity."""
        self.next_input[:rows, 0] = row_embedding.to(self.next_input.dtype)
        active = self.should_continue[:rows] & self.occupied[:rows]
        keep = (self.channels < self.nq[:rows, None]) & active[:, None]
        self.codes[:rows] = torch.where(keep, self.tokens[:rows], self.pad)
        self.valid[:rows] = active

    def _advance_host(self, rows: int, continues: list[bool]) -> None:
        """The host's copy of each slot's next write index and validity (the device's moved inside the steps)."""
        for slot in range(rows):
            if self.valid_host[slot]:
                self.lengths[slot] += 1
            self.valid_host[slot] = continues[slot] and self.owner[slot] is not None


def _chunks(parts: list[tuple[int, int]], chunk_rows: int | None) -> list[tuple[int, int]]:
    """Row ranges [first, stop) of at most chunk_rows rows (None: one per part), counted from each part's start."""
    chunks = []
    for start, stop in parts:
        step = chunk_rows or max(1, stop - start)
        chunks += [(first, min(first + step, stop)) for first in range(start, stop, step)]
    return chunks


__all__ = ["FrameOutput", "GenerationSettings", "Group", "NON_FINITE_LOGITS", "NON_FINITE_MESSAGE", "PhaseRunner",
           "PromptFill", "SlotDecoder", "STEP_MODES"]
