"""How a stage runs: a user-facing error is one line and exit 1; a bug keeps its traceback; params errors
name the section and the key."""

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
    with pytest.raises(ParamError, match=r"unknown key\(s\) in 'train.optim': rate"):
        from_dict(Inner, {"rate": 1}, "train.optim")
    params = tmp_path / "params.yaml"
    params.write_text("other: {}\n")
    with pytest.raises(ParamError, match="no section 'kd'"):
        read_params(Inner, "kd", params)
    assert isinstance(ParamError("x"), StageError) and isinstance(ParamError("x"), ValueError)
