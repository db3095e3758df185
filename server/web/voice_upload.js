// Add a voice: a file, or a microphone recording turned into wav here, sent as POST /v1/audio/voices (multipart).

import { api, ServerError } from "./api.js";
import { audioContext, audioBufferToWav } from "./audio.js";

const $ = (id) => document.getElementById(id);
const MAX_RECORDING_SECONDS = 30;

let recording = null;   // wav Blob of the last recording
let recorder = null;    // {mediaRecorder, stream, timer} while recording
let previewUrl = null;

/** Whether this browser lets the page record (getUserMedia needs https or this machine). */
export function microphoneAvailable() {
  return Boolean(window.isSecureContext && navigator.mediaDevices && navigator.mediaDevices.getUserMedia &&
    window.MediaRecorder);
}

export function setUpMicrophone() {
  if (!microphoneAvailable()) {
    for (const id of ["record", "record-stop"]) {
      $(id).hidden = true;
    }
    $("record-hint").textContent = "Recording needs microphone access, which browsers give to pages over https " +
      "or on this machine (localhost) only; choose a file instead.";
    return;
  }
  $("record").addEventListener("click", () => startRecording().catch(recordingFailed));
  $("record-stop").addEventListener("click", () => stopRecording());
  $("record-discard").addEventListener("click", () => discardRecording());
}

async function startRecording() {
  await audioContext();  // made inside the click, for decoding the recording later
  const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  const mediaRecorder = new MediaRecorder(stream);
  const parts = [];
  mediaRecorder.ondataavailable = (event) => parts.push(event.data);
  mediaRecorder.onstop = () => finishRecording(parts, mediaRecorder.mimeType).catch(recordingFailed);
  mediaRecorder.start();
  recorder = { mediaRecorder, stream, timer: setTimeout(stopRecording, MAX_RECORDING_SECONDS * 1000) };
  $("record").disabled = true;
  $("record-stop").disabled = false;
  $("record-status").textContent = `Recording… (at most ${MAX_RECORDING_SECONDS} s; press Stop recording)`;
  $("record-stop").focus();
}

function stopRecording() {
  if (recorder === null) {
    return;
  }
  clearTimeout(recorder.timer);
  recorder.mediaRecorder.stop();
  recorder.stream.getTracks().forEach((track) => track.stop());
  recorder = null;
  $("record").disabled = false;
  $("record-stop").disabled = true;
}

async function finishRecording(parts, mimeType) {
  const encoded = await new Blob(parts, { type: mimeType }).arrayBuffer();
  const decoded = await (await audioContext()).decodeAudioData(encoded);
  recording = audioBufferToWav(decoded);
  if (previewUrl !== null) {
    URL.revokeObjectURL(previewUrl);
  }
  previewUrl = URL.createObjectURL(recording);
  $("record-preview").src = previewUrl;
  $("record-preview").hidden = false;
  $("record-discard").hidden = false;
  $("record-status").textContent = `Recorded ${decoded.duration.toFixed(1)} s; "Add voice" sends it (not the file).`;
}

function discardRecording() {
  recording = null;
  $("record-preview").hidden = true;
  $("record-preview").removeAttribute("src");
  $("record-discard").hidden = true;
  $("record-status").textContent = "Recording discarded.";
  $("record").focus();
}

function recordingFailed(error) {
  stopRecording();
  $("voice-error").textContent = `recording failed: ${error.message}`;
}

/** Upload the recording (or else the chosen file) as a new voice; returns the new voice's id. */
export async function addVoice() {
  $("voice-error").textContent = "";
  $("voice-status").textContent = "";
  const file = $("voice-file").files[0];
  const sample = recording || file;
  if (!sample) {
    $("voice-error").textContent = "choose a recording file, or record one, before adding a voice";
    return null;
  }
  const form = new FormData();
  form.append("name", $("voice-name").value.trim());
  form.append("audio_sample", sample, recording ? "recording.wav" : file.name);
  $("add-voice").disabled = true;
  $("voice-status").textContent = "Uploading and encoding the voice…";
  try {
    const voice = await (await api("/v1/audio/voices", { method: "POST", body: form })).json();
    $("voice-status").textContent = `Added voice "${voice.id}"; it is now selected.`;
    return voice.id;
  } catch (error) {
    $("voice-status").textContent = "";
    $("voice-error").textContent = error instanceof ServerError ? error.describe() : error.message;
    return null;
  } finally {
    $("add-voice").disabled = false;
  }
}
