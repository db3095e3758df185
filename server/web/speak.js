// Speak and Stop: one streamed request at a time, played as it arrives, measured, downloadable as wav.

import { api, base64Bytes, bodyChunks, serverSentEvents, ServerError } from "./api.js";
import { audioContext, PcmPlayer } from "./audio.js";

const $ = (id) => document.getElementById(id);

let current = null;   // the running request: {controller, player, started, ...}
let downloadUrl = null;

/** The speech request's JSON body from the form: empty settings are left out (the server's defaults apply). */
export function speechBody(model) {
  const body = { model, input: $("text").value, response_format: "pcm", stream_format: $("stream-format").value };
  const voice = $("voice").value;
  if (voice) {
    body.voice = voice;
  }
  for (const field of document.querySelectorAll("[data-field]")) {
    const value = field.value.trim();
    if (value !== "") {
      body[field.dataset.field] = fieldValue(field.dataset.kind, value);
    }
  }
  if (!voice && body.mode === undefined) {
    body.mode = "continuation";  // no voice to clone: the model speaks the text without a reference
  }
  return body;
}

function fieldValue(kind, value) {
  if (kind === "boolean") {
    return value === "true";
  }
  if (kind === "number" && value !== "" && Number.isFinite(Number(value))) {
    return Number(value);
  }
  return value;  // text, or a number the browser cannot read: the server says what it expected
}

/** Start speaking; resolves when the request has ended (finished, stopped or failed). */
export async function speak(model) {
  stop("replaced by a new request");
  const context = await audioContext();
  const run = { controller: new AbortController(), player: null, started: performance.now(), usage: null };
  current = run;
  showRunning(true);
  setState("requesting", "Requesting…");
  $("speak-error").textContent = "";
  try {
    const response = await api("/v1/audio/speech", {
      method: "POST", headers: { "Content-Type": "application/json" }, signal: run.controller.signal,
      body: JSON.stringify(speechBody(model)),
    });
    run.player = new PcmPlayer(context, headerNumber(response, "x-sample-rate"), headerNumber(response, "x-channels"));
    $("used-seed").textContent = response.headers.get("x-moss-seed") || "–";
    setState("streaming", "Playing as it streams…");
    await receive(run, response);
    streamEnded(run);
  } catch (error) {
    failed(run, error);
  }
}

function headerNumber(response, name) {
  const value = Number(response.headers.get(name));
  if (!Number.isInteger(value) || value <= 0) {
    throw new Error(`the response has no usable ${name} header (got ${response.headers.get(name)})`);
  }
  return value;
}

async function receive(run, response) {
  if (!(response.headers.get("content-type") || "").startsWith("text/event-stream")) {
    for await (const chunk of bodyChunks(response)) {
      accept(run, chunk);
    }
    return;
  }
  for await (const event of serverSentEvents(response)) {
    if (event.type === "speech.audio.delta") {
      adoptEventFormat(run.player, event);
      accept(run, base64Bytes(event.audio));
    } else if (event.type === "speech.audio.done") {
      run.usage = event.usage || null;
    } else if (event.type === "error") {
      throw new ServerError(response.status, event.error.message, event.error.param || null);
    }
  }
}

/** An event that states its own rate or channel count overrides the headers (before its audio is played). */
function adoptEventFormat(player, event) {
  if (Number.isInteger(event.sample_rate) && event.sample_rate > 0) {
    player.sampleRate = event.sample_rate;
  }
  if (Number.isInteger(event.channels) && event.channels > 0) {
    player.channels = event.channels;
  }
}

function accept(run, bytes) {
  if (run !== current) {
    return;
  }
  run.player.push(bytes);
  if (run.player.firstStart !== null && $("stats").dataset.firstAudioMs === undefined) {
    showNumber("first-audio", "firstAudioMs", run.player.firstStart - run.started, (ms) => `${ms.toFixed(0)} ms`);
  }
  showFormat(run.player);
}

function streamEnded(run) {
  if (run !== current) {
    return;
  }
  const player = run.player;
  const seconds = (performance.now() - run.started) / 1000;
  showNumber("request-time", "requestMs", seconds * 1000, (ms) => `${(ms / 1000).toFixed(2)} s`);
  showNumber("rtf", "rtf", player.receivedSeconds > 0 ? seconds / player.receivedSeconds : 0, (v) => v.toFixed(3));
  offerDownload(player);
  showRunning(false, true);
  setState("playing", `Received ${player.receivedSeconds.toFixed(2)} s of audio; playing the rest…`);
  player.onfinished = () => {
    showPlayed(player);
    setState("finished", `Finished: played ${player.playedSeconds.toFixed(2)} s` +
      (player.gaps ? ` (the stream fell behind ${player.gaps} times)` : "") + ".");
    current = null;
    showRunning(false);
  };
  player.end();
}

function failed(run, error) {
  if (run !== current) {
    return;
  }
  if (error.name === "AbortError") {
    return;  // Stop: already reported
  }
  if (run.player !== null) {
    run.player.stop();
  }
  current = null;
  showRunning(false);
  const words = error instanceof ServerError ? error.describe() : `${error.message}`;
  $("speak-error").textContent = words;
  setState("failed", "The request failed (the reason is below).");
}

/** Abort the running request (the server cancels it and frees its slot) and silence what is scheduled. */
export function stop(reason = "you pressed Stop") {
  const run = current;
  if (run === null) {
    return;
  }
  current = null;
  run.controller.abort();
  if (run.player !== null) {
    run.player.stop();
    showPlayed(run.player);
    offerDownload(run.player);
  }
  showRunning(false);
  setState("stopped", `Stopped (${reason}).`);
}

function offerDownload(player) {
  if (downloadUrl !== null) {
    URL.revokeObjectURL(downloadUrl);
  }
  downloadUrl = URL.createObjectURL(player.wav());
  const link = $("download");
  link.href = downloadUrl;
  link.dataset.bytes = String(44 + player.frames * player.channels * 2);
  link.hidden = player.frames === 0;
}

function showFormat(player) {
  $("audio-format").textContent = `16-bit pcm, ${player.sampleRate} Hz, ${player.channels} channel(s)`;
  showNumber("audio-received", "audioSeconds", player.receivedSeconds, (s) => `${s.toFixed(2)} s`);
}

function showPlayed(player) {
  const played = player.playedSeconds;
  showNumber("played", "playedSeconds", played, (s) => `${s.toFixed(2)} s`);
  $("stats").dataset.gaps = String(player.gaps);
}

/** Show a measured value in words, and keep the number on #stats as data-* for scripts and tests. */
function showNumber(id, key, value, words) {
  $(id).textContent = words(value);
  $("stats").dataset[key] = String(value);
}

function setState(state, words) {
  $("stats").dataset.state = state;
  $("playback-status").textContent = words;
}

function showRunning(running, keepStop = false) {
  $("speak").disabled = running;
  $("stop").disabled = !(running || keepStop);
  if (running) {
    for (const key of ["firstAudioMs", "requestMs", "audioSeconds", "playedSeconds", "rtf", "gaps"]) {
      delete $("stats").dataset[key];
    }
    for (const id of ["first-audio", "request-time", "audio-received", "rtf", "played", "audio-format"]) {
      $(id).textContent = "–";
    }
    $("download").hidden = true;
  }
}

export function isRunning() {
  return current !== null;
}
