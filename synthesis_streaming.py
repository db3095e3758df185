"""Streaming synthesis: `inference_stream` (spec tts.md §7) and `engine_request`, on the speech engine.

A request becomes an engine `EngineRequest` (one prompt per voice-clone chunk, each followed by its pause); the engine
(engine.py) generates the frames and decodes them with a streaming codec session whose frames-per-call budget follows
a `StreamDecodePolicy` (upstream's runtime monkey-patches it on CUDA; here it is an argument). `inference_stream`
runs one request on a one-slot engine ticked inline and turns the engine's events into upstream's dictionaries;
the server (server/service.py) submits the same engine requests to a shared engine. `output_audio_path` is written
progressively (a temporary file, renamed when complete).
"""

from __future__ import annotations

import time
from typing import Iterator, Optional

import torch

from .audio_io import ProgressiveWavWriter
from .captions import CaptionTimeline, add_captions
from .engine import (UPSTREAM_STREAM_POLICY, ChunkPrompt, ErrorEvent, FinishedEvent, RequestError, SpeechEngine,
                     EngineRequest, StreamDecodePolicy, stream_lead_seconds)
from .generation import GenerationSettings
from .prompting import build_prompt_rows, shared_prefix_rows
from .runaway_guards import describe_stops
from .synthesis_inputs import SynthesisInputs, load_synthesis_inputs, text_chunks
from .synthesis_request import ChunkProgress, SynthesisRequest, check_not_empty, check_text, result_dict
from .synthesis_request import check_chunk_budget, check_generation_settings
from .synthesis_request import warn_if_truncated
from .text_chunking import pause_seconds_after


def engine_request(model, tokenizer, text: str, mode: str = "voice_clone", prompt_codes=None,
                   prompt_text: Optional[str] = None, settings: Optional[GenerationSettings] = None,
                   voice_clone_max_text_tokens: int = 50, chunks: Optional[list] = None,
                   **engine_options) -> EngineRequest:
    """An engine request for `text`: one prompt per chunk (voice clone) or one prompt (continuation), each chunk
    followed by its pause (spec §7.2), in the given voice.

    Args:
        model: the TTS model (its config gives the special ids).
        tokenizer: the text tokenizer.
        text: what to say (non-empty).
        mode: "voice_clone" (prompt_codes = the reference voice) or "continuation" (optionally continuing
            prompt_text + prompt_codes; the codec stream is primed with the prompt's codes, spec §5.3).
        prompt_codes: long [T_ref, n_vq] codes of the reference / prompt audio.
        prompt_text: continuation only: the transcript of prompt_codes.
        settings: generation settings (default: the model methods' defaults).
        voice_clone_max_text_tokens: token budget per voice-clone chunk (<= 0: one chunk).
        chunks: the chunk texts, when already split.
        engine_options: further EngineRequest fields (seed, generator, global_random, runaway_guards, ...).

    Raises:
        ValueError: an unknown mode, a missing or forbidden prompt, empty or over-long text; SettingError (a
            ValueError naming the setting) for a setting outside synthesis_request's rules.
    """
    check_text(text)
    settings = settings or GenerationSettings()
    check_generation_settings(vars(settings), int(model.config.n_vq))
    check_chunk_budget(voice_clone_max_text_tokens)
    if chunks is None:
        chunks = text_chunks(tokenizer, text, mode, prompt_text, voice_clone_max_text_tokens)
    prompts = []
    for index, chunk in enumerate(chunks):
        ids, _ = build_prompt_rows(tokenizer, model.config, mode, chunk, prompt_text, prompt_codes)
        pause = pause_seconds_after(chunk) if index < len(chunks) - 1 else 0.0
        prompts.append(ChunkPrompt(ids[0], pause, chunk))
    shared = shared_prefix_rows(tokenizer, model.config, mode, prompt_codes)  # after the rows, which check inputs
    for prompt in prompts:
        prompt.shared_rows = shared
    prime = prompt_codes if mode == "continuation" else None
    return EngineRequest(prompts, settings, codec_prime=prime, **engine_options)


