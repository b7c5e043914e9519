"""The initial-finetuning recipe shared by the LoRA recipes (run_finetuning_Nemo-full.py, -Llama-rearc.py,
-SmolLM2.py): its flags (re-arc data, LoRA, trainer), its data, and its two stages, LoRA training on the shrunk
vocabulary and the merge; and full finetuning on packed rows (run_finetuning_SmolLM2.py --method full).
"""
import argparse
import json
import os
import time

import numpy as np
import torch

import input_checks as ic
from arc_downloader import load_arc
from arc_loader import TooLongError, count_tokens, exclude_overlapping, text_format
from model_tools import (FORMAT_CHARS, get_peft_model_arc, in_saving_dtype, keep_single_char_tokens, load_adapter,
                         load_model, merge_peft_into_base, save_adapter, save_model_and_tokenizer)
from packing import PackedRows, plan_rows
from run_record import RUN_CONFIG
from training import (BatchSettings, FormattedKeys, InputMaskingDataCollator, KernelSettings, OptimizerSettings,
                      ProgressLog, RunSettings, train_model)


def training_texts(data, tok, max_tokens):
    """The texts of an (augmented) ArcDataset in the model's own format: replies end with `tok.eos_token`, the
    string the evaluation expects; examples are dropped to fit max_tokens, and a sample that does not fit even
    with one example is left out and counted, as in the seed."""
    texts, too_long = data.texts_within(max_tokens, **text_format(tok.eos_token))
    print(f"{len(texts)} training samples" + (f"; {too_long} left out, longer than {max_tokens} tokens even with "
                                              "one example" if too_long else ""))
    if not texts:
        raise ValueError(f"no training sample fits --max-tokens {max_tokens}")
    return texts


def lora_finetuning_stages(args, data, settings):
    """Train `<name>-lora` then merge into `<name>-merged`; a stage whose output exists is skipped.

    `data` is the augmented ArcDataset, formatted once the tokenizer is known (training_texts); `args` carries the
    recipe's knobs (see run_finetuning_*.py). The vocabulary is shrunk identically in both stages, so the adapter
    trained on the shrunk model fits the reloaded, re-shrunk base.
    """
    lora_dir, merged_dir = f"{args.save_model_path}-lora", f"{args.save_model_path}-merged"
    for stage, out_dir in (("train", lora_dir), ("merge", merged_dir)):
        if os.path.exists(os.path.join(out_dir, RUN_CONFIG)):
            print(f"{stage}: {out_dir} exists, skipping")
            continue
        model, tok = load_model(args.base_model, backend=args.backend,
                                load_in_4bit=args.load_in_4bit and stage == "train",
                                max_seq_length=args.max_tokens)
        keep_single_char_tokens(model, tok, keep=FORMAT_CHARS)
        if stage == "train":
            model = get_peft_model_arc(model, r=args.lora_r, lora_alpha=args.lora_alpha,
                                       lora_dropout=args.lora_dropout, use_rslora=True, seed=args.seed,
                                       backend=args.backend)
            texts = training_texts(data, tok, args.max_tokens)
            start = time.time()
            trainer = train_model(model, tok, texts, f"{lora_dir}-checkpoints", optimizer_settings(args),
                                  BatchSettings(batch_size=args.batch_size, grad_accum=args.grad_accum,
                                                epochs=args.epochs, max_steps=args.max_steps,
                                                mask_first_n_examples=args.mask_first),
                                  run_settings(args))
            tokens = sum(count_tokens(t) + 1 for t in texts)
            seen = min(trainer.state.global_step * args.batch_size * args.grad_accum, len(texts) * args.epochs)
            record = training_record(trainer, len(texts), tokens, tokens * seen / len(texts), time.time() - start)
            print(f"training: {record}")
            save_adapter(lora_dir, model, tok, dict(settings, training=record))
        else:
            model = merge_peft_into_base(load_adapter(model, lora_dir))
            with open(os.path.join(lora_dir, RUN_CONFIG)) as f:
                record = json.load(f)["settings"].get("training")
            save_model_and_tokenizer(merged_dir, model, tok, dict(settings, training=record),
                                     max_shard_mb=args.max_shard_mb)
        del model
    return lora_dir, merged_dir


