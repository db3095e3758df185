"""devices.py on CPU: resolution, dtypes, attention choice, memory, sync, seeding, timing and environment.

CUDA is simulated by handing devices.py a fake `torch.cuda` through its `_load_cuda_module` seam (monkeypatched
inside each test only). NPU paths need the PrivateUse1 rename, which is process-global: they live in
test_npu_fake.py and run in subprocesses.
"""

import logging

import pytest
import torch

from attention_reference import eager_attention, padded_causal_mask, random_qkv
from child_process import run_child
from conftest import import_module
from fake_cuda import FakeCuda

devices = import_module("devices")


@pytest.fixture
def no_accelerators(monkeypatch):
    """A machine with neither torch_npu nor a GPU, whatever this machine has."""
    monkeypatch.setattr(devices, "_load_torch_npu", lambda: None)
    monkeypatch.setattr(devices, "_load_cuda_module", lambda: FakeCuda(available=False))


@pytest.fixture
def fake_cuda(monkeypatch):
    """A GPU machine without torch_npu; returns the fake torch.cuda."""
    cuda = FakeCuda(count=2)
    monkeypatch.setattr(devices, "_load_torch_npu", lambda: None)
    monkeypatch.setattr(devices, "_load_cuda_module", lambda: cuda)
    return cuda


def test_every_model_file_imports_on_a_cpu_machine_without_torch_npu_or_flash_attn():
    run_child("""
        import sys
        from local_package import REPO_ROOT, import_module
        for path in sorted(REPO_ROOT.glob("*.py")):
            # serve_ray needs the optional Ray extra (test_serve_ray.py imports it where that is installed)
            if path.stem not in ("local_package", "__init__", "serve_ray"):
                import_module(path.stem)
        assert "torch_npu" not in sys.modules and "flash_attn" not in sys.modules
    """)


# --- resolve_device -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cpu", " CPU ", "cpu:0", torch.device("cpu"), torch.device("cpu", 0)])
def test_cpu_names_resolve_to_cpu(name, no_accelerators):
    assert devices.resolve_device(name) == torch.device("cpu")


@pytest.mark.parametrize("name", ["auto", "AUTO", None])
def test_auto_is_cpu_without_torch_npu_or_gpu(name, no_accelerators):
    assert devices.resolve_device(name) == torch.device("cpu")


@pytest.mark.parametrize("name", ["auto", None])
def test_auto_picks_cuda_when_a_gpu_is_present(name, fake_cuda):
    assert devices.resolve_device(name) == torch.device("cuda", 0)


@pytest.mark.parametrize("name, expected", [("cuda", "cuda:0"), ("cuda:1", "cuda:1"), ("CUDA:0", "cuda:0"),
                                            (torch.device("cuda", 1), "cuda:1"), (torch.device("cuda"), "cuda:0")])
def test_cuda_names_resolve_with_an_index(name, expected, fake_cuda):
    assert devices.resolve_device(name) == torch.device(expected)


def test_bare_cuda_uses_the_current_device(fake_cuda):
    fake_cuda.current = 1
    assert devices.resolve_device("cuda") == torch.device("cuda", 1)


@pytest.mark.parametrize("name", ["gpu", "npu0", "cuda:-1", "cuda:x", "tpu", "", "npu:1:2", "mps", "cpu1"])
def test_unknown_device_strings_raise_value_error_naming_them(name, no_accelerators):
    with pytest.raises(ValueError, match="unknown device") as error:
        devices.resolve_device(name)
    assert repr(name) in str(error.value) and "'npu:N'" in str(error.value)


@pytest.mark.parametrize("name", [3, 1.5, ["cpu"], torch.device("meta")])
def test_other_device_values_raise_value_error(name, no_accelerators):
    with pytest.raises(ValueError, match="device"):
        devices.resolve_device(name)


@pytest.mark.parametrize("name", ["cuda", "cuda:0", torch.device("cuda", 0)])
def test_cuda_requested_without_a_gpu_raises_value_error(name, no_accelerators):
    with pytest.raises(ValueError, match="no cuda device is visible") as error:
        devices.resolve_device(name)
    assert "cpu" in str(error.value)  # what is available instead


def test_cuda_index_beyond_the_visible_gpus_raises(fake_cuda):
    with pytest.raises(ValueError, match=r"2 cuda device\(s\) visible, expected an index in 0..1"):
        devices.resolve_device("cuda:2")


