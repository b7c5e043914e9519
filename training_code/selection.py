"""Candidate selection: score functions over per-view NLLs, `order_attempts` that puts the candidates in
submission order, and the `EvalTool` that ranks and counts (and never reorders its input).

A candidate record (one per distinct output of one test input) is a dict
    {'output': grid, 'correct': True/False/None,
     'scores_inf': {view_key: NLL}, 'scores_aug': {view_key: NLL}}
where NLL = -log p in nats. `scores_inf` holds the generation NLL of every augmented view that produced the
candidate (empty if it was never generated), `scores_aug` its reply NLL under each scoring view.
Every score below is LOWER IS BETTER.

Empty inputs: a score that needs a value that does not exist (min/max of an empty list, a sum over scoring
views when there are none, `mul_all_prob` with no value at all) is +inf, so such a candidate ranks last.
"""
import math
from collections.abc import Mapping

import numpy as np

_OFFSET = 3.0  # da-fr 2024: each term is (NLL - 3), i.e. a view with p > e^-3 ~ 0.05 improves the score


def _values(scores, field):
    """The NLLs of one score field as a float array (a dict's values, or a plain sequence)."""
    if scores is None:
        return np.zeros(0)
    if isinstance(scores, Mapping):
        scores = list(scores.values())
    elif isinstance(scores, (str, bytes)):
        raise TypeError(f"'{field}' must be a dict view_key -> NLL, got a string")
    arr = np.asarray(scores, dtype=np.float64)
    assert arr.ndim == 1, f"'{field}' must hold one NLL per view, got shape {arr.shape}"
    return arr


def _inf(cand):
    return _values(_check(cand).get('scores_inf'), 'scores_inf')


def _aug(cand):
    return _values(_check(cand).get('scores_aug'), 'scores_aug')


def _check(cand):
    if not isinstance(cand, Mapping):
        raise TypeError(f"a candidate must be a dict with 'scores_inf'/'scores_aug', got {type(cand).__name__}")
    return cand


def max_gen_prob(cand):
    """Best generation probability over the views that generated the candidate: min(inf)."""
    inf = _inf(cand)
    return float(inf.min()) if inf.size else math.inf


def max_aug_prob(cand):
    """Best probability over the scoring views: min(aug)."""
    aug = _aug(cand)
    return float(aug.min()) if aug.size else math.inf


def min_aug_prob(cand):
    """Worst scoring view: max(aug)."""
    aug = _aug(cand)
    return float(aug.max()) if aug.size else math.inf


def sum_aug_prob(cand):
    """Sum of the scoring views' probabilities, negated: -sum(exp(-aug))."""
    aug = _aug(cand)
    return -float(np.exp(-aug).sum()) if aug.size else math.inf


def mul_aug_prob(cand):
    """Product of the scoring views' probabilities (product of experts), as NLL: sum(aug)."""
    # Paper version. The 2024 code summed (aug - 3); the offset shifts every candidate of a task by the same
    # amount because all candidates are scored under the same number of views, so the ranking is identical.
    aug = _aug(cand)
    return float(aug.sum()) if aug.size else math.inf


def mul_all_prob(cand):
    """Product over scoring views and generating views (2024 default): sum(aug - 3) + sum(inf - 3)."""
    # Unlike mul_aug_prob the offset matters here: the number of generating views differs per candidate,
    # and every one with p > e^-3 makes the score better. A never-generated candidate has an empty inf sum.
    aug, inf = _aug(cand), _inf(cand)
    if not aug.size and not inf.size:
        return math.inf
    return float((aug - _OFFSET).sum() + (inf - _OFFSET).sum())


score_algos = {
    'max_gen_prob': max_gen_prob,
    'max_aug_prob': max_aug_prob,
    'min_aug_prob': min_aug_prob,
    'sum_aug_prob': sum_aug_prob,
    'mul_aug_prob': mul_aug_prob,
    'mul_all_prob': mul_all_prob,
}
_ALL_ALGOS = score_algos  # EvalTool's parameter of the same name shadows the module constant
# The scores that still rank candidates without scoring views (--n-score-views 0): by generation probability.
SCORES_WITHOUT_SCORING_VIEWS = ('max_gen_prob', 'mul_all_prob')


def stable_ranks(scores):
    """Rank of every entry (0 = best, lowest score), ties broken by position: a double stable argsort."""
    order = np.argsort(np.asarray(scores, dtype=np.float64), kind='stable')
    return np.argsort(order, kind='stable')


def _resolve_algos(algos):
    """Name -> function dict from None (all), a dict, or a sequence of names of `score_algos`."""
    if algos is None:
        return dict(_ALL_ALGOS)
    if isinstance(algos, Mapping):
        assert all(callable(f) for f in algos.values()), 'score_algos values must be callables'
        return dict(algos)
    if isinstance(algos, str):
        algos = [algos]
    unknown = [a for a in algos if a not in _ALL_ALGOS]
    assert not unknown, f'unknown score algorithm(s) {unknown}; known: {list(_ALL_ALGOS)}'
    return {a: _ALL_ALGOS[a] for a in algos}


def _split(cands, use_not_found=False):
    """Candidates to rank, and those excluded because no view ever generated them (kept, ordered last)."""
    for c in cands:
        _check(c)
    if use_not_found:
        return list(cands), []
    return [c for c in cands if _inf(c).size], [c for c in cands if not _inf(c).size]


def _resolve_score(score):
    if callable(score):
        return score
    assert score in _ALL_ALGOS, f'unknown score algorithm {score!r}; known: {list(_ALL_ALGOS)}'
    return _ALL_ALGOS[score]


