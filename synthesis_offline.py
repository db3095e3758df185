"""Offline synthesis: `inference` (spec tts.md §7), and several requests at once (`infer_npu.py --jsonl`).

    prepare (tokenizer, codec, prompt codes, chunks) -> batches of chunks (§7.3) -> prompt rows (prompting)
    -> generate (+ the stability fallback, §7.1) -> decode (joined with pauses) -> save

Choices that differ from upstream, none of which changes the generated tokens (spec §11):
* The stability fallback retries once in float32 with the device's best attention backend, logs a WARNING that says
  exactly what changed, and restores the model's dtype afterwards (upstream casts the model for good, §11 item 7).
  The attention override is a run-time argument of `generate`, so the config is never touched.
* Chunk batching asks the device for its free memory (`devices.chunk_batch_size`, NPU included; §11 item 6).
* Only chunks whose requests have the same generation settings share a batch, so every request is generated with its
  own settings.
"""

from __future__ import annotations

import logging
from typing import Iterator, Sequence

import torch

from .audio_io import save_audio
from .captions import add_captions, chunk_captions
from .devices import chunk_batch_size, resolve_attention
from .prompting import build_prompt_rows, left_pad_batch
from .runaway_guards import RunawayGuard, describe_stops
from .synthesis_inputs import SynthesisInputs, decode_codes, load_synthesis_inputs
from .synthesis_request import ChunkProgress, SynthesisRequest, check_not_empty, result_dict, warn_if_truncated
from .text_chunking import pause_samples
from .weight_formats import dtype_change_unavailable_reason

logger = logging.getLogger(__name__)

# Messages that trigger the one float32 retry of `inference` (upstream `_is_generation_stability_error`, §7.1).
STABILITY_ERROR_MARKERS = (
    "Non-finite",
    "device-side assert triggered",
    "probability tensor contains either",
    "flash_attention_2 requires fp16/bf16 tensors",
)


def run_inference(model, request: SynthesisRequest) -> dict:
    """`inference`: synthesise the whole text, write `output_audio_path` (if not None), return upstream's dict.

    Raises:
        ValueError: bad inputs (see build_request, load_*, encode_prompt_audio).
        RuntimeError: generation failed even after the float32 retry, or produced no audio.
    """
    (result,) = list(iter_inference_many(model, [request]))
    return result


def iter_inference_many(model, requests: Sequence[SynthesisRequest]) -> Iterator[dict]:
    """Synthesise several requests, batching the chunks of requests with equal generation settings (e.g.
    `infer_npu.py --jsonl`).

    Every request is prepared (tokenizer, codec, prompt codes, chunks) before anything is generated, so a bad input
    fails before any work. Each chunk is generated with its own request's settings: a batch holds consecutive chunks
    of requests whose settings are equal. Batch sizes, progress and device come from the first request. Each
    request's file is written, and its result yielded, as soon as all of its chunks are generated.

    Args:
        model: the TTS model.
        requests: from build_request.

    Yields:
        The `inference` result dictionary of each request, in order.
    """
    was_training = model.training
    try:
        prompt_cache: dict = {}
        prepared = [load_synthesis_inputs(model, request, prompt_cache) for request in requests]
        chunk_refs = [(index, chunk) for index, ready in enumerate(prepared) for chunk in range(len(ready.chunks))]
        batch_sizes = resolve_batch_sizes(prepared[0].device, len(chunk_refs), requests[0], streaming=False)
        codes: list = [[None] * len(ready.chunks) for ready in prepared]
        stops: dict = {}  # (request index, chunk index) -> the GuardStop that ended it
        finished = 0
        with ChunkProgress(len(chunk_refs), requests[0].progress, "synthesising") as bar:
            for batch in batches_of_equal_settings(requests, chunk_refs, batch_sizes[0]):
                for (index, chunk), chunk_codes in zip(batch, _generate_batch(model, requests, prepared, batch,
                                                                              stops)):
                    codes[index][chunk] = chunk_codes
                bar.update(len(batch))
                while finished < len(requests) and all(c is not None for c in codes[finished]):
                    chunk_stops = [stops.get((finished, chunk)) for chunk in range(len(codes[finished]))]
                    yield _finish(requests[finished], prepared[finished], codes[finished], batch_sizes, chunk_stops)
                    finished += 1
    finally:
        model.train(was_training)


