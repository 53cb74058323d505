"""Value-guided beam search: the cached searcher against the naive re-encoding one, beam
bookkeeping, the value read position, batching of prompts of different lengths, bad
arguments."""
import pytest
import torch

from oreo_fast.train.data import tokenize_trajectory
from oreo_fast.models import TinyModelConfig, ValueModel, build_tiny_model
from oreo_fast.search.beam import (Candidate, SearchConfig, TokenCounts, beam_search, best_of_n,
                              check_models, pick_answer, select_beams, step_end_ids)
from oreo_fast.search.naive import naive_beam_search
from oreo_fast.tokenizer import build_tokenizer, encode_pair

torch.set_num_threads(1)
TEXTS = [f"Question: start at {a}, multiply by {b}.\nAnswer:\n{a} * {b} = {a * b}\n#### {a * b}"
         for a in range(3, 20) for b in range(2, 6)]
SIZE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1)


def _value(tok, seed=1):
    backbone = build_tiny_model(tok, TinyModelConfig(**SIZE, seed=seed)).model
    return ValueModel(backbone, {"base_model_type": "qwen2",
                                 "base_architectures": ["Qwen2ForCausalLM"]})


@pytest.fixture(scope="module")
def models():
    tok = build_tokenizer(TEXTS, vocab_size=300)
    policy = build_tiny_model(tok, TinyModelConfig(**SIZE, seed=0))
    # a bias towards newline and EOS, so that steps end and candidates finish by EOS too
    bias = torch.zeros(len(tok))
    bias[[tok.eos_token_id, tok.convert_tokens_to_ids("Ċ")]] = 3.5
    policy.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    value = _value(tok)
    torch.manual_seed(2)
    torch.nn.init.normal_(value.value_head.weight, std=1.0)  # non-zero head: values differ
    value.eval()
    prompts = [encode_pair(tok, t.split("Answer:\n")[0] + "Answer:\n")[0] for t in
               ("Question: start at 3, multiply by 2.\n",
                "Question: start at 17, multiply by 5, then add 4 and subtract 2.\n",
                "Question: 9.\n")]
    assert len({len(p) for p in prompts}) == 3
    return tok, policy, value, prompts


def _run(searcher, models, cfg, **kw):
    tok, policy, value, prompts = models
    counts = TokenCounts()
    res = searcher(policy, value, kw.pop("prompts", prompts), cfg, [tok.eos_token_id],
                   step_end_ids(tok), tok.pad_token_id, counts=counts, **kw)
    return res, counts


@pytest.mark.parametrize("kv_sharing", ["cascade", "copy"])
@pytest.mark.parametrize("beams,candidates", [(2, 3), (3, 2)])
def test_cached_search_equals_naive_reencoding(models, beams, candidates, kv_sharing):
    cfg = SearchConfig(beams=beams, candidates=candidates, max_steps=3, max_step_tokens=4,
                       temperature=1.0, seed=7, kv_sharing=kv_sharing)
    cached, c_counts = _run(beam_search, models, cfg)
    naive, n_counts = _run(naive_beam_search, models, cfg)
    for a, b in zip(cached, naive):
        assert a.tokens == b.tokens and a.finished == b.finished
        assert a.value == pytest.approx(b.value, abs=1e-5)
        assert len(a.beams_per_step) == len(b.beams_per_step)
        for beams_a, beams_b in zip(a.beams_per_step, b.beams_per_step):
            assert [c.tokens for c in beams_a] == [c.tokens for c in beams_b]
            assert [c.parent for c in beams_a] == [c.parent for c in beams_b]
            torch.testing.assert_close(torch.tensor([c.value for c in beams_a]),
                                       torch.tensor([c.value for c in beams_b]),
                                       atol=1e-5, rtol=0)
        assert [c.tokens for c in a.pool] == [c.tokens for c in b.pool]
    # the search is not trivial: several distinct beams were kept
    assert any(len({tuple(c.tokens) for c in s}) > 1 for r in cached for s in r.beams_per_step)
    # the cached searcher processes each token once per model; the naive one re-encodes
    assert c_counts.policy < n_counts.policy / 2 and c_counts.value < n_counts.value


