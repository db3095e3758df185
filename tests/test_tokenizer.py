"""The slow SentencePiece tokenizer against the golden tokenizer cases (spec tts.md §8).

Run under both transformers versions (5.x and 4.57.1): the golden ids are the same on both.
"""

import json
import os
import pickle
import shutil

import pytest
import sentencepiece as spm

from conftest import REPO_ROOT, import_module, shared_path

tokenization = import_module("tokenization_moss_tts_nano")
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenization_moss_tts_nano.py")


@pytest.fixture(scope="module")
def golden_cases() -> dict:
    return json.loads(shared_path("golden", "tts_tiny", "cases.json").read_text(encoding="utf-8"))["tokenizer"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A folder laid out like the released repository: tokenizer.model, configs and the remote-code module."""
    model = shared_path("assets", "tokenizer.model")
    folder = tmp_path_factory.mktemp("tokenizer_repo")
    shutil.copyfile(model, folder / "tokenizer.model")
    for name in TOKENIZER_FILES:
        shutil.copyfile(REPO_ROOT / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def auto_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=True, use_fast=False, local_files_only=True)


@pytest.fixture(scope="module")
def raw_sentencepiece():
    return spm.SentencePieceProcessor(model_file=str(shared_path("assets", "tokenizer.model")))


def test_auto_tokenizer_loads_the_remote_code_class(auto_tokenizer):
    assert type(auto_tokenizer).__name__ == "MossTTSNanoSentencePieceTokenizer"
    assert not auto_tokenizer.is_fast
    assert auto_tokenizer.vocab_size == 16384
    assert len(auto_tokenizer) == 16384
    assert auto_tokenizer.model_input_names == ["input_ids", "attention_mask"]
    special = (auto_tokenizer.unk_token_id, auto_tokenizer.bos_token_id, auto_tokenizer.eos_token_id)
    assert special + (auto_tokenizer.pad_token_id,) == (0, 1, 2, 3)


def test_loading_leaves_hf_modules_cache_alone(tokenizer_dir):
    from transformers import AutoTokenizer, dynamic_module_utils

    before = (os.environ.get("HF_MODULES_CACHE"), dynamic_module_utils.HF_MODULES_CACHE)
    AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=True, use_fast=False, local_files_only=True)
    assert (os.environ.get("HF_MODULES_CACHE"), dynamic_module_utils.HF_MODULES_CACHE) == before


def test_encode_gives_golden_ids_and_pieces(auto_tokenizer, golden_cases):
    for case in golden_cases["cases"]:
        ids = auto_tokenizer.encode(case["text"], add_special_tokens=False)
        assert ids == case["ids"], case["text"]
        assert auto_tokenizer.convert_ids_to_tokens(ids) == case["pieces"], case["text"]
        assert auto_tokenizer.tokenize(case["text"]) == case["pieces"], case["text"]


def test_decode_gives_golden_text(auto_tokenizer, golden_cases):
    for case in golden_cases["cases"]:
        decoded = auto_tokenizer.decode(case["ids"])
        assert decoded == case["decode"], case["text"]
        assert (decoded == case["text"]) == case["roundtrip_exact"], case["text"]


def test_ids_equal_raw_sentencepiece_except_literal_hf_specials(auto_tokenizer, raw_sentencepiece, golden_cases):
    for case in golden_cases["cases"]:
        raw = raw_sentencepiece.encode(case["text"])
        assert raw == case["raw_sentencepiece_encode_ids"], case["text"]
        same = auto_tokenizer.encode(case["text"], add_special_tokens=False) == raw
        assert same == case["same_as_raw_sentencepiece"], case["text"]


def test_encode_adds_no_special_tokens(auto_tokenizer):
    text = "Hello world."
    assert auto_tokenizer.encode(text) == auto_tokenizer.encode(text, add_special_tokens=False) == [7026, 1177, 10380]
    encoded = auto_tokenizer(text, return_token_type_ids=True)
    assert encoded["input_ids"] == [7026, 1177, 10380]
    assert encoded["token_type_ids"] == [0, 0, 0]
    assert encoded["attention_mask"] == [1, 1, 1]
    assert auto_tokenizer.build_inputs_with_special_tokens([5, 6], [7]) == [5, 6, 7]
    assert auto_tokenizer.num_special_tokens_to_add() == 0


def test_literal_hf_special_strings_are_split_out(auto_tokenizer, raw_sentencepiece):
    assert auto_tokenizer.encode("<s>hi", add_special_tokens=False) == [1, 547]
    assert len(raw_sentencepiece.encode("<s>hi")) == 5


def test_template_markers_are_ordinary_pieces(auto_tokenizer):
    assert auto_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|audio_end|>", "</user_inst>"]) == [4, 7, 14]
    assert auto_tokenizer.encode("\n", add_special_tokens=False) == []
    assert auto_tokenizer.get_special_tokens_mask([1, 4, 7026, 3], already_has_special_tokens=True) == [1, 0, 0, 1]


def test_get_vocab_holds_every_piece(auto_tokenizer, raw_sentencepiece):
    vocab = auto_tokenizer.get_vocab()
    assert len(vocab) == 16384
    assert vocab["<pad>"] == 3 and vocab["<0xFF>"] == 270
    assert vocab[raw_sentencepiece.id_to_piece(16383)] == 16383


def test_save_pretrained_copies_the_model_and_reloads(auto_tokenizer, tokenizer_dir, tmp_path):
    auto_tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == (tokenizer_dir / "tokenizer.model").read_bytes()
    reloaded = tokenization.MossTTSNanoSentencePieceTokenizer.from_pretrained(tmp_path)
    text = "Mixed 中文 and English, <s> too."
    assert reloaded.encode(text) == auto_tokenizer.encode(text)
    written = auto_tokenizer.save_vocabulary(str(tmp_path), filename_prefix="copy")
    assert written == (str(tmp_path / "copy-tokenizer.model"),)


def test_pickled_tokenizer_encodes_the_same(auto_tokenizer):
    copy = pickle.loads(pickle.dumps(auto_tokenizer))
    assert copy.encode("你好，世界。Hello again.") == auto_tokenizer.encode("你好，世界。Hello again.")


def test_missing_vocab_file_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="vocab_file"):
        tokenization.MossTTSNanoSentencePieceTokenizer(str(tmp_path / "absent.model"))


def test_added_tokens_reach_the_vocabulary(tokenizer_dir):
    """get_vocab reads the added tokens through the public get_added_vocab (the private table moved in 5.x)."""
    tokenizer = tokenization.MossTTSNanoSentencePieceTokenizer.from_pretrained(str(tokenizer_dir))
    assert tokenizer.add_tokens(["<|new_marker|>"]) == 1
    assert tokenizer.get_vocab()["<|new_marker|>"] == 16384 and len(tokenizer) == 16385
    assert tokenizer.encode("a<|new_marker|>b")[1] == 16384
