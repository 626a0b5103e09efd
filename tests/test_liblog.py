"""Library chatter goes to the per-variant log file; orlik's own stderr output stays on the terminal."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import pytest

from orlik import progress
from orlik.quantize.liblog import library_log


def test_prints_records_and_warnings_go_to_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lib = logging.getLogger("somelib")  # a library that set up its own terminal handler at import
    handler = logging.StreamHandler(sys.stderr)
    lib.addHandler(handler)
    lib.setLevel(logging.INFO)
    log = tmp_path / "variants" / "gptq-w4g128.log"
    try:
        with library_log(log) as path:
            print("INFO  Auto fixed pad_token_id=0")  # what logbar and tokenicer print
            lib.info("offloading to /tmp/x")
            logging.getLogger("late.lib").warning("kernel compiled")  # no handler of its own: root's
            warnings.warn("torch_dtype is deprecated", DeprecationWarning, stacklevel=1)
            progress.warn("orlik's own line")
        lib.info("after the block")
    finally:
        lib.removeHandler(handler)
    text = path.read_text(encoding="utf-8")
    for line in (
        "Auto fixed pad_token_id=0",
        "offloading to /tmp/x",
        "kernel compiled",
        "torch_dtype is deprecated",
    ):
        assert line in text, line
    out, err = capsys.readouterr()
    assert "pad_token_id" not in out + err and "offloading" not in err
    assert "orlik's own line" in err and "after the block" in err  # the terminal is back afterwards
    assert "after the block" not in text and handler.stream is sys.stderr