def optimizer_settings(args):
    """The recipe's optimizer flags (add_lora_training_args) as training.OptimizerSettings."""
    return OptimizerSettings(lr=args.lr, embedding_lr=args.embedding_lr, warmup_ratio=args.warmup_ratio,
                             scheduler=args.scheduler, weight_decay=args.weight_decay, optim=args.optim)


def run_settings(args):
    """The recipe's checkpoint, time-limit, logging and seed flags as training.RunSettings."""
    return RunSettings(save_steps=args.save_steps, max_minutes=args.max_minutes, fit_schedule=args.fit_schedule,
                       logging_steps=args.logging_steps, seed=args.seed)


def training_record(trainer, samples, tokens, trained_tokens, seconds):
    """What the training of this process did: samples, the `tokens` of an epoch counted exactly (one id per
    character, BOS, each special token once), steps done of those planned (fewer when --max-minutes stopped it),
    seconds, and the real (unpadded) tokens trained on per second."""
    state = trainer.state
    return dict(samples=samples, tokens_per_epoch=tokens, steps=state.global_step, steps_planned=state.max_steps,
                seconds=round(seconds, 1), tokens_per_s=round(trained_tokens / max(seconds, 1e-9)))


def packed_samples(data, tok, max_tokens, row_tokens, seed, n_checked=16):
    """(packing.PackedRows of the samples of `data`, the real tokens of each row): each key formatted once here to count its tokens
    (examples dropped to fit max_tokens; a sample too long even with one is left out and counted, as in the seed),
    rows of at most row_tokens cut in a seeded shuffled order, the texts formatted again in the DataLoader workers.
    The first samples are encoded here and checked: the counted length, and replies that end with the model's eos."""
    fmt = text_format(tok.eos_token)
    keys, lengths, too_long = [], [], 0
    for key in data.keys:
        try:
            kept, formatted = data.get_task(key, max_tokens, "text", **fmt)
        except TooLongError:
            too_long += 1
            continue
        keys.append(kept)
        lengths.append(count_tokens(formatted["text"]) + 1)  # + 1: BOS
    if not keys:
        raise ValueError(f"no training sample fits --max-tokens {max_tokens}")
    order = np.random.default_rng(seed).permutation(len(keys))
    samples = FormattedKeys(data.change_keys([keys[i] for i in order]), tok, fmt, max_tokens)
    lengths = [lengths[i] for i in order]
    collator = InputMaskingDataCollator(tok)
    for i in range(min(n_checked, len(keys))):
        ids = samples[i]["input_ids"]
        if len(ids) != lengths[i]:
            raise ValueError(f"training sample {samples.dataset.keys[i]}: {len(ids)} tokens, {lengths[i]} counted: "
                             "the tokenizer is not one token per character (arc_loader.count_tokens)")
        collator.check_reply_ends(ids, f"training sample {samples.dataset.keys[i]}")
    rows = plan_rows(lengths, row_tokens)
    print(f"{len(keys)} training samples" + (f"; {too_long} left out, longer than {max_tokens} tokens even with one "
                                             "example" if too_long else "")
          + f"; {sum(lengths)} tokens in {len(rows)} rows of {row_tokens} ({sum(lengths) / len(rows) / row_tokens:.1%} "
          "filled)")
    return PackedRows(samples, rows), [sum(lengths[i] for i in row) for row in rows]


