"""Model layer: ARC tokenizer, model factory and loading, vocabulary shrinking, LoRA, masking collator,
training, and saving (with run_config.json) of models and adapters.

unsloth, peft, tokenizers and bitsandbytes are imported inside the functions that need them, so importing
this module costs only torch + transformers. Every function works on CPU through transformers + peft;
the unsloth path is taken only where a CUDA GPU and unsloth are present.
"""
import argparse
import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
import transformers

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
# The characters the seed's finetuning scripts keep when shrinking a pretrained vocabulary (§4).
FORMAT_CHARS = (
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ" "abcdefghijklmnopqrstuvwxyz" "0123456789" "!?.:,;*+/-=" "\n"
)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EMBEDDING_MODULES = ("embed_tokens", "lm_head")
REPLY_BEG = "\n+/-=O"
RUN_CONFIG = "run_config.json"
VERSIONED_PACKAGES = (
    "torch", "transformers", "peft", "trl", "accelerate", "datasets", "tokenizers",
    "unsloth", "unsloth_zoo", "bitsandbytes",
)


# --------------------------------------------------------------------------------------------------
# ARC-native tokenizer and from-scratch model


def arc_tokenizer(chars=None, model_max_length=None):
    """Character-level fast tokenizer: <pad> <s> </s> (ids 0, 1, 2) + one token per character, BOS added."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    chars = list(FORMAT_CHARS if chars is None else chars)
    _check_char_list(chars)
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + chars)}
    # No unk token: a character outside the vocabulary must fail loudly, not train on a placeholder.
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("(?m:.)"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # joins tokens with '' so decode(encode(text)) == text
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", **kwargs)


def _check_char_list(chars):
    bad = [c for c in chars if len(c) != 1]
    assert not bad, f"arc_tokenizer: every entry must be a single character, got {bad!r}"
    assert len(set(chars)) == len(chars), "arc_tokenizer: duplicate characters in chars"


def _model_classes(arch):
    archs = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig}
    if arch not in archs:
        raise ValueError(f"create_model: unknown arch {arch!r}, expected one of {sorted(archs)}")
    return archs[arch]


def create_model(tokenizer, arch="llama", hidden_size=256, num_layers=4, num_heads=4,
                 intermediate_size=None, max_position_embeddings=8192, seed=0, dtype=torch.float32,
                 **config_kwargs):
    """Randomly initialised stock HF causal LM (Llama or Mistral) sized to the tokenizer's vocabulary."""
    assert hidden_size % num_heads == 0, "create_model: hidden_size must be a multiple of num_heads"
    if arch == "mistral":
        config_kwargs.setdefault("sliding_window", None)  # full attention, like Llama
    config = _model_classes(arch)(
        vocab_size=len(tokenizer), hidden_size=hidden_size,
        intermediate_size=intermediate_size or _default_intermediate_size(hidden_size),
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **config_kwargs)
    with _seeded(seed):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def _default_intermediate_size(hidden_size):
    # Llama's ~8/3 MLP ratio, rounded up to a multiple of 64.
    return 64 * math.ceil(8 * hidden_size / 3 / 64)