def batches_of_equal_settings(requests: Sequence[SynthesisRequest], chunk_refs: list, size: int) -> list[list]:
    """`chunk_refs` ((request index, chunk index) pairs, in order) cut into batches of at most `size` consecutive
    chunks whose requests have equal generation settings."""
    batches: list[list] = []
    for ref in chunk_refs:
        last = batches[-1] if batches else None
        if last and len(last) < size and requests[last[0][0]].generation == requests[ref[0]].generation:
            last.append(ref)
        else:
            batches.append([ref])
    return batches


def _generate_batch(model, requests, prepared, batch, stops: dict) -> list:
    """Codes [F_i, n_vq] of the (request, chunk) pairs of `batch`, generated together (left-padded); with the first
    request's runaway_guards, the chunks a guard ended are added to `stops`."""
    generation, guard = requests[batch[0][0]].generation, None
    if requests[batch[0][0]].runaway_guards:
        texts = [prepared[index].chunks[chunk] for index, chunk in batch]
        guard = RunawayGuard.for_texts(texts, int(generation["max_new_frames"]))
        generation = {**generation, "guard": guard}
    rows = []
    for index, chunk in batch:
        ready, request = prepared[index], requests[index]
        rows.append(build_prompt_rows(ready.tokenizer, model.config, request.mode, ready.chunks[chunk],
                                      request.prompt_text, ready.prompt_codes))
    ids, mask = left_pad_batch([r[0] for r in rows], [r[1] for r in rows], model.config, device=prepared[0].device)
    codes = generate_codes(model, ids, mask, generation, fallback=True)
    for row, stop in (guard.stops.items() if guard is not None else ()):
        stops[batch[row]] = stop
    return codes


def is_stability_error(error: BaseException) -> bool:
    """Whether `error` is one of the numeric/backend failures that the float32 retry may cure."""
    return isinstance(error, (RuntimeError, ValueError)) and any(m in str(error) for m in STABILITY_ERROR_MARKERS)


def generate_codes(model, input_ids, attention_mask, generation: dict, fallback: bool = True) -> list:
    """Generate one batch and return each row's codes, trimmed of trailing pad frames (CPU [F_i, n_vq] long).

    With `fallback`, a stability error (STABILITY_ERROR_MARKERS) is retried once in float32 with the device's best
    attention backend; the model's dtype is restored afterwards.
    """
    try:
        output = model.generate(input_ids, attention_mask, **generation)
    except (RuntimeError, ValueError) as error:
        if not fallback or not is_stability_error(error):
            raise
        output = _retry_in_float32(model, input_ids, attention_mask, generation, error)
    pad = int(model.config.audio_pad_token_id)
    return [codes.to("cpu") for codes in model._trim_generated_audio_token_ids(output.audio_token_ids, pad)]


def _retry_in_float32(model, input_ids, attention_mask, generation: dict, error: BaseException):
    """The single retry of §7.1: float32 + the device's best backend, announced, then the dtype restored.

    A model in a converted weight format (oneDNN-packed bf16 or int8 layers) cannot be cast to float32 in place: the
    retry is refused with a RuntimeError that says so and how to get a float32 model.
    """
    original_dtype, device = model.dtype, model.device
    blocker = dtype_change_unavailable_reason(model)
    if blocker is not None:
        raise RuntimeError(
            f"Generation failed ({type(error).__name__}: {error}). The float32 retry cannot run: {blocker}. Load the "
            "model again without a weight format (fp32) to generate in float32."
        ) from error
    attention = resolve_attention(None, device, torch.float32)
    before = (model.config.attn_implementation, getattr(model.config, "local_attn_implementation", None))
    logger.warning(
        "Generation failed (%s: %s). Retrying this batch once with the model cast from %s to float32 and attention "
        "%r for both decoders (requested before: global %r, local %r). The model is cast back to %s afterwards.",
        type(error).__name__, error, original_dtype, attention, before[0], before[1], original_dtype,
    )
    try:
        model.to(torch.float32)
        return model.generate(input_ids, attention_mask, attn_implementation=attention, **generation)
    finally:
        model.to(original_dtype)


def resolve_batch_sizes(device, num_chunks: int, request: SynthesisRequest, streaming: bool) -> tuple[int, int]:
    """(TTS batch, codec batch) for the chunks (spec §7.3), free memory from the device layer.

    TTS: devices.chunk_batch_size (1 on CPU, like upstream), capped by tts_max_batch_size (> 0), and when streaming
    by codec_max_batch_size (> 0). Codec: the TTS batch when streaming; otherwise 1 without a codec limit, else
    min(codec limit, TTS batch).
    """
    tts_batch = chunk_batch_size(device, num_chunks, float(request.voice_clone_max_memory_per_sample_gb))
    if request.tts_max_batch_size > 0:
        tts_batch = min(tts_batch, request.tts_max_batch_size)
    if streaming and request.codec_max_batch_size > 0:
        tts_batch = min(tts_batch, request.codec_max_batch_size)
    tts_batch = max(1, tts_batch)
    if streaming:
        return tts_batch, tts_batch
    if request.codec_max_batch_size > 0:
        return tts_batch, max(1, min(request.codec_max_batch_size, tts_batch))
    return tts_batch, 1


