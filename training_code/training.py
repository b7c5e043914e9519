"""Training: the AdamW optimizer with its embedding learning rate, the output-masking collator, tokenised and
on-the-fly datasets, and `train_model` (HF Trainer, resuming from checkpoints, stopping in time), whose knobs come
in four settings objects: what the optimizer does (`OptimizerSettings`), what a step trains on (`BatchSettings`),
how the run is kept (`RunSettings`) and what changes only the speed (`KernelSettings`).

datasets and bitsandbytes are imported inside the functions that need them.
"""
import contextlib
import dataclasses
import functools
import os
import time

import numpy as np
import torch
import transformers

import grid_positions
import packing
from model_tools import CharEncoder, attention_without_cudnn, is_embedding_param

REPLY_BEG = "\n+/-=O"


# --------------------------------------------------------------------------------------------------
# Optimizer


def make_optimizer(model, lr=1e-4, embedding_lr=1e-5, weight_decay=0.0, optim="adamw_torch", betas=(0.9, 0.999)):
    """AdamW over the trainable parameters: embeddings/lm_head at embedding_lr, the rest at lr."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert params, "make_optimizer: the model has no trainable parameters"
    groups = [{"params": [p for n, p in params if not is_embedding_param(n)], "lr": lr},
              {"params": [p for n, p in params if is_embedding_param(n)], "lr": embedding_lr}]
    groups = [g for g in groups if g["params"]]
    optimizer_cls, extra = _optimizer_class(optim)
    return optimizer_cls(groups, lr=lr, weight_decay=weight_decay, betas=tuple(betas), **extra)


def _optimizer_class(optim):
    if optim == "adamw_torch":
        return torch.optim.AdamW, {}
    if optim == "adamw_torch_fused":
        return torch.optim.AdamW, {"fused": True}
    if optim != "adamw_8bit":
        raise ValueError(f"make_optimizer: optim must be adamw_torch, adamw_torch_fused or adamw_8bit, "
                         f"got {optim!r}")
    try:
        import bitsandbytes
    except ImportError:
        print("make_optimizer: bitsandbytes is not installed; adamw_8bit falls back to torch AdamW")
        return torch.optim.AdamW, {}
    return bitsandbytes.optim.AdamW8bit, {}


# --------------------------------------------------------------------------------------------------
# Data collator


class InputMaskingDataCollator:
    """Pads a batch; labels only the output grids (after each reply_beg, up to and including the next eos)."""

    def __init__(self, tokenizer, reply_beg=REPLY_BEG, mask_first_n_examples=0, pad_to_multiple_of=None,
                 position_fn=None):
        self.tokenizer = tokenizer
        self.position_fn = position_fn  # (batch, seq) ids -> position_ids, for models with grid positions
        self.reply_beg = reply_beg
        self.reply_ids = list(tokenizer(reply_beg, add_special_tokens=False)["input_ids"])
        assert self.reply_ids, "InputMaskingDataCollator: reply_beg encodes to no tokens"
        assert tokenizer.eos_token_id is not None, "InputMaskingDataCollator: tokenizer has no eos token"
        self.eos_id = tokenizer.eos_token_id
        # Labels come from the unpadded ids, so pad == eos (common for pretrained models) is harmless.
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        assert mask_first_n_examples >= 0, "mask_first_n_examples must be >= 0"
        self.mask_first_n_examples = mask_first_n_examples
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples):
        ids = [self._ids(ex) for ex in examples]
        labels = [self.labels(x) for x in ids]
        length = self._padded_length(max(len(x) for x in ids))
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for x, lab in zip(ids, labels):
            pad = length - len(x)
            batch["input_ids"].append(x + [self.pad_id] * pad)
            batch["attention_mask"].append([1] * len(x) + [0] * pad)
            batch["labels"].append(lab + [-100] * pad)
        batch = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        if self.position_fn is not None:  # right padding never shifts the positions of real tokens
            batch["position_ids"] = self.position_fn(batch["input_ids"])
        return batch

    def _ids(self, example):
        if "input_ids" in example:
            ids = example["input_ids"]
            return ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if "text" in example:
            return list(self.tokenizer(example["text"])["input_ids"])
        raise KeyError(f"InputMaskingDataCollator: an example needs 'input_ids' or 'text', "
                       f"got keys {sorted(example)}")

    def _padded_length(self, length):
        m = self.pad_to_multiple_of
        return length if not m else -(-length // m) * m

    def labels(self, ids):
        """Labels for one unpadded sequence: ids on the kept output spans, -100 elsewhere."""
        spans = self.output_spans(ids)
        spans = spans[self._n_masked(len(spans)):]
        labels = [-100] * len(ids)
        for beg, end in spans:
            labels[beg:end] = ids[beg:end]
        return labels

    def check_reply_ends(self, ids, name="a training text"):
        """Raise if a reply of `ids` runs to the end of the text without the tokenizer's eos: the texts were
        formatted with another end than `tokenizer.eos_token` (arc_loader.text_format), so the loss would fall on
        everything after the first reply and the model would never learn to stop."""
        spans = self.output_spans(ids)
        if not spans:
            raise ValueError(f"{name}: no reply to train on (no {self.reply_beg!r} in the text)")
        if any(ids[end - 1] != self.eos_id for _, end in spans):
            raise ValueError(f"{name}: a reply does not end with the tokenizer's eos token "
                             f"{self.tokenizer.eos_token!r} (id {self.eos_id}); format training texts with "
                             f"arc_loader.text_format(tokenizer.eos_token)")

    def _n_masked(self, n_spans):
        # The first outputs are masked only while a later output remains to train on.
        return min(self.mask_first_n_examples, max(n_spans - 1, 0))

    def output_spans(self, ids):
        """Non-empty [beg, end) spans from just after each reply_beg to just past the next eos (a reply_beg inside
        a span does not start another)."""
        ids, k = np.asarray(ids, dtype=np.int64), len(self.reply_ids)
        if len(ids) < k:
            return []
        windows = np.lib.stride_tricks.sliding_window_view(ids, k)
        starts = np.flatnonzero((windows == np.asarray(self.reply_ids)).all(axis=1))
        eos = np.flatnonzero(ids == self.eos_id)
        spans, done = [], 0
        for i in starts.tolist():
            if i < done:
                continue
            beg = i + k
            at = np.searchsorted(eos, beg)
            end = int(eos[at]) + 1 if at < len(eos) else len(ids)  # include the eos; an unterminated reply runs to the end
            if end > beg:
                spans.append((beg, end))
            done = max(end, beg)
        return spans


# --------------------------------------------------------------------------------------------------
# Training


def tokenize_texts(tokenizer, texts, max_len=None):
    """A datasets.Dataset with one `input_ids` column; texts longer than max_len tokens are dropped."""
    import datasets

    data = datasets.Dataset.from_dict({"text": list(texts)})
    assert len(data), "tokenize_texts: no texts to train on"
    # Arrow-backed and batched: a full run holds ~10^9 token ids, far too many for Python lists.
    data = data.map(lambda batch: {"input_ids": tokenizer(batch["text"])["input_ids"]},
                    batched=True, remove_columns=["text"], desc="tokenizing")
    if max_len is not None:
        n_all = len(data)
        data = data.filter(lambda ids: len(ids) <= max_len, input_columns="input_ids")
        if len(data) < n_all:
            print(f"tokenize_texts: dropped {n_all - len(data)} of {n_all} texts longer than "
                  f"{max_len} tokens")
    assert len(data), f"tokenize_texts: every text is longer than max_len={max_len}"
    return data


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """What the optimizer does: AdamW (or its 8-bit or fused form) with the embeddings at their own rate, warmup
    (`warmup_steps`, when given, replaces `warmup_ratio`) and the schedule."""
    lr: float = 1e-4
    embedding_lr: float = 1e-5
    warmup_ratio: float = 0.25
    warmup_steps: int = None
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    optim: str = "adamw_torch"
    betas: tuple = (0.9, 0.999)

    def warmup(self):
        """TrainingArguments' warmup_steps: a float below 1 is read as a ratio of the total steps, an int as steps."""
        if self.warmup_steps is not None:
            return int(self.warmup_steps)
        assert 0 <= self.warmup_ratio < 1, f"train_model: warmup_ratio must be in [0, 1), got {self.warmup_ratio}"
        return float(self.warmup_ratio)


