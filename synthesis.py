"""Text (+ a voice prompt) to a 48 kHz stereo waveform: `inference` and `inference_stream` (spec tts.md §7).

`SynthesisMixin` gives `MossTTSNanoForCausalLM` upstream's two convenience methods with upstream's signatures and
return dictionaries; the model file stays free of audio I/O. A call goes through four modules, in this order:

    synthesis_request.py    the arguments, checked before anything loads (build_request), progress, the result dict
    synthesis_inputs.py     model to device, eval -> text tokenizer (§7.5) -> codec (§7.4) -> prompt codes (trimmed to
                            the codec's floor length) -> text chunks (voice clone, §7.2)
    synthesis_offline.py    `inference`: batches (§7.3) -> prompt rows (prompting.py) -> generate (+ the stability
                            fallback, §7.1) -> decode (joined with pauses) -> save (audio_io.py)
    synthesis_streaming.py  `inference_stream`: the same request on the speech engine (engine.py), audio as it comes

This module re-exports their public functions, so `synthesis.X` is the pipeline's API whichever module implements X.

Choices that differ from upstream, none of which changes the generated tokens (spec §11), are listed where they are
made; in short: our own tokenizer and codec, loaded from the model folder, never downloaded at inference time; the
float32 retry restores the model's dtype; chunk batches follow the device's free memory (NPU included); a chunk cut
at max_new_frames is reported with a WARNING; continuation text is limited to CONTINUATION_MAX_TEXT_TOKENS tokens (a
ValueError points to voice_clone mode, which chunks any length); the streaming frame budget is a StreamDecodePolicy
argument; `inference_stream` writes its file progressively.
"""

from __future__ import annotations

import time
from typing import Iterator

from .audio_io import ProgressiveWavWriter
from .engine import UPSTREAM_CUDA_STREAM_POLICY, UPSTREAM_STREAM_POLICY, StreamDecodePolicy, stream_lead_seconds
from .synthesis_inputs import (CONTINUATION_MAX_TEXT_TOKENS, CodecInfo, codec_info, decode_codes, encode_prompt_audio,
                                folder_text_tokenizer, load_audio_tokenizer, load_text_tokenizer, text_chunks)
from .synthesis_offline import (generate_codes, is_stability_error, iter_inference_many, resolve_batch_sizes,
                                run_inference)
from .synthesis_request import SynthesisRequest, build_request, progress_logger
from .synthesis_streaming import run_inference_stream, engine_request
from .text_chunking import split_text_into_chunks


