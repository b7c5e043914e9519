"""Tests for training: collator masking, the optimizer's groups, train_model (loss, resuming, time limit), one GPU
per process. The texts and the tiny model come from test_model_tools.
"""
import pytest
import torch
import transformers

import model_tools as mt
import training as tr
from test_model_tools import DEMOS, QUERY, REPLY, grid_rows, task_pieces, text_of, tiny_model, tok  # noqa: F401


def expected_labels(tok, pieces, skip_spans=0):
    ids, labels, span = [], [], 0
    for toks, trained in pieces:
        piece_ids = tok.convert_tokens_to_ids(toks)
        keep = trained and span >= skip_spans
        span += trained
        ids += piece_ids
        labels += piece_ids if keep else [-100] * len(piece_ids)
    return ids, labels


# ------------------------------------------------------------------------------------------------
# Collator


@pytest.mark.parametrize("mask_first,skip", [(0, 0), (1, 1), (2, 2), (5, 2)])
def test_collator_labels_exactly_the_outputs(tok, mask_first, skip):
    pieces = task_pieces(DEMOS, QUERY, REPLY)  # three outputs: two demos + the reply
    ids, want = expected_labels(tok, pieces, skip_spans=skip)
    batch = tr.InputMaskingDataCollator(tok, mask_first_n_examples=mask_first)([{"text": text_of(pieces)}])
    assert batch["input_ids"][0].tolist() == ids
    assert batch["labels"][0].tolist() == want
    assert sum(x != -100 for x in want) > 0


@pytest.mark.parametrize("mask_first,labelled", [(0, [9, 10, 11, 20, 21, 22]), (1, [20, 21, 22])])
def test_collator_literal_positions(tok, mask_first, labelled):
    # <s> I 1 \n + / - = O [2 \n </s>] I 3 \n + / - = O [4 \n </s>]: positions counted by hand
    text = "I1\n+/-=O2\n</s>I3\n+/-=O4\n</s>"
    batch = tr.InputMaskingDataCollator(tok, mask_first_n_examples=mask_first)([{"text": text}])
    labels = batch["labels"][0]
    assert len(labels) == 23 and torch.nonzero(labels != -100).flatten().tolist() == labelled
    assert labels[labelled].tolist() == batch["input_ids"][0, labelled].tolist()


@pytest.mark.parametrize("mask_first,skip", [(0, 0), (1, 1), (3, 1)])
def test_collator_one_demo_plus_query(tok, mask_first, skip):
    pieces = task_pieces(DEMOS[:1], QUERY, REPLY)
    ids, want = expected_labels(tok, pieces, skip_spans=skip)
    collator = tr.InputMaskingDataCollator(tok, mask_first_n_examples=mask_first)
    assert collator([{"input_ids": ids}])["labels"][0].tolist() == want


def test_collator_never_masks_the_last_output_and_ignores_empty_tail(tok):
    # Demonstrations only, ending in a query without reply: the empty tail is no output span.
    pieces = task_pieces(DEMOS[:1], QUERY)
    ids, want = expected_labels(tok, pieces)
    labels = tr.InputMaskingDataCollator(tok, mask_first_n_examples=1)([{"input_ids": ids}])["labels"][0]
    assert labels.tolist() == want and (labels != -100).sum() == len(grid_rows(DEMOS[0][1])) + 2


def reference_spans(ids, reply, eos):
    """output_spans by its definition, one token at a time."""
    spans, i = [], 0
    while i + len(reply) <= len(ids):
        if ids[i:i + len(reply)] != reply:
            i += 1
            continue
        beg = end = i + len(reply)
        while end < len(ids) and ids[end] != eos:
            end += 1
        end = min(end + 1, len(ids))
        if end > beg:
            spans.append((beg, end))
        i = end
    return spans


def test_output_spans_equal_their_definition_on_random_ids(tok):
    """Unterminated replies, a reply marker inside a reply or at the very end, back-to-back markers."""
    import numpy as np
    collator = tr.InputMaskingDataCollator(tok)
    reply, eos = collator.reply_ids, collator.eos_id
    rng = np.random.default_rng(0)
    alphabet = [eos, reply[0], reply[1], 5, 6]
    for _ in range(500):
        ids = []
        for _ in range(rng.integers(0, 8)):
            ids += reply if rng.random() < 0.4 else [int(rng.choice(alphabet))] * int(rng.integers(1, 3))
        assert collator.output_spans(ids) == reference_spans(ids, reply, eos), ids