def full_finetuning_stage(args, data, settings):
    """Train every weight of the base (vocabulary shrunk, float32 weights under bf16 autocast on a GPU) on packed rows
    of args.row_tokens tokens (varlen attention, torch.compile on CUDA), as ArcMini trains; writes
    `<name>-merged` (bf16 on a GPU), the directory the evaluation reads, and skips the stage when it exists. The
    run resumes from `<name>-full-checkpoints`."""
    out_dir = f"{args.save_model_path}-merged"
    if os.path.exists(os.path.join(out_dir, RUN_CONFIG)):
        print(f"train: {out_dir} exists, skipping")
        return out_dir
    model, tok = load_model(args.base_model, backend="transformers", dtype=torch.float32,
                            max_seq_length=args.max_tokens)
    keep_single_char_tokens(model, tok, keep=FORMAT_CHARS)
    rows, row_sums = packed_samples(data, tok, args.max_tokens, args.row_tokens, args.seed)
    start = time.time()
    batches = BatchSettings(batch_size=1, grad_accum=args.grad_accum, epochs=args.epochs, max_steps=args.max_steps,
                            mask_first_n_examples=args.mask_first, sequential=True, packing=args.row_tokens,
                            num_workers=args.num_workers)
    trainer = train_model(model, tok, rows, f"{args.save_model_path}-full-checkpoints", optimizer_settings(args),
                          batches, run_settings(args), KernelSettings(torch_compile=torch.cuda.is_available()),
                          callbacks=[ProgressLog(args.row_tokens * args.grad_accum)])
    trained = sum(row_sums[i % len(row_sums)] for i in range(trainer.state.global_step * args.grad_accum))
    record = training_record(trainer, len(rows.samples), sum(row_sums), trained, time.time() - start)
    print(f"training: {record}")
    save_model_and_tokenizer(out_dir, in_saving_dtype(trainer.model), tok, dict(settings, training=record),
                             max_shard_mb=args.max_shard_mb)
    return out_dir


def add_rearc_args(parser, epochs, save_model_path):
    """The data and output flags of the re-arc recipes; returns the 'data' group for more flags."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    g = parser.add_argument_group("data")
    g.add_argument("--rearc-path", default=os.path.join(repo, "input", "re_arc"), help="re-arc generator output")
    g.add_argument("--rearc-epochs", type=ic.positive_int, default=epochs, help="re-arc epochs (each: every task once, fresh examples)")
    g.add_argument("--rearc-sizes", type=ic.positive_int, nargs="+", default=[6], help="demonstrations per re-arc sample")
    g.add_argument("--save-model-path", default=save_model_path, help="writes <path>-lora and <path>-merged")
    g.add_argument("--max-shard-mb", type=ic.positive_int, default=None,
                   help="save the merged model in weight shards of at most this many MB (a lease brings back 16 MB "
                        "files: docs/GPU.md)")
    g.add_argument("--smoke", action="store_true", help="seconds on CPU: tiny local model, tiny stand-in data, 2 steps")
    return g


def add_lora_training_args(parser, **recipe):
    """The LoRA/trainer knobs shared by the finetuning recipes, with `recipe`'s values as defaults."""
    g = parser.add_argument_group("model and LoRA")
    g.add_argument("--base-model", default=recipe["base_model"], help="hub id or local directory (default: %(default)s)")
    g.add_argument("--backend", default="auto", choices=["auto", "unsloth", "transformers"], help="loader (auto: unsloth on CUDA if installed)")
    g.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=recipe.get("load_in_4bit", True),
                   help="train on 4-bit base weights (CUDA only)")
    g.add_argument("--lora-r", type=ic.int_between(1, ic.MAX_LORA_RANK), default=recipe.get("lora_r", 256), help="LoRA rank")
    g.add_argument("--lora-alpha", type=ic.positive_int, default=recipe.get("lora_alpha", 24), help="LoRA alpha (rsLoRA scaling)")
    g.add_argument("--lora-dropout", type=ic.fraction, default=0.0, help="LoRA dropout")
    g = parser.add_argument_group("training")
    g.add_argument("--max-tokens", type=ic.positive_int, default=recipe.get("max_tokens", 8192), help="sample length limit; examples are dropped to fit")
    g.add_argument("--batch-size", type=ic.positive_int, default=recipe.get("batch_size", 4), help="per-device batch size")
    g.add_argument("--grad-accum", type=ic.positive_int, default=recipe.get("grad_accum", 2), help="gradient accumulation steps")
    g.add_argument("--epochs", type=ic.positive_float, default=1, help="passes over the (already epoch-blocked) data")
    g.add_argument("--lr", type=ic.positive_float, default=1e-4, help="LoRA learning rate")
    g.add_argument("--embedding-lr", type=ic.nonnegative_float, default=1e-5, help="learning rate of embed_tokens and lm_head")
    g.add_argument("--warmup-ratio", type=ic.fraction, default=recipe.get("warmup_ratio", 0.25), help="warmup fraction of all steps")
    g.add_argument("--scheduler", default="cosine", help="learning-rate schedule")
    g.add_argument("--weight-decay", type=ic.nonnegative_float, default=0.0, help="weight decay")
    g.add_argument("--optim", default="adamw_8bit", help="adamw_8bit (bitsandbytes) or adamw_torch")
    g.add_argument("--mask-first", type=ic.nonnegative_int, default=1, help="demonstration outputs not trained on, from the first")
    g.add_argument("--max-steps", type=ic.steps_or_all, default=-1, help="stop after this many steps (-1: all data)")
    g.add_argument("--save-steps", type=ic.positive_int, default=500, help="checkpoint interval (the run resumes from the last one)")
    g.add_argument("--max-minutes", type=ic.positive_float, default=None,
                   help="stop training after this many minutes with a checkpoint and go on to the merge (default: no limit)")
    g.add_argument("--fit-schedule", action="store_true",
                   help="--max-minutes: a run that would not finish in time gets a schedule that ends in time "
                        "(training.TimeLimit) instead of being cut at its current rate")
    g.add_argument("--logging-steps", type=ic.positive_int, default=10, help="log loss and learning rate every N steps")
    g.add_argument("--seed", type=ic.nonnegative_int, default=42, help="seed of the data and the training")
    return parser


