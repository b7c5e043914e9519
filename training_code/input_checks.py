"""Checks of a run's arguments and paths, made before any model loads, so that a user error costs seconds and
reads as one line (the scripts print it and exit with status 2) instead of a traceback minutes into the run.

The ARC files themselves are checked where they are read (arc_loader.ArcDataError names the file and the task).
"""
import argparse
import contextlib
import json
import math
import os
import re
import shlex
import socket
import tempfile

try:
    import fcntl  # POSIX; elsewhere runs are not locked
except ImportError:
    fcntl = None

LOCK_FILE = 'run.lock'
_HUB_ID = re.compile(r'[A-Za-z0-9][\w.-]*/[\w.-]+')  # owner/name on the Hugging Face hub


class InputError(ValueError):
    """A bad argument, path or environment: the message says which and what to do."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (the usage is long; --help shows it), status 2 as argparse's."""

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (--help lists the options)\n')


# ---- argument types (argparse reports their errors as "argument --x: ...", status 2) ---------------------

def _number(kind, text):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not {"an integer" if kind is int else "a number"}') from None
    if kind is float and math.isinf(value):  # a size of inf GB, a learning rate of inf: a traceback or NaN weights
        raise argparse.ArgumentTypeError(f'{text!r} is not a finite number')
    return value


def positive_int(text):
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {value}')
    return value


def nonnegative_int(text):
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be 0 or more, got {value}')
    return value


def int_between(low, high):
    """An argument type for an integer in [low, high]: a size whose absurd values would run for days or fill
    the memory before anything else failed (--n-views 2000000000)."""
    def parse(text):
        value = _number(int, text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f'must be between {low} and {high}, got {value}')
        return value
    parse.__name__ = f'int in [{low}, {high}]'
    return parse


MAX_VIEWS = 4096  # views per test input (generation or scoring): far above any measured setting (64)
MAX_LORA_RANK = 4096  # above any model's width here; --ttt-r 1000000000 asked for 256 GB at once
MAX_TTT_STEPS = 10_000  # per-task TTT steps (default 100): its sample order is held as steps x batch per task
MAX_TTT_COPIES = 1024  # copies of each TTT sample's 8 views (defaults 4 and 48): the texts are all built first
MAX_TTT_BATCH = 1024  # per-task TTT samples of a task per step (default 8)


def steps_or_all(text):
    """A step count, or -1 for "as many as the schedule has"."""
    value = _number(int, text)
    if value < 1 and value != -1:
        raise argparse.ArgumentTypeError(f'must be -1 (all) or at least 1, got {value}')
    return value


def positive_float(text):
    value = _number(float, text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f'must be more than 0, got {value}')
    return value


def nonnegative_float(text):
    value = _number(float, text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f'must be 0 or more, got {value}')
    return value


def probability(text):
    """A probability threshold in (0, 1]."""
    value = _number(float, text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f'must be a probability in (0, 1], got {value}')
    return value


MIN_PROB_FLOOR = 1e-3  # at most 1000 replies a view; under 1e-300 a batch-1 DFS searched one view for ever


def dfs_threshold(text):
    """--min-prob: a probability of at least MIN_PROB_FLOOR. A DFS keeps every reply above it."""
    value = probability(text)
    if value < MIN_PROB_FLOOR:
        raise argparse.ArgumentTypeError(f'must be at least {MIN_PROB_FLOOR} (a DFS keeps every reply above it), '
                                         f'got {value}')
    return value


def fraction(text):
    value = _number(float, text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f'must be a fraction in [0, 1], got {value}')
    return value


# ---- combinations of arguments ---------------------------------------------------------------------------

def check_scoring(n_score_views, selection, scores_without_views):
    """0 scoring views leave every candidate at +inf under a score that reads only them: refuse that one
    combination (generation-probability selections are fine without scoring views, as the ladder runs them)."""
    if n_score_views == 0 and selection not in scores_without_views:
        raise InputError(f'--n-score-views 0 with --selection {selection}: this selection ranks by the scoring '
                         f'views, so every candidate would score the same; give --n-score-views 1 or more, or a '
                         f'selection that reads the generation probabilities ({", ".join(sorted(scores_without_views))})')


def check_token_budget(max_tokens, reply_tokens):
    if max_tokens <= reply_tokens:
        raise InputError(f'--max-tokens {max_tokens} leaves no room for a prompt: the longest reply alone takes '
                         f'{reply_tokens} tokens')


def check_shell_words(flag, text):
    """A flag holding more flags (as a shell would split them) must split: an unbalanced quote is one line."""
    try:
        shlex.split(text or '')
    except ValueError as e:
        raise InputError(f'{flag} {text!r}: cannot split it into arguments ({e})') from None


def check_encodable(flag, text, tokenizer):
    """Text the model must read (--preprompt) has to be in its vocabulary: the one-token-per-cell tokenizer
    refuses an unknown character, a shrunk LLM vocabulary would turn it into unk without a word."""
    try:
        ids = tokenizer(text, add_special_tokens=False)['input_ids']
    except Exception as e:  # noqa: BLE001  (the tokenizers library raises a plain Exception for an unknown character)
        raise InputError(f'{flag} {text!r}: not in the model\'s vocabulary ({e})') from None
    unk = getattr(tokenizer, 'unk_token_id', None)
    if unk is not None and unk in ids:
        raise InputError(f'{flag} {text!r}: holds characters outside the model\'s vocabulary (they become '
                         f'{tokenizer.unk_token!r})')


