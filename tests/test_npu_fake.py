"""devices.py on a simulated Ascend NPU (the project's level-1 fake, tests/fake_torch_npu.py).

Each test runs in its own Python process: installing the fake renames torch's PrivateUse1 backend to "npu" for the
whole process, for good. These tests need nothing outside the repository, so they also run on a user's fresh clone.
They prove routing and plumbing (which device, dtype, backend, memory query, hook is used), not NPU numerics.
"""

import json

from child_process import run_child

_ENV_KEYS = {"TASK_QUEUE_ENABLE": None, "PYTORCH_NPU_ALLOC_CONF": None, "PYTORCH_ALLOC_CONF": None}


def test_npu_names_resolve_on_a_machine_with_npus_and_auto_prefers_the_npu():
    run_child("""
        import torch, types, fake_torch_npu
        state = fake_torch_npu.install(device_count=2)
        from local_package import import_module
        devices = import_module("devices")
        npu0, npu1 = torch.device("npu", 0), torch.device("npu", 1)
        for name, expected in [("auto", npu0), (None, npu0), ("npu", npu0), ("NPU:1", npu1), ("npu:0", npu0),
                               (torch.device("npu", 1), npu1), ("cpu", torch.device("cpu"))]:
            assert devices.resolve_device(name) == expected, (name, devices.resolve_device(name))
        state.current_device = 1
        assert devices.resolve_device("npu") == npu1  # a bare name means the current device
        for name in ["npu:2", torch.device("npu", 5)]:
            try:
                devices.resolve_device(name)
            except ValueError as error:
                assert "2 npu device(s) visible, expected an index in 0..1" in str(error), error
            else:
                raise AssertionError(f"{name} resolved")
        assert devices.available_device_types() == ["npu", "cpu"]
        # transfer_to_npu makes torch.cuda report the NPU, so "auto" asks for the NPU first (npu.md §1.5).
        gpu = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 1, current_device=lambda: 0)
        devices._load_cuda_module = lambda: gpu
        assert devices.resolve_device("auto") == npu1
        assert devices.available_device_types() == ["npu", "cuda", "cpu"]
    """)


def test_installed_torch_npu_without_a_visible_npu():
    run_child("""
        import torch, fake_torch_npu
        fake_torch_npu.install(available=False)
        from local_package import import_module
        devices = import_module("devices")
        assert devices.resolve_device("auto") == torch.device("cpu")
        for name in ["npu", "npu:0"]:
            try:
                devices.resolve_device(name)
            except ValueError as error:
                assert repr(name) in str(error) and "no npu device is visible" in str(error), error
                assert "ASCEND_RT_VISIBLE_DEVICES" in str(error)
            else:
                raise AssertionError(f"{name} resolved without an NPU")
    """)


def test_torch_npu_that_cannot_load_names_cann_set_env_and_auto_falls_back():
    run_child("""
        import importlib.util, logging, pathlib, sys, torch, fake_torch_npu
        fake_torch_npu.install_broken()
        assert importlib.util.find_spec("torch_npu") is not None  # "installed"
        from local_package import import_module
        # transformers itself imports torch_npu unguarded when find_spec finds it (npu.md §2.3), so only
        # devices.py can be checked here: importing it must not import torch_npu.
        devices = import_module("devices")
        assert "torch_npu" not in sys.modules
        try:
            devices.resolve_device("npu")
        except RuntimeError as error:
            message = str(error)
        else:
            raise AssertionError("npu resolved with a broken torch_npu")
        assert "set_env.sh" in message and "libascendcl.so" in message, message
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger(devices.__name__).addHandler(handler)
        assert devices.resolve_device("auto") == torch.device("cpu")
        assert any("set_env.sh" in record.getMessage() for record in records)
    """)


def test_torch_npu_is_imported_lazily_after_the_recommended_env():
    out = run_child("""
        import json, os, sys, torch, fake_torch_npu
        state = fake_torch_npu.install_on_import()
        from local_package import import_module
        devices = import_module("devices")
        devices.resolve_device("cpu")
        assert "torch_npu" not in sys.modules  # nothing imports it until an NPU is asked for
        assert devices.resolve_device("npu") == torch.device("npu", 0)
        print(json.dumps(state.env_at_import))
    """, env=_ENV_KEYS)
    assert json.loads(out.strip().splitlines()[-1]) == {
        "TASK_QUEUE_ENABLE": "2", "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True", "PYTORCH_ALLOC_CONF": None}


def test_users_env_wins_over_the_recommended_env():
    # PYTORCH_ALLOC_CONF set: PYTORCH_NPU_ALLOC_CONF must stay unset (both set is fatal on TorchNPU >= 26.2).
    user_env = {"TASK_QUEUE_ENABLE": "1", "PYTORCH_NPU_ALLOC_CONF": None, "PYTORCH_ALLOC_CONF": "max_split_size_mb:64"}
    out = run_child("""
        import json, fake_torch_npu
        state = fake_torch_npu.install_on_import()
        from local_package import import_module
        import_module("devices").resolve_device("npu")
        print(json.dumps(state.env_at_import))
    """, env=user_env)
    assert json.loads(out.strip().splitlines()[-1]) == user_env


def test_npu_dtypes_on_910b_and_910a():
    run_child("""
        import torch, fake_torch_npu
        state = fake_torch_npu.install()
        from local_package import import_module
        devices = import_module("devices")
        spec = devices.device_spec("npu")
        assert spec.default_dtype == torch.float16 and spec.type == "npu" and spec.module is torch.npu
        assert [devices.resolve_dtype(spec, d) for d in (None, "auto", "bf16", "fp32", torch.float16)] == [
            torch.float16, torch.float16, torch.bfloat16, torch.float32, torch.float16]
        state.bf16_supported = False  # Ascend 910A / 310P
        old = devices.device_spec("npu:0")
        assert devices.resolve_dtype(old, None) == torch.float16
        try:
            devices.resolve_dtype(old, "bf16")
        except ValueError as error:
            assert "910B1" in str(error) and "'bf16'" in str(error), error
        else:
            raise AssertionError("bf16 accepted on a 910A")
    """)


