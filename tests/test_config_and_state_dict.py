"""The config loads the released values unchanged and validates; the released model has upstream's exact state_dict."""

import json

import pytest
import torch

from conftest import REPO_ROOT, import_module, shared_path

configuration = import_module("configuration_moss_tts_nano")
modeling = import_module("modeling_moss_tts_nano")
checkpoints = import_module("measurement.checkpoints")
MossTTSNanoConfig = configuration.MossTTSNanoConfig

RELEASED_UNIQUE_PARAMETERS = 117_311_232


def _released_config_dict(**changes):
    values = json.loads((REPO_ROOT / "config.json").read_text())
    values.pop("auto_map")
    values.update(changes)
    return values


def _meta_model(config):
    with torch.device("meta"):
        return modeling.MossTTSNanoForCausalLM(config)


def _manifest(tts_state_dict_path):
    entries = []
    for line in tts_state_dict_path.read_text().splitlines():
        name, shape = line.split(" ", 1)
        entries.append((name, tuple(json.loads(shape))))
    return entries


def test_repository_config_json_loads_the_released_values():
    config = MossTTSNanoConfig.from_pretrained(REPO_ROOT)
    assert (config.n_vq, config.audio_pad_token_id, config.pad_token_id) == (16, 1024, 3)
    assert (config.audio_start_token_id, config.audio_end_token_id) == (6, 7)
    assert (config.audio_user_slot_token_id, config.audio_assistant_slot_token_id) == (8, 9)
    assert (config.hidden_size, config.vocab_size, config.local_transformer_layers) == (768, 16384, 1)
    gpt2 = config.gpt2_config
    assert (gpt2.n_layer, gpt2.n_head, gpt2.n_inner, gpt2.position_embedding_type, gpt2.rope_base) == (
        12, 12, 3072, "rope", 10000.0)


def test_released_flash_attention_values_are_accepted_and_kept():
    config = MossTTSNanoConfig(**_released_config_dict(
        attn_implementation="flash_attention_2", local_transformer_attn_implementation="flash_attention_2"))
    assert config.attn_implementation == "flash_attention_2"
    assert config.local_attn_implementation == "flash_attention_2"


def test_defaults_are_the_released_model():
    config = MossTTSNanoConfig()
    assert (config.n_vq, config.pad_token_id, config.local_transformer_layers) == (16, 3, 1)
    assert config.gpt2_config.n_embd == 768 and config.gpt2_config.n_layer == 12


def test_config_round_trips_with_a_nested_gpt2_dict(tmp_path):
    config = checkpoints.tiny_config()
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert isinstance(saved["gpt2_config"], dict) and saved["gpt2_config"]["n_embd"] == 64
    again = MossTTSNanoConfig.from_pretrained(tmp_path)
    assert again.gpt2_config.n_embd == 64 and again.hidden_size == 64 and again.n_vq == 16


@pytest.mark.parametrize("changes, message", [
    (dict(n_vq=4, audio_codebook_sizes=[1024] * 3), "audio_codebook_sizes"),
    (dict(audio_codebook_sizes=[1024] * 15 + [0]), "> 0"),
    (dict(audio_vocab_size=512, audio_codebook_sizes=[1024] * 16), "audio_vocab_size"),
    (dict(audio_pad_token_id=1023), "audio_pad_token_id"),
    (dict(gpt2_config=dict(n_embd=66, n_head=4)), "divisible"),
    (dict(gpt2_config=dict(position_embedding_type="alibi")), "position_embedding_type"),
])
def test_inconsistent_config_raises_value_error(changes, message):
    with pytest.raises(ValueError, match=message):
        MossTTSNanoConfig(**changes)


def test_released_state_dict_matches_the_upstream_manifest():
    tts_state_dict = shared_path("spec", "tts_state_dict.txt")
    model = _meta_model(MossTTSNanoConfig.from_pretrained(REPO_ROOT))
    state = model.state_dict()
    assert [(name, tuple(tensor.shape)) for name, tensor in state.items()] == _manifest(tts_state_dict)
    assert len(state) == 194


def test_released_model_has_the_upstream_unique_parameter_count():
    model = _meta_model(MossTTSNanoConfig.from_pretrained(REPO_ROOT))
    parameters = list(model.parameters())  # deduplicated: tied heads count once
    assert len(parameters) == 177
    assert sum(p.numel() for p in parameters) == RELEASED_UNIQUE_PARAMETERS


def test_heads_are_tied_to_embeddings():
    model = _meta_model(checkpoints.tiny_config())
    assert model.text_lm_head.weight is model.transformer.wte.weight
    for head, embedding in zip(model.audio_lm_heads, model.audio_embeddings):
        assert head.weight is embedding.weight
    heads = {"text_lm_head.weight"} | {f"audio_lm_heads.{c}.weight" for c in range(16)}
    assert set(model.all_tied_weights_keys) == heads


def test_state_dict_has_no_persistent_buffers_and_no_local_wte():
    model = _meta_model(checkpoints.tiny_config())
    names = set(model.state_dict())
    assert not any("inv_freq" in name for name in names)
    assert "local_transformer.wte.weight" not in names
    assert len(names) == 74
