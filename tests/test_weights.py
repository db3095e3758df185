"""weights: pinned, sha256-checked files from a fake hub (never the network) into the repository layout."""

import hashlib
import json
import logging
import shutil
import socket
import subprocess
import time
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, import_module

weights = import_module("weights")

CODEC_CONFIG = {
    "model_type": "moss-audio-tokenizer",
    "auto_map": {
        "AutoConfig": "configuration_moss_audio_tokenizer.MossAudioTokenizerConfig",
        "AutoModel": "modeling_moss_audio_tokenizer.MossAudioTokenizerModel",
    },
}
CONTENTS = {
    "tts_weights": b"fake tts weights " * 64,
    "tokenizer_model": b"fake sentencepiece model",
    "codec_config": json.dumps(CODEC_CONFIG).encode(),
    "codec_weights": b"fake codec safetensors " * 32,
}
# Module files of a fake code folder: the two codec modules import a helper and devices relatively; `unrelated` is not
# reachable from them and must not be copied.
CODE = {
    "configuration_moss_audio_tokenizer.py": "from .codec_helpers import HOP\n",
    "modeling_moss_audio_tokenizer.py": "from .configuration_moss_audio_tokenizer import HOP\nfrom . import devices\n",
    "codec_helpers.py": "HOP = 3840\n",
    "devices.py": "import os\n",
    "unrelated.py": "from .modeling_moss_tts_nano import X\n",
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_pins():
    """Small pins shaped like the real table: two full hashes, one prefix only, one unpublished hash."""
    tts, codec = ("org/tts", "a" * 40), ("org/codec", "b" * 40)
    return (
        weights.PinnedFile("tts_weights", *tts, "pytorch_model.bin", "pytorch_model.bin",
                           len(CONTENTS["tts_weights"]), sha256(CONTENTS["tts_weights"]), modelscope_repo_id="ms/tts"),
        weights.PinnedFile("tokenizer_model", *tts, "tokenizer.model", "tokenizer.model",
                           len(CONTENTS["tokenizer_model"]), sha256(CONTENTS["tokenizer_model"]),
                           modelscope_repo_id="ms/tts"),
        weights.PinnedFile("codec_config", *codec, "config.json", "audio_tokenizer/config.json",
                           len(CONTENTS["codec_config"]), None, sha256(CONTENTS["codec_config"])[:8],
                           modelscope_repo_id="ms/codec"),
        weights.PinnedFile("codec_weights", *codec, "model.safetensors", "audio_tokenizer/model.safetensors",
                           len(CONTENTS["codec_weights"]), None, modelscope_repo_id="ms/codec"),
    )


class FakeHub:
    """A local folder laid out as <repo_id>/<revision>/<filename>, used as a Downloader; counts calls."""

    def __init__(self, root: Path, pins, contents=CONTENTS):
        self.root, self.calls = root, []
        for pin in pins:
            path = self.path(pin)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(contents[pin.name])

    def path(self, pin):
        return self.root / pin.repo_id / pin.revision / pin.filename

    def __call__(self, pin, offline):
        self.calls.append((pin.name, offline))
        if not self.path(pin).is_file():
            raise FileNotFoundError(f"{pin.label} is not on the fake hub")
        return self.path(pin)


def unreachable(pin, offline):
    raise ConnectionError("Failed to resolve 'huggingface.co' (network is unreachable)")


@pytest.fixture
def pins():
    return make_pins()


@pytest.fixture
def hub(tmp_path, pins):
    return FakeHub(tmp_path / "hub", pins)


@pytest.fixture
def code_dir(tmp_path):
    folder = tmp_path / "code"
    folder.mkdir()
    for name, text in CODE.items():
        (folder / name).write_text(text)
    return folder


@pytest.fixture
def listening_endpoint():
    """A URL of a socket listening on 127.0.0.1 (a connection succeeds; nothing is ever served)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


@pytest.fixture
def refused_endpoint():
    """A URL of a free 127.0.0.1 port: connections are refused at once, as on a machine without network."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def ensure(target, pins, code_dir, **kwargs):
    kwargs.setdefault("offline", False)
    return weights.ensure_model_files(target, pins=pins, code_dir=code_dir, progress=False, **kwargs)


def leftovers(folder: Path):
    return sorted(p.name for p in folder.rglob("*.part"))


def test_download_builds_the_repository_layout_with_verified_files(tmp_path, pins, hub, code_dir):
    target = tmp_path / "repo"
    files = ensure(target, pins, code_dir, downloaders={"hf": hub})
    for pin in pins:
        assert (target / pin.target).read_bytes() == CONTENTS[pin.name]
    assert files.root == target.resolve() and files.codec_dir == target.resolve() / "audio_tokenizer"
    assert files.tts_weights == target.resolve() / "pytorch_model.bin"
    assert files.codec_weights.parent == files.codec_dir and files.tokenizer_model.name == "tokenizer.model"
    copied = sorted(p.name for p in files.codec_dir.glob("*.py"))
    assert copied == ["codec_helpers.py", "configuration_moss_audio_tokenizer.py", "devices.py",
                      "modeling_moss_audio_tokenizer.py"]
    assert leftovers(target) == []


def test_unpublished_hashes_are_recorded_in_a_lock_file_next_to_the_weights(tmp_path, pins, hub, code_dir):
    target = tmp_path / "repo"
    ensure(target, pins, code_dir, downloaders={"hf": hub})
    lock = json.loads((target / "audio_tokenizer" / weights.LOCK_FILENAME).read_text())
    assert set(lock) == {"config.json", "model.safetensors"}
    assert lock["model.safetensors"]["sha256"] == sha256(CONTENTS["codec_weights"])
    assert lock["model.safetensors"]["revision"] == "b" * 40
    assert not (target / weights.LOCK_FILENAME).exists()


def test_files_placed_by_hand_are_verified_and_their_unpublished_hashes_locked(tmp_path, pins, code_dir):
    target = tmp_path / "repo"
    for pin in pins:
        (target / pin.target).parent.mkdir(parents=True, exist_ok=True)
        (target / pin.target).write_bytes(CONTENTS[pin.name])
    ensure(target, pins, code_dir, source="local")
    lock = json.loads((target / "audio_tokenizer" / weights.LOCK_FILENAME).read_text())
    assert lock["config.json"]["sha256"] == sha256(CONTENTS["codec_config"])


def test_second_call_reuses_the_files_without_downloading(tmp_path, pins, hub, code_dir):
    target = tmp_path / "repo"
    ensure(target, pins, code_dir, downloaders={"hf": hub})
    assert len(hub.calls) == 4
    again = ensure(target, pins, code_dir, downloaders={"hf": unreachable})
    assert len(hub.calls) == 4 and again.tts_weights.read_bytes() == CONTENTS["tts_weights"]


def test_corrupt_download_is_rejected_naming_the_file_and_both_hashes(tmp_path, pins, code_dir):
    bad = dict(CONTENTS, tts_weights=CONTENTS["tts_weights"][:-1] + b"!")
    hub = FakeHub(tmp_path / "hub", pins, bad)
    target = tmp_path / "repo"
    with pytest.raises(weights.ChecksumError) as error:
        ensure(target, pins, code_dir, downloaders={"hf": hub})
    message = str(error.value)
    assert str(hub.path(pins[0])) in message
    assert sha256(CONTENTS["tts_weights"]) in message and sha256(bad["tts_weights"]) in message
    assert "It was not installed" in message and "delete the corrupt copy" in message
    assert not (target / "pytorch_model.bin").exists() and leftovers(target) == []


def test_wrong_size_download_is_rejected(tmp_path, pins, code_dir):
    hub = FakeHub(tmp_path / "hub", pins, dict(CONTENTS, codec_weights=b"truncated"))
    with pytest.raises(weights.ChecksumError, match="87|bytes") as error:
        ensure(tmp_path / "repo", pins, code_dir, downloaders={"hf": hub})
    assert f"{len(CONTENTS['codec_weights']):,} bytes" in str(error.value) and "got sha256" in str(error.value)
    assert not (tmp_path / "repo" / "audio_tokenizer" / "model.safetensors").exists()


def test_prefix_mismatch_rejects_a_file_whose_full_hash_is_unpublished(tmp_path, pins, code_dir):
    other = json.dumps(dict(CODEC_CONFIG, model_type="moss-audio-tokenizeR")).encode()
    hub = FakeHub(tmp_path / "hub", pins, dict(CONTENTS, codec_config=other))
    with pytest.raises(weights.ChecksumError, match="only this prefix is published"):
        ensure(tmp_path / "repo", pins, code_dir, downloaders={"hf": hub})


def test_corrupt_file_in_place_is_removed_and_fetched_again(tmp_path, pins, hub, code_dir, caplog):
    target = tmp_path / "repo"
    target.mkdir()
    (target / "tokenizer.model").write_bytes(b"x" * len(CONTENTS["tokenizer_model"]))
    with caplog.at_level(logging.WARNING, logger=weights.logger.name):
        files = ensure(target, pins, code_dir, downloaders={"hf": hub})
    assert files.tokenizer_model.read_bytes() == CONTENTS["tokenizer_model"]
    assert "Checksum mismatch" in caplog.text and "fetching it again" in caplog.text


def test_corrupt_file_in_place_without_a_source_is_removed_not_trusted(tmp_path, pins, hub, code_dir):
    target = tmp_path / "repo"
    ensure(target, pins, code_dir, downloaders={"hf": hub})
    (target / "pytorch_model.bin").write_bytes(b"y" * len(CONTENTS["tts_weights"]))
    with pytest.raises(weights.ChecksumError, match="The file was removed"):
        ensure(target, pins, code_dir, source="local")
    assert not (target / "pytorch_model.bin").exists()


def test_codec_weights_are_verified_against_the_lock_file_after_the_first_download(tmp_path, pins, hub, code_dir):
    target = tmp_path / "repo"
    ensure(target, pins, code_dir, downloaders={"hf": hub})
    swapped = target / "audio_tokenizer" / "model.safetensors"
    swapped.write_bytes(b"z" * len(CONTENTS["codec_weights"]))
    with pytest.raises(weights.ChecksumError, match="the lock file .*weights.lock.json"):
        ensure(target, pins, code_dir, source="local")


def test_missing_network_explains_exactly_what_to_fetch_and_where(tmp_path, pins, code_dir):
    target = tmp_path / "repo"
    with pytest.raises(weights.WeightsUnavailableError) as error:
        ensure(target, pins, code_dir, downloaders={"hf": unreachable, "modelscope": unreachable})
    message = str(error.value)
    pin = pins[0]
    for expected in (
        "Model files missing from", "hf: ConnectionError", "modelscope: ConnectionError",
        pin.hf_url, pin.modelscope_url, pin.sha256, f"place them under {target.resolve()}",
        f"hf download org/tts pytorch_model.bin tokenizer.model --revision {'a' * 40}",
        "HF_HUB_OFFLINE=1", "HF_ENDPOINT", "HF_HOME",
    ):
        assert expected in message, expected
    for other in pins[1:]:
        assert f"  {other.target} ({other.label})" in message and other.hf_url in message
    assert not (target / "pytorch_model.bin").exists()


def test_unreachable_hub_fails_in_seconds_with_the_cause_said_once(tmp_path, pins, code_dir, monkeypatch,
                                                                  refused_endpoint):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **kwargs: pytest.fail("the client was called"))
    monkeypatch.setitem(sys.modules, "modelscope", None)
    downloaders = {"hf": weights.hf_downloader(tmp_path / "cache", endpoint=refused_endpoint),
                   "modelscope": weights.modelscope_downloader()}
    started = time.perf_counter()
    with pytest.raises(weights.WeightsUnavailableError) as error:
        ensure(tmp_path / "repo", pins, code_dir, downloaders=downloaders)
    assert time.perf_counter() - started < weights.PROBE_TIMEOUT_SECONDS + 2
    message = str(error.value)
    host = refused_endpoint.removeprefix("http://")
    assert message.count(f"hf: ConnectionError: no connection to {host} within 3 s") == 1, message
    assert message.count("optional package 'modelscope' is not installed") == 1
    assert "Every file failed the same way:" in message