def test_formatted_keys_give_the_tokenizers_ids(tok):
    """FormattedKeys encode by table lookup (model_tools.CharEncoder): the same ids as the tokenizer."""
    import arc_loader
    import task_tokens
    from arc_downloader import arc_paths
    arc = mt.arc_tokenizer()
    ds = arc_loader.ArcDataset.load_from_json(arc_paths('evaluation')[0]).first_tasks(10)
    task_tokens.add_tokens(arc, sorted(ds.challenge))
    fmt = dict(arc_loader.FMT_OPTS, reply_end='\n' + arc.eos_token, task_token=True)
    data = tr.FormattedKeys(ds.augment(seed=0, tp=True, rt=True, perm=True, shfl_ex=True, no_task_token=0.3), arc, fmt, max_tokens=8192)
    assert data.encode is not None
    for i in range(len(data)):
        text = data.dataset.get_task(data.dataset.keys[i], 8192, 'text', **fmt)[1]['text']
        assert data[i]['input_ids'] == list(arc(text)['input_ids'])


def test_collator_pads_right(tok):
    short = text_of(task_pieces(DEMOS[:1], QUERY, REPLY))
    long_ = text_of(task_pieces(DEMOS, QUERY, REPLY))
    batch = tr.InputMaskingDataCollator(tok, pad_to_multiple_of=8)([{"text": short}, {"text": long_}])
    n_short, n_long = len(tok(short)["input_ids"]), len(tok(long_)["input_ids"])
    assert batch["input_ids"].shape == (2, -(-n_long // 8) * 8)
    assert batch["attention_mask"][0].sum() == n_short and batch["attention_mask"][1].sum() == n_long
    assert (batch["input_ids"][0, n_short:] == tok.pad_token_id).all()
    assert (batch["labels"][0, n_short:] == -100).all() and (batch["labels"][1, n_long:] == -100).all()
    assert batch["labels"][0, n_short - 1] == tok.eos_token_id


# ------------------------------------------------------------------------------------------------
# Optimizer


def test_make_optimizer_groups(tok):
    peft_model = mt.get_peft_model_arc(tiny_model(tok), r=4)
    opt = tr.make_optimizer(peft_model, lr=1e-4, embedding_lr=1e-5)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 1e-5]
    emb = {id(p) for p in opt.param_groups[1]["params"]}
    names = {n for n, p in peft_model.named_parameters() if id(p) in emb}
    assert names == {"base_model.model.model.embed_tokens.modules_to_save.default.weight",
                     "base_model.model.lm_head.modules_to_save.default.weight"}
    assert all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad and n not in names)
    with pytest.raises(ValueError, match="optim"):
        tr.make_optimizer(peft_model, optim="sgd")


# ------------------------------------------------------------------------------------------------
# Training


def train_texts():
    demos = [([[i % 10, (i + 1) % 10]], [[(i + 2) % 10, (i + 3) % 10]]) for i in range(4)]
    return [text_of(task_pieces(demos[k:k + 2], [[k, k]], [[k + 2, k + 2]])) for k in range(3)]


def batch_loss(model, tok, texts):
    batch = tr.InputMaskingDataCollator(tok, mask_first_n_examples=1)([{"text": t} for t in texts])
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


@pytest.mark.slow
def test_train_model_loss_falls(tok, tmp_path):
    model = tiny_model(tok)
    texts = train_texts()
    before = batch_loss(model, tok, texts)
    trainer = tr.train_model(model, tok, texts, str(tmp_path / "run"),
                             tr.OptimizerSettings(lr=1e-2, embedding_lr=1e-2, warmup_ratio=0.0),
                             tr.BatchSettings(batch_size=3, grad_accum=1, max_steps=12),
                             tr.RunSettings(save_steps=100, logging_steps=4, seed=0))
    assert trainer.state.global_step == 12
    assert batch_loss(model, tok, texts) < 0.7 * before


