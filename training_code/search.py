"""What a candidate search is, how it runs, and the prompts it reads: three objects that candidates.py takes whole.

`Search` holds everything that changes the candidates or their scores (the sampler by name, its threshold or
beams, the generation and scoring views and their seeds) and the part of the cache key it owns. `Engine` holds
what changes only the speed (batching, guesses, prefetch, memory sizes); `resolve_engine` is the one place its
defaults are decided, from the device and the sampler. `Prompts` is the one prompt builder: the text format of a
model (task tokens included), its token budget, and the token ids of view prompts, replies and guesses.

A new sampler touches `SAMPLERS` and `Search.generate_options` here, and its implementation in
inference_tools.generate_candidates (a batched one: also the route in candidates.TaskRunner).
"""
import dataclasses
import inspect

import torch

import arc_loader
import batched_dfs
import inference_tools
import model_tools
import task_tokens

SAMPLERS = ("dfs", "greedy", "sample", "beam")  # dfs: the seed's search; the others through model.generate
BATCHED_SAMPLERS = ("dfs", "greedy")  # those with a batched search over many prompts (batched_dfs)


@dataclasses.dataclass(frozen=True)
class Search:
    """Everything that changes the candidates and their scores; its defaults are the only ones."""
    sampler: str = "dfs"
    min_prob: float = 0.1  # dfs: keep every reply above this probability
    num_beams: int = 4  # beam: width and replies per view
    n_views: int = 16  # augmented views per test input
    aug_seed: int = 10000  # seed of the generation views
    n_score_views: int = 8  # views ("experts") scoring every candidate
    score_seed: int = 0  # seed of the scoring views

    def __post_init__(self):
        assert self.sampler in SAMPLERS, f"Search: sampler must be one of {SAMPLERS}, got {self.sampler!r}"

    @property
    def threshold(self):
        """The DFS's probability threshold; None for any other sampler."""
        return self.min_prob if self.sampler == "dfs" else None

    def generate_options(self):
        """inference_tools.generate_candidates' keywords for a sampler run through model.generate."""
        assert self.sampler != "dfs", "Search.generate_options: the DFS is not run through generate()"
        beams = {"num_beams": self.num_beams, "num_return_sequences": self.num_beams} if self.sampler == "beam" else {}
        return {"mode": self.sampler, **beams}

    def key_part(self, batched):
        """The part of a search's cache key this object owns; `batched`: the batched greedy decode, whose NLLs
        come from other kernels than generate()'s (the DFS has one key for both routes)."""
        return search_key_part(self.threshold, batched, {} if self.sampler == "dfs" else self.generate_options())


def _generate_defaults():
    params = inspect.signature(inference_tools.generate_candidates).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def search_key_part(min_prob, batched=False, generate_kw=None):
    """The search's cache-key part: the DFS at min_prob, the batched greedy decode, or generate() with its options."""
    if min_prob is not None:
        return {"fn": "dfs", "min_prob": float(min_prob)}
    if batched:
        return {"fn": "greedy_batched"}
    return {"fn": "generate", **_generate_defaults(), **(generate_kw or {})}


@dataclasses.dataclass(frozen=True)
class Engine:
    """How the candidates are computed, never which: the same Search gives the same candidates (up to bf16
    rounding) under every Engine. None: decided by `resolve_engine`."""
    batch_views: bool = None  # batched DFS or greedy over all views of many tasks
    batch_scores: bool = None  # score the candidates of many tasks in batched forwards
    guess_views: bool = False  # batched: a test input's first view's best grid guides its other views
    pass_guess: bool = True  # batch-1 DFS: follow the best reply so far first
    prefetch_tasks: int = None  # batched: search this many tasks at once (0: one test input at a time)
    batch_size: int = None  # batched search and scoring: rows per forward
    kv_cache_gb: float = None  # batched search and scoring: KV cache of one group of prompts
    prefill_tokens: int = None  # batched search and scoring: tokens per prefill forward
    decode_graphs: bool = None  # batched search: decode steps on fixed shapes, replayed as CUDA graphs on a GPU
    score_batch_size: int = 8  # batch-1 scoring: replies per forward
    cache_only: bool = False  # compute nothing, only read what worker processes put in the cache
    max_batch_tokens: int = None  # the KV cache in tokens of the model (set by resolve_engine)

    def limits(self):
        """batched_dfs' memory limits."""
        return {"batch_size": self.batch_size, "max_batch_tokens": self.max_batch_tokens,
                "prefill_tokens": self.prefill_tokens}


