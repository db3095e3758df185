"""Streaming state for the codec: preallocated ring KV caches, per-stage positions, and the decode session.

Every attention layer of the codec looks back at most `context` tokens (its sliding window), so a stream needs only a
fixed ring of `context + max_tokens_per_step - 1` keys per layer: memory stays flat for any stream length. Each stage
keeps one ring of key positions shared by its layers; the attention mask of a step is derived from those positions
(key <= query and query - key < context), so a ring slot that is empty or stale is masked without any host sync.
Until the ring first wraps, a step attends only the prefix its rows have written (rounded up to FILLED_GRANULE slots,
so that an accelerator sees few distinct shapes): the first seconds of a stream, where most utterances end, cost what
upstream's growing cache costs instead of a whole window. The prefix is a host-side bound (each row's highest slot
written since its reset), so finding it needs no device sync; a row with fewer frames than the step (or none) widens
it only by what it writes, when its frame counts are on the host (a CPU `num_frames`), else by the whole step.

Rows of a batch are independent streams with their own offsets. A step may give rows different frame counts
(`num_frames`): all rows run the longest count, a row with fewer frames advances only by its own count, and the extra
keys it wrote sit at positions that are causally invisible until its next real frames overwrite the same slots (the
ring capacity `context + T - 1` guarantees this for a step of T tokens).

This module knows nothing about weights: the modeling file passes its stacks in (duck-typed: patch modules have
`patch_size` and `is_downsample`; transformer stages have `context`, `num_layers`, `num_heads`, `head_dim`, `dtype`).
The engine's codec (`codec_slots`) is a decode session with one row per engine slot, or, for any object with only
upstream's codec API, a one-slot adapter over its `batch_decode(streaming=True)`.
"""

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# Position of a ring slot that holds nothing yet: far enough in the past to fall outside every window.
EMPTY_POSITION = -(2**40)
# Attended ring prefixes are whole multiples of this many slots (capped at the capacity).
FILLED_GRANULE = 64


