"""Per-task test-time training batched over tasks (ArcMini's `--ttt per_task`): every task adapts on its own
demonstrations, leave-one-out (each demonstration in turn is the query, the others the examples) in each of the
8 D8 views x `copies` (each with random colours and example order), loss on the outputs only, while all tasks of a
group train in the same batches. What trains (`Settings.train`):

- `token`: each task's task-token embedding row, the model frozen. The adapted model is one model: the search
  runs over all tasks at once as without TTT.
- `lora`: a LoRA per task on every linear layer but the output head, applied per row by the row's task index (a
  batched multi-adapter linear, as forward hooks). The search merges one task's adapter at a time
  (`adapter_runners`).
- `full`: the whole of every linear layer but the output head per task (a full-rank change of each weight, applied
  per row like the LoRA; the norms and the embeddings stay shared): what the from-scratch anchors adapt per task.
  For ArcMini v3 that is 15.0M parameters a task (0.24 GB of weights, gradients and AdamW state a task in
  training: about 10 GB for a group of 40; 30 MB saved in bf16); merged task by task in the search like the LoRA.

Batching does not change what a task learns: its loss is its own
mean (the step's loss is the sum of the tasks' means), its gradient is clipped on its own, AdamW works per
element, and its samples, their order and its initial LoRA come from seeds of its own. Every finished task is
saved at once (a rerun resumes); a group cut by the time limit is dropped: its tasks stay on the base model.
"""
import dataclasses
import gc
import hashlib
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import arc_loader
import candidates
import grid_positions
import input_checks
import model_tools
import run_record
import task_tokens
import training
from search import format_options

MODES = ('token', 'lora', 'full')
DEFAULT_LR = {'token': 1e-2, 'lora': 1e-3, 'full': 3e-4}  # chosen, not tuned (full: the whole-model TTT's rate)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What per-task TTT does (defaults chosen; measured once, docs/RESULTS.md)."""
    train: str = 'token'  # 'token', 'lora' or 'full'
    steps: int = 100  # optimizer steps, the same for every task
    lr: float = None  # None: DEFAULT_LR[train]; cosine schedule after warmup_steps
    copies: int = 4  # copies of the 8 D8 views of each leave-one-out query
    batch_size: int = 8  # samples of each task per step
    r: int = 8  # LoRA rank
    alpha: int = 16  # LoRA alpha (rsLoRA scale alpha / sqrt(r))
    warmup_steps: int = 10
    max_grad_norm: float = 1.0  # per task
    mask_first: int = 1  # demonstration outputs not trained on, from the first
    max_tokens: int = 8192  # sample length limit; examples are dropped to fit, else the sample is
    seed: int = 0
    tasks_per_group: int = 40  # tasks trained together (the time limit drops at most one group's work)
    batch_tokens: int = 32768  # padded tokens per forward pass: memory and speed only

    def __post_init__(self):
        if self.train not in MODES:
            raise input_checks.InputError(f'per-task TTT: train must be one of {MODES}, got {self.train!r}')

    @property
    def learning_rate(self):
        return DEFAULT_LR[self.train] if self.lr is None else self.lr

    def identity(self):
        """What decides the adapted parameters (the grouping and the forward size only change the speed)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ('tasks_per_group', 'batch_tokens')}

    @classmethod
    def from_args(cls, args):
        """From the evaluation's flags (evaluation.py: --per-task-ttt-*, --ttt-alpha, --ttt-mask-first, --seed)."""
        return cls(train=args.per_task_ttt_train, steps=args.per_task_ttt_steps, lr=args.per_task_ttt_lr,
                   copies=args.per_task_ttt_copies, batch_size=args.per_task_ttt_batch_size, r=args.per_task_ttt_r,
                   alpha=args.ttt_alpha, mask_first=args.ttt_mask_first, max_tokens=args.max_tokens, seed=args.seed,
                   tasks_per_group=args.per_task_ttt_tasks)


# ---- samples --------------------------------------------------------------------------------------

def leave_one_out(task, base):
    """One dataset per demonstration i of `task`: the others are its examples, demonstration i its query (the
    solution of the key `<base>_0`). The task's test inputs and outputs are not in any of them."""
    demos = task['train']
    return [arc_loader.ArcDataset({base: {'train': demos[:i] + demos[i + 1:], 'test': [{'input': d['input']}]}},
                                  {base: [d['output']]}) for i, d in enumerate(demos)]


