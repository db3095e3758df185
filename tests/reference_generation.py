"""Upstream's generation algorithm written plainly (spec tts.md §6.2-6.3), as an oracle for the tests.

No caches: every frame reruns the global decoder over all rows so far, and every local slot reruns the local decoder
over the whole frame so far. Sampling filters one decision at a time and draws with `torch.multinomial` from the
global generator. Slow and obviously correct; the engine must give the same codes.
"""

import torch


def _filter(logits, temperature, top_k, top_p):
    logits = logits / temperature
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        ordered, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        drop = cumulative > top_p
        drop[..., 1:] = drop[..., :-1].clone()
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _pick(logits, do_sample, temperature, top_k, top_p, penalty=1.0, history=None):
    if history is not None and penalty != 1.0:
        penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
        logits = torch.where(history, penalised, logits)
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(_filter(logits, temperature, top_k, top_p), dim=-1).float()
    return torch.multinomial(probs, 1).squeeze(-1)


@torch.no_grad()
def reference_generate(model, ids, mask, max_new_frames, nq=None, do_sample=False, text_temperature=1.5,
                       text_top_p=1.0, text_top_k=50, audio_temperature=1.7, audio_top_p=0.8, audio_top_k=25,
                       audio_repetition_penalty=1.0):
    """Codes [B, F, n_vq] as upstream's generate computes them, with no cache anywhere."""
    config = model.config
    n_vq, pad = config.n_vq, config.audio_pad_token_id
    nq = nq or n_vq
    batch = ids.shape[0]
    finished = torch.zeros(batch, dtype=torch.bool)
    history = torch.zeros(n_vq, batch, 1024, dtype=torch.bool)
    candidates = torch.tensor([config.audio_assistant_slot_token_id, config.audio_end_token_id])
    frames = []
    for _ in range(max_new_frames):
        hidden = model(ids, mask).global_hidden_states[:, -1]
        slots = [hidden]
        local = model.local_transformer(torch.stack(slots, 1))[0][:, -1]
        text = model.text_lm_head(local)[:, candidates]
        choice = _pick(text, do_sample, text_temperature, text_top_k, text_top_p)
        going = (choice == 0) & ~finished
        finished |= choice == 1
        if not going.any():
            break
        slots.append(model.transformer.wte(candidates[choice]))
        frame = torch.full((batch, n_vq), pad)
        for channel in range(nq):
            local = model.local_transformer(torch.stack(slots, 1))[0][:, -1]
            token = _pick(model.audio_lm_heads[channel](local), do_sample, audio_temperature, audio_top_k,
                          audio_top_p, audio_repetition_penalty, history[channel])
            history[channel].scatter_(1, token[:, None], True)
            frame[:, channel] = token
            slots.append(model.audio_embeddings[channel](token))
        frame[~going] = pad
        frames.append(frame)
        row = torch.cat([torch.where(going, 9, config.pad_token_id)[:, None], frame], dim=-1)
        ids = torch.cat([ids, row[:, None]], dim=1)
        mask = torch.cat([mask, going[:, None]], dim=1)
    return torch.stack(frames, dim=1) if frames else torch.full((batch, 0, n_vq), pad)