class SynthesisMixin:
    """`inference` and `inference_stream` for MossTTSNanoForCausalLM, with upstream's signatures and results.

    Both accept keyword-only extras after upstream's parameters: `progress` (per chunk: True, False, or None =
    when several chunks are synthesised; a tqdm bar on a terminal, else INFO lines of `progress_logger`), `normalize`
    and `language` (text normalization, off by default), `captions`, `runaway_guards` (off by default) and, for
    streaming, `stream_policy`.
    """

    def inference(
        self, text, output_audio_path, mode="continuation", prompt_text=None, prompt_audio_path=None,
        reference_audio_path=None, text_tokenizer=None, text_tokenizer_path=None, audio_tokenizer=None,
        audio_tokenizer_type=None, audio_tokenizer_pretrained_name_or_path=None, device=None, nq=None,
        max_new_frames=300, do_sample=False, text_temperature=1.5, text_top_p=1.0, text_top_k=50,
        audio_temperature=1.7, audio_top_p=0.8, audio_top_k=25, audio_repetition_penalty=1.0, use_kv_cache=True,
        voice_clone_max_text_tokens=50, voice_clone_max_memory_per_sample_gb=1.0, tts_max_batch_size=0,
        codec_max_batch_size=0, *, progress=None, normalize=False, language=None, captions=False,
        runaway_guards=False,
    ) -> dict:
        """Synthesise `text` and write it to `output_audio_path` (spec §7).

        Args:
            text: what to say (non-empty).
            output_audio_path: .wav/.flac destination (written atomically), or None to only return the audio.
            mode: "continuation" (default) or "voice_clone" (needs prompt_audio_path; chunks long text).
            prompt_text / prompt_audio_path: continuation prompt (transcript + recording), or the voice to clone.
            reference_audio_path: deprecated alias of prompt_audio_path.
            text_tokenizer / text_tokenizer_path: a tokenizer object or a tokenizer.model file/folder (default: the
                model folder).
            audio_tokenizer / audio_tokenizer_type / audio_tokenizer_pretrained_name_or_path: the codec object, or
                a local codec folder (default: the model folder's audio_tokenizer/).
            device: where to run ("cpu", "cuda", "npu:1", ...); None keeps the model's device.
            nq .. use_kv_cache: generation settings of `generate` (model defaults, spec §6.4 left column).
            voice_clone_max_text_tokens: token budget per voice-clone chunk (<= 0: no chunking).
            voice_clone_max_memory_per_sample_gb: memory planned per chunk for batching by free device memory.
            tts_max_batch_size / codec_max_batch_size: caps on the chunk batches (0 = no cap).
            progress: chunk progress (keyword-only extra; see the class docstring).
            normalize: keyword-only extra: True (or a text_normalization.TextOptions) speaks the text as
                infer_npu.py and the server do: LLM markup removed, numbers, dates, currencies and units as words in
                the text's language (default False: the text as given, as upstream's method).
            language: keyword-only extra: the text's language for normalize ("de", "zh", ...; None: detected).
            captions: keyword-only extra: True adds "captions", [{"index", "text", "start", "end"}] per chunk in
                seconds of the returned audio; a .vtt path also writes them there as WebVTT.
            runaway_guards: keyword-only extra: end a chunk that runs far past its text's length, loops or stays
                silent (runaway_guards.py) and list them in "runaway_stops" (default False: upstream's frames).

        Returns:
            dict with audio_path, sample_rate, audio_token_ids [F, 16], waveform [C, N] float32 CPU,
            reference_audio_token_ids, voice_clone_text_chunks, voice_clone_chunk_batch_size,
            voice_clone_codec_batch_size.

        Raises:
            ValueError: bad inputs (empty text, bad prompt file, unknown mode, missing tokenizer or codec, ...).
            RuntimeError: generation failed (also after the float32 retry) or produced no audio.
        """
        arguments = dict(locals())
        arguments.pop("self")
        return run_inference(self, build_request(**arguments))

    def inference_stream(
        self, text, output_audio_path=None, mode="continuation", prompt_text=None, prompt_audio_path=None,
        reference_audio_path=None, text_tokenizer=None, text_tokenizer_path=None, audio_tokenizer=None,
        audio_tokenizer_type=None, audio_tokenizer_pretrained_name_or_path=None, device=None, nq=None,
        max_new_frames=300, do_sample=False, text_temperature=1.5, text_top_p=1.0, text_top_k=50,
        audio_temperature=1.7, audio_top_p=0.8, audio_top_k=25, audio_repetition_penalty=1.0, use_kv_cache=True,
        voice_clone_max_text_tokens=50, voice_clone_max_memory_per_sample_gb=1.0, tts_max_batch_size=0,
        codec_max_batch_size=0, *, progress=None, stream_policy=None, normalize=False, language=None,
        captions=False, runaway_guards=False,
    ) -> Iterator[dict]:
        """Like `inference`, but yields audio as it is produced (spec §7 inference_stream).

        Yields:
            {"type": "audio", "waveform" [C, n] float32 CPU, "sample_rate", "chunk_index", "is_pause",
            "emitted_audio_seconds", "lead_seconds"} events in playback order (pauses between chunks included),
            then {"type": "result", ...the keys of `inference`...}.

        Args:
            (as `inference`); stream_policy: a StreamDecodePolicy (default upstream's CPU policy 1/2/4/8 frames).
        """
        arguments = dict(locals())
        arguments.pop("self")
        policy = arguments.pop("stream_policy")
        return run_inference_stream(self, build_request(**arguments), policy)

    # Upstream private helpers that callers use directly (spec §7).
    def _load_text_tokenizer(self, text_tokenizer=None, text_tokenizer_path=None):
        return load_text_tokenizer(self, text_tokenizer, text_tokenizer_path)

    def _split_text_into_best_sentences(self, text_tokenizer, text, max_tokens):
        return split_text_into_chunks(text_tokenizer, text, max_tokens)

    @staticmethod
    def _compute_stream_lead_seconds(emitted_audio_seconds, first_emit_time, now=None):
        return stream_lead_seconds(emitted_audio_seconds, first_emit_time,
                                   time.perf_counter() if now is None else now)

    @staticmethod
    def _resolve_stream_decode_frame_budget(lead_seconds, emitted_any=True, policy=UPSTREAM_STREAM_POLICY):
        return policy.frame_budget(lead_seconds, emitted_any)


__all__ = [
    "CONTINUATION_MAX_TEXT_TOKENS",
    "CodecInfo",
    "ProgressiveWavWriter",
    "StreamDecodePolicy",
    "SynthesisMixin",
    "SynthesisRequest",
    "UPSTREAM_CUDA_STREAM_POLICY",
    "UPSTREAM_STREAM_POLICY",
    "build_request",
    "codec_info",
    "decode_codes",
    "encode_prompt_audio",
    "folder_text_tokenizer",
    "generate_codes",
    "is_stability_error",
    "iter_inference_many",
    "load_audio_tokenizer",
    "load_text_tokenizer",
    "progress_logger",
    "resolve_batch_sizes",
    "run_inference",
    "run_inference_stream",
    "engine_request",
    "stream_lead_seconds",
    "text_chunks",
]