def _finish(request, prepared: SynthesisInputs, codes_list: list, batch_sizes, chunk_stops=()) -> dict:
    """Decode, check, save and describe one request."""
    layout = prepared.codec_layout
    warn_if_truncated(codes_list, prepared.chunks, int(request.generation["max_new_frames"]),
                      layout.hop / layout.sample_rate)
    waveform, rate = _decode_all(request, prepared, codes_list, batch_sizes[1])
    check_not_empty(waveform)
    audio_path = None
    if request.output_audio_path is not None:
        audio_path = str(save_audio(request.output_audio_path, waveform, rate))
    result = result_dict(prepared, waveform, rate, codes_list, batch_sizes, audio_path)
    if request.runaway_guards:
        result["runaway_stops"] = describe_stops(chunk_stops, prepared.chunks)
    if request.captions:
        samples_per_frame = layout.hop * rate // layout.sample_rate
        add_captions(result, offline_captions(prepared.chunks, codes_list, samples_per_frame, rate), request.captions)
    return result


def offline_captions(chunks: Sequence[str], codes_list: list, samples_per_frame: int, rate: int) -> list:
    """Per-chunk captions (captions.Caption, seconds) of the joined waveform of `_decode_all`."""
    lengths = [codes.shape[0] * samples_per_frame for codes in codes_list]
    pauses = [pause_samples(chunk, int(rate)) for chunk in chunks[:-1]]
    return chunk_captions(chunks, lengths, pauses, rate)


def _decode_all(request, prepared: SynthesisInputs, codes_list: list, codec_batch: int) -> tuple[torch.Tensor, int]:
    """The waveform [C, N]: chunks decoded in codec batches and joined with pauses; or one decode (continuation
    prompts are decoded with the generated codes and their samples cut off, spec §5.3)."""
    codec, layout, nq = prepared.codec, prepared.codec_layout, prepared.nq
    if len(codes_list) > 1:
        waveforms, rate = _decode_chunks(codec, layout, codes_list, nq, codec_batch)
        return _join_with_pauses(waveforms, prepared.chunks, rate, layout.channels), rate
    codes, cut = codes_list[0], 0
    if request.mode == "continuation" and prepared.prompt_codes is not None and codes.shape[0] > 0:
        codes, cut = torch.cat([prepared.prompt_codes, codes], dim=0), prepared.prompt_codes.shape[0]
    (waveform,), rate = decode_codes(codec, layout, [codes], nq)
    cut_samples = int(round(cut * layout.hop * rate / layout.sample_rate))
    return waveform[:, cut_samples:], rate


def _decode_chunks(codec, layout, codes_list, nq, codec_batch) -> tuple[list, int]:
    """Decode chunk codes in groups of codec_batch; a failing group is decoded chunk by chunk (upstream)."""
    waveforms, rate = [], layout.sample_rate
    for start in range(0, len(codes_list), codec_batch):
        group = codes_list[start: start + codec_batch]
        try:
            decoded, rate = decode_codes(codec, layout, group, nq)
        except (RuntimeError, ValueError) as error:
            if len(group) == 1:
                raise
            logger.warning("Batched decoding of %d chunks failed (%s); decoding them one by one", len(group), error)
            decoded = []
            for codes in group:
                (single,), rate = decode_codes(codec, layout, [codes], nq)
                decoded.append(single)
        waveforms += decoded
    return waveforms, rate


def _join_with_pauses(waveforms: list, chunks: Sequence[str], rate: int, channels: int) -> torch.Tensor:
    """Chunk waveforms joined with the §7.2 pause after every chunk but the last."""
    pieces = []
    for index, (waveform, chunk) in enumerate(zip(waveforms, chunks)):
        pieces.append(waveform)
        if index < len(chunks) - 1:
            pieces.append(torch.zeros(waveform.shape[0] if waveform.numel() else channels,
                                      pause_samples(chunk, int(rate))))
    return torch.cat(pieces, dim=-1)
