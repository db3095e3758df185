"""What we rely on from transformers works on every version from 4.57.1 to the newest (CI runs this file on 4.57.1, the
pinned 5.x and the newest release).

Each test covers one transformers internal we touch (see the audit in .ci/run's comments): the cache name in
ModelOutput (renamed `past_key_values` -> `cache` in 5.24), the HF-style incremental forward, the attention request
vs transformers' own `_attn_implementation`, tied weights, the tokenizer's added tokens and the nested gpt2_config.
"""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel

from child_process import run_child
from conftest import import_module

checkpoints = import_module("measurement.checkpoints")
modeling = import_module("modeling_moss_tts_nano")
configuration = import_module("configuration_moss_tts_nano")
MossTTSNanoOutput = modeling.MossTTSNanoOutput


@pytest.fixture(scope="module")
def model():
    return checkpoints.random_tiny_model(seed=21)


def _rows(length, seed=0, batch=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1024, (batch, length, 17), generator=generator)
    ids[..., 0] = torch.randint(10, 16384, (batch, length), generator=generator)
    return ids


# ---------------------------------------------------------------------------------------------------------------------
# The cache in the output and in forward


def test_output_cache_field_answers_to_past_key_values_too():
    by_new_name, by_old_name = MossTTSNanoOutput(cache="c"), MossTTSNanoOutput(past_key_values="c")
    for output in (by_new_name, by_old_name):
        assert output.cache == output.past_key_values == output["cache"] == output["past_key_values"] == "c"
        assert list(output.keys()) == ["cache"]
    by_old_name.past_key_values = "d"
    assert by_old_name.cache == "d" and by_old_name.to_tuple() == ("d",)


def test_output_refuses_both_cache_names():
    with pytest.raises(ValueError, match="both cache= and past_key_values="):
        MossTTSNanoOutput(cache="a", past_key_values="b")


def test_forward_takes_the_cache_under_either_name(model):
    ids = _rows(7, seed=1)
    first = model(ids[:, :4], use_cache=True, max_cache_length=7)
    assert first.cache is first.past_key_values
    by_new_name = model(ids[:, 4:], cache=first.cache).global_hidden_states
    again = model(ids[:, :4], use_cache=True, max_cache_length=7)
    by_old_name = model(ids[:, 4:], past_key_values=again.past_key_values).global_hidden_states
    torch.testing.assert_close(by_new_name, by_old_name, atol=0, rtol=0)
    with pytest.raises(ValueError, match="both"):
        model(ids[:, 4:], cache=first.cache, past_key_values=first.cache)


def test_incremental_forward_one_row_at_a_time_equals_one_shot(model):
    """The HF idiom: the first call sizes the cache to the prompt, later calls grow it (copying)."""
    ids = _rows(11, seed=2, batch=2)
    one_shot = model(ids).global_hidden_states
    output = model(ids[:, :3], use_cache=True)
    pieces, capacities = [output.global_hidden_states], [output.past_key_values.capacity]
    for position in range(3, 11):
        output = model(ids[:, position:position + 1], past_key_values=output.past_key_values)
        pieces.append(output.global_hidden_states)
        capacities.append(output.past_key_values.capacity)
    torch.testing.assert_close(torch.cat(pieces, dim=1), one_shot, atol=1e-5, rtol=1e-5)
    assert output.past_key_values.length == 11
    assert capacities == [3, 6, 6, 6, 12, 12, 12, 12, 12]  # doubling: few copies in a long loop


def test_incremental_forward_with_a_left_padded_mask_equals_one_shot(model):
    rows = [_rows(9, seed=3), _rows(6, seed=4)]
    masks = [torch.ones(1, row.shape[1], dtype=torch.bool) for row in rows]
    ids, mask = model._left_pad_inference_batch(rows, masks, device="cpu")
    one_shot = model(ids, mask).global_hidden_states
    output = model(ids[:, :5], mask[:, :5], use_cache=True)
    pieces = [output.global_hidden_states]
    for position in range(5, 9):
        output = model(ids[:, position:position + 1], mask[:, :position + 1], cache=output.cache)
        pieces.append(output.global_hidden_states)
    torch.testing.assert_close(torch.cat(pieces, dim=1), one_shot, atol=1e-5, rtol=1e-5)


def test_a_cache_with_room_is_extended_in_place(model):
    ids = _rows(6, seed=5)
    cache = model(ids[:, :4], use_cache=True, max_cache_length=6).cache
    assert model(ids[:, 4:], cache=cache).cache is cache and cache.length == 6


