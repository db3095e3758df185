"""The tiny model generating on a simulated Ascend npu:0 (the team's level-2 fake, ../shared/tools/fake_npu.py).

Tensors really sit on npu:0 there, every op runs on CPU, each SDPA call is classified "fused"/"math" with torch_npu's
rule, bf16 multinomial is rejected as on a real NPU, and host syncs are counted. Each test runs in its own process
(the fake renames torch's PrivateUse1 backend for good). Because kernels and RNG are CPU's, the npu:0 run must equal
the CPU run bit for bit, greedy and seeded-sampled alike. These tests prove plumbing, dtype rules and sync counts,
not NPU numerics or speed (that is verify_npu.py on a 910B). They skip when ../shared or torch >= 2.10 is absent.
"""

import json

import pytest
import torch

from child_process import run_child

# Frames per generate call: enough for prefill + steady decode steps, small because the fake runs at python speed.
FRAMES = 4
SYNCS_PER_FRAME_BUDGET = 2


@pytest.fixture
def fake_npu_level2(fake_npu_path, golden_tts_dir):
    if tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 10):
        pytest.skip(f"the level-2 fake needs torch >= 2.10 (python PrivateUse1 backend), this is {torch.__version__}")
    return str(fake_npu_path.parent), str(golden_tts_dir)


_SETUP = """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import fake_npu
    state = fake_npu.install(level=2)  # before transformers and the model are imported
    import torch
    from safetensors.torch import load_file
    from local_package import import_module
    checkpoints = import_module("measurement.checkpoints")
    golden = sys.argv[2]
    expected = load_file(golden + "/expected.safetensors")
    FRAMES = int(sys.argv[3])

    def case(name):
        return expected[name + ".input_ids"], expected[name + ".attention_mask"]

    def generate_on(model, device, ids, mask, seed=None, **kwargs):
        if seed is not None:
            torch.manual_seed(seed)
        return model.generate(ids.to(device), mask.to(device), max_new_frames=FRAMES, **kwargs).audio_token_ids

    def counted_generate(model, ids, mask, **kwargs):
        # Syncs per streamed frame event (the first includes the prefill, the last the stop decision / final).
        state.reset_counters()
        per_event, before = [], 0
        for event in model.generate_stream(ids.to("npu"), mask.to("npu"), max_new_frames=FRAMES, **kwargs):
            per_event.append(state.syncs - before)
            before = state.syncs
        return event["generation"].audio_token_ids, per_event, list(state.sdpa_paths)
"""


def test_tiny_model_on_fake_npu_equals_cpu_in_fp32_with_fused_attention_and_few_syncs(fake_npu_level2):
    out = run_child(_SETUP + """
    model = checkpoints.load_safetensors_model(golden)  # fp32, sdpa
    ids, mask = case("greedy_voice_clone")
    cpu = generate_on(model, "cpu", ids, mask, do_sample=False)
    assert torch.equal(cpu, expected["greedy_voice_clone.audio_token_ids"][:, :FRAMES])  # sanity: CPU is golden
    model.to("npu")
    npu, per_event, paths = counted_generate(model, ids, mask, do_sample=False)
    assert npu.device.type == "npu" and torch.equal(npu.cpu(), cpu)
    assert paths and set(paths) == {"fused"}, sorted(set(paths))  # bool mask, BNSD, head_dim 16: the fused kernel
    frames = npu.shape[1]
    assert sum(per_event) / frames <= %(budget)d and max(per_event) <= %(budget)d, per_event

    # Left-padded batch: row 1 has 16 pad rows.
    ids, mask = case("batch_left_pad")
    npu = generate_on(model, "npu", ids, mask, do_sample=False)
    assert torch.equal(npu.cpu(), expected["batch_left_pad.audio_token_ids"][:, :FRAMES])

    # Seeded sampling: the fake's RNG is CPU's, so the same seed gives the same draws (not true on a real NPU).
    sampling = dict(do_sample=True, audio_temperature=0.8, audio_top_p=0.95, audio_top_k=25,
                    audio_repetition_penalty=1.2, text_temperature=1.0)
    ids, mask = case("sampled_seeded")
    npu = generate_on(model, "npu", ids, mask, seed=2024, **sampling)
    cpu = generate_on(model.to("cpu"), "cpu", ids, mask, seed=2024, **sampling)
    assert torch.equal(npu.cpu(), cpu)
    assert torch.equal(cpu, expected["sampled_seeded.audio_token_ids"][:, :FRAMES])
    print(json.dumps({"syncs_per_event": per_event, "frames": frames, "sdpa_calls": len(paths)}))
    """ % {"budget": SYNCS_PER_FRAME_BUDGET}, *fake_npu_level2, str(FRAMES))
    report = json.loads(out.strip().splitlines()[-1])
    assert sum(report["syncs_per_event"]) <= SYNCS_PER_FRAME_BUDGET * report["frames"]


