"""ARC data: loading, validation, augmentation keys, text format, decoding and submissions.

Only numpy and the standard library are imported here, so everything in this module is cheap to test.
"""
import bz2
import glob
import hashlib
import json
import os
import re
import warnings
from collections import OrderedDict

import numpy as np

PREPROMPT = 'ABCDEFGHJKLMNPQRSTUVWXYZabcdefghjklmnpqrstuvwxyz'  # the alphabet without I O i o
FMT_OPTS = dict(preprompt=PREPROMPT, query_beg='I', reply_beg='\n+/-=O', reply_end='\n</s>', lines_sep='\n')
KAGGLE_FAKE_TEST_MD5 = 'a6b7dac3cab03abf2eb333e16610d6dc'  # Kaggle's public placeholder test file
FALLBACK_GRID = [[0]]


NO_TASK_TOKEN = 'nt'  # key segment: format with the generic task token instead of the task's own
GENERIC_TASK = '?'  # the generic task token's name: '<task:?>', for tasks without a token of their own
DRAW_SEP = '~'  # '<task>~<draw>': one of several samples generated for a task (re-arc); all share the task's token


class ArcDataError(ValueError):
    """Malformed ARC input; the message names the file, the task and the problem."""


class TooLongError(ValueError):
    """A sample that does not fit the token limit even with a single demonstration."""


# ----------------------------------------------------------------------------------------------------
# validation

def _grid_problem(grid):
    """Why `grid` is not a valid ARC grid (None if it is one)."""
    if not isinstance(grid, (list, tuple)) or not grid or not all(isinstance(r, (list, tuple)) for r in grid):
        return 'grid is not a non-empty list of rows'
    width = len(grid[0])
    if any(len(r) != width for r in grid):
        return 'non-rectangular grid'
    if not (1 <= len(grid) <= 30 and 1 <= width <= 30):
        return f'grid size {len(grid)}x{width} outside 1..30'
    for row in grid:
        for c in row:
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c <= 9:
                return f'colour {c!r} outside 0-9'
    return None


def validate_task(task, task_id, source='<memory>', n_solutions=None):
    """Raise ArcDataError naming `source` and `task_id` if the Kaggle-format task is malformed."""
    def fail(problem):
        raise ArcDataError(f'{source}: task {task_id}: {problem}')
    if not isinstance(task, dict):
        fail('task is not a JSON object')
    for part in ('train', 'test'):
        if not isinstance(task.get(part), list):
            fail(f"missing '{part}' list")
    if not task['train']:
        fail("'train' has no examples")
    for part, fields in (('train', ('input', 'output')), ('test', ('input',))):
        for i, pair in enumerate(task[part]):
            if not isinstance(pair, dict):
                fail(f'{part}[{i}] is not an object with an input grid (it is {json.dumps(pair)[:40]})')
            for field in fields + (('output',) if part == 'test' and 'output' in pair else ()):
                if field not in pair:
                    fail(f"{part}[{i}] has no '{field}'")
                problem = _grid_problem(pair[field])
                if problem:
                    fail(f'{part}[{i}].{field}: {problem}')
    if n_solutions is not None and n_solutions != len(task['test']):
        fail(f"{n_solutions} solutions for {len(task['test'])} test inputs")


TASK_ID = re.compile(r'[A-Za-z0-9][A-Za-z0-9-]{0,99}')  # Kaggle's ids are 8 hex digits


def check_task_id(task_id, source='<memory>'):
    """Raise ArcDataError unless `task_id` can be the <base> of a sample key (see ArcDataset): '_' and '.'
    separate a key's parts, and ids also name files of the report."""
    if not TASK_ID.fullmatch(task_id):
        raise ArcDataError(f"{source}: task {task_id!r}: unusable task id: ids may hold only letters, digits and "
                           f"'-' (at most 100; Kaggle's are 8 hex digits), since '_' and '.' separate the parts "
                           f"of a sample key")


def _checked(task, task_id, source, skip_bad, need_outputs=False, kaggle=False):
    """True for a valid task; a bad one raises, or with skip_bad warns and gives False.

    kaggle: a task of a challenges file to solve: its id must suit the key grammar and it needs a test input."""
    try:
        if kaggle:
            check_task_id(task_id, source)
        validate_task(task, task_id, source)
        if need_outputs and not all('output' in t for t in task['test']):
            raise ArcDataError(f'{source}: task {task_id}: test outputs missing')
        if kaggle and not task['test']:
            raise ArcDataError(f"{source}: task {task_id}: 'test' has no inputs (nothing to solve)")
    except ArcDataError as e:
        if not skip_bad:
            raise
        warnings.warn(f'skipping bad task: {e}')
        return False
    return True