class RingKVCache:
    """Preallocated keys/values of one attention layer: k, v [B, H, capacity, Dh]; writes go to `slots`."""

    def __init__(self, batch_size: int, num_heads: int, capacity: int, head_dim: int, dtype, device):
        shape = (batch_size, num_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
              filled: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [N, H, T, Dh] of the first N rows at ring slots [N, T] (all below `filled`); return the first
        `filled` slots of those rows' rings (k, v)."""
        rows = k.shape[0]
        keys, values = self.k[:rows, :, :filled], self.v[:rows, :, :filled]
        if rows == 1:  # one row: a plain index copy, cheaper than scatter
            keys.index_copy_(2, slots[0], k.to(keys.dtype))
            values.index_copy_(2, slots[0], v.to(values.dtype))
        else:
            index = slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            keys.scatter_(2, index, k.to(keys.dtype))
            values.scatter_(2, index, v.to(values.dtype))
        return keys, values


@dataclass
class StepContext:
    """What one streaming step gives a transformer stage.

    positions: [B, T] absolute token positions of the new tokens (RoPE); slots: [B, T] ring slots they go to;
    filled: ring slots attended (a prefix; every written slot is in it); mask: [B, 1, T, filled] bool (True =
    attend), built once for all its layers. Boolean because only a bool mask reaches the Ascend adapter's fused SDPA
    kernel (a float mask takes the math path, npu.md §2.1); caches: one RingKVCache per layer.
    """

    positions: torch.Tensor
    slots: torch.Tensor
    filled: int
    mask: torch.Tensor
    caches: list

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the step's k, v [N, H, T, Dh] in `layer`'s ring; return the attended keys and values."""
        return self.caches[layer].write(k, v, self.slots, self.filled)


class StageState:
    """Ring positions, row offsets and KV caches of one transformer stage."""

    def __init__(self, stage, batch_size: int, tokens_per_frame: int, max_frames_per_step: int, device):
        self.context = stage.context
        self.tokens_per_frame = tokens_per_frame
        self.capacity = stage.context + tokens_per_frame * max_frames_per_step - 1
        self.positions = torch.full((batch_size, self.capacity), EMPTY_POSITION, dtype=torch.long, device=device)
        self.offsets = torch.zeros(batch_size, dtype=torch.long, device=device)
        # Host bounds per row since its reset: its offset, and the end of the slots it has written.
        self.host_offsets, self.written = [0] * batch_size, [0] * batch_size
        self.caches = [
            RingKVCache(batch_size, stage.num_heads, self.capacity, stage.head_dim, stage.dtype, device)
            for _ in range(stage.num_layers)
        ]

    def begin_step(self, num_tokens: int, advance: torch.Tensor | None, rows: int,
                   host_advance: list[int] | None = None) -> StepContext:
        """Register `num_tokens` new tokens for each of the first `rows` rows; they then advance by `advance` [rows]
        tokens (default all); `host_advance` is the same on the host, when known."""
        offsets, positions = self.offsets[:rows], self.positions[:rows]
        steps = torch.arange(num_tokens, device=offsets.device)
        query_pos = offsets[:, None] + steps  # [N, T]
        slots = query_pos % self.capacity
        positions.scatter_(1, slots, query_pos)
        filled = self._filled_after(num_tokens, rows, host_advance)
        distance = query_pos[:, :, None] - positions[:, None, :filled]  # [N, T, filled]
        visible = (distance >= 0) & (distance < self.context)
        offsets += num_tokens if advance is None else advance
        return StepContext(positions=query_pos, slots=slots, filled=filled, mask=visible[:, None], caches=self.caches)

    def _filled_after(self, num_tokens: int, rows: int, host_advance: list[int] | None) -> int:
        """Account this step's writes of the first `rows` rows; the ring prefix that holds every slot they wrote.

        A row writes positions [offset, offset + num_tokens), which sit at the same slots until they pass the
        capacity, so the highest end bounds its used prefix (an upper bound of its offset keeps that true).
        """
        offsets, written = self.host_offsets, self.written
        for row in range(rows):
            written[row] = max(written[row], offsets[row] + num_tokens)
            offsets[row] += num_tokens if host_advance is None else host_advance[row]
        return self.attended(rows)

    def attended(self, rows: int) -> int:
        """Ring slots a step of the first `rows` rows attends: the prefix holding every slot they have written."""
        used = max(self.written[:rows])
        return min(self.capacity, -(-used // FILLED_GRANULE) * FILLED_GRANULE)

    def reset(self, rows: list[int] | None = None) -> None:
        """Forget the history of `rows` (row indices), or of every row: positions, offsets, and the ring keys and
        values themselves (zeros), so that a masked stale value (0 x NaN = NaN) never reaches a new stream."""
        if rows is None:
            self.positions.fill_(EMPTY_POSITION)
            self.offsets.zero_()
            self.host_offsets, self.written = [0] * len(self.written), [0] * len(self.written)
            for cache in self.caches:
                cache.k.zero_()
                cache.v.zero_()
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.offsets.device)
        self.positions[index] = EMPTY_POSITION
        self.offsets[index] = 0
        for cache in self.caches:
            cache.k[index] = 0
            cache.v[index] = 0
        for row in rows:
            self.host_offsets[row] = self.written[row] = 0


class StreamingStack:
    """Streams a stack of patch layers and ProjectedTransformers, `units_per_frame` input tokens per code frame."""

    def __init__(self, modules, batch_size: int, units_per_frame: int, max_frames_per_step: int, device):
        if max_frames_per_step < 1:
            raise ValueError(f"max_frames_per_step={max_frames_per_step}; expected an integer >= 1")
        self.batch_size = batch_size
        self.units_per_frame = units_per_frame
        self.max_frames_per_step = max_frames_per_step
        self.stages = []  # (module, StageState or None for a patch layer)
        self._work = []  # (StageState, flops per frame of its projections, flops per frame per attended key)
        units = units_per_frame
        for module in modules:
            if hasattr(module, "patch_size"):
                units = units // module.patch_size if module.is_downsample else units * module.patch_size
                self.stages.append((module, None))
            else:
                state = StageState(module, batch_size, units, max_frames_per_step, device)
                self.stages.append((module, state))
                weights = sum(parameter.numel() for parameter in module.parameters())
                width = module.num_heads * module.head_dim
                self._work.append((state, 2 * weights * units, 4 * width * module.num_layers * units))

    def step(self, x: torch.Tensor, num_frames: torch.Tensor | None = None,
             host_frames: list[int] | None = None) -> torch.Tensor:
        """Run x [N, F * units_per_frame, C] (the first N rows, F <= max_frames_per_step) through the stack,
        updating those rows' caches; row n advances by num_frames[n] frames (default F), which `host_frames` gives
        on the host when known."""
        frames = x.shape[1] // self.units_per_frame
        assert frames <= self.max_frames_per_step and x.shape[0] <= self.batch_size
        for module, state in self.stages:
            if state is None:
                x = module(x)
                continue
            advance = None if num_frames is None else num_frames * state.tokens_per_frame
            host_advance = None if host_frames is None else [n * state.tokens_per_frame for n in host_frames]
            x = module(x, step=state.begin_step(frames * state.tokens_per_frame, advance, x.shape[0], host_advance))
        return x

    def window_share(self, rows: int) -> float:
        """What a frame of the first `rows` rows costs now against one at full windows (0 < share <= 1), counted in
        multiply-adds from the stages' shapes: 2 per weight of a stage per token, and 4 x width per layer per
        attended key (a step attends each stage's written ring prefix, `StageState.attended`). Streams younger than
        the windows (4-10 s) decode cheaper: on a 2-core CPU, 8-frame calls of 4 rows took 3.5 ms per frame at 0.6 s
        and 5.4 ms from 5 s on, while the time divided by this share stayed within 5.1-6.0 ms. Read from host-side
        bounds: no device sync."""
        now = full = 0.0
        for state, projections, per_key in self._work:
            now += projections + per_key * state.attended(rows)
            full += projections + per_key * state.capacity
        return now / full

    def reset(self, rows: list[int] | None = None) -> None:
        for _, state in self.stages:
            if state is not None:
                state.reset(rows)


class CodecDecodeSession:
    """Streaming decoder of a `MossAudioTokenizerModel`: codes in, audio out, bounded memory for any length.

    Create it with `model.decode_session(batch_size)`. Each `step` may carry any number of frames; they are decoded
    in passes of up to `max_frames_per_step` frames (not one frame at a time), and the concatenated outputs equal
    the offline `decode` of the concatenated codes (to float rounding).
    """

    def __init__(self, model, batch_size: int = 1, max_frames_per_step: int = 8):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; expected an integer >= 1")
        device = model.quantizer.input_proj.bias.device
        self._model = model
        self._tables = model.quantizer.decode_tables()  # folded weight norm, fixed for the session
        self._stream = StreamingStack(model.decoder, batch_size, 1, max_frames_per_step, device)
        self.frames_decoded = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def batch_size(self) -> int:
        return self._stream.batch_size

    @property
    def max_frames_per_step(self) -> int:
        return self._stream.max_frames_per_step

    @torch.no_grad()
    def step(self, codes: torch.Tensor, num_frames: torch.Tensor | None = None,
             codebooks: torch.Tensor | None = None) -> torch.Tensor:
        """Decode the next frames of the first N rows (N = codes.shape[1]; rows >= N are left as they are).

        Args:
            codes: [nq, N, T] integer codes, 1 <= nq <= num_quantizers (the first nq codebooks).
            num_frames: optional [N] long; row n uses only its first num_frames[n] frames (0 = no new frames). Its
                audio past num_frames[n] * hop is zero. Pass it on the CPU (any device works): the host then knows
                each row's writes and the attended ring prefix widens only by them.
            codebooks: optional [N] long; row n decodes only its first codebooks[n] codebooks (its other codes
                are ignored, so any value may stand there).
        Returns:
            audio [N, channels, T * hop] in the decoder's dtype.
        """
        if codes.dim() != 3 or not 1 <= codes.shape[1] <= self.batch_size:
            raise ValueError(f"codes shape {tuple(codes.shape)}; expected [nq, rows <= {self.batch_size}, frames]")
        rows = codes.shape[1]
        on_host = num_frames is not None and num_frames.device.type == "cpu"
        host_frames = num_frames.tolist() if on_host else None
        pieces = []
        for start in range(0, codes.shape[2], self.max_frames_per_step):
            chunk = codes[:, :, start : start + self.max_frames_per_step]
            chunk_frames = chunk_host = None
            if num_frames is not None:
                chunk_frames = (num_frames.to(codes.device) - start).clamp(0, chunk.shape[2])
            if host_frames is not None:
                chunk_host = [min(max(frames - start, 0), chunk.shape[2]) for frames in host_frames]
            pieces.append(self._step_chunk(chunk, chunk_frames, chunk_host, codebooks))
        if not pieces:
            return self._model.empty_audio(rows)
        return torch.cat(pieces, dim=-1)

    def _step_chunk(self, codes: torch.Tensor, num_frames: torch.Tensor | None, host_frames: list[int] | None,
                    codebooks) -> torch.Tensor:
        model, rows = self._model, codes.shape[1]
        latent = model.quantizer.decode(codes, self._tables, codebooks)  # [N, T, D] fp32
        audio = model.deinterleave(self._stream.step(latent, num_frames, host_frames))
        if num_frames is None:
            self.frames_decoded[:rows] += codes.shape[2]
            return audio
        self.frames_decoded[:rows] += num_frames
        valid = torch.arange(audio.shape[-1], device=audio.device) < (num_frames * model.downsample_rate)[:, None]
        return audio * valid[:, None, :]

    def window_share(self, rows: int) -> float:
        """The cost of a frame of the first `rows` rows now against one at full windows (StreamingStack)."""
        return self._stream.window_share(rows)

    def reset(self, rows=None) -> None:
        """Start fresh streams: every row, or only `rows` (an int list or long tensor)."""
        if rows is None:
            self.frames_decoded.zero_()
        else:
            rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1).tolist()
            if not all(0 <= row < self.batch_size for row in rows):
                raise ValueError(f"rows={rows}; expected indices in [0, {self.batch_size})")
            self.frames_decoded[torch.tensor(rows, dtype=torch.long, device=self.frames_decoded.device)] = 0
        self._stream.reset(rows)


class UpstreamBatchDecode:
    """Upstream `batch_decode(streaming=True)` semantics over a `CodecDecodeSession` with a fixed number of slots.

    Logical row i of each call is a persistent stream. A call with more rows than are active appends fresh rows at
    the tail; `finalize_indices` rows are decoded one last time, then evicted (later rows move up, as in a list).
    """

    def __init__(self, session: CodecDecodeSession):
        self.session = session
        self.row_slots: list[int] = []

    def _free_slot(self) -> int:
        used = set(self.row_slots)
        for slot in range(self.session.batch_size):
            if slot not in used:
                return slot
        raise ValueError(
            f"streaming batch_decode: {len(self.row_slots) + 1} rows exceed max_batch_size={self.session.batch_size}"
        )

    def _admit(self, num_rows: int) -> None:
        if num_rows < len(self.row_slots):
            raise ValueError(
                f"streaming batch_decode got {num_rows} rows but {len(self.row_slots)} streams are active; pass an "
                "empty (nq, 0) tensor for a row without new frames, or finalize it"
            )
        while len(self.row_slots) < num_rows:
            slot = self._free_slot()
            self.session.reset([slot])
            self.row_slots.append(slot)

    def decode(self, codes_list: list, finalize_indices=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode each row's new frames. Returns audio [rows, channels, max_frames * hop] and lengths [rows]."""
        self._admit(len(codes_list))
        session, device = self.session, self.session.frames_decoded.device
        nq = codes_list[0].shape[0]
        frames = [int(codes.shape[-1]) for codes in codes_list]
        rows = max(self.row_slots) + 1  # slots past every stream's stay out of the step
        batch = torch.zeros(nq, rows, max(frames), dtype=torch.long, device=device)
        num_frames = torch.zeros(rows, dtype=torch.long)  # on the host: the session then knows each row's writes
        for row, codes in enumerate(codes_list):
            slot = self.row_slots[row]
            batch[:, slot, : frames[row]] = codes.to(device)
            num_frames[slot] = frames[row]
        audio = session.step(batch, num_frames)[self.row_slots[: len(codes_list)]]
        hop = session._model.downsample_rate
        lengths = torch.tensor(frames, dtype=torch.long, device=device) * hop
        for row in sorted(set(finalize_indices or []), reverse=True):
            if not 0 <= row < len(self.row_slots):
                raise ValueError(f"finalize_indices has {row}; expected indices of the {len(self.row_slots)} rows")
            session.reset([self.row_slots.pop(row)])
        return audio, lengths


# ----------------------------------------------------------------------------------------------------------------
# The engine's codec: one streaming row per engine slot

# Frames a slot session decodes per pass (its rings hold the window plus this many frames of tokens).
CODEC_FRAMES_PER_PASS = 8


class CodecSlots:
    """The codec's streaming decode session with one row per engine slot (a row's state is that slot's stream).

    Args:
        codec: a MossAudioTokenizerModel (its decode_session API).
        num_slots: rows.
        n_vq: codebooks of the TTS frames.
    """

    def __init__(self, codec, num_slots: int, n_vq: int) -> None:
        self.session = codec.decode_session(num_slots, max_frames_per_step=CODEC_FRAMES_PER_PASS)
        self.device = self.session.frames_decoded.device
        self.hop = int(codec.downsample_rate)
        self.rate = int(getattr(codec, "sampling_rate", None) or getattr(codec, "sample_rate", 48000))
        self.channels = int(getattr(codec, "number_channels", 2))
        self.n_vq = n_vq

    def reset(self, slot: int) -> None:
        self.session.reset([slot])

    def window_share(self, rows: int) -> float:
        """What a frame of a call over the first `rows` slots costs now against one at full attention windows."""
        return self.session.window_share(rows)

    def close(self) -> None:
        """Nothing to release (the session's caches go with it)."""

    def decode(self, work: dict[int, tuple[torch.Tensor, int]]) -> dict[int, torch.Tensor]:
        """One batched call: {slot: (codes [T, n_vq], nq)} -> {slot: float32 CPU audio [C, T * hop]}."""
        rows = max(work) + 1
        longest = max(codes.shape[0] for codes, _ in work.values())
        batch = torch.zeros(self.n_vq, rows, longest, dtype=torch.long, device=self.device)
        frames = torch.zeros(rows, dtype=torch.long)  # stays on the host (see CodecDecodeSession.step)
        codebooks = torch.full((rows,), self.n_vq, dtype=torch.long)
        for slot, (codes, nq) in work.items():
            batch[:, slot, : codes.shape[0]] = codes.t().to(self.device)
            frames[slot], codebooks[slot] = codes.shape[0], nq
        nq_max = int(codebooks.max())
        mixed = bool((codebooks[list(work)] != nq_max).any())
        audio = self.session.step(batch[:nq_max], frames, codebooks.to(self.device) if mixed else None)
        audio = audio.to("cpu", torch.float32)
        return {slot: audio[slot, :, : work[slot][0].shape[0] * self.hop] for slot in work}


class UpstreamCodecSlot:
    """One slot over any codec with upstream's API only (`batch_decode(..., streaming=True, reset_stream=...)`),
    for a one-slot engine (inference_stream with a caller's codec object)."""

    def __init__(self, codec) -> None:
        self.codec = codec
        self.hop = int(codec.downsample_rate)
        self.rate = int(getattr(codec, "sampling_rate", None) or getattr(codec, "sample_rate", 48000))
        self.channels = int(getattr(codec, "number_channels", 2))
        self._reset_next = True

    def reset(self, slot: int) -> None:
        self._reset_next = True

    def window_share(self, rows: int) -> float:
        """Unknown for an upstream-API codec: every frame counts as one at full windows."""
        return 1.0

    def decode(self, work: dict[int, tuple[torch.Tensor, int]]) -> dict[int, torch.Tensor]:
        (codes, nq), = work.values()
        output = self.codec.batch_decode([codes[:, :nq].t().contiguous()], num_quantizers=nq, streaming=True,
                                         max_batch_size=1, reset_stream=self._reset_next)
        self._reset_next = False
        audio = getattr(output, "audio", None)
        audio = output[0] if audio is None else audio
        return {0: audio[0, :, : codes.shape[0] * self.hop].detach().to("cpu", torch.float32)}

    def close(self) -> None:
        """Close the codec's streams (upstream `_reset_batch_decode_streaming_state`)."""
        reset = getattr(self.codec, "_reset_batch_decode_streaming_state", None)
        if reset is not None:
            reset()


def codec_slots(codec, num_slots: int, n_vq: int):
    """Our codec's slot session, or, for an object with only upstream's API, a one-slot adapter.

    Raises:
        ValueError: an upstream-API codec with more than one slot.
    """
    if hasattr(codec, "decode_session"):
        return CodecSlots(codec, num_slots, n_vq)
    if num_slots != 1:
        raise ValueError(f"num_slots={num_slots}: a codec without decode_session (upstream's API only) can serve one "
                         "slot; pass our MossAudioTokenizerModel for more")
    return UpstreamCodecSlot(codec)