def test_each_token_is_processed_once_per_model(models):
    tok, policy, value, prompts = models
    cfg = SearchConfig(beams=2, candidates=3, max_steps=4, max_step_tokens=5, seed=1)
    results, counts = _run(beam_search, models, cfg)
    cands = [c for r in results for s in r.candidates_per_step for c in s]
    parents = sum(len({c.parent for c in s}) for r in results for s in r.candidates_per_step)
    assert any(c.eos for c in cands) and any(not c.finished for c in cands)
    # value: each prompt once, then each candidate's step tokens once (EOS is not a state)
    assert counts.value == sum(len(p) for p in prompts) + sum(len(c.step) for c in cands)
    # policy: each prompt but its last token (fed with the first step as the root's
    # pending token), one pending token per parent beam, every sampled token but each
    # candidate's last
    sampled = sum(len(c.step) + c.eos for c in cands)
    assert counts.policy == sum(len(p) - 1 for p in prompts) + parents + sampled - len(cands)


def test_results_do_not_depend_on_the_batch(models):
    tok, policy, value, prompts = models
    cfg = SearchConfig(beams=2, candidates=2, max_steps=2, max_step_tokens=4, seed=3)
    together, _ = _run(beam_search, models, cfg)
    for i, p in enumerate(prompts):
        alone, _ = _run(beam_search, models, cfg, prompts=[p], problem_keys=[i])
        assert alone[0].tokens == together[i].tokens
        assert alone[0].value == pytest.approx(together[i].value, abs=1e-5)


def test_value_is_read_where_training_reads_the_next_steps_state(models):
    tok, policy, value, prompts = models
    cfg = SearchConfig(beams=3, candidates=3, max_steps=3, max_step_tokens=6, seed=5)
    results, _ = _run(beam_search, models, cfg)
    ends = step_end_ids(tok)
    checked = 0
    for prompt, r in zip(prompts, results):
        for cands in r.candidates_per_step:
            for c in cands:
                if not c.step or c.step[-1] not in ends:
                    continue
                text = tok.decode(c.tokens) + "x"  # one more step begins after this one
                ex = tokenize_trajectory(tok, tok.decode(prompt), [("assistant", text)], 1.0,
                                         512, ["\n"])
                if ex.ids[:len(prompt) + len(c.tokens)] != prompt + c.tokens:
                    continue  # random tokens need not re-tokenise to themselves
                ids = torch.tensor([ex.ids])
                with torch.no_grad():
                    values = value(ids).values[0]
                starts = [i for i, s in enumerate(ex.starts_step) if s]
                start_of_next = starts[-1]  # the step begun by "x"
                assert start_of_next == len(prompt) + len(c.tokens)
                assert c.value == pytest.approx(float(values[start_of_next - 1]), abs=1e-5)
                checked += 1
    assert checked >= 3


def _cand(value, finished=False, tokens=(1,)):
    return Candidate(0, list(tokens), list(tokens), value, finished, finished)


def test_select_keeps_top_unfinished_and_pools_finished():
    cands = [_cand(0.1, tokens=(1,)), _cand(0.9, True, (2,)), _cand(0.5, tokens=(3,)),
             _cand(0.7, tokens=(4,)), _cand(0.5, tokens=(5,))]
    finished, kept = select_beams(cands, 2)
    assert finished == [cands[1]] and kept == [cands[3], cands[2]]  # tie: earlier first
    res = pick_answer([_cand(0.2, True, (5,)), _cand(0.8, True, (6,))], [_cand(3.0)])
    assert res.tokens == [6] and res.finished  # finished answers beat a higher beam
    assert pick_answer([], [_cand(0.1, tokens=(2,)), _cand(0.3, tokens=(4,))]).tokens == [4]