def task_texts(task, base, settings, fmt_opts):
    """(training texts of one task: leave-one-out x the 8 D8 views x copies, each with its own colours and
    example order; number of samples left out, too long even with one example)."""
    texts, too_long = [], 0
    for i, loo in enumerate(leave_one_out(task, base)):
        aug = loo.augment(arc_loader.stable_seed(settings.seed, base, i), tp='all', rt='all', n=settings.copies,
                          perm=True, shfl_ex=True)
        kept, dropped = aug.texts_within(settings.max_tokens, **fmt_opts)
        texts, too_long = texts + kept, too_long + dropped
    return texts, too_long


def task_samples(dataset, bases, tok, settings, fmt_opts):
    """{task: [token ids of each of its samples]} from the demonstration pairs of `bases` only."""
    samples, too_long, total = {}, 0, 0
    for base in bases:
        texts, dropped = task_texts(dataset.challenge[base], base, settings, fmt_opts)
        samples[base] = tok(texts)['input_ids'] if texts else []
        too_long, total = too_long + dropped, total + dropped + len(texts)
    if too_long:
        print(f'per-task TTT: {too_long} of {total} samples left out: longer than {settings.max_tokens} tokens even '
              'with one example')
    return samples


def sample_order(n, count, seed):
    """`count` indices into n samples: seeded passes, each a fresh permutation."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(n) for _ in range(-(-count // n))])[:count]


# ---- the batched per-task parameters --------------------------------------------------------------

def adapted_layers(model):
    """Names of the linear layers per-task TTT adapts (lora, full): all but the output head."""
    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]


class TaskAdapters(torch.nn.Module):
    """The trainable parameters of a group of tasks on a frozen model, every one shaped (task, ...), applied
    through forward hooks (`attached`): row b of a batch uses task `index[b]`'s parameters.

    token: `rows` (task, hidden), added to the input embedding wherever the task's token is. lora: for each target
    linear layer `A` (task, r, in), random from the task's own seed, and `B` (task, out, r), zero; the layer's
    output gains scale * x A[t]^T B[t]^T. full: for each target layer `D` (task, out, in), zero; the output gains
    x D[t]^T.
    """

    def __init__(self, model, tok, bases, settings):
        super().__init__()
        self.train_mode, self.bases, self.index = settings.train, list(bases), None
        if self.train_mode == 'token':
            ids = [tok.convert_tokens_to_ids(arc_loader.task_token_text(b)) for b in bases]
            self.register_buffer('token_ids', torch.tensor(ids))
            hidden = model.get_input_embeddings().weight.shape[1]
            self.rows = torch.nn.Parameter(torch.zeros(len(bases), hidden))
            return
        self.targets = adapted_layers(model)
        modules = dict(model.named_modules())
        if self.train_mode == 'full':
            self.D = torch.nn.ParameterDict({_key(n): torch.nn.Parameter(torch.zeros(
                len(bases), *modules[n].weight.shape)) for n in self.targets})
            return
        self.scale = settings.alpha / settings.r ** 0.5
        self.A, self.B = torch.nn.ParameterDict(), torch.nn.ParameterDict()
        for name in self.targets:
            layer = modules[name]
            A = [_lora_init(settings.r, layer.in_features, arc_loader.stable_seed(settings.seed, b, name)) for b in bases]
            self.A[_key(name)] = torch.nn.Parameter(torch.stack(A))
            self.B[_key(name)] = torch.nn.Parameter(torch.zeros(len(bases), layer.out_features, settings.r))

    def _token_hook(self, module, args, out):
        hit = (args[0] == self.token_ids[self.index][:, None]).unsqueeze(-1)
        return out + hit.to(out.dtype) * self.rows[self.index][:, None, :].to(out.dtype)

    def _lora_hook(self, name):
        def hook(module, args, out):
            x = args[0]
            A, B = self.A[_key(name)][self.index].to(x.dtype), self.B[_key(name)][self.index].to(x.dtype)
            return out + self.scale * torch.bmm(torch.bmm(x, A.transpose(1, 2)), B.transpose(1, 2))
        return hook

    def _full_hook(self, name):
        def hook(module, args, out):
            x = args[0]
            return out + torch.bmm(x, self.D[_key(name)][self.index].to(x.dtype).transpose(1, 2))
        return hook

    def attach(self, model):
        """Forward hooks on the model; returns their handles (remove them to detach)."""
        if self.train_mode == 'token':
            return [model.get_input_embeddings().register_forward_hook(self._token_hook)]
        modules, hook = dict(model.named_modules()), self._full_hook if self.train_mode == 'full' else self._lora_hook
        return [modules[n].register_forward_hook(hook(n)) for n in self.targets]

    def clip_per_task(self, max_norm):
        """Scale each task's gradient to a norm of at most max_norm, alone (a shared norm would couple tasks)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norms = torch.stack([g.pow(2).flatten(1).sum(1) for g in grads]).sum(0).sqrt()
        factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(factor.view(-1, *[1] * (g.ndim - 1)))

    def per_task(self):
        """{task: {parameter name: its tensor}}, on the CPU (full: its change of every layer, in bf16)."""
        named = dict(self.named_parameters())
        dtype = torch.bfloat16 if self.train_mode == 'full' else torch.float32
        return {b: {n: p[t].detach().to('cpu', dtype).contiguous() for n, p in named.items()}
                for t, b in enumerate(self.bases)}