@contextlib.contextmanager
def _seeded(seed):
    """Run a block under a fixed torch seed without disturbing the caller's global RNG stream."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------------
# Loading


def load_model(path, backend="auto", load_in_4bit=False, dtype=None, max_seq_length=None):
    """Load (model, tokenizer) through unsloth on a CUDA machine that has it, else transformers."""
    backend = _resolve_load_backend(backend)
    max_seq_length = max_seq_length or max_seq_length_from_config(path)
    if backend == "unsloth":
        model, tok = _load_unsloth(path, load_in_4bit, dtype, max_seq_length)
    else:
        model, tok = _load_transformers(path, load_in_4bit, dtype)
    set_max_seq_length(model, max_seq_length)
    return model, tok


def _resolve_load_backend(backend):
    if backend not in ("auto", "unsloth", "transformers"):
        raise ValueError(f"load_model: backend must be auto, unsloth or transformers, got {backend!r}")
    if backend != "auto":
        return backend
    if not torch.cuda.is_available():
        return "transformers"
    try:
        import unsloth  # noqa: F401  (unsloth must be imported before transformers models are built)
    except ImportError:
        return "transformers"
    return "unsloth"


def max_seq_length_from_config(path):
    """The longest sequence a saved model supports: max_position_embeddings, else generation max_length."""
    config = transformers.AutoConfig.from_pretrained(path)
    length = getattr(config.get_text_config(), "max_position_embeddings", None)
    if length:
        return int(length)
    try:
        length = transformers.GenerationConfig.from_pretrained(path).max_length
    except OSError:
        length = None
    if not length or length == transformers.GenerationConfig().max_length:
        raise ValueError(f"{path}: no max_position_embeddings or generation max_length; "
                         "pass max_seq_length explicitly")
    return int(length)


def _load_unsloth(path, load_in_4bit, dtype, max_seq_length):
    from unsloth import FastLanguageModel

    return FastLanguageModel.from_pretrained(
        model_name=path, dtype=dtype, load_in_4bit=load_in_4bit, max_seq_length=max_seq_length)


def _load_transformers(path, load_in_4bit, dtype):
    # bf16 checkpoints run in float32 on the CPU: CPU bf16 matmuls are slow and less precise
    kwargs = {"dtype": dtype or ("auto" if torch.cuda.is_available() else torch.float32)}
    if load_in_4bit and torch.cuda.is_available():
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype or torch.bfloat16)
        kwargs["device_map"] = "auto"
    elif load_in_4bit:
        print("load_model: 4-bit loading needs CUDA (bitsandbytes); loading unquantized on CPU")
    elif torch.cuda.is_available():
        kwargs["device_map"] = "cuda"  # on the GPU like unsloth's models
    model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model, transformers.AutoTokenizer.from_pretrained(path)


def set_max_seq_length(model, max_seq_length):
    """Set max_seq_length on the model and every nested .model (works around unsloth pinning 2048)."""
    # Newer unsloth fixes max_seq_length=2048 regardless of the config; DFS then crashes on long
    # prompts (seed issue #8), so the value is written on every wrapper level.
    obj = model
    while obj is not None:
        obj.max_seq_length = max_seq_length
        obj = getattr(obj, "model", None)


# --------------------------------------------------------------------------------------------------
# Vocabulary shrinking


def keep_single_char_tokens(model, tokenizer, keep=None, keep_norm=False, keep_model_tok=True,
                            remove_unk=False):
    """Shrink a fast BPE tokenizer and the model's embeddings to single characters; return {old: new id}."""
    if not keep_norm:
        remove_tokenizer_normalizer(tokenizer)
    keep_ids = _single_char_ids(tokenizer) if keep is None else _ids_for_tokens(tokenizer, keep)
    if keep_model_tok and model is not None:
        keep_ids |= model_token_ids(model)
    mapping = shrink_tokenizer_vocab(tokenizer, keep_ids, remove_unk=remove_unk)
    if model is not None:
        shrink_model_embeddings(model, mapping)
    return mapping


def _backend_json(tokenizer):
    return json.loads(tokenizer.backend_tokenizer.to_str())


def _set_backend_json(tokenizer, data):
    from tokenizers import Tokenizer

    # transformers looks every id up in the backend, so swapping the backend updates the wrapper too.
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(data))


def remove_tokenizer_normalizer(tokenizer):
    """Drop the normalizer, so characters reach the (shrunk) vocabulary unchanged."""
    data = _backend_json(tokenizer)
    data["normalizer"] = None
    _set_backend_json(tokenizer, data)


def _single_char_ids(tokenizer):
    return {i for tok, i in tokenizer.get_vocab().items() if len(tok) == 1}


def _ids_for_tokens(tokenizer, keep):
    vocab = tokenizer.get_vocab()
    return {vocab[_vocab_form(tok, vocab)] for tok in keep}