def test_identical_candidates_take_one_place():
    a, a_again, b, c = _cand(0.9, tokens=(1, 2)), _cand(0.9, tokens=(1, 2)), _cand(0.5, tokens=(3,)), \
        _cand(0.4, tokens=(4,))
    done, done_again = _cand(0.8, True, (7,)), _cand(0.8, True, (7,))
    unfinished_twin = _cand(0.1, tokens=(7,))  # same tokens, not finished: another state
    cands = [a, done, a_again, b, done_again, c, unfinished_twin]
    finished, kept = select_beams(cands, 3, distinct=True)
    assert finished == [done] and kept == [a, b, c]
    finished, kept = select_beams(cands, 3)  # the paper's rule: copies compete too
    assert finished == [done, done_again] and kept == [a, a_again, b]


def test_low_temperature_beams_stay_distinct_and_match_naive(models):
    from oreo_fast.search.evaluate import value_diagnostics

    tok, policy, value, prompts = models
    distinct_steps = {}
    for distinct in (True, False):
        cfg = SearchConfig(beams=3, candidates=3, max_steps=3, max_step_tokens=3,
                           temperature=0.3, seed=5, distinct=distinct)
        cached, _ = _run(beam_search, models, cfg)
        naive, _ = _run(naive_beam_search, models, cfg)
        duplicated = 0
        for r, n in zip(cached, naive):
            assert [[c.tokens for c in s] for s in r.beams_per_step] == \
                [[c.tokens for c in s] for s in n.beams_per_step]
            assert [c.tokens for c in r.pool] == [c.tokens for c in n.pool]
            for kept in r.beams_per_step:
                duplicated += len(kept) - len({tuple(c.tokens) for c in kept})
            duplicated += len(r.pool) - len({tuple(c.tokens) for c in r.pool})
        distinct_steps[distinct] = duplicated
        # the search report counts the copies of a beam alike
        report = value_diagnostics(cached)
        assert (report["distinct_beams_per_step"] == report["beams_kept_per_step"]) == distinct
    # without the rule the same seed keeps copies of a beam; with it, none
    assert distinct_steps[True] == 0 and distinct_steps[False] > 0


def test_all_candidates_finishing_stops_the_search(models):
    cfg = SearchConfig(beams=3, candidates=2, max_steps=5, max_step_tokens=3, seed=0)
    results, counts = _run(beam_search, models, cfg, is_final=lambda tokens: True)
    naive, _ = _run(naive_beam_search, models, cfg, is_final=lambda tokens: True)
    for r, n in zip(results, naive):
        assert len(r.beams_per_step) == 1 and r.beams_per_step[0] == []
        assert len(r.pool) == 6 and r.finished  # B x K candidates from the root
        assert r.value == max(c.value for c in r.pool)
        assert r.tokens == n.tokens


def test_step_limit_returns_the_best_beam(models):
    tok, policy, value, prompts = models
    cfg = SearchConfig(beams=2, candidates=2, max_steps=3, max_step_tokens=2, seed=4)
    # an EOS id the policy never samples: nothing finishes, the step limit ends the search
    results = beam_search(policy, value, prompts, cfg, [len(tok)], step_end_ids(tok),
                          tok.pad_token_id)
    for r in results:
        assert len(r.beams_per_step) == cfg.max_steps and not r.pool and not r.finished
        assert all(len(s) == cfg.beams for s in r.beams_per_step)
        best = max(r.beams_per_step[-1], key=lambda c: c.value)
        assert r.tokens == best.tokens and r.value == best.value


def test_bad_arguments_give_clear_errors(models):
    tok, policy, value, prompts = models
    with pytest.raises(ValueError, match="beams: must be >= 1"):
        SearchConfig(beams=0)
    with pytest.raises(ValueError, match="candidates: must be >= 1"):
        SearchConfig(candidates=0)
    other_tok = build_tokenizer(TEXTS[:5], vocab_size=280)
    assert len(other_tok) != len(tok)
    other = _value(other_tok)
    with pytest.raises(ValueError, match="vocabulary"):
        beam_search(policy, other, prompts, SearchConfig(), [tok.eos_token_id], set(), 0)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        check_models(policy, value, tok, build_tokenizer(TEXTS[::-1][:9], vocab_size=300))
    with pytest.raises(ValueError, match="N >= 1"):
        best_of_n(policy, value, prompts, 0, None, [tok.eos_token_id], 0)