def run_inference_stream(model, request: SynthesisRequest, policy: Optional[StreamDecodePolicy] = None
                         ) -> Iterator[dict]:
    """`inference_stream`: one request on a one-slot engine, ticked inline; audio events as the policy decodes them,
    then the result event.

    Random numbers come from the device's global generator, as upstream's (seed with torch.manual_seed). No stability
    fallback (as upstream: audio may already have been emitted). The file, when asked for, is written progressively
    to a temporary file and renamed at the end.

    Args:
        model: the TTS model.
        request: from build_request.
        policy: the codec decode policy (default: request.stream_policy, else UPSTREAM_STREAM_POLICY).
    """
    policy = policy or request.stream_policy or UPSTREAM_STREAM_POLICY
    was_training, writer, engine = model.training, None, None
    try:
        prepared = load_synthesis_inputs(model, request)
        settings = GenerationSettings(**{name: value for name, value in request.generation.items()
                                         if name != "use_kv_cache"})
        job = engine_request(model, prepared.tokenizer, request.text, request.mode, prepared.prompt_codes,
                             request.prompt_text, settings, chunks=prepared.chunks, global_random=True,
                             runaway_guards=request.runaway_guards)
        longest_prompt = max(chunk.rows.shape[0] for chunk in job.chunks)
        positions = longest_prompt + job.settings.checked(prepared.n_vq).max_new_frames
        engine = SpeechEngine(model, prepared.codec, num_slots=1, max_positions=positions, policy=policy)
        layout = prepared.codec_layout
        if request.output_audio_path is not None:
            writer = ProgressiveWavWriter(request.output_audio_path, layout.sample_rate, layout.channels)
        result = yield from _audio_events(engine, engine.submit(job), prepared, request, writer)
        audio_path = writer.close() if writer is not None else None
        writer = None
        yield {"type": "result", **_result(prepared, request, result, audio_path)}
    finally:
        if writer is not None:
            writer.abort()
        if engine is not None:
            engine.close()
        model.train(was_training)


def _result(prepared: SynthesisInputs, request, result: dict, audio_path) -> dict:
    """Upstream's result dictionary, plus runaway_stops and captions when the request asked for them."""
    final = result_dict(prepared, result["waveform"], prepared.codec_layout.sample_rate, result["codes"], (1, 1),
                        audio_path)
    if request.runaway_guards:
        final["runaway_stops"] = describe_stops(result["stops"], prepared.chunks, log=False)  # the engine logged
    if request.captions:
        add_captions(final, result["captions"], request.captions)
    return final


def _audio_events(engine, handle, prepared: SynthesisInputs, request, writer):
    """Tick the engine and turn its events into upstream's audio dictionaries; returns the waveform and codes."""
    pieces, emitted, first_time = [], 0, None
    layout = prepared.codec_layout
    rate = layout.sample_rate
    timeline = CaptionTimeline(prepared.chunks, rate)
    with ChunkProgress(len(prepared.chunks), request.progress, "streaming") as bar:
        while True:
            busy = engine.step()
            for event in handle.pending():
                if isinstance(event, ErrorEvent):
                    raise RequestError(event.code, f"streaming synthesis failed: {event.message}")
                if isinstance(event, FinishedEvent):
                    warn_if_truncated(event.codes, prepared.chunks, int(request.generation["max_new_frames"]),
                                      layout.hop / rate)
                    waveform = torch.cat(pieces, dim=-1) if pieces else torch.zeros(layout.channels, 0)
                    check_not_empty(waveform)
                    timeline.finish()
                    return {"waveform": waveform, "codes": event.codes, "captions": timeline.done,
                            "stops": event.stops}
                first_time = first_time or time.perf_counter()
                lead = stream_lead_seconds(emitted / rate, first_time, time.perf_counter())
                emitted += event.waveform.shape[-1]
                timeline.add(event.chunk_index, event.waveform.shape[-1], event.is_pause)
                pieces.append(event.waveform)
                if writer is not None:
                    writer.write(event.waveform)
                bar.update(int(event.is_pause))
                yield {"type": "audio", "waveform": event.waveform, "sample_rate": rate,
                       "chunk_index": event.chunk_index, "is_pause": event.is_pause,
                       "emitted_audio_seconds": emitted / rate, "lead_seconds": lead}
            if not busy:
                raise RuntimeError("the engine stopped without finishing the request")
