"""MOSS-TTS-Nano-100M: `MossTTSNanoForCausalLM`, the global/local GPT-2 text-to-audio-token model.

One row of the input is [text id, 16 audio codes] (spec tts.md §5.1). The global decoder (`transformer`) runs over
rows; for each new frame the local decoder (`local_transformer`) runs over 1 + nq slots: the global hidden state,
then the text decision, then one slot per audio channel (§6.2). Heads are tied to embeddings: `text_lm_head` to
`transformer.wte`, `audio_lm_heads[c]` to `audio_embeddings[c]` (§2.3).

Differences from upstream that keep its outputs (§11):
* the local decoder keeps a small KV cache (capacity n_vq + 1, reset each frame) instead of recomputing up to 17
  times per frame (the same outputs: `use_kv_cache` is accepted for upstream's signature, and both caches are
  always used);
* the 2-way stop decision uses only the text-head rows of ids 9 and 7 (the same logits, far cheaper);
* one host sync per frame (the stop check, which also reports non-finite logits accumulated on the device);
* the attention backend is chosen at run time per device (`devices.resolve_attention`), never crashing on the
  released "flash_attention_2" value; device and dtype are those of the parameters (move the model to choose them).

`inference` / `inference_stream` (audio in, audio out) live in the synthesis module; this file needs no audio I/O.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .devices import resolve_attention
from .configuration_moss_tts_nano import MossTTSNanoConfig, tied_weight_keys
from .generation import GenerationSettings, Group, SlotDecoder
from .prompting import build_prompt_rows, left_pad_batch
from .gpt2_decoder import KVCache, MossTTSNanoGPT2Model, attention_function
from .synthesis import SynthesisMixin

# transformers 4.57.1 copies out of a local model folder only the modules this file imports relatively (5.x and any
# Hub download follow imports transitively), so the modules that synthesis.py reaches are imported here as well.
# tests/test_loading.py checks that these lines cover every module reachable from this file. Remove with 4.57.
from .audio_io import save_audio  # noqa: F401,E402
from .captions import CaptionTimeline  # noqa: F401,E402
from .codec_quantizer import ResidualLFQuantizer  # noqa: F401,E402
from .codec_streaming import CodecDecodeSession  # noqa: F401,E402
from .configuration_moss_audio_tokenizer import MossAudioTokenizerConfig  # noqa: F401,E402
from .cpu_choices import remembered  # noqa: F401,E402
from .engine import SpeechEngine  # noqa: F401,E402
from .engine_schedule import DEADLINE_POLICY  # noqa: F401,E402
from .engine_requests import EngineRequest  # noqa: F401,E402
from .host import cpu_description  # noqa: F401,E402
from .modeling_moss_audio_tokenizer import MossAudioTokenizerModel  # noqa: F401,E402
from .onnx_audio_phase import audio_phase_graph  # noqa: F401,E402
from .onnx_global_step import global_step_graph  # noqa: F401,E402
from .onnx_graph import phases_of  # noqa: F401,E402
from .prefix_store import PrefixStore  # noqa: F401,E402
from .runaway_guards import RunawayGuard  # noqa: F401,E402
from .sampling import RowSettings  # noqa: F401,E402
from .synthesis_inputs import load_text_tokenizer  # noqa: F401,E402
from .synthesis_offline import run_inference  # noqa: F401,E402
from .synthesis_request import build_request  # noqa: F401,E402
from .synthesis_streaming import run_inference_stream  # noqa: F401,E402
from .text_chunking import voice_clone_text_chunks  # noqa: F401,E402
from .text_cleanup import clean_text  # noqa: F401,E402
from .text_language import check_language  # noqa: F401,E402
from .text_normalization import normalize_text  # noqa: F401,E402
from .text_numbers import parse_number  # noqa: F401,E402
from .text_wetext import normalizer  # noqa: F401,E402
from .tokenization_moss_tts_nano import MossTTSNanoSentencePieceTokenizer  # noqa: F401,E402
from .weight_formats import apply_weight_format  # noqa: F401,E402
from .weights import ensure_model_files  # noqa: F401,E402

logger = logging.getLogger(__name__)

# enable_fast_decode's names for generation.STEP_MODES ("none" keeps the eager step).
FAST_DECODE_MODES = {"none": "eager", "eager": "eager", "compile": "compile", "graph": "graph"}


class _IgnorePatterns(list):
    """A list of regex patterns that also supports `|` with a set.

    transformers 4.57 concatenates `_keys_to_ignore_on_load_unexpected` with a list (`x + [...]`), 5.x unions it with
    a set (`x | {...}`); a set breaks 4.57 (spec §11, item 1). The 5.x releases read so far (5.0.0, 5.15.0, 5.23, 5.24)
    turn the attribute into a set in `post_init`, so a plain list would do there, but a list raises a TypeError in any
    5.x without that step (reported for remote code on 5.15.0) and the releases in between were not read. Remove
    this class when every supported 5.x is known to convert it.
    """

    def __or__(self, other):
        return set(self) | set(other)

    def __ror__(self, other):
        return set(other) | set(self)


@dataclass
class MossTTSNanoOutput(ModelOutput):
    """Output of `forward`.

    The cache field is `cache`, the name transformers 5.24 gives it in every `ModelOutput`; `past_key_values` (the name
    up to 5.23 and upstream's) is an alias in the constructor, as an attribute and as a key, on every version from
    4.57.1 on and without transformers' deprecation warning. The constructor is written out because 5.24 renames a
    `past_key_values` keyword to `cache` (with that warning) inside every dataclass-generated one.

    Attributes:
        global_hidden_states: [B, T, C] after the global ln_f, pad positions exactly 0.
        cache: the `KVCache` (when use_cache), holding the post-RoPE keys of every layer.
        hidden_states: input of every block plus the final output (when output_hidden_states).
        attentions: always None (not recorded).
    """

    global_hidden_states: torch.FloatTensor | None = None
    cache: Any = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None

    def __init__(self, global_hidden_states=None, cache=None, hidden_states=None, attentions=None, *,
                 past_key_values=None) -> None:
        self.global_hidden_states = global_hidden_states
        self.cache = _one_cache_argument(cache, past_key_values, "MossTTSNanoOutput")
        self.hidden_states = hidden_states
        self.attentions = attentions
        self.__post_init__()

    @property
    def past_key_values(self) -> Any:
        """Alias of `cache`."""
        return self.cache

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(_CACHE_NAME if name == _OLD_CACHE_NAME else name, value)

    def __getitem__(self, key):
        return super().__getitem__(_CACHE_NAME if key == _OLD_CACHE_NAME else key)


# The cache's name in MossTTSNanoOutput and forward, and the alias kept for transformers <= 5.23 and upstream callers.
_CACHE_NAME, _OLD_CACHE_NAME = "cache", "past_key_values"


def _one_cache_argument(cache: Any, past_key_values: Any, where: str) -> Any:
    """`cache` or its alias `past_key_values`; passing both is a mistake.

    Raises:
        ValueError: when both are given.
    """
    if cache is not None and past_key_values is not None:
        raise ValueError(f"{where} got both cache= and past_key_values= (the same argument); pass only cache=")
    return cache if cache is not None else past_key_values


@dataclass
class MossTTSNanoGenerationOutput(ModelOutput):
    """Output of `generate`.

    Attributes:
        audio_token_ids: long [B, F, n_vq]; frames of rows that stopped, and channels >= nq, hold the audio pad id.
        prompt_input_ids: the prompt rows [B, T, n_vq + 1] that were continued.
    """

    audio_token_ids: torch.LongTensor | None = None
    prompt_input_ids: torch.LongTensor | None = None


class MossTTSNanoPreTrainedModel(PreTrainedModel):
    """Loading/saving glue: config class, tied-weight and ignore-key declarations for transformers 4.57 and 5.x."""

    config_class = MossTTSNanoConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["MossTTSNanoGPT2Block"]
    _supports_sdpa = True
    supports_gradient_checkpointing = False
    _keys_to_ignore_on_load_unexpected = _IgnorePatterns([r"local_transformer\.wte\.weight"])

    def set_attn_implementation(self, attn_implementation: str, **kwargs: Any) -> None:
        """transformers' public switch (4.57 and 5.x), routed to the model's `_set_attention_implementation`
        (both decoders).

        transformers' own version only sets `config._attn_implementation`, which this model does not read (it resolves
        its own request per device), so without this override the call would change nothing.

        Raises:
            ValueError: for a dict (per-sub-config requests) or an unknown backend name.
        """
        if not isinstance(attn_implementation, str):
            raise ValueError(f"attn_implementation={attn_implementation!r}; expected one backend name for both "
                             "decoders, e.g. 'sdpa' or 'eager'")
        self._set_attention_implementation(attn_implementation)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """N(0, initializer_range) for Linear/Embedding weights, zero biases, LayerNorm 1/0."""
        std = self.config.gpt2_config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class MossTTSNanoForCausalLM(SynthesisMixin, MossTTSNanoPreTrainedModel):
    """The TTS language model. `forward` gives global hidden states; `generate` gives audio tokens; `inference`
    and `inference_stream` (from SynthesisMixin, synthesis.py) turn text and a reference voice into speech.

    Args:
        config: a MossTTSNanoConfig.
    """

    def __init__(self, config: MossTTSNanoConfig) -> None:
        super().__init__(config)
        gpt2 = config.gpt2_config
        self.transformer = MossTTSNanoGPT2Model(gpt2, token_embedding=True)
        self.audio_embeddings = nn.ModuleList(nn.Embedding(size, gpt2.n_embd) for size in config.audio_codebook_sizes)
        self.text_lm_head = nn.Linear(gpt2.n_embd, gpt2.vocab_size, bias=False)
        self.audio_lm_heads = nn.ModuleList(
            nn.Linear(gpt2.n_embd, size, bias=False) for size in config.audio_codebook_sizes
        )
        self.local_transformer = MossTTSNanoGPT2Model(config.local_gpt2_config(), token_embedding=False)
        # {head: embedding}: a dict for 5.x; 4.57 iterates it for the head names and ties through `_tie_weights`.
        tied = tied_weight_keys(config.n_vq)
        self._tied_weights_keys = tied
        self.all_tied_weights_keys = dict(tied)
        self._resolved_attention: dict[tuple, str] = {}
        self._step_mode = "eager"  # see enable_fast_decode
        self._tie_weights()
        self.post_init()

    # ------------------------------------------------------------------------------------------------------------
    # Embeddings, ties, attention choice

    def _tie_weights(self) -> None:
        """Share each head's weight with its embedding (called by transformers 4.57's `tie_weights`)."""
        self.text_lm_head.weight = self.transformer.wte.weight
        for head, embedding in zip(self.audio_lm_heads, self.audio_embeddings):
            head.weight = embedding.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value
        self._tie_weights()

    def _set_attention_implementation(self, attn_implementation: str | None, local_attn_implementation=None) -> None:
        """Request attention backends for the global and local decoders (upstream's private API).

        The request is stored in the config and resolved per device at run time (`devices.resolve_attention`).

        Raises:
            ValueError: for a name that is not None, "auto" or a key of gpt2_decoder.ATTENTION_FUNCTIONS.
        """
        for name in (attn_implementation, local_attn_implementation):
            if name not in (None, "auto"):
                attention_function(name)
        self.config.attn_implementation = attn_implementation
        self.config.local_transformer_attn_implementation = local_attn_implementation or attn_implementation
        self._resolved_attention.clear()

    def _resolve_attention(self, requested: str | None, decoder: nn.Module) -> str:
        """The backend to run `decoder` with on its device and dtype (resolved once per request/device/dtype)."""
        weight = decoder.ln_f.weight
        key = (requested, weight.device, weight.dtype)
        if key not in self._resolved_attention:
            self._resolved_attention[key] = resolve_attention(requested, weight.device, weight.dtype)
        return self._resolved_attention[key]

    def _attention_pair(self, attn_implementation: str | None = None) -> tuple[str, str]:
        """(global, local) backend names; an explicit argument overrides the config's requests for both."""
        global_request = attn_implementation or self.config.attn_implementation
        local_request = attn_implementation or self.config.local_attn_implementation
        return (
            self._resolve_attention(global_request, self.transformer),
            self._resolve_attention(local_request, self.local_transformer),
        )

    # ------------------------------------------------------------------------------------------------------------
    # Rows -> embeddings

    def _validate_input_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[int]:
        """Check the row layout (and a generate mask) with one host sync; never called inside the frame loop.

        Args:
            input_ids: long [B, T, n_vq + 1].
            attention_mask: bool [B, T] of a generate call, or None.

        Returns:
            the number of real rows of each prompt (T each without a mask).

        Raises:
            ValueError: a wrong row width, a text id outside the vocabulary, an audio code outside its codebook that
                is not the audio pad id, or a mask that is not left padding (False then True, last row True).
        """
        width = self.config.n_vq + 1
        if input_ids.dim() != 3 or input_ids.shape[-1] != width:
            raise ValueError(f"input_ids must be [B, T, {width}] (text id + {width - 1} audio codes), "
                             f"got {tuple(input_ids.shape)}")
        text = input_ids[..., 0]
        text_bad = (text < 0) | (text >= self.config.vocab_size)
        sizes = torch.tensor(self.config.audio_codebook_sizes, device=input_ids.device)
        codes = input_ids[..., 1:]
        code_bad = ((codes < 0) | (codes >= sizes)) & (codes != self.config.audio_pad_token_id)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape[:2], dtype=torch.bool, device=input_ids.device)
        not_left_padded = (attention_mask[:, 1:] < attention_mask[:, :-1]).any() | ~attention_mask[:, -1].all()
        flags = torch.cat((torch.stack((text_bad.any(), code_bad.any(), not_left_padded)).long(),
                           attention_mask.sum(-1))).tolist()
        if flags[0]:
            raise ValueError(f"input_ids column 0 holds text ids outside [0, {self.config.vocab_size})")
        if flags[1]:
            raise ValueError("input_ids audio columns hold codes outside [0, codebook size) that are not the "
                             f"audio pad id {self.config.audio_pad_token_id}")
        if flags[2]:
            raise ValueError("attention_mask is not left padding; expected each row False (padding) then True, "
                             "ending with a real row (see _left_pad_inference_batch)")
        return flags[3:]

    def _embed_rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Row embeddings: wte(text) + Σ_c audio_embeddings[c](code_c), pad codes contributing exactly 0 (§5.1).

        Args:
            input_ids: long [B, T, n_vq + 1], already validated.

        Returns:
            [B, T, C] in the parameters' dtype.
        """
        hidden = self.transformer.wte(input_ids[..., 0])
        pad = self.config.audio_pad_token_id
        for channel, embedding in enumerate(self.audio_embeddings):
            codes = input_ids[..., channel + 1]
            valid = codes != pad
            looked_up = embedding(codes.masked_fill(~valid, 0))
            hidden = hidden + looked_up * valid.unsqueeze(-1).to(looked_up.dtype)
        return hidden

    # ------------------------------------------------------------------------------------------------------------
    # forward

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: KVCache | tuple | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        labels: torch.Tensor | None = None,
        attn_implementation: str | None = None,
        max_cache_length: int | None = None,
        cache: KVCache | tuple | None = None,
        **kwargs: Any,
    ) -> MossTTSNanoOutput | tuple:
        """Run the global decoder over rows (spec §6.1). Computes no logits.

        Incremental use, as with any transformers model: `out = model(ids, use_cache=True)`, then
        `model(next_ids, past_key_values=out.past_key_values)` (or `cache=out.cache`), each time passing the cache
        of the previous output. A cache too small for the new rows is replaced by a larger copy, so keep using the
        returned one.

        Args:
            input_ids: long [B, T, n_vq + 1] rows (or `inputs_embeds` [B, T, C]).
            attention_mask: bool [B, P + T], the full mask including the P cached positions (default all valid).
            past_key_values: a `KVCache` (or upstream's legacy tuple) to extend, or None; `cache` is the same
                argument under the name transformers 5.24 uses (pass one of them).
            use_cache: return the cache in `cache` (alias `past_key_values`).
            output_hidden_states: also return the hidden states of every block.
            return_dict: False returns (global_hidden_states, cache, hidden_states, attentions).
            labels: not supported (inference-only model).
            attn_implementation: run-time attention request (default: the config's, resolved per device).
            max_cache_length: capacity of a cache created or grown here (default: what the rows need).
            cache: see past_key_values.

        Returns:
            MossTTSNanoOutput, or the 4-tuple.

        Raises:
            NotImplementedError: when labels are given.
            ValueError: malformed input rows, or both cache and past_key_values.
        """
        if labels is not None:
            raise NotImplementedError("MossTTSNanoForCausalLM is inference-only: labels are not supported")
        if kwargs:
            logger.info("forward ignores the arguments %s", sorted(kwargs))
        inputs_embeds = self._forward_embeddings(input_ids, inputs_embeds)
        past = _one_cache_argument(cache, past_key_values, "forward")
        cache = self._forward_cache(past, use_cache, inputs_embeds, max_cache_length)
        hidden, all_hidden = self.transformer(
            inputs_embeds, attention_mask, cache, self._attention_pair(attn_implementation)[0],
            output_hidden_states=bool(output_hidden_states),
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if not return_dict:
            return hidden, cache, all_hidden, None
        return MossTTSNanoOutput(global_hidden_states=hidden, cache=cache, hidden_states=all_hidden)

    def _forward_embeddings(self, input_ids, inputs_embeds) -> torch.Tensor:
        """The rows' embeddings [B, T, C]: `inputs_embeds`, or `input_ids` checked and embedded (exactly one)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is not None:
            return inputs_embeds
        self._validate_input_ids(input_ids)
        return self._embed_rows(input_ids)

    def _forward_cache(self, past, use_cache, inputs_embeds, capacity) -> KVCache | None:
        """The cache forward writes into: the given one (grown when the new rows do not fit), one converted from a
        legacy tuple, a new one, or None."""
        batch, length = inputs_embeds.shape[:2]
        if past is None:
            if not use_cache:
                return None
            return KVCache.for_decoder(self.transformer, batch, capacity or length, dtype=inputs_embeds.dtype)
        if not isinstance(past, KVCache):
            past_length = past[0][0].shape[1]
            return KVCache.from_legacy(past, max(capacity or 0, past_length + length))
        needed = past.length + length
        if needed <= past.capacity:
            return past
        # Doubling keeps a token-by-token loop at O(1) copies per token on average (generate sizes its cache once).
        return past.grow(max(needed, capacity or 0, 2 * past.capacity))

    # ------------------------------------------------------------------------------------------------------------
    # Prompt rows

    def build_inference_input_ids(
        self, text: str, text_tokenizer, mode: str = "continuation", prompt_text: str | None = None,
        prompt_audio_codes: torch.Tensor | None = None, device: torch.device | str | None = None,
    ) -> tuple[torch.LongTensor, torch.Tensor]:
        """Prompt rows for one text (spec §5.3/§5.4); the row layout lives in `prompting`.

        Args:
            text: the text to speak.
            text_tokenizer: the SentencePiece tokenizer.
            mode: "continuation" (optionally continuing prompt_text + prompt audio) or "voice_clone".
            prompt_text: continuation only, together with prompt_audio_codes.
            prompt_audio_codes: long [T_ref, n_vq] codes of the prompt / reference audio.
            device: where to put the result (default: the model's device).

        Returns:
            (input_ids long [1, T, n_vq + 1], attention_mask bool [1, T], all True).

        Raises:
            ValueError: an unknown mode or a missing/forbidden prompt for that mode.
        """
        target = device if device is not None else self.device
        return build_prompt_rows(text_tokenizer, self.config, mode, text, prompt_text, prompt_audio_codes, target)

    def _left_pad_inference_batch(self, input_ids_list, attention_mask_list, device=None):
        """Left-pad single prompts into a batch (pad rows [pad, 1024...], mask False; spec §5.5).

        Returns:
            (input_ids [B, T_max, n_vq + 1], attention_mask bool [B, T_max]).
        """
        return left_pad_batch(input_ids_list, attention_mask_list, self.config, device=device)

    @staticmethod
    def _trim_generated_audio_token_ids(audio_token_ids: torch.Tensor, pad_token_id: int = 1024) -> list:
        """Per sample, drop the trailing frames that are all audio pad (after it chose audio_end).

        Args:
            audio_token_ids: long [B, F, n_vq] (or [F, n_vq]).

        Returns:
            list of B tensors [F_i, n_vq].
        """
        if audio_token_ids.dim() == 2:
            audio_token_ids = audio_token_ids.unsqueeze(0)
        real = (audio_token_ids != pad_token_id).any(-1)  # [B, F]
        frames = torch.arange(1, real.shape[1] + 1, device=real.device)
        lengths = (real * frames).amax(-1).tolist() if real.shape[1] else [0] * real.shape[0]
        return [sample[:length] for sample, length in zip(audio_token_ids, lengths)]

    # ------------------------------------------------------------------------------------------------------------
    # Generation

    def enable_fast_decode(self, mode: str = "compile") -> None:
        """Choose how later generate calls run their fixed-shape decode steps (generation.StepRunner).

        Args:
            mode: "none" / "eager" (the default), "compile" (torch.compile of the steps; falls back to eager with one
                log line if compiling fails) or "graph" (device graph capture where devices.py has it, e.g. CUDA
                graphs; elsewhere one log line and eager). Outputs equal the eager step's up to float rounding.

        Raises:
            ValueError: for an unknown mode.
        """
        if mode not in FAST_DECODE_MODES:
            raise ValueError(f"fast decode mode {mode!r}; expected one of {tuple(FAST_DECODE_MODES)}")
        self._step_mode = FAST_DECODE_MODES[mode]

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        nq: int | None = None,
        max_new_frames: int = 300,
        do_sample: bool = False,
        text_temperature: float = 1.5,
        text_top_p: float = 1.0,
        text_top_k: int = 50,
        audio_temperature: float = 1.7,
        audio_top_p: float = 0.8,
        audio_top_k: int = 25,
        audio_repetition_penalty: float = 1.0,
        use_kv_cache: bool = True,
        return_dict_in_generate: bool = True,
        attn_implementation: str | None = None,
        generator: torch.Generator | None = None,
        *,
        guard=None,
    ) -> MossTTSNanoGenerationOutput | torch.LongTensor:
        """Generate audio frames after prompt rows (spec §6.2, §6.3, §7).

        Args:
            input_ids: long [B, T, n_vq + 1] (or [T, n_vq + 1]) prompt rows, left-padded in a batch.
            attention_mask: bool [B, T] (or [T]); default all True. Each row's last position must be real.
            nq: channels to generate, 1..n_vq (None: all); the others are the audio pad id.
            max_new_frames: at most this many frames.
            do_sample: sample (True) or take the (repetition-penalised) argmax (False).
            text_temperature, text_top_p, text_top_k: sampling of the 2-way continue/stop decision.
            audio_temperature, audio_top_p, audio_top_k: sampling of each audio channel.
            audio_repetition_penalty: per channel, against this call's generated tokens (also when greedy).
            use_kv_cache: accepted for upstream compatibility; the caches are always used (same outputs).
            return_dict_in_generate: False returns the bare audio_token_ids tensor.
            attn_implementation: run-time attention request (default: the config's, resolved per device).
            generator: where the random numbers come from (default: the device's global generator, as upstream).
            guard: keyword-only extra: a runaway_guards.RunawayGuard (one text per row) that ends rows which run
                away (default None: no checks, upstream's outputs).

        Returns:
            MossTTSNanoGenerationOutput(audio_token_ids [B, F, n_vq], prompt_input_ids), or the tensor.

        Raises:
            ValueError: bad arguments or rows. RuntimeError: non-finite logits.
        """
        final = None
        for event in self.generate_stream(
            input_ids, attention_mask, nq, max_new_frames, do_sample, text_temperature, text_top_p, text_top_k,
            audio_temperature, audio_top_p, audio_top_k, audio_repetition_penalty, use_kv_cache,
            return_dict_in_generate, attn_implementation=attn_implementation, generator=generator, guard=guard,
        ):
            final = event
        return final["generation"] if return_dict_in_generate else final["audio_token_ids"]

    def generate_stream(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        nq: int | None = None,
        max_new_frames: int = 300,
        do_sample: bool = False,
        text_temperature: float = 1.5,
        text_top_p: float = 1.0,
        text_top_k: int = 50,
        audio_temperature: float = 1.7,
        audio_top_p: float = 0.8,
        audio_top_k: int = 25,
        audio_repetition_penalty: float = 1.0,
        use_kv_cache: bool = True,
        return_dict_in_generate: bool = True,
        attn_implementation: str | None = None,
        generator: torch.Generator | None = None,
        *,
        guard=None,
    ) -> Iterator[dict]:
        """Like `generate`, but yields one event per frame, then a final event (spec §6.2).

        The B rows run as one group of a `generation.SlotDecoder` (the engine's frame loop, all rows starting
        together), so the outputs, and the random draws, are upstream's.

        Events:
            {"type": "frame", "step_index": int, "audio_token_ids": long [B, n_vq], "active_mask": bool [B],
             "finished_mask": bool [B], "text_candidate_logits": [B, 2]} (device tensors), then
            {"type": "final", "generation": MossTTSNanoGenerationOutput, "text_candidate_logits": [S, B, 2]}
            (or "audio_token_ids" instead of "generation" when return_dict_in_generate is False). S counts every
            text decision, including the final stop.
        """
        settings = GenerationSettings(
            nq, max_new_frames, bool(do_sample), text_temperature, text_top_p, text_top_k, audio_temperature,
            audio_top_p, audio_top_k, audio_repetition_penalty,
        ).checked(self.config.n_vq)
        with torch.no_grad():
            input_ids, prompts = self._prepare_prompt(input_ids, attention_mask)
        backends = self._attention_pair(attn_implementation)  # (global, local) backend names
        frames, text_logits = [], []
        if settings.max_new_frames > 0:
            for event in self._frame_events(prompts, settings, backends, generator, guard):
                text_logits.append(event["text_candidate_logits"])
                if event["type"] == "frame":
                    event["step_index"] = len(frames)
                    frames.append(event["audio_token_ids"])
                    yield event
        yield self._final_event(input_ids, frames, text_logits, return_dict_in_generate)

    def _frame_events(self, prompts, settings, backends, generator, guard=None) -> Iterator[dict]:
        """Run the rows as one group; one event per text decision ("frame", or "stop" for the decision that ends).

        Raises:
            RuntimeError: non-finite logits.
        """
        with torch.no_grad():
            decoder = SlotDecoder(self, len(prompts), max(p.shape[0] for p in prompts) + settings.max_new_frames,
                                  backends, self._step_mode)
            group = Group(list(range(len(prompts))), settings, generator, guard=guard and guard.fresh())
            decoder.start(group, prompts, backends[0])
        while True:
            with torch.no_grad():
                outputs = decoder.frame()
            for output in outputs:
                if output.error is not None:
                    raise RuntimeError(output.error)
                if output.text_logits is None:
                    continue
                if output.codes is None:
                    yield {"type": "stop", "text_candidate_logits": output.text_logits}
                    continue
                # Device-side masks (no host copy): channel 0 of a row that made this frame holds a real code.
                yield {"type": "frame", "audio_token_ids": output.codes,
                       "active_mask": output.codes[:, 0] != self.config.audio_pad_token_id,
                       "finished_mask": group.rows_of(decoder.finished).clone(),
                       "text_candidate_logits": output.text_logits}
            if any(output.done for output in outputs):
                return

    def _prepare_prompt(self, input_ids, attention_mask) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Batch dims, device, dtype and validation of the prompt (one host sync for the whole check).

        Returns:
            (input_ids [B, T, n_vq + 1], each row's real prompt rows [T_b, n_vq + 1] without its left padding).

        Raises:
            ValueError: malformed rows, or a mask that is not [B, T] left padding.
        """
        if input_ids.dim() == 2:
            input_ids = input_ids.unsqueeze(0)
        input_ids = input_ids.to(self.device, torch.long)
        if attention_mask is not None:
            if attention_mask.dim() == 1:
                attention_mask = attention_mask.unsqueeze(0)
            attention_mask = attention_mask.to(self.device, torch.bool)
            if attention_mask.shape != input_ids.shape[:2]:
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids rows "
                                 f"{tuple(input_ids.shape[:2])}")
        lengths = self._validate_input_ids(input_ids, attention_mask)
        return input_ids, [ids[ids.shape[0] - length:] for ids, length in zip(input_ids, lengths)]

    def _final_event(self, input_ids, frames, text_logits, return_dict_in_generate) -> dict:
        """The closing event: all frames [B, F, n_vq] and every text decision's logits [S, B, 2]."""
        if frames:
            audio_token_ids = torch.stack(frames, dim=1)
        else:
            audio_token_ids = input_ids.new_full((input_ids.shape[0], 0, self.config.n_vq),
                                                 self.config.audio_pad_token_id)
        event = {"type": "final", "text_candidate_logits": torch.stack(text_logits) if text_logits else None}
        if return_dict_in_generate:
            event["generation"] = MossTTSNanoGenerationOutput(audio_token_ids=audio_token_ids,
                                                              prompt_input_ids=input_ids)
        else:
            event["audio_token_ids"] = audio_token_ids
        return event


__all__ = ["MossTTSNanoForCausalLM", "MossTTSNanoGenerationOutput", "MossTTSNanoOutput", "MossTTSNanoPreTrainedModel"]