def _vocab_form(token, vocab):
    """The vocabulary entry spelling `token`: itself, its byte-level form ('\\n' -> 'Ċ') or <0xNN>."""
    candidates = [token, "".join(_byte_level_alphabet()[b] for b in token.encode("utf-8"))]
    if len(token.encode("utf-8")) == 1:
        candidates.append(f"<0x{token.encode('utf-8')[0]:02X}>")  # sentencepiece byte fallback
    for cand in candidates:
        if cand in vocab:
            return cand
    raise ValueError(f"keep_single_char_tokens: token {token!r} is not in the vocabulary "
                     f"(tried {candidates!r})")


def _byte_level_alphabet():
    """GPT-2 byte-level BPE's byte -> printable character table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, shift = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:  # unprintable bytes are moved past 255, in byte order
            table[b] = chr(256 + shift)
            shift += 1
    return table


def model_token_ids(model):
    """All ids named by a `*token_id` field of the model config and generation config."""
    ids = set()
    for cfg in _token_configs(model):
        for key, value in vars(cfg).items():
            if key.endswith("token_id") and value is not None:
                ids.update(value if isinstance(value, (list, tuple)) else [value])
    return {int(i) for i in ids}


def _token_configs(model):
    configs = [model.config]
    if getattr(model, "generation_config", None) is not None:
        configs.append(model.generation_config)
    return configs


def shrink_tokenizer_vocab(tokenizer, keep_ids, remove_unk=False):
    """Keep `keep_ids` + specials of a fast BPE tokenizer, renumbered in sorted order; return {old: new}."""
    data = _backend_json(tokenizer)
    if data["model"]["type"] != "BPE":
        raise ValueError(f"shrink_tokenizer_vocab needs a fast BPE tokenizer, got {data['model']['type']}")
    keep = set(keep_ids) | set(tokenizer.all_special_ids) | _post_processor_ids(data["post_processor"])
    unk_id = data["model"]["vocab"].get(data["model"].get("unk_token"))
    if remove_unk and unk_id is not None:
        keep.discard(unk_id)
        data["model"]["unk_token"] = None
    mapping = {old: new for new, old in enumerate(sorted(keep))}
    _check_ids_known(data, mapping)
    data["model"]["vocab"] = {t: mapping[i] for t, i in data["model"]["vocab"].items() if i in mapping}
    data["model"]["merges"] = []  # every kept token is a single character: nothing left to merge
    data["added_tokens"] = [dict(t, id=mapping[t["id"]]) for t in data["added_tokens"] if t["id"] in mapping]
    _remap_post_processor(data["post_processor"], mapping)
    _set_backend_json(tokenizer, data)
    return mapping


def _check_ids_known(data, mapping):
    known = set(data["model"]["vocab"].values()) | {t["id"] for t in data["added_tokens"]}
    unknown = sorted(set(mapping) - known)
    assert not unknown, f"shrink_tokenizer_vocab: ids {unknown} belong to no token of the tokenizer"


def _post_processor_ids(proc):
    """Ids the post-processor inserts (TemplateProcessing special tokens, Bert/Roberta cls and sep)."""
    if not proc:
        return set()
    ids = set()
    for sub in proc.get("processors", []):
        ids |= _post_processor_ids(sub)
    for spec in (proc.get("special_tokens") or {}).values():
        ids.update(spec["ids"])
    for key in ("cls", "sep"):
        if key in proc:
            ids.add(proc[key][1])
    return ids


def _remap_post_processor(proc, mapping):
    if not proc:
        return
    for sub in proc.get("processors", []):
        _remap_post_processor(sub, mapping)
    for spec in (proc.get("special_tokens") or {}).values():
        spec["ids"] = [mapping[i] for i in spec["ids"]]
    for key in ("cls", "sep"):
        if key in proc:
            proc[key][1] = mapping[proc[key][1]]


def shrink_model_embeddings(model, mapping):
    """Cut embedding and lm_head rows to the kept ids (in new-id order) and remap config token ids."""
    old_ids = torch.tensor(sorted(mapping, key=mapping.get), dtype=torch.long)
    rows = model.get_input_embeddings().weight.shape[0]
    assert int(old_ids.max()) < rows, f"shrink_model_embeddings: id {int(old_ids.max())} >= {rows} rows"
    saved = _embedding_rows(model, old_ids)
    model.resize_token_embeddings(len(old_ids), mean_resizing=False)
    _restore_embedding_rows(model, saved)
    remap_config_token_ids(model, mapping)


def _embedding_rows(model, old_ids):
    out = model.get_output_embeddings()
    weight = model.get_input_embeddings().weight
    saved = {"in": weight.data[old_ids.to(weight.device)].clone()}
    if out is not None:
        saved["out"] = out.weight.data[old_ids.to(out.weight.device)].clone()
        if getattr(out, "bias", None) is not None:
            saved["bias"] = out.bias.data[old_ids.to(out.bias.device)].clone()
    return saved


def _restore_embedding_rows(model, saved):
    model.get_input_embeddings().weight.data.copy_(saved["in"])
    out = model.get_output_embeddings()
    if "out" in saved:
        out.weight.data.copy_(saved["out"])
    if "bias" in saved:
        out.bias.data.copy_(saved["bias"])


def remap_config_token_ids(model, mapping):
    """Map every `*token_id` of config and generation config through `mapping` (dropped ids -> None)."""
    for cfg in _token_configs(model):
        for key, value in list(vars(cfg).items()):
            if not key.endswith("token_id") or value is None:
                continue
            if isinstance(value, (list, tuple)):
                setattr(cfg, key, [mapping[v] for v in value if v in mapping])
            else:
                setattr(cfg, key, mapping.get(value))


# --------------------------------------------------------------------------------------------------
# LoRA and optimizer


def get_peft_model_arc(model, r=256, lora_alpha=24, lora_dropout=0.0, target_modules=LORA_TARGETS,
                       train_embeddings=True, use_rslora=True, seed=42, backend="auto",
                       gradient_checkpointing=True):
    """Wrap `model` with (rs)LoRA on attention + MLP; embed_tokens and lm_head trained in full."""
    if _peft_backend(model, backend) == "unsloth":
        return _unsloth_peft(model, r, lora_alpha, lora_dropout, target_modules, train_embeddings,
                             use_rslora, seed, gradient_checkpointing)
    import peft

    config = peft.LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=list(target_modules),
        modules_to_save=list(EMBEDDING_MODULES) if train_embeddings else None, bias="none",
        use_rslora=use_rslora, task_type="CAUSAL_LM")
    with _seeded(seed):
        return peft.get_peft_model(model, config)


def _peft_backend(model, backend):
    if backend not in ("auto", "unsloth", "transformers"):
        raise ValueError(f"get_peft_model_arc: backend must be auto, unsloth or transformers, "
                         f"got {backend!r}")
    if backend != "auto":
        return backend
    # A CUDA model while unsloth is imported was loaded (and patched) by unsloth.
    on_cuda = next(model.parameters()).is_cuda
    return "unsloth" if on_cuda and "unsloth" in sys.modules else "transformers"


def _unsloth_peft(model, r, lora_alpha, lora_dropout, target_modules, train_embeddings, use_rslora,
                  seed, gradient_checkpointing):
    from unsloth import FastLanguageModel

    # unsloth turns embed_tokens / lm_head listed as targets into fully trained modules_to_save.
    targets = list(target_modules) + (list(EMBEDDING_MODULES) if train_embeddings else [])
    return FastLanguageModel.get_peft_model(
        model, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
        bias="none", use_rslora=use_rslora, random_state=seed, loftq_config=None,
        use_gradient_checkpointing="unsloth" if gradient_checkpointing else False)


def is_embedding_param(name):
    """True for embed_tokens / lm_head weights, including their peft modules_to_save copies."""
    return any(part in EMBEDDING_MODULES for part in name.split("."))


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

    def _n_masked(self, n_spans):
        # The first outputs are masked only while a later output remains to train on.
        return min(self.mask_first_n_examples, max(n_spans - 1, 0))

    def output_spans(self, ids):
        """Non-empty [beg, end) spans from just after each reply_beg to just past the next eos."""
        spans, k, i = [], len(self.reply_ids), 0
        while i + k <= len(ids):
            if ids[i:i + k] != self.reply_ids:
                i += 1
                continue
            beg = end = i + k
            while end < len(ids) and ids[end] != self.eos_id:
                end += 1
            end = min(end + 1, len(ids))  # include the eos; an unterminated reply runs to the end
            if end > beg:
                spans.append((beg, end))
            i = end
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


def training_arguments(output_dir, *, batch_size, grad_accum, epochs, lr, warmup, scheduler,
                       weight_decay, max_steps, save_steps, save_total_limit, seed, bf16,
                       logging_steps, gradient_checkpointing, torch_compile=False):
    """TrainingArguments of the recipe (report_to none, periodic checkpoints, our own collator's columns)."""
    if bf16 is None:
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return transformers.TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, num_train_epochs=epochs, max_steps=max_steps,
        learning_rate=lr, lr_scheduler_type=scheduler, warmup_steps=warmup, weight_decay=weight_decay,
        save_strategy="steps", save_steps=save_steps, save_total_limit=save_total_limit, seed=seed,
        data_seed=seed, bf16=bf16, logging_steps=logging_steps, report_to="none",
        # The collator needs input_ids only, but Trainer would inspect the (peft) forward signature.
        remove_unused_columns=False, gradient_checkpointing=gradient_checkpointing,
        disable_tqdm=False, use_cpu=not torch.cuda.is_available(),
        # At construction: TrainingArguments picks the compile backend in __post_init__ (set later, nothing compiles).
        torch_compile=torch_compile,
        dataloader_pin_memory=torch.cuda.is_available())


