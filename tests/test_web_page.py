"""The web page at / (server/page.py, web/) in a real headless Chromium (Debian's chromium + chromium-driver, driven
by selenium) against a live serve.py app on 127.0.0.1: the tiny model, an API key, the every-frame codec policy (a
request alone gives the same samples every time, so what the page received can be compared with a direct request).

Chromium and its driver come from the system (`.ci/run` installs them): where they are missing the tests skip with
the reason, and under CI=true they fail. Set MOSS_WEB_SCREENSHOT=path to also save the page's screenshot there (the
README's docs/web-page.png comes from such a run).
"""

import base64
import os
import shutil
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import IN_CI, import_module, optional_module
from test_server import LiveServer, write_server_repository
from tiny_repository import HOP, SAMPLE_RATE

PAGE_FOLDER = import_module("server.page").PAGE_FOLDER

webdriver = optional_module("selenium.webdriver", "pip install -r requirements.txt")
from selenium.webdriver.common.by import By  # noqa: E402  (after the optional import)
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

KEY = "page-key"
# Debian's paths; MOSS_CHROMIUM / MOSS_CHROMEDRIVER name others (Ubuntu's chromium-browser, say).
CHROMIUM = os.environ.get("MOSS_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("MOSS_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required",
                  "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream", "--window-size=900,1600")
FRAME_SECONDS = HOP / SAMPLE_RATE  # 0.08 s of audio per frame
PLAYED_FRAMES = 25                 # 2 s of audio: long enough to stream, short enough to play out in the test
LONG = 1500                        # frames of a request that is still running when Stop is pressed
WAIT_SECONDS = 60


def browser_binaries():
    """(chromium, chromedriver); skips the module with the reason where they are missing (fails under CI)."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if shutil.which(path) is None]
    if missing:
        reason = f"needs {' and '.join(missing)} (Debian: apt-get install chromium chromium-driver)"
        if IN_CI:
            pytest.fail(f"{reason}; CI=true requires it, so that the page is tested in a real browser", pytrace=False)
        pytest.skip(f"{reason}; a system browser, absent here")
    return CHROMIUM, CHROMEDRIVER


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repository = write_server_repository(tmp_path_factory.mktemp("page_repo"))
    live = LiveServer(["--model-path", repository, "--no-verify", "--device", "cpu", "--num-slots", 2,
                       "--max-queue", 2, "--max-positions", 2048, "--api-key", KEY, "--stream-policy", "every-frame",
                       "--voices-dir", tmp_path_factory.mktemp("page_voices")])
    yield live
    live.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, chromedriver = browser_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(chromedriver))
    driver.set_script_timeout(WAIT_SECONDS)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(browser, server):
    """The page, connected with the key (entered as a user would: the page asks for it)."""
    browser.get(server.url + "/")
    wait_for(browser, lambda: browser.find_element(By.ID, "key-form").is_displayed())
    browser.find_element(By.ID, "api-key").send_keys(KEY)
    browser.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
    wait_for(browser, lambda: text(browser, "server-status").startswith("Connected"))
    return browser


@pytest.fixture(scope="module")
def listed_voice(server, prompt_wav):
    """Voice 'listed', added over HTTP (the page learns of it when it next lists the voices)."""
    added = api(server, "POST", "/v1/audio/voices", data={"name": "listed"},
                files={"audio_sample": ("listed.wav", prompt_wav.read_bytes(), "audio/wav")})
    assert added.status_code == 200, added.text
    return "listed"


def wait_for(driver, condition, seconds=WAIT_SECONDS):
    WebDriverWait(driver, seconds, poll_frequency=0.05).until(lambda _: condition())


def text(driver, element_id):
    return driver.find_element(By.ID, element_id).text


def stats(driver):
    """The page's measured values (the data-* of #stats)."""
    return driver.execute_script("return Object.assign({}, document.getElementById('stats').dataset)")