def test_eval_cli_beam_search_best_of_n_and_errors(models, tmp_path, capsys):
    import json

    from oreo_fast.cli import main
    from oreo_fast.models import save_model

    tok, policy, value, _ = models
    save_model(build_tiny_model(tok, TinyModelConfig(**SIZE, seed=0)), tok,
                    tmp_path / "policy")
    value.save_pretrained(tmp_path / "value", tokenizer=tok)
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"question": f"start at {a}, multiply by 2.",
                                            "answer": f"{a} * 2 = {2 * a}\n#### {2 * a}"}) + "\n"
                                for a in (3, 4, 11)))
    base = ["eval", "--model", str(tmp_path / "policy"), "--problems", str(problems),
            "--n-samples", "0", "--max-new-tokens", "8"]
    out = tmp_path / "r.json"
    assert main(base + ["--out", str(out), "--value", str(tmp_path / "value"), "--beams", "2",
                        "--candidates", "2", "--max-steps", "2", "--max-step-tokens", "4",
                        "--best-of", "2"]) == 0
    report = json.loads(out.read_text())
    assert 0 <= report["beam_accuracy"] <= 1 and 0 <= report["best_of_2_accuracy"] <= 1
    assert report["beam_search"]["policy_tokens"] > 0 and report["beam_search"]["value_tokens"] > 0
    copied = tmp_path / "copied.json"
    assert main(base + ["--out", str(copied), "--value", str(tmp_path / "value"), "--beams", "2",
                        "--candidates", "2", "--max-steps", "2", "--max-step-tokens", "4",
                        "--kv-sharing", "copy"]) == 0
    copy_report = json.loads(copied.read_text())
    assert copy_report["beam_accuracy"] == report["beam_accuracy"]
    for key in ("policy_tokens", "value_tokens"):  # same search, prefixes copied instead
        assert copy_report["beam_search"][key] == report["beam_search"][key]
    capsys.readouterr()
    assert main(base + ["--out", str(out), "--value", str(tmp_path / "value"), "--beams", "2",
                        "--kv-sharing", "paged"]) == 2
    assert "kv_sharing: must be one of" in capsys.readouterr().err
    assert main(base + ["--out", str(out), "--beams", "2"]) == 2
    assert "need --value" in capsys.readouterr().err
    assert main(base + ["--out", str(out), "--value", str(tmp_path / "value"), "--beams", "2",
                        "--candidates", "0"]) == 2
    assert "candidates: must be >= 1" in capsys.readouterr().err
    other_tok = build_tokenizer(TEXTS[:5], vocab_size=280)
    _value(other_tok).save_pretrained(
        tmp_path / "other", tokenizer=other_tok)
    assert main(base + ["--out", str(out), "--value", str(tmp_path / "other"), "--beams", "1"]) == 2
    assert "vocabulary" in capsys.readouterr().err


def test_one_beam_one_greedy_candidate_is_greedy_decoding(models):
    from oreo_fast.sampling import SamplingConfig, generate

    tok, policy, value, prompts = models
    cfg = SearchConfig(beams=1, candidates=1, max_steps=40, max_step_tokens=40, temperature=0)
    results, _ = _run(beam_search, models, cfg)
    greedy = generate(policy, prompts, tok.eos_token_id, tok.pad_token_id,
                      SamplingConfig(max_new_tokens=400, temperature=0))
    for r, [g] in zip(results, greedy):
        # the search stops at its step limit: compare what it produced
        assert len(r.tokens) >= min(len(g.token_ids), cfg.max_steps)
        assert r.tokens == g.token_ids[:len(r.tokens)] and r.finished == (r.tokens == g.token_ids)