def _warmup_value(warmup_ratio, warmup_steps):
    # TrainingArguments reads a float below 1 as a ratio of the total steps and an int as steps.
    if warmup_steps is not None:
        return int(warmup_steps)
    assert 0 <= warmup_ratio < 1, f"train_model: warmup_ratio must be in [0, 1), got {warmup_ratio}"
    return float(warmup_ratio)


@contextlib.contextmanager
def attention_without_cudnn():
    """PyTorch attention (SDPA) on flash, memory-efficient or math kernels, not cuDNN's.

    cuDNN's attention (the default on H100 with torch 2.11) builds an execution plan for every new shape, and
    both decoding (the key length grows by one each step) and length-bucketed training keep changing shapes.
    README, "Speed": greedy decoding and training on an H100 measured with and without it.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield


def train_model(model, tokenizer, texts, output_dir, *, batch_size=4, grad_accum=2, epochs=1, lr=1e-4,
                embedding_lr=1e-5, warmup_ratio=0.25, warmup_steps=None, scheduler="cosine",
                weight_decay=0.0, optim="adamw_torch", mask_first_n_examples=1, max_steps=-1,
                save_steps=500, save_total_limit=None, seed=42, bf16=None, logging_steps=10,
                resume=True, max_len=None, gradient_checkpointing=False, callbacks=None, betas=(0.9, 0.999),
                sequential=False, max_minutes=None, num_workers=0, torch_compile=False, cudnn_attention=False,
                packing=None):
    """Train `model` on formatted texts with HF Trainer (loss on outputs only); resumes from output_dir.

    `texts` is a list of formatted texts or a ready dataset of {'input_ids'} (e.g. FormattedKeys).
    warmup_steps, when given, replaces warmup_ratio; `sequential` keeps the data order (pre-shuffled,
    length-bucketed data); `max_minutes` stops and saves a checkpoint when the time is up; `cudnn_attention`
    allows cuDNN's attention kernels (off: see attention_without_cudnn). `packing` (row capacity in tokens) trains
    on packed rows (packing.py): `texts` is then a packing.PackedRows, or texts/tokenized samples that are packed
    here in a seeded shuffled order; batch_size counts rows, and the model attends through packing.VARLEN during
    training only.
    Returns the Trainer (trainer.state.global_step etc.).
    """
    args = training_arguments(
        output_dir, batch_size=batch_size, grad_accum=grad_accum, epochs=epochs, lr=lr,
        warmup=_warmup_value(warmup_ratio, warmup_steps), scheduler=scheduler,
        weight_decay=weight_decay, max_steps=max_steps, save_steps=save_steps,
        save_total_limit=save_total_limit, seed=seed, bf16=bf16, logging_steps=logging_steps,
        gradient_checkpointing=gradient_checkpointing, torch_compile=torch_compile)
    args.train_sampling_strategy = "sequential" if sequential else args.train_sampling_strategy
    args.dataloader_num_workers = num_workers
    one_gpu_per_process(args)
    optimizer = make_optimizer(model, lr=lr, embedding_lr=embedding_lr, weight_decay=weight_decay,
                               optim=optim, betas=betas)
    data = tokenize_texts(tokenizer, texts, max_len) if isinstance(texts, (list, tuple)) else texts
    callbacks = list(callbacks or []) + ([TimeLimit(max_minutes)] if max_minutes else [])
    collator = InputMaskingDataCollator(tokenizer, mask_first_n_examples=mask_first_n_examples,
                                        position_fn=_position_fn(model))
    if packing:
        data, collator = _packed(data, collator, packing, seed)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, data_collator=collator,
        processing_class=tokenizer, callbacks=callbacks,
        optimizers=(optimizer, None))  # Trainer builds the lr schedule from args
    with attention_without_cudnn() if not cudnn_attention else contextlib.nullcontext(), \
            _attention(model, packing):
        trainer.train(resume_from_checkpoint=last_checkpoint(output_dir) if resume else None)
    # accelerate wraps model.forward in bf16 autocast for mixed precision and leaves it there; undo
    # that so the trained model runs (and merges) in its own dtype afterwards.
    trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    return trainer


def _packed(data, collator, capacity, seed):
    """(rows dataset, packing collator): `data` as given if it is a packing.PackedRows, else its samples packed
    in a seeded shuffled order."""
    import packing

    if not isinstance(data, packing.PackedRows):
        order = np.random.default_rng(seed).permutation(len(data)).tolist()
        samples = [data[i] for i in order]
        data = packing.PackedRows(samples, packing.plan_rows([len(s["input_ids"]) for s in samples], capacity))
    pad_id = collator.pad_id
    return data, packing.PackedCollator(collator.labels, pad_id, capacity, collator.position_fn)


@contextlib.contextmanager
def _attention(model, packing_capacity):
    """The model attends through packing.VARLEN inside the block when packing, then returns to its own."""
    if not packing_capacity:
        yield
        return
    import packing

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
    """Stop training (and save a checkpoint) once `minutes` have passed: runs fit machines lent for minutes."""

    def __init__(self, minutes):
        self.seconds, self.start = 60 * minutes, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        if time.time() - self.start > self.seconds:
            control.should_training_stop = control.should_save = True
            if state.global_step < state.max_steps and state.is_world_process_zero:
                print(f'WARNING: out of time at step {state.global_step} of {state.max_steps}: the learning rate '
                      'schedule is unfinished. Run again to continue from the checkpoint, or with fewer max steps '
                      'to decay from here (the schedule is rebuilt over the new step count).')
        return control


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

    def __len__(self):
        return len(self.dataset.keys)

    def __getitem__(self, i):
        _, fmt = self.dataset.get_task(self.dataset.keys[i], self.max_tokens, "text", **self.fmt_opts)
        return {"input_ids": self.tokenizer(fmt["text"])["input_ids"]}


def _position_fn(model):
    """Grid positions for the collator when the model has them (grid_positions.py), else None."""
    import grid_positions

    if not grid_positions.has_grid_positions(model):
        return None
    return lambda ids: grid_positions.position_ids_for(model, ids)


def last_checkpoint(output_dir):
    """The newest `checkpoint-<step>` folder in output_dir, or None."""
    if not os.path.isdir(output_dir):
        return None
    return transformers.trainer_utils.get_last_checkpoint(output_dir)


# --------------------------------------------------------------------------------------------------
# Saving, loading and merging


def save_model_and_tokenizer(path, model, tokenizer, settings=None, max_shard_size=None):
    """save_pretrained model (or adapter) and tokenizer plus run_config.json, via `<path>.tmp` + rename;
    max_shard_size (e.g. '15MB') splits the weights into shards of at most that size."""
    tmp = f"{path}.tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    # A leftover sentencepiece file would be loaded instead of the shrunk tokenizer.json.
    if os.path.exists(os.path.join(tmp, "tokenizer.model")):
        os.remove(os.path.join(tmp, "tokenizer.model"))
    write_run_config(tmp, settings)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def save_adapter(path, model, tokenizer=None, settings=None):
    """Save a peft model's adapter (LoRA + full embed/lm_head copies) with the same atomic layout."""
    import peft

    assert isinstance(model, peft.PeftModel), "save_adapter: model is not a peft model"
    save_model_and_tokenizer(path, model, tokenizer, settings)