@pytest.mark.parametrize("name", ["npu", "npu:0", "NPU:1"])
def test_npu_requested_without_torch_npu_raises_value_error(name, no_accelerators):
    with pytest.raises(ValueError, match="needs torch_npu, which is not installed") as error:
        devices.resolve_device(name)
    assert repr(name) in str(error.value)


def test_resolving_a_spec_returns_its_device(no_accelerators):
    spec = devices.device_spec("cpu")
    assert devices.resolve_device(spec) == torch.device("cpu")
    assert devices.device_spec(spec) is spec


def test_available_device_types_follow_the_auto_order(fake_cuda):
    assert devices.available_device_types() == ["cuda", "cpu"]


# --- resolve_dtype --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, expected", [
    (None, torch.float32), ("auto", torch.float32), ("float32", torch.float32), ("fp32", torch.float32),
    ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("torch.float16", torch.float16), ("half", torch.float16),
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)])
def test_cpu_defaults_to_fp32_and_allows_half_precision_explicitly(dtype, expected):
    assert devices.resolve_dtype("cpu", dtype) == expected


@pytest.mark.parametrize("dtype", ["fp8", "int8", "float64x", 16])
def test_unknown_dtype_names_raise_value_error(dtype):
    with pytest.raises(ValueError, match="unknown dtype"):
        devices.resolve_dtype("cpu", dtype)


def test_unsupported_torch_dtype_raises_value_error_listing_the_supported_ones():
    with pytest.raises(ValueError, match=r"not supported on cpu; expected one of \['float32', 'bfloat16', 'float16'\]"):
        devices.resolve_dtype("cpu", torch.float64)


def test_cuda_defaults_to_bf16_where_native(fake_cuda):
    assert devices.resolve_dtype("cuda", None) == torch.bfloat16
    assert devices.resolve_dtype("cuda", "fp16") == torch.float16
    assert devices.resolve_dtype("cuda", "fp32") == torch.float32


def test_cuda_without_bf16_defaults_to_fp16_and_rejects_bf16(fake_cuda):
    fake_cuda.bf16 = False
    assert devices.resolve_dtype("cuda", "auto") == torch.float16
    with pytest.raises(ValueError, match="compute capability 8.0"):
        devices.resolve_dtype("cuda", "bf16")


# --- resolve_attention ----------------------------------------------------------------------------------------------
def _flash_reference(q, k, v, softmax_scale=None, causal=False):
    """CPU stand-in for flash_attn.flash_attn_func: [B, T, H, D] in and out, causal aligned bottom-right."""
    assert causal, "devices.flash_attention only calls flash_attn_func for causal attention"
    q_len, k_len = q.shape[1], k.shape[1]
    mask = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    return eager_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, softmax_scale).transpose(1, 2)


@pytest.fixture
def flash_installed(monkeypatch):
    calls = []

    def flash(*args, **kwargs):
        calls.append(kwargs)
        return _flash_reference(*args, **kwargs)

    monkeypatch.setattr(devices, "_flash_attn_func", lambda: flash)
    return calls


@pytest.fixture
def flash_missing(monkeypatch):
    monkeypatch.setattr(devices, "_flash_attn_func", lambda: None)


# (requested, dtype, expected) on CPU: everything but eager/sdpa falls back to sdpa.
CPU_CASES = [(req, dtype, "eager" if req == "eager" else "sdpa")
             for req in [None, "auto", "eager", "sdpa", "flash_attention_2", "npu_fusion_attention"]
             for dtype in [None, torch.float32, torch.bfloat16, torch.float16]]


@pytest.mark.parametrize("requested, dtype, expected", CPU_CASES)
def test_cpu_attention_is_sdpa_unless_eager_is_asked(requested, dtype, expected, flash_installed):
    assert devices.resolve_attention(requested, "cpu", dtype) == expected


CUDA_CASES = [  # (requested, dtype, flash_attn importable, expected)
    (None, None, True, "flash_attention_2"), ("auto", torch.float16, True, "flash_attention_2"),
    ("auto", torch.float32, True, "sdpa"), ("auto", torch.bfloat16, False, "sdpa"),
    ("flash_attention_2", torch.bfloat16, True, "flash_attention_2"),
    ("flash_attention_2", torch.float16, False, "sdpa"), ("flash_attention_2", torch.float32, True, "sdpa"),
    ("sdpa", torch.float16, True, "sdpa"), ("eager", torch.bfloat16, True, "eager"),
    ("npu_fusion_attention", torch.float16, True, "flash_attention_2"),
    ("npu_fusion_attention", torch.float32, False, "sdpa"),
]


