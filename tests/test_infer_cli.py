"""infer_npu.py end to end on a tiny model repository: main([...]), a subprocess, and every bad input (exit 2)."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import soundfile as sf
import torch

from conftest import REPO_ROOT, import_module, shared_path
from fake_cuda import FakeCuda
from tiny_repository import HOP, SAMPLE_RATE, pinned_copy_with_corrupt_weights, pins_for, write_tiny_repository

infer_npu = import_module("infer_npu")
model_loading = import_module("settings.model_loading")
model_flags = import_module("settings.model_flags")
devices = import_module("devices")
weight_formats = import_module("weight_formats")

FAST = ["--max-new-frames", "2", "--no-do-sample", "--no-progress", "--device", "cpu"]
TWO_SENTENCES = "Hello world. This is a test."
SAY_HI = ["--prompt-audio-path", "{prompt}", "--text", "Hi."]  # a valid request; each bad-input case adds one flaw


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return write_tiny_repository(tmp_path_factory.mktemp("cli_repo"), shared_path("assets", "tokenizer.model"))


@pytest.fixture
def pinned(monkeypatch, repo):
    """Verification against pins of the tiny files (the CLI checks size + sha256 before loading)."""
    monkeypatch.setattr(model_flags, "PINS", pins_for(repo))
    return repo


def _run(argv, capsys):
    code = infer_npu.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_voice_clone_end_to_end_with_verified_files(pinned, prompt_wav, tmp_path, capsys):
    out = tmp_path / "out.wav"
    code, stdout, stderr = _run(["--model-path", pinned, "--prompt-audio-path", prompt_wav, "--text", "Hello world.",
                                 "--output-path", out, "--seed", "0", *FAST], capsys)
    assert code == 0, stderr
    assert "device=cpu dtype=float32 attention=sdpa" in stdout
    assert f"wrote {out}: 0.16 s of audio" in stdout and "RTF" in stdout
    info = sf.info(str(out))
    assert (info.samplerate, info.channels, info.frames) == (SAMPLE_RATE, 2, 2 * HOP)


def test_without_a_prompt_the_default_voice_speaks(repo, tmp_path, capsys):
    out = tmp_path / "default.wav"
    code, stdout, stderr = _run(["--model-path", repo, "--no-verify", "--text", "Hi.", "--output-path", out, *FAST],
                                capsys)
    assert code == 0, stderr
    assert f"voice: en_2 ({repo / 'preset_voices' / 'en_2.wav'})" in stdout
    assert sf.info(str(out)).frames == 2 * HOP


def test_an_openai_voice_name_speaks_its_preset_or_the_default_voice_when_that_is_missing(repo, tmp_path, capsys):
    copy = shutil.copytree(repo, tmp_path / "model")
    code, stdout, stderr = _run(["--model-path", copy, "--no-verify", "--voice", "onyx", "--text", "Hi.",
                                 "--output-path", tmp_path / "a.wav", *FAST], capsys)
    assert code == 0 and "voice: en_4 (" in stdout, stderr
    (copy / "preset_voices" / "en_4.wav").unlink()
    code, stdout, stderr = _run(["--model-path", copy, "--no-verify", "--voice", "onyx", "--text", "Hi.",
                                 "--output-path", tmp_path / "b.wav", *FAST], capsys)
    assert code == 0 and "voice: en_2 (" in stdout, stderr
    shutil.rmtree(copy / "preset_voices")
    code, _, stderr = _run(["--model-path", copy, "--no-verify", "--voice", "onyx", "--text", "Hi.",
                            "--output-path", tmp_path / "c.wav", *FAST], capsys)
    assert code == 2 and "python infer_npu.py --download-only" in stderr
    assert not (tmp_path / "c.wav").exists()


def test_stream_writes_the_file_and_reports_time_to_first_audio(repo, prompt_wav, tmp_path, capsys):
    out = tmp_path / "stream.wav"
    code, stdout, stderr = _run(["--model-path", repo, "--no-verify", "--prompt-audio-path", prompt_wav, "--text",
                                 "Hello world. This is a test.", "--voice-clone-max-text-tokens", "5",
                                 "--output-path", out, "--stream", *FAST], capsys)
    assert code == 0, stderr
    assert "first audio after" in stdout and "2 chunk(s)" in stdout
    assert sf.info(str(out)).frames > 4 * HOP
    assert sorted(os.listdir(tmp_path)) == ["stream.wav"]


def test_jsonl_makes_one_file_per_line(repo, prompt_wav, tmp_path, capsys):
    requests = tmp_path / "requests.jsonl"
    lines = [{"text": "Hello.", "output_path": str(tmp_path / "a.wav")},
             {"text": "Good morning.", "output_path": str(tmp_path / "b.wav"), "prompt_audio_path": str(prompt_wav)}]
    requests.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    code, stdout, stderr = _run(["--model-path", repo, "--no-verify", "--prompt-audio-path", prompt_wav,
                                 "--jsonl", requests, *FAST], capsys)
    assert code == 0, stderr
    assert sf.info(str(tmp_path / "a.wav")).frames == 2 * HOP and sf.info(str(tmp_path / "b.wav")).frames == 2 * HOP
    assert "total: 2 files" in stdout


def test_subprocess_run_succeeds_offline(repo, prompt_wav, tmp_path):
    out = tmp_path / "sub.wav"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "infer_npu.py"), "--model-path", str(repo), "--no-verify",
         "--prompt-audio-path", str(prompt_wav), "--text", "Hi.", "--output-path", str(out), *FAST],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert "RTF" in completed.stdout and sf.info(str(out)).frames == 2 * HOP


def test_subprocess_user_error_exits_2(tmp_path):
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "infer_npu.py"), "--text", "Hi.", "--device", "tpu", "--mode",
         "continuation", "--output-path", str(tmp_path / "x.wav")],
        capture_output=True, text=True, cwd=str(tmp_path), timeout=300,
    )
    assert completed.returncode == 2
    assert "unknown device 'tpu'" in completed.stderr and os.listdir(tmp_path) == []


@pytest.mark.parametrize("weight_format", [
    "bf16", pytest.param("int8", marks=pytest.mark.skipif(not weight_formats.int8_kernels_available(),
                                                          reason="this torch build has no fbgemm/oneDNN int8 kernels")),
])
def test_weight_format_run_writes_a_valid_file_and_names_the_format(repo, tmp_path, capsys, weight_format):
    out = tmp_path / f"{weight_format}.wav"
    code, stdout, stderr = _run(["--model-path", repo, "--no-verify", "--mode", "continuation", "--text", "Hi.",
                                 "--weight-format", weight_format, "--output-path", out, *FAST], capsys)
    assert code == 0, stderr
    # int8: float32 activations; bf16: bfloat16, or float32 around bf16 weights where oneDNN cannot pack bf16
    dtype = devices.dtype_name(weight_formats.compute_dtype(torch.device("cpu"), weight_format))
    kernel = {"int8": "int8", "bf16": "onednn-packed" if dtype == "bfloat16" else "bf16-weights"}[weight_format]
    assert f"dtype={dtype} attention=sdpa weights={weight_format} kernels={kernel} " in stdout
    # int8 names where its graph phases ran (onnx_graph.py: onnxruntime where a probe found it faster, else torch)
    phases = re.search(r" audio_phase=(onnxruntime|torch) global_step=(onnxruntime|torch) ", stdout)
    assert (phases is not None) == (weight_format == "int8")
    info = sf.info(str(out))
    assert (info.samplerate, info.channels, info.frames) == (SAMPLE_RATE, 2, 2 * HOP)


def test_default_on_cpu_is_fp32_with_the_probed_kernel_and_plain_keeps_torchs_linear(repo, tmp_path, capsys):
    code, stdout, stderr = _run(["--model-path", repo, "--no-verify", "--mode", "continuation", "--text", "Hi.",
                                 "--output-path", tmp_path / "x.wav", *FAST], capsys)
    assert code == 0, stderr
    kernel = {"packed": "onednn-packed", "plain": "plain"}[weight_formats.fp32_linear_kernel()[0]]
    assert f"dtype=float32 attention=sdpa weights=fp32 kernels={kernel} " in stdout
    code, stdout, stderr = _run(["--model-path", repo, "--no-verify", "--mode", "continuation", "--text", "Hi.",
                                 "--weight-format", "plain", "--output-path", tmp_path / "y.wav", *FAST], capsys)
    assert code == 0, stderr
    assert "dtype=float32 attention=sdpa weights=fp32 kernels=plain " in stdout


def test_int8_on_an_accelerator_exits_2_before_loading(repo, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(devices, "_load_torch_npu", lambda: None)
    monkeypatch.setattr(devices, "_load_cuda_module", lambda: FakeCuda())  # a GPU machine, simulated
    monkeypatch.setattr(model_loading, "check_model_folder", lambda *args: pytest.fail("loading started"))
    code, _, stderr = _run(["--model-path", repo, "--no-verify", "--mode", "continuation", "--text", "Hi.",
                            "--device", "cuda", "--weight-format", "int8", "--output-path", tmp_path / "x.wav"], capsys)
    assert code == 2
    assert "weight format 'int8' runs on CPU" in stderr and "cuda:0" in stderr
    assert os.listdir(tmp_path) == []


def test_help_states_the_values_actually_applied():
    defaults = vars(infer_npu.build_parser().parse_args([]))
    expected = dict(do_sample=True, max_new_frames=375, text_temperature=1.0, text_top_p=1.0, text_top_k=50,
                    audio_temperature=0.8, audio_top_p=0.95, audio_top_k=25, audio_repetition_penalty=1.2,
                    voice_clone_max_text_tokens=75, mode="voice_clone", nq=None, use_kv_cache=True,
                    voice_clone_max_memory_per_sample_gb=1.0, tts_max_batch_size=0, codec_max_batch_size=0)
    assert {key: defaults[key] for key in expected} == expected
    text = " ".join(infer_npu.build_parser().format_help().split())
    for phrase in ("audio token temperature (default: 0.8)", "audio repetition penalty (default: 1.2)",
                   "temperature of the continue/stop choice (default: 1.0)"):
        assert phrase in text


def test_the_server_and_the_cli_speak_with_the_same_defaults():
    """serve.py and the Ray app take generation_defaults(); with no flags the CLI must apply exactly those."""
    defaults = import_module("settings.generation_flags").generation_defaults()
    parsed = vars(infer_npu.build_parser().parse_args([]))
    assert defaults == {name: parsed[name] for name in defaults}
    assert defaults["max_new_frames"] == 375 and defaults["audio_temperature"] == 0.8


def test_help_states_each_default_once_and_never_none():
    parser = infer_npu.build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help:
            line = formatter._expand_help(action) if "%(" in formatter._get_help_string(action) else action.help
            assert line.count("default") <= 1 and "(default: None)" not in line, line


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: exit code 2, a clear message, no output file


def _bad_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "ok", "output_path": str(tmp_path / "1.wav")}) + "\n{not json\n")
    return path


@pytest.mark.parametrize("case, extra, message", [
    ("missing prompt", ["--prompt-audio-path", "{tmp}/nope.wav", "--text", "Hi."], "does not exist"),
    ("empty text", ["--prompt-audio-path", "{prompt}", "--text", ""], "empty"),
    ("no text", ["--prompt-audio-path", "{prompt}"], "no text given"),
    ("unknown device", [*SAY_HI, "--device", "tpu"], "unknown device"),
    ("bad dtype", [*SAY_HI, "--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    ("bad attention", [*SAY_HI, "--attn-implementation", "magic"],
     "argument --attn-implementation: invalid choice: 'magic'"),
    ("unknown weight format", [*SAY_HI, "--weight-format", "int4"], "argument --weight-format: invalid choice: 'int4'"),
    ("dtype against weight format", [*SAY_HI, "--device", "cpu", "--dtype", "bfloat16", "--weight-format", "int8"],
     "--dtype bfloat16 conflicts with --weight-format int8"),
    ("bad jsonl line", ["--prompt-audio-path", "{prompt}", "--jsonl", "{jsonl}"], "bad.jsonl:2: not valid JSON"),
    ("bad flag value", ["--max-new-frames", "many"], "invalid int value"),
    ("prompt text in voice clone", [*SAY_HI, "--prompt-text", "Hey"],
     "--mode voice_clone does not take --prompt-text; use --mode continuation"),
    ("unknown voice in voice clone", ["--text", "Hi.", "--voice", "nobody"],
     "--voice 'nobody' is not a preset or an OpenAI voice name"),
    ("missing text file", ["--prompt-audio-path", "{prompt}", "--text-file", "{tmp}/none.txt"], "cannot read"),
    ("no frames", [*SAY_HI, "--max-new-frames", "0"], "--max-new-frames 0; expected an integer >= 1"),
    ("top-p above 1", [*SAY_HI, "--audio-top-p", "2"], "--audio-top-p 2.0; expected a number in (0, 1]"),
    ("top-k 0", [*SAY_HI, "--audio-top-k", "0"], "--audio-top-k 0; expected an integer >= 1"),
    ("top-p 0", [*SAY_HI, "--audio-top-p", "0"], "--audio-top-p 0.0; expected a number in (0, 1]"),  # as the server
    ("one-token chunks", [*SAY_HI, "--voice-clone-max-text-tokens", "1"],
     "--voice-clone-max-text-tokens 1; expected an integer >= 4"),
    ("zero temperature", [*SAY_HI, "--audio-temperature", "0"], "--audio-temperature must be > 0 when sampling"),
    ("output in a file", [*SAY_HI, "--output-path", "{blocker}/x.wav"],
     "--output-path '{blocker}/x.wav' cannot be written: {blocker} is a file, not a folder"),
])
def test_user_errors_exit_2_before_loading_and_write_nothing(repo, prompt_wav, tmp_path, capsys, monkeypatch, case,
                                                             extra, message):
    monkeypatch.setattr(model_loading, "check_model_folder",
                        lambda *args: pytest.fail("loading started before the check"))
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("a file")
    values = {"tmp": tmp_path, "prompt": prompt_wav, "jsonl": _bad_jsonl(tmp_path) if "jsonl" in case else "",
              "blocker": blocker}
    argv = [arg.format(**values) for arg in extra]
    code, _, stderr = _run(["--model-path", repo, "--no-verify", "--output-path", tmp_path / "x.wav", *argv],
                           capsys)
    assert code == 2, case
    assert message.format(**values) in stderr, stderr
    for api_name in ("output_audio_path", "prompt_audio_path", "prompt_text", "mode='", "torch.dtype", "None,"):
        assert api_name not in stderr, stderr  # the command line names its own flags
    assert not any(name.endswith((".wav", ".tmp")) for name in os.listdir(tmp_path))


@pytest.mark.parametrize("case, match", [
    ("silent", "silent"), ("garbage", "could not read"), ("empty file", "empty"),
])
def test_bad_prompt_content_exits_2(repo, tmp_path, capsys, case, match):
    prompt = tmp_path / "prompt.wav"
    if case == "silent":
        sf.write(str(prompt), [0.0] * 16000, 16000)
    elif case == "garbage":
        prompt.write_bytes(os.urandom(2048))
    else:
        prompt.write_bytes(b"")
    out = tmp_path / "out"
    code, _, stderr = _run(["--model-path", repo, "--no-verify", "--prompt-audio-path", prompt, "--text", "Hi.",
                            "--output-path", out / "x.wav", *FAST], capsys)
    assert code == 2 and match in stderr
    assert not out.exists()


def test_100k_character_continuation_text_exits_2_with_advice(repo, tmp_path, capsys):
    text_file = tmp_path / "long.txt"
    text_file.write_text("word " * 20000, encoding="utf-8")
    code, _, stderr = _run(["--model-path", repo, "--no-verify", "--mode", "continuation", "--text-file", text_file,
                            "--output-path", tmp_path / "x.wav", *FAST], capsys)
    assert code == 2 and "Use --mode voice_clone" in stderr
    assert not (tmp_path / "x.wav").exists()


def test_missing_weights_print_the_download_instructions(tmp_path, capsys):
    empty = tmp_path / "model"
    empty.mkdir()
    code, _, stderr = _run(["--model-path", empty, "--mode", "continuation", "--text", "Hi.", "--output-path",
                            tmp_path / "x.wav", "--device", "cpu"], capsys)
    assert code == 2
    assert "Get these files on a machine with network access" in stderr
    assert "python infer_npu.py --download-only" in stderr and "pytorch_model.bin" in stderr


def test_corrupted_checksum_exits_2_and_writes_nothing(repo, monkeypatch, tmp_path, capsys):
    copy, pins = pinned_copy_with_corrupt_weights(repo, tmp_path / "model")
    monkeypatch.setattr(model_flags, "PINS", pins)
    code, _, stderr = _run(["--model-path", copy, "--mode", "continuation", "--text", "Hi.", "--output-path",
                            tmp_path / "x.wav", *FAST], capsys)
    assert code == 2 and "Checksum mismatch" in stderr and "pytorch_model.bin" in stderr
    assert "own checkpoint (fine-tuned or converted), pass --no-verify" in stderr
    assert not (tmp_path / "x.wav").exists()


def test_download_only_verifies_files_already_in_place(pinned, capsys):
    code, stdout, stderr = _run(["--download-only", "--download-source", "local", "--model-path", pinned,
                                 "--no-progress"], capsys)
    assert code == 0, stderr
    assert "model folder ready" in stdout


def _readme_command(prefix):
    lines = [line.strip() for line in (REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines()]
    (command,) = [line for line in lines if line.startswith(prefix)]
    return command


def test_readme_tiny_recipe_runs_the_main_job_with_audible_output(tmp_path, prompt_wav):
    """The README's two commands, verbatim apart from the paths: a runnable repository, then speech in a file."""
    import shlex

    import numpy as np

    paths = {"/tmp/moss_tiny.wav": str(tmp_path / "tiny.wav"), "/tmp/moss_tiny": str(tmp_path / "moss_tiny"),
             "tokenizer.model": str(shared_path("assets", "tokenizer.model")), "voice.wav": str(prompt_wav)}
    for prefix in ("python measurement/checkpoints.py", "python infer_npu.py --model-path /tmp/moss_tiny"):
        argv = [paths.get(arg, arg) for arg in shlex.split(_readme_command(prefix))]
        completed = subprocess.run([sys.executable, str(REPO_ROOT / argv[1]), *argv[2:]], capture_output=True,
                                   text=True, cwd=str(tmp_path), timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        assert completed.returncode == 0, completed.stderr
    samples, rate = sf.read(paths["/tmp/moss_tiny.wav"], dtype="int16")
    assert rate == SAMPLE_RATE and samples.shape == (8 * HOP, 2)
    rms = float(np.sqrt(np.mean((samples / 32768.0) ** 2)))
    assert rms > 0.01 and np.count_nonzero(samples) > 0.9 * samples.size, rms  # audible: above -40 dBFS


# ---------------------------------------------------------------------------------------------------------------------
# Interruptions, progress and per-file reports


def _start_cli(argv, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.Popen([sys.executable, str(REPO_ROOT / "infer_npu.py"), *map(str, argv)], cwd=str(cwd), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, process, timeout=240.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_sigterm_during_stream_removes_the_partial_file_and_says_interrupted(repo, prompt_wav, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    process = _start_cli(["--model-path", repo, "--no-verify", "--prompt-audio-path", prompt_wav, "--text", "Hello.",
                          "--output-path", out / "long.wav", "--stream", "--max-new-frames", "100000",
                          "--no-do-sample", "--no-progress", "--device", "cpu", "--no-runaway-guards"], tmp_path)
    # The stream has written audio to its hidden temporary file: terminate it there, as `timeout` or docker would.
    _wait_for(lambda: any(p.stat().st_size > 10 * HOP for p in out.glob(".long.wav.*.tmp")), process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == infer_npu.EXIT_TERMINATED == 143, stderr
    assert "error: interrupted (SIGTERM)" in stderr
    assert os.listdir(out) == []


def test_sigterm_during_jsonl_keeps_finished_files_and_no_unfinished_one(repo, prompt_wav, tmp_path):
    out = tmp_path / "out"
    lines = [{"text": f"Line {index}.", "output_path": str(out / f"{index}.wav")} for index in range(3)]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    process = _start_cli(["--model-path", repo, "--no-verify", "--prompt-audio-path", prompt_wav, "--jsonl", requests,
                          "--max-new-frames", "400", "--no-do-sample", "--no-progress", "--device", "cpu",
                          "--no-runaway-guards"], tmp_path)
    _wait_for(lambda: (out / "0.wav").exists(), process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143 and "interrupted" in stderr, stderr
    assert sorted(os.listdir(out)) == ["0.wav"] and sf.info(str(out / "0.wav")).frames == 400 * HOP


def test_jsonl_summary_lines_time_each_file_on_its_own(monkeypatch, capsys):
    def two_slow_files(model, requests):
        for _ in requests:
            time.sleep(0.3)
            yield {"audio_path": "x.wav", "waveform": torch.zeros(2, SAMPLE_RATE), "sample_rate": SAMPLE_RATE,
                   "voice_clone_text_chunks": ["x"]}

    monkeypatch.setattr(infer_npu.synthesis, "iter_inference_many", two_slow_files)
    assert infer_npu._synthesise_offline(None, "cpu", [None, None]) == [1.0, 1.0]
    seconds = [float(line.split(" in ")[1].split(" s ")[0]) for line in capsys.readouterr().out.splitlines()]
    assert len(seconds) == 2 and all(0.25 < value < 0.5 for value in seconds), seconds  # not 0.6 for the second


def test_progress_is_visible_without_a_terminal_and_no_progress_silences_every_bar(repo, prompt_wav, tmp_path):
    common = ["--model-path", repo, "--no-verify", "--prompt-audio-path", prompt_wav, "--text", TWO_SENTENCES,
              "--voice-clone-max-text-tokens", "5", "--max-new-frames", "2", "--no-do-sample", "--device", "cpu"]
    shown = _start_cli([*common, "--output-path", tmp_path / "a.wav"], tmp_path)
    _, shown_err = shown.communicate(timeout=240)
    silent = _start_cli([*common, "--output-path", tmp_path / "b.wav", "--no-progress"], tmp_path)
    _, silent_err = silent.communicate(timeout=240)
    assert shown.returncode == silent.returncode == 0, shown_err + silent_err
    assert "synthesising: 2/2 chunks" in shown_err  # stderr is a pipe here, as in a log file or CI
    for text in ("synthesising:", "Loading weights", "it/s]"):
        assert text not in silent_err, silent_err


def test_download_only_without_network_exits_1_in_seconds_with_one_message(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as server:  # a free port: refused at once, like no network
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "infer_npu.py"), "--download-only", "--download-source", "hf",
         "--model-path", str(tmp_path / "model"), "--no-progress"],
        capture_output=True, text=True, cwd=str(tmp_path), timeout=120, env=dict(env, HF_ENDPOINT=endpoint),
    )
    assert completed.returncode == 1, completed.stderr  # a network failure, not bad input (2)
    assert time.monotonic() - started < 60  # was about 95 s of retries
    stderr = completed.stderr
    assert stderr.count("no connection to 127.0.0.1") == 1 and "Every file failed the same way" in stderr
    assert stderr.startswith("error: Model files missing from") and "Get these files" in stderr
    assert len(stderr.splitlines()) < 40, stderr  # was 88 lines of retry noise before the message
