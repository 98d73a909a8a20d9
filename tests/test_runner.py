"""How a stage runs: a user-facing error is one line and exit 1; a bug keeps its traceback; params errors
name the section and the key (a wrong type too), with a "did you mean" for an unknown key."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from stages.runner.cli import stage_entrypoint
from stages.runner.errors import ParamError, StageError
from stages.runner.params import from_dict, read_params


def test_a_stage_error_is_one_line_and_exit_1(capsys):
    @stage_entrypoint("x")
    def main(argv=None) -> int:
        raise StageError("data/x.parquet: row 3 has no text")

    assert main([]) == 1
    assert capsys.readouterr().err == "x: error: data/x.parquet: row 3 has no text\n"


def test_a_bug_keeps_its_traceback():
    @stage_entrypoint("x")
    def main(argv=None) -> int:
        return [1, 2][5]  # an IndexError inside a core is a bug, not a user error

    with pytest.raises(IndexError):
        main([])


@dataclass(frozen=True)
class Inner:
    lr: float = 1.0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ParamError(f"lr must be > 0, got {self.lr}")


def test_params_errors_name_the_section_and_key(tmp_path):
    with pytest.raises(ParamError, match=r"train.optim.lr must be > 0, got -1"):
        from_dict(Inner, {"lr": -1}, "train.optim")
    with pytest.raises(ParamError, match=r"unknown key\(s\) in 'train.optim': lrr \(did you mean lr\?\), zzz$"):
        from_dict(Inner, {"lrr": 1, "zzz": 2}, "train.optim")
    with pytest.raises(ParamError, match=r"train.optim.lr must be a number, got 'high'"):
        from_dict(Inner, {"lr": "high"}, "train.optim")
    params = tmp_path / "params.yaml"
    params.write_text("other: {}\n")
    with pytest.raises(ParamError, match="no section 'kd'"):
        read_params(Inner, "kd", params)
    assert isinstance(ParamError("x"), StageError) and isinstance(ParamError("x"), ValueError)


def test_every_stage_names_a_wrong_type_by_section_and_key():
    """Each stage's params class, given a word where a number, flag or name goes."""
    from stages.clean import CleanParams
    from stages.model.training import OptimParams
    from stages.publish import PublishParams
    from stages.runtime.settings import RuntimeParams

    with pytest.raises(ParamError, match=r"clean.near_dup_threshold must be a number, got 'high'"):
        from_dict(CleanParams, {"near_dup_threshold": "high"}, "clean")
    with pytest.raises(ParamError, match=r"train.optim.epochs must be an integer, got 2.5"):
        from_dict(OptimParams, {"epochs": 2.5}, "train.optim")
    with pytest.raises(ParamError, match=r"publish.tag must be true or false, got 'yes'"):
        from_dict(PublishParams, {"tag": "yes"}, "publish")
    with pytest.raises(ParamError, match=r"runtime.threads must be an integer, got True"):
        from_dict(RuntimeParams, {"threads": True}, "runtime")
    assert from_dict(PublishParams, {"latency_margin": 0}, "publish").latency_margin == 0  # an int is a number


def test_progress_prints_lines_in_a_log_at_most_every_interval(monkeypatch):
    import io

    from stages.runner import progress

    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    log = io.StringIO()  # not a terminal: plain lines, no bar
    with progress.Progress("train: student", total=100, every=10.0, stream=log) as bar:
        for _ in range(100):
            now[0] += 0.5  # 2 steps a second: 50 s in all
            bar.advance(info="loss 0.5")
        bar.note("train: epoch 1/1 val accuracy 0.9000")
    lines = log.getvalue().splitlines()
    # the first step, one line per 10 s (at 10.5, 21, 31.5, 42 s), the last step, the note
    assert len(lines) == 7 and lines[-1] == "train: epoch 1/1 val accuracy 0.9000"
    assert lines[0].startswith("train: student  step 1/100 (1%)  loss 0.5  elapsed 0:00")
    assert "step 100/100 (100%)" in lines[-2] and "ETA 0:00" in lines[-2]
    quiet = io.StringIO()
    with progress.Progress("rank 1", total=3, enabled=False, stream=quiet) as bar:
        bar.advance()
        bar.note("nothing")
    assert quiet.getvalue() == ""