def write_run_config(path, settings=None):
    """Write run_config.json: settings, package versions, python, git commit, date, command line."""
    config = {
        "settings": settings or {},
        "versions": package_versions(),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv),
    }
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, RUN_CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True, default=str)
    return config


def package_versions():
    """Installed versions of the packages the results depend on (None where not installed)."""
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit():
    """HEAD of the repository holding this file (or $GIT_COMMIT where the tree came without .git), or None."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def load_adapter(base_model, adapter_path, is_trainable=False):
    """Attach a saved adapter to `base_model` (a peft.PeftModel)."""
    import peft

    return peft.PeftModel.from_pretrained(base_model, adapter_path, is_trainable=is_trainable)


def fix_dtypes(model, dtype=None):
    """Cast floating parameters to the model dtype (and bnb quant_state.dtype) after a merge."""
    # Parameters only: buffers such as RoPE's inv_freq are kept in float32 on purpose.
    dtype = dtype or _model_dtype(model)
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
        if quant_state is not None:
            quant_state.dtype = dtype
    return model


def _model_dtype(model):
    dtype = getattr(model.config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype if isinstance(dtype, torch.dtype) else model.dtype


def merge_peft_into_base(model):
    """merge_and_unload() the adapter into the base weights, then fix_dtypes."""
    return fix_dtypes(model.merge_and_unload())


def get_and_fix_peft_weights(adapter_path):
    """Adapter state dict without the duplicate modules_to_save / original_module copies of embed/lm_head."""
    from peft.utils import load_peft_weights

    state = load_peft_weights(adapter_path, device="cpu")
    for key in [k for k in state if ".modules_to_save." in k or ".original_module." in k]:
        plain = key.replace(".original_module", "").replace(".modules_to_save", "")
        plain = plain.replace(".default.", ".")
        assert plain in state, f"get_and_fix_peft_weights: {key} has no plain counterpart {plain}"
        del state[key]
    return state


def set_peft_weights(model, state):
    """Load an adapter state dict into a peft model; fail on unexpected keys."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    assert not unexpected, f"set_peft_weights: unexpected keys {unexpected[:5]}"
    return result


