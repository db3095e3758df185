"""What one decoded frame of MOSS-TTS-Nano must cost on a CPU, and where its time goes (bench.py's lm section).

A frame at batch 1 is one global step (12 blocks), 17 local steps (one block each), 16 audio heads, two rows of the
text head and the sampling between them. Each weight it uses must be read at least once, so with the machine's read
bandwidth (host.read_bandwidth) the bytes give a floor: `frame_floor` reports it per part and in all, in the weight
format the model holds (weight_formats.stored_weight_bytes counts packed and int8 layers as stored).

`profile_frames` splits decoded frames into global step, local steps, heads, sampling, the int8 graphs and host work
(everything else: the Python and small tensor ops between them) with torch.profiler: forward hooks open a
`record_function` span around each block and head, and sampling.sample_rows and the graphs open their own.
Profiler overhead is included in every figure.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..host import read_bandwidth
from ..onnx_audio_phase import AUDIO_PHASE
from ..onnx_global_step import GLOBAL_STEP
from ..sampling import PROFILE_SPAN
from ..weight_formats import stored_weight_bytes

# The spans a frame's time is split into: hooks around the torch blocks and heads, the span sampling.sample_rows
# opens, and those the int8 format's ONNX graphs open (the global step with local step 0; the audio phase's local
# steps, heads and picks), which the torch profiler cannot see into.
PARTS = ("global step", "local steps", "heads", PROFILE_SPAN, GLOBAL_STEP.span, AUDIO_PHASE.span)



def frame_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the weights one batch-1 frame reads at least once, per part: "global" (the global blocks and ln_f),
    "local" (the local decoder, read once: a floor that assumes it stays cached over its 17 steps), "heads" (the
    audio heads) and "text head" (its two decision rows)."""
    text_head = model.text_lm_head.weight
    return {
        "global": _module_bytes(model.transformer.h) + _module_bytes(model.transformer.ln_f),
        "local": _module_bytes(model.local_transformer),
        "heads": _module_bytes(model.audio_lm_heads),
        "text head": 2 * text_head.shape[1] * text_head.element_size(),
    }


def _module_bytes(module: nn.Module) -> int:
    """Stored bytes of every Linear (as converted) and every other parameter of `module`."""
    total, counted = 0, set()
    for child in module.modules():
        size = stored_weight_bytes(child)
        if size is not None:
            total += size
            counted.update(id(parameter) for parameter in child.parameters())
    return total + sum(p.numel() * p.element_size() for p in module.parameters() if id(p) not in counted)


def frame_floor(model: nn.Module, threads: int) -> dict:
    """The frame's floor: {"bytes", "bandwidth" (bytes/s, measured at `threads`), "floor_ms", "parts" (bytes)}."""
    parts = frame_weight_bytes(model)
    total = sum(parts.values())
    bandwidth = read_bandwidth(threads)
    return {"bytes": total, "bandwidth": bandwidth, "floor_ms": 1000.0 * total / bandwidth, "parts": parts}


class _Spans:
    """Forward hooks that wrap each call of the given modules in a torch.profiler span named after its part."""

    def __init__(self, model: nn.Module) -> None:
        self.open: list = []
        self.handles = []
        for label, modules in (("global step", model.transformer.h), ("local steps", model.local_transformer.h),
                               ("heads", model.audio_lm_heads)):
            for module in modules:
                self.handles.append(module.register_forward_pre_hook(self._enter(label)))
                self.handles.append(module.register_forward_hook(self._exit))

    def _enter(self, label: str):
        def hook(module, args):
            self.open.append(torch.profiler.record_function(label).__enter__())
        return hook

    def _exit(self, module, args, output):
        self.open.pop().__exit__(None, None, None)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def profile_frames(model: nn.Module, prompt: torch.Tensor, frames: int, **generate_kwargs) -> dict:
    """Decode `frames` frames under torch.profiler (after the first frame, so the prefill is not counted).

    Returns:
        {"frames", "ms_per_frame" (wall, profiler on), "parts": {part: ms per frame}, "host ms", "aten_calls"
        (aten operator calls per frame, nested calls included)}.
    """
    spans = _Spans(model)
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    counted, start = 0, None
    try:
        for event in model.generate_stream(prompt, max_new_frames=frames + 1, **generate_kwargs):
            if event["type"] != "frame":
                continue
            if start is None:
                profiler.start()
                start = time.perf_counter()
            else:
                counted += 1
        wall = time.perf_counter() - start
        profiler.stop()
    finally:
        spans.remove()
    return _summary(profiler.key_averages(), wall, max(1, counted))


def _summary(averages, wall: float, frames: int) -> dict:
    times = {part: 0.0 for part in PARTS}
    aten = 0
    for entry in averages:
        if entry.key in times:
            times[entry.key] += entry.cpu_time_total / 1000.0  # us -> ms
        elif entry.key.startswith("aten::"):
            aten += entry.count
    parts = {part: ms / frames for part, ms in times.items()}
    ms_per_frame = 1000.0 * wall / frames
    return {"frames": frames, "ms_per_frame": ms_per_frame, "parts": parts,
            "host_ms": ms_per_frame - sum(parts.values()), "aten_calls": aten / frames}


__all__ = ["PARTS", "frame_floor", "frame_weight_bytes", "profile_frames"]
