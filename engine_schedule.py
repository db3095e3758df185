"""How the speech engine spends a tick: codec work by each stream's playback deadline, and admission by capacity.

Every running stream gets one LM frame per tick (one fixed-shape step for all rows), so what the engine chooses is
when the codec runs, with how many frames per call, and when a waiting request may join.

Playback clock and slack. A stream's playback starts with its first audio; its *slack* is the audio it has received
ahead of that clock (received seconds minus seconds since the first audio). It underruns when its slack goes below 0.

Codec work (`DeadlinePolicy`). The codec costs a lot per call and less per frame as a call carries more frames (on a
2-core CPU about 26 ms for 1 frame, 80 ms for 8), so frames wait in the stream's pending list until one of these
holds, and then ONE batched call decodes every stream's pending frames (up to a full call each, `ride_along`):
  * the stream has no audio yet and has the frames of its first audio: one frame where the machine is fast enough,
    else the fewest frames whose playback covers its next codec cycle of CATCH_UP_FRAMES frames (`first_frames`; 2-5
    on a 2-core CPU), so that the stream can let later frames gather instead of staying one frame from underrun;
  * it has a full call's frames pending (CODEC_FRAMES_PER_CALL);
  * waiting one more tick would leave it less than UNDERRUN_MARGIN_SECONDS of slack when its audio arrives, were the
    host HOST_SLOWDOWN slower than the measured LM tick and codec call times (`EngineCosts`);
  * it is behind playback already (the host slowed down) and has CATCH_UP_FRAMES pending: calls of a few frames
    let it catch up, where one frame per tick would keep it behind.
A stream close to underrunning is thus decoded with the frames it has, and streams with slack ride along or wait
for fuller calls; under load the calls grow instead of shrinking (upstream's lead policy, `StreamDecodePolicy`,
decodes one frame per call once a stream is behind, which keeps it behind).

Admission (`admission_refusal`). A waiting request joins only when the machine can keep every admitted stream
ahead of playback: the tick with one more stream, once every window is full (the predicted LM step and codec share
plus the measured excess, or with the small codec calls a newcomer asks for until it has slack, `EngineCosts`), stays
within REALTIME_SHARE of a frame's duration, at most one prefill call runs per tick while streams are playing (the
per-tick prefill budget: a prompt's part, or a chunk of it with the engine's prefill_chunk_rows, and none while
another prompt's chunks are still running), every playing stream has the slack to absorb the newcomer's prefill
call and first frame, and SETTLE_CODEC_CALLS codec calls have measured the rows the last newcomer added.
Otherwise it waits in the queue (under the server's queue deadline) and the engine names why (WAIT_REASONS).

The costs are measured online (exponentially weighted linear fits), so the same rules hold on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

# Frames one codec call carries at most (a full call); the slot session decodes them in one pass.
CODEC_FRAMES_PER_CALL = 8
# Frames per call for a stream already behind playback: one-frame calls cost the most per frame, so a stream that
# took them whenever it was behind would stay behind (upstream's lead policy under load); these catch up.
CATCH_UP_FRAMES = 4
# Slack a stream must keep when its next audio arrives (host jitter, a slower tick than predicted).
UNDERRUN_MARGIN_SECONDS = 0.03
# Weight of the latest tick in the measured excess (about the last 16 ticks count: two full codec calls).
TICK_WEIGHT = 1 / 16
# How much slower than measured the host may turn: a shared 2-core VM's speed swings that much between minutes (the
# same 4-stream load took 60 ms ticks in one run and 84 ms in the next; the LM step of one tick 25 ms, of the next
# 39 ms). A stream is decoded while its slack still covers waiting one more tick that much slower, and its first
# audio covers its next codec cycle that much slower.
HOST_SLOWDOWN = 1.25
# A steady tick may take at most this share of a frame's duration when a stream is admitted, so that a host
# HOST_SLOWDOWN slower still keeps every stream ahead (at 0.9, the streams it let in underran here).
REALTIME_SHARE = 1 / HOST_SLOWDOWN
# Codec calls measured since the last join before the next request may join a playing engine: the costs of the rows
# that run now are then known, not extrapolated from fewer rows (five joins within 0.8 s on a 2-core CPU, each on the
# costs measured before the last, made ticks 30% longer than predicted and every stream underran).
SETTLE_CODEC_CALLS = 2
# Why a request waits in the queue (engine.waiting_by_reason, the server's /metrics).
NO_FREE_SLOT = "no_free_slot"
PREFILL_BUDGET = "prefill_budget"
KEEPING_STREAMS_AHEAD = "keeping_streams_ahead"
PROTECTING_SLACK = "protecting_slack"
WAIT_REASONS = (NO_FREE_SLOT, PREFILL_BUDGET, KEEPING_STREAMS_AHEAD, PROTECTING_SLACK)


class LinearCost:
    """seconds ~ intercept + slope * size, fitted online with exponential forgetting (recent calls weigh most).

    Until sizes vary, the one size seen is split by `fixed_share` (the share of its time assumed per call).
    """

    def __init__(self, fixed_share: float, weight: float = 0.2) -> None:
        self.fixed_share, self.weight = fixed_share, weight
        self.count, self.x, self.y, self.xx, self.xy = 0, 0.0, 0.0, 0.0, 0.0

    def add(self, size: float, seconds: float) -> None:
        w = 1.0 if self.count == 0 else self.weight
        self.x += w * (size - self.x)
        self.y += w * (seconds - self.y)
        self.xx += w * (size * size - self.xx)
        self.xy += w * (size * seconds - self.xy)
        self.count += 1

    def predict(self, size: float) -> float:
        """Predicted seconds (0 before any measurement)."""
        if self.count == 0:
            return 0.0
        variance = self.xx - self.x * self.x
        if variance > 1e-6 * max(1.0, self.x * self.x):
            slope = max(0.0, (self.xy - self.x * self.y) / variance)
            intercept = max(0.0, self.y - slope * self.x)
        else:
            intercept = self.fixed_share * self.y
            slope = (self.y - intercept) / max(self.x, 1e-9)
        return intercept + slope * size


class EngineCosts:
    """Measured costs of the engine's work: the LM step by rows, codec calls by rows x frames, prefill by rows.

    Codec calls are fitted as if every window were full: a call's rows x frames count at the codec's
    `window_share` (a young stream attends a short history and decodes up to ~2x cheaper per frame), so the
    prediction is what the streams will cost once their windows fill, seconds later. Admitting on a young stream's
    cost let five streams in on a 2-core CPU whose ticks then grew from 64 to 88 ms per 80 ms frame, and every one
    underran. What the fits miss (host work, codec calls smaller than full ones) is the measured *excess*: the mean
    of each tick's seconds minus the prediction for the rows it ran, so it stays true when streams leave (a plain
    mean tick kept the rows that had left for ~40 ticks). Ticks count the LM step, the codec calls and host work,
    not prefill or priming, which are budgeted per tick (PREFILL_BUDGET, PROTECTING_SLACK): a first tick holding a
    whole prompt's prefill kept a plain mean above the bound for ~40 ticks while one stream played at half real time.
    """

    def __init__(self) -> None:
        self.lm = LinearCost(fixed_share=0.7)
        self.codec = LinearCost(fixed_share=0.5)  # sizes in frames at full windows (above)
        self.prefill = LinearCost(fixed_share=0.0)
        self.excess: Optional[float] = None  # mean seconds a tick took beyond steady_tick (None: none measured)
        self.codec_share = 1.0  # the codec's window share now (the engine sets it before it decides)
        self.codec_calls_since_join = SETTLE_CODEC_CALLS

    def add_codec_call(self, frames: float, seconds: float) -> None:
        """A codec call of `frames` (rows x frames at full windows) took `seconds`."""
        self.codec.add(frames, seconds)
        self.codec_calls_since_join += 1

    def joined(self) -> None:
        """A request joined: the rows that run from now on are not measured yet."""
        self.codec_calls_since_join = 0

    def codec_now(self, frames: float) -> float:
        """Seconds of a codec call of `frames` (rows x frames) at the streams' current window share: what a call
        made now costs (when a stream's audio arrives), where `codec.predict` is the cost once the windows fill."""
        return self.codec.predict(frames * self.codec_share)

    def add_tick(self, seconds: float, rows: int) -> None:
        """A tick that ran `rows` rows took `seconds` (LM step, codec calls, host work)."""
        if self.lm.count == 0 or self.codec.count == 0:
            return
        excess = seconds - self.steady_tick(rows)
        self.excess = excess if self.excess is None else self.excess + TICK_WEIGHT * (excess - self.excess)

    def tick_after_join(self, rows: int) -> float:
        """Seconds per tick once a stream joins and `rows` run: the prediction with the measured excess, or the
        prediction of a tick of CATCH_UP_FRAMES-frame codec calls, whichever is larger. The newcomer starts with
        little slack and asks for a call every few ticks, and the playing streams' frames ride along in those calls,
        so until it has built slack every stream's frames go out in small calls (a tick that only fits with full
        calls leaves it at zero slack, underrunning; seen on a 2-core CPU)."""
        measured = self.steady_tick(rows) + (self.excess or 0.0)
        return max(self.steady_tick(rows, CATCH_UP_FRAMES), measured)

    def steady_tick(self, rows: int, frames_per_call: int = CODEC_FRAMES_PER_CALL) -> float:
        """Seconds per tick with `rows` streams when every codec call carries `frames_per_call` frames of each: the
        LM step plus a call's share."""
        return self.lm.predict(rows) + self.codec.predict(rows * frames_per_call) / frames_per_call


@dataclass(frozen=True)
class DeadlinePolicy:
    """Codec calls by playback deadline (module docstring); `frames_wanted` is the engine's question per stream."""

    max_frames: int = CODEC_FRAMES_PER_CALL
    margin_seconds: float = UNDERRUN_MARGIN_SECONDS
    # A waiting request joins only while the machine can keep the playing streams ahead (admission_refusal).
    admits_by_capacity: bool = True

    def frames_wanted(self, pending: int, slack: Optional[float], costs: EngineCosts, rows: int,
                      frame_seconds: float) -> int:
        """Frames of this stream to decode now (0: wait). slack None: no audio yet."""
        if slack is None:
            return pending if pending >= self.first_frames(costs, rows, frame_seconds) else 0
        if pending >= self.max_frames:
            return self.max_frames
        if slack < 0:  # behind already: calls of CATCH_UP_FRAMES cost less per frame than one frame a tick
            return pending if pending >= CATCH_UP_FRAMES else 0
        return pending if slack < HOST_SLOWDOWN * self.wait_cost(costs, rows, pending) + self.margin_seconds else 0

    def ride_along(self, longest: int) -> int:
        """Frames a stream that did not ask takes into a call that runs `longest` frames: all it has, up to a full
        call, so that after a call every stream's pending list is empty and their calls stay in step (a stream left
        with a remainder would ask for a small call of its own a tick later)."""
        return max(longest, self.max_frames)

    @staticmethod
    def wait_cost(costs: EngineCosts, rows: int, pending: int) -> float:
        """Seconds until a stream's audio arrives if it waits one more tick: the LM step, then a call of one more."""
        return costs.lm.predict(rows) + costs.codec_now(rows * (pending + 1))

    def first_frames(self, costs: EngineCosts, rows: int, frame_seconds: float) -> int:
        """Frames of the first audio: the fewest whose playback outlasts the LM steps of CATCH_UP_FRAMES more frames
        and their codec call, so that the stream can let its later frames gather into calls of several frames (1
        where that takes less than a frame, e.g. on an accelerator or before anything is measured; 2 for one stream
        on a 2-core CPU, 4 beside four others). With only the frames for the next tick and a tick of waiting (2 on
        a 2-core CPU beside four streams), a prediction a little low left a newcomer 0.15 s ahead of playback,
        asking for a one-frame call of every row each tick: 84 ms ticks per 80 ms frame, and it underran."""
        cycle = HOST_SLOWDOWN * (CATCH_UP_FRAMES * costs.lm.predict(rows) + costs.codec_now(rows * CATCH_UP_FRAMES))
        return min(self.max_frames, max(1, math.ceil((cycle + self.margin_seconds) / frame_seconds - 1e-9)))


@dataclass(frozen=True)
class StreamDecodePolicy:
    """Upstream's lead-based codec budget: when a stream's pending frames go to the codec, and how many per call.

    The "lead" is the slack (module docstring). Defaults are upstream's CPU policy; `inference_stream` uses it so that
    one stream's audio arrives in upstream's pieces.

    Attributes:
        lead_budgets: (lead threshold in s, frames) pairs in increasing threshold order; the first threshold the lead
            is below gives the budget. Before any audio is emitted the budget is the first pair's.
        max_frames: the budget at or above the last threshold.
        head_lead_seconds: decode pending frames whenever the lead is below this.
    """

    lead_budgets: tuple = ((0.20, 1), (0.55, 2), (1.10, 4))
    max_frames: int = 8
    head_lead_seconds: float = 0.45
    # Upstream's engine admits whenever a slot is free (every stream slows down together under load).
    admits_by_capacity: bool = False

    def frame_budget(self, lead_seconds: float, emitted_any: bool) -> int:
        """Frames per codec call (upstream `_resolve_stream_decode_frame_budget`)."""
        if not emitted_any:
            return self.lead_budgets[0][1]
        for threshold, frames in self.lead_budgets:
            if lead_seconds < threshold:
                return frames
        return self.max_frames

    def should_decode(self, first_audio_pending: bool, max_pending: int, budget: int, lead_seconds: float) -> bool:
        """Upstream's triggers: first audio pending, frames pending at a short lead, a full budget, or a starved lead
        (upstream's "head pending" trigger is always armed here: a stream is asked only when it has frames)."""
        return (first_audio_pending or lead_seconds < self.head_lead_seconds or max_pending >= budget
                or lead_seconds < 0)

    def ride_along(self, longest: int) -> int:
        """Upstream's engine semantics: a stream that did not ask takes at most the call's longest budget."""
        return longest

    def frames_wanted(self, pending: int, slack: Optional[float], costs: EngineCosts, rows: int,
                      frame_seconds: float) -> int:
        lead = 0.0 if slack is None else slack
        budget = self.frame_budget(lead, slack is not None)
        if self.should_decode(slack is None, pending, budget, lead):
            return min(budget, pending)
        return 0


DEADLINE_POLICY = DeadlinePolicy()
UPSTREAM_STREAM_POLICY = StreamDecodePolicy()
# What upstream's runtime patches in on CUDA (bigger codec calls, more throughput, later first audio).
UPSTREAM_CUDA_STREAM_POLICY = StreamDecodePolicy(lead_budgets=((0.20, 4), (0.55, 6), (1.10, 8)), max_frames=12)
# Every frame goes to the codec as soon as it is generated. The other policies pick the frames per codec call from
# the timing, and the codec's float rounding depends on that (~1e-6, a 16-bit step in ~1% of samples); here the calls
# do not depend on timing, so a request alone in the engine gives the same samples every time. Costs codec throughput
# (one frame per call).
EVERY_FRAME_STREAM_POLICY = StreamDecodePolicy(lead_budgets=((math.inf, 1),), max_frames=1, head_lead_seconds=math.inf)
# The policies by name (the server's --stream-policy, bench.py's); "throughput" is upstream's accelerator budget.
STREAM_POLICIES = {"deadline": DEADLINE_POLICY, "upstream": UPSTREAM_STREAM_POLICY,
                   "throughput": UPSTREAM_CUDA_STREAM_POLICY, "every-frame": EVERY_FRAME_STREAM_POLICY}


def stream_lead_seconds(emitted_seconds: float, first_emit_time: Optional[float], now: float) -> float:
    """Seconds of audio emitted ahead of real-time playback (upstream `_compute_stream_lead_seconds`); 0 before the
    first audio."""
    if first_emit_time is None:
        return 0.0
    return emitted_seconds - (now - first_emit_time)


def admission_refusal(costs: EngineCosts, slacks: list[float], rows_after: int, prompt_rows: int,
                      prefilled_this_tick: bool, frame_seconds: float) -> Optional[str]:
    """Why a waiting request may not join now (one of WAIT_REASONS), or None.

    Args:
        costs: the engine's measured costs.
        slacks: the slack of every running stream, None for one without audio yet (an empty list: none runs).
        rows_after: rows the LM step runs once the request holds its slot.
        prompt_rows: rows its first prefill call runs (the whole prompt, or the engine's chunk).
        prefilled_this_tick: whether this tick's prefill call is spent (or another prompt is mid-prefill).
        frame_seconds: audio seconds per frame.
    """
    if not slacks:
        return None
    playing = [slack for slack in slacks if slack is not None]
    if prefilled_this_tick and playing:
        return PREFILL_BUDGET
    if playing and costs.codec_calls_since_join < SETTLE_CODEC_CALLS:
        return KEEPING_STREAMS_AHEAD  # the last newcomer's costs are not measured yet
    if costs.tick_after_join(rows_after) > REALTIME_SHARE * frame_seconds:
        return KEEPING_STREAMS_AHEAD
    stall = costs.prefill.predict(prompt_rows) + costs.lm.predict(rows_after) + costs.codec_now(rows_after)
    if playing and min(playing) < stall + UNDERRUN_MARGIN_SECONDS:
        return PROTECTING_SLACK
    return None


__all__ = ["CATCH_UP_FRAMES", "CODEC_FRAMES_PER_CALL", "DEADLINE_POLICY", "DeadlinePolicy", "EVERY_FRAME_STREAM_POLICY",
           "EngineCosts", "HOST_SLOWDOWN", "KEEPING_STREAMS_AHEAD", "LinearCost", "NO_FREE_SLOT", "PREFILL_BUDGET",
           "PROTECTING_SLACK", "REALTIME_SHARE", "SETTLE_CODEC_CALLS", "STREAM_POLICIES", "StreamDecodePolicy",
           "UPSTREAM_CUDA_STREAM_POLICY", "UPSTREAM_STREAM_POLICY", "WAIT_REASONS", "admission_refusal",
           "stream_lead_seconds"]
