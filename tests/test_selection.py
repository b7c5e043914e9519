"""selection.py: every score formula on hand-made numbers, the submission order, and EvalTool ranking and counting."""
import copy
import math

import numpy as np
import pytest

import selection
from selection import EvalTool


def cand(inf, aug, correct=None, tag=None):
    """A candidate record with view keys v0, v1, ...; `tag` identifies it after sorting."""
    return {'output': [[0]], 'correct': correct, 'tag': tag,
            'scores_inf': {f'v{i}': x for i, x in enumerate(inf)},
            'scores_aug': {f'v{i}': x for i, x in enumerate(aug)}}


C = cand(inf=[0.5, 2.0], aug=[1.0, 2.0, 4.0])


def test_score_formulas():
    assert selection.max_gen_prob(C) == 0.5
    assert selection.max_aug_prob(C) == 1.0
    assert selection.min_aug_prob(C) == 4.0
    assert selection.sum_aug_prob(C) == pytest.approx(-(math.exp(-1) + math.exp(-2) + math.exp(-4)))
    assert selection.mul_aug_prob(C) == pytest.approx(7.0)
    # (1-3)+(2-3)+(4-3) + (0.5-3)+(2-3) = -2 - 3.5
    assert selection.mul_all_prob(C) == pytest.approx(-5.5)


def test_score_algos_order_and_names():
    assert list(selection.score_algos) == ['max_gen_prob', 'max_aug_prob', 'min_aug_prob', 'sum_aug_prob',
                                           'mul_aug_prob', 'mul_all_prob']
    for name, fn in selection.score_algos.items():
        assert fn.__name__ == name


def test_mul_all_prob_rewards_more_generating_views():
    once, twice = cand([1.0], [5.0, 5.0]), cand([1.0, 1.0], [5.0, 5.0])
    assert selection.mul_all_prob(twice) < selection.mul_all_prob(once)
    assert selection.mul_aug_prob(twice) == selection.mul_aug_prob(once)


def test_empty_lists_give_inf():
    never = cand([], [1.0, 2.0])
    assert selection.max_gen_prob(never) == math.inf
    assert selection.mul_aug_prob(never) == 3.0
    assert selection.mul_all_prob(never) == pytest.approx(-3.0)  # empty generation sum is 0
    unscored = cand([1.0], [])
    for fn in (selection.max_aug_prob, selection.min_aug_prob, selection.sum_aug_prob, selection.mul_aug_prob):
        assert fn(unscored) == math.inf
    assert selection.mul_all_prob(unscored) == pytest.approx(-2.0)
    assert selection.mul_all_prob(cand([], [])) == math.inf


def test_bad_candidate_raises():
    with pytest.raises(TypeError):
        selection.mul_aug_prob([1.0, 2.0])
    with pytest.raises(TypeError):
        selection.mul_aug_prob({'scores_aug': 'abc'})


def test_stable_ranks():
    assert selection.stable_ranks([3.0, 1.0, 3.0, 0.0]).tolist() == [2, 1, 3, 0]


def quiet(**kw):
    lines = []
    return EvalTool(print_func=lines.append, **kw), lines


def tags(cands):
    return [c['tag'] for c in cands]


def test_ranks_and_submission_order():
    # mul_aug: a=9, b=6, c=3; max_gen: a=.1, b=2, c=3; max_aug: a=4, b=.5, c=1; min_aug: a=5, b=5.5, c=2
    res = [cand([0.1], [4, 5], tag='a'), cand([2.0], [0.5, 5.5], True, 'b'), cand([3.0], [1, 2], False, 'c')]
    tool, lines = quiet()
    rec = tool.process_result(res, 'task_0')
    assert tags(res) == ['a', 'b', 'c'] and tags(selection.order_candidates(res)) == ['c', 'b', 'a']
    assert tags(selection.order_candidates(res, 'max_gen_prob')) == ['a', 'b', 'c']
    assert rec['ranks']['mul_aug_prob'] == 1 and rec['ranks']['max_gen_prob'] == 1
    assert rec['ranks']['max_aug_prob'] == 0 and rec['ranks']['min_aug_prob'] == 2
    assert rec['found'] is True and rec['solved'] is True and rec['n_candidates'] == 3
    assert lines == ["* task 'task_0': 3 candidates, correct solution FOUND, @2"]  # one line per test input
    tool.print_summary()  # the per-method table, once at the end
    assert lines[1:] == ['max_gen_prob  100.00% (1/1)', 'max_aug_prob  100.00% (1/1)', 'min_aug_prob    0.00% (0/1)',
                         'sum_aug_prob  100.00% (1/1)', 'mul_aug_prob  100.00% (1/1)  <- selection',
                         'mul_all_prob  100.00% (1/1)', 'correct_found 100.00% (1/1)']


def test_rank_beyond_guesses_is_not_solved():
    res = [cand([1.0], [1], tag='a'), cand([1.0], [2], tag='b'), cand([1.0], [3], True, 'c')]
    tool, _ = quiet(n_guesses=2, score_algos=['mul_aug_prob'])
    rec = tool.process_result(res, 't')
    assert rec['ranks'] == {'mul_aug_prob': 2} and rec['solved'] is False
    assert tool.summary() == {'mul_aug_prob': 0.0, 'correct_found': 1.0, 'count': 1.0, 'total': 1.0}
    tool3, _ = quiet(n_guesses=3, score_algos=['mul_aug_prob'])
    assert tool3.process_result(res, 't')['solved'] is True


