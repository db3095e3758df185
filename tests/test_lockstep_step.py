"""The local decoder's lockstep step: every row at one position, the same numbers as the general decode step."""

import pytest
import torch

from conftest import import_module

checkpoints = import_module("measurement.checkpoints")
decoder = import_module("gpt2_decoder")


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_lockstep_steps_equal_decode_steps_bit_for_bit(backend):
    model = checkpoints.random_tiny_model(seed=4)
    local = model.local_transformer
    attention = decoder.attention_function(backend)
    general = decoder.KVCache.for_decoder(local, 3, 17)
    lockstep = decoder.KVCache.for_decoder(local, 3, 17)
    lockstep.keys[0].fill_(123.0)  # stale keys of an earlier frame stay masked
    generator = torch.Generator().manual_seed(0)
    for position in range(17):
        rows = torch.randn(3, 1, local.ln_f.weight.shape[0], generator=generator)
        expected = local.decode_step(rows, None, general, 17, attention)
        assert torch.equal(local.lockstep_step(rows, lockstep, position, attention), expected), position
    assert torch.equal(lockstep.keys[0], general.keys[0]) and torch.equal(lockstep.values[0], general.values[0])


def test_lockstep_position_outside_the_cache_raises_value_error():
    model = checkpoints.random_tiny_model(seed=4)
    cache = decoder.KVCache.for_decoder(model.local_transformer, 1, 4)
    with pytest.raises(ValueError, match="lockstep position 4"):
        model.local_transformer.lockstep_step(torch.zeros(1, 1, 64), cache, 4, decoder.attention_function("sdpa"))