@dataclasses.dataclass(frozen=True)
class BatchSettings:
    """What a step trains on: `batch_size` sequences (or packed rows of `packing` tokens, packing.py) per device
    step, `grad_accum` of them per optimizer step, for `epochs` or `max_steps`; the first outputs of each sample not
    trained on; texts longer than `max_len` dropped; `sequential` keeps the data order (pre-shuffled,
    length-bucketed or packed data); `num_workers` DataLoader workers format samples on the fly."""
    batch_size: int = 4
    grad_accum: int = 2
    epochs: float = 1
    max_steps: int = -1
    mask_first_n_examples: int = 1
    max_len: int = None
    sequential: bool = False
    packing: int = None
    num_workers: int = 0


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """How the run is kept: checkpoints every `save_steps` (resumed from when `resume`), a time limit that stops
    and saves (with `fit_schedule`, a run that would not finish in time gets a schedule that ends in time:
    TimeLimit), the logging interval, the seed of data order and initialisation."""
    save_steps: int = 500
    save_total_limit: int = None
    resume: bool = True
    max_minutes: float = None
    fit_schedule: bool = False
    logging_steps: int = 10
    seed: int = 42


@dataclasses.dataclass(frozen=True)
class KernelSettings:
    """What changes only the speed and memory: bf16 autocast (None: where the GPU has it), gradient checkpointing,
    torch.compile, cuDNN's attention kernels (off: see attention_without_cudnn)."""
    bf16: bool = None
    gradient_checkpointing: bool = False
    torch_compile: bool = False
    cudnn_attention: bool = False


