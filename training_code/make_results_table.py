"""The README's results table, written from the results files: one row per headline run (model, protocol,
ARC-AGI-1 and ARC-AGI-2 evaluation scores, GPU-minutes and card, command and results file).

    python training_code/make_results_table.py            # rewrite the table in README.md
    python training_code/make_results_table.py --check    # exit 1 if README.md's table differs from the files
    python training_code/make_results_table.py --print    # print the table, change nothing

Which runs are headline runs is the list HEADLINE below, not a guess: each entry names a results file (and the
row, for files that hold several runs), the model, the protocol and, where the evaluation file does not hold
them, the files that record the training minutes. Every number in the table is read from those files:
  - the score is the file's top-2 `score` out of its tasks (400: ARC-AGI-1 evaluation; 120: ARC-AGI-2 evaluation,
    named by the command's `--challenges` path);
  - the evaluation minutes are the process start to `submission.json` where the file records it, else its
    `timings_s.total` (shorter: it starts after the imports); a run with TTT inside the same process
    counts it there ("TTT + evaluation");
  - the command is the file's `command`, with `--output-dir <dir>` and `--no-report` left out (they do not
    change the submission) and the value of `--model` shown as <model> when it is a temporary path.
The table sits in README.md between the two marker comments START and END.
"""
import argparse
import json
import os
import re
import sys
from decimal import ROUND_HALF_UP, Decimal

from input_checks import ArgumentParser, InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START = '<!-- results-table:start: written by training_code/make_results_table.py from results/*.json -->'
END = '<!-- results-table:end -->'
DEMOS = 'evaluation demonstrations in training'
HELD_OUT = 'held out'
SETS = {400: 'ARC-AGI-1', 120: 'ARC-AGI-2'}

# The headline runs, in table order. 'row': the index in a file of several runs ('rows'); 'training': (label,
# file, dotted key[, 60 where the key holds seconds]) of each training stage's minutes recorded outside the
# evaluation's own timings.
HEADLINE = [
    dict(model='ArcMini v3 (shipped), the main job: no TTT, greedy on 8 views, 8 scoring views', protocol=DEMOS,
         results='results/arcmini-v3_views_curve_400_H200.json', row=0,
         training=[('training', 'models/ArcMini/run_config.json', 'settings.minutes')]),
    dict(model="ArcMini v3, the paper's search: DFS 0.09 over 16 views, 16 scoring views", protocol=DEMOS,
         results='results/arcmini-v3_paper-dfs16-score16_400_H200.json'),
    dict(model='ArcMini pretrained without any ARC-AGI-1 evaluation pair, + TTT (1500 steps), the main job',
         protocol=HELD_OUT,
         results='results/arcmini-held-out_arc-agi-1-eval_ttt1500_400_H200.json',
         training=[('pretraining', 'results/arcmini-held-out_arc-agi-1-eval_ttt1500_400_H200.json',
                    'pretraining.minutes'),
                   ('TTT', 'results/arcmini-held-out_arc-agi-1-eval_ttt1500_400_H200.json', 'ttt.minutes')]),
    dict(model='ArcMini v3, the main job (no TTT)', protocol=HELD_OUT,
         results='results/arcmini-v3_arc-agi-2-eval_120_held-out_H200.json'),
    dict(model='ArcMini v3 + TTT (3000 steps), greedy on 32 views',
         protocol=HELD_OUT, results='results/arcmini-v3_ttt-full3000_32views_arc-agi-2-eval_120_held-out_H200.json'),
    dict(model='SmolLM2-135M (a pretrained LLM), 5 minutes of LoRA finetuning (458 steps), no TTT, greedy on 8 '
               'views; the 12-minute budget left 100 tasks unsearched',
         protocol=HELD_OUT, results='results/smollm2-135m_lora-5min_arc-agi-1-eval_no-ttt_greedy8_held-out_H100.json',
         training=[('finetuning', 'results/smollm2-135m_lora-5min_finetuning_run_config_H100.json',
                    'settings.training.seconds', 60)]),
    dict(model='SmolLM2-135M, 4 minutes of full finetuning (477 steps, 2.4 times the tokens of the LoRA run), no TTT, '
               'greedy on 8 views; the 5-minute budget left 200 tasks unsearched',
         protocol=HELD_OUT, results='results/smollm2-135m_full-4min_arc-agi-1-eval_no-ttt_greedy8_held-out_H100.json',
         training=[('finetuning', 'results/smollm2-135m_full-4min_finetuning_run_config_H100.json',
                    'settings.training.seconds', 60)]),
]
COLUMNS = ['model', 'protocol', 'ARC-AGI-1 eval (of 400)', 'ARC-AGI-2 eval (of 120)', 'GPU-minutes, card',
           'command; results file']


def load(path, repo=REPO):
    with open(os.path.join(repo, path)) as f:
        return json.load(f)


def get(record, dotted):
    """record['a']['b'] for 'a.b', or None where a key is missing."""
    for key in dotted.split('.'):
        if not isinstance(record, dict) or key not in record:
            return None
        record = record[key]
    return record


def run_record(entry, repo=REPO):
    """The evaluation's record: the file, or one of its 'rows' with the file's own fields beneath it."""
    data = load(entry['results'], repo)
    if 'row' in entry:
        data = {**data, **data['rows'][entry['row']]}
    return data


def n_tasks(record):
    if record.get('n_tasks'):
        return int(record['n_tasks'])
    return int(round(record['score'] / record['top2']))  # a row of a file of several runs: score / fraction