@pytest.mark.slow
def test_train_model_on_packed_texts(tok, tmp_path):
    """Texts (as TTT passes them) packed into rows: training works through the varlen attention, and the model
    attends as before once it is done."""
    model = tiny_model(tok)
    texts = train_texts()
    before, row = batch_loss(model, tok, texts), sum(len(tok(t)["input_ids"]) for t in texts)
    trainer = tr.train_model(model, tok, texts, str(tmp_path / "run"),
                             tr.OptimizerSettings(lr=1e-2, embedding_lr=1e-2, warmup_ratio=0.0),
                             tr.BatchSettings(batch_size=1, grad_accum=1, max_steps=12, packing=row),
                             tr.RunSettings(save_steps=100, logging_steps=4, seed=0))
    assert len(trainer.train_dataset) == 1  # the three texts fill one row exactly
    assert model.config._attn_implementation == "sdpa"
    assert batch_loss(model, tok, texts) < 0.7 * before


class StepCounter(transformers.TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


@pytest.mark.slow
def test_train_model_resumes_from_checkpoint(tok, tmp_path):
    out = str(tmp_path / "run")
    optimizer, run = tr.OptimizerSettings(lr=1e-3, warmup_steps=1), tr.RunSettings(save_steps=2, seed=0)
    peft_model = mt.get_peft_model_arc(tiny_model(tok), r=4)
    tr.train_model(peft_model, tok, train_texts(), out, optimizer, tr.BatchSettings(1, 1, max_steps=4), run)
    assert tr.last_checkpoint(out).endswith("checkpoint-4")

    counter = StepCounter()
    peft_model = mt.get_peft_model_arc(tiny_model(tok), r=4)
    trainer = tr.train_model(peft_model, tok, train_texts(), out, optimizer, tr.BatchSettings(1, 1, max_steps=6), run,
                             tr.KernelSettings(bf16=True), callbacks=[counter])
    assert counter.steps == [5, 6] and trainer.state.global_step == 6
    # bf16 autocast that accelerate wrapped around forward is removed after training
    assert "_original_forward" not in peft_model.__dict__
    assert tr.last_checkpoint(out).endswith("checkpoint-6")


@pytest.mark.slow
def test_time_limit_stops_saves_and_warns(tok, tmp_path, capsys):
    out = str(tmp_path / "run")
    trainer = tr.train_model(tiny_model(tok), tok, train_texts(), out, tr.OptimizerSettings(lr=1e-3, warmup_steps=1),
                             tr.BatchSettings(batch_size=1, grad_accum=1, max_steps=5),
                             tr.RunSettings(save_steps=100, seed=0, max_minutes=1e-9))
    assert trainer.state.global_step == 1 and tr.last_checkpoint(out).endswith("checkpoint-1")
    assert "out of time at step 1 of 5" in capsys.readouterr().out


def test_one_gpu_per_process_keeps_trainer_off_data_parallel(tmp_path):
    # a plain process on a machine with 4 GPUs: Trainer would wrap the model in nn.DataParallel, which cuts
    # the (3, batch, seq) grid position ids along the wrong axis (seen on 4 x H100 in shared TTT)
    args = tr.training_arguments(
        str(tmp_path), tr.OptimizerSettings(lr=1e-3, warmup_steps=0, scheduler='constant'),
        tr.BatchSettings(batch_size=2, grad_accum=1, max_steps=1), tr.RunSettings(save_steps=1, logging_steps=1, seed=0),
        tr.KernelSettings(bf16=False))
    _ = args.device
    args._n_gpu = 4
    assert tr.one_gpu_per_process(args).n_gpu == 1
    assert args.train_batch_size == 2  # per-process batch, not multiplied by the GPUs


def test_torch_compile_reaches_the_trainer(tmp_path):
    """Set after construction, TrainingArguments.torch_compile picks no backend and nothing compiles."""
    args = tr.training_arguments(str(tmp_path), tr.OptimizerSettings(lr=1e-3, warmup_steps=0),
                                 tr.BatchSettings(batch_size=1, grad_accum=1, max_steps=2),
                                 tr.RunSettings(save_steps=10, logging_steps=1, seed=0),
                                 tr.KernelSettings(bf16=False, torch_compile=True))
    assert args.torch_compile and args.torch_compile_backend == "inductor"


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _time_limited(monkeypatch, minutes, max_steps, scheduler="cosine", fit=True):
    clock = _Clock()
    monkeypatch.setattr(tr.time, "time", clock)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = transformers.get_scheduler(scheduler, optimizer, num_warmup_steps=5, num_training_steps=max_steps)
    limit, state, control = tr.TimeLimit(minutes, fit), transformers.TrainerState(), transformers.TrainerControl()
    state.max_steps, state.global_step = max_steps, 0
    limit.on_train_begin(None, state, control)

    def step(seconds):  # one optimizer step of `seconds`, then the callback, as Trainer calls it
        clock.now += seconds
        optimizer.step()
        schedule.step()
        state.global_step += 1
        return limit.on_step_end(None, state, transformers.TrainerControl(), lr_scheduler=schedule)
    return step, state, schedule


def test_time_limit_fits_the_schedule_into_the_time_left(monkeypatch, capsys):
    step, state, schedule = _time_limited(monkeypatch, minutes=1, max_steps=1000)
    step(10)  # the first step compiles: not timed
    while not step(1).should_training_stop:
        pass
    # timed from step 2 (11 s) to step 22 (31 s): 1 s a step, 29 s left, 97% of them: 28 more steps (refitted at
    # 48 s, four fifths of the time: the same); the 50th step stops, with a checkpoint
    assert state.max_steps == state.global_step == 50
    assert schedule.get_last_lr()[0] < 1e-3 <= schedule.lr_lambdas[0](45)  # decayed at its new end, not before
    assert "the schedule now ends at step 50 of 1000 planned" in capsys.readouterr().out


def test_time_limit_leaves_a_run_that_fits_and_cuts_without_fitting(monkeypatch, capsys):
    step, state, schedule = _time_limited(monkeypatch, minutes=1, max_steps=40)
    assert [step(1).should_training_stop for _ in range(40)].index(True) == 39 and state.max_steps == 40
    step, state, schedule = _time_limited(monkeypatch, minutes=1, max_steps=1000, fit=False)
    stops = [step(1).should_training_stop for _ in range(70)]
    assert stops.index(True) == 60 and state.max_steps == 1000 and "out of time at step 61 of 1000" in capsys.readouterr().out
    step, state, schedule = _time_limited(monkeypatch, minutes=1, max_steps=1000, scheduler="constant_with_warmup")
    assert [step(1).should_training_stop for _ in range(70)].index(True) == 60 and state.max_steps == 1000
    assert "this schedule has no horizon to fit" in capsys.readouterr().out


@pytest.mark.slow
def test_a_time_limited_run_ends_with_its_schedule_decayed(tok, tmp_path, capsys):
    trainer = tr.train_model(tiny_model(tok), tok, train_texts() * 50, str(tmp_path / "run"),
                             tr.OptimizerSettings(lr=1e-3, warmup_steps=2),
                             tr.BatchSettings(batch_size=1, grad_accum=1, max_steps=100000),
                             tr.RunSettings(save_steps=10 ** 6, seed=0, max_minutes=0.2, fit_schedule=True,
                                            logging_steps=10 ** 6))
    assert "the schedule now ends at step" in capsys.readouterr().out
    assert trainer.state.global_step <= trainer.state.max_steps < 100000
    assert trainer.lr_scheduler.get_last_lr()[0] < 5e-5  # the cosine ran (about) to its end, not cut at full rate


def test_time_limit_decisions_are_agreed_across_ranks(tmp_path):
    # under torchrun each rank times itself; a stop or a horizon taken by one rank alone would hang the others in
    # their next gradient all-reduce, so the decisions are all-reduced (here a one-process gloo group)
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/rendezvous', rank=0, world_size=1)
    try:
        args = type('Args', (), {'device': torch.device('cpu')})()
        assert tr._agreed(args, True) == 1.0 and tr._agreed(args, False) == 0.0
        assert tr._agreed(args, 37, dist.ReduceOp.MIN) == 37.0
    finally:
        dist.destroy_process_group()
    assert tr._agreed(None, 5) == 5  # no process group: the value as it is
