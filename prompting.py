"""Prompt template and input rows of MOSS-TTS-Nano (spec tts.md §5).

A model input is a LongTensor [B, T, 1 + n_vq]: column 0 holds a text id, columns 1.. hold audio codes or the audio
pad id. The row kinds are

* text row: [token_id, pad x n_vq];
* reference-audio row (voice clone): [audio_user_slot (8), code_0 .. code_{n_vq-1}];
* assistant audio row (continuation prompt audio, generated frames): [audio_assistant_slot (9), codes...];
* padding row: [pad_token_id (3), pad x n_vq] with attention mask False.

Every template string is encoded on its own, so each piece gets its own SentencePiece dummy prefix; encoding the
concatenated template would give different ids. `config` is anything with the special-id attributes of
`MossTTSNanoConfig` (pad_token_id, im_start_token_id, im_end_token_id, audio_start_token_id, audio_end_token_id,
audio_user_slot_token_id, audio_assistant_slot_token_id, n_vq, audio_pad_token_id, audio_codebook_sizes).
"""

from typing import Optional, Sequence

import torch

USER_ROLE_PREFIX = "user\n"
REFERENCE_PREFIX = "<user_inst>\n- Reference(s):\n"
AFTER_REFERENCE = (
    "\n- Instruction:\nNone\n- Tokens:\nNone\n- Quality:\nNone\n- Sound Event:\nNone\n- Ambient Sound:\nNone\n"
    "- Language:\nNone\n- Text:\n"
)
USER_SUFFIX = "\n</user_inst>"
ASSISTANT_TURN_PREFIX = "\n"
ASSISTANT_ROLE_PREFIX = "assistant\n"
# Stands in for the reference when there is none (continuation mode).
NO_REFERENCE = "None"
# The two ways to prompt the model: continue a text (optionally after a transcribed prompt recording, spec §5.3), or
# speak a text in the voice of a reference recording (§5.4).
GENERATION_MODES = ("continuation", "voice_clone")


