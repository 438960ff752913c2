"""engine/cuda_graph.py's bookkeeping on the CPU: which state the captured step is bound to, and moving other
states onto its tensors (adopt) instead of capturing again. The capture itself is replaced by a stand-in that
replays the static step on the tensors it was recorded on (what a CUDA graph does with baked-in addresses);
scripts/gpu_check.py checks the real graphs against eager decode on the GPU."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

import flashmoe_pack
from flashmoe_pack.engine.cuda_graph import GraphedDecode


class RecordedDecode(GraphedDecode):
    """GraphedDecode with the CUDA parts stood in for: a 'graph' that runs the static step on a shallow copy of
    the state it was recorded on, so it reads and writes those tensors, whoever uses them later."""

    cache = SimpleNamespace(vram=SimpleNamespace(hits=0))  # the VRAM tier's hit counter (a capture restores it)

    def _static_key(self):
        return (self.model.config.num_experts_per_tok,)

    def _count_hits(self):
        pass

    def _warm_up(self, scratch):
        self.model.forward(self.ids, scratch, last_only=True, pos=self.pos)

    def _record(self, state):
        bound = copy.copy(state)
        bound.kv = {i: copy.copy(c) for i, c in state.kv.items()}
        bound.conv, bound.recurrent = dict(state.conv), dict(state.recurrent)
        out = torch.empty(1, self.model.config.vocab_size)

        def replay():
            out.copy_(self.model.forward(self.ids, bound, last_only=True, pos=self.pos))

        return SimpleNamespace(replay=replay), out


def _eager(m, state, toks):
    return [m.model.forward(torch.tensor([t]), state, last_only=True)[-1] for t in toks]


def test_states_share_one_capture_and_stay_independent(packed16):
    """Two sequences decoded alternately through one recorded step, and a snapshot resumed, give the logits of
    decoding each alone; one capture serves them all (adoptions instead), and no state sees another's data."""
    m = flashmoe_pack.load(packed16)
    g = RecordedDecode(m.model)
    prompts = ([5, 9, 2, 7], [11, 3, 3, 8, 1, 6])
    toks = ([4, 8, 15, 16, 23], [42, 1, 2, 3, 5])
    want = []
    for p, t in zip(prompts, toks, strict=True):
        s = m.model.new_state()
        m.model.forward(torch.tensor(p), s)
        want.append(_eager(m, s, t))
    states = []
    for p in prompts:
        s = m.model.new_state()
        m.model.forward(torch.tensor(p), s)
        states.append(s)
    got = ([], [])
    snap = None
    for step in range(5):
        for j in (0, 1):  # alternate: each call moves the other sequence off the bound tensors
            got[j].append(g(toks[j][step], states[j]))
        if step == 1:
            snap = (states[0].clone(), states[0].pos)  # a prefix snapshot taken from the bound state
    for j in (0, 1):
        for a, b in zip(got[j], want[j], strict=True):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert g.captures == 1 and g.adoptions >= 9
    # the snapshot (a clone of the bound state after two steps) resumes on the same capture
    s, pos = snap
    assert pos == len(prompts[0]) + 2
    resumed = [g(t, s) for t in toks[0][2:]]
    for a, b in zip(resumed, want[0][2:], strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert g.captures == 1
    # the state that used the bound tensors last before the snapshot kept its own copy and still continues
    more = g(7, states[1])
    s1 = m.model.new_state()
    m.model.forward(torch.tensor(prompts[1]), s1)
    ref = _eager(m, s1, toks[1] + [7])[-1]
    assert torch.allclose(more, ref, atol=1e-4, rtol=1e-4)


def test_kv_room_too_small_captures_again_on_the_states_own_buffers(packed16):
    """A state whose next position does not fit the bound KV buffers is not adopted: it captures on its own."""
    m = flashmoe_pack.load(packed16)
    g = RecordedDecode(m.model)
    a = m.model.new_state()
    m.model.forward(torch.tensor([1, 2, 3]), a)
    g(4, a)
    cap = next(iter(a.kv.values())).capacity
    b = m.model.new_state()
    m.model.forward(torch.arange(cap) % 50, b)  # pos == capacity: the next token needs a bigger buffer
    g(5, b)
    assert g.captures == 2 and g.adoptions == 0
    assert next(iter(b.kv.values())).capacity > cap and g._uses_work(b)
    g(6, b)  # the owner again: replayed as it is
    assert g.captures == 2 and g.adoptions == 0
    # the owner's KV outgrows the bound buffers in a prefill (KVCache.reserve gives it new ones): captured again
    m.model.forward(torch.arange(next(iter(b.kv.values())).capacity - b.pos) % 50, b)
    g(7, b)
    assert g.captures == 3 and g._uses_work(b)


def test_move_to_copies_the_state_and_zeroes_the_kv_tail(packed16):
    """move_to into buffers holding another sequence's leftovers (NaN here): the cached part is this state's,
    the KV tail is zero again (masked slots must stay finite), and a misfit is refused with its shapes."""
    m = flashmoe_pack.load(packed16)
    s = m.model.new_state()
    m.model.forward(torch.tensor([3, 1, 4, 1, 5]), s)
    before = [t.clone() for t in s.buffers()]
    bufs = [torch.full_like(t, float("nan")) for t in s.buffers()]
    s.move_to(bufs)
    assert all(a is b for a, b in zip(s.buffers(), bufs, strict=True))
    n_kv = 2 * len(s.kv)
    for j, (a, b) in enumerate(zip(s.buffers(), before, strict=True)):
        if j < n_kv:
            assert torch.equal(a[:, : s.pos], b[:, : s.pos]) and not a[:, s.pos :].any()
        else:
            assert torch.equal(a, b)
    short = [t[:, :2] if j < n_kv else t for j, t in enumerate(s.buffers())]
    with pytest.raises(ValueError, match="KV buffer .* 5 cached"):
        s.move_to(short)