def test_npu_attention_is_sdpa_and_fusion_only_on_npu():
    run_child("""
        import logging, torch, fake_torch_npu
        fake_torch_npu.install()
        from local_package import import_module
        devices = import_module("devices")
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger(devices.__name__).addHandler(handler)
        logging.getLogger(devices.__name__).setLevel(logging.INFO)
        for dtype in (None, torch.float16, torch.bfloat16, torch.float32):
            for requested, expected in [(None, "sdpa"), ("auto", "sdpa"), ("sdpa", "sdpa"), ("eager", "eager"),
                                        ("flash_attention_2", "sdpa"),
                                        ("npu_fusion_attention", "npu_fusion_attention")]:
                records.clear()
                assert devices.resolve_attention(requested, "npu:0", dtype) == expected, (requested, dtype)
                assert len(records) == (requested == "flash_attention_2"), records  # one line for the fallback
        assert devices.resolve_attention("npu_fusion_attention", "cpu", None) == "sdpa"
    """)


def test_npu_fusion_attention_matches_eager_with_padding_and_a_kv_cache():
    run_child("""
        import torch, fake_torch_npu
        from attention_reference import eager_attention, padded_causal_mask, random_qkv
        state = fake_torch_npu.install()
        from local_package import import_module
        devices = import_module("devices")
        left_padded = torch.tensor([[True] * 7, [False, False, False, True, True, True, True]])
        cases = [  # (batch, q_len, k_len, valid keys, how the mask is shaped)
            (1, 7, 7, torch.ones(1, 7, dtype=torch.bool), lambda m: m[0, 0]),  # [T_q, T_k]
            (2, 7, 7, left_padded, lambda m: m),  # prefill, left padding, pad queries keep the diagonal
            (2, 1, 7, left_padded, lambda m: m),  # decode step over a cache: T_k > T_q
            (2, 3, 7, left_padded, lambda m: m),  # several new queries over a cache
            (2, 1, 7, left_padded, lambda m: m[:, :, -1:, :].reshape(2, 1, 1, 7)),  # key-padding mask [B, 1, 1, T_k]
        ]
        for batch, q_len, k_len, valid, shape in cases:
            for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]:
                query, key, value = random_qkv(batch, 4, q_len, k_len, dtype=dtype)
                full = padded_causal_mask(valid, q_len)
                out = devices.npu_fusion_attention(None, query, key, value, shape(full), 0.25)
                expected = eager_attention(query.float(), key.float(), value.float(), full, 0.25)
                assert out.shape == query.shape and out.dtype == dtype
                torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
        call = state.fusion_calls[-1]
        assert (call["input_layout"], call["sparse_mode"], call["head_num"], call["scale"]) == ("BNSD", 0, 4, 0.25)
        assert call["mask_dtype"] == torch.bool and all(len(c["mask_shape"]) == 4 for c in state.fusion_calls)
    """)


def test_npu_batch_size_comes_from_free_memory_not_allocated_bytes_and_is_one_on_torch_npu_2_1_0():
    run_child("""
        import torch, fake_torch_npu
        state = fake_torch_npu.install(free_bytes=30 << 30, total_bytes=64 << 30)
        from local_package import import_module
        devices = import_module("devices")

        def earlier_port(chunks, gb):  # luckymitty/MOSS-TTS-Nano-100M-NPU: "free" = allocated bytes
            used = torch.npu.memory_stats(0).get("allocated_bytes.all.current", 0)
            return min(chunks, max(1, int(used * 0.9) // int(gb * 2**30)))

        # Before the runtime starts the earlier port reads 0 bytes: batch 1 with 30 GiB free.
        assert earlier_port(64, 1.0) == 1
        assert devices.free_memory_bytes("npu:0") == 30 << 30
        assert devices.chunk_batch_size("npu:0", 64, 1.0) == 27  # floor(0.9 * 30 GiB / 1 GiB)
        # As the model allocates, free memory shrinks; the earlier port's "free" grows.
        state.allocated_bytes, state.free_bytes = 50 << 30, 10 << 30
        assert devices.chunk_batch_size("npu:0", 64, 1.0) == 9
        assert earlier_port(64, 1.0) == 45
        assert devices.chunk_batch_size("npu", 5, 1.0) == 5 and devices.chunk_batch_size("npu", 64, 0) == 1
        del torch.npu.mem_get_info  # torch_npu 2.1.0 has none: free memory unknown, batch 1
        assert devices.free_memory_bytes("npu:0") is None
        assert devices.chunk_batch_size("npu:0", 64, 1.0) == 1
    """)


def test_npu_sync_seed_and_peak_memory_use_torch_npu():
    run_child("""
        import torch, fake_torch_npu
        state = fake_torch_npu.install()
        from local_package import import_module
        devices = import_module("devices")
        spec = devices.device_spec("npu:0")
        devices.synchronize(spec)
        assert state.synchronize_calls == 1
        devices.manual_seed(spec, 99)
        assert state.seeds[-1] == 99
        state.allocated_bytes, state.peak_bytes = 1 << 20, 5 << 20
        assert devices.peak_memory_bytes(spec) == 5 << 20
        devices.reset_peak_memory(spec)
        assert state.peak_resets == 1 and devices.peak_memory_bytes(spec) == 1 << 20
        assert spec.graph_class is None  # no NPUGraph before torch_npu release 7.0.0 (and none in the fake)
    """)
