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
from typing import Callable

import torch

from .devices import compile_backend, capture_graph, graph_supported
from .gpt2_decoder import KVCache, attention_function
from .sampling import RowSettings, SettingError, draw_channel_noise, draw_noise, sample_rows, validate_sampling_args

logger = logging.getLogger(__name__)

# The local decoder's rows of the 2-way text decision, in upstream's order: index 0 = continue, 1 = stop.
CONTINUE_INDEX, STOP_INDEX = 0, 1
STEP_MODES = ("eager", "compile", "graph")
# Compiled and captured steps read the global cache up to a multiple of this, and run slot counts rounded up to a
# power of two, so that one compile or capture serves many frames.
READ_LENGTH_BUCKET = 256


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
    """

    group: Group
    codes: torch.Tensor | None
    active: list[bool]
    text_logits: torch.Tensor | None
    error: str | None = None
    done: bool = False


class StepRunner:
    """Runs a decoder's fixed-shape `decode_step` for given (rows, read length): eagerly, compiled or captured.

    Compiled and captured steps are kept per (rows, read length) and read their inputs from the slot tables and write
    their output to a buffer, so a replay sees the same memory every time. Any failure to compile or capture logs one
    line and falls back to the eager step for good.

    Args:
        decoder: a MossTTSNanoGPT2Model.
        cache: its KVCache.
        attention: the resolved attention function.
        mode: one of STEP_MODES.
    """

    def __init__(self, decoder, cache: KVCache, attention: Callable, mode: str = "eager") -> None:
        if mode not in STEP_MODES:
            raise ValueError(f"step mode {mode!r}; expected one of {STEP_MODES}")
        self.decoder, self.cache, self.attention = decoder, cache, attention
        self.mode = mode
        self._built: dict[tuple, Callable[[], torch.Tensor]] = {}

    def __call__(self, inputs: torch.Tensor, valid: torch.Tensor | None, read_length: int) -> torch.Tensor:
        """inputs [N, 1, C], valid bool [N] or None = all real (views of persistent buffers when compiled or
        captured) -> [N, C]."""
        if self.mode == "eager":
            return self.decoder.decode_step(inputs, valid, self.cache, read_length, self.attention)
        key = (inputs.shape[0], read_length, inputs.data_ptr(), None if valid is None else valid.data_ptr())
        if key not in self._built:
            self._built[key] = self._build(inputs, valid, read_length)
        return self._built[key]()

    def _build(self, inputs, valid, read_length) -> Callable[[], torch.Tensor]:
        output = torch.zeros(inputs.shape[0], inputs.shape[-1], dtype=inputs.dtype, device=inputs.device)

        def step() -> torch.Tensor:
            output.copy_(self.decoder.decode_step(inputs, valid, self.cache, read_length, self.attention))
            return output

        try:
            if self.mode == "compile":
                compiled = torch.compile(step, backend=compile_backend(inputs.device), fullgraph=True, dynamic=False)
                return self._guarded(compiled, step)
            replay = self._capture(step, inputs.device)
        except Exception as error:  # backend-specific errors (dynamo, CUDA graphs, aclgraph): all mean "run eager"
            return self._fall_back(step, error)
        if replay is None:
            return self._fall_back(step, RuntimeError(f"no graph capture on {inputs.device}"))
        return lambda: (replay(), output)[1]

    def _capture(self, step, device):
        """Capture `step`; its warm-up runs advance positions and mark keys, so those are put back afterwards (the
        keys the warm-ups wrote sit at masked positions and are overwritten by the real steps)."""
        positions, key_mask = self.cache.positions.clone(), self.cache.key_mask.clone()
        try:
            return capture_graph(device, step)
        finally:
            self.cache.positions.copy_(positions)
            self.cache.key_mask.copy_(key_mask)

    def _guarded(self, compiled, eager) -> Callable[[], torch.Tensor]:
        state = {"run": None}

        def run() -> torch.Tensor:
            if state["run"] is None:
                try:
                    result = compiled()
                    state["run"] = compiled
                    return result
                except Exception as error:  # see _build
                    state["run"] = self._fall_back(eager, error)
                    # The failed call may have advanced positions before failing; compiled graphs mutate only
                    # at their end, so the eager step below sees the same state as the compiled one did.
                    return eager()
            return state["run"]()

        return run

    def _fall_back(self, eager, error: BaseException) -> Callable[[], torch.Tensor]:
        reason = (str(error).splitlines() or [""])[0]
        logger.warning("%s of the decode step failed (%s: %s); running it eagerly", self.mode,
                       type(error).__name__, reason)
        self.mode = "eager"
        return eager


class SlotDecoder:
    """The caches, per-slot tables and the frame loop for `num_slots` slots of one model.

    Args:
        model: a MossTTSNanoForCausalLM (its device and dtype are used as they are).
        num_slots: rows of the caches.
        capacity: global cache positions per slot (prompt rows + frames).
        attention: (global, local) backend names, resolved for the model's device and dtype.
        step_mode: "eager", "compile" or "graph" (devices.py says whether graphs exist; else eager).
    """

    def __init__(self, model, num_slots: int, capacity: int, attention: tuple[str, str], step_mode: str = "eager"):
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
        self.global_step = StepRunner(model.transformer, self.global_cache, attention_function(attention[0]), step_mode)
        self.local_step = StepRunner(model.local_transformer, self.local_cache, attention_function(attention[1]),
                                     step_mode)
        self._allocate_tables(model, weight.dtype)
        self.groups: list[Group] = []

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
        self.logit_sums = torch.zeros(slots, 1 + self.n_vq, dtype=torch.float32, device=device)
        self.text_noise = torch.ones(slots, 2, dtype=torch.float32, device=device)
        self.audio_noise = torch.ones(self.n_vq, slots, self.codebook, dtype=torch.float32, device=device)
        config = model.config
        self.candidates = torch.tensor([config.audio_assistant_slot_token_id, config.audio_end_token_id],
                                       device=device)
        self.text_weight = model.text_lm_head.weight[self.candidates].to(self.local_dtype)  # [2, C]
        self.lengths = [0] * slots  # host: the next global write index of each slot
        self.valid_host = [False] * slots
        self.owner: list[Group | None] = [None] * slots
        default = GenerationSettings()
        self._settings_rows = [(default.text_row(), default.audio_row())] * slots
        self._settings_version = 0
        self._settings = None

    # ------------------------------------------------------------------------------------------------------------
    # Joining and leaving

    def free_slots(self) -> list[int]:
        return [slot for slot, owner in enumerate(self.owner) if owner is None]

    @torch.no_grad()
    def start(self, group: Group, prompts: list[torch.Tensor], attention: str) -> None:
        """Prefill each row's prompt rows [T, n_vq + 1] (real rows only) into the group's slots; the group joins.

        Args:
            group: with free, contiguous slots, one per prompt, and checked settings (max_new_frames >= 1).
            prompts: long [T_i, n_vq + 1] per row.
            attention: the global decoder's backend name.

        Raises:
            ValueError: a prompt longer than the capacity allows with the group's max_new_frames.
        """
        assert group.slots == list(range(group.slots[0], group.slots[0] + len(prompts)))
        assert all(self.owner[slot] is None for slot in group.slots)
        needed = max(prompt.shape[0] for prompt in prompts) + group.settings.max_new_frames
        if needed > self.capacity:
            raise ValueError(f"a prompt of {needed - group.settings.max_new_frames} rows plus max_new_frames="
                             f"{group.settings.max_new_frames} needs {needed} positions; this decoder holds "
                             f"{self.capacity} per stream")
        group.finished = [False] * len(prompts)
        for slot, prompt in zip(group.slots, prompts):
            self._prefill(slot, prompt, attention)
            self.owner[slot] = group
            self._settings_rows[slot] = (group.settings.text_row(), group.settings.audio_row())
        group.rows_of(self.nq).fill_(group.settings.nq)
        self._settings_version += 1
        self.groups.append(group)

    def _prefill(self, slot: int, prompt: torch.Tensor, attention: str) -> None:
        embedded = self.model._embed_rows(prompt[None].to(self.device))  # [1, T, C]
        self.global_cache.reset(slice(slot, slot + 1))
        if prompt.shape[0] > 1:
            self.model.transformer.prefill(embedded[:, :-1], self.global_cache, slot, attention_function(attention))
        self.next_input[slot] = embedded[0, -1:]
        self.lengths[slot] = prompt.shape[0] - 1
        self.valid_host[slot] = True
        for table, value in ((self.valid, True), (self.occupied, True), (self.finished, False), (self.seen, False)):
            table[slot] = value

    def finish(self, group: Group) -> None:
        """The group leaves: its slots become free (their cache entries are masked, never read again)."""
        for slot in group.slots:
            self.owner[slot] = None
            self.valid_host[slot] = False
            self.lengths[slot] = 0
        for table in (self.valid, self.occupied):
            group.rows_of(table).fill_(False)
        group.rows_of(self.global_cache.positions).fill_(0)
        self.groups.remove(group)

    # ------------------------------------------------------------------------------------------------------------
    # One frame

    @torch.no_grad()
    def frame(self) -> list[FrameOutput]:
        """One frame for every group (spec §6.2). Groups that stop, fail or reach their limit leave."""
        rows = self._rows_in_use()
        hidden = self.global_step(self.next_input[:rows], self.valid[:rows], self._read_length(rows))
        text_logits = self._text_logits(rows, hidden)
        choice = self._text_choice(rows, text_logits)
        should_continue = (choice == CONTINUE_INDEX) & ~self.finished[:rows] & self.occupied[:rows]
        self.finished[:rows] |= choice == STOP_INDEX
        continues, nonfinite = self._sync(rows, should_continue)
        outputs = [self._decide(group, continues, nonfinite, text_logits) for group in list(self.groups)]
        going = [output for output in outputs if not output.done]
        if going:
            self._draw_audio_noise([output.group for output in going])
            self._audio_channels(rows, choice)
            codes = self._append(rows, should_continue & self.occupied[:rows], continues)
            for output in going:
                output.codes = output.group.rows_of(codes)
        return outputs + self._retire_at_limit()

    def _rows_in_use(self) -> int:
        return max(group.slots[-1] for group in self.groups) + 1

    def _read_length(self, rows: int) -> int:
        longest = max(self.lengths[:rows]) + 1
        if self.global_step.mode == "eager":
            return longest
        return min(self.capacity, -(-longest // READ_LENGTH_BUCKET) * READ_LENGTH_BUCKET)

    def _text_logits(self, rows: int, hidden: torch.Tensor) -> torch.Tensor:
        """Local step 0 (input: the global hidden state) and the text head's candidate rows -> [N, 2]."""
        self.local_cache.reset(slice(0, rows))
        self.local_input[:rows, 0] = hidden.to(self.local_dtype)
        local_hidden = self.local_step(self.local_input[:rows], None, self.n_vq + 1)
        logits = torch.nn.functional.linear(local_hidden, self.text_weight)
        torch.sum(logits, dim=-1, dtype=torch.float32, out=self.logit_sums[:rows, 0])
        return logits

    def _text_choice(self, rows: int, logits: torch.Tensor) -> torch.Tensor:
        text, _ = self._row_settings(rows)
        if not text.any_sample:
            return sample_rows(logits, text)
        for group in self.groups:
            if group.settings.do_sample:
                group.rows_of(self.text_noise).copy_(draw_noise(len(group.slots), 2, group.generator, self.device))
        return sample_rows(logits, text, self.text_noise[:rows])

    def _sync(self, rows: int, should_continue: torch.Tensor) -> tuple[list[bool], list[bool]]:
        """The frame's one host sync: per row, whether it continues, and whether a logit of it (this frame's text
        decision, the previous frame's audio channels) was not finite."""
        nonfinite = ~torch.isfinite(self.logit_sums[:rows]).all(dim=-1)
        continues, bad = torch.stack((should_continue, nonfinite)).tolist()
        return continues, bad

    def _decide(self, group: Group, continues: list[bool], nonfinite: list[bool], text_logits) -> FrameOutput:
        """The group's output of this frame's decision; a group that stops or fails leaves the decoder."""
        active = [continues[slot] for slot in group.slots]
        group.finished = [done or not now for done, now in zip(group.finished, active)]
        output = FrameOutput(group, None, active, group.rows_of(text_logits))
        if any(nonfinite[slot] for slot in group.slots):
            output.error = "Non-finite logits during generation (inf or nan); try float32 or another backend"
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
        bad = (~torch.isfinite(self.logit_sums).all(dim=-1)).tolist()
        outputs = []
        for group in ended:
            error = None
            if any(bad[slot] for slot in group.slots):
                error = "Non-finite logits during generation (inf or nan); try float32 or another backend"
            self.finish(group)
            outputs.append(FrameOutput(group, None, [False] * len(group.slots), None, error, done=True))
        return outputs

    def _draw_audio_noise(self, groups: list[Group]) -> None:
        """After the sync: each sampling group's noise per channel, in upstream's order (channel 0 first)."""
        for group in groups:
            if group.settings.do_sample:
                nq, rows = group.settings.nq, len(group.slots)
                noise = draw_channel_noise(nq, rows, self.codebook, group.generator, self.device)
                self.audio_noise[:nq, group.slots[0]:group.slots[0] + rows].copy_(noise)

    def _audio_channels(self, rows: int, choice: torch.Tensor) -> None:
        """Local steps 1..nq: channel c's head and sampling, fed the previous slot's embedding (spec §6.2).

        Also sums the embedding of the row each slot appends, wte(text token) + the channels' code embeddings, in
        the order `_embed_rows` adds them (so it is bit-identical to embedding the row later).
        """
        _, audio = self._row_settings(rows)
        nq_max = max(group.settings.nq for group in self.groups)
        every_row_full = min(group.settings.nq for group in self.groups) == nq_max
        row_embedding = self.model.transformer.wte(self.candidates[choice])  # [N, C]
        slot_input = row_embedding
        for channel in range(nq_max):
            self.local_input[:rows, 0] = slot_input.to(self.local_dtype)
            hidden = self.local_step(self.local_input[:rows], None, self.n_vq + 1)
            logits = self.model.audio_lm_heads[channel](hidden)  # [N, V]
            torch.sum(logits, dim=-1, dtype=torch.float32, out=self.logit_sums[:rows, channel + 1])
            seen = self.seen[:rows, channel, : logits.shape[-1]]
            noise = self.audio_noise[channel, :rows, : logits.shape[-1]] if audio.any_sample else None
            token = sample_rows(logits, audio, noise, seen)
            seen.scatter_(1, token[:, None], True)
            self.tokens[:rows, channel] = token
            slot_input = self.model.audio_embeddings[channel](token)
            if not every_row_full:  # rows whose nq does not reach this channel add exact zeros (a pad code)
                slot_input = slot_input * (self.nq[:rows, None] > channel).to(slot_input.dtype)
            row_embedding = row_embedding + slot_input
        self.next_input[:rows, 0] = row_embedding.to(self.next_input.dtype)

    def _append(self, rows: int, active: torch.Tensor, continues: list[bool]) -> torch.Tensor:
        """This frame's codes [N, n_vq] (pad where a row stopped and in channels >= its nq); next rows' validity."""
        keep = (self.channels < self.nq[:rows, None]) & active[:, None]
        codes = torch.where(keep, self.tokens[:rows], self.pad)
        self.valid[:rows] = active
        for slot in range(rows):
            if self.valid_host[slot]:
                self.lengths[slot] += 1
            self.valid_host[slot] = continues[slot] and self.owner[slot] is not None
        return codes

    def _row_settings(self, rows: int) -> tuple[RowSettings, RowSettings]:
        """Text and audio RowSettings of slots [0, rows), rebuilt only when a group has joined since."""
        key = (rows, self._settings_version)
        if self._settings is None or self._settings[0] != key:
            text = RowSettings.build([self._settings_rows[slot][0] for slot in range(rows)], 2, self.device)
            audio = RowSettings.build([self._settings_rows[slot][1] for slot in range(rows)], self.codebook,
                                      self.device)
            self._settings = (key, (text, audio))
        return self._settings[1]


__all__ = ["FrameOutput", "GenerationSettings", "Group", "SlotDecoder", "StepRunner", "STEP_MODES"]