# run_finetuning_Llama-rearc.py's LoRA and trainer defaults (the ARC Prize 2024 submission), also the training
# benchmark's LoRA rows.
LLAMA_REARC = dict(base_model="chuanli11/Llama-3.2-3B-Instruct-uncensored", lora_r=256, lora_alpha=24, batch_size=4,
                   grad_accum=2, warmup_ratio=0.25, max_tokens=128000)


def lora_settings(**recipe):
    """The LoRA/trainer settings of a recipe at their defaults (add_lora_training_args with `recipe`)."""
    return add_lora_training_args(argparse.ArgumentParser(), **recipe).parse_args([])


def evaluation_sets():
    """{name: dataset} of the two evaluation sets that the held-out recipes never train on."""
    return {"ARC-AGI-1 evaluation": load_arc("evaluation"),
            "ARC-AGI-2 evaluation": load_arc("evaluation", "arc-prize-2025")}


def guard_against_evaluation(data, name):
    """`data` without any task or sample that shares a grid pair with ARC-AGI-1 or ARC-AGI-2 evaluation."""
    for ev_name, ev in evaluation_sets().items():
        data = exclude_overlapping(data, ev, f"{name} (vs {ev_name})")
    return data


def arc_training_tasks():
    """ARC-AGI-1 training and ARC-AGI-2 training (less its copies of ARC-AGI-1 tasks), held out from both evaluation
    sets, with their test pairs moved to the demonstrations: {part name: dataset}."""
    arc1, arc2 = load_arc("training"), load_arc("training", "arc-prize-2025")
    arc2 = exclude_overlapping(arc2, arc1, "ARC-AGI-2 training (vs ARC-AGI-1 training, duplicates)")
    return {name: guard_against_evaluation(ds, name).move_test_to_train()
            for name, ds in (("arc1-train", arc1), ("arc2-train", arc2))}