def console_errors(driver):
    """The console's errors since the last call."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def api(server, method, path, **keywords):
    return httpx.request(method, f"{server.url}{path}", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                         **keywords)


def listed_voices(server):
    return [voice["id"] for voice in api(server, "GET", "/v1/audio/voices").json()["data"]]


def set_advanced(driver, **fields):
    """Open the advanced fold and type the given settings (element id: value; '' clears)."""
    fold = driver.find_element(By.ID, "advanced")
    if fold.get_attribute("open") is None:
        fold.find_element(By.TAG_NAME, "summary").click()
    for element_id, value in fields.items():
        field = driver.find_element(By.ID, element_id)
        if field.tag_name == "select":
            Select(field).select_by_value(value)
        else:
            field.clear()
            field.send_keys(str(value))


def speak_and_wait(driver, states=("finished",)):
    driver.find_element(By.ID, "speak").click()
    wait_for(driver, lambda: stats(driver).get("state") in states)
    return stats(driver)


def downloaded_wav(driver):
    """The bytes behind the page's download link (the wav it built from the pcm it received)."""
    encoded = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(document.getElementById('download').href).then((r) => r.arrayBuffer()).then((buffer) => {
            let binary = ''; new Uint8Array(buffer).forEach((b) => { binary += String.fromCharCode(b); });
            done(btoa(binary)); });""")
    return base64.b64decode(encoded)


def direct_pcm(server, **body):
    """The bytes of the same request made directly (the page asks for the server's pcm layout, as this does)."""
    return direct_response(server, **body).content


def direct_response(server, **body):
    response = api(server, "POST", "/v1/audio/speech", json={"model": "tts-1", "response_format": "pcm", **body})
    assert response.status_code == 200, response.text
    return response


def health(server):
    return httpx.get(f"{server.url}/health").json()


# ----------------------------------------------------------------------------------------------------------------


def test_the_page_asks_for_the_key_keeps_it_in_the_tab_and_loads_without_console_errors(page):
    assert console_errors(page) == []
    assert page.execute_script("return sessionStorage.getItem('moss-tts-api-key')") == KEY
    assert page.execute_script("return localStorage.length") == 0
    assert not page.find_element(By.ID, "key-form").is_displayed()
    unlabelled = page.execute_script("""return [...document.querySelectorAll('input, select, textarea')]
        .filter((control) => control.labels.length === 0).map((control) => control.id)""")
    assert unlabelled == []


def test_a_wrong_key_is_asked_for_again_with_the_servers_reason(page):
    page.execute_script("sessionStorage.setItem('moss-tts-api-key', 'wrong')")
    page.refresh()
    wait_for(page, lambda: page.find_element(By.ID, "key-form").is_displayed())
    assert "401" in text(page, "key-error") and "the API key is not valid" in text(page, "key-error")
    assert all("status of 401" in error for error in console_errors(page))  # the browser's note of the 401
    page.find_element(By.ID, "api-key").send_keys(KEY, Keys.ENTER)
    wait_for(page, lambda: text(page, "server-status").startswith("Connected"))
    assert not page.find_element(By.ID, "key-form").is_displayed()


def test_the_player_takes_rate_and_channels_from_the_response_and_splits_no_sample(page):
    """Mono 24 kHz pcm in chunks cut mid-sample: the wav holds every whole sample, at the rate it was given."""
    header = page.execute_async_script("""
        const done = arguments[arguments.length - 1];
        import('/page/audio.js').then(async ({ audioContext, PcmPlayer }) => {
            const player = new PcmPlayer(await audioContext(), 24000, 1);
            const samples = new Int16Array(2400).map((_, i) => i);
            const bytes = new Uint8Array(samples.buffer);
            for (const [start, end] of [[0, 1001], [1001, 1002], [1002, 4800]]) player.push(bytes.slice(start, end));
            player.stop();
            const wav = new Uint8Array(await player.wav().arrayBuffer());
            const same = wav.slice(44).every((value, i) => value === bytes[i]);
            done([player.frames, wav.length, new DataView(wav.buffer).getUint32(24, true),
                  new DataView(wav.buffer).getUint16(22, true), same]);
        });""")
    assert header == [2400, 44 + 4800, 24000, 1, True]


def test_the_page_serves_only_its_own_files_and_names_nothing_outside(server):
    for name in ("", "page/page.js", "page/audio.js", "page/page.css"):
        response = httpx.get(f"{server.url}/{name}")
        assert response.status_code == 200 and response.headers["cache-control"] == "no-cache"
    assert httpx.get(f"{server.url}/page/page.js").headers["content-type"].startswith("text/javascript")
    refused = httpx.get(f"{server.url}/page/app.py")
    assert refused.status_code == 404 and "no page file 'app.py'" in refused.json()["error"]["message"]
    assert httpx.get(f"{server.url}/page/%2E%2E%2Fapp.py").status_code == 404
    assert httpx.get(f"{server.url}/page/settings").json() == {"api_key_required": True}
    for path in sorted(PAGE_FOLDER.iterdir()):
        assert "://" not in path.read_text(encoding="utf-8"), f"{path.name} names an outside address"


def test_the_voice_picker_shows_exactly_the_voices_the_server_lists(server, page, listed_voice):
    page.refresh()  # the key stays in the tab
    wait_for(page, lambda: text(page, "server-status").startswith("Connected"))
    options = [option.get_attribute("value") for option in Select(page.find_element(By.ID, "voice")).options]
    assert options == listed_voices(server) and "listed" in options
    assert console_errors(page) == []


@pytest.mark.parametrize("stream_format", ["audio", "sse"])
def test_speak_plays_as_it_streams_for_the_full_length_and_offers_the_wav(server, page, listed_voice, stream_format,
                                                                           tmp_path):
    picker = Select(page.find_element(By.ID, "voice"))
    if listed_voice not in [option.get_attribute("value") for option in picker.options]:  # run on its own
        page.refresh()
        wait_for(page, lambda: text(page, "server-status").startswith("Connected"))
    set_advanced(page, **{"stream-format": stream_format, "seed": 7, "max-new-frames": PLAYED_FRAMES})
    Select(page.find_element(By.ID, "voice")).select_by_value(listed_voice)
    started = time.perf_counter()
    measured = speak_and_wait(page)
    audio_seconds = PLAYED_FRAMES * FRAME_SECONDS
    assert time.perf_counter() - started >= audio_seconds  # played out in real time, not skipped through
    assert float(measured["firstAudioMs"]) < float(measured["requestMs"])  # playback began before the end
    assert float(measured["audioSeconds"]) == pytest.approx(audio_seconds)
    assert float(measured["playedSeconds"]) == pytest.approx(audio_seconds)
    assert float(measured["rtf"]) == pytest.approx(float(measured["requestMs"]) / 1000 / audio_seconds)
    wav = downloaded_wav(page)
    expected = direct_response(server, input=page.find_element(By.ID, "text").get_attribute("value"),
                               voice=listed_voice, seed=7, max_new_frames=PLAYED_FRAMES)
    assert wav[:4] == b"RIFF" and int.from_bytes(wav[24:28], "little") == int(expected.headers["x-sample-rate"])
    assert int.from_bytes(wav[22:24], "little") == int(expected.headers["x-channels"])
    assert wav[44:] == expected.content
    assert console_errors(page) == []
    print(f"\n{stream_format}: first audio {float(measured['firstAudioMs']):.0f} ms, request "
          f"{float(measured['requestMs']):.0f} ms, {audio_seconds:.2f} s of audio played, rtf {measured['rtf']}")
    page.find_element(By.CSS_SELECTOR, "#advanced summary").click()  # folded, for a screenshot of the whole page
    page.execute_script("window.scrollTo(0, 0)")
    page.save_screenshot(str(tmp_path / "web-page.png"))
    if os.environ.get("MOSS_WEB_SCREENSHOT") and stream_format == "audio":
        shutil.copy(tmp_path / "web-page.png", Path(os.environ["MOSS_WEB_SCREENSHOT"]))


def disconnected_requests(server):
    """moss_tts_speech_ended_total{outcome="disconnected"} (0 before the first)."""
    metrics = httpx.get(f"{server.url}/metrics").text
    line = next((line for line in metrics.splitlines() if line.startswith("moss_tts_speech_ended_total")
                 and 'outcome="disconnected"' in line), None)
    return 0.0 if line is None else float(line.split()[-1])


def test_stop_aborts_the_request_and_frees_its_slot(server, page):
    set_advanced(page, **{"stream-format": "audio", "seed": "", "max-new-frames": LONG})
    page.find_element(By.ID, "speak").click()
    wait_for(page, lambda: "firstAudioMs" in stats(page))
    assert health(server)["active"] == 1
    disconnected = disconnected_requests(server)
    page.find_element(By.ID, "stop").click()
    started = time.perf_counter()
    wait_for(page, lambda: health(server)["active"] == 0, seconds=5)
    assert time.perf_counter() - started < 2.0
    assert stats(page)["state"] == "stopped"
    assert disconnected_requests(server) == disconnected + 1
    received = float(stats(page)["audioSeconds"])
    time.sleep(0.3)
    assert float(stats(page)["audioSeconds"]) == received < LONG * FRAME_SECONDS  # nothing arrives after Stop
    assert console_errors(page) == []


def test_the_keyboard_alone_speaks_and_stops(server, page):
    set_advanced(page, **{"stream-format": "sse", "seed": "", "max-new-frames": LONG})
    text_box = page.find_element(By.ID, "text")
    text_box.click()
    text_box.send_keys(Keys.CONTROL, Keys.ENTER)
    wait_for(page, lambda: "firstAudioMs" in stats(page))
    page.switch_to.active_element.send_keys(Keys.ESCAPE)
    wait_for(page, lambda: stats(page)["state"] == "stopped" and health(server)["active"] == 0, seconds=5)
    assert console_errors(page) == []


def test_a_bad_field_shows_the_servers_message_naming_it(page):
    set_advanced(page, **{"seed": -1, "max-new-frames": 6})
    measured = speak_and_wait(page, states=("failed",))
    message = text(page, "speak-error")
    assert 'field "seed"' in message and "expected an integer from 0 to 2**63 - 1" in message and "400" in message
    assert measured["state"] == "failed"
    errors = console_errors(page)
    assert errors and all("status of 400" in error for error in errors)  # the browser's own note of the 400
    set_advanced(page, seed="")


def upload(page, name, file_path=None):
    page.find_element(By.ID, "voice-name").clear()
    page.find_element(By.ID, "voice-name").send_keys(name)
    if file_path is not None:
        page.find_element(By.ID, "voice-file").send_keys(str(file_path))
    page.find_element(By.ID, "add-voice").click()
    wait_for(page, lambda: text(page, "voice-status").startswith("Added") or text(page, "voice-error"))


def test_upload_a_voice_from_a_file_then_speak_with_it(server, page, prompt_wav):
    upload(page, "Not A Name!", prompt_wav)
    assert 'field "name"' in text(page, "voice-error") and "a-z" in text(page, "voice-error")
    console_errors(page)  # the browser's note of that 400
    upload(page, "uploaded", prompt_wav)
    assert text(page, "voice-error") == ""
    picker = Select(page.find_element(By.ID, "voice"))
    assert picker.first_selected_option.get_attribute("value") == "uploaded"
    assert [option.get_attribute("value") for option in picker.options] == listed_voices(server)
    set_advanced(page, **{"stream-format": "audio", "seed": 5, "max-new-frames": 6})
    speak_and_wait(page)
    expected = direct_pcm(server, input=page.find_element(By.ID, "text").get_attribute("value"), voice="uploaded",
                          seed=5, max_new_frames=6)
    assert downloaded_wav(page)[44:] == expected
    assert console_errors(page) == []


def test_a_microphone_recording_becomes_a_voice(server, page):
    page.find_element(By.ID, "voice-file").clear()
    page.find_element(By.ID, "record").click()
    time.sleep(1.5)  # Chromium's fake microphone: a tone
    page.find_element(By.ID, "record-stop").click()
    wait_for(page, lambda: text(page, "record-status").startswith("Recorded"))
    upload(page, "recorded")
    assert text(page, "voice-error") == "" and "recorded" in listed_voices(server)
    assert console_errors(page) == []



def test_without_voices_the_page_speaks_without_a_reference(server, page):
    for voice in listed_voices(server):
        assert api(server, "DELETE", f"/v1/audio/voices/{voice}").status_code == 200
    page.refresh()
    wait_for(page, lambda: text(page, "server-status").startswith("Connected"))
    assert "No voices on the server yet" in text(page, "voice-hint")
    set_advanced(page, **{"stream-format": "audio", "mode": "", "seed": 3, "max-new-frames": 6})
    speak_and_wait(page)
    expected = direct_pcm(server, input=page.find_element(By.ID, "text").get_attribute("value"), mode="continuation",
                          seed=3, max_new_frames=6)
    assert downloaded_wav(page)[44:] == expected
    assert console_errors(page) == []


def test_a_missing_chromium_fails_under_ci_and_skips_with_the_reason_outside(monkeypatch, tmp_path):
    this_module = sys.modules[__name__]
    monkeypatch.setattr(this_module, "CHROMIUM", str(tmp_path / "no_chromium_here"))
    monkeypatch.setattr(this_module, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="no_chromium_here.*CI=true requires it"):
        browser_binaries()
    monkeypatch.setattr(this_module, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium chromium-driver"):
        browser_binaries()
