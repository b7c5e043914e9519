"""Tests for model_tools: tokenizer, model factory, vocabulary shrinking, adapters, saving and loading."""
import copy
import json
import os

import pytest
import torch
import transformers

import model_tools as mt
import run_record

PREPROMPT = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghjklmnpqrstuvwxyz"
EOS = "</s>"


def grid_rows(grid):
    return "\n".join("".join(str(c) for c in row) for row in grid)


# Each piece is (tokens, trained?): the expected labels follow from the format by construction.
def demo_pieces(inp, out):
    return [(list("I" + grid_rows(inp) + "\n+/-=O"), False), (list(grid_rows(out) + "\n") + [EOS], True)]


def task_pieces(demos, query, reply=None):
    pieces = [(["<s>"] + list(PREPROMPT), False)]
    for inp, out in demos:
        pieces += demo_pieces(inp, out)
    pieces.append((list("I" + grid_rows(query) + "\n+/-=O"), False))
    if reply is not None:
        pieces.append((list(grid_rows(reply) + "\n") + [EOS], True))
    return pieces


def text_of(pieces):
    return "".join("".join(toks) for toks, _ in pieces)[len("<s>"):]  # the tokenizer adds the BOS


DEMOS = [([[1, 2], [3, 4]], [[5, 6], [7, 8]]), ([[0, 9, 9]], [[9], [9], [0]])]
QUERY, REPLY = [[4, 4], [2, 1]], [[3]]


@pytest.fixture(scope="module")
def tok():
    return mt.arc_tokenizer()


def tiny_model(tok, seed=0, **kw):
    return mt.create_model(tok, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                           max_position_embeddings=512, seed=seed, **kw)


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


# ------------------------------------------------------------------------------------------------
# Tokenizer


def test_arc_tokenizer_one_id_per_char_and_round_trip(tok, tmp_path):
    text = text_of(task_pieces(DEMOS, QUERY, REPLY))
    ids = tok(text)["input_ids"]
    chars = ["<s>"] + [c for piece, _ in task_pieces(DEMOS, QUERY, REPLY) for c in piece][1:]
    assert ids == tok.convert_tokens_to_ids(chars)
    assert ids[0] == tok.bos_token_id == 1 and tok.pad_token_id == 0 and tok.eos_token_id == 2
    assert ids.count(tok.eos_token_id) == 3 and len(tok) == 77
    assert tok.decode(ids) == "<s>" + text
    assert tok.decode(ids, skip_special_tokens=True) == text.replace(EOS, "")
    tok.save_pretrained(tmp_path)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids and again.decode(ids) == "<s>" + text


def test_arc_tokenizer_rejects_unknown_characters(tok):
    with pytest.raises(Exception, match="UNK|unk"):
        tok("I12\n+/-=O#")
    with pytest.raises(AssertionError, match="single character"):
        mt.arc_tokenizer(chars=["ab"])


def test_char_encoder_equals_the_tokenizer_on_real_prompts_and_replies():
    """The table-lookup encoder of the main job gives the tokenizer's ids exactly: task tokens, '</s>', BOS or not."""
    import arc_loader
    import task_tokens
    from arc_downloader import arc_paths
    tok = mt.arc_tokenizer()
    ds = arc_loader.ArcDataset.load_from_json(arc_paths('evaluation')[0]).first_tasks(30)
    task_tokens.add_tokens(tok, sorted(ds.challenge))
    enc = mt.CharEncoder.of(tok)
    assert enc is not None
    fmt = dict(arc_loader.FMT_OPTS, preprompt='', reply_end='\n' + tok.eos_token, task_token=True)
    texts = []
    for key in ds.keys:
        f = ds.fmt_task(key, **fmt)
        texts += [f['input'], f['text'], f['reply']]
    for text in texts:
        for bos in (True, False):
            assert enc(text, bos) == list(tok(text, add_special_tokens=bos)['input_ids'])
    with pytest.raises(ValueError, match="'#' is not in the vocabulary"):
        enc("I12\n+/-=O#", True)


