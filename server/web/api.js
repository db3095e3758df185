// The server's HTTP API as the page uses it: the key (kept in this tab only), errors in words, streamed bodies.

const KEY_STORAGE = "moss-tts-api-key";

export function storedKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function storeKey(key) {
  sessionStorage.setItem(KEY_STORAGE, key);
}

/** An error the server answered, in words: its message, the field at fault, the HTTP status. */
export class ServerError extends Error {
  constructor(status, message, param) {
    super(message);
    this.status = status;
    this.param = param;
  }

  describe() {
    const field = this.param ? ` (field "${this.param}")` : "";
    return `the server answered ${this.status}${field}: ${this.message}`;
  }
}

/** fetch() with the tab's key as Authorization: Bearer; a non-2xx answer throws ServerError. */
export async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = storedKey();
  if (key) {
    headers.set("Authorization", `Bearer ${key}`);
  }
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    throw await serverError(response);
  }
  return response;
}

/** The ServerError of a failed response: OpenAI's error JSON ({"error": {"message", "param"}}) or its text. */
async function serverError(response) {
  const text = await response.text();
  try {
    const error = JSON.parse(text).error;
    if (error && error.message) {
      return new ServerError(response.status, error.message, error.param || null);
    }
  } catch (notJson) {
    // fall through: show the text as it came
  }
  return new ServerError(response.status, text.slice(0, 500) || response.statusText, null);
}

/** The Uint8Array chunks of a response body as they arrive. */
export async function* bodyChunks(response) {
  const reader = response.body.getReader();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) {
        return;
      }
      yield value;
    }
  } finally {
    reader.releaseLock();
  }
}

/** The JSON payloads of a text/event-stream body ("data: {...}" events separated by blank lines). */
export async function* serverSentEvents(response) {
  const decoder = new TextDecoder();
  let pending = "";
  for await (const chunk of bodyChunks(response)) {
    pending += decoder.decode(chunk, { stream: true });
    const events = pending.split("\n\n");
    pending = events.pop();
    for (const event of events) {
      const data = event.split("\n").filter((line) => line.startsWith("data:"));
      if (data.length > 0) {
        yield JSON.parse(data.map((line) => line.slice(5).trim()).join("\n"));
      }
    }
  }
}

/** The bytes of a base64 string. */
export function base64Bytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) {
    bytes[i] = binary.charCodeAt(i);
  }
  return bytes;
}