def eval_set(record):
    n = n_tasks(record)
    challenges = get(record, 'settings.challenges') or ''
    name = 'ARC-AGI-2' if 'arc-prize-2025' in challenges else 'ARC-AGI-1'
    assert SETS.get(n) == name, f'{n} tasks of {name}: not a whole evaluation set'
    return name


def number(x, places=2):
    """x rounded half up to `places` decimals, trailing zeros dropped: 129.0 -> '129', 26.625 -> '26.63'."""
    text = str(Decimal(repr(x)).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP))
    return text.rstrip('0').rstrip('.') if '.' in text else text


def score_cell(record):
    n = n_tasks(record)
    return f"{number(record['score'])} / {n} ({number(100 * record['score'] / n)}%)"


def eval_minutes(record):
    for key in ('start_to_submission_s', 'wall_s.start_to_submission_s', 'timings_s.process_start_to_submission',
                'timings_s.total'):
        if get(record, key) is not None:
            return get(record, key) / 60


def card(record):
    device = record.get('card') or record.get('device') or ''
    found = re.search(r'\b(H100|H200|A100|L4)\b', device)
    return found.group(1) if found else device


def minutes_cell(entry, record, repo=REPO):
    parts = [(label, get(load(path, repo), key) / (unit[0] if unit else 1))  # unit: 60 for a time in seconds
             for label, path, key, *unit in entry.get('training', [])]
    parts.append(('TTT + evaluation' if get(record, 'timings_s.ttt') else 'evaluation', eval_minutes(record)))
    text = ' + '.join(f'{number(m, 1)} {label}' for label, m in parts)
    if len(parts) > 1:
        text += f' = {number(sum(m for _, m in parts), 1)}'
    return f'{text}, {card(record)}'


def command(record):
    """The run's command as one would type it again: output folder and report flags left out, values with spaces
    (recorded unquoted) quoted again from the run's settings, a temporary model path shown as <model>."""
    cmd = ' ' + record['command'] + ' '
    cmd = re.sub(r' --output-dir \S+', '', cmd).replace(' --no-report ', ' ')
    for key, value in (record.get('settings') or {}).items():
        flag = ' --' + key.replace('_', '-') + ' '
        if isinstance(value, str) and ' ' in value and flag + value + ' ' in cmd:
            cmd = cmd.replace(flag + value + ' ', f'{flag}"{value}" ')
    cmd = re.sub(r' --model /tmp/\S+', ' --model <model>', cmd)
    return 'python ' + cmd.strip()


def row(entry, repo=REPO):
    record = run_record(entry, repo)
    scores = {name: '-' for name in SETS.values()}  # not run
    scores[eval_set(record)] = score_cell(record)
    cells = [entry['model'], entry['protocol'], scores['ARC-AGI-1'], scores['ARC-AGI-2'],
             minutes_cell(entry, record, repo), f"`{command(record)}`; [{entry['results']}]({entry['results']})"]
    return '| ' + ' | '.join(cell.replace('|', '\\|') for cell in cells) + ' |'


def table(repo=REPO, headline=HEADLINE):
    """The markdown table of the headline runs, as read from the files today."""
    lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
    return '\n'.join(lines + [row(entry, repo) for entry in headline]) + '\n'


def split_readme(text):
    """(before, table, after) around the marker comments; an InputError if they are missing."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise InputError(f'expected one {START} and, after it, one {END}')
    before, rest = text.split(START, 1)
    inside, after = rest.split(END, 1)
    return before, inside.strip('\n') + '\n', after


def read_readme(path):
    """The text of the README at `path`; an InputError naming the problem (no such file, a folder, unreadable)."""
    try:
        with open(path, encoding='utf-8') as f:
            return f.read()
    except OSError as e:
        raise InputError(f'cannot read it ({e.strerror or e})') from None
    except UnicodeDecodeError:
        raise InputError('not UTF-8 text') from None


def write_readme(path, text):
    try:
        with open(path, 'w', encoding='utf-8') as f:
            f.write(text)
    except OSError as e:
        raise InputError(f'cannot write it ({e.strerror or e})') from None


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--readme', default=os.path.join(REPO, 'README.md'), help='the file whose table to write')
    mode = p.add_mutually_exclusive_group()
    mode.add_argument('--check', action='store_true', help='change nothing; exit 1 if the table differs from the files')
    mode.add_argument('--print', action='store_true', help='print the table, change nothing')
    return p.parse_args(argv)


def update(readme, check):
    """Check or rewrite the table in the file `readme`: the exit status."""
    new = table()
    before, old, after = split_readme(read_readme(readme))
    if check:
        if old != new:
            print(f'{readme}: the results table differs from results/*.json; run '
                  'python training_code/make_results_table.py', file=sys.stderr)
            return 1
        print(f'{readme}: the results table matches results/*.json')
        return 0
    write_readme(readme, before + START + '\n' + new + END + after)
    print(f'{readme}: results table written ({len(HEADLINE)} runs)')
    return 0


def main(argv=None):
    """Exit status: 0 done (or the table matches), 1 the table differs (--check), 2 a bad --readme (one line)."""
    args = parse_args(argv)
    if args.print:
        print(table(), end='')
        return 0
    try:
        return update(args.readme, args.check)
    except InputError as e:
        print(f'{os.path.basename(__file__)}: error: --readme {args.readme}: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
