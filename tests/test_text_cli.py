"""infer_npu.py's text flags on the tiny model: normalization by default, the chunk preview, --dry-run, captions."""

import pytest
import soundfile as sf

from conftest import import_module, shared_path
from tiny_repository import write_tiny_repository

infer_npu = import_module("infer_npu")

FAST = ["--max-new-frames", "2", "--no-do-sample", "--no-progress", "--device", "cpu", "--no-verify",
        "--voice-clone-max-text-tokens", "16"]
WRITTEN = "**Total:** $20.50\n- Meet at 3:30 pm 🎉"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return write_tiny_repository(tmp_path_factory.mktemp("cli_repo"), shared_path("assets", "tokenizer.model"))


@pytest.fixture
def no_model(monkeypatch):
    def refuse(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(infer_npu, "load_model_of_flags", refuse)


def _run(argv, capsys):
    code = infer_npu.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_dry_run_prints_the_normalized_chunks_without_loading_the_model(repo, prompt_wav, tmp_path, capsys,
                                                                       no_model):
    out = tmp_path / "out.wav"
    code, stdout, stderr = _run(["--model-path", repo, "--prompt-audio-path", prompt_wav, "--text", WRITTEN,
                                 "--output-path", out, "--dry-run", *FAST], capsys)
    assert code == 0, stderr
    assert stdout.splitlines() == [
        f"{out}: chunk 1/2: Total: twenty dollars and fifty cents.",
        f"{out}: chunk 2/2: Meet at three thirty PM."]
    assert not out.exists()


def test_no_normalize_speaks_the_text_as_given(repo, prompt_wav, tmp_path, capsys, no_model):
    code, stdout, _ = _run(["--model-path", repo, "--prompt-audio-path", prompt_wav, "--text", "It is 5 pm.",
                            "--output-path", tmp_path / "o.wav", "--dry-run", "--no-normalize", *FAST], capsys)
    assert code == 0 and stdout.strip().endswith("chunk 1/1: It is 5 pm.")


def test_upstream_flags_turn_off_one_stage_each(repo, prompt_wav, tmp_path, capsys, no_model):
    base = ["--model-path", repo, "--prompt-audio-path", prompt_wav, "--text", "**It is 5 pm.**", "--output-path",
            tmp_path / "o.wav", "--dry-run", *FAST]
    _, stdout, _ = _run([*base, "--enable-wetext-processing", "0"], capsys)
    assert stdout.strip().endswith("chunk 1/1: It is 5 pm.")
    _, stdout, _ = _run([*base, "--enable-normalize-tts-text", "0"], capsys)
    assert "asterisk" in stdout and "five PM" in stdout


def test_language_flag_picks_the_number_rules(repo, prompt_wav, tmp_path, capsys, no_model):
    code, stdout, _ = _run(["--model-path", repo, "--prompt-audio-path", prompt_wav, "--text", "Es kostet 5 €.",
                            "--language", "de", "--output-path", tmp_path / "o.wav", "--dry-run", *FAST], capsys)
    assert code == 0 and stdout.strip().endswith("chunk 1/1: Es kostet fünf Euro.")


def test_unknown_language_exits_2_naming_the_flag(repo, prompt_wav, tmp_path, capsys, no_model):
    code, _, stderr = _run(["--model-path", repo, "--prompt-audio-path", prompt_wav, "--text", "Hi.",
                            "--language", "xx", "--output-path", tmp_path / "o.wav", *FAST], capsys)
    assert code == 2 and "--language xx" in stderr and "expected one of" in stderr


def test_print_chunks_then_synthesises_and_writes_captions(repo, prompt_wav, tmp_path, capsys):
    out, vtt = tmp_path / "out.wav", tmp_path / "out.vtt"
    code, stdout, stderr = _run(["--model-path", repo, "--prompt-audio-path", prompt_wav, "--text", WRITTEN,
                                 "--output-path", out, "--print-voice-clone-text-chunks", "--captions", vtt, *FAST],
                                capsys)
    assert code == 0, stderr
    assert "chunk 2/2: Meet at three thirty PM." in stdout and f"wrote {out}" in stdout
    cues = vtt.read_text(encoding="utf-8")
    assert cues.startswith("WEBVTT") and cues.count(" --> ") == 2
    assert "Total: twenty dollars and fifty cents." in cues
    last_end = cues.strip().splitlines()[-2].split(" --> ")[1]
    assert last_end == _timestamp(sf.info(str(out)).duration)


def test_captions_with_jsonl_exit_2(repo, prompt_wav, tmp_path, capsys):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"text": "Hi.", "output_path": "a.wav"}\n')
    code, _, stderr = _run(["--model-path", repo, "--prompt-audio-path", prompt_wav, "--jsonl", jobs,
                            "--captions", tmp_path / "x.vtt", *FAST], capsys)
    assert code == 2 and "--captions" in stderr and "--jsonl" in stderr


def _timestamp(seconds: float) -> str:
    milliseconds = int(round(seconds * 1000))
    return f"00:00:{milliseconds // 1000:02d}.{milliseconds % 1000:03d}"


def test_runaway_chunks_end_long_before_max_new_frames_with_a_warning(repo, prompt_wav, tmp_path, capsys,
                                                                       caplog):
    out = tmp_path / "o.wav"
    code, stdout, stderr = _run(["--model-path", repo, "--prompt-audio-path", prompt_wav, "--text", "Hi.",
                                 "--output-path", out, *FAST, "--max-new-frames", "375", "--do-sample"], capsys)
    assert code == 0, stderr
    assert "ended early by a runaway guard" in caplog.text and "reached max_new_frames" not in caplog.text
    assert sf.info(str(out)).duration <= 44 / 12.5 + 1e-6  # "Hi.": 3 s + 1 syllable at 2/s = 3.5 s -> 44 frames


def test_no_runaway_guards_runs_to_max_new_frames(repo, prompt_wav, tmp_path, capsys, caplog):
    out = tmp_path / "o.wav"
    code, _, stderr = _run(["--model-path", repo, "--prompt-audio-path", prompt_wav, "--text", "Hi.",
                            "--output-path", out, *FAST, "--max-new-frames", "60", "--no-runaway-guards"], capsys)
    assert code == 0, stderr
    assert "reached max_new_frames=60" in caplog.text and sf.info(str(out)).duration == pytest.approx(60 / 12.5)
