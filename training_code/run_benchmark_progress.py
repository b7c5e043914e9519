"""How right the evaluation's progress bars are: the main job (run_evaluation_ArcMini.py) run in this process with
every bar of the candidate loop (candidates.py: generation, scoring) recorded.

    python training_code/run_benchmark_progress.py --output results/progress-eta_cpu_first10_bars-over-tokens.json
    python training_code/run_benchmark_progress.py --eval-args "--n-tasks 2"   # a cut-down main job
    python training_code/run_benchmark_progress.py --smoke                     # seconds: the evaluation's --smoke

At every update of a bar it records the seconds since the bar opened, the fraction of the bar's total done and the
remaining seconds the bar shows (tqdm's: what is left of the total over its smoothed rate). The bar's end is when it
reaches its total (else when it closes); from it, each update's real remaining time and the ratio predicted / real.
The figure of merit, per bar: that ratio at the first update past --after of the work (a tenth; the issue's target:
between 0.5 and 2), and the ratio furthest from 1 over every update from there on but the last. The evaluation runs
in a fresh output folder (its cache empty: nothing is resumed), removed at the end. Results: a JSON file with every
update, the machine (CPU, cores, the load average at every update: other work on the cores skews an ETA) and the
evaluation's score and timings; nothing is written to results/ unless --output says so. On a shared machine, run it
alone or at a higher priority (docs/MAIN_JOB.md: autogroup nice -15), else the ratios measure the other work.
"""
import argparse
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import arcmini  # noqa: E402
import candidates  # noqa: E402
import evaluation  # noqa: E402
import input_checks  # noqa: E402
import run_record  # noqa: E402
import smoke  # noqa: E402

MAIN_JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'run_evaluation_ArcMini.py')


def parse_args(argv=None):
    p = input_checks.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--eval-args', default='',
                   help="run_evaluation_ArcMini.py's flags, as one shell string (default: none, the main job); "
                        '--output-dir is set by this script')
    p.add_argument('--after', type=input_checks.probability, default=0.1,
                   help='the share of a bar\'s work past which its ETA is judged (the first update at or past it)')
    p.add_argument('--output', default=None, help='json file to write (default: none, the summary is printed)')
    p.add_argument('--smoke', action='store_true', help="seconds on CPU: the evaluation's --smoke (tiny model)")
    args = p.parse_args(argv)
    try:  # one line before the main job runs (a bad --output was found only after all of it)
        input_checks.check_shell_words('--eval-args', args.eval_args)
        if '--output-dir' in shlex.split(args.eval_args):
            raise input_checks.InputError('--eval-args: --output-dir is set by this script')
        if args.output:
            if os.path.isdir(args.output):
                raise input_checks.InputError(f'--output {args.output}: a folder, not a file')
            input_checks.check_writable_folder(os.path.dirname(os.path.abspath(args.output)), '--output (its folder)')
    except input_checks.InputError as e:
        p.error(str(e))
    return args