@pytest.mark.parametrize("requested, dtype, has_flash, expected", CUDA_CASES)
def test_cuda_attention_uses_flash_attn_only_when_importable_and_half(requested, dtype, has_flash, expected,
                                                                        fake_cuda, monkeypatch):
    monkeypatch.setattr(devices, "_flash_attn_func", lambda: _flash_reference if has_flash else None)
    assert devices.resolve_attention(requested, "cuda", dtype) == expected


def test_released_flash_attention_2_on_cpu_logs_one_line_and_does_not_raise(caplog):
    with caplog.at_level(logging.INFO, logger=devices.__name__):
        assert devices.resolve_attention("flash_attention_2", "cpu", None) == "sdpa"
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and "flash_attention_2" in lines[0] and "sdpa" in lines[0]


def test_runnable_backends_resolve_silently(caplog, flash_installed):
    with caplog.at_level(logging.INFO, logger=devices.__name__):
        devices.resolve_attention("sdpa", "cpu", None)
        devices.resolve_attention("eager", "cpu", "bf16")
    assert caplog.records == []


@pytest.mark.parametrize("requested", ["flash", "flash_attention_3", "flex_attention", "SDPA-fast", "", 2])
def test_unknown_attention_names_raise_value_error(requested):
    with pytest.raises(ValueError, match="unknown attention implementation") as error:
        devices.resolve_attention(requested, "cpu", None)
    assert "npu_fusion_attention" in str(error.value)


def test_attention_names_ignore_case_and_spaces():
    assert devices.resolve_attention(" Eager ", "cpu", None) == "eager"


def test_attention_backends_match_the_decoder_table():
    decoder = import_module("gpt2_decoder")
    assert set(decoder.ATTENTION_FUNCTIONS) == set(devices.ATTENTION_BACKENDS)


# --- flash_attention kernel (flash_attn simulated on CPU) -----------------------------------------------------------
def _check_flash(batch, q_len, k_len, valid, dtype, flash_calls_expected, flash_installed):
    query, key, value = random_qkv(batch, 2, q_len, k_len, dtype=dtype)
    mask = padded_causal_mask(valid, q_len)
    out = devices.flash_attention(None, query, key, value, mask, 0.25)
    expected = eager_attention(query.float(), key.float(), value.float(), mask, 0.25)
    assert out.shape == query.shape
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    assert len(flash_installed) == flash_calls_expected


def test_flash_attention_uses_flash_attn_for_an_unpadded_causal_prefill(flash_installed):
    _check_flash(2, 6, 6, torch.ones(2, 6, dtype=torch.bool), torch.bfloat16, 1, flash_installed)
    assert flash_installed[0] == {"softmax_scale": 0.25, "causal": True}


def test_flash_attention_left_padding_falls_back_to_sdpa_and_matches_eager(flash_installed):
    valid = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    _check_flash(2, 6, 6, valid, torch.bfloat16, 0, flash_installed)


def test_flash_attention_decode_step_over_a_cache_matches_eager(flash_installed):
    valid = torch.tensor([[True] * 7, [False, True, True, True, True, True, True]])
    _check_flash(2, 1, 7, valid, torch.float16, 0, flash_installed)
    _check_flash(2, 3, 7, valid, torch.float16, 0, flash_installed)


def test_flash_attention_in_fp32_runs_sdpa(flash_installed):
    _check_flash(1, 5, 5, torch.ones(1, 5, dtype=torch.bool), torch.float32, 0, flash_installed)


def test_flash_attention_without_flash_attn_runs_sdpa(flash_missing):
    query, key, value = random_qkv(1, 2, 4, 4)
    mask = padded_causal_mask(torch.ones(1, 4, dtype=torch.bool), 4)
    torch.testing.assert_close(devices.flash_attention(None, query, key, value, mask, 0.5),
                               eager_attention(query, key, value, mask, 0.5), atol=1e-5, rtol=1e-5)


# --- Memory and batch sizing ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunks, gb, free, expected", [
    (64, 1.0, 30 << 30, 27), (4, 1.0, 30 << 30, 4), (64, 2.0, 30 << 30, 13), (64, 1.0, 1 << 29, 1),
    (1, 1.0, 30 << 30, 1), (0, 1.0, 30 << 30, 1), (64, 0.0, 30 << 30, 1), (64, -1.0, 30 << 30, 1)])
def test_chunk_batch_size_from_cuda_free_memory(chunks, gb, free, expected, fake_cuda):
    fake_cuda.free = free
    assert devices.chunk_batch_size("cuda:0", chunks, gb) == expected