def check_lora_rank(flag, r, model_path):
    """A LoRA rank above the model's width (hidden_size in a local model's config.json) adds nothing a full-rank
    update would not, and its per-task matrices, 40 tasks at a time, can ask for a hundred GB."""
    config = os.path.join(os.path.expanduser(model_path), 'config.json')
    try:
        with open(config) as f:
            width = json.load(f).get('hidden_size')
    except (OSError, ValueError, AttributeError):
        return  # a hub id, an adapter folder, a damaged config: the loader says what is wrong
    if isinstance(width, int) and r > width:
        raise InputError(f'{flag} {r}: above the width of {model_path} ({width}); a LoRA rank is at most the width')


# ---- paths -----------------------------------------------------------------------------------------------

def looks_local(path):
    """True for a --model that is meant as a folder on this machine rather than a hub id.

    A hub id is `name` or `owner/name`; a path starting with '.', '~' or the separator, one with more than one
    separator, one that exists, or `owner/name` whose owner is a local folder (models/ArcMni) is local."""
    if os.path.exists(path) or path.startswith(('.', '~', os.sep)):
        return True
    if os.sep in path or (os.altsep and os.altsep in path):
        return not _HUB_ID.fullmatch(path) or os.path.isdir(path.split('/')[0])
    return False


def check_model_path(path):
    """A local --model must be a saved model folder; a hub id must be in the Hugging Face cache, or the hub must
    answer (offline, the loader would retry for a minute and end in a traceback)."""
    if not looks_local(path):
        _check_hub_id(path)
        return
    full = os.path.expanduser(path)
    if not os.path.isdir(full):
        raise InputError(f'--model {path}: no such folder' + (' (it is a file)' if os.path.exists(full) else ''))
    if not any(os.path.exists(os.path.join(full, f)) for f in ('config.json', 'adapter_config.json')):
        raise InputError(f'--model {path}: not a saved model (no config.json in the folder)')


def _check_hub_id(repo_id, timeout_s=3.0):
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, 'config.json')
    except ValueError as e:  # huggingface_hub's HFValidationError: '', 'a b', 'x!'
        raise InputError(f'--model {repo_id!r}: neither a model folder here nor a valid hub id ({e})') from None
    if isinstance(cached, str):
        return  # cached: the loader finds it offline too
    where = 'no such folder here and not in the Hugging Face cache'
    if os.environ.get('HF_HUB_OFFLINE', '0').lower() not in ('0', 'false', ''):
        raise InputError(f'--model {repo_id}: {where} (HF_HUB_OFFLINE is set): give the path of a saved model')
    try:
        socket.create_connection(('huggingface.co', 443), timeout=timeout_s).close()
    except OSError:
        raise InputError(f'--model {repo_id}: {where}, and the hub cannot be reached from this machine: '
                         'give the path of a saved model') from None


def _probe_writable(folder, flag):
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise InputError(f'{flag} {folder}: cannot write there ({e.strerror or e})') from None


def check_writable_folder(path, flag):
    """Create the folder `path` if needed and make sure this process can write in it (a file of that name, a
    path under a file, a read-only place: one line naming `flag` and the path)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f'{flag} {path}: a file, not a folder')
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise InputError(f'{flag} {path}: cannot create it ({e.strerror or e})') from None
    _probe_writable(path, flag)


RUN_FILES = ('submission.json', 'results.json')  # replaced by every run (the report folder too)


def check_output_dir(path, report=False):
    """Create the run folder if needed and make sure this process can write in it and in its cache, and that
    the names of the files the run writes are free (a folder named submission.json, or with `report` a file named
    report, ended the run in a traceback, the latter after all its work)."""
    check_writable_folder(path, '--output-dir')
    for name in RUN_FILES:
        if os.path.isdir(os.path.join(path, name)):
            raise InputError(f'--output-dir {path}: {name} there is a folder; the run writes a file of that name '
                             '(remove or rename it)')
    folder = os.path.join(path, 'report')
    if report and os.path.exists(folder) and not os.path.isdir(folder):
        raise InputError(f'--output-dir {path}: report there is a file; the run writes its report into a folder '
                         'of that name (remove or rename it, or --no-report)')
    cache = os.path.join(path, 'inference_cache')
    if os.path.isdir(cache):
        _probe_writable(cache, '--output-dir (its inference_cache)')
        db = os.path.join(cache, 'cache.db')  # diskcache's sqlite file
        if os.path.exists(db) and not os.access(db, os.W_OK):
            raise InputError(f'--output-dir {path}: {db} is read-only')


@contextlib.contextmanager
def output_dir_lock(path):
    """Hold an exclusive lock on <path>/run.lock for the run: a second run into the same folder is refused at
    once (two runs would compute the same results twice and write the same files). The OS drops the lock when
    the process ends, however it ends."""
    if fcntl is None:
        yield
        return
    lock_path = os.path.join(path, LOCK_FILE)
    try:
        f = open(lock_path, 'a+')
    except OSError as e:
        raise InputError(f'--output-dir {path}: cannot create {LOCK_FILE} ({e.strerror or e})') from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or 'unknown'
            raise InputError(f'--output-dir {path}: another run is using this folder (process {holder}); wait '
                             f'for it to finish or choose another --output-dir') from None
        f.seek(0)
        f.truncate()
        f.write(f'{os.getpid()}\n')
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
