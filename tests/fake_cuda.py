"""A stand-in for torch.cuda: the parts devices.py uses, with knobs and call records (no GPU needed).

Tests hand it to devices.py through `monkeypatch.setattr(devices, "_load_cuda_module", lambda: FakeCuda())`.
"""

import types


class FakeCuda(types.SimpleNamespace):
    """The parts of torch.cuda that devices.py uses, with knobs and call records."""

    def __init__(self, available=True, count=1, bf16=True, free=30 << 30, total=80 << 30):
        super().__init__(available=available, count=count, bf16=bf16, free=free, total=total, synced=[],
                         seeded=[], current=0, peak=123, resets=0)

    def is_available(self):
        return self.available

    def device_count(self):
        return self.count if self.available else 0

    def current_device(self):
        return self.current

    def is_bf16_supported(self, including_emulation=True):
        return self.bf16

    def mem_get_info(self, device=None):
        return self.free, self.total

    def synchronize(self, device=None):
        self.synced.append(device)

    def manual_seed_all(self, seed):
        self.seeded.append(seed)

    def max_memory_allocated(self, device=None):
        return self.peak

    def reset_peak_memory_stats(self, device=None):
        self.resets += 1