def load_peft_state(model, adapter_path):
    """Load the weights of a saved adapter into an existing peft model (e.g. to reset it between tasks)."""
    return set_peft_weights(model, get_and_fix_peft_weights(adapter_path))


# --------------------------------------------------------------------------------------------------
# The initial-finetuning stages shared by the run_finetuning_<model>.py recipes


def lora_finetuning_stages(args, texts, settings):
    """Train `<name>-lora` then merge into `<name>-merged`; a stage whose output exists is skipped.

    `args` carries the recipe's knobs (see run_finetuning_*.py); the vocabulary is shrunk identically in
    both stages, so the adapter trained on the shrunk model fits the reloaded, re-shrunk base.
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
            train_model(model, tok, texts, f"{lora_dir}-checkpoints", batch_size=args.batch_size,
                        grad_accum=args.grad_accum, epochs=args.epochs, lr=args.lr,
                        embedding_lr=args.embedding_lr, warmup_ratio=args.warmup_ratio,
                        scheduler=args.scheduler, weight_decay=args.weight_decay, optim=args.optim,
                        mask_first_n_examples=args.mask_first, max_steps=args.max_steps,
                        save_steps=args.save_steps, seed=args.seed)
            save_adapter(lora_dir, model, tok, settings)
        else:
            model = merge_peft_into_base(load_adapter(model, lora_dir))
            save_model_and_tokenizer(merged_dir, model, tok, settings)
        del model
    return lora_dir, merged_dir


def add_rearc_args(parser, epochs, save_model_path):
    """The data and output flags of the re-arc recipes; returns the 'data' group for more flags."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    g = parser.add_argument_group("data")
    g.add_argument("--rearc-path", default=os.path.join(repo, "input", "re_arc"), help="re-arc generator output")
    g.add_argument("--rearc-epochs", type=int, default=epochs, help="re-arc epochs (each: every task once, fresh examples)")
    g.add_argument("--rearc-sizes", type=int, nargs="+", default=[6], help="demonstrations per re-arc sample")
    g.add_argument("--save-model-path", default=save_model_path, help="writes <path>-lora and <path>-merged")
    g.add_argument("--smoke", action="store_true", help="seconds on CPU: tiny local model, tiny stand-in data, 2 steps")
    return g


