"""Configuration of MOSS-TTS-Nano-100M (`model_type` "moss_tts_nano").

The defaults are the released model's values (spec tts.md §1.1), not upstream's stale Qwen-vocabulary defaults
(§11, item 11). The nested `gpt2_config` is a `transformers.GPT2Config` that describes both decoders; the local
(depth) decoder copies it with `local_transformer_layers` layers and `n_vq + 1` positions.

The two attention fields are stored and saved as given (the released "flash_attention_2" included), but they are
only a *request*: the model resolves the backend per device at run time (`devices.resolve_attention`), so a value
that cannot run on the current device falls back instead of crashing (§11, items 2 and 3).
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import GPT2Config, PretrainedConfig

# The released gpt2_config (spec §1.1); every key not listed keeps GPT2Config's default.
RELEASED_GPT2_CONFIG: dict[str, Any] = {
    "vocab_size": 16384,
    "n_embd": 768,
    "n_head": 12,
    "n_inner": 3072,
    "n_layer": 12,
    "n_positions": 32768,
    "n_ctx": 32768,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
    "initializer_range": 0.02,
    "attn_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "resid_pdrop": 0.0,
    "position_embedding_type": "rope",
    "rope_base": 10000.0,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 3,
}

POSITION_EMBEDDING_TYPES = ("absolute", "rope")
AUDIO_TOKENIZER_TYPES = ("moss-audio-tokenizer-nano",)
# Keys the config derives from gpt2_config; values found in a config.json are overwritten (spec §1.1).
_DERIVED_KEYS = ("vocab_size", "hidden_size", "max_position_embeddings")


def _as_gpt2_config(gpt2_config: GPT2Config | dict | None) -> GPT2Config:
    """A GPT2Config from a config, a dict (e.g. the nested json) or None (the released values)."""
    if gpt2_config is None:
        return GPT2Config(**copy.deepcopy(RELEASED_GPT2_CONFIG))
    if isinstance(gpt2_config, GPT2Config):
        return gpt2_config
    if isinstance(gpt2_config, dict):
        values = {key: value for key, value in gpt2_config.items() if key != "model_type"}
        return GPT2Config(**copy.deepcopy(values))
    raise ValueError(f"gpt2_config must be a GPT2Config, a dict or None, got {type(gpt2_config).__name__}")


def tied_weight_keys(n_vq: int) -> dict[str, str]:
    """{head key: embedding key} of the 1 + n_vq tied pairs (spec §2.3): the text head shares the text embedding,
    audio head c the embedding of channel c."""
    tied = {"text_lm_head.weight": "transformer.wte.weight"}
    tied.update({f"audio_lm_heads.{c}.weight": f"audio_embeddings.{c}.weight" for c in range(n_vq)})
    return tied


class MossTTSNanoConfig(PretrainedConfig):
    """Configuration of `MossTTSNanoForCausalLM`: a global GPT-2 over audio frames plus a local GPT-2 over RVQ slots.

    Args:
        gpt2_config: GPT2Config or dict for both decoders (None: the released 12-layer 768-wide values).
        n_vq: number of audio channels (RVQ codebooks) per frame.
        audio_vocab_size: size of each codebook (validation only).
        audio_codebook_sizes: per-channel codebook sizes (None: `[audio_vocab_size] * n_vq`).
        audio_pad_token_id: id of an empty audio channel; must lie outside every codebook.
        pad_token_id, im_start_token_id, im_end_token_id, audio_start_token_id, audio_end_token_id,
        audio_user_slot_token_id, audio_assistant_slot_token_id: text-vocabulary ids of the prompt layout.
        tokenizer_use_fast: passed to AutoTokenizer (the tokenizer is slow only).
        audio_tokenizer_type, audio_tokenizer_pretrained_name_or_path, audio_tokenizer_sample_rate: the codec.
        attn_implementation: requested backend of the global decoder (resolved per device at run time).
        initializer_range: stored; initialisation uses `gpt2_config.initializer_range`.
        model_architecture: stored, not used.
        local_transformer_layers: layers of the local decoder.
        local_transformer_attn_implementation: requested backend of the local decoder (None: as the global one).

    Raises:
        ValueError: when the codebook sizes, the audio pad id or the decoder shape are inconsistent (spec §1.2).
    """

    model_type = "moss_tts_nano"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        gpt2_config: GPT2Config | dict | None = None,
        n_vq: int = 16,
        audio_vocab_size: int = 1024,
        audio_codebook_sizes: list[int] | None = None,
        audio_pad_token_id: int = 1024,
        pad_token_id: int = 3,
        im_start_token_id: int = 4,
        im_end_token_id: int = 5,
        audio_start_token_id: int = 6,
        audio_end_token_id: int = 7,
        audio_user_slot_token_id: int = 8,
        audio_assistant_slot_token_id: int = 9,
        tokenizer_use_fast: bool = False,
        audio_tokenizer_type: str = "moss-audio-tokenizer-nano",
        audio_tokenizer_pretrained_name_or_path: str = "OpenMOSS-Team/MOSS-Audio-Tokenizer-Nano",
        audio_tokenizer_sample_rate: int = 48000,
        attn_implementation: str | None = "sdpa",
        initializer_range: float = 0.02,
        model_architecture: str = "global_local_transformer",
        local_transformer_layers: int = 1,
        local_transformer_attn_implementation: str | None = "sdpa",
        **kwargs: Any,
    ) -> None:
        for key in _DERIVED_KEYS:
            kwargs.pop(key, None)
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.gpt2_config = _as_gpt2_config(gpt2_config)
        self.n_vq = int(n_vq)
        self.audio_vocab_size = int(audio_vocab_size)
        if audio_codebook_sizes is None:
            audio_codebook_sizes = [self.audio_vocab_size] * self.n_vq
        self.audio_codebook_sizes = [int(size) for size in audio_codebook_sizes]
        self.audio_pad_token_id = int(audio_pad_token_id)
        self.pad_token_id = pad_token_id
        self.im_start_token_id = im_start_token_id
        self.im_end_token_id = im_end_token_id
        self.audio_start_token_id = audio_start_token_id
        self.audio_end_token_id = audio_end_token_id
        self.audio_user_slot_token_id = audio_user_slot_token_id
        self.audio_assistant_slot_token_id = audio_assistant_slot_token_id
        self.tokenizer_use_fast = tokenizer_use_fast
        self.audio_tokenizer_type = audio_tokenizer_type
        self.audio_tokenizer_pretrained_name_or_path = audio_tokenizer_pretrained_name_or_path
        self.audio_tokenizer_sample_rate = audio_tokenizer_sample_rate
        self.attn_implementation = attn_implementation
        self.initializer_range = initializer_range
        self.model_architecture = model_architecture
        self.local_transformer_layers = int(local_transformer_layers)
        self.local_transformer_attn_implementation = local_transformer_attn_implementation
        # Derived from gpt2_config (spec §1.1: the json values are overwritten).
        self.vocab_size = self.gpt2_config.vocab_size
        self.hidden_size = self.gpt2_config.n_embd
        self.max_position_embeddings = self.gpt2_config.n_positions
        self.gpt2_config.pad_token_id = pad_token_id
        self.validate()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> "MossTTSNanoConfig":
        """As `PretrainedConfig.from_dict`, keeping config.json's attention request on transformers 4.57.

        4.57's from_dict replaces `attn_implementation` with the caller's keyword, None when it is not given, so the
        released request was lost on loading (spec §11 item 2); 5.x keeps it. An explicit keyword still wins.
        Remove when 4.57 support ends.
        """
        if "attn_implementation" in config_dict:
            kwargs.setdefault("attn_implementation", config_dict["attn_implementation"])
        return super().from_dict(config_dict, **kwargs)

    def validate(self) -> None:
        """Check the invariants of spec §1.2.

        Raises:
            ValueError: naming the inconsistent value and what was expected.
        """
        sizes = self.audio_codebook_sizes
        if self.n_vq < 1:
            raise ValueError(f"n_vq must be >= 1, got {self.n_vq}")
        if len(sizes) != self.n_vq:
            raise ValueError(f"audio_codebook_sizes has {len(sizes)} entries, expected n_vq={self.n_vq}")
        if min(sizes) <= 0:
            raise ValueError(f"audio_codebook_sizes must all be > 0, got {sizes}")
        if self.audio_vocab_size < max(sizes):
            raise ValueError(f"audio_vocab_size={self.audio_vocab_size} must be >= the largest codebook {max(sizes)}")
        if self.audio_pad_token_id < max(sizes):
            raise ValueError(
                f"audio_pad_token_id={self.audio_pad_token_id} must be >= the largest codebook size {max(sizes)} "
                "(the pad id must lie outside every codebook)"
            )
        self._validate_decoder_shape()

    def _validate_decoder_shape(self) -> None:
        gpt2 = self.gpt2_config
        if gpt2.n_embd % gpt2.n_head != 0:
            raise ValueError(f"gpt2_config.n_embd={gpt2.n_embd} must be divisible by n_head={gpt2.n_head}")
        if (gpt2.n_embd // gpt2.n_head) % 2 != 0:
            raise ValueError(f"head_dim={gpt2.n_embd // gpt2.n_head} must be even for the interleaved RoPE")
        kind = getattr(gpt2, "position_embedding_type", "rope")
        if kind not in POSITION_EMBEDDING_TYPES:
            raise ValueError(f"position_embedding_type={kind!r}, expected one of {POSITION_EMBEDDING_TYPES}")
        if self.local_transformer_layers < 1:
            raise ValueError(f"local_transformer_layers must be >= 1, got {self.local_transformer_layers}")

    @property
    def local_attn_implementation(self) -> str | None:
        """The requested local-decoder backend (None in the json means: the same as the global one)."""
        return self.local_transformer_attn_implementation or self.attn_implementation

    def local_gpt2_config(self) -> GPT2Config:
        """The local decoder's GPT2Config: a copy with `local_transformer_layers` layers and n_vq + 1 positions."""
        local = copy.deepcopy(self.gpt2_config)
        local.n_layer = self.local_transformer_layers
        local.n_positions = self.n_vq + 1
        local.n_ctx = self.n_vq + 1
        return local

    def to_dict(self) -> dict[str, Any]:
        """Serialise, writing `gpt2_config` as a nested dict (spec §1.2)."""
        output = super().to_dict()
        output["gpt2_config"] = self.gpt2_config.to_dict()
        return output


__all__ = ["MossTTSNanoConfig", "RELEASED_GPT2_CONFIG", "tied_weight_keys"]