def training_arguments(output_dir, optimizer=OptimizerSettings(), batches=BatchSettings(), run=RunSettings(),
                       kernels=KernelSettings()):
    """TrainingArguments of the recipe (report_to none, periodic checkpoints, our own collator's columns)."""
    bf16 = kernels.bf16
    if bf16 is None:
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    args = transformers.TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=batches.batch_size,
        gradient_accumulation_steps=batches.grad_accum, num_train_epochs=batches.epochs, max_steps=batches.max_steps,
        learning_rate=optimizer.lr, lr_scheduler_type=optimizer.scheduler, warmup_steps=optimizer.warmup(),
        weight_decay=optimizer.weight_decay, save_strategy="steps", save_steps=run.save_steps,
        save_total_limit=run.save_total_limit, seed=run.seed, data_seed=run.seed, bf16=bf16,
        logging_steps=run.logging_steps, report_to="none",
        # The collator needs input_ids only, but Trainer would inspect the (peft) forward signature.
        remove_unused_columns=False, gradient_checkpointing=kernels.gradient_checkpointing,
        disable_tqdm=False, use_cpu=not torch.cuda.is_available(),
        # At construction: TrainingArguments picks the compile backend in __post_init__ (set later, nothing compiles).
        torch_compile=kernels.torch_compile,
        dataloader_pin_memory=torch.cuda.is_available())
    args.train_sampling_strategy = "sequential" if batches.sequential else args.train_sampling_strategy
    args.dataloader_num_workers = batches.num_workers
    return args