def resolve_engine(engine, sampler, model):
    """The one place the Engine's defaults are decided: everything batched on a GPU, its decode steps replayed as
    CUDA graphs; on a CPU the greedy search only (on 2 cores batch-1 DFS with guesses and batch-1 scoring are
    faster) and no fixed-shape steps (no graphs to replay there); memory sizes from the free GPU
    memory or the CPU defaults (batched_dfs.default_memory); no prefetch without the batched search or when
    computing nothing. `model` (the base model of a per-task TTT) sizes the KV cache in tokens."""
    gpu = torch.cuda.is_available()
    free = torch.cuda.mem_get_info()[0] if gpu else None
    sizes = {k: v for k, v in batched_dfs.default_memory(free).items() if getattr(engine, k) is None}
    engine = dataclasses.replace(engine, **sizes)
    batch_views = (gpu or sampler == "greedy") if engine.batch_views is None else engine.batch_views
    batch_views = batch_views and sampler in BATCHED_SAMPLERS
    tokens = max(1, int(engine.kv_cache_gb * 2 ** 30 / batched_dfs.kv_bytes_per_token(model)))
    return dataclasses.replace(
        engine, batch_views=batch_views, batch_scores=gpu if engine.batch_scores is None else engine.batch_scores,
        guess_views=engine.guess_views and batch_views, max_batch_tokens=tokens,
        decode_graphs=gpu if engine.decode_graphs is None else engine.decode_graphs,
        prefetch_tasks=engine.prefetch_tasks if batch_views and not engine.cache_only else 0)


def format_options(preprompt, tok):
    """The text format of a model: replies end with its eos; a model with task tokens gets its task's token."""
    return arc_loader.text_format(tok.eos_token, preprompt=preprompt, task_token=task_tokens.enabled(tok))


class Prompts:
    """The one prompt builder: a model's text format and token budget, and the token ids of view prompts, replies
    and guesses. Each prompt leaves room for the longest reply (a 30 x 30 grid's); `max_input_tokens` may be lowered
    for a retry. `max_new_tokens` caps the replies below that (a benchmark of a model that never ends a reply)."""

    def __init__(self, tokenizer, fmt_opts, max_tokens=8192, max_new_tokens=None):
        self.tok, self.fmt_opts = tokenizer, fmt_opts
        longest = arc_loader.max_new_tokens(fmt_opts["reply_end"], fmt_opts["lines_sep"])
        self.max_new_tokens = max_new_tokens or longest
        self.max_input_tokens = max_tokens - longest
        self._encoder = model_tools.CharEncoder.of(tokenizer)  # the fast exact path for an arc_tokenizer, else None

    @classmethod
    def of_model(cls, tokenizer, preprompt, max_tokens=8192, max_new_tokens=None):
        """The prompts of a model (its eos, its task tokens if it has them)."""
        return cls(tokenizer, format_options(preprompt, tokenizer), max_tokens, max_new_tokens)

    def ids(self, text, bos):
        """Token ids of a text (bos: with the tokenizer's special tokens, as a prompt)."""
        return self._encoder(text, bos) if self._encoder else list(self.tok(text, add_special_tokens=bos)["input_ids"])

    def view(self, dataset, key, **fmt):
        """(key as formatted, prompt ids) of a view, cut to the budget by dropping demonstration examples."""
        key, formatted = dataset.get_task(key, self.max_input_tokens, "input", **fmt, **self.fmt_opts)
        return key, self.ids(formatted["input"], True)

    def reply(self, dataset, key, grid):
        """Reply ids of a grid (in the original frame) under a view."""
        return self.ids(dataset.fmt_reply(key, grid, **self.fmt_opts), False)

    def decode(self, dataset, text, key):
        """(grid in the original frame or None, correct, status) of a reply under a view."""
        return dataset.decode(text, self.fmt_opts["lines_sep"], key)