def order_candidates(cands, score='mul_aug_prob', use_not_found=False):
    """A new list of one test input's candidates, best first by `score` (a name or a function), ties kept in
    list order; never-generated candidates go last unless use_not_found. The first two are the attempts."""
    fn = _resolve_score(score)
    ranked, skipped = _split(cands, use_not_found)
    return [part[i] for part in (ranked, skipped)
            for i in np.argsort(np.asarray([fn(c) for c in part], dtype=np.float64), kind='stable')]


def order_attempts(results, score='mul_aug_prob', use_not_found=False):
    """{task id: [candidates per test input, best first]}: `results` in submission order (`order_candidates`),
    as ArcDataset.get_submission, the results table and the report read it; `results` is left as it is."""
    return {base: [order_candidates(cands, score, use_not_found) for cands in tests] for base, tests in results.items()}


class EvalTool:
    """Ranks the candidates of each test input under several scores and keeps the accuracy of each.

    It only reads the candidate lists; the submission order comes from `order_attempts(results, sorting_algo)`,
    which ranks by the same score with the same tie-breaking, so rank 0 and 1 here are attempts 1 and 2 there.
    """

    def __init__(self, n_guesses=2, score_algos=None, sorting_algo='mul_aug_prob', use_not_found=False,
                 print_func=print):
        assert isinstance(n_guesses, int) and n_guesses >= 1, f'n_guesses must be a positive int, got {n_guesses!r}'
        self.n_guesses = n_guesses
        self.algos = _resolve_algos(score_algos)
        self.sort_fn = self.algos.get(sorting_algo) or _ALL_ALGOS.get(sorting_algo)
        assert self.sort_fn is not None, f'unknown sorting_algo {sorting_algo!r}; known: {list(self.algos)}'
        self.sorting_algo = sorting_algo
        self.use_not_found = use_not_found
        self.print_func = print_func or (lambda *args, **kw: None)
        self.records = []
        self.acc = {a: 0.0 for a in self.algos}
        self.found = 0.0
        self.count = 0.0  # value of test inputs whose solution is known: the accuracy denominator
        self.total = 0.0  # value of every processed test input

    def process_result(self, res, name, value=1.0, solution_known=None):
        """Score, rank and count one test input's candidates; `res` is left as it is (see `order_candidates`)."""
        assert isinstance(res, list), f"res must be a list of candidate records, got {type(res).__name__}"
        assert value > 0 and math.isfinite(value), f'value must be a positive number, got {value!r}'
        ranked, skipped = _split(res, self.use_not_found)
        scores = {a: np.array([f(c) for c in ranked], dtype=np.float64) for a, f in self.algos.items()}
        known = self._is_known(res, solution_known)
        correct = [i for i, c in enumerate(ranked) if c.get('correct') is True]
        ranks = {a: self._rank(s, correct) for a, s in scores.items()}
        record = self._count(name, value, known, bool(correct), ranks, len(ranked), len(skipped))
        self._report(record)
        return record

    @staticmethod
    def _is_known(res, solution_known):
        # 'correct' is None on every candidate when the solution is unknown; an empty candidate list carries no
        # such information, so the caller should pass solution_known for it (else it counts as unknown).
        if solution_known is not None:
            return bool(solution_known)
        return any(c.get('correct') is not None for c in res)

    def _rank(self, scores, correct):
        if not correct:
            return None
        return int(stable_ranks(scores)[correct].min())

    def _count(self, name, value, known, found, ranks, n_ranked, n_skipped):
        self.total += value
        if known:
            self.count += value
            self.found += value * found
            for a, r in ranks.items():
                self.acc[a] += value * (r is not None and r < self.n_guesses)
        solved = None
        if known:
            solved = ranks.get(self.sorting_algo) is not None and ranks[self.sorting_algo] < self.n_guesses
        record = dict(name=name, value=value, n_candidates=n_ranked, n_not_generated=n_skipped,
                      found=found if known else None, ranks=ranks if known else {a: None for a in ranks},
                      solved=solved, n_guesses=self.n_guesses, sorting_algo=self.sorting_algo)
        self.records.append(record)
        return record

    def _report(self, rec):
        """One line per test input (the per-method accuracies wait for `print_summary`, once at the end)."""
        state = {True: 'FOUND', False: 'not found', None: 'unknown'}[rec['found']]
        extra = f", {rec['n_not_generated']} never generated (excluded)" if rec['n_not_generated'] else ''
        rank = rec['ranks'].get(self.sorting_algo)
        at = f", @{rank + 1}" if rank is not None else ''  # 1-based: @1 is the first attempt
        self.print_func(f"* task '{rec['name']}': {rec['n_candidates']} candidates, correct solution {state}{at}{extra}")

    def print_summary(self):
        """The accuracy of every selection method over the test inputs with a known solution, one line each."""
        if not self.count:
            return
        width = max(len(a) for a in [*self.algos, 'correct_found'])
        for a, acc in self.acc.items():
            mark = '  <- selection' if a == self.sorting_algo else ''
            self.print_func(f"{a:<{width}} {self._pct(acc)}{mark}")
        self.print_func(f"{'correct_found':<{width}} {self._pct(self.found)}")

    def _pct(self, acc):
        return f"{100 * acc / self.count:6.2f}% ({acc:g}/{self.count:g})"

    def summary(self):
        """Accuracy fraction per algorithm and 'correct_found', with 'count' (known value) and 'total' (all)."""
        def frac(x):
            return x / self.count if self.count else math.nan
        out = {a: frac(acc) for a, acc in self.acc.items()}
        out.update(correct_found=frac(self.found), count=self.count, total=self.total)
        return out
