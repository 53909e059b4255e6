"""`re2g predict` with a task path that is no file: one clear error line (the path and what was expected),
no traceback, before any model loads."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from re2g.errors import DataFormatError
from re2g.predict import predict_file


@pytest.mark.parametrize("kind", ["directory", "missing"])
def test_predict_names_a_task_path_that_is_no_file(tmp_path, kind):
    task = tmp_path / ("tasks" if kind == "directory" else "nope.jsonl")
    if kind == "directory":
        task.mkdir()
    with pytest.raises(DataFormatError, match="is a directory" if kind == "directory" else "no such file") as e:
        predict_file(tmp_path / "no-run", str(task), str(tmp_path / "out.jsonl"))
    assert str(task) in str(e.value)
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_predict_prints_one_error_line_for_a_directory(tmp_path):
    from re2g.cli import app

    res = CliRunner().invoke(app, ["predict", str(tmp_path), str(tmp_path / "out.jsonl"), "--run", str(tmp_path)])
    assert res.exit_code != 0
    assert f"{tmp_path}: is a directory, not a KILT task jsonl" in " ".join(res.output.split())  # rich wraps
    assert "Traceback" not in res.output