def test_chunk_batch_size_is_one_when_the_free_memory_query_fails(fake_cuda, monkeypatch):
    def broken(device=None):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(fake_cuda, "mem_get_info", broken)
    assert devices.free_memory_bytes("cuda:0") is None
    assert devices.chunk_batch_size("cuda:0", 8, 1.0) == 1


def test_cpu_reports_available_host_memory_but_batches_one_chunk_like_upstream():
    free = devices.free_memory_bytes("cpu")
    assert isinstance(free, int) and free > 0
    assert devices.chunk_batch_size("cpu", 64, 1e-6) == 1


def test_cpu_peak_memory_is_the_process_peak_rss():
    devices.reset_peak_memory("cpu")
    before = devices.peak_memory_bytes("cpu")
    block = torch.ones(16 << 20, dtype=torch.uint8)  # 16 MiB, touched
    after = devices.peak_memory_bytes("cpu")
    assert block.sum() > 0 and isinstance(before, int) and after >= before > 0


def test_cuda_peak_memory_uses_the_allocator(fake_cuda):
    devices.reset_peak_memory("cuda:0")
    assert fake_cuda.resets == 1 and devices.peak_memory_bytes("cuda:0") == 123


# --- Sync and seeds -------------------------------------------------------------------------------------------------
def test_synchronize_is_a_no_op_on_cpu_and_calls_the_device_module_on_cuda(fake_cuda):
    devices.synchronize("cpu")
    devices.synchronize("cuda:1")
    assert fake_cuda.synced == [torch.device("cuda", 1)]


def test_same_seed_same_samples_on_cpu():
    draws = []
    for _ in range(2):
        devices.manual_seed("cpu", 1234)
        draws.append(torch.multinomial(torch.ones(100), 5))
    assert torch.equal(draws[0], draws[1])


def test_manual_seed_also_seeds_the_device_generators(fake_cuda):
    devices.manual_seed("cuda:0", 7)
    assert fake_cuda.seeded == [7]


@pytest.mark.parametrize("seed", ["7", 1.5, None, True])
def test_manual_seed_rejects_non_integers(seed):
    with pytest.raises(ValueError, match="seed must be an int"):
        devices.manual_seed("cpu", seed)


# --- Environment ----------------------------------------------------------------------------------------------------
def test_recommended_env_is_applied_where_unset():
    env = {}
    assert devices.apply_recommended_env(env) == {"TASK_QUEUE_ENABLE": "2",
                                                 "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True"}
    assert env == devices.RECOMMENDED_NPU_ENV


def test_recommended_env_keeps_the_users_values():
    env = {"TASK_QUEUE_ENABLE": "0", "PYTORCH_NPU_ALLOC_CONF": "max_split_size_mb:128"}
    assert devices.apply_recommended_env(env) == {}
    assert env == {"TASK_QUEUE_ENABLE": "0", "PYTORCH_NPU_ALLOC_CONF": "max_split_size_mb:128"}


def test_recommended_env_never_sets_both_allocator_variables():
    env = {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}
    assert devices.apply_recommended_env(env) == {"TASK_QUEUE_ENABLE": "2"}
    assert "PYTORCH_NPU_ALLOC_CONF" not in env


def test_no_op_settings_are_not_recommended():
    for key, value in devices.NO_OP_NPU_ENV.items():
        assert devices.RECOMMENDED_NPU_ENV.get(key) != value


# --- Ray Serve placement ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device, expected", [
    ("npu", {"num_cpus": 2, "resources": {"NPU": 1}}), ("NPU ", {"num_cpus": 2, "resources": {"NPU": 1}}),
    ("cuda", {"num_cpus": 2, "num_gpus": 1}), ("cpu", {"num_cpus": 2})])
def test_a_ray_replica_asks_for_one_card_of_its_device_type(device, expected):
    assert devices.ray_actor_options(device, num_cpus=2) == expected


@pytest.mark.parametrize("device", ["auto", "npu:1", "cuda:0", "tpu", ""])
def test_a_ray_replica_device_needs_a_type_and_no_index(device):
    with pytest.raises(ValueError, match="for a Ray Serve replica; expected 'npu', 'cuda' or 'cpu' without an index"):
        devices.ray_actor_options(device, num_cpus=1)


def test_a_ray_replica_needs_some_cpu():
    with pytest.raises(ValueError, match="num_cpus=0"):
        devices.ray_actor_options("cpu", num_cpus=0)