def test_connection_probe_answers_none_for_a_listening_host(listening_endpoint, refused_endpoint):
    assert weights.connection_problem(listening_endpoint) is None
    assert "no connection to 127.0.0.1" in weights.connection_problem(refused_endpoint)


def test_local_source_never_downloads(tmp_path, pins, hub, code_dir):
    with pytest.raises(weights.WeightsUnavailableError, match="no download source allowed"):
        ensure(tmp_path / "repo", pins, code_dir, source="local", downloaders={"hf": hub})
    assert hub.calls == []


def test_existing_model_path_is_used_offline_and_left_untouched(tmp_path, pins, hub, code_dir):
    folder = tmp_path / "downloaded"
    ensure(folder, pins, code_dir, downloaders={"hf": hub})
    before = sorted(p.name for p in folder.rglob("*"))
    files = ensure(tmp_path / "unused", pins, code_dir, model_path=folder, downloaders={"hf": unreachable})
    assert files.root == folder.resolve() and files.codec_weights.is_file()
    assert sorted(p.name for p in folder.rglob("*")) == before and not (tmp_path / "unused").exists()


def test_model_path_problems_are_reported_without_modifying_it(tmp_path, pins, hub, code_dir):
    folder = tmp_path / "mine"
    ensure(folder, pins, code_dir, downloaders={"hf": hub})
    (folder / "tokenizer.model").write_bytes(b"q" * len(CONTENTS["tokenizer_model"]))
    with pytest.raises(weights.ChecksumError, match="tokenizer.model"):
        ensure(tmp_path, pins, code_dir, model_path=folder)
    assert (folder / "tokenizer.model").exists()
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(weights.WeightsUnavailableError, match="lacks pytorch_model.bin"):
        ensure(tmp_path, pins, code_dir, model_path=folder)
    with pytest.raises(ValueError, match="is not a folder"):
        ensure(tmp_path, pins, code_dir, model_path=folder / "pytorch_model.bin")