def _add_task(challenge, solutions, task_id, task):
    """Split a Kaggle-format task into challenge (test inputs only) and solutions (when all are given)."""
    challenge[task_id] = {'train': task['train'], 'test': [{'input': t['input']} for t in task['test']]}
    if task['test'] and all('output' in t for t in task['test']):
        solutions[task_id] = [t['output'] for t in task['test']]


def _read_json(path, unique_keys=True):
    """The JSON in a file (a UTF-8 byte order mark allowed, .bz2 decompressed); any failure is an ArcDataError,
    a key given twice in one object too (json would keep the last in silence: a task id twice loses a task)."""
    opener = bz2.open if path.endswith('.bz2') else open

    def unique(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise ArcDataError(f'{path}: {key!r} appears twice in one object (a task id or field given twice)')
            seen[key] = value
        return seen

    try:
        with opener(path, 'rt', encoding='utf-8-sig') as f:
            return json.load(f, object_pairs_hook=unique if unique_keys else None)
    except ArcDataError:
        raise
    except json.JSONDecodeError as e:
        raise ArcDataError(f'{path}: not valid JSON ({e})') from e
    except UnicodeDecodeError as e:
        raise ArcDataError(f'{path}: not UTF-8 text ({e.reason} at byte {e.start})') from e
    except ValueError as e:  # an integer of thousands of digits (Python's int string limit)
        raise ArcDataError(f'{path}: not usable JSON ({e})') from e
    except RecursionError as e:  # arrays nested thousands deep
        raise ArcDataError(f'{path}: not usable JSON (nested too deep to read)') from e
    except EOFError as e:  # a truncated .bz2
        raise ArcDataError(f'{path}: cannot read it (the file ends early: {e})') from e
    except FileNotFoundError as e:
        raise ArcDataError(f'{path}: no such file') from e
    except OSError as e:  # a folder, no permission, a broken .bz2
        raise ArcDataError(f'{path}: cannot read it ({e.strerror or e})') from e


def _md5_of_file(path):
    with open(path, 'rb') as f:
        return hashlib.md5(f.read()).hexdigest()


# ----------------------------------------------------------------------------------------------------
# keys and grid transforms

def parse_key(key):
    """Split a key into (base id, test index or -1, list of transform segments)."""
    head, *transforms = key.split('.')
    base, sep, num = head.rpartition('_')
    if sep and num.isdigit():
        return base, int(num), transforms
    return head, -1, transforms


def get_base_key(key):
    return parse_key(key)[0]


def get_base_key_and_reply_num(key):
    base, num, _ = parse_key(key)
    return base, num


def base_key_replace_invalid_chars(name):
    """Task names from files may hold '_' or '.', which the key grammar reserves."""
    return name.replace('_', '-').replace('.', '-')


def permute_array(array, perm):
    return np.asarray(perm)[array]


def transform_array(array, transforms, apply_perm=True, invert=False):
    """Apply the key's transforms (tp, rt, perm...) to a grid in key order, or undo them."""
    array = np.asarray(array)
    for t in (reversed(transforms) if invert else transforms):
        if t == 'tp':
            array = array.T
        elif t == 'rt':
            array = np.rot90(array, k=-1 if invert else 1)
        elif t.startswith('perm'):
            if apply_perm:
                perm = np.array([int(d) for d in t[4:]])
                array = permute_array(array, np.argsort(perm) if invert else perm)
        elif not t.startswith('ex') and t != NO_TASK_TOKEN:
            raise ValueError(f'unknown transform {t!r}')
    return np.ascontiguousarray(array)


def task_token_text(task_id):
    """The token naming a task at the start of its texts ('<task:ID>'); task_id None: the generic one. The draws
    of a generated task ('<task>~<draw>') share one token: they are samples of the same rule."""
    return f'<task:{GENERIC_TASK if task_id is None else task_id.split(DRAW_SEP)[0]}>'


def example_order(transforms, n_examples):
    """Indices of the demonstration examples a key selects (last `.ex` segment wins)."""
    order = list(range(n_examples))
    for t in transforms:
        if t.startswith('ex'):
            order = [int(i) for i in t[2:].split('-')] if len(t) > 2 else []
    return order


def rand_perm(rng, keep_zero=False):
    """A random colour permutation as a 10-digit string; keep_zero fixes colour 0 (the background)."""
    if keep_zero:
        return '0' + ''.join(str(c) for c in rng.permutation(np.arange(1, 10)))
    return ''.join(str(c) for c in rng.permutation(10))


def stable_seed(*parts):
    """A seed from strings that is the same on every machine and process (Python's hash() is salted)."""
    digest = hashlib.md5('|'.join(str(p) for p in parts).encode()).hexdigest()
    return int(digest[:8], 16)


# ----------------------------------------------------------------------------------------------------
# text format

def text_format(eos_token, **overrides):
    """The seed's text format with replies ended by the model's own end-of-sequence token: the one format that
    training texts and evaluation prompts share. FMT_OPTS's literal '</s>' is right only for tokenizers whose
    eos is '</s>' (ArcMini's, Mistral's); a shrunk tokenizer whose eos is another token ('<|im_end|>',
    '<|eot_id|>') splits '</s>' into unknown characters, and the replies would never end."""
    if not eos_token:
        raise ValueError('text_format: the tokenizer has no eos token')
    return dict(FMT_OPTS, reply_end='\n' + eos_token, **overrides)


def fmt_array(array, lines_sep):
    """A grid as text: one digit per cell, rows joined by lines_sep."""
    array = np.asarray(array)
    if (array.ndim == 2 and array.size and array.dtype.kind in 'iu' and len(lines_sep) == 1 and ord(lines_sep) < 128
            and array.min() >= 0 and array.max() <= 9):  # the usual case, as bytes (training formats ~1M cells/s)
        chars = np.empty((array.shape[0], array.shape[1] + 1), dtype=np.uint8)
        chars[:, :-1], chars[:, -1] = array + ord('0'), ord(lines_sep)
        return chars.tobytes()[:-1].decode('ascii')
    return lines_sep.join(''.join(str(int(c)) for c in row) for row in array)


def count_tokens(text):
    """Tokens of the one-token-per-character format: a special token written as '<...>' counts once."""
    return len(re.sub(r'<[^<>\s]+>', '#', text))


def max_new_tokens(reply_end='\n</s>', lines_sep='\n', max_size=30, safety_margin=1):
    """Token budget of the largest reply: 30x30 digits, row separators and reply_end (932 by default)."""
    return count_tokens(fmt_array(np.zeros((max_size, max_size), int), lines_sep) + reply_end) + safety_margin


def decode_grid(text, lines_sep='\n'):
    """Parse rows of digits; returns an int array, or None if not a rectangular 1..30 grid."""
    rows = [[int(c) for c in line if c.isdigit()] for line in text.split(lines_sep)]
    rows = [r for r in rows if r]
    if not rows or any(len(r) != len(rows[0]) for r in rows):
        return None
    if not (1 <= len(rows) <= 30 and 1 <= len(rows[0]) <= 30):
        return None
    return np.array(rows, dtype=int)


class ArcDataset:
    """A set of ARC tasks plus an ordered list of keys naming the samples to draw from them.

    Data: `challenge` {task_id: {'train': [{'input', 'output'}], 'test': [{'input'}]}} (Kaggle format) and
    `solutions` {task_id: [output grid per test input]}.

    Key grammar (the single description; every formatting, augmentation and decoding step reads it):

        <base>[_<test>][.tp][.rt...][.perm<10 digits>][.ex<i-j-k>]

    - `<base>`: the task id (letters, digits and '-': `check_task_id`); `_<test>`: index of the test input that is the query. A key
      without `_<test>` has no query: all its demonstrations are training text (TTT and pretraining mixes).
    - `tp`: transpose; `rt`: one np.rot90 (90 degrees counter-clockwise), may repeat.
    - `perm<d0..d9>`: colour c becomes digit d_c.
    - `ex<i-j-k>`: the demonstrations shown, in this order (indices into `train`).
    Grid transforms apply in the order written; decoding undoes them in reverse.
    Example: `00576224_0.tp.rt.rt.perm3012456789.ex2-0-1`.
    """

    def __init__(self, challenge, solutions=None, keys=None, is_fake=False, is_orig=False):
        if keys is None:
            keys = sorted(f'{k}_{i}' for k, t in challenge.items() for i in range(len(t['test']))) or []
            keys += sorted(k for k, t in challenge.items() if not t['test'])
        self.keys = list(keys)
        bases = set(get_base_key(k) for k in self.keys)
        self.challenge = {k: v for k, v in challenge.items() if k in bases}
        self.solutions = {k: v for k, v in (solutions or {}).items() if k in bases}
        missing = bases - set(self.challenge)
        if missing:
            raise KeyError(f'keys refer to unknown tasks: {sorted(missing)[:5]}')
        self.is_fake = is_fake
        self.is_orig = is_orig

    def __len__(self):
        return len(self.keys)

    def _new(self, challenge=None, solutions=None, keys=None, is_orig=None):
        return ArcDataset(self.challenge if challenge is None else challenge,
                          self.solutions if solutions is None else solutions,
                          keys, is_fake=self.is_fake, is_orig=self.is_orig if is_orig is None else is_orig)

    # ---- loading -----------------------------------------------------------------------------------
    @classmethod
    def load_from_json(cls, challenges_file, skip_bad=False):
        """Kaggle-format challenges; test outputs found inside the file become solutions."""
        data = _read_json(challenges_file)
        if not isinstance(data, dict):
            raise ArcDataError(f'{challenges_file}: expected an object of task_id -> task')
        challenge, solutions = {}, {}
        for task_id, task in data.items():
            if _checked(task, task_id, challenges_file, skip_bad, kaggle=True):
                _add_task(challenge, solutions, task_id, task)
        is_fake = not challenges_file.endswith('.bz2') and _md5_of_file(challenges_file) == KAGGLE_FAKE_TEST_MD5
        return cls(challenge, solutions, is_fake=is_fake, is_orig=True)

    def load_solutions(self, solutions_file, skip_bad=False):
        """A copy of this dataset with the solutions from a Kaggle-format solutions file."""
        data = _read_json(solutions_file)
        if not isinstance(data, dict):
            raise ArcDataError(f'{solutions_file}: expected an object of task_id -> list of output grids')
        solutions = dict(self.solutions)
        for task_id, task in self.challenge.items():
            try:
                sols = data.get(task_id)
                if not isinstance(sols, list):
                    raise ArcDataError(f'{solutions_file}: task {task_id}: no solutions')
                if len(sols) != len(task['test']):
                    raise ArcDataError(f"{solutions_file}: task {task_id}: {len(sols)} solutions "
                                       f"for {len(task['test'])} test inputs")
                for i, sol in enumerate(sols):
                    problem = _grid_problem(sol)
                    if problem:
                        raise ArcDataError(f'{solutions_file}: task {task_id}: solution {i}: {problem}')
            except ArcDataError as e:
                if not skip_bad:
                    raise
                warnings.warn(f'skipping solutions: {e}')
                continue
            solutions[task_id] = sols
        return self._new(solutions=solutions, keys=self.keys)

    @classmethod
    def load_from_rearc(cls, path, n, sizes, seed, mix_datasets=None, shuffle=True):
        """n "epochs" of re-arc tasks: each task gets size demonstrations + 1 query drawn without replacement, named
        'rearc-<task id>~<epoch>' (DRAW_SEP: the draws of a task share its task token)."""
        rng = np.random.default_rng(seed)
        with open(os.path.join(path, 'metadata.json')) as f:
            task_ids = sorted(json.load(f))
        pools = {}
        for tid in task_ids:
            examples = _read_json(os.path.join(path, 'tasks', f'{tid}.json'))
            pools[tid] = [examples[i] for i in rng.permutation(len(examples))]
        challenge, solutions, epochs = {}, {}, []
        size_cycle = []
        for epoch in range(n):
            keys = []
            for tid in task_ids:
                if not size_cycle:
                    size_cycle = list(rng.permutation(sizes))
                size = int(size_cycle.pop())
                if len(pools[tid]) < size + 1:
                    raise ArcDataError(f'{path}: task {tid}: not enough re-arc examples at epoch {epoch} '
                                       f'(need {size + 1} more) - generate more re-arc examples or reduce epochs.')
                pairs = [pools[tid].pop() for _ in range(size + 1)]
                name = f'rearc-{tid}{DRAW_SEP}{epoch:02x}'
                challenge[name] = {'train': pairs[:-1], 'test': [{'input': pairs[-1]['input']}]}
                solutions[name] = [pairs[-1]['output']]
                keys.append(f'{name}_0')
            epochs.append(keys)
        for mix_name, ds in (mix_datasets or {}).items():
            chunks = np.array_split(np.array(ds.keys, dtype=object), n)
            for epoch, chunk in enumerate(chunks):
                for key in chunk:
                    base = get_base_key(key)
                    new_base = f'{mix_name}-{base}'
                    challenge[new_base] = ds.challenge[base]
                    if base in ds.solutions:
                        solutions[new_base] = ds.solutions[base]
                    epochs[epoch].append(new_base + key[len(base):])
        if shuffle:
            epochs = [[e[i] for i in rng.permutation(len(e))] for e in epochs]
        return cls(challenge, solutions, keys=[k for e in epochs for k in e])

    @classmethod
    def load_from_neoneye(cls, path, skip_bad=False):
        """Tasks from neoneye's arc-dataset-collection layout: path/data/<group>/<name>.json."""
        files = sorted(glob.glob(os.path.join(path, 'data', '*', '*.json')))
        if not files:
            raise ArcDataError(f'{path}: no files matching data/*/*.json')
        latest = {}  # drop superseded versions: keep the highest _vN of each name
        for f in files:
            stem = os.path.splitext(f)[0]
            m = re.fullmatch(r'(.*)_v(\d+)', stem)
            name, version = (m.group(1), int(m.group(2))) if m else (stem, 0)
            if name not in latest or version > latest[name][0]:
                latest[name] = (version, f)
        challenge, solutions = {}, {}
        for _, f in sorted(latest.values(), key=lambda v: v[1]):
            task = _read_json(f)
            task_id = base_key_replace_invalid_chars(os.path.splitext(os.path.basename(f))[0])
            if _checked(task, task_id, f, skip_bad, need_outputs=True):
                _add_task(challenge, solutions, task_id, task)
        return cls(challenge, solutions, is_orig=True)

    # ---- dataset transforms ------------------------------------------------------------------------
    def change_keys(self, keys):
        return self._new(keys=keys)

    def first_tasks(self, n):
        """The first n tasks in id order, with all their keys and solutions (a CPU run, a smoke run, a check)."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f'first_tasks: n must be a positive int, got {n!r}')
        return self.only_tasks(sorted(self.challenge)[:n])

    def only_tasks(self, bases):
        """The tasks named in `bases` (those this dataset has), with all their keys and solutions."""
        bases = set(bases)
        return self._new(keys=[k for k in self.keys if get_base_key(k) in bases])

    def split(self, n, split_seed, **fmt_opts):
        """Split the tasks into n datasets, randomly (int seed) or by formatted length ('len')."""
        bases = list(OrderedDict.fromkeys(get_base_key(k) for k in self.keys))
        if split_seed == 'len':
            lengths = {b: count_tokens(self.fmt_task(b, **fmt_opts)['text']) for b in bases}
            bases = sorted(bases, key=lambda b: lengths[b])
            parts = [bases[i::n] for i in range(n)]
        else:
            order = np.random.default_rng(split_seed).permutation(len(bases))
            parts = [[bases[j] for j in order[i::n]] for i in range(n)]
        return [self._new(keys=[k for k in self.keys if get_base_key(k) in set(p)]) for p in parts]

    def repeat(self, n, seed=None):
        """The key list n times; with a seed each repetition is a fresh permutation."""
        if seed is None:
            return self._new(keys=self.keys * n)
        rng = np.random.default_rng(seed)
        return self._new(keys=[self.keys[i] for _ in range(n) for i in rng.permutation(len(self.keys))])

    def remove_test_data(self):
        """Only demonstrations remain; keys become bare task ids (used for TTT)."""
        challenge = {k: {'train': v['train'], 'test': []} for k, v in self.challenge.items()}
        keys = list(OrderedDict.fromkeys(get_base_key(k) for k in self.keys))
        return ArcDataset(challenge, {}, keys, is_fake=self.is_fake)

    def move_test_to_train(self):
        """Append the test pairs (with their solutions) to the demonstrations."""
        challenge = {}
        for k, v in self.challenge.items():
            sols = self.solutions.get(k)
            if v['test'] and sols is None:
                raise ValueError(f'task {k}: move_test_to_train needs its solutions')
            tests = [{'input': t['input'], 'output': s} for t, s in zip(v['test'], sols or [])]
            challenge[k] = {'train': v['train'] + tests, 'test': []}
        keys = list(OrderedDict.fromkeys(get_base_key(k) for k in self.keys))
        return ArcDataset(challenge, {}, keys, is_fake=self.is_fake)

    def grouped_keys(self):
        """OrderedDict: base id -> list indexed by test number -> list of (augmented) keys."""
        grouped = OrderedDict()
        for key in self.keys:
            base, num, _ = parse_key(key)
            if num < 0:
                continue
            groups = grouped.setdefault(base, [[] for _ in self.challenge[base]['test']])
            groups[num].append(key)
        return grouped

    # ---- augmentation ------------------------------------------------------------------------------
    def augment_keys(self, keys, rng, tp=False, rt=False, n=1, perm=False, keep_background=False, shfl_ex=False,
                     no_task_token=0.0):
        """Append augmentation segments to keys: D8 ('all' or one random element), n copies, colours, the generic
        task token with probability no_task_token, example order."""
        out = []
        for key in keys:
            tps = ['', '.tp'] if tp == 'all' else ['.tp' if tp and rng.random() < 0.5 else '']
            rts = range(4) if rt == 'all' else [int(rng.integers(4)) if rt else 0]
            out += [key + t + '.rt' * r for r in rts for t in tps]
        out = out * n
        if perm:
            out = [f'{k}.perm{rand_perm(rng, keep_background)}' for k in out]
        if no_task_token:  # before '.ex': get_task rewrites the example segment, which must come last
            out = [k + f'.{NO_TASK_TOKEN}' if rng.random() < no_task_token else k for k in out]
        if shfl_ex:
            out = [k + '.ex' + '-'.join(str(i) for i in rng.permutation(self._n_examples(k))) for k in out]
        return out

    def augment(self, seed, **kw):
        """A dataset whose keys are augmented, each key independently, from one explicit seed."""
        rng = np.random.default_rng(seed)
        return self._new(keys=[a for k in self.keys for a in self.augment_keys([k], rng, **kw)])

    def _n_examples(self, key):
        base, _, transforms = parse_key(key)
        return len(example_order(transforms, len(self.challenge[base]['train'])))

    # ---- formatting --------------------------------------------------------------------------------
    def get_pairs(self, key):
        """(demonstration pairs, query pair or None) of a key, grids transformed, example order applied."""
        base, num, transforms = parse_key(key)
        task = self.challenge[base]
        tf = lambda g: transform_array(g, transforms)  # noqa: E731
        demos = [task['train'][i] for i in example_order(transforms, len(task['train']))]
        demos = [{'input': tf(p['input']), 'output': tf(p['output'])} for p in demos]
        if num < 0:
            return demos, None
        sols = self.solutions.get(base)
        out = sols[num] if sols is not None else None
        return demos, {'input': tf(task['test'][num]['input']), 'output': None if out is None else tf(out)}

    def fmt_task(self, key, preprompt='', query_beg='I', reply_beg='\n+/-=O', reply_end='\n</s>', lines_sep='\n',
                 reply=True, task_token=False, **_unused):
        """Format a key into the fields train, query, input, reply and text.

        `reply=True` uses the stored solution (if any); a grid (in the original frame) formats a candidate.
        `task_token=True` starts the text with the task's own token (task_token_text; the generic one under a
        key's `.nt` segment).
        """
        base, num, transforms = parse_key(key)
        demos, query = self.get_pairs(key)
        grid = lambda g: fmt_array(g, lines_sep)  # noqa: E731
        if task_token:
            preprompt = task_token_text(None if NO_TASK_TOKEN in transforms else base) + preprompt
        train = preprompt + ''.join(query_beg + grid(p['input']) + reply_beg + grid(p['output']) + reply_end
                                    for p in demos)
        res = {'key': key, 'train': train, 'query': '', 'reply': ''}
        if query is not None:
            res['query'] = query_beg + grid(query['input']) + reply_beg
            out = query['output'] if reply is True else (None if reply is False or reply is None
                                                          else transform_array(reply, transforms))
            if out is not None:
                res['reply'] = grid(out) + reply_end
        res['input'] = res['train'] + res['query']
        res['text'] = res['input'] + res['reply']
        return res

    def fmt_reply(self, key, reply, reply_end='\n</s>', lines_sep='\n', **_unused):
        """fmt_task(key, reply=reply)['reply'] without formatting the rest: a candidate grid under key's view."""
        return fmt_array(transform_array(reply, parse_key(key)[2]), lines_sep) + reply_end

    def get_task(self, key, max_tokens=None, len_name=None, **fmt_opts):
        """Format a key; if field `len_name` exceeds max_tokens, drop the last shown example until it fits."""
        fmt = self.fmt_task(key, **fmt_opts)
        if max_tokens is None or count_tokens(fmt[len_name]) <= max_tokens:
            return key, fmt
        base, num, transforms = parse_key(key)
        order = example_order(transforms, len(self.challenge[base]['train']))
        stem = key if any(t.startswith('ex') for t in transforms) else key + '.ex' + '-'.join(map(str, order))
        prefix = stem[:stem.rindex('.ex')]
        keep = lambda n: f"{prefix}.ex{'-'.join(map(str, order[:n]))}"  # noqa: E731  (the first n shown examples)
        fits = lambda n: count_tokens(self.fmt_task(keep(n), **fmt_opts)[len_name]) <= max_tokens  # noqa: E731
        if not fits(1):
            raise TooLongError(f'task {key}: does not fit in {max_tokens} tokens even with one example')
        lo, hi = 1, len(order) - 1  # the most examples that fit, by bisection (the text grows with each one):
        while lo < hi:              # the seed's drop-the-last-until-it-fits, in log(n) formats instead of n
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return keep(lo), self.fmt_task(keep(lo), **fmt_opts)

    def as_list(self, max_tokens=None, len_name='text', **fmt_opts):
        """Every key formatted (token limit applied), as a list of dicts."""
        return [self.get_task(k, max_tokens, len_name, **fmt_opts)[1] for k in self.keys]

    def texts_within(self, max_tokens, **fmt_opts):
        """(texts of every key that fits max_tokens, examples dropped to fit; number of keys left out because
        they do not fit even with one example), as the seed's training data is made."""
        texts, too_long = [], 0
        for key in self.keys:
            try:
                texts.append(self.get_task(key, max_tokens, 'text', **fmt_opts)[1]['text'])
            except TooLongError:
                too_long += 1
        return texts, too_long

    def convert_with_token_limit(self, max_tokens=None, len_name='text', **fmt_opts):
        """(list of formatted dicts, dataset re-keyed with the examples actually kept)."""
        out = [self.get_task(k, max_tokens, len_name, **fmt_opts) for k in self.keys]
        return [f for _, f in out], self._new(keys=[k for k, _ in out])

    def get_length(self, key, len_name='text', **fmt_opts):
        return count_tokens(self.fmt_task(key, **fmt_opts)[len_name])

    def sorted_by_len(self, reverse=False, **fmt_opts):
        """A copy with keys sorted by formatted length."""
        return self._new(keys=sorted(self.keys, key=lambda k: self.get_length(k, **fmt_opts), reverse=reverse))

    # ---- decoding and submissions ------------------------------------------------------------------
    def decode(self, text, lines_sep='\n', key=None):
        """Parse a reply into a grid in the original frame: (grid, correct, status).

        status: 'ALL_CORRECT', 'bad_content' (right shape), 'bad_xy_size', 'sol_unknown' or 'cant_decode'.
        correct is None when the solution is unknown.
        """
        grid = decode_grid(text, lines_sep)
        if grid is None:
            return None, False, 'cant_decode'
        if key is None:
            return grid, None, 'sol_unknown'
        base, num, transforms = parse_key(key)
        grid = transform_array(grid, transforms, invert=True)
        sols = self.solutions.get(base)
        if sols is None or num < 0:
            return grid, None, 'sol_unknown'
        sol = np.asarray(sols[num])
        if sol.shape != grid.shape:
            return grid, False, 'bad_xy_size'
        return (grid, True, 'ALL_CORRECT') if (sol == grid).all() else (grid, False, 'bad_content')

    def get_submission(self, results=None):
        """Kaggle submission: attempt_1/attempt_2 for every test input of every task (fallback [[0]])."""
        results = results or {}
        sub = {}
        for base, task in self.challenge.items():
            entries = []
            for i in range(len(task['test'])):
                cands = results.get(base, [])
                cands = cands[i] if i < len(cands) else []
                outs = [np.asarray(c['output']).tolist() for c in cands[:2]]
                outs += [FALLBACK_GRID] * (2 - len(outs))
                entries.append({'attempt_1': outs[0], 'attempt_2': outs[1]})
            sub[base] = entries
        return sub

    def validate_submission(self, submission, unsolvable_as_zero=False):
        """Score like Kaggle: per task, the fraction of its test inputs solved by either attempt. A task without
        solutions raises, or with unsolvable_as_zero counts as not solved (--skip-bad: its solutions were bad)."""
        score = 0.0
        for base, task in self.challenge.items():
            sols = self.solutions.get(base)
            if sols is None and unsolvable_as_zero:
                continue
            if sols is None:
                raise ValueError(f'task {base}: no solutions to score against')
            entries = submission.get(base)
            if entries is None or len(entries) != len(task['test']):
                raise ValueError(f'task {base}: submission has no entry for each of its {len(task["test"])} test inputs')
            for entry, sol in zip(entries, sols):
                if any(entry.get(a) == np.asarray(sol).tolist() for a in ('attempt_1', 'attempt_2')):
                    score += 1 / len(task['test'])
        return score


def submission_slots(challenges_file, n_tasks=None):
    """Task id -> number of test inputs, read from the raw challenges file as Kaggle scores it: malformed tasks
    and repeated ids included (a test entry that is not a list counts as one input); the first n_tasks in id
    order when given. What a submission must answer whatever went wrong in the run."""
    data = _read_json(challenges_file, unique_keys=False)
    if not isinstance(data, dict):
        raise ArcDataError(f'{challenges_file}: expected an object of task_id -> task')
    slots = {}
    for task_id, task in data.items():
        test = task.get('test') if isinstance(task, dict) else None
        slots[task_id] = max(1, len(test)) if isinstance(test, list) else 1
    return {k: slots[k] for k in sorted(slots)[:n_tasks]} if n_tasks else slots


def complete_submission(submission, slots):
    """(submission, filled): `submission` (a dict, or None when the run wrote none) made complete and valid for
    `slots` (submission_slots): its valid attempts kept, every missing or invalid one a fallback, tasks not asked
    for dropped; `filled` lists the task ids that got any fallback attempt."""
    submission = submission if isinstance(submission, dict) else {}
    complete, filled = {}, []
    for task_id, n in slots.items():
        entries = submission.get(task_id)
        entries = entries if isinstance(entries, list) and len(entries) == n else [None] * n
        complete[task_id] = []
        for entry in entries:
            entry = entry if isinstance(entry, dict) else {}
            attempts = {a: entry.get(a) if _grid_problem(entry.get(a)) is None else None
                        for a in ('attempt_1', 'attempt_2')}
            if None in attempts.values() and task_id not in filled:
                filled.append(task_id)
            complete[task_id].append({a: g if g is not None else FALLBACK_GRID for a, g in attempts.items()})
    return complete, filled


def check_submission(submission, challenge_ds):
    """Raise ValueError unless the submission holds exactly the tasks of challenge_ds and every test input of
    every task has two valid attempts."""
    extra = sorted(set(submission) - set(challenge_ds.challenge))
    if extra:
        raise ValueError(f'submission: {len(extra)} tasks that were not asked for: {extra[:5]}')
    for base, task in challenge_ds.challenge.items():
        entries = submission.get(base)
        if not isinstance(entries, list) or len(entries) != len(task['test']):
            raise ValueError(f'submission: task {base}: expected {len(task["test"])} entries')
        for i, entry in enumerate(entries):
            for a in ('attempt_1', 'attempt_2'):
                problem = _grid_problem(entry.get(a)) if isinstance(entry, dict) else 'not an object'
                if problem:
                    raise ValueError(f'submission: task {base}: test {i}: {a}: {problem}')


# ----------------------------------------------------------------------------------------------------
# leakage guard

def _pair_hashes(task, solutions=None):
    pairs = list(task['train'])
    pairs += [{'input': t['input'], 'output': s} for t, s in zip(task['test'], solutions or [])]
    return {hashlib.md5(json.dumps([np.asarray(p['input']).tolist(), np.asarray(p['output']).tolist()]).encode())
            .hexdigest() for p in pairs}


def find_overlap(ds_a, ds_b):
    """Tasks of ds_a sharing at least one identical (input, output) pair with a task of ds_b: {a_id: [b_ids]}."""
    index = {}
    for b_id, task in ds_b.challenge.items():
        for h in _pair_hashes(task, ds_b.solutions.get(b_id)):
            index.setdefault(h, set()).add(b_id)
    overlap = {}
    for a_id, task in ds_a.challenge.items():
        hits = set().union(*[index.get(h, set()) for h in _pair_hashes(task, ds_a.solutions.get(a_id))])
        if hits:
            overlap[a_id] = sorted(hits)
    return overlap


def exclude_overlapping(train_ds, eval_ds, name='training data', print_func=print):
    """train_ds without the tasks it shares (by grid content) with eval_ds; says how many were dropped."""
    overlap = find_overlap(train_ds, eval_ds)
    keys = [k for k in train_ds.keys if get_base_key(k) not in overlap]
    print_func(f'leakage guard: dropped {len(overlap)} of {len(train_ds.challenge)} tasks of {name} '
               f'that share grids with the evaluation tasks')
    return train_ds.change_keys(keys)
