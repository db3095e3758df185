// Audio in the browser: 16-bit pcm chunks scheduled into Web Audio as they arrive, and wav files built from pcm.

// Seconds between a chunk's arrival and its earliest start (room for the audio thread to pick it up). Each time the
// stream falls behind playback the lead doubles, up to MAX_LEAD_SECONDS: a slow stream plays with fewer, longer
// waits instead of a gap between every chunk.
const START_LEAD_SECONDS = 0.05;
const MAX_LEAD_SECONDS = 1.0;
const BYTES_PER_SAMPLE = 2;

let sharedContext = null;

/** The page's one AudioContext, made (or resumed) inside a click so that the browser lets it play. */
export async function audioContext() {
  if (sharedContext === null) {
    sharedContext = new AudioContext();
  }
  if (sharedContext.state === "suspended") {
    await sharedContext.resume();
  }
  return sharedContext;
}

/** Plays s16le interleaved pcm as it arrives; keeps the received samples for a wav of the whole. */
export class PcmPlayer {
  constructor(context, sampleRate, channels) {
    this.context = context;
    this.sampleRate = sampleRate;
    this.channels = channels;
    this.leftover = new Uint8Array(0);
    this.received = [];          // Uint8Array chunks of whole sample frames
    this.frames = 0;             // sample frames received
    this.sources = new Set();    // scheduled, not yet ended
    this.nextStart = 0;          // context time where the next chunk starts
    this.firstStart = null;      // performance.now() time at which the first sound starts
    this.playedSeconds = 0;
    this.gaps = 0;               // times the stream fell behind playback (a silent gap)
    this.lead = START_LEAD_SECONDS;
    this.ended = false;          // no more chunks will come
    this.onfinished = null;      // called once everything scheduled has played, after end()
  }

  /** Schedule the whole sample frames of `bytes` (a partial frame waits for the next chunk). */
  push(bytes) {
    const data = concatenate(this.leftover, bytes);
    const frameBytes = BYTES_PER_SAMPLE * this.channels;
    const whole = data.length - (data.length % frameBytes);
    this.leftover = data.slice(whole);
    if (whole === 0) {
      return;
    }
    const chunk = data.slice(0, whole);
    this.received.push(chunk);
    this.frames += whole / frameBytes;
    this.schedule(this.toBuffer(chunk));
  }

  toBuffer(chunk) {
    const samples = new Int16Array(chunk.buffer, chunk.byteOffset, chunk.length / BYTES_PER_SAMPLE);
    const frames = samples.length / this.channels;
    const buffer = this.context.createBuffer(this.channels, frames, this.sampleRate);
    for (let channel = 0; channel < this.channels; channel++) {
      const out = buffer.getChannelData(channel);
      for (let i = 0; i < frames; i++) {
        out[i] = samples[i * this.channels + channel] / 32768;
      }
    }
    return buffer;
  }

  schedule(buffer) {
    const context = this.context;
    if (this.nextStart > 0 && this.nextStart < context.currentTime) {
      this.gaps += 1;
      this.lead = Math.min(MAX_LEAD_SECONDS, this.lead * 2);
    }
    const earliest = context.currentTime + this.lead;
    const start = Math.max(this.nextStart, earliest);
    const source = context.createBufferSource();
    source.buffer = buffer;
    source.connect(context.destination);
    source.onended = () => this.played(source, buffer.duration);
    source.start(start);
    this.sources.add(source);
    this.nextStart = start + buffer.duration;
    if (this.firstStart === null) {
      this.firstStart = performance.now() + (start - context.currentTime) * 1000;
    }
  }

  played(source, seconds) {
    this.sources.delete(source);
    this.playedSeconds += seconds;
    this.finishIfDone();
  }

  /** No more chunks: call onfinished once the scheduled audio has played. */
  end() {
    this.ended = true;
    this.finishIfDone();
  }

  finishIfDone() {
    if (this.ended && this.sources.size === 0 && this.onfinished !== null) {
      const finished = this.onfinished;
      this.onfinished = null;
      finished();
    }
  }

  /** Silence now: drop whatever is scheduled. */
  stop() {
    this.onfinished = null;
    for (const source of this.sources) {
      source.onended = null;
      source.stop();
    }
    this.sources.clear();
  }

  get receivedSeconds() {
    return this.frames / this.sampleRate;
  }

  /** A wav Blob of everything received. */
  wav() {
    return wavBlob(this.received, this.sampleRate, this.channels);
  }
}

/** A 16-bit pcm wav Blob of interleaved s16le chunks. */
export function wavBlob(chunks, sampleRate, channels) {
  const dataBytes = chunks.reduce((total, chunk) => total + chunk.length, 0);
  const header = new DataView(new ArrayBuffer(44));
  const text = (offset, value) => [...value].forEach((c, i) => header.setUint8(offset + i, c.charCodeAt(0)));
  text(0, "RIFF");
  header.setUint32(4, 36 + dataBytes, true);
  text(8, "WAVE");
  text(12, "fmt ");
  header.setUint32(16, 16, true);                                         // fmt chunk size
  header.setUint16(20, 1, true);                                          // integer pcm
  header.setUint16(22, channels, true);
  header.setUint32(24, sampleRate, true);
  header.setUint32(28, sampleRate * channels * BYTES_PER_SAMPLE, true);   // bytes per second
  header.setUint16(32, channels * BYTES_PER_SAMPLE, true);                // bytes per sample frame
  header.setUint16(34, 8 * BYTES_PER_SAMPLE, true);                       // bits per sample
  text(36, "data");
  header.setUint32(40, dataBytes, true);
  return new Blob([header.buffer, ...chunks], { type: "audio/wav" });
}

/** A 16-bit wav Blob of a decoded AudioBuffer (a microphone recording). */
export function audioBufferToWav(buffer) {
  const channels = buffer.numberOfChannels;
  const samples = new Int16Array(buffer.length * channels);
  for (let channel = 0; channel < channels; channel++) {
    const data = buffer.getChannelData(channel);
    for (let i = 0; i < buffer.length; i++) {
      const value = Math.max(-1, Math.min(1, data[i]));
      samples[i * channels + channel] = Math.round(value * 32767);
    }
  }
  return wavBlob([new Uint8Array(samples.buffer)], buffer.sampleRate, channels);
}

function concatenate(first, second) {
  if (first.length === 0) {
    return second;
  }
  const joined = new Uint8Array(first.length + second.length);
  joined.set(first);
  joined.set(second, first.length);
  return joined;
}