def _key(name):
    return name.replace('.', '-')  # ParameterDict keys may not hold '.'


def _lora_init(r, in_features, seed):
    """A LoRA A matrix as peft draws it (Kaiming-uniform, a = sqrt(5)), from its own seed."""
    weight = torch.empty(r, in_features)
    bound = 1 / in_features ** 0.5
    return weight.uniform_(-bound, bound, generator=torch.Generator().manual_seed(seed))


# ---- training -------------------------------------------------------------------------------------

def _collator(model, tok, settings):
    position_fn = (lambda ids: grid_positions.position_ids_for(model, ids)) if grid_positions.has_grid_positions(model) else None
    return training.InputMaskingDataCollator(tok, mask_first_n_examples=settings.mask_first, position_fn=position_fn)


def _micro_batches(rows, batch_tokens):
    """Rows (task index, ids, ...) sorted by length, cut into lists of at most batch_tokens padded tokens."""
    out, current = [], []
    for row in sorted(rows, key=lambda r: len(r[1])):
        if current and len(row[1]) * (len(current) + 1) > batch_tokens:
            out.append(current)
            current = []
        current.append(row)
    return out + [current] if current else out


def _backward_step(model, adapters, collator, rows, n_tasks, settings, device):
    """Accumulate the gradient of the sum over tasks of each task's mean output-token loss; returns that sum.
    rows: (task index, token ids, tokens with a label) of the step."""
    counts = torch.zeros(n_tasks)
    for t, _, n_labels in rows:
        counts[t] += n_labels
    counts = counts.clamp(min=1).to(device)
    total = 0.0
    for chunk in _micro_batches(rows, settings.batch_tokens):
        batch = {k: v.to(device) for k, v in collator([{'input_ids': ids} for _, ids, _ in chunk]).items()}
        labels = batch.pop('labels')
        adapters.index = torch.tensor([t for t, _, _ in chunk], device=device)
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=device.type == 'cuda'):
            logits = model(**batch).logits
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction='none')
        loss = (nll.view(len(chunk), -1).sum(1) / counts[adapters.index]).sum()
        loss.backward()
        total += loss.item()
    return total