def test_ties_broken_by_list_order():
    tool, _ = quiet(score_algos=['mul_aug_prob'])
    res = [cand([1.0], [2, 2], tag='x'), cand([1.0], [1, 3], True, 'y'), cand([1.0], [4, 0], tag='z')]
    assert tool.process_result(res, 't')['ranks']['mul_aug_prob'] == 1
    assert tags(selection.order_candidates(res)) == ['x', 'y', 'z']  # stable: equal scores keep their order
    res = [cand([1.0], [1, 3], True, 'y'), cand([1.0], [2, 2], tag='x')]
    assert tool.process_result(res, 't')['ranks']['mul_aug_prob'] == 0


def test_multi_test_weighting():
    tool, lines = quiet(score_algos=['mul_aug_prob'])
    tool.process_result([cand([1.0], [1], True)], 'a_0', 0.5)       # solved
    tool.process_result([cand([1.0], [1], False)], 'a_1', 0.5)      # not found
    tool.process_result([cand([1.0], [5], False), cand([1.0], [9], True)], 'b_0', 1.0)  # rank 1, solved
    s = tool.summary()
    assert s['mul_aug_prob'] == pytest.approx(1.5 / 2) and s['correct_found'] == pytest.approx(1.5 / 2)
    assert s['count'] == 2.0 and len(tool.records) == 3
    assert tool.records[0]['value'] == 0.5 and tool.records[1]['found'] is False
    assert tool.records[1]['ranks'] == {'mul_aug_prob': None}
    assert lines == ["* task 'a_0': 1 candidates, correct solution FOUND, @1",
                     "* task 'a_1': 1 candidates, correct solution not found",
                     "* task 'b_0': 2 candidates, correct solution FOUND, @2"]
    tool.print_summary()
    assert lines[3:] == ['mul_aug_prob   75.00% (1.5/2)  <- selection', 'correct_found  75.00% (1.5/2)']


def test_never_generated_excluded_and_kept_last():
    # 'g' was never generated (only appended as a guess for scoring): best aug score, correct, but excluded
    res = [cand([2.0], [5], False, 'a'), cand([], [0.1], True, 'g'), cand([1.0], [4], False, 'b')]
    tool, lines = quiet()
    rec = tool.process_result(res, 't')
    assert tags(selection.order_candidates(res)) == ['b', 'a', 'g']
    assert rec['found'] is False and rec['n_candidates'] == 2 and rec['n_not_generated'] == 1
    assert all(r is None for r in rec['ranks'].values())
    assert lines[0] == "* task 't': 2 candidates, correct solution not found, 1 never generated (excluded)"
    res = [cand([2.0], [5], False, 'a'), cand([], [0.1], True, 'g'), cand([1.0], [4], False, 'b')]
    tool, _ = quiet(use_not_found=True)
    rec = tool.process_result(res, 't')
    assert tags(selection.order_candidates(res, use_not_found=True)) == ['g', 'b', 'a']
    assert rec['ranks']['mul_aug_prob'] == 0
    assert rec['ranks']['max_gen_prob'] == 2  # inf for the never-generated candidate


def test_unknown_solutions_only_sort_and_count():
    res = [cand([1.0], [3], tag='a'), cand([1.0], [1], tag='b')]
    tool, lines = quiet(sorting_algo='mul_all_prob')
    rec = tool.process_result(res, 'u', 0.5)
    assert tags(selection.order_candidates(res, 'mul_all_prob')) == ['b', 'a']
    assert rec['found'] is None and rec['solved'] is None and set(rec['ranks'].values()) == {None}
    assert lines == ["* task 'u': 2 candidates, correct solution unknown"]
    tool.print_summary()  # no known solution: no accuracy table
    assert len(lines) == 1
    s = tool.summary()
    assert s['total'] == 0.5 and s['count'] == 0 and math.isnan(s['mul_aug_prob'])


def test_empty_result_with_known_solution_counts_as_failure():
    tool, _ = quiet()
    rec = tool.process_result([], 'e', solution_known=True)
    assert rec['found'] is False and tool.summary()['count'] == 1.0
    assert tool.process_result([], 'e2')['found'] is None


def test_numpy_outputs_and_custom_algos():
    res = [{'output': np.zeros((2, 2), int), 'correct': True, 'scores_inf': {'a': 1.0}, 'scores_aug': {'a': 1.0}}]
    tool, _ = quiet(score_algos={'mine': lambda c: 0.0}, sorting_algo='mul_aug_prob')
    assert tool.process_result(res, 'n')['ranks'] == {'mine': 0}


def test_bad_arguments():
    with pytest.raises(AssertionError, match='unknown score'):
        EvalTool(score_algos=['nope'])
    with pytest.raises(AssertionError, match='sorting_algo'):
        EvalTool(sorting_algo='nope')
    tool, _ = quiet()
    with pytest.raises(AssertionError, match='list'):
        tool.process_result((cand([1], [1]),), 't')
    with pytest.raises(AssertionError, match='value'):
        tool.process_result([cand([1], [1])], 't', value=0)


def test_eval_tool_never_changes_its_input():
    res = [cand([0.1], [4, 5], tag='a'), cand([], [0.5], True, 'g'), cand([3.0], [1, 2], False, 'c')]
    before = copy.deepcopy(res)
    for use_not_found in (False, True):
        tool, _ = quiet(use_not_found=use_not_found)
        tool.process_result(res, 't', solution_known=True)
        assert res == before and tags(res) == ['a', 'g', 'c']


def test_order_attempts_is_a_new_dict_in_submission_order():
    results = {'t': [[cand([1.0], [3], tag='a'), cand([1.0], [1], tag='b')], []]}
    before = copy.deepcopy(results)
    ordered = selection.order_attempts(results, 'mul_aug_prob')
    assert results == before and [tags(x) for x in ordered['t']] == [['b', 'a'], []]
    with pytest.raises(AssertionError, match='unknown score'):
        selection.order_attempts(results, 'nope')
