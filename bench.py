"""Benchmarks of this repository's models, one section per component (no download: random weights, real sizes).

    python bench.py                                                   # codec, e2e and lm sections, 2 threads
    python bench.py --section lm --weight-format fp32 bf16 int8 --compare-upstream ../upstream_code
    python bench.py --section codec --compare-upstream-codec ../upstream_codec
    python bench.py --section codec --json                             # one section, figures as JSON
    python bench.py --section engine --weight-format int8              # N concurrent streams (long)

Every report starts with the CPU model and the kernels chosen on it: CPU figures are only comparable on one CPU (an
Intel Xeon and an AMD EPYC give very different fp32 figures), so ratios to upstream are measured in the same run.

Sections:
- codec: MOSS-Audio-Tokenizer-Nano at the released size. Streaming decode time per 80 ms frame at steady state (every
  sliding window full) with 1 and several frames per call, over the first --start-seconds of fresh streams (caches
  still filling), and offline encode/decode real-time factors. Upstream's
  streaming decode is timed in this process on the same weights with --compare-upstream-codec PATH (a folder of
  upstream's codec remote-code files); else its reference on another 2-vCPU host is quoted (21-23 ms per frame,
  spec codec.md §7).
- lm: MOSS-TTS-Nano's generate_stream at the released size, random weights (or --model-path), a fixed 81-row
  continuation prompt, sampled with the CLI's defaults (--greedy for greedy), --frames forced frames (default 120 =
  9.6 s of audio). Per weight format (weight_formats.py): decode ms/frame and frames/s after the first frame, the ratio
  to upstream (measured in this process on the same weights with --compare-upstream PATH, a folder of upstream's
  remote-code files; else a quoted 6.5 frames/s), time to the first frame, LM real-time factor (prefill included;
  12.5 frames = 1 s) and peak memory. --compare-eager first runs fp32 with eager attention ("x ref" column).
  Each row is also set against its memory floor (measurement/frame_profile.py): the weight bytes a frame reads at
  least once, the read bandwidth measured here at --threads (host.read_bandwidth), floor = bytes / bandwidth, and
  the frame as a multiple of it; --profile splits --profile-frames frames into global step, local steps, heads,
  sampling and host.
  Frames are forced by a weight edit (`checkpoints.force_continue`): the stop logit loses by 100 every frame, with
  the same shapes and ops as any frame. Medians of --runs runs after --warmup short runs; references run once.
- e2e: generate_stream frames streamed into the codec's decode session (first frame alone, then
  --e2e-codec-frames per call): time to first audio and end-to-end RTF per weight format (random codec weights).
- engine: N concurrent streams (--streams) arriving --stagger s apart on one engine, LM + codec: aggregate frames/s,
  time to first audio p50/p95/p99, worst per-stream real-time factor, underruns (a stream whose received audio falls
  behind playback) and by how much, the largest N with none, the mean tick split (LM step, codec, prefill, host),
  peak memory. --compare-engine PATH runs another checkout's engine (e.g. `git worktree add PATH f2918fd`) on the
  same weights first, its model and codec built by its own modules, so before/after come from one run.
  --voice-frames N gives every stream a voice-clone prompt in one voice of N reference frames (each its own text);
  engines with a prefix store (prefix_store.py) then prefill the voice once, and the prefill column shows what that
  saves. --prefill-chunk-rows N adds this engine prefilling in chunks of N rows (engine.py), and the longest-tick
  column shows the stall a joining prompt causes.

A section is a function `(args) -> dict` registered in SECTIONS; it may add its own options in ADD_OPTIONS.
The device string is passed through to devices.py.
"""

import argparse
import gc
import json
import os
import statistics
import sys
import threading
import time

import torch

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, REPO_ROOT)
from local_package import import_folder_as_package, import_module  # noqa: E402

UPSTREAM_STREAM_MS_PER_FRAME = (21.0, 23.0)  # codec.md §7, upstream on 2 vCPU, fp32
TARGET_STREAM_MS_PER_FRAME = 10.0  # issue 7


devices = import_module("devices")
force_continue = import_module("measurement.checkpoints").force_continue
reset_peak_rss = import_module("verify_npu").reset_peak_rss  # the CPU peak window (process-wide: scripts only)


def reset_peak_memory(device) -> None:
    """A new peak-memory window: the accelerator's allocator statistics, or on CPU the process's peak RSS."""
    devices.reset_peak_memory(device)
    reset_peak_rss()


def resolve_device(name: str) -> torch.device:
    return devices.resolve_device(name)


def synchronize(device: torch.device) -> None:
    devices.synchronize(device)


def timed(fn, device, runs: int, warmup: int) -> list[float]:
    """Seconds per call of fn() over `runs` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# ----------------------------------------------------------------------------------------------------------------------
# codec
# ----------------------------------------------------------------------------------------------------------------------
def build_codec(device: torch.device, compute_dtype: str, layout: str = "auto"):
    """The released-size codec with random weights (seeded), eval mode; `layout` "auto" lays its Linear weights out
    as the pipeline's loader does on the CPU, "row-major" keeps them as loaded (upstream's kernels)."""
    config_module = import_module("configuration_moss_audio_tokenizer")
    modeling = import_module("modeling_moss_audio_tokenizer")
    torch.manual_seed(0)
    model = modeling.MossAudioTokenizerModel(config_module.MossAudioTokenizerConfig()).eval().to(device)
    model.set_compute_dtype(compute_dtype)
    if layout == "auto":
        import_module("weight_formats").use_codec_cpu_layout(model)
    return model


class UpstreamStyleStream:
    """`batch_decode(streaming=True)` (the call the upstream TTS makes) behind the session's `step` interface."""

    def __init__(self, model):
        self.model = model
        self.first = True

    def step(self, codes):
        self.model.batch_decode([codes[:, 0]], streaming=True, max_batch_size=1, reset_stream=self.first)
        self.first = False


# The name of the streaming call timed: ours (False) or upstream's API (True).
STREAM_APIS = {False: "decode_session().step", True: "batch_decode(streaming=True)"}


def stream_under_test(model, upstream_api: bool, frames_per_step: int):
    """A fresh stream: our decode session (its ring sized for `frames_per_step` frames), or the model's
    batch_decode(streaming=True) behind the same `step`."""
    if upstream_api:
        return UpstreamStyleStream(model)
    return model.decode_session(1, max_frames_per_step=frames_per_step)