def add_lora_training_args(parser, **recipe):
    """The LoRA/trainer knobs shared by the finetuning recipes, with `recipe`'s values as defaults."""
    g = parser.add_argument_group("model and LoRA")
    g.add_argument("--base-model", default=recipe["base_model"], help="hub id or local directory (default: %(default)s)")
    g.add_argument("--backend", default="auto", choices=["auto", "unsloth", "transformers"], help="loader (auto: unsloth on CUDA if installed)")
    g.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=recipe.get("load_in_4bit", True),
                   help="train on 4-bit base weights (CUDA only)")
    g.add_argument("--lora-r", type=int, default=recipe.get("lora_r", 256), help="LoRA rank")
    g.add_argument("--lora-alpha", type=int, default=recipe.get("lora_alpha", 24), help="LoRA alpha (rsLoRA scaling)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout")
    g = parser.add_argument_group("training")
    g.add_argument("--max-tokens", type=int, default=recipe.get("max_tokens", 8192), help="sample length limit; examples are dropped to fit")
    g.add_argument("--batch-size", type=int, default=recipe.get("batch_size", 4), help="per-device batch size")
    g.add_argument("--grad-accum", type=int, default=recipe.get("grad_accum", 2), help="gradient accumulation steps")
    g.add_argument("--epochs", type=float, default=1, help="passes over the (already epoch-blocked) data")
    g.add_argument("--lr", type=float, default=1e-4, help="LoRA learning rate")
    g.add_argument("--embedding-lr", type=float, default=1e-5, help="learning rate of embed_tokens and lm_head")
    g.add_argument("--warmup-ratio", type=float, default=recipe.get("warmup_ratio", 0.25), help="warmup fraction of all steps")
    g.add_argument("--scheduler", default="cosine", help="learning-rate schedule")
    g.add_argument("--weight-decay", type=float, default=0.0, help="weight decay")
    g.add_argument("--optim", default="adamw_8bit", help="adamw_8bit (bitsandbytes) or adamw_torch")
    g.add_argument("--mask-first", type=int, default=1, help="demonstration outputs not trained on, from the first")
    g.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: all data)")
    g.add_argument("--save-steps", type=int, default=500, help="checkpoint interval (the run resumes from the last one)")
    g.add_argument("--seed", type=int, default=42, help="seed of the data and the training")
    return parser


def apply_finetuning_smoke(args, root, neoneye):
    """Point a finetuning recipe at tiny local stand-ins (model, re-arc, ConceptARC) and 2 CPU steps."""
    import smoke

    args.base_model = smoke.make_tiny_base_model(os.path.join(root, "base_model"), arch="mistral")
    args.rearc_path = smoke.make_fake_rearc(os.path.join(root, "re_arc"))
    if neoneye:
        args.conceptarc_path = smoke.make_fake_neoneye(os.path.join(root, "conceptarc"))
        args.mix_repeats = 2
    args.save_model_path = os.path.join(root, os.path.basename(args.save_model_path))
    args.rearc_epochs, args.rearc_sizes, args.max_tokens = 2, [3], min(args.max_tokens, 4096)
    if not torch.cuda.is_available():  # on a GPU the smoke run keeps --backend (e.g. unsloth) and 4-bit
        args.backend, args.load_in_4bit, args.optim = "transformers", False, "adamw_torch"
    args.lora_r, args.max_steps, args.batch_size, args.grad_accum = 8, 2, 2, 1
    return args