def test_demo_beam_stage_reports_test_val_and_the_beam_sweep(models, tmp_path):
    import json

    from oreo_fast.models import save_model
    from oreo_fast.pipeline.demo import DEMO_SWEEP_BEAMS, demo_beam_search

    tok, policy, value, _ = models
    save_model(build_tiny_model(tok, TinyModelConfig(**SIZE, seed=0)), tok,
                    tmp_path / "oreo" / "policy")
    value.save_pretrained(tmp_path / "oreo" / "value", tokenizer=tok)
    files = []
    for name, values in (("test", (3, 4)), ("val", (5,))):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"question": f"start at {a}, multiply by 2.",
                                            "answer": f"{a} * 2 = {2 * a}\n#### {2 * a}"})
                                + "\n" for a in values))
        files.append(path)
    out = demo_beam_search(tmp_path / "oreo", *files, sweep_limit=1)
    assert 0 <= out["test"] <= 1 and 0 <= out["val"] <= 1
    assert out["test_tokens"]["policy_tokens"] > 0 and out["sweep"]["n_problems"] == 1
    assert sorted(out["sweep"]["accuracy_by_beams"]) == sorted(DEMO_SWEEP_BEAMS)
    assert out["test_value_diagnostics"]["beams_kept_per_step"] > 0
    assert set(out["val_value_diagnostics"]) == set(out["test_value_diagnostics"])


def test_value_diagnostics_spreads_and_distinct_beams():
    from oreo_fast.search.beam import SearchResult
    from oreo_fast.search.evaluate import value_diagnostics

    def cand(parent, tokens, value, finished=False):
        return Candidate(parent, list(tokens), list(tokens[-1:]), value, finished, finished)

    a, a_copy = cand(0, (1,), 0.5), cand(0, (1,), 0.5)
    first = [a, cand(0, (2,), 0.2), a_copy, cand(0, (3,), 0.9, finished=True)]
    second = [cand(0, (1, 4), 0.6), cand(0, (1, 5), 0.61), cand(1, (1, 6), 0.7)]
    one = SearchResult([1, 5], 0.61, False, [], beams_per_step=[[a, a_copy], [second[1]]],
                       candidates_per_step=[first, second])
    x, y = cand(0, (7,), 0.1), cand(0, (8,), 0.1)
    two = SearchResult([7], 0.1, False, [], beams_per_step=[[x, y]], candidates_per_step=[[x, y]])
    d = value_diagnostics([one, two])
    # sibling groups with two distinct unfinished children: 0.5 vs 0.2, 0.6 vs 0.61, 0.1 vs 0.1
    assert d["sibling_groups"] == 3
    assert d["sibling_value_spread_median"] == pytest.approx(0.01)
    assert d["sibling_value_spread_mean"] == pytest.approx((0.3 + 0.01 + 0.0) / 3)
    # first-step means 0.525 and 0.1 (finished candidates count: they are states too)
    assert d["across_problems_value_std"] == pytest.approx(0.2125)
    assert d["beams_kept_per_step"] == pytest.approx(5 / 3)
    assert d["distinct_beams_per_step"] == pytest.approx(4 / 3)


def test_reserved_cache_layer_grows_past_its_reserve():
    from oreo_fast.search.kv import _new_cache

    k = torch.randn(2, 1, 3, 4)
    cache = _new_cache([(k, k + 1)], reserve=1, repeat=2)
    layer = cache.layers[0]
    torch.testing.assert_close(layer.keys, k.repeat_interleave(2, 0))
    new = torch.randn(4, 1, 2, 4)  # more than the reserve: the buffer grows
    keys, values = cache.update(new, new - 1, 0)
    torch.testing.assert_close(keys, torch.cat([k.repeat_interleave(2, 0), new], dim=2))
    torch.testing.assert_close(values, torch.cat([(k + 1).repeat_interleave(2, 0), new - 1], 2))
    assert cache.get_seq_length() == 5


