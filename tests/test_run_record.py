"""Tests for run_record: the atomic JSON writer, the one device / date format, run_config.json."""
import json
import os
import re

import pytest
import torch

import run_record


def test_write_json_replaces_atomically(tmp_path):
    path = str(tmp_path / "out.json")
    run_record.write_json(path, {"a": 1})
    run_record.write_json(path, {"b": [1, 2]}, indent=1)
    assert json.load(open(path)) == {"b": [1, 2]} and os.listdir(tmp_path) == ["out.json"]
    with pytest.raises(TypeError):  # a failed dump leaves the last good file under the name
        run_record.write_json(path, {"c": object()})
    assert json.load(open(path)) == {"b": [1, 2]}


def test_header_formats(monkeypatch):
    monkeypatch.setattr("sys.argv", ["run_x.py", "--smoke"])
    head = run_record.header()
    assert head["command"] == "run_x.py --smoke"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", head["date"])
    if torch.cuda.is_available():
        assert re.fullmatch(r"\d+ x .+", head["device"])
    else:
        assert head["device"] == f"CPU ({os.cpu_count()} cores)"
    assert run_record.card_name(torch.device("cpu")) == "cpu"  # the benchmarks' file-name key


def test_write_run_config(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_COMMIT", "abc123")
    config = run_record.write_run_config(str(tmp_path / "model"), {"lr": 1e-4, "dtype": torch.float32})
    saved = json.load(open(tmp_path / "model" / run_record.RUN_CONFIG))
    assert saved == json.loads(json.dumps(config, default=str))
    assert saved["git_commit"] == "abc123" and saved["settings"] == {"lr": 1e-4, "dtype": "torch.float32"}
    assert set(saved) == {"settings", "versions", "python", "git_commit", "date", "argv"}
    assert set(saved["versions"]) == set(run_record.VERSIONED_PACKAGES) and saved["versions"]["torch"]


def test_process_age_counts_from_the_process_start():
    import subprocess
    import sys
    import time
    assert run_record.process_age_s() is None or run_record.process_age_s() > 0
    code = "import time, run_record; time.sleep(0.5); print(run_record.process_age_s())"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(run_record.__file__))
    start = time.time()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    wall = time.time() - start
    if out.strip() != "None":
        assert 0.5 <= float(out) <= wall + 0.02  # the sleep counts, and no more than the child's whole life (+ a tick)
