"""Slow SentencePiece tokenizer of MOSS-TTS-Nano (spec tts.md §8).

The text vocabulary is a SentencePiece BPE model (`tokenizer.model`, 16384 pieces, byte fallback). The Hugging Face
layer adds nothing to the ids: `encode(x)` equals `encode(x, add_special_tokens=False)`. Only the four HF special
tokens (`<unk>`, `<s>`, `</s>`, `<pad>`) are split out of the text before SentencePiece runs, so a literal "<s>" in
the text becomes id 1. Everything else, including the chat and audio markers (`<|im_start|>`, ids 4..14), is plain
SentencePiece output.

The class works with the slow-tokenizer base of transformers 4.57 (`PreTrainedTokenizer`) and of 5.x (where the same
name points at `PythonBackend`). Both bases call `get_vocab()` while they initialise, so the SentencePiece model is
loaded before `super().__init__`.
"""

import os
import shutil
from typing import Any, Optional

import sentencepiece as spm
from transformers import PreTrainedTokenizer
from transformers.utils import logging

logger = logging.get_logger(__name__)

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}


class MossTTSNanoSentencePieceTokenizer(PreTrainedTokenizer):
    """SentencePiece tokenizer that adds no special tokens (spec tts.md §8.2).

    Args:
        vocab_file: Path of the SentencePiece model (`tokenizer.model`).
        unk_token, bos_token, eos_token, pad_token: The HF special tokens; they are pieces 0..3 of the model.
        sp_model_kwargs: Extra keyword arguments for `sentencepiece.SentencePieceProcessor` (e.g. sampling options).
        **kwargs: Passed to `PreTrainedTokenizer`.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        unk_token: str = "<unk>",
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        pad_token: str = "<pad>",
        sp_model_kwargs: Optional[dict[str, Any]] = None,
        **kwargs,
    ):
        if vocab_file is None or not os.path.isfile(vocab_file):
            raise ValueError(f"vocab_file={vocab_file!r} is not a file; expected the path of a SentencePiece model")
        self.vocab_file = vocab_file
        self.sp_model_kwargs = dict(sp_model_kwargs or {})
        # Load before super().__init__: both transformers bases call get_vocab()/vocab_size while initialising.
        self.sp_model = self._load_sp_model()
        super().__init__(
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            sp_model_kwargs=self.sp_model_kwargs,
            **kwargs,
        )

    def _load_sp_model(self) -> spm.SentencePieceProcessor:
        processor = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        processor.Load(self.vocab_file)
        return processor

    # The processor is a SWIG object; pickling (e.g. for DataLoader workers) reloads it from the file.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["sp_model"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.sp_model = self._load_sp_model()

    @property
    def vocab_size(self) -> int:
        """Number of SentencePiece pieces (16384 for the released model)."""
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        """Return every piece with its id, plus the tokens added through the HF layer."""
        vocab = {self.sp_model.id_to_piece(index): index for index in range(self.vocab_size)}
        try:
            vocab.update(self.get_added_vocab())
        except AttributeError:  # called by the base __init__ before its added-token tables exist (4.57 and 5.x)
            pass
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        """SentencePiece pieces of `text` (the HF special tokens were already split out by the base class)."""
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """SentencePiece decode of the pieces: control pieces vanish and `<unk>` becomes " ⁇ "."""
        return self.sp_model.decode(tokens)

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: Optional[list[int]] = None
    ) -> list[int]:
        """Return the ids unchanged (pairs are concatenated): this tokenizer adds no special tokens."""
        if token_ids_1 is None:
            return list(token_ids_0)
        return list(token_ids_0) + list(token_ids_1)

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: Optional[list[int]] = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        """Mark the ids that are HF special tokens (nothing is ever added, so only existing ids can be special)."""
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        return [0] * (len(token_ids_0) + len(token_ids_1 or []))

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: Optional[list[int]] = None
    ) -> list[int]:
        """All token type ids are 0."""
        return [0] * (len(token_ids_0) + len(token_ids_1 or []))

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> tuple[str]:
        """Copy the SentencePiece model into `save_directory`.

        Args:
            save_directory: Existing folder to write into.
            filename_prefix: Optional prefix joined to the file name with "-".

        Returns:
            A one-element tuple with the written path.
        """
        if not os.path.isdir(save_directory):
            raise ValueError(f"save_directory={save_directory!r} is not a directory; expected an existing folder")
        name = VOCAB_FILES_NAMES["vocab_file"]
        target = os.path.join(save_directory, f"{filename_prefix}-{name}" if filename_prefix else name)
        if os.path.abspath(self.vocab_file) != os.path.abspath(target):
            shutil.copyfile(self.vocab_file, target)
        return (target,)


__all__ = ["MossTTSNanoSentencePieceTokenizer"]