def _encode(tokenizer, text: str) -> list[int]:
    """Ids of one template piece or user text, without special tokens."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def build_user_prompt_prefix(tokenizer, config) -> list[int]:
    """[im_start] + enc("user\\n") + enc(REFERENCE_PREFIX): 13 ids with the released tokenizer."""
    return [config.im_start_token_id] + _encode(tokenizer, USER_ROLE_PREFIX) + _encode(tokenizer, REFERENCE_PREFIX)


def build_user_prompt_after_reference(tokenizer) -> list[int]:
    """enc(AFTER_REFERENCE): the fixed "None" fields and the "- Text:" header (56 ids)."""
    return _encode(tokenizer, AFTER_REFERENCE)


def build_assistant_prompt_prefix(tokenizer, config) -> list[int]:
    """enc(USER_SUFFIX) + [im_end] + enc("\\n") + [im_start] + enc("assistant\\n") (6 ids; enc("\\n") is empty)."""
    return (
        _encode(tokenizer, USER_SUFFIX)
        + [config.im_end_token_id]
        + _encode(tokenizer, ASSISTANT_TURN_PREFIX)
        + [config.im_start_token_id]
        + _encode(tokenizer, ASSISTANT_ROLE_PREFIX)
    )


def build_prompt_prefix(tokenizer, config) -> list[int]:
    """User prefix + enc("None") + after-reference ids: the text before the user text when there is no reference."""
    return (
        build_user_prompt_prefix(tokenizer, config)
        + _encode(tokenizer, NO_REFERENCE)
        + build_user_prompt_after_reference(tokenizer)
    )


def build_prompt_suffix(tokenizer, config) -> list[int]:
    """The ids after the user text: the assistant prefix."""
    return build_assistant_prompt_prefix(tokenizer, config)


def build_prompt_token_ids(tokenizer, config, text: str) -> list[int]:
    """Prompt prefix + enc(text) + prompt suffix (the continuation-mode text rows, before audio_start).

    Args:
        tokenizer: HF tokenizer of the model.
        config: Object with the special-id attributes (see module docstring).
        text: The text to synthesise.

    Returns:
        The text ids.
    """
    _check_text(text, "text")
    return build_prompt_prefix(tokenizer, config) + _encode(tokenizer, text) + build_prompt_suffix(tokenizer, config)


def decode_text(tokenizer, ids) -> str:
    """Decode text ids for display, keeping special tokens and the tokenizer's own spacing.

    Args:
        tokenizer: HF tokenizer of the model.
        ids: A sequence (or 1-D tensor) of text ids.

    Returns:
        The decoded string.
    """
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _check_text(text, name: str) -> None:
    if not isinstance(text, str):
        raise ValueError(f"{name}={text!r} is a {type(text).__name__}; expected a string")


def _row_width(config) -> int:
    return 1 + int(config.n_vq)


def _text_rows(config, token_ids: Sequence[int]) -> torch.Tensor:
    """[len(ids), 1 + n_vq] rows: the id in column 0, audio pad elsewhere."""
    rows = torch.full((len(token_ids), _row_width(config)), int(config.audio_pad_token_id), dtype=torch.long)
    rows[:, 0] = torch.tensor(list(token_ids), dtype=torch.long)
    return rows


def _audio_rows(config, codes: torch.Tensor, slot_token_id: int) -> torch.Tensor:
    """[T, 1 + n_vq] rows: the slot id in column 0, the codes [T, n_vq] after it."""
    slot = torch.full((codes.shape[0], 1), int(slot_token_id), dtype=torch.long)
    return torch.cat([slot, codes], dim=1)


def validate_prompt_audio_codes(config, prompt_audio_codes) -> torch.Tensor:
    """Check prompt codes and return them as a CPU LongTensor [T, n_vq].

    Args:
        config: Object with n_vq, audio_codebook_sizes and audio_pad_token_id.
        prompt_audio_codes: Integer tensor (or nested list) [T >= 1, n_vq]; each value is in [0, codebook size) of
            its channel or equals the audio pad id (channels beyond the quantizer count are padded).

    Raises:
        ValueError: naming the bad shape, dtype or value.
    """
    codes = torch.as_tensor(prompt_audio_codes)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"prompt_audio_codes has dtype {codes.dtype}; expected an integer tensor")
    n_vq = int(config.n_vq)
    if codes.dim() != 2 or codes.shape[1] != n_vq or codes.shape[0] < 1:
        raise ValueError(f"prompt_audio_codes has shape {tuple(codes.shape)}; expected [frames >= 1, {n_vq}]")
    codes = codes.to(device="cpu", dtype=torch.long)
    sizes = torch.tensor([int(size) for size in config.audio_codebook_sizes][:n_vq], dtype=torch.long)
    bad = ((codes < 0) | (codes >= sizes)) & (codes != int(config.audio_pad_token_id))
    if bad.any():
        frame, channel = (int(index) for index in bad.nonzero()[0])
        raise ValueError(
            f"prompt_audio_codes[{frame}, {channel}] = {int(codes[frame, channel])} is out of range; expected a "
            f"code in [0, {int(sizes[channel])}) or the audio pad id {int(config.audio_pad_token_id)}"
        )
    return codes


def _as_batch(rows: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [T, W] -> (ids [1, T, W] long, mask [1, T] bool all True) on `device`."""
    ids = rows.unsqueeze(0)
    mask = torch.ones(ids.shape[:2], dtype=torch.bool)
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