def test_tiny_model_on_fake_npu_runs_in_fp16_and_bf16_and_with_npu_fusion_attention(fake_npu_level2):
    run_child(_SETUP + """
    devices = import_module("devices")
    ids, mask = case("greedy_voice_clone")
    try:  # the fake enforces the NPU limit that bf16 sampling must avoid
        torch.multinomial(torch.ones(1, 4, device="npu", dtype=torch.bfloat16), 1)
    except RuntimeError:
        pass
    else:
        raise AssertionError("the fake accepted bf16 multinomial; this test would prove nothing")

    for dtype, sample in [(torch.float16, False), (torch.bfloat16, True)]:
        assert devices.resolve_dtype("npu", dtype) == dtype
        model = checkpoints.load_safetensors_model(golden, dtype).to("npu")
        state.reset_counters()
        codes = generate_on(model, "npu", ids, mask, seed=5, do_sample=sample, audio_temperature=0.8)
        assert codes.device.type == "npu" and codes.shape[0] == 1 and 1 <= codes.shape[1] <= FRAMES, codes.shape
        assert set(state.sdpa_paths) == {"fused"}, (dtype, sorted(set(state.sdpa_paths)))

    # The optional torch_npu.npu_fusion_attention backend (fake's CPU reference) gives the golden greedy frames.
    model = checkpoints.load_safetensors_model(golden).to("npu")
    codes = generate_on(model, "npu", ids, mask, do_sample=False, attn_implementation="npu_fusion_attention")
    assert torch.equal(codes.cpu(), expected["greedy_voice_clone.audio_token_ids"][:, :FRAMES])
    """, *fake_npu_level2, str(FRAMES))


def test_engine_on_fake_npu_serves_two_private_streams_like_the_cpu_with_one_sync_per_frame(fake_npu_level2):
    """The engine on npu:0: private generators (the fake has no NPU generators, so they fall back to the CPU and
    the numbers are moved), two seeded streams joining one frame apart equal the CPU engine's, syncs bounded."""
    run_child(_SETUP + """
    engine_module = import_module("engine")
    generation = import_module("generation")
    ids, _ = case("greedy_voice_clone")
    settings = generation.GenerationSettings(max_new_frames=FRAMES, do_sample=True, audio_temperature=0.8,
                                             audio_repetition_penalty=1.2, text_temperature=1.0)

    def run(model):
        engine = engine_module.SpeechEngine(model, None, num_slots=2, max_positions=ids.shape[1] + FRAMES)
        first = engine.submit(engine_module.EngineRequest([engine_module.ChunkPrompt(ids[0])], settings, seed=3))
        engine.step()
        second = engine.submit(engine_module.EngineRequest([engine_module.ChunkPrompt(ids[0, 5:])], settings,
                                                           seed=4))
        state.reset_counters()
        ticks = 1
        while engine.step():
            ticks += 1
        finals = [list(handle.events(timeout=1))[-1] for handle in (first, second)]
        return [final.codes[0] for final in finals], state.syncs, ticks

    model = checkpoints.load_safetensors_model(golden)
    cpu, _, _ = run(model)
    npu, syncs, ticks = run(model.to("npu"))
    for a, b in zip(cpu, npu):
        assert torch.equal(a, b.cpu()), (a, b)
    # per tick: the frame's stop check; per finished chunk: its codes to the host (and a limit check)
    assert syncs <= ticks + 2 * 3, (syncs, ticks)

    # A voice prefix stored on the device and copied into the slot: the second request of the voice gives the CPU's
    # codes too, and the store costs one sync (the finiteness check of the first request's prefix).
    def voice_twice(model):
        engine = engine_module.SpeechEngine(model, None, num_slots=1, max_positions=ids.shape[1] + FRAMES,
                                            prefix_store_bytes=2**26)
        chunk = engine_module.ChunkPrompt(ids[0], shared_rows=ids.shape[1] - 4)
        codes = []
        for seed in (5, 6):
            handle = engine.submit(engine_module.EngineRequest([chunk], settings, seed=seed))
            state.reset_counters()
            ticks = 0
            while engine.step():
                ticks += 1
            codes.append(list(handle.events(timeout=1))[-1].codes[0])
        assert (engine.prefixes.misses, engine.prefixes.hits) == (1, 1)
        return codes, state.syncs, ticks

    cpu, _, _ = voice_twice(checkpoints.load_safetensors_model(golden))
    npu, syncs, ticks = voice_twice(checkpoints.load_safetensors_model(golden).to("npu"))
    for a, b in zip(cpu, npu):
        assert torch.equal(a, b.cpu()), (a, b)
    assert syncs <= ticks + 3, (syncs, ticks)  # the hit: no sync of its own
    """, *fake_npu_level2, str(FRAMES))