def fake_hf_cache(root: Path, pins):
    """The Hugging Face cache layout: models--org--name/snapshots/<commit>/<file>."""
    for pin in pins:
        path = root / f"models--{pin.repo_id.replace('/', '--')}" / "snapshots" / pin.revision / pin.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(CONTENTS[pin.name])


def test_hf_hub_offline_uses_the_hugging_face_cache(tmp_path, pins, code_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf-cache"
    fake_hf_cache(cache, pins)
    downloaders = {"hf": weights.hf_downloader(cache), "modelscope": unreachable}
    files = weights.ensure_model_files(tmp_path / "repo", pins=pins, code_dir=code_dir, progress=False,
                                       downloaders=downloaders)
    assert files.tts_weights.read_bytes() == CONTENTS["tts_weights"]


def test_hf_hub_offline_with_an_empty_cache_says_it_searched_only_the_cache(tmp_path, pins, code_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []
    downloaders = {"hf": weights.hf_downloader(tmp_path / "no-cache"), "modelscope": lambda p, o: calls.append(p)}
    searched = "only the local folder and the Hugging Face cache were searched"
    with pytest.raises(weights.WeightsUnavailableError, match=searched):
        weights.ensure_model_files(tmp_path / "repo", pins=pins, code_dir=code_dir, progress=False,
                                   downloaders=downloaders)
    assert calls == []


def test_auto_falls_back_to_modelscope_when_the_hub_is_unreachable(tmp_path, pins, hub, code_dir):
    files = ensure(tmp_path / "repo", pins, code_dir, downloaders={"hf": unreachable, "modelscope": hub})
    assert files.codec_weights.read_bytes() == CONTENTS["codec_weights"] and len(hub.calls) == 4


def test_modelscope_downloader_asks_for_the_pinned_branch(tmp_path, pins, monkeypatch, listening_endpoint):
    calls = []

    def model_file_download(model_id, file_path, revision=None, cache_dir=None, **kwargs):
        calls.append((model_id, file_path, revision, kwargs))
        return str(tmp_path / file_path)

    module = types.ModuleType("modelscope.hub.file_download")
    module.model_file_download = model_file_download
    for name in ("modelscope", "modelscope.hub"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "modelscope.hub.file_download", module)
    download = weights.modelscope_downloader(endpoint=listening_endpoint)
    assert download(pins[3], False) == str(tmp_path / "model.safetensors")
    download(pins[0], True)
    assert calls == [("ms/codec", "model.safetensors", "master", {}),
                     ("ms/tts", "pytorch_model.bin", "master", {"local_files_only": True})]


def test_missing_modelscope_package_is_reported_as_optional(tmp_path, pins, code_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)
    downloaders = {"hf": unreachable, "modelscope": weights.modelscope_downloader()}
    with pytest.raises(weights.WeightsUnavailableError, match="optional package 'modelscope' is not installed"):
        ensure(tmp_path / "repo", pins, code_dir, downloaders=downloaders)


def test_codec_code_copies_follow_changes_and_missing_code_only_warns(tmp_path, pins, hub, code_dir, caplog):
    target = tmp_path / "repo"
    ensure(target, pins, code_dir, downloaders={"hf": hub})
    (code_dir / "codec_helpers.py").write_text("HOP = 1\n")
    ensure(target, pins, code_dir, source="local")
    assert (target / "audio_tokenizer" / "codec_helpers.py").read_text() == "HOP = 1\n"
    shutil.rmtree(code_dir)
    with caplog.at_level(logging.WARNING, logger=weights.logger.name):
        assert weights.install_codec_code(tmp_path / "elsewhere", code_dir) == []
    assert "not found" in caplog.text


def test_unknown_source_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="source must be one of"):
        weights.ensure_model_files(tmp_path, source="s3")


@pytest.mark.parametrize("value, expected", [("1", True), ("ON", True), ("0", False), ("", False)])
def test_offline_follows_hf_hub_offline_unless_given(monkeypatch, value, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert weights.resolve_offline(None) is expected
    assert weights.resolve_offline(not expected) is (not expected)


def test_pinned_table_matches_the_release():
    by_name = {pin.name: pin for pin in weights.PINNED}
    tts, codec = by_name["tts_weights"], by_name["codec_weights"]
    assert (tts.repo_id, tts.revision, tts.size) == (
        "OpenMOSS-Team/MOSS-TTS-Nano-100M", "44502f80dbf9743528fa921cc544d662c685ebec", 234_693_095)
    assert tts.sha256 == "24003f2f11ac8a2cbf70514db2d8f1c02fb451aa6b3c0bffc9da09f31cd7caa5"
    assert by_name["tokenizer_model"].sha256.startswith("c353ee14") and by_name["tokenizer_model"].size == 470_897
    assert (codec.repo_id, codec.revision, codec.size) == (
        "OpenMOSS-Team/MOSS-Audio-Tokenizer-Nano", "6aa02b01e445cc585582cf0ba480bc3ea6c8dd68", 87_922_568)
    assert by_name["codec_config"].sha256_prefix == "b38892f8" and by_name["codec_config"].size == 7_385
    assert {pin.modelscope_repo_id for pin in weights.PINNED} == {"openmoss/MOSS-TTS-Nano",
                                                                 "openmoss/MOSS-Audio-Tokenizer-Nano"}


def test_real_tokenizer_asset_passes_its_pin(tokenizer_model_path):
    pin = next(pin for pin in weights.PINNED if pin.name == "tokenizer_model")
    assert weights.verify_file(tokenizer_model_path, pin) == pin.sha256


def test_manual_instructions_cover_every_pinned_file():
    text = weights.describe_manual_download("/models/moss")
    for pin in weights.PINNED:
        assert pin.hf_url in text and f"{pin.target}  ({pin.size:,} bytes" in text
    assert "--local-dir /models/moss/audio_tokenizer" in text
    assert "modelscope download --model openmoss/MOSS-TTS-Nano pytorch_model.bin tokenizer.model" in text


def test_downloaded_layout_is_ignored_by_git():
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout of the repository")
    paths = [pin.target for pin in weights.PINNED]
    paths += ["audio_tokenizer/weights.lock.json", "audio_tokenizer/modeling_moss_audio_tokenizer.py"]
    result = subprocess.run(["git", "check-ignore", *paths], cwd=REPO_ROOT, capture_output=True, text=True)
    assert sorted(result.stdout.split()) == sorted(paths)


TINY_CODEC_CODE = {
    "configuration_moss_audio_tokenizer.py": (
        "from transformers import PretrainedConfig\n"
        "from .codec_helpers import HOP\n\n\n"
        "class MossAudioTokenizerConfig(PretrainedConfig):\n"
        "    model_type = 'moss-audio-tokenizer'\n\n"
        "    def __init__(self, hop=HOP, **kwargs):\n"
        "        self.hop = hop\n"
        "        super().__init__(**kwargs)\n"
    ),
    "modeling_moss_audio_tokenizer.py": (
        "import torch\n"
        "from transformers import PreTrainedModel\n"
        "from .configuration_moss_audio_tokenizer import MossAudioTokenizerConfig\n\n\n"
        "class MossAudioTokenizerModel(PreTrainedModel):\n"
        "    config_class = MossAudioTokenizerConfig\n\n"
        "    def __init__(self, config):\n"
        "        super().__init__(config)\n"
        "        self.proj = torch.nn.Linear(2, 2)\n"
        "        self.post_init()\n"
    ),
    "codec_helpers.py": "HOP = 3840\n",
}


def test_downloaded_codec_folder_loads_with_trust_remote_code_offline(tmp_path):
    from child_process import run_child
    from safetensors.torch import save_file

    code_dir = tmp_path / "code"
    code_dir.mkdir()
    for name, text in TINY_CODEC_CODE.items():
        (code_dir / name).write_text(text)
    save_file({"proj.weight": torch.full((2, 2), 0.25), "proj.bias": torch.zeros(2)}, tmp_path / "codec.safetensors")
    contents = dict(CONTENTS, codec_weights=(tmp_path / "codec.safetensors").read_bytes())
    pins = tuple(
        weights.PinnedFile(p.name, p.repo_id, p.revision, p.filename, p.target, len(contents[p.name]),
                           p.sha256, p.sha256_prefix, p.modelscope_repo_id)
        for p in make_pins()
    )
    files = ensure(tmp_path / "repo", pins, code_dir, downloaders={"hf": FakeHub(tmp_path / "hub", pins, contents)})
    run_child(
        """
        import sys, torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True, local_files_only=True)
        assert type(model).__name__ == "MossAudioTokenizerModel" and model.config.hop == 3840
        assert torch.equal(model.proj.weight, torch.full((2, 2), 0.25)), model.proj.weight
        """,
        str(files.codec_dir),
        env={"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")},
    )