def build_continuation_rows(
    tokenizer, config, text: str, prompt_text: Optional[str] = None, prompt_audio_codes=None, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input rows of continuation mode (spec §5.3).

    Args:
        tokenizer: HF tokenizer of the model.
        config: Object with the special-id attributes (see module docstring).
        text: The text to synthesise.
        prompt_text: Transcript of the prompt audio; given together with `prompt_audio_codes` or not at all. The
            text encoded is `prompt_text + text` (no separator).
        prompt_audio_codes: Codes [T, n_vq] of the prompt audio; they follow audio_start as assistant rows.
        device: Where to put the tensors (default CPU).

    Returns:
        (input_ids [1, T, 1 + n_vq] long, attention_mask [1, T] bool, all True).

    Raises:
        ValueError: if only one of prompt_text / prompt_audio_codes is given, or either is malformed.
    """
    _check_text(text, "text")
    if (prompt_text is None) != (prompt_audio_codes is None):
        raise ValueError(
            f"continuation got prompt_text={'set' if prompt_text is not None else None} and prompt_audio_codes="
            f"{'set' if prompt_audio_codes is not None else None}; expected both (to continue audio) or neither"
        )
    if prompt_text is not None:
        _check_text(prompt_text, "prompt_text")
        text = prompt_text + text
    ids = build_prompt_token_ids(tokenizer, config, text) + [config.audio_start_token_id]
    parts = [_text_rows(config, ids)]
    if prompt_audio_codes is not None:
        codes = validate_prompt_audio_codes(config, prompt_audio_codes)
        parts.append(_audio_rows(config, codes, config.audio_assistant_slot_token_id))
    return _as_batch(torch.cat(parts, dim=0), device)


def build_voice_clone_rows(
    tokenizer, config, text: str, prompt_audio_codes, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input rows of voice-clone mode (spec §5.4).

    Rows: user prefix + [audio_start]; the reference codes with the user audio slot; then [audio_end] +
    after-reference + enc(text) + assistant prefix + [audio_start].

    Args:
        tokenizer: HF tokenizer of the model.
        config: Object with the special-id attributes (see module docstring).
        text: The text to synthesise (one chunk).
        prompt_audio_codes: Reference codes [T, n_vq].
        device: Where to put the tensors (default CPU).

    Returns:
        (input_ids [1, T, 1 + n_vq] long, attention_mask [1, T] bool, all True).

    Raises:
        ValueError: if `text` is not a string or the codes are missing or malformed.
    """
    _check_text(text, "text")
    tail = _encode(tokenizer, text) + build_assistant_prompt_prefix(tokenizer, config) + [config.audio_start_token_id]
    voice = _voice_rows(tokenizer, config, prompt_audio_codes)
    return _as_batch(torch.cat([voice, _text_rows(config, tail)], dim=0), device)


def _voice_rows(tokenizer, config, prompt_audio_codes) -> torch.Tensor:
    """The voice-clone rows before the text, the same for every text in that voice: user prefix + [audio_start]; the
    reference codes with the user audio slot; [audio_end] + after-reference."""
    if prompt_audio_codes is None:
        raise ValueError("voice_clone got prompt_audio_codes=None; expected reference codes [frames, n_vq]")
    codes = validate_prompt_audio_codes(config, prompt_audio_codes)
    head = build_user_prompt_prefix(tokenizer, config) + [config.audio_start_token_id]
    middle = [config.audio_end_token_id] + build_user_prompt_after_reference(tokenizer)
    reference = _audio_rows(config, codes, config.audio_user_slot_token_id)
    return torch.cat([_text_rows(config, head), reference, _text_rows(config, middle)], dim=0)


def shared_prefix_rows(tokenizer, config, mode: str, prompt_audio_codes=None) -> int:
    """How many leading rows of `mode`'s prompts do not depend on the text: in voice clone the user prefix,
    audio_start, the reference rows, audio_end and the after-reference ids (one voice's prompts share them); in
    continuation the prompt prefix (the text encoded after it is prompt_text + text, so nothing later is shared).

    Args:
        prompt_audio_codes: voice clone: the reference codes [T_ref, n_vq].
    """
    check_mode(mode)
    if mode == "continuation":
        return len(build_prompt_prefix(tokenizer, config))
    return _voice_rows(tokenizer, config, prompt_audio_codes).shape[0]


def check_mode(mode) -> None:
    """Raises ValueError for a mode outside GENERATION_MODES, naming it."""
    if mode not in GENERATION_MODES:
        raise ValueError(f"mode={mode!r} is unknown; expected one of {GENERATION_MODES}")


def build_prompt_rows(
    tokenizer, config, mode: str, text: str, prompt_text: Optional[str] = None, prompt_audio_codes=None, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input rows of one text in `mode`: build_continuation_rows or build_voice_clone_rows.

    Returns:
        (input_ids [1, T, 1 + n_vq] long, attention_mask [1, T] bool, all True).

    Raises:
        ValueError: an unknown mode, a voice clone without reference codes or with prompt_text, or what the row
            builder of the mode raises.
    """
    check_mode(mode)
    if mode == "continuation":
        return build_continuation_rows(tokenizer, config, text, prompt_text, prompt_audio_codes, device)
    if prompt_text is not None:
        raise ValueError("mode='voice_clone' does not take prompt_text; use mode='continuation'")
    return build_voice_clone_rows(tokenizer, config, text, prompt_audio_codes, device)


def _squeeze_single(ids: torch.Tensor, mask: torch.Tensor, width: int, index: int):
    """Accept ids [1, T, W] or [T, W] and mask [1, T] or [T]; return ([T, W], [T])."""
    ids = ids[0] if ids.dim() == 3 and ids.shape[0] == 1 else ids
    mask = mask[0] if mask.dim() == 2 and mask.shape[0] == 1 else mask
    if ids.dim() != 2 or ids.shape[1] != width:
        raise ValueError(f"ids_list[{index}] has shape {tuple(ids.shape)}; expected [1, T, {width}] or [T, {width}]")
    if mask.dim() != 1 or mask.shape[0] != ids.shape[0]:
        length = ids.shape[0]
        raise ValueError(f"mask_list[{index}] has shape {tuple(mask.shape)}; expected [1, {length}] or [{length}]")
    return ids, mask


def left_pad_batch(ids_list, mask_list, config, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad single prompts into one batch (spec §5.5, upstream `_left_pad_inference_batch`).

    Args:
        ids_list: Prompts, each [1, T_i, 1 + n_vq] (or [T_i, 1 + n_vq]).
        mask_list: Their attention masks, each [1, T_i] (or [T_i]).
        config: Object with pad_token_id, audio_pad_token_id and n_vq.
        device: Where to put the batch (default: the first prompt's device).

    Returns:
        (input_ids [B, T_max, 1 + n_vq] long, attention_mask [B, T_max] bool); pad rows are
        [pad_token_id, audio pad x n_vq] with mask False.

    Raises:
        ValueError: if the lists are empty, differ in length, or hold malformed tensors.
    """
    if len(ids_list) == 0 or len(ids_list) != len(mask_list):
        raise ValueError(f"got {len(ids_list)} prompts and {len(mask_list)} masks; expected the same number >= 1")
    width = _row_width(config)
    pairs = [_squeeze_single(ids, mask, width, index) for index, (ids, mask) in enumerate(zip(ids_list, mask_list))]
    device = torch.device(device) if device is not None else pairs[0][0].device
    length = max(ids.shape[0] for ids, _ in pairs)
    batch_ids = torch.full((len(pairs), length, width), int(config.audio_pad_token_id), dtype=torch.long, device=device)
    batch_ids[:, :, 0] = int(config.pad_token_id)
    batch_mask = torch.zeros((len(pairs), length), dtype=torch.bool, device=device)
    for row, (ids, mask) in enumerate(pairs):
        batch_ids[row, length - ids.shape[0] :] = ids.to(device=device, dtype=torch.long)
        batch_mask[row, length - mask.shape[0] :] = mask.to(device=device, dtype=torch.bool)
    return batch_ids, batch_mask


__all__ = [
    "AFTER_REFERENCE",
    "GENERATION_MODES",
    "ASSISTANT_ROLE_PREFIX",
    "ASSISTANT_TURN_PREFIX",
    "NO_REFERENCE",
    "REFERENCE_PREFIX",
    "USER_ROLE_PREFIX",
    "USER_SUFFIX",
    "build_assistant_prompt_prefix",
    "build_continuation_rows",
    "build_prompt_prefix",
    "build_prompt_rows",
    "build_prompt_suffix",
    "build_prompt_token_ids",
    "build_user_prompt_after_reference",
    "build_user_prompt_prefix",
    "build_voice_clone_rows",
    "check_mode",
    "decode_text",
    "left_pad_batch",
    "validate_prompt_audio_codes",
]
