"""The cascade search with bfloat16 models against float32 (same seed): every kept beam's
tokens identical, values within 0.05 absolute (the value head reads bf16 hidden states)."""
import pytest
import torch
from test_search import _run, models  # noqa: F401 (the search's tiny models fixture)


def test_cascade_search_bf16_agrees_with_fp32(models):  # noqa: F811
    from oreo_fast.search.beam import SearchConfig, beam_search

    tok, policy, value, prompts = models
    cfg = SearchConfig(beams=2, candidates=3, max_steps=3, max_step_tokens=4,
                       temperature=1.0, seed=7, kv_sharing="cascade")
    fp32, _ = _run(beam_search, models, cfg)
    half = (tok, policy.to(torch.bfloat16), value.to(torch.bfloat16), prompts)
    try:
        bf16, _ = _run(beam_search, half, cfg)
    finally:
        policy.float(), value.float()
    for a, b in zip(bf16, fp32):
        assert a.tokens == b.tokens and a.finished == b.finished
        assert a.value == pytest.approx(b.value, abs=0.05)
        for beams_a, beams_b in zip(a.beams_per_step, b.beams_per_step):
            assert [c.tokens for c in beams_a] == [c.tokens for c in beams_b]
            torch.testing.assert_close(torch.tensor([c.value for c in beams_a]),
                                       torch.tensor([c.value for c in beams_b]),
                                       atol=0.05, rtol=0)