def test_no_transformers_deprecation_warning_for_the_cache_names():
    """In a fresh process, since transformers warns once per process."""
    output = run_child("""
        import sys, warnings
        sys.stderr = sys.stdout  # before transformers binds its log handler to stderr
        warnings.simplefilter("always")
        import torch
        from local_package import import_local_package, import_module
        import_local_package()
        checkpoints, modeling = import_module("measurement.checkpoints"), import_module("modeling_moss_tts_nano")
        model = checkpoints.random_tiny_model(seed=1)
        ids = torch.randint(10, 1000, (1, 4, 17))
        out = model(ids[:, :3], use_cache=True)
        out = model(ids[:, 3:], past_key_values=out.past_key_values)
        out = model(ids[:, 3:], cache=out.cache, return_dict=True)
        out.past_key_values = out["past_key_values"]
        modeling.MossTTSNanoOutput(past_key_values=out.cache)
        print("done")
    """)
    assert output.strip().endswith("done")
    assert "deprecated" not in output.lower()


# ---------------------------------------------------------------------------------------------------------------------
# The attention request (ours) vs transformers' `_attn_implementation` (theirs, which the model does not read)


@pytest.fixture(scope="module")
def flash_repository(tmp_path_factory, model):
    """A repository whose config.json asks for the released "flash_attention_2" (global) and eager (local)."""
    config = checkpoints.tiny_config(attn_implementation="flash_attention_2",
                                     local_transformer_attn_implementation="eager")
    folder = tmp_path_factory.mktemp("flash_repo")
    return checkpoints.write_model_repository(folder, config, model.state_dict())


def test_config_json_attention_request_survives_loading(flash_repository):
    config = AutoConfig.from_pretrained(str(flash_repository), trust_remote_code=True)
    assert (config.attn_implementation, config.local_attn_implementation) == ("flash_attention_2", "eager")
    loaded = AutoModel.from_pretrained(str(flash_repository), trust_remote_code=True)
    assert loaded.config.attn_implementation == "flash_attention_2"
    assert loaded._attention_pair() == ("sdpa", "eager")  # flash cannot run on the CPU: resolved per device


def test_from_pretrained_attention_keyword_overrides_the_config(flash_repository):
    loaded = AutoModel.from_pretrained(str(flash_repository), trust_remote_code=True, attn_implementation="eager")
    assert loaded.config.attn_implementation == "eager" and loaded._attention_pair() == ("eager", "eager")


def test_set_attn_implementation_switches_both_decoders(model):
    switched = checkpoints.random_tiny_model(seed=21)
    switched.set_attn_implementation("eager")
    assert switched._attention_pair() == ("eager", "eager")
    with pytest.raises(ValueError, match="expected one of"):
        switched.set_attn_implementation("magic")
    with pytest.raises(ValueError, match="one backend name"):
        switched.set_attn_implementation({"": "eager"})


# ---------------------------------------------------------------------------------------------------------------------
# Tied weights (a dict in 5.x, a list plus the `_tie_weights` hook in 4.57)


def test_tie_weights_reties_separated_heads():
    separated = checkpoints.random_tiny_model(seed=22)
    separated.text_lm_head.weight = torch.nn.Parameter(separated.text_lm_head.weight.detach().clone())
    separated.audio_lm_heads[3].weight = torch.nn.Parameter(separated.audio_lm_heads[3].weight.detach().clone())
    separated.tie_weights()
    assert separated.text_lm_head.weight is separated.transformer.wte.weight
    assert all(head.weight is embedding.weight
               for head, embedding in zip(separated.audio_lm_heads, separated.audio_embeddings))


def test_auto_model_loads_forwards_generates_saves_and_reloads(model, tmp_path):
    """The newest-transformers check of issue 10, on a tiny checkpoint in the upstream format."""
    checkpoints.write_model_repository(tmp_path / "repo", model.config, model.state_dict())
    loaded = AutoModel.from_pretrained(str(tmp_path / "repo"), trust_remote_code=True)
    ids = _rows(6, seed=6)
    hidden = loaded(ids).global_hidden_states
    codes = loaded.generate(ids, max_new_frames=3).audio_token_ids
    loaded.save_pretrained(tmp_path / "saved")
    again = AutoModel.from_pretrained(str(tmp_path / "saved"), trust_remote_code=True)
    assert again.text_lm_head.weight is again.transformer.wte.weight
    torch.testing.assert_close(again(ids).global_hidden_states, hidden, atol=0, rtol=0)
    assert torch.equal(again.generate(ids, max_new_frames=3).audio_token_ids, codes)


# ---------------------------------------------------------------------------------------------------------------------
# The nested gpt2_config (a plain attribute: the config declares no `sub_configs`)


def test_nested_gpt2_config_survives_the_diff_serialisation_of_save_pretrained(tmp_path):
    config = checkpoints.tiny_config(n_layer=3, rope_base=5000.0)
    config.save_pretrained(tmp_path)  # writes the diff against the defaults
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["gpt2_config"]["n_layer"] == 3 and saved["gpt2_config"]["rope_base"] == 5000.0
    again = configuration.MossTTSNanoConfig.from_pretrained(tmp_path)
    assert (again.gpt2_config.n_layer, again.gpt2_config.rope_base, again.hidden_size) == (3, 5000.0, 64)
    assert type(again.gpt2_config).__name__ == "GPT2Config"
    assert json.loads(again.to_json_string(use_diff=False))["gpt2_config"]["n_embd"] == 64