def train_group(model, tok, samples, settings, stop_at=None):
    """Train the tasks of `samples` ({task: [token ids]}) together, the model frozen (requires_grad off for good):
    {task: {name: tensor}}, or None if time.time() passed stop_at before the last step (nothing of it is kept)."""
    model.requires_grad_(False)
    device = next(model.parameters()).device
    bases = list(samples)
    adapters = TaskAdapters(model, tok, bases, settings).to(device)
    optimizer = torch.optim.AdamW(adapters.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    schedule = transformers.get_cosine_schedule_with_warmup(optimizer, settings.warmup_steps, settings.steps)
    collator, n = _collator(model, tok, settings), settings.batch_size
    orders = {b: sample_order(len(samples[b]), settings.steps * n, arc_loader.stable_seed(settings.seed, b, 'order'))
              for b in bases}
    # tokens with a label (the shifted loss never predicts the first token): each task's mean is over its own
    n_labels = {b: [int(np.count_nonzero(np.asarray(collator.labels(ids)[1:]) != -100)) for ids in samples[b]]
                for b in bases}
    handles, start = adapters.attach(model), time.time()
    try:
        for step in range(settings.steps):
            if stop_at is not None and time.time() > stop_at:
                print(f'per-task TTT: out of time at step {step} of {settings.steps}: {len(bases)} tasks stay on the '
                      'base model')
                return None
            rows = [(t, samples[b][j], n_labels[b][j]) for t, b in enumerate(bases)
                    for j in orders[b][step * n:(step + 1) * n]]
            loss = _backward_step(model, adapters, collator, rows, len(bases), settings, device)
            adapters.clip_per_task(settings.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if step % 25 == 0 or step == settings.steps - 1:
                print(f'per-task TTT: step {step + 1}/{settings.steps}, mean task loss {loss / len(bases):.4f}, '
                      f'{time.time() - start:.0f} s', flush=True)
    finally:
        for h in handles:
            h.remove()
    return adapters.per_task()


def task_file(folder, base):
    return os.path.join(folder, f'{base}.safetensors')


def saved_earlier(folder, base):
    """True if an earlier run saved `base`'s parameters in folder and they can be read; a damaged file (a crash
    while copying, a full disk) is set aside with a warning, and the task trains again."""
    path = task_file(folder, base)
    if not os.path.exists(path):
        return False
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        print(f'per-task TTT: {path} cannot be read ({e}): set aside as {path}.damaged, the task trains again')
        os.replace(path, path + '.damaged')
        return False
    return bool(tensors)


def train_tasks(model, tok, dataset, settings, fmt_opts, folder, stop_at=None):
    """Adapt every task of `dataset` (its demonstration pairs only) not yet saved in `folder`, tasks_per_group at a
    time, each finished task saved as folder/<task>.safetensors; stops at stop_at (time.time() seconds): a group
    cut by it is lost, and a group that would end past it at the last group's pace is not started (the time goes
    to the search). Returns the adapted tasks, those saved earlier included."""
    os.makedirs(folder, exist_ok=True)
    bases = sorted(dataset.challenge)
    done = [b for b in bases if saved_earlier(folder, b)]
    if done:
        print(f'per-task TTT: {len(done)} tasks adapted earlier in {folder}')
    todo = [b for b in bases if b not in done]
    samples = task_samples(dataset, todo, tok, settings, fmt_opts)
    todo = [b for b in todo if samples[b]]  # a task without samples stays on the base model
    pace = None  # seconds a task took in the last group (a step trains every task of its group at once)
    for start in range(0, len(todo), settings.tasks_per_group):
        group = todo[start:start + settings.tasks_per_group]
        if stop_at is not None and pace is not None and time.time() + pace * len(group) > stop_at:
            print(f'per-task TTT: tasks {start + 1} to {len(todo)} not started: at the last group\'s pace, '
                  f'{pace * len(group):.0f} s, this group would end past the time limit')
            break
        print(f'per-task TTT ({settings.train}): tasks {start + 1} to {start + len(group)} of {len(todo)}, '
              f'{sum(len(samples[b]) for b in group)} samples')
        began = time.time()
        trained = train_group(model, tok, {b: samples[b] for b in group}, settings, stop_at)
        if trained is None:
            break
        pace = (time.time() - began) / len(group)
        for base, tensors in trained.items():
            save_file(tensors, task_file(folder, base) + '.tmp')
            os.replace(task_file(folder, base) + '.tmp', task_file(folder, base))
        done += group
    return sorted(done)


# ---- the evaluation's use -------------------------------------------------------------------------

def apply_token_rows(model, tok, folder, bases):
    """Add each adapted task's trained row to its task token's input embedding row."""
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        for base in bases:
            row = tok.convert_tokens_to_ids(arc_loader.task_token_text(base))
            emb[row] += load_file(task_file(folder, base))['rows'].to(emb.device, emb.dtype)


def evaluation_ttt(args, dataset, deadline=None):
    """--ttt per_task (and full+per_task) for a recipe with this trainer: (the model the search loads, the folder
    of per-task LoRAs or layer changes it merges task by task, or None). token: the model with every adapted
    task's row, saved in the run directory; lora and full: the model as it was. Both under `per_task_ttt_<key>/`
    (key: the starting weights and the settings) with run_config.json; a rerun resumes from the tasks saved there.
    The training stops at --ttt-max-minutes, at the deadline, and with a deadline but no --ttt-max-minutes at half
    the time left: the tasks not adapted by then are searched with the unadapted model."""
    settings = Settings.from_args(args)
    start = time.time()
    model, tok = model_tools.load_model(args.model, backend='transformers', dtype=torch.float32)
    task_tokens.add_missing(model, tok, dataset.challenge)
    if settings.train == 'token' and not task_tokens.enabled(tok):
        raise input_checks.InputError(f'--per-task-ttt-train token: {args.model} has no task tokens')
    fmt = format_options(args.preprompt, tok)
    key = candidates.cache_key([candidates.model_fingerprint(model), settings.identity(), fmt])[:12]
    root = os.path.join(args.output_dir, f'per_task_ttt_{key}')
    model.to('cuda' if torch.cuda.is_available() else 'cpu')
    stop_at = _stop_time(start, args.ttt_max_minutes, deadline)
    demos = arc_loader.ArcDataset({b: {'train': t['train'], 'test': []} for b, t in dataset.challenge.items()})
    print(f'per-task TTT ({settings.train}): {len(demos.challenge)} tasks, each on its own demonstrations')
    adapted = train_tasks(model, tok, demos, settings, fmt, os.path.join(root, 'tasks'), stop_at)
    record = dict(settings=dataclasses.asdict(settings), base_model=args.model, adapted=adapted,
                  not_adapted=sorted(set(demos.challenge) - set(adapted)), minutes=(time.time() - start) / 60,
                  device=run_record.device_name())
    print(f'per-task TTT: {len(adapted)} of {len(demos.challenge)} tasks adapted in {record["minutes"]:.1f} min')
    run_record.write_run_config(os.path.join(root, 'tasks'), record)
    if settings.train == 'token':
        apply_token_rows(model, tok, os.path.join(root, 'tasks'), adapted)
        model_tools.save_model_and_tokenizer(os.path.join(root, 'model'), model_tools.in_saving_dtype(model), tok,
                                             record)
    del model
    if torch.cuda.is_available():  # the training's cached blocks back to the card: the search sizes its KV cache
        gc.collect()               # from the free memory
        torch.cuda.empty_cache()
    if settings.train in ('lora', 'full'):
        return args.model, os.path.join(root, 'tasks')
    return os.path.join(root, 'model'), None


def _stop_time(start, max_minutes, deadline):
    """When training stops (time.time() seconds, or None): the earliest of the limits."""
    limits = [start + 60 * max_minutes] if max_minutes else []
    if deadline is not None:
        limits.append(deadline if max_minutes else start + (deadline - start) / 2)
    return min(limits) if limits else None


def adapter_runners(model, folder, prompts, search, engine, cache, timings):
    """runner_for_task (candidates.inference_run) over the per-task LoRAs or layer changes in `folder`: an adapted
    task's runner merges its change into the weights on first use and the clean-up restores them; the others use
    the model as it is."""
    settings = saved_settings(folder)
    full, scale = settings['train'] == 'full', settings['alpha'] / settings['r'] ** 0.5
    base_id = candidates.model_fingerprint(model)
    modules, originals = dict(model.named_modules()), {}

    def merge(base):
        tensors = load_file(task_file(folder, base))
        with torch.no_grad():
            for name in adapted_layers(model):
                weight = modules[name].weight
                original = originals.setdefault(name, weight.detach().clone())
                if full:
                    delta = tensors[f'D.{_key(name)}'].float()
                else:
                    delta = scale * (tensors[f'B.{_key(name)}'] @ tensors[f'A.{_key(name)}'])
                weight.copy_((original.float() + delta.to(weight.device)).to(weight.dtype))
        return model

    def restore():
        with torch.no_grad():
            for name, original in originals.items():
                modules[name].weight.copy_(original)

    def runner_for_task(base):
        path = task_file(folder, base)
        if not os.path.exists(path):
            return candidates.TaskRunner(model, base_id, prompts, search, engine, cache, timings), None
        with open(path, 'rb') as f:
            model_id = candidates.cache_key([base_id, hashlib.sha256(f.read()).hexdigest()])[:16]
        return candidates.TaskRunner(lambda: merge(base), model_id, prompts, search, engine, cache, timings), restore
    return runner_for_task


def saved_settings(folder):
    """The per-task TTT settings recorded in folder's run_config.json."""
    with open(os.path.join(folder, run_record.RUN_CONFIG)) as f:
        return json.load(f)['settings']['settings']
