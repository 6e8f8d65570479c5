"""Sampled answers (truthmap/backends/base.py ``Draws``, drawn by hf.py's ``draw_processor``): each prompt draws from a random stream of
its own, so its samples do not depend on the batching; the Gumbel-max draw follows the tempered softmax
and keeps to the top k."""

from __future__ import annotations

import numpy as np
import torch
from _synthetic import fake_model, prompts

from truthmap.backends import hf
from truthmap.backends.base import Draws
from truthmap.stages import generate


def test_a_prompt_s_seed_depends_on_the_seed_the_prompt_and_its_repeat_only():
    a, b, c = [1, 2, 3], [4, 5], [1, 2, 4]
    first = Draws.of([a, a, b], temperature=1.0, seed=0).seeds
    other_list = Draws.of([c, b, a, a, b], temperature=1.0, seed=0).seeds
    assert first[0] != first[1]  # two samples of one question: two streams
    assert other_list[2:4] == first[:2] and other_list[1] == first[2]  # elsewhere in another list: the same
    assert other_list[4] != first[2]  # b's second sample
    assert Draws.of([c], 1.0, 0).seeds[0] not in first  # a different prompt
    assert not set(Draws.of([a, a, b], 1.0, 1).seeds) & set(first)  # a different seed


def _draw(draws: Draws, logits: torch.Tensor, steps: int = 1) -> torch.Tensor:
    """Tokens picked by the greedy step over ``steps`` steps, ``[steps, rows]``."""
    processor = hf.draw_processor(draws, "cpu")
    return torch.stack([processor(None, logits).argmax(-1) for _ in range(steps)])


def test_the_draw_follows_the_tempered_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n = 20000
    for temperature in (1.0, 0.5):
        draws = Draws(temperature, 0, range(n))
        picked = _draw(draws, logits.expand(n, -1))[0].numpy()
        share = np.bincount(picked, minlength=4) / n
        expected = torch.softmax(logits / temperature, -1).numpy()
        # binomial standard error at n = 20000 is at most 0.0036
        assert np.abs(share - expected).max() < 0.015, (temperature, share, expected)


def test_top_k_keeps_to_the_k_likeliest_tokens():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 2.8])
    n = 4000
    picked = set(_draw(Draws(5.0, 2, range(n)), logits.expand(n, -1))[0].tolist())
    assert picked == {1, 2}  # at T=5 every token would come up in 4000 draws without the cut
    assert len(set(_draw(Draws(5.0, 0, range(n)), logits.expand(n, -1))[0].tolist())) == 5


def test_a_row_draws_the_same_tokens_in_any_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    seeds = [11, 22, 33, 44, 55, 66]
    together = _draw(Draws(1.0, 0, seeds), logits, steps=5)
    for row in range(6):
        alone = _draw(Draws(1.0, 0, [seeds[row]]), logits[row : row + 1], steps=5)
        assert torch.equal(alone[:, 0], together[:, row])
    reordered = _draw(Draws(1.0, 0, seeds[::-1]), logits.flip(0), steps=5)
    assert torch.equal(reordered.flip(1), together)
    # and the global random state plays no part
    torch.manual_seed(1)
    assert torch.equal(_draw(Draws(1.0, 0, seeds), logits, steps=5), together)
    assert (together != together[0]).any()  # each step draws anew


def test_each_prompt_gets_its_own_seed_whatever_the_batch_size(monkeypatch):
    seen = {}

    def fake_batch(lm, batch, max_new_tokens, stop_ids, sample=None, capture=None):
        assert len(sample.seeds) == len(batch)
        for ids, seed in zip(batch, sample.seeds):
            seen.setdefault(tuple(ids), []).append(seed)
        return [([7], True) for _ in batch]

    monkeypatch.setattr(hf, "_generate_batch", fake_batch)
    monkeypatch.setattr(generate, "prompt_room", lambda lm, n: 50)
    monkeypatch.setattr(hf.LoadedModel, "end_of_turn_ids", lambda lm: [1])
    asked = prompts()[:10] * 2  # every prompt twice: two samples each
    by_batch = {}
    for batch_size in (1, 3, 8):
        seen.clear()
        generate.generate_answers(fake_model(), asked, 8, batch_size=batch_size, progress=False, sample=(1.0, 5))
        by_batch[batch_size] = {k: sorted(v) for k, v in seen.items()}
    assert by_batch[1] == by_batch[3] == by_batch[8]
    assert all(len(set(v)) == 2 for v in by_batch[1].values())  # a prompt's two samples: two streams
    assert by_batch[1] == {tuple(p): sorted(Draws.of(asked, 1.0, 5).seeds[i] for i in (j, j + 10))
                           for j, p in enumerate(asked[:10])}