def recording(bar_class, bars):
    """A subclass of `bar_class` (tqdm's) that appends a record of every bar it makes to `bars`: its description,
    unit and total, and at each update (elapsed s, n, fraction, predicted remaining s, shown: whether the
    display was redrawn with it, the load average); `end_s` when it reached its total or closed."""

    class Recording(bar_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.record = {'desc': self.desc, 'unit': self.unit, 'unit_scale': self.unit_scale, 'total': self.total,
                           'updates': [], 'end_s': None, 'end_cpu_s': None}
            self._cpu_start = time.process_time()
            bars.append(self.record)

        def update(self, n=1):
            before = self.n
            out = super().update(n)
            if self.n != before:
                self._note()
            return out

        def _note(self):
            info = self.format_dict
            elapsed, rate = info['elapsed'], info['rate']
            if rate is None and elapsed:  # tqdm's own fallback before its smoothed rate exists
                rate = (self.n - self.initial) / elapsed
            remaining = (self.total - self.n) / rate if rate and self.total else None
            self.record['updates'].append({
                'elapsed_s': elapsed, 'n': self.n, 'fraction': self.n / self.total if self.total else None,
                'predicted_remaining_s': remaining, 'shown': self.last_print_n == self.n,
                'postfix': self.postfix, 'load_1min': os.getloadavg()[0], 'cpu_s': self._cpu()})
            if self.total and self.n >= self.total and self.record['end_s'] is None:
                self.record['end_s'], self.record['end_cpu_s'] = elapsed, self._cpu()

        def _cpu(self):  # CPU seconds of this process (all its threads) since the bar opened
            return time.process_time() - self._cpu_start

        def close(self):
            if self.record['end_s'] is None and hasattr(self, 'start_t'):
                self.record['end_s'], self.record['end_cpu_s'] = self._time() - self.start_t, self._cpu()
            super().close()

    return Recording


def _ratio(predicted, actual):
    return predicted / actual if actual > 0 else None


def judge(record, after):
    """A bar's record with each shown update's real remaining time and ratio, and the figures of merit.

    `cpu_ratio`: the same on the process's CPU clock, for the average rate so far (what is left of the work at the
    CPU seconds per unit spent so far, against the CPU seconds it took): the ETA with other work on the cores taken
    out (with 2 threads on 2 busy cores, wall time stretches unevenly; CPU time much less)."""
    end, end_cpu = record['end_s'], record.get('end_cpu_s')
    judged = []
    for u in record['updates']:
        if u['shown'] and u['fraction'] is not None and u['fraction'] < 1 and u['predicted_remaining_s'] is not None:
            actual = end - u['elapsed_s']
            extra = {}
            if end_cpu is not None and u.get('cpu_s') is not None and u['fraction'] > 0:
                predicted_cpu = u['cpu_s'] * (1 - u['fraction']) / u['fraction']
                extra = {'predicted_remaining_cpu_s': predicted_cpu, 'actual_remaining_cpu_s': end_cpu - u['cpu_s'],
                         'cpu_ratio': _ratio(predicted_cpu, end_cpu - u['cpu_s'])}
            judged.append(dict(u, actual_remaining_s=actual, ratio=_ratio(u['predicted_remaining_s'], actual), **extra))
    past = [u for u in judged if u['fraction'] >= after and u['ratio']]
    first = past[0] if past else None
    worst = max(past, key=lambda u: abs(math.log(u['ratio'])), default=None)
    return dict(record, updates=judged, after=after,
                ratio_at_first_update_past=first['ratio'] if first else None, first_update_past=first,
                worst_ratio_past=worst['ratio'] if worst else None, worst_update_past=worst,
                within_2x=all(0.5 <= u['ratio'] <= 2 for u in past) if past else None,
                cpu_ratio_at_first_update_past=first.get('cpu_ratio') if first else None)


def cpu_model():
    """The CPU's model name (Linux), else None."""
    try:
        with open('/proc/cpuinfo') as f:
            return next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), None)
    except OSError:
        return None


def main(argv=None):
    args = parse_args(argv)
    eval_args = shlex.split(args.eval_args) + (['--smoke'] if args.smoke else [])
    work = tempfile.mkdtemp(prefix='progress_eta_')
    bars, real = [], candidates.tqdm
    candidates.tqdm = recording(real, bars)
    load_before, start = os.getloadavg(), time.time()
    try:
        # run_evaluation_ArcMini.main, whose body this is (a script imports no other script)
        evaluation.script_main(f'The main job, {MAIN_JOB}, under {__file__}', arcmini.EVALUATION, MAIN_JOB,
                               eval_args + ['--output-dir', work], cpu_tasks=arcmini.CPU_TASKS,
                               smoke_overrides=smoke.evaluation_run)
        out_dir = os.path.join(work, 'smoke') if args.smoke else work
        with open(os.path.join(out_dir, 'results.json')) as f:
            results = json.load(f)
    finally:
        candidates.tqdm = real
        shutil.rmtree(work, ignore_errors=True)
    report = {**run_record.header(), 'commit': run_record.git_commit(), 'cpu': cpu_model(),
              'cpu_cores': os.cpu_count(), 'load_average_before': load_before, 'load_average_after': os.getloadavg(),
              'seconds': time.time() - start, 'eval_args': eval_args,
              'evaluation': {k: results.get(k) for k in ('score', 'n_tasks', 'timings_s', 'peak_rss_gb', 'device')},
              'bars': [judge(b, args.after) for b in bars], 'settings': vars(args)}
    for b in report['bars']:
        first = b['first_update_past']
        where = (f"first update past {b['after']:.0%} at {first['fraction']:.1%} after {first['elapsed_s']:.1f} s: "
                 f"predicted {first['predicted_remaining_s']:.1f} s left, real {first['actual_remaining_s']:.1f} s, "
                 f"ratio {first['ratio']:.2f} (CPU clock {first.get('cpu_ratio') or float('nan'):.2f}); furthest "
                 f"from 1 from there on: {b['worst_ratio_past']:.2f}"
                 if first else 'no update past it')
        print(f"bar '{b['desc']}' ({b['total']} {b['unit']}, {len(b['updates'])} updates shown, "
              f"{b['end_s']:.1f} s): {where}")
    if args.output:
        run_record.write_json(args.output, report)
        print(f'wrote {args.output}')
    return report


if __name__ == '__main__':
    main()