def train_model(model, tokenizer, texts, output_dir, optimizer=OptimizerSettings(), batches=BatchSettings(),
                run=RunSettings(), kernels=KernelSettings(), callbacks=()):
    """Train `model` on formatted texts with HF Trainer (loss on outputs only); resumes from output_dir.

    `texts` is a list of formatted texts or a ready dataset of {'input_ids'} (e.g. FormattedKeys). With
    `batches.packing` (row capacity in tokens) it trains on packed rows (packing.py): `texts` is then a
    packing.PackedRows, or texts/tokenized samples that are packed here in a seeded shuffled order; batch_size
    counts rows, and the model attends through packing.VARLEN during training only. `run.max_minutes` stops and
    saves a checkpoint when the time is up (`run.fit_schedule`: with the schedule fitted to end by then). Returns the Trainer (trainer.state.global_step etc.).
    """
    args = one_gpu_per_process(training_arguments(output_dir, optimizer, batches, run, kernels))
    torch_optimizer = make_optimizer(model, lr=optimizer.lr, embedding_lr=optimizer.embedding_lr,
                                     weight_decay=optimizer.weight_decay, optim=optimizer.optim, betas=optimizer.betas)
    data = tokenize_texts(tokenizer, texts, batches.max_len) if isinstance(texts, (list, tuple)) else texts
    callbacks = list(callbacks) + ([TimeLimit(run.max_minutes, run.fit_schedule)] if run.max_minutes else [])
    collator = InputMaskingDataCollator(tokenizer, mask_first_n_examples=batches.mask_first_n_examples,
                                        position_fn=_position_fn(model))
    if isinstance(texts, (list, tuple)):
        for i in range(min(len(data), 16)):
            collator.check_reply_ends(data[i]["input_ids"], f"training text {i}")
    if batches.packing:
        data, collator = _packed(data, collator, batches.packing, run.seed)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, data_collator=collator,
        processing_class=tokenizer, callbacks=callbacks,
        optimizers=(torch_optimizer, None))  # Trainer builds the lr schedule from args
    with attention_without_cudnn() if not kernels.cudnn_attention else contextlib.nullcontext(), \
            _attention(model, batches.packing):
        trainer.train(resume_from_checkpoint=last_checkpoint(output_dir) if run.resume else None)
    # accelerate wraps model.forward in bf16 autocast for mixed precision and leaves it there; undo
    # that so the trained model runs (and merges) in its own dtype afterwards.
    trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    return trainer


def _packed(data, collator, capacity, seed):
    """(rows dataset, packing collator): `data` as given if it is a packing.PackedRows, else its samples packed
    in a seeded shuffled order."""
    if not isinstance(data, packing.PackedRows):
        order = np.random.default_rng(seed).permutation(len(data)).tolist()
        samples = [data[i] for i in order]
        data = packing.PackedRows(samples, packing.plan_rows([len(s["input_ids"]) for s in samples], capacity))
    return data, packing.PackedCollator(collator.labels, collator.pad_id, capacity, collator.position_fn)


@contextlib.contextmanager
def _attention(model, packing_capacity):
    """The model attends through packing.VARLEN inside the block when packing, then returns to its own."""
    if not packing_capacity:
        yield
        return
    before = model.config._attn_implementation
    model.set_attn_implementation(packing.register_varlen_attention())
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def one_gpu_per_process(args):
    """Keep a process that sees several GPUs outside torchrun on one of them: Trainer would otherwise wrap the
    model in nn.DataParallel, which splits every input along dim 0, and grid position ids (3 x batch x seq)
    would be cut along the wrong axis. Several GPUs train data-parallel through torchrun (one process each)."""
    if args.n_gpu > 1:
        args._n_gpu = 1  # read by Trainer (no public setter); it is set once, by args.device's setup
    return args