def bench_codec_streaming(model, device, frames_per_call: int, args, upstream_api: bool = False) -> dict:
    """Steady-state streaming decode: prefill until every window is full, then time each call separately.

    Per-call timing with a median resists the bursts of a shared host better than timing whole runs. The session's
    ring capacity is sized for `frames_per_call` (or --max-frames-per-step); `upstream_api` times batch_decode.
    """
    nq, size = model.config.num_quantizers, model.config.codebook_size
    prefill = int(args.prefill_seconds * model.config.frame_rate)
    calls = args.runs * max(1, args.stream_frames // frames_per_call)
    session = stream_under_test(model, upstream_api, args.max_frames_per_step or frames_per_call)
    generator = torch.Generator().manual_seed(1)
    total = prefill + (calls + args.warmup) * frames_per_call
    codes = torch.randint(0, size, (nq, 1, total), generator=generator).to(device)
    for start in range(0, prefill, frames_per_call):
        session.step(codes[:, :, start : min(start + frames_per_call, prefill)])
    starts = iter(range(prefill, total, frames_per_call))

    def one_call():
        start = next(starts)
        session.step(codes[:, :, start : start + frames_per_call])

    times = timed(one_call, device, calls, args.warmup)
    per_frame = sorted(1000.0 * t / frames_per_call for t in times)
    median = statistics.median(per_frame)
    return {
        "api": STREAM_APIS[upstream_api],
        "frames_per_call": frames_per_call,
        "calls_timed": calls,
        "ms_per_frame_median": median,
        "ms_per_frame_p10": per_frame[len(per_frame) // 10],
        "ms_per_frame_p90": per_frame[(9 * len(per_frame)) // 10],
        "ms_per_frame_mean": statistics.fmean(per_frame),
        "rtf": median / (1000.0 / model.config.frame_rate),
    }


def bench_codec_stream_start(model, device, args, upstream_api: bool = False) -> dict:
    """The first --start-seconds of fresh streams, 1 frame per call: where most utterances end, and where the caches
    are still filling (upstream's grows; our session attends only the ring prefix written so far). Each timed call is
    a whole fresh stream; the median over --runs streams is reported per frame."""
    frames = max(1, int(args.start_seconds * model.config.frame_rate))
    generator = torch.Generator().manual_seed(3)
    codes = torch.randint(0, model.config.codebook_size, (model.config.num_quantizers, 1, frames),
                          generator=generator).to(device)

    def one_stream():
        session = stream_under_test(model, upstream_api, 1)
        for frame in range(frames):
            session.step(codes[:, :, frame : frame + 1])

    times = timed(one_stream, device, args.runs, args.warmup)
    return {"api": STREAM_APIS[upstream_api], "frames": frames,
            "ms_per_frame_median": 1000.0 * statistics.median(times) / frames}


def bench_codec_offline(model, device, args) -> dict:
    seconds = args.offline_seconds
    samples = int(seconds * model.sampling_rate)
    generator = torch.Generator().manual_seed(2)
    audio = (0.1 * torch.randn(1, model.number_channels, samples, generator=generator)).to(device)
    codes = model.encode(audio).audio_codes
    encode_times = timed(lambda: model.encode(audio), device, args.runs, args.warmup)
    decode_times = timed(lambda: model.decode(codes), device, args.runs, args.warmup)
    return {
        "clip_seconds": seconds,
        "encode_rtf": statistics.median(encode_times) / seconds,
        "decode_rtf": statistics.median(decode_times) / seconds,
    }


UPSTREAM_CODEC_PACKAGE = "moss_audio_tokenizer_upstream"


def upstream_module(folder: str, package: str, module: str):
    """`module` of the folder of upstream's remote-code files registered as `package` (local_package)."""
    import importlib

    from local_package import import_folder_as_package

    import_folder_as_package(folder, package)
    return importlib.import_module(f"{package}.{module}")


def with_weights_of(model, ours, flag: str):
    """Upstream's `model` holding `ours`'s weights; exits naming `flag` when the two state dicts differ."""
    missing, unexpected = model.load_state_dict(ours.state_dict(), strict=False)
    if missing or unexpected:
        raise SystemExit(f"{flag}: the state dicts differ (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def build_upstream_codec(args, ours, device):
    """Upstream's MossAudioTokenizerModel from the remote-code files in --compare-upstream-codec, holding `ours`'s
    (seeded) weights, in float32."""
    folder = args.compare_upstream_codec
    configuration = upstream_module(folder, UPSTREAM_CODEC_PACKAGE, "configuration_moss_audio_tokenizer")
    modeling = upstream_module(folder, UPSTREAM_CODEC_PACKAGE, "modeling_moss_audio_tokenizer")
    model = modeling.MossAudioTokenizerModel(configuration.MossAudioTokenizerConfig.from_dict(ours.config.to_dict()))
    return with_weights_of(model, ours, "--compare-upstream-codec").float().eval().to(device)


def run_codec(args) -> dict:
    device = resolve_device(args.device)
    model = build_codec(device, args.codec_dtype, args.codec_layout)
    streaming = [bench_codec_streaming(model, device, n, args) for n in args.frames_per_call]
    streaming.append(bench_codec_streaming(model, device, 1, args, upstream_api=True))
    model._reset_batch_decode_streaming_state()
    start = [bench_codec_stream_start(model, device, args)]
    if args.compare_upstream_codec:
        upstream = build_upstream_codec(args, model, device)
        row = bench_codec_streaming(upstream, device, 1, args, upstream_api=True)
        streaming.append(dict(row, api="upstream's batch_decode(streaming)"))
        row = bench_codec_stream_start(upstream, device, args, upstream_api=True)
        start.append(dict(row, api="upstream's batch_decode(streaming)"))
        del upstream
    return {
        "device": str(device),
        "compute_dtype": args.codec_dtype,
        "streaming": streaming,
        "stream_start": start,
        "offline": bench_codec_offline(model, device, args),
        "upstream_stream_ms_per_frame": list(UPSTREAM_STREAM_MS_PER_FRAME),
        "target_stream_ms_per_frame": TARGET_STREAM_MS_PER_FRAME,
    }


def add_codec_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("codec")
    group.add_argument("--frames-per-call", type=int, nargs="+", default=[1, 4, 8])
    group.add_argument("--stream-frames", type=int, default=24, help="frames per timed streaming run")
    group.add_argument("--prefill-seconds", type=float, default=4.5, help="streamed before timing (fills windows)")
    group.add_argument("--offline-seconds", type=float, default=10.0)
    group.add_argument("--start-seconds", type=float, default=3.0,
                       help="audio decoded from the start of fresh streams (1 frame per call) for the stream-start row")
    group.add_argument("--codec-dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    group.add_argument("--codec-layout", choices=["auto", "row-major"], default="auto",
                       help="codec Linear weights: auto = the layout the loader picks on this CPU (probe), row-major = "
                            "as loaded (upstream's kernels)")
    group.add_argument("--max-frames-per-step", type=int, default=None,
                       help="session ring capacity in frames (default: the frames per call)")
    group.add_argument("--compare-upstream-codec", metavar="PATH", default=None,
                       help="a folder holding upstream's codec remote-code files (modeling_moss_audio_tokenizer.py, "
                            "configuration_moss_audio_tokenizer.py): also time upstream's streaming decode, 1 frame per "
                            "call, in this process on the same weights")


def print_codec(result: dict) -> None:
    low, high = result["upstream_stream_ms_per_frame"]
    print(f"codec ({result['device']}, {result['compute_dtype']}): streaming decode, steady state (windows full)")
    upstream = [row for row in result["streaming"] if row["api"].startswith("upstream")]
    for row in result["streaming"]:
        ratio = f", {upstream[0]['ms_per_frame_median'] / row['ms_per_frame_median']:.2f}x upstream" if upstream else ""
        print(f"  {row['api']:<34} {row['frames_per_call']:>2} frame(s)/call: "
              f"{row['ms_per_frame_median']:6.2f} ms/frame median (p10 {row['ms_per_frame_p10']:.2f}, "
              f"p90 {row['ms_per_frame_p90']:.2f}; {row['calls_timed']} calls), RTF {row['rtf']:.3f}{ratio}")
    if not upstream:
        print(f"  upstream {low:.0f}-{high:.0f} ms/frame (quoted; --compare-upstream-codec PATH measures it); "
              f"target <= {result['target_stream_ms_per_frame']:.0f} ms/frame")
    first = result["stream_start"]
    print(f"  first {first[0]['frames']} frames of fresh streams (caches filling), 1 frame/call:")
    for row in first:
        ratio = f", {first[-1]['ms_per_frame_median'] / row['ms_per_frame_median']:.2f}x upstream" if upstream else ""
        print(f"  {row['api']:<34}    {row['ms_per_frame_median']:6.2f} ms/frame (median over streams){ratio}")
    offline = result["offline"]
    print(f"  offline {offline['clip_seconds']:.0f} s clip: encode RTF {offline['encode_rtf']:.3f}, "
          f"decode RTF {offline['decode_rtf']:.3f}   [upstream encode 0.06-0.16, decode 0.07-0.15]")


# ----------------------------------------------------------------------------------------------------------------------
# lm, e2e
# ----------------------------------------------------------------------------------------------------------------------
FRAME_RATE = 12.5  # LM frames per second of audio
UPSTREAM_LM_FRAMES_PER_SECOND = 6.5  # quoted (issue 7: upstream generate(), 2-core Xeon, fp32, greedy) without
# --compare-upstream, which measures it in the same run instead
# The CLI's generation defaults (upstream infer.py's applied values, spec tts.md §6.4 right column).
SAMPLED_DEFAULTS = dict(do_sample=True, text_temperature=1.0, text_top_p=1.0, text_top_k=50, audio_temperature=0.8,
                        audio_top_p=0.95, audio_top_k=25, audio_repetition_penalty=1.2)
UPSTREAM_PACKAGE = "moss_tts_nano_upstream"


def build_lm(args, device):
    """The TTS LM: released config with seeded random weights, or --model-path; stop forced; fp32 on `device`."""
    modeling = import_module("modeling_moss_tts_nano")
    if args.model_path:
        model = modeling.MossTTSNanoForCausalLM.from_pretrained(args.model_path)
    else:
        config = modeling.MossTTSNanoConfig.from_json_file(os.path.join(REPO_ROOT, "config.json"))
        torch.manual_seed(0)
        model = modeling.MossTTSNanoForCausalLM(config)
    model = model.float().eval()
    force_continue(model)
    return model.to(device)


def bench_prompt(device, rows: int = 81, seed: int = 3) -> torch.Tensor:
    """A fixed continuation prompt of `rows` text rows ending in audio_start (81 = "Hello world." in spec §5.3)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((1, rows, 17), 1024)
    ids[0, :, 0] = torch.randint(10, 16000, (rows,), generator=generator)
    ids[0, -1, 0] = 6  # audio_start
    return ids.to(device)


def generation_options(args) -> dict:
    """What the lm and e2e sections generate with: the CLI's sampled defaults, or greedy with --greedy."""
    return {"do_sample": False} if args.greedy else dict(SAMPLED_DEFAULTS)


def build_upstream_lm(args, device):
    """Upstream's MossTTSNanoForCausalLM from the remote-code files in --compare-upstream, holding the same (seeded,
    stop-forced) weights as build_lm's model; its attention is sdpa (upstream's infer.py switches to it off CUDA).

    Upstream's modeling file imports torchaudio for audio I/O that generate never uses; where torchaudio is not
    installed (this project never installs it) an empty stand-in module is registered first (spec tts.md §10).
    """
    import importlib.util
    import types

    import transformers  # noqa: F401  (first: it probes torchaudio's spec at import, which a stand-in lacks)

    stand_in = importlib.util.find_spec("torchaudio") is None
    if stand_in:  # only while upstream's modules import it: transformers probes torchaudio's spec later
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    try:
        modeling = upstream_module(args.compare_upstream, UPSTREAM_PACKAGE, "modeling_moss_tts_nano")
    finally:
        if stand_in:
            del sys.modules["torchaudio"]
    ours = build_lm(args, torch.device("cpu"))
    model = modeling.MossTTSNanoForCausalLM(type(ours.config).from_dict(ours.config.to_dict()))
    with_weights_of(model, ours, "--compare-upstream")
    model._set_attention_implementation("sdpa")
    return model.float().eval().to(device)


def time_generation(model, prompt, device, frames: int, **kwargs) -> dict:
    """One generate_stream run (seeded): ms to the first frame (prefill + 1 frame) and per later frame."""
    torch.manual_seed(0)
    synchronize(device)
    start = time.perf_counter()
    first = None
    count = 0
    for event in model.generate_stream(prompt, max_new_frames=frames, **kwargs):
        if event["type"] != "frame":
            continue
        count += 1
        if first is None:
            synchronize(device)
            first = time.perf_counter()
    synchronize(device)
    end = time.perf_counter()
    if count != frames:
        raise SystemExit(f"the model stopped after {count} of {frames} frames; the forced stop edit failed")
    return {"first_frame_ms": 1000 * (first - start), "decode_ms_per_frame": 1000 * (end - first) / max(1, frames - 1),
            "total_s": end - start}


def bench_lm_variant(model, prompt, device, args, label: str, frames: int, runs: int, **kwargs) -> dict:
    """Median over `runs` timed generations (after a short warm-up) of one model/path."""
    for _ in range(args.warmup):
        time_generation(model, prompt, device, min(frames, 4), **kwargs)
    reset_peak_memory(device)
    results = [time_generation(model, prompt, device, frames, **kwargs) for _ in range(runs)]
    decode = statistics.median(r["decode_ms_per_frame"] for r in results)
    total = statistics.median(r["total_s"] for r in results)
    peak = devices.peak_memory_bytes(device)
    return {
        "label": label, "frames": frames, "runs": runs,
        "decode_ms_per_frame": decode, "decode_frames_per_s": 1000.0 / decode,
        "first_frame_ms": statistics.median(r["first_frame_ms"] for r in results),
        "frames_per_s": frames / total, "rtf": total / (frames / FRAME_RATE),
        "vs_upstream": (1000.0 / decode) / (args.upstream_frames_per_s or UPSTREAM_LM_FRAMES_PER_SECOND),
        "peak_memory_mb": None if peak is None else peak / 2**20,  # CPU: process peak RSS (one LM + this run)
    }


def lm_variants(args):
    """(label, weight format, generate kwargs, reference?) rows to run, reference path first."""
    rows = []
    if args.compare_eager:
        rows.append(("fp32, eager attention", "fp32", {"attn_implementation": "eager"}, True))
    for fmt in args.weight_format:
        rows.append((f"{fmt}, {args.attention}", fmt, {"attn_implementation": args.attention}, False))
        for mode in args.fast_decode:  # enable_fast_decode(mode): fixed-shape steps, compiled or captured
            rows.append((f"{fmt}, {args.attention}, fast decode {mode}", fmt,
                         {"attn_implementation": args.attention, "fast_decode": mode}, False))
    return rows


def build_lm_in_format(args, device, weight_format: str):
    """A fresh (seeded, so identical) model per format, so that peak memory counts one model at a time; "plain" is
    float32 with torch's own nn.Linear (no conversion: upstream's kernels); "int8-torch" and "int8-onnxruntime" are
    int8 with its global step and audio phase forced there (onnx_graph.py; plain "int8" lets the probes choose)."""
    gc.collect()
    model = build_lm(args, device)
    if weight_format == "plain":
        return model
    name, _, runtime = weight_format.partition("-")
    model = import_module("weight_formats").apply_weight_format(model, name)
    if runtime:
        import_module("onnx_graph").set_phases(model, runtime)
    return model


def kernels_of(model) -> str:
    """The Linear kernels, and for int8 where its graph phases run (e.g. "int8 audio_phase=onnxruntime ...")."""
    phases = import_module("onnx_graph").phases_of(model)
    return import_module("weight_formats").linear_kernel_of(model) + (f" {phases}" if phases else "")


def run_lm(args) -> dict:
    device = resolve_device(args.device)
    prompt = bench_prompt(device)
    options = generation_options(args)
    results = []
    args.upstream_frames_per_s = None
    if args.compare_upstream:
        upstream = build_upstream_lm(args, device)
        row = bench_lm_variant(upstream, prompt, device, args, "upstream (same process, same weights)",
                               args.reference_frames or args.frames, 1, **options)
        args.upstream_frames_per_s = row["decode_frames_per_s"]
        results.append(dict(row, weight_format="fp32", attention="sdpa", fast_decode=None, vs_upstream=1.0))
        del upstream
    for label, fmt, kwargs, reference in lm_variants(args):
        model = build_lm_in_format(args, device, fmt)
        fast_decode = kwargs.pop("fast_decode", None)
        if fast_decode is not None:
            model.enable_fast_decode(fast_decode)
        frames = (args.reference_frames or args.frames) if reference else args.frames
        runs = 1 if reference else args.runs
        with torch.inference_mode():
            row = bench_lm_variant(model, prompt, device, args, label, frames, runs, **kwargs, **options)
        row.update(weight_format=fmt, attention=kwargs["attn_implementation"], fast_decode=fast_decode,
                   kernels=kernels_of(model))
        add_floor(row, model, args, prompt, **kwargs, **options)
        results.append(row)
        del model
    if args.compare_eager:
        for row in results:
            row["vs_reference"] = results[0]["decode_ms_per_frame"] / row["decode_ms_per_frame"]
    upstream = args.upstream_frames_per_s
    return {"device": str(device), "prompt_rows": prompt.shape[1], "model": args.model_path or "random (config.json)",
            "sampling": "greedy" if args.greedy else "sampled (CLI defaults)",
            "upstream_frames_per_s": upstream or UPSTREAM_LM_FRAMES_PER_SECOND,
            "upstream_measured": upstream is not None, "variants": results}


def add_floor(row: dict, model, args, prompt, **kwargs) -> None:
    """The row's frame against its memory floor (frame_profile.frame_floor), and with --profile where it goes."""
    frame_profile = import_module("measurement.frame_profile")
    floor = frame_profile.frame_floor(model, args.threads)
    row.update(frame_bytes=floor["bytes"], bandwidth_gb_s=floor["bandwidth"] / 1e9, floor_ms=floor["floor_ms"],
               x_floor=row["decode_ms_per_frame"] / floor["floor_ms"])
    if args.profile:
        with torch.inference_mode():
            row["profile"] = frame_profile.profile_frames(model, prompt, args.profile_frames, **kwargs)


def print_floors(result: dict) -> None:
    """Per row: bytes a frame must read, the floor at the measured bandwidth, the frame as a multiple of it, and the
    profile's split when there is one."""
    rows = [row for row in result["variants"] if "floor_ms" in row]
    if rows:
        print(f"  floor = weight bytes a frame reads at least once / read bandwidth measured here "
              f"({rows[0]['bandwidth_gb_s']:.1f} GB/s at the bench's threads)")
    for row in rows:
        print(f"  {row['label']:40s} {row.get('kernels', '-'):>16s} {row['frame_bytes'] / 1e6:7.1f} MB "
              f"floor {row['floor_ms']:6.2f} ms, frame {row['decode_ms_per_frame']:6.1f} ms = {row['x_floor']:.2f}x")
        if "profile" in row:
            prof = row["profile"]
            split = ", ".join(f"{part} {ms:.1f}" for part, ms in prof["parts"].items() if ms or "graph" not in part)
            print(f"    profile ({prof['frames']} frames, profiler on): {prof['ms_per_frame']:.1f} ms/frame = {split}, "
                  f"host {prof['host_ms']:.1f} ms; {prof['aten_calls']:.0f} aten calls per frame")


def print_lm(result: dict) -> None:
    source = "measured in this run" if result["upstream_measured"] else "quoted, not measured: use --compare-upstream"
    print(f"lm ({result['device']}, {result['model']}, prompt {result['prompt_rows']} rows, {result['sampling']}, "
          f"stop forced): decode = after the first frame; RTF counts prefill; upstream "
          f"{result['upstream_frames_per_s']:.1f} frames/s ({source})")
    print(f"  {'variant':40s} {'ms/frame':>9s} {'frames/s':>9s} {'x upstr':>8s} {'x ref':>6s} {'1st frame':>10s} "
          f"{'RTF':>6s} {'peak MB':>8s}")
    for row in result["variants"]:
        ratio = f"{row['vs_reference']:6.2f}" if "vs_reference" in row else "     -"
        peak = f"{row['peak_memory_mb']:8.0f}" if row["peak_memory_mb"] is not None else "     n/a"
        print(f"  {row['label']:40s} {row['decode_ms_per_frame']:9.1f} {row['decode_frames_per_s']:9.1f} "
              f"{row['vs_upstream']:8.2f} {ratio} {row['first_frame_ms']:8.0f}ms {row['rtf']:6.3f} {peak}")
    print_floors(result)


def run_e2e(args) -> dict:
    """LM frames streamed into the codec: time to first audio and end-to-end RTF, per weight format."""
    device = resolve_device(args.device)
    codec = build_codec(device, args.codec_dtype, args.codec_layout)
    prompt = bench_prompt(device)
    rows = []
    for fmt in args.weight_format:
        model = build_lm_in_format(args, device, fmt)
        with torch.inference_mode():
            stream_once(model, codec, prompt, device, 4, args)  # warm-up
            runs = [stream_once(model, codec, prompt, device, args.frames, args) for _ in range(args.runs)]
        rows.append({"weight_format": fmt, "attention": args.attention, "frames": args.frames,
                     "codec_frames_per_call": args.e2e_codec_frames,
                     "time_to_first_audio_ms": statistics.median(r["first_audio_ms"] for r in runs),
                     "rtf": statistics.median(r["rtf"] for r in runs),
                     "codec_ms_per_frame": statistics.median(r["codec_ms_per_frame"] for r in runs)})
    return {"device": str(device), "codec_dtype": args.codec_dtype, "rows": rows}


def stream_once(model, codec, prompt, device, frames: int, args) -> dict:
    """generate_stream -> codec session: the first frame is decoded alone, then --e2e-codec-frames at a time."""
    session = codec.decode_session(1, max_frames_per_step=max(1, args.e2e_codec_frames))
    pending, first_audio, codec_s, samples = [], None, 0.0, 0
    synchronize(device)
    start = time.perf_counter()
    torch.manual_seed(0)
    for event in model.generate_stream(prompt, max_new_frames=frames, attn_implementation=args.attention,
                                       **generation_options(args)):
        if event["type"] != "frame":
            continue
        pending.append(event["audio_token_ids"])  # [1, n_vq]
        if first_audio is not None and len(pending) < args.e2e_codec_frames:
            continue
        codec_start = time.perf_counter()
        audio = session.step(torch.stack(pending, dim=-1).permute(1, 0, 2))  # codes [n_vq, 1, T]
        synchronize(device)
        codec_s += time.perf_counter() - codec_start
        samples += audio.shape[-1]
        pending = []
        if first_audio is None:
            first_audio = time.perf_counter()
    if pending:
        codec_start = time.perf_counter()
        samples += session.step(torch.stack(pending, dim=-1).permute(1, 0, 2)).shape[-1]
        synchronize(device)
        codec_s += time.perf_counter() - codec_start
    total = time.perf_counter() - start
    seconds = samples / codec.sampling_rate
    return {"first_audio_ms": 1000 * (first_audio - start), "rtf": total / seconds,
            "codec_ms_per_frame": 1000 * codec_s / frames}


def print_e2e(result: dict) -> None:
    print(f"end to end ({result['device']}, codec {result['codec_dtype']}): generate_stream -> codec streaming "
          "decode (1 frame first, then fixed chunks)")
    for row in result["rows"]:
        print(f"  {row['weight_format']:5s} {row['attention']:6s}: time to first audio "
              f"{row['time_to_first_audio_ms']:6.0f} ms, RTF {row['rtf']:.3f} (codec {row['codec_ms_per_frame']:.1f} "
              f"ms/frame at {row['codec_frames_per_call']} frames/call; {row['frames']} frames)")


# ----------------------------------------------------------------------------------------------------------------------
# engine: many concurrent streams
# ----------------------------------------------------------------------------------------------------------------------
class StreamClock:
    """One request's timeline, recorded by the engine thread: submit, first audio, audio received, underruns.

    Playback starts when the first audio arrives; a stream underruns when, at the arrival of a piece, the audio
    received before it is shorter than the time elapsed since playback started. `events` is the engine module whose
    event classes the engine under test emits.
    """

    def __init__(self, rate: int, events) -> None:
        self.rate, self.events, self.submitted, self.first_audio, self.received = rate, events, None, None, 0.0
        self.underrun_seconds, self.finished, self.frames, self.error = 0.0, None, 0, None

    def __call__(self, event) -> None:
        now = time.perf_counter()
        if isinstance(event, self.events.AudioEvent):
            if self.first_audio is None:
                self.first_audio = now
            self.underrun_seconds = max(self.underrun_seconds, (now - self.first_audio) - self.received)
            self.received += event.waveform.shape[-1] / self.rate
        elif isinstance(event, self.events.FinishedEvent):
            self.finished, self.frames = now, sum(codes.shape[0] for codes in event.codes)
        elif isinstance(event, self.events.ErrorEvent):
            self.finished, self.error = now, event.message


class TickSplit:
    """Seconds an engine spends in its LM step, codec calls and prefills, timed around the engine object's own
    methods (so any engine version is measured the same way); the rest of the run is host work."""

    # A prefill is SlotDecoder.start in engines before chunked prefill, begin + fill since (those that exist).
    PARTS = {"lm": (("decoder", "frame"),), "codec": (("codec", "decode"),),
             "prefill": (("decoder", "start"), ("decoder", "begin"), ("decoder", "fill"))}

    def __init__(self, engine) -> None:
        self.engine, self.seconds, self.ticks, self.start, self.longest = engine, {}, 0, 0.0, 0.0
        for part, methods in self.PARTS.items():
            for owner, method in methods:
                target = getattr(engine, owner)
                if hasattr(target, method):
                    setattr(target, method, self._timed(part, getattr(target, method)))
        engine.step = self._timed_tick(engine.step)
        self.restart()

    def _timed_tick(self, step):
        """The engine's tick, timed when a stream was already playing at its start (the stall its listener hears)."""
        def run():
            playing = any(getattr(stream, "first_emit_time", None) is not None
                          for stream in list(self.engine._running.values()))
            started = time.perf_counter()
            try:
                return step()
            finally:
                if playing:
                    self.longest = max(self.longest, time.perf_counter() - started)
        return run

    def _timed(self, part, method):
        def run(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - started
        return run

    def restart(self) -> None:
        self.seconds, self.ticks, self.start = dict.fromkeys(self.PARTS, 0.0), self.engine.ticks, time.perf_counter()
        self.longest = 0.0

    def per_tick_ms(self) -> dict:
        """Mean ms per tick of each part since `restart`, host = wall time - the parts; longest = the longest tick that
        began while a stream was playing."""
        ticks = max(1, self.engine.ticks - self.ticks)
        split = dict(self.seconds, host=time.perf_counter() - self.start - sum(self.seconds.values()))
        return dict({part: 1000 * seconds / ticks for part, seconds in split.items()}, longest=1000 * self.longest)


def serve_during(engine, work):
    """`work()` on a helper thread while this thread, the one that built the model, runs the engine
    (SpeechEngine.serve explains why on CPU); returns work's result."""
    outcome = {}

    def drive():
        try:
            outcome["result"] = work()
        finally:
            engine.stop()

    helper = threading.Thread(target=drive, name="bench-arrivals")
    helper.start()
    with torch.inference_mode(False):  # as on a thread of its own (inference mode is per thread)
        engine.serve()
    helper.join()
    return outcome["result"]


def run_engine_load(engine, events, prompt, streams: int, frames: int, stagger: float) -> dict:
    """`streams` requests arriving `stagger` s apart on a started engine (of engine module `events`); waits for all.
    `prompt`: (rows, False), the same prompt rows [T, 17] for every stream, or (voice rows, True), a voice-clone
    prompt per stream in that voice (each its own text)."""
    settings = import_module("generation").GenerationSettings(max_new_frames=frames, **SAMPLED_DEFAULTS)
    clocks = [StreamClock(engine.codec.rate, events) for _ in range(streams)]
    start = time.perf_counter()
    handles = []
    for index, clock in enumerate(clocks):
        time.sleep(max(0.0, start + index * stagger - time.perf_counter()))
        clock.submitted = time.perf_counter()
        request = request_type(events)([stream_prompt(events, prompt, index)], settings, seed=index)
        handles.append(engine.submit(request, listener=clock))
    for handle in handles:
        handle.done.wait()
    return summarise_streams(clocks, start)


def request_type(events):
    """The engine module's request class: EngineRequest, called SpeechRequest before d6201c5 (e.g. in f2918fd, the
    engine issue 26 measures against)."""
    return getattr(events, "EngineRequest", None) or events.SpeechRequest


def bench_voice(device, frames: int) -> torch.Tensor:
    """The shared rows of a voice-clone prompt (spec tts.md §5.4) with `frames` random reference frames: 14 template
    rows, the reference rows, audio_end and 56 template rows (random text ids of the same count)."""
    generator = torch.Generator().manual_seed(5)
    rows = torch.full((14 + frames + 1 + 56, 17), 1024)
    rows[:, 0] = torch.randint(10, 16000, (rows.shape[0],), generator=generator)
    rows[14:14 + frames, 0] = 8  # audio_user_slot
    rows[14:14 + frames, 1:] = torch.randint(0, 1024, (frames, 16), generator=generator)
    rows[14 + frames, 0] = 7  # audio_end
    return rows.to(device)


def stream_prompt(events, prompt, index: int):
    """Stream `index`'s chunk: the fixed prompt, or the voice followed by a text of its own (32 ids + audio_start)."""
    rows, voice = prompt
    if not voice:
        return events.ChunkPrompt(rows)
    text = bench_prompt(rows.device, 33, seed=100 + index)[0]
    chunk = events.ChunkPrompt(torch.cat([rows, text]))
    chunk.shared_rows = rows.shape[0]  # read only by an engine with a prefix store
    return chunk


def summarise_streams(clocks, start: float) -> dict:
    errors = [clock.error for clock in clocks if clock.error]
    done = [clock for clock in clocks if not clock.error]
    ttfa = sorted(1000 * (clock.first_audio - clock.submitted) for clock in done)
    rtf = [(clock.finished - clock.first_audio) / clock.received for clock in done if clock.received]
    end = max(clock.finished for clock in clocks)

    def pct(values, q):
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    return {"streams": len(clocks), "errors": len(errors), "frames": sum(clock.frames for clock in done),
            "aggregate_frames_per_s": sum(clock.frames for clock in done) / (end - start),
            "ttfa_p50_ms": pct(ttfa, 0.5), "ttfa_p95_ms": pct(ttfa, 0.95), "ttfa_p99_ms": pct(ttfa, 0.99),
            "rtf_max": max(rtf, default=float("nan")),
            "underrun_streams": sum(clock.underrun_seconds > 0 for clock in done),
            "worst_underrun_s": max((clock.underrun_seconds for clock in done), default=0.0)}


def engines_under_test(args) -> list:
    """(label, engine module, SpeechEngine options): with --compare-engine PATH, that checkout's engine.py first,
    loaded as a package of its own (its model and codec come from compared_stack); with --voice-frames, this engine
    without a prefix store, then with one; with --prefill-chunk-rows, this engine without a store prefilling in
    chunks (every stream then prefills its whole prompt, so the two storeless rows differ only in how the prompts
    are cut)."""
    this = import_module("engine")
    if args.voice_frames:
        budget = import_module("prefix_store").DEFAULT_BUDGET_BYTES
        engines = [("this, whole", this, {}), ("this, store", this, {"prefix_store_bytes": budget})]
    else:
        engines = [("this", this, {})]
    if args.prefill_chunk_rows:
        engines.insert(1, ("this, chunked", this, {"prefill_chunk_rows": args.prefill_chunk_rows}))
    policy = import_module("engine_schedule").STREAM_POLICIES[args.stream_policy]
    engines = [(label, module, dict(options, policy=policy)) for label, module, options in engines]
    if args.compare_engine:
        import importlib

        import_folder_as_package(args.compare_engine, COMPARED_PACKAGE)
        label = os.path.basename(os.path.normpath(args.compare_engine))
        engines.insert(0, (label, importlib.import_module(f"{COMPARED_PACKAGE}.engine"), {}))
    return engines


# The package name bench.py gives a --compare-engine checkout.
COMPARED_PACKAGE = "moss_tts_nano_compared"


def compared_stack(args, device, weight_format: str) -> tuple:
    """(model, codec) of the --compare-engine checkout with this checkout's weights (build_lm, build_codec), built
    by that checkout's own modules in `weight_format` (its base name: "int8-onnxruntime" is "int8"), so that its
    engine runs the model code it was written against (an older engine calls methods our classes have changed)."""
    import importlib

    def module(name: str):
        return importlib.import_module(f"{COMPARED_PACKAGE}.{name}")

    config = module("configuration_moss_tts_nano").MossTTSNanoConfig.from_json_file(
        os.path.join(REPO_ROOT, "config.json"))
    model = module("modeling_moss_tts_nano").MossTTSNanoForCausalLM(config).float().eval()
    model.load_state_dict(build_lm(args, "cpu").state_dict())
    model = module("weight_formats").apply_weight_format(model.to(device), weight_format.partition("-")[0])
    codec = module("modeling_moss_audio_tokenizer").MossAudioTokenizerModel(
        module("configuration_moss_audio_tokenizer").MossAudioTokenizerConfig()).eval()
    codec.load_state_dict(build_codec("cpu", "fp32", "row-major").state_dict())
    codec = codec.to(device)
    codec.set_compute_dtype(args.codec_dtype)
    if args.codec_layout == "auto":
        module("weight_formats").use_codec_cpu_layout(codec)
    return model, codec


def time_engine(events, model, codec, prompt, streams: int, args, options: dict) -> dict:
    """One engine of module `events` (SpeechEngine `options`) with `streams` slots under the staggered load; its row
    of the table."""
    device = resolve_device(args.device)
    with torch.inference_mode(False):  # the engine updates its buffers outside inference mode
        engine = events.SpeechEngine(model, codec, num_slots=streams, attn_implementation=args.attention,
                                     max_positions=prompt[0].shape[0] + 33 + args.engine_frames,
                                     step_mode=args.step_mode, **options)
    split = TickSplit(engine)

    def load():
        run_engine_load(engine, events, prompt, min(streams, 2), 4, 0.0)  # warm-up
        reset_peak_memory(device)
        split.restart()
        return run_engine_load(engine, events, prompt, streams, args.engine_frames, args.stagger)

    row = serve_during(engine, load)
    peak = devices.peak_memory_bytes(device)
    row.update(peak_memory_mb=None if peak is None else peak / 2**20, tick_ms=split.per_tick_ms())
    return row


def run_engine(args) -> dict:
    """Per weight format and engine, N concurrent streams (staggered), LM + codec; the largest N with no underrun.
    The engines take turns at each N, so that a change in the host's load falls on both."""
    device = resolve_device(args.device)
    codec = build_codec(device, args.codec_dtype, args.codec_layout)
    voice = bool(args.voice_frames)
    prompt = (bench_voice("cpu", args.voice_frames), voice) if voice else (bench_prompt(device)[0].cpu(), voice)
    formats = []
    for fmt in args.weight_format:
        model = build_lm_in_format(args, device, fmt)
        engines = engines_under_test(args)
        stacks = {label: (model, codec) for label, _, _ in engines}
        if args.compare_engine:
            stacks[engines[0][0]] = compared_stack(args, device, fmt)
        rows = {label: [] for label, _, _ in engines}
        for streams in args.streams:
            for label, events, options in engines:
                rows[label].append(time_engine(events, *stacks[label], prompt, streams, args, options))
        for label, _, _ in engines:
            ok = [row for row in rows[label] if row["underrun_streams"] == 0 and row["errors"] == 0]
            formats.append({"weight_format": fmt, "engine": label, "rows": rows[label],
                            "max_realtime_streams": max((row["streams"] for row in ok), default=0),
                            "max_realtime_streams_ttfa_500ms": max(
                                (row["streams"] for row in ok if row["ttfa_p95_ms"] < 500), default=0)})
        del model, stacks
    return {"device": str(device), "frames": args.engine_frames, "stagger_s": args.stagger,
            "step_mode": args.step_mode, "voice_frames": args.voice_frames, "formats": formats}


def print_engine(result: dict) -> None:
    print(f"engine ({result['device']}, {result['frames']} frames per stream = {result['frames'] / FRAME_RATE:.1f} s, "
          f"arrivals {result['stagger_s']} s apart, sampled defaults, steps {result['step_mode']}): LM + codec")
    if result["voice_frames"]:
        print(f"  prompts: one voice of {result['voice_frames']} reference frames, a 33-row text per stream; the "
              "warm-up stored the voice in the engine with a prefix store")
    print(f"  {'format':6s} {'engine':12s} {'N':>3s} {'fr/s':>6s} {'TTFA p50':>8s} {'p95':>6s} {'p99':>6s} "
          f"{'RTF max':>7s} {'underrun':>10s} {'err':>3s}  ms/tick: {'LM':>5s} {'codec':>5s} {'prefill':>7s} "
          f"{'host':>5s} {'longest':>7s} {'peak MB':>7s}")
    for entry in result["formats"]:
        for row in entry["rows"]:
            peak = f"{row['peak_memory_mb']:7.0f}" if row["peak_memory_mb"] is not None else "    n/a"
            tick = row["tick_ms"]
            print(f"  {entry['weight_format']:6s} {entry['engine'][:12]:12s} {row['streams']:3d} "
                  f"{row['aggregate_frames_per_s']:6.1f} {row['ttfa_p50_ms']:6.0f}ms {row['ttfa_p95_ms']:4.0f}ms "
                  f"{row['ttfa_p99_ms']:4.0f}ms {row['rtf_max']:7.3f} {row['underrun_streams']:3d} "
                  f"{row['worst_underrun_s']:5.2f}s {row['errors']:3d}  {'':9s}{tick['lm']:5.1f} {tick['codec']:5.1f} "
                  f"{tick['prefill']:7.1f} {tick['host']:5.1f} {tick['longest']:7.0f} {peak}")
        print(f"  {entry['weight_format']} {entry['engine']}: largest N with every stream ahead of playback: "
              f"{entry['max_realtime_streams']} (and TTFA p95 < 500 ms: {entry['max_realtime_streams_ttfa_500ms']})")


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64],
                       help="concurrent streams to time (one engine with that many slots each)")
    group.add_argument("--engine-frames", type=int, default=100, help="frames per stream (default 100 = 8 s)")
    group.add_argument("--stagger", type=float, default=0.1, help="seconds between arrivals (default 0.1)")
    group.add_argument("--step-mode", default="eager", choices=["eager", "compile", "graph"],
                       help="how the decode steps run (generation.StepRunner)")
    group.add_argument("--voice-frames", type=int, default=0,
                       help="voice-clone prompts in one voice of this many reference frames (125 = 10 s), each "
                            "stream its own text; this engine runs without, then with a prefix store (0: an 81-row "
                            "continuation prompt for every stream)")
    policies = list(import_module("engine_schedule").STREAM_POLICIES)
    group.add_argument("--stream-policy", default="deadline", choices=policies,
                       help="this engine's policy (the server's --stream-policy); upstream admits a stream whenever "
                            "a slot is free, so prompts join beside playing streams even where capacity is short")
    group.add_argument("--prefill-chunk-rows", type=int, default=0,
                       help="also run this engine without a prefix store prefilling in chunks of this many rows, one "
                            "per tick while streams play (the server's --prefill-chunk-rows); the longest-tick "
                            "column shows the stall a joining prompt causes (0: not run)")
    group.add_argument("--compare-engine", metavar="PATH", default=None,
                       help="a checkout of another commit (git worktree add PATH COMMIT): its engine.py runs the same "
                            "load first, on this checkout's model and codec objects, for before/after tables")


def add_lm_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("lm and e2e")
    group.add_argument("--model-path", default=None, help="folder of real weights (default: random weights)")
    group.add_argument("--weight-format", nargs="+", default=["fp32", "bf16", "int8"],
                       help="weight formats to time (weight_formats.py): fp32 bf16 fp16 int8, or plain (float32 with "
                            "torch's own Linear kernels, as loaded without a format); int8-torch / int8-onnxruntime "
                            "force where int8's audio phase runs (onnx_audio_phase.py; int8 lets the probe choose)")
    group.add_argument("--attention", default="sdpa", help="attention backend of both decoders (default sdpa)")
    group.add_argument("--fast-decode", nargs="+", default=[], choices=["compile", "graph"],
                       help="also time model.enable_fast_decode(MODE) rows (compile time lands in the warm-up)")
    group.add_argument("--frames", type=int, default=120, help="forced frames per timed run (default 120 = 9.6 s)")
    group.add_argument("--greedy", action="store_true",
                       help="greedy decoding (default: sampling with the CLI's defaults, what users run)")
    group.add_argument("--compare-upstream", metavar="PATH", default=None,
                       help="a folder holding upstream's remote-code files (modeling_moss_tts_nano.py, gpt2_decoder.py, "
                            "...): time upstream's generate in this process on the same weights, so every 'x upstr' "
                            "ratio is measured (lm section)")
    group.add_argument("--compare-eager", action="store_true",
                       help="also run fp32 with eager attention first, as the reference row of the x ref column")
    group.add_argument("--reference-frames", type=int, default=None,
                       help="frames of the reference run (default: --frames)")
    group.add_argument("--e2e-codec-frames", type=int, default=4, help="frames per codec call after the first")
    group.add_argument("--profile", action="store_true", help="lm: split each row's frame into global step, local "
                       "steps, heads, sampling and host work (torch.profiler, --profile-frames frames)")
    group.add_argument("--profile-frames", type=int, default=20, help="frames profiled per row (default 20)")


SECTIONS = {"codec": (run_codec, print_codec), "lm": (run_lm, print_lm), "e2e": (run_e2e, print_e2e),
            "engine": (run_engine, print_engine)}
ADD_OPTIONS = [add_codec_options, add_lm_options, add_engine_options]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=sorted(SECTIONS), nargs="+", default=["codec", "e2e", "lm"],
                        help="sections to run (default codec e2e lm; engine is long: ask for it)")
    parser.add_argument("--device", default="cpu", help="passed to devices.resolve_device (cpu, auto, ...)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch intra-op threads (default 2; on a busy 2-core host, 1 avoids OpenMP stalls)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs; medians are reported")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    for add in ADD_OPTIONS:
        add(parser)
    return parser.parse_args(argv)


def codec_layout_note(args, weight_formats) -> str:
    """How the codec decoder's Linear weights are laid out in this run (bench.build_codec)."""
    if args.codec_layout != "auto":
        return "row-major (--codec-layout)"
    dtype = devices.DTYPES_BY_NAME[args.codec_dtype]
    return " ".join(weight_formats.codec_layout_for(resolve_device(args.device), dtype))


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {"threads": args.threads, "load_average_before": load_average(), "torch": torch.__version__,
              "device": args.device, "attention": args.attention, "weight_formats": args.weight_format,
              "codec_dtype": args.codec_dtype}
    weight_formats = import_module("weight_formats")
    report["cpu"] = import_module("host").cpu_description()
    report["kernels"] = {"fp32": " ".join(weight_formats.fp32_linear_kernel()),
                         "bf16": "onednn-packed" if weight_formats.onednn_packing_available() else "bf16-weights",
                         "int8": f"weights in +-{weight_formats.int8_weight_max()}",
                         "codec": codec_layout_note(args, weight_formats)}
    if not args.json:
        print(f"bench: CPU {report['cpu']}; device {args.device}, threads {args.threads}, torch {torch.__version__}")
        print(f"  kernels: fp32 {report['kernels']['fp32']}; bf16 {report['kernels']['bf16']}; int8 "
              f"{report['kernels']['int8']}; codec {report['kernels']['codec']}")
        print(f"  attention {args.attention}, weight formats {' '.join(args.weight_format)} (LM dtype per format), "
              f"codec {args.codec_dtype}; load average {report['load_average_before']}")
    with torch.inference_mode():
        for name in args.section:
            run, show = SECTIONS[name]
            report[name] = run(args)
            if not args.json:
                show(report[name])
    report["load_average_after"] = load_average()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"threads {args.threads}; load average before {report['load_average_before']}, "
              f"after {report['load_average_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