def test_inverse_cdf_sampling_follows_the_distribution_and_skips_filtered_tokens():
    from oreo_fast.search.beam import sample_with_uniform

    logits = torch.log(torch.tensor([[0.1, 0.0, 0.6, 0.3]]))  # token 1 has probability 0
    cfg = SearchConfig(temperature=1.0)
    u = torch.linspace(0, 1, 1001, dtype=torch.float64)[:-1]
    tokens = sample_with_uniform(logits.expand(len(u), -1), u, cfg)
    freq = torch.bincount(tokens, minlength=4).double() / len(u)
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=torch.float64),
                               atol=2e-3, rtol=0)
    top1 = sample_with_uniform(logits.expand(len(u), -1), u, SearchConfig(top_k=1))
    assert (top1 == 2).all()


def test_pool_accuracy_counts_a_right_answer_the_ranking_missed(models, monkeypatch):
    from oreo_fast.search import evaluate as search_eval
    from oreo_fast.tasks.problems import Problem

    tok, policy, value, _ = models
    right, wrong = (tok(t)["input_ids"] for t in ("#### 6", "#### 7"))
    pool = [Candidate(0, wrong, wrong, 0.9, True, True), Candidate(0, right, right, 0.1, True, True)]

    def fake_search(policy, value_model, prompts, cfg, *args, **kwargs):
        return [pick_answer(pool if i == 0 else pool[:1], []) for i in range(len(prompts))]

    monkeypatch.setattr(search_eval, "beam_search", fake_search)
    problems = [(Problem(f"p{i}", "q", "#### 6", "6", "gsm8k"), [1, 2]) for i in range(2)]
    res = search_eval.search_accuracy(policy, value, tok, problems, SearchConfig())
    assert res["accuracy"] == 0 and res["pool_accuracy"] == 0.5


def test_generated_tokens_count_every_sampled_token(models):
    from oreo_fast.sampling import SamplingConfig

    tok, policy, value, prompts = models
    cfg = SearchConfig(beams=2, candidates=3, max_steps=3, max_step_tokens=4, seed=7)
    results, counts = _run(beam_search, models, cfg)
    # every candidate sampled its step's tokens and, when it ended so, its EOS
    sampled = sum(len(c.step) + c.eos for r in results for step in r.candidates_per_step
                  for c in step)
    assert counts.generated == sampled > 0
    counts = TokenCounts()
    results = best_of_n(policy, value, prompts, 3, SamplingConfig(max_new_tokens=6),
                        [tok.eos_token_id], tok.pad_token_id, seed=5, counts=counts)
    assert counts.generated == sum(len(c.tokens) + c.finished for r in results for c in r.pool)


class _Terminal:
    """A stderr that says it is a terminal and keeps what is written to it."""

    def __init__(self, is_terminal: bool):
        self.text, self.is_terminal = "", is_terminal

    def write(self, text):
        self.text += text

    def flush(self):
        pass

    def isatty(self):
        return self.is_terminal


@pytest.mark.parametrize("terminal,progress,shown", [(True, True, True), (True, False, False),
                                                     (False, True, False)])
def test_search_progress_bar_on_a_terminal_unless_asked_not_to(models, monkeypatch, terminal,
                                                               progress, shown):
    import sys

    from oreo_fast.sampling import SamplingConfig
    from oreo_fast.search import evaluate as search_eval
    from oreo_fast.tasks.problems import Problem

    tok, policy, value, prompts = models
    encoded = [(Problem(f"p{i}", "q", "#### 6", "6", "gsm8k"), ids)
               for i, ids in enumerate(prompts)]
    stderr = _Terminal(terminal)
    monkeypatch.setattr(sys, "stderr", stderr)
    cfg = SearchConfig(beams=1, candidates=2, max_steps=1, max_step_tokens=2)
    res = search_eval.search_accuracy(policy, value, tok, encoded, cfg, batch_size=2,
                                      progress=progress)
    assert res["generated_tokens"] > 0
    search_eval.best_of_n_accuracy(policy, value, tok, encoded, 2,
                                   SamplingConfig(max_new_tokens=2), progress=progress)
    if shown:
        assert "beam search" in stderr.text and "best-of-2" in stderr.text
        assert f"{len(encoded)}/{len(encoded)}" in stderr.text and "tok/s" in stderr.text
    else:
        assert stderr.text == ""