def test_char_encoder_declines_other_tokenizers(tok):
    wordy = transformers.PreTrainedTokenizerFast(tokenizer_object=mt.arc_tokenizer().backend_tokenizer)
    assert mt.CharEncoder.of(wordy) is None  # no BOS token: not the arc_tokenizer's template
    from tokenizers import Tokenizer, models, pre_tokenizers
    backend = Tokenizer(models.WordLevel(vocab={"<s>": 0, "ab": 1, "c": 2}, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    multi = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>")
    assert mt.CharEncoder.of(multi) is None  # a token of two characters


def test_char_encoder_declines_a_shrunk_byte_level_tokenizer(tmp_path):
    """The LLM recipes keep one-character tokens of a byte-level BPE (run_benchmark_training's LoRA row): every token
    is one character, but '\n' is written 'Ċ', so the table would not know it; the tokenizer is used instead."""
    import smoke
    smoke.make_tiny_base_model(str(tmp_path / 'base'))
    model, small = mt.load_model(str(tmp_path / 'base'), backend='transformers')
    mt.keep_single_char_tokens(model, small, keep=mt.FORMAT_CHARS)
    assert mt.CharEncoder.of(small) is None


def test_create_model_is_seeded_and_leaves_global_rng_alone(tok):
    torch.manual_seed(123)
    want_next = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = tiny_model(tok, seed=3), tiny_model(tok, seed=3), tiny_model(tok, seed=4)
    assert torch.rand(1) == want_next
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.config.vocab_size == len(tok) and a.config.eos_token_id == tok.eos_token_id
    assert isinstance(tiny_model(tok, arch="mistral"), transformers.MistralForCausalLM)
    with pytest.raises(ValueError, match="unknown arch"):
        tiny_model(tok, arch="gpt9")


# ------------------------------------------------------------------------------------------------
# Vocabulary shrinking


def bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [text_of(task_pieces(DEMOS, QUERY, REPLY)), "Hello world, this is text: 1234 5678!"] * 20
    trainer = trainers.BpeTrainer(vocab_size=350, special_tokens=["<pad>", "<x>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    # Added after training, so bos/eos get the highest ids and must really be renumbered.
    backend.add_special_tokens(["<|begin|>", "<|end|>"])
    begin_id = backend.token_to_id("<|begin|>")
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin|> $A", special_tokens=[("<|begin|>", begin_id)])])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin|>", eos_token="<|end|>", pad_token="<pad>")


def test_keep_single_char_tokens_keeps_logits():
    tok = bpe_tokenizer()
    model = tiny_model(tok)
    old_tok, old_model = copy.deepcopy(tok), copy.deepcopy(model)
    assert len(tok("I12\n34\n+/-=O")["input_ids"]) < 13  # merges exist before shrinking
    mapping = mt.keep_single_char_tokens(model, tok, keep=list(mt.FORMAT_CHARS))
    assert len(tok) == len(mapping) == 73 + 1 + 3  # format chars + newline + pad, bos, eos
    assert sorted(mapping.values()) == list(range(len(mapping)))
    assert list(mapping) == sorted(mapping)  # relative order preserved
    assert tok.backend_tokenizer.normalizer is None
    assert old_model.config.eos_token_id > 300 and tok.eos_token_id == len(tok) - 1

    text = "I12\n34\n+/-=O56\n78\n<|end|>Az!?"
    new_ids = tok(text)["input_ids"]
    assert len(new_ids) == 1 + len(text) - len("<|end|>") + 1  # bos + one id per char
    inverse = {new: old for old, new in mapping.items()}
    old_ids = [inverse[i] for i in new_ids]
    assert old_tok.convert_ids_to_tokens(old_ids) == tok.convert_ids_to_tokens(new_ids)
    assert tok.decode(new_ids, skip_special_tokens=True) == text.replace("<|end|>", "")
    kept_cols = torch.tensor(sorted(mapping))
    torch.testing.assert_close(logits(model, new_ids), logits(old_model, old_ids)[:, kept_cols],
                               atol=1e-5, rtol=0)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(model.config, key) == mapping[getattr(old_model.config, key)]
        assert getattr(model.generation_config, key) == getattr(model.config, key)
    assert model.config.vocab_size == len(tok) and model.get_output_embeddings().weight.shape[0] == len(tok)


def test_keep_single_char_tokens_default_keeps_all_single_chars():
    tok = bpe_tokenizer()
    n_single = sum(len(t) == 1 for t in tok.get_vocab())
    mapping = mt.keep_single_char_tokens(None, tok)
    assert len(tok) == len(mapping) == n_single + 3  # + pad, bos, eos (the unnamed <x> is dropped)
    assert tok.decode(tok("Hello\nworld")["input_ids"], skip_special_tokens=True) == "Hello\nworld"
    kept_norm = bpe_tokenizer()
    mt.keep_single_char_tokens(None, kept_norm, keep=["a"], keep_norm=True)
    assert kept_norm.backend_tokenizer.normalizer is not None and len(kept_norm) == 4
    with pytest.raises(ValueError, match="not in the vocabulary"):
        mt.keep_single_char_tokens(None, bpe_tokenizer(), keep=["\u4e2d"])


# ------------------------------------------------------------------------------------------------
# LoRA adapters


def randomize_adapter(peft_model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:  # lora_B starts at zero; make the adapter actually change the outputs
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


@pytest.mark.slow
def test_adapter_save_load_merge_same_logits(tok, tmp_path):
    peft_model = mt.get_peft_model_arc(tiny_model(tok), r=4)
    randomize_adapter(peft_model)
    ids = tok(text_of(task_pieces(DEMOS, QUERY, REPLY)))["input_ids"]
    want = logits(peft_model, ids)
    assert not torch.allclose(want, logits(tiny_model(tok), ids), atol=1e-3)
    mt.save_adapter(tmp_path / "lora", peft_model, tok, settings={"r": 4})
    assert os.path.exists(tmp_path / "lora" / run_record.RUN_CONFIG) and not os.path.exists(tmp_path / "lora.tmp")

    loaded = mt.load_adapter(tiny_model(tok), tmp_path / "lora")
    torch.testing.assert_close(logits(loaded, ids), want, atol=1e-4, rtol=0)
    fresh = mt.get_peft_model_arc(tiny_model(tok), r=4, seed=7)
    mt.load_peft_state(fresh, tmp_path / "lora")
    torch.testing.assert_close(logits(fresh, ids), want, atol=1e-4, rtol=0)
    merged = mt.merge_peft_into_base(loaded)
    assert isinstance(merged, transformers.LlamaForCausalLM)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    torch.testing.assert_close(logits(merged, ids), want, atol=1e-4, rtol=0)


def test_merged_for_inference_is_the_adapters_model_without_its_layers(tok):
    """The search after a shared TTT reads a merged model: the same logits, no LoRA layers left; a plain model is
    returned as it is."""
    peft_model = mt.get_peft_model_arc(tiny_model(tok), r=4)
    randomize_adapter(peft_model)
    ids = tok(text_of(task_pieces(DEMOS, QUERY, REPLY)))["input_ids"]
    want = logits(peft_model, ids)
    merged = mt.merged_for_inference(peft_model)
    assert isinstance(merged, transformers.LlamaForCausalLM)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, ids), want, atol=1e-4, rtol=0)
    assert mt.merged_for_inference(merged) is merged


# ------------------------------------------------------------------------------------------------
# Saving and loading


def test_save_model_and_tokenizer_reloads(tok, tmp_path):
    model = tiny_model(tok, arch="mistral")
    path = tmp_path / "model"
    mt.save_model_and_tokenizer(path, model, tok, settings={"lr": 1e-4, "dtype": torch.float32})
    cfg = json.loads((path / run_record.RUN_CONFIG).read_text())
    assert cfg["settings"]["lr"] == 1e-4 and cfg["versions"]["transformers"] == transformers.__version__
    assert {"python", "git_commit", "date", "argv"} <= set(cfg)
    assert not os.path.exists(f"{path}.tmp")
    ids = tok("I12\n+/-=O")["input_ids"]
    again = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(again, transformers.MistralForCausalLM)
    torch.testing.assert_close(logits(again, ids), logits(model, ids))
    assert transformers.AutoTokenizer.from_pretrained(path)("I12\n+/-=O")["input_ids"] == ids

    loaded, loaded_tok = mt.load_model(path)  # auto: transformers on a CPU machine
    assert loaded.max_seq_length == loaded.model.max_seq_length == 512
    assert mt.load_model(path, backend="transformers", max_seq_length=300)[0].model.max_seq_length == 300
    with pytest.raises(ValueError, match="backend"):
        mt.load_model(path, backend="vllm")
    mt.save_model_and_tokenizer(path, loaded, loaded_tok)  # overwriting a finished directory works
    assert json.loads((path / run_record.RUN_CONFIG).read_text())["settings"] == {}


# ---- a damaged model folder is refused at load, in one line ------------------------------------------------

def _damage(path, how):
    weights = os.path.join(path, 'model.safetensors')
    if how == 'config':
        open(os.path.join(path, 'config.json'), 'w').write('{"model_type": ')
    elif how == 'truncated':
        data = open(weights, 'rb').read()
        open(weights, 'wb').write(data[:len(data) // 2])
    elif how == 'header':
        data = bytearray(open(weights, 'rb').read())
        data[:8] = b'\xff' * 8
        open(weights, 'wb').write(bytes(data))
    elif how == 'no tokenizer':
        for name in mt.TOKENIZER_FILES + ('special_tokens_map.json', 'chat_template.jinja'):
            if os.path.exists(os.path.join(path, name)):
                os.remove(os.path.join(path, name))
    elif how in ('nan', 'inf'):
        from safetensors.torch import load_file, save_file
        state = load_file(weights)
        name = sorted(k for k in state if 'layers.1.' in k and k.endswith('weight'))[0]
        state[name] = state[name].clone()
        state[name].view(-1)[3] = float(how)
        save_file(state, weights, metadata={'format': 'pt'})


@pytest.mark.parametrize('how, words', [('config', 'cannot load the model'), ('truncated', 'weights file is damaged'),
                                        ('header', 'weights file is damaged'), ('no tokenizer', 'no tokenizer'),
                                        ('nan', 'non-finite values'), ('inf', 'non-finite values')])
def test_load_model_refuses_a_damaged_folder(tmp_path, how, words):
    import smoke
    path = str(tmp_path / 'model')
    smoke.make_tiny_arc_model(path)
    mt.load_model(path)  # intact, it loads
    _damage(path, how)
    with pytest.raises(mt.ModelLoadError, match=words) as info:
        mt.load_model(path)
    assert path in str(info.value) and '\n' not in str(info.value)


def test_backend_unsloth_without_unsloth_is_one_line(monkeypatch):
    monkeypatch.setattr(mt, '_unsloth_available', lambda: False)
    with pytest.raises(mt.ModelLoadError, match='unsloth is not installed'):
        mt.load_model('unused', backend='unsloth')
