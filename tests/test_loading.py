"""Checkpoints in the upstream format load through the Auto classes with ties intact (transformers 4.57 and 5.x)."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from conftest import REPO_ROOT, import_module

checkpoints = import_module("measurement.checkpoints")
configuration = import_module("configuration_moss_tts_nano")

GENERATE = dict(max_new_frames=3, do_sample=False)


@pytest.fixture(scope="module")
def tiny_model():
    return checkpoints.random_tiny_model(seed=3)


def _prompt(batch=1, length=6):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1024, (batch, length, 17), generator=generator)
    ids[..., 0] = torch.randint(10, 16384, (batch, length), generator=generator)
    return ids


def _assert_tied(model):
    assert model.text_lm_head.weight is model.transformer.wte.weight
    for head, embedding in zip(model.audio_lm_heads, model.audio_embeddings):
        assert head.weight is embedding.weight


def _assert_same_weights(model, reference_state, dtype):
    loaded = model.state_dict()
    assert set(loaded) == set(reference_state)
    for name, tensor in reference_state.items():
        assert torch.equal(loaded[name], tensor.to(dtype).float()), name


def test_upstream_checkpoint_has_every_key_in_16_bits_with_tied_storage(tiny_model, tmp_path):
    path = checkpoints.save_upstream_checkpoint(tiny_model, tmp_path, dtype=torch.float16)
    state = torch.load(path, weights_only=True)
    assert list(state) == list(tiny_model.state_dict())
    assert {tensor.dtype for tensor in state.values()} == {torch.float16}
    for head, embedding in configuration.tied_weight_keys(16).items():
        assert state[head].untyped_storage().data_ptr() == state[embedding].untyped_storage().data_ptr()
    assert len({tensor.untyped_storage().data_ptr() for tensor in state.values()}) == len(state) - 17


@pytest.mark.parametrize("auto_class", [AutoModel, AutoModelForCausalLM])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_upstream_checkpoint_loads_through_auto_classes_with_ties(tiny_model, tmp_path, auto_class, dtype):
    checkpoints.write_model_repository(tmp_path, tiny_model.config, tiny_model.state_dict(), dtype=dtype)
    model = auto_class.from_pretrained(str(tmp_path), trust_remote_code=True)
    assert type(model).__name__ == "MossTTSNanoForCausalLM"
    assert model.dtype == torch.float32  # 16-bit storage, upcast on load like the release
    _assert_tied(model)
    _assert_same_weights(model, tiny_model.state_dict(), dtype)


def test_stray_local_wte_key_is_ignored(tiny_model, tmp_path):
    checkpoints.write_model_repository(tmp_path, tiny_model.config, tiny_model.state_dict())
    state = torch.load(tmp_path / checkpoints.CHECKPOINT_NAME, weights_only=True)
    state["local_transformer.wte.weight"] = torch.zeros(16384, 64, dtype=torch.bfloat16)
    torch.save(state, tmp_path / checkpoints.CHECKPOINT_NAME)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=True)
    _assert_tied(model)
    _assert_same_weights(model, tiny_model.state_dict(), torch.bfloat16)


def test_checkpoint_without_tied_duplicates_still_ties(tiny_model, tmp_path):
    checkpoints.write_model_repository(tmp_path, tiny_model.config, tiny_model.state_dict())
    state = torch.load(tmp_path / checkpoints.CHECKPOINT_NAME, weights_only=True)
    for head in configuration.tied_weight_keys(16):
        del state[head]
    torch.save(state, tmp_path / checkpoints.CHECKPOINT_NAME)
    model = AutoModel.from_pretrained(str(tmp_path), trust_remote_code=True)
    _assert_tied(model)
    _assert_same_weights(model, tiny_model.state_dict(), torch.bfloat16)


def test_released_flash_attention_config_generates_on_cpu(tiny_model, tmp_path):
    config = checkpoints.tiny_config(attn_implementation="flash_attention_2",
                                     local_transformer_attn_implementation="flash_attention_2")
    checkpoints.write_model_repository(tmp_path, config, tiny_model.state_dict())
    model = AutoModel.from_pretrained(str(tmp_path), trust_remote_code=True)
    reference = checkpoints.random_tiny_model(seed=3)
    reference.load_state_dict(model.state_dict())
    ids = _prompt()
    assert torch.equal(model.generate(ids, **GENERATE).audio_token_ids,
                       reference.generate(ids, **GENERATE).audio_token_ids)


def test_save_pretrained_round_trip_keeps_ties_and_values(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    loaded = type(tiny_model).from_pretrained(tmp_path)
    _assert_tied(loaded)
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_checkpoints_command_writes_a_loadable_repository(tmp_path, tokenizer_model_path):
    out = tmp_path / "tiny_repo"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "measurement/checkpoints.py"), str(out), "--tokenizer",
                             str(tokenizer_model_path)], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    from transformers import AutoTokenizer

    model = AutoModel.from_pretrained(str(out), trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    ids, mask = model.build_inference_input_ids("Hello world.", tokenizer)
    assert ids.shape == (1, 81, 17) and mask.all()
    assert model.generate(ids, mask, **GENERATE).audio_token_ids.shape[0] == 1


def test_load_checkpoint_reads_tensors_but_refuses_pickled_code(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.bin")
    assert torch.equal(checkpoints.load_checkpoint(tmp_path / "ok.bin")["w"], torch.ones(2))

    class RunsCode:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    torch.save({"w": RunsCode()}, tmp_path / "evil.bin")
    with pytest.raises(ValueError, match="refusing to load .*evil.bin"):
        checkpoints.load_checkpoint(tmp_path / "evil.bin")


def test_modeling_file_imports_every_module_it_reaches_directly():
    """transformers 4.57.1 copies only the modeling file's own relative imports out of a local folder.

    So every module reachable from `modeling_moss_tts_nano.py` (through `from .x import y` anywhere in the files it
    reaches) must also be imported by the modeling file itself, or `from_pretrained(folder)` fails on 4.57.1.
    """
    import re

    pattern = re.compile(r"^\s*from\s+\.(\w+)\s+import", re.M)

    def relative_imports(module):
        return set(pattern.findall((REPO_ROOT / f"{module}.py").read_text(encoding="utf-8")))

    reachable, todo = set(), ["modeling_moss_tts_nano"]
    while todo:
        for name in relative_imports(todo.pop()) - reachable:
            reachable.add(name)
            todo.append(name)
    missing = reachable - relative_imports("modeling_moss_tts_nano") - {"modeling_moss_tts_nano"}
    assert not missing, f"modeling_moss_tts_nano.py must import these relatively too: {sorted(missing)}"


def test_no_model_file_names_an_optional_package_in_an_import_statement():
    """transformers refuses remote code whose files import a package that is not installed (`check_imports` reads
    their import statements, try blocks excepted). The optional ones are imported by name where they are used."""
    from transformers.dynamic_module_utils import get_imports

    optional = {"onnx", "onnxruntime", "torch_npu", "flash_attn", "ray"}
    scripts = import_module("measurement.checkpoints").NON_LIBRARY_FILES
    for path in sorted(REPO_ROOT.glob("*.py")):
        if path.name not in scripts and path.name != "__init__.py":
            assert not set(get_imports(str(path))) & optional, path.name
