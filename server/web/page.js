// The page's start: wait for the server, ask for the key when it needs one, fill the voices, wire the controls.

import { api, ServerError, storedKey, storeKey } from "./api.js";
import { isRunning, speak, stop } from "./speak.js";
import { addVoice, setUpMicrophone } from "./voice_upload.js";

const $ = (id) => document.getElementById(id);
// While the model loads, /health answers 503: ask again this often, this many times (10 minutes).
const HEALTH_RETRY_MS = 2000;
const HEALTH_TRIES = 300;

let model = "tts-1";  // replaced by the served model's id from GET /v1/models

async function start() {
  wireControls();
  setUpMicrophone();
  if (!(await waitForServer())) {
    return;
  }
  const settings = await (await fetch("/page/settings")).json();
  if (settings.api_key_required && !storedKey()) {
    askForKey("");
    return;
  }
  await connect();
}

async function waitForServer() {
  for (let attempt = 0; attempt < HEALTH_TRIES; attempt++) {
    const response = await fetch("/health").catch(() => null);
    if (response !== null && response.ok) {
      return true;
    }
    const health = response === null ? { status: "unreachable" } : await response.json().catch(() => ({}));
    if (health.status === "failed") {
      serverStatus(`The model failed to load: ${health.error}`);
      return false;
    }
    serverStatus(`The server is ${health.status || "not ready"}; trying again…`);
    await new Promise((resolve) => setTimeout(resolve, HEALTH_RETRY_MS));
  }
  serverStatus("The server did not become ready; reload the page to try again.");
  return false;
}

/** Load the model id and the voices; a 401 asks for the key again. */
async function connect() {
  try {
    const models = await (await api("/v1/models")).json();
    model = models.data.length > 0 ? models.data[0].id : model;
    await loadVoices(null);
    serverStatus(`Connected: ${model}.`);
  } catch (error) {
    if (error instanceof ServerError && error.status === 401) {
      askForKey(error.describe());
      return;
    }
    serverStatus(`Could not reach the API: ${error instanceof ServerError ? error.describe() : error.message}`);
  }
}

function askForKey(problem) {
  $("key-form").hidden = false;
  $("key-error").textContent = problem;
  serverStatus("This server needs its API key (below).");
  $("api-key").focus();
}

/** Fill the voice picker with exactly the voices the server lists; select `selected` if given. */
async function loadVoices(selected) {
  const voices = (await (await api("/v1/audio/voices")).json()).data;
  const picker = $("voice");
  const previous = selected || picker.value;
  picker.replaceChildren(...voices.map((voice) => new Option(voice.name, voice.id)));
  if (voices.length === 0) {
    picker.append(new Option("no voice: speak without a reference (mode continuation)", ""));
  }
  if (voices.some((voice) => voice.id === previous)) {
    picker.value = previous;
  }
  $("voice-hint").textContent = voices.length === 0
    ? "No voices on the server yet: Speak uses none (mode continuation), or add one below."
    : `${voices.length} voice(s) on the server.`;
}

function wireControls() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    storeKey($("api-key").value.trim());
    $("api-key").value = "";
    $("key-form").hidden = true;
    connect();
  });
  $("speak-form").addEventListener("submit", (event) => {
    event.preventDefault();
    speak(model);
  });
  $("stop").addEventListener("click", () => stop());
  $("text").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      $("speak-form").requestSubmit();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && isRunning()) {
      stop("you pressed Escape");
    }
  });
  $("voice-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const added = await addVoice();
    if (added !== null) {
      await loadVoices(added);
    }
  });
}

function serverStatus(words) {
  $("server-status").textContent = words;
}

start();