class TimeLimit(transformers.TrainerCallback):
    """Stop training (and save a checkpoint) once `minutes` have passed: runs fit machines lent for minutes.

    With `fit_schedule`, a run that would not finish in time ends with its schedule finished instead of cut: the
    steps after the first two (compilation) are timed, and once `measure_steps` of them and 5% of the time have
    passed, then again at half and at four fifths of the time, the learning-rate schedule's horizon (every
    `num_training_steps` of the scheduler's lambdas: linear, cosine, ...) is set to the steps that fit the time left
    (3% spare; at most the planned steps), and training stops there. A run that fits is unchanged; the time limit
    stays as the backstop. Under torchrun every rank takes the same decisions (all-reduced)."""

    def __init__(self, minutes, fit_schedule=False, measure_steps=20):
        self.seconds, self.fit_schedule, self.measure_steps = 60 * minutes, fit_schedule, measure_steps
        self.start = self.timed_from = self.stop_at = None
        self.fit_at = [0.05, 0.5, 0.8]  # fractions of the time at which the horizon is fitted

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.first, self.planned = time.time(), state.global_step, state.max_steps

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        now = time.time()
        if self.fit_schedule:
            self._fit(args, state, lr_scheduler, now)
        out_of_time = _agreed(args, now - self.start > self.seconds)
        if out_of_time or (self.stop_at is not None and state.global_step >= self.stop_at):
            control.should_training_stop = control.should_save = True
        if out_of_time and state.global_step < state.max_steps and state.is_world_process_zero:
            print(f'WARNING: out of time at step {state.global_step} of {state.max_steps}: the learning rate '
                  'schedule is unfinished. Run again to continue from the checkpoint, or with fewer max steps '
                  'to decay from here (the schedule is rebuilt over the new step count).')
        return control

    def _fit(self, args, state, lr_scheduler, now):
        done = state.global_step - self.first
        if done == 2:
            self.timed_from = now
        due = [f for f in self.fit_at if now - self.start >= f * self.seconds]
        if self.timed_from is None or done < 2 + self.measure_steps or not due:
            return
        self.fit_at = [f for f in self.fit_at if f not in due]
        per_step = (now - self.timed_from) / (done - 2)
        fits = state.global_step + int(0.97 * (self.start + self.seconds - now) / per_step)
        fits = int(_agreed(args, min(fits, self.planned), torch.distributed.ReduceOp.MIN))
        if fits == state.max_steps:
            self.stop_at = fits
            return
        scheduler = getattr(lr_scheduler, 'scheduler', lr_scheduler)  # accelerate's wrapper holds the scheduler
        lambdas = getattr(scheduler, 'lr_lambdas', [])
        if not lambdas or not all('num_training_steps' in getattr(f, 'keywords', {}) for f in lambdas):
            if state.is_world_process_zero and self.stop_at is None:
                print(f'time limit: {fits} of {state.max_steps} steps fit, but this schedule has no horizon to fit')
            self.stop_at, self.fit_at = state.max_steps, []
            return
        scheduler.lr_lambdas = [functools.partial(f.func, *f.args, **dict(f.keywords, num_training_steps=fits))
                                for f in lambdas]
        if state.is_world_process_zero:
            print(f'time limit: the schedule now ends at step {fits} of {self.planned} planned '
                  f'({per_step:.3f} s a step; {(self.start + self.seconds - now) / 60:.1f} min left)', flush=True)
        self.stop_at = state.max_steps = fits


def _agreed(args, value, op=None):
    """`value` as every rank takes it under torchrun (default: true if true on any rank), else as it is."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    t = torch.tensor([float(value)], device=args.device)
    torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.MAX)
    return t.item()


class ProgressLog(transformers.TrainerCallback):
    """One line per logging step: step of max, loss, learning rate, steps/s, tokens/s, elapsed and ETA, flushed, so
    that a run in the background can be followed in its log file."""

    def __init__(self, tokens_per_step=None):
        self.tokens_per_step, self.start, self.first = tokens_per_step, None, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.first = time.time(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs or self.start is None:
            return
        elapsed, done = time.time() - self.start, state.global_step - self.first
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (state.max_steps - state.global_step) / rate if rate else float("nan")
        tokens = f" {rate * self.tokens_per_step / 1e6:.2f}M tokens/s" if self.tokens_per_step else ""
        print(f"step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f} lr {logs.get('learning_rate', 0):.2e}"
              f" {rate:.2f} steps/s{tokens} elapsed {elapsed / 60:.1f} min ETA {eta / 60:.1f} min", flush=True)


class FormattedKeys(torch.utils.data.Dataset):
    """ArcDataset keys formatted and tokenised on the fly (in the DataLoader workers), not all up front."""

    def __init__(self, dataset, tokenizer, fmt_opts, max_tokens=None):
        self.dataset, self.tokenizer, self.fmt_opts, self.max_tokens = dataset, tokenizer, fmt_opts, max_tokens
        self.encode = CharEncoder.of(tokenizer)  # the tokenizer's ids by table lookup, where it gives the same ids

    def __len__(self):
        return len(self.dataset.keys)

    def __getitem__(self, i):
        _, fmt = self.dataset.get_task(self.dataset.keys[i], self.max_tokens, "text", **self.fmt_opts)
        if self.encode is not None:
            return {"input_ids": self.encode(fmt["text"], True)}
        return {"input_ids": self.tokenizer(fmt["text"])["input_ids"]}


def _position_fn(model):
    """Grid positions for the collator when the model has them (grid_positions.py), else None."""
    if not grid_positions.has_grid_positions(model):
        return None
    return lambda ids: grid_positions.position_ids_for(model, ids)


def last_checkpoint(output_dir):
    """The newest `checkpoint-<step>` folder in output_dir, or None."""
    if not os.path.isdir(output_dir):
        return None
    return transformers.trainer_utils.get_last_checkpoint(output_dir)
