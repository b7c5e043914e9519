"""Model layer: the ARC tokenizer, model factory and loading, vocabulary shrinking, LoRA, and saving (with
run_config.json), merging and reloading of models and adapters. Training lives in training.py.

unsloth, peft, tokenizers and bitsandbytes are imported inside the functions that need them, so importing
this module costs only torch + transformers. Every function works on CPU through transformers + peft;
the unsloth path is taken only where a CUDA GPU and unsloth are present.
"""
import contextlib
import json
import math
import os
import re
import shutil
import sys

import numpy as np
import torch
import transformers

from input_checks import InputError
from run_record import write_run_config
from seeding import seeded_torch

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
# The characters the seed's finetuning scripts keep when shrinking a pretrained vocabulary (§4).
FORMAT_CHARS = (
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ" "abcdefghijklmnopqrstuvwxyz" "0123456789" "!?.:,;*+/-=" "\n"
)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EMBEDDING_MODULES = ("embed_tokens", "lm_head")


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


class CharEncoder:
    """`tokenizer(text, add_special_tokens=bos)["input_ids"]` for an arc_tokenizer (one token per character, added
    tokens such as task tokens and '</s>' matched whole) by a table lookup: the main job tokenizes about 50M
    characters of prompts and replies, which the tokenizer's per-character split makes cost tens of seconds.
    `CharEncoder.of(tokenizer)` is None for any other tokenizer, or one whose output differs on a probe text."""

    def __init__(self, tokenizer):
        added = tokenizer.get_added_vocab()
        self.chars = {t: i for t, i in tokenizer.get_vocab().items() if t not in added}
        self.added = added
        self.split = re.compile("(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")") \
            if added else None
        self.table = np.full(max(map(ord, self.chars)) + 1, -1, dtype=np.int64)
        for t, i in self.chars.items():
            self.table[ord(t)] = i
        self.bos = [tokenizer.bos_token_id]

    @classmethod
    def of(cls, tokenizer):
        if not getattr(tokenizer, "is_fast", False) or tokenizer.bos_token_id is None:
            return None
        added = tokenizer.get_added_vocab()
        if any(len(t) != 1 for t in tokenizer.get_vocab() if t not in added):
            return None
        encoder = cls(tokenizer)
        probe = "".join(encoder.chars) + "".join(added) + "\n" + "".join(reversed(list(encoder.chars)))
        try:
            same = all(encoder(probe, bos) == list(tokenizer(probe, add_special_tokens=bos)["input_ids"])
                       for bos in (True, False))
        except ValueError:  # a character the tokenizer writes otherwise (a byte-level BPE's '\n' is its token 'Ċ')
            return None
        return encoder if same else None

    def __call__(self, text, bos):
        ids = list(self.bos) if bos else []
        for n, piece in enumerate(self.split.split(text) if self.split else [text]):
            if n % 2:
                ids.append(self.added[piece])
            elif piece:
                codes = np.frombuffer(piece.encode("utf-32-le"), dtype=np.uint32)
                found = self.table[np.minimum(codes, len(self.table) - 1)]
                bad = (codes >= len(self.table)) | (found < 0)
                if bad.any():
                    raise ValueError(f"CharEncoder: character {piece[int(np.argmax(bad))]!r} is not in the vocabulary")
                ids.extend(found.tolist())
        return ids


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
    with seeded_torch(seed):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def _default_intermediate_size(hidden_size):
    # Llama's ~8/3 MLP ratio, rounded up to a multiple of 64.
    return 64 * math.ceil(8 * hidden_size / 3 / 64)


# --------------------------------------------------------------------------------------------------
# Loading


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class ModelLoadError(InputError):
    """A saved model that cannot be used: unreadable or missing files, or weights that are not finite numbers."""


def load_model(path, backend="auto", load_in_4bit=False, dtype=None, max_seq_length=None):
    """Load (model, tokenizer) through unsloth on a CUDA machine that has it, else transformers; a damaged
    folder or non-finite weights raise ModelLoadError (checked here, before any work is done with them)."""
    backend = _resolve_load_backend(backend)
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise ModelLoadError(f"{path}: no tokenizer in the folder (none of {', '.join(TOKENIZER_FILES)})")
    try:
        max_seq_length = max_seq_length or max_seq_length_from_config(path)
        if backend == "unsloth":
            model, tok = _load_unsloth(path, load_in_4bit, dtype, max_seq_length)
        else:
            model, tok = _load_transformers(path, load_in_4bit, dtype)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:  # the library's own words, in one line
        raise ModelLoadError(f"{path}: cannot load the model ({type(e).__name__}: {_first_line(e)})") from e
    except Exception as e:
        if type(e).__name__ != "SafetensorError":  # safetensors' error for damaged bytes (no common base class)
            raise
        raise ModelLoadError(f"{path}: a weights file is damaged ({_first_line(e)})") from e
    set_max_seq_length(model, max_seq_length)
    if len(tok) < 2:  # transformers builds an empty tokenizer from a config alone
        raise ModelLoadError(f"{path}: the tokenizer has {len(tok)} tokens: its files are damaged")
    check_weights(model, tok, path)
    return model, tok


def _first_line(error):
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0][:300] if lines else "no message"


def check_weights(model, tokenizer, path):
    """Raise ModelLoadError if a weight holds NaN or inf, or a forward pass on a short prompt gives
    non-finite logits (a damaged or diverged model would otherwise give no candidates, in silence)."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            bad = int((~torch.isfinite(param)).sum())
            raise ModelLoadError(f"{path}: weight {name} holds {bad} non-finite values (NaN or inf) of "
                                 f"{param.numel()}: a damaged or diverged model")
    ids = tokenizer("0123\n", add_special_tokens=True)["input_ids"][:8] or [0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], device=model.device)).logits
    if not bool(torch.isfinite(logits).all()):
        raise ModelLoadError(f"{path}: the model gives non-finite logits on a short prompt (NaN or inf)")


def _resolve_load_backend(backend):
    if backend not in ("auto", "unsloth", "transformers"):
        raise ValueError(f"load_model: backend must be auto, unsloth or transformers, got {backend!r}")
    if backend == "unsloth" and not _unsloth_available():
        raise ModelLoadError("--backend unsloth: unsloth is not installed or there is no CUDA GPU "
                             "(pip install -r requirements-gpu.txt on a GPU machine; or --backend transformers)")
    if backend != "auto":
        return backend
    return "unsloth" if _unsloth_available() else "transformers"


def _unsloth_available():
    if not torch.cuda.is_available():
        return False
    try:
        import unsloth  # noqa: F401  (unsloth must be imported before transformers models are built)
    except ImportError:
        return False
    return True


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
        untie_embeddings(model)
    return mapping


def untie_embeddings(model):
    """Give lm_head its own copy of tied input embeddings (SmolLM2, Llama 3.2): LoRA trains embed_tokens and
    lm_head as two separate full copies (modules_to_save), and a merged model saved with tied weights would keep
    only one of them. After the vocabulary shrink the copy is a few rows."""
    configs = {id(c): c for c in (model.config, model.config.get_text_config())}.values()
    if not any(getattr(c, "tie_word_embeddings", False) for c in configs):
        return
    out = model.get_output_embeddings()
    out.weight = torch.nn.Parameter(out.weight.detach().clone(), requires_grad=out.weight.requires_grad)
    for c in configs:
        c.tie_word_embeddings = False


def set_special_tokens(model, tokenizer, bos, eos, pad):
    """Name the tokenizer's bos, eos and pad tokens (existing tokens), add BOS in front of every encoded text,
    and write their ids into the model's config and generation config."""
    from tokenizers import processors

    ids = {}
    for role, token in (("bos", bos), ("eos", eos), ("pad", pad)):
        ids[role] = tokenizer.convert_tokens_to_ids(token)
        if ids[role] is None or tokenizer.convert_ids_to_tokens(ids[role]) != token:
            raise ValueError(f"set_special_tokens: {role} token {token!r} is not in the vocabulary")
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = bos, eos, pad
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ids["bos"])])
    for cfg in _token_configs(model):
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = ids["bos"], ids["eos"], ids["pad"]
    probe = tokenizer("1")["input_ids"]
    assert probe[0] == ids["bos"] and len(probe) == 2, f"set_special_tokens: BOS not added ({probe})"


def base_model_from_gguf(gguf_path, bos, eos, pad, dtype=torch.float32):
    """(model, tokenizer) of a GGUF file through transformers (weights dequantized to `dtype`), as a plain
    transformers model: the GGUF quantizer detached (save_pretrained refuses the model before) and the special
    tokens named (transformers' GGUF tokenizer may report another eos than the model's, no pad, and no BOS)."""
    folder, name = os.path.split(os.path.abspath(gguf_path))
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    model.hf_quantizer = None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.config.name_or_path = name
    set_special_tokens(model, tok, bos, eos, pad)
    return model, tok


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
# LoRA


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
    with seeded_torch(seed):
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


# --------------------------------------------------------------------------------------------------
# Attention kernels (training and inference)


@contextlib.contextmanager
def attention_without_cudnn():
    """PyTorch attention (SDPA) on flash, memory-efficient or math kernels, not cuDNN's.

    cuDNN's attention (the default on H100 with torch 2.11) builds an execution plan for every new shape, and
    both decoding (the key length grows by one each step) and length-bucketed training keep changing shapes.
    docs/SPEED.md, "cuDNN attention": greedy decoding and training on an H100 measured with and without it.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield


# --------------------------------------------------------------------------------------------------
# Saving, loading and merging


def in_saving_dtype(model):
    """A trained model as it is saved: bf16 on a GPU (float32 weights trained under autocast), float32 on a CPU."""
    return model.to(dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)


def save_model_and_tokenizer(path, model, tokenizer, settings=None, max_shard_mb=None):
    """save_pretrained model (or adapter) and tokenizer plus run_config.json, via `<path>.tmp` + rename;
    max_shard_mb (the scripts' --max-shard-mb) splits the weights into shards of at most that many MB."""
    tmp = f"{path}.tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, **({"max_shard_size": int(max_shard_mb * 1e6)} if max_shard_mb else {}))

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


def merged_for_inference(model):
    """A peft model's adapter merged into its base weights, for a search that only reads the model: one matrix per
    projection again, where an unmerged LoRA runs two more products and an addition on every projection of every
    decode step. A 4-bit base keeps its adapter (merging would quantize the sum again); anything else is returned
    as it is."""
    import peft

    if not isinstance(model, peft.PeftModel) or any("4bit" in type(m).__name__ for m in model.modules()):
        return model
    return merge_peft_into_base(model)


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
