"""What a training run prints: progress as plain lines where the console is not a terminal (`sky jobs logs`, a pipe,
logs/attempt-<n>.log), the bar in a terminal, and no warnings a user can do nothing about."""

from __future__ import annotations

import io
import os
import re
import sys

import pytest

from wellocr.callbacks import ProgressLines, progress_line
from wellocr.rundir import RedrawnLines, _Tee

# What tqdm writes for a bar that advances twice and closes, with a message written above it (tqdm.write).
BAR = ("\r  0%|          | 0/2 [00:00<?, ?it/s]\r 50%|#####     | 1/2 [00:01<00:01,  1.0s/it]"
       "\r" + " " * 40 + "\r{'loss': '6.3'}\n"
       "\r 50%|#####     | 1/2 [00:01<00:01,  1.0s/it]\r100%|##########| 2/2 [00:02<00:00,  1.0s/it]\n")


def test_a_redrawn_line_keeps_its_last_state():
    lines = RedrawnLines()
    assert lines.feed(BAR[:30]) == ""  # nothing until the line ends
    out = lines.feed(BAR[30:]) + lines.rest()
    assert out == "{'loss': '6.3'}\n100%|##########| 2/2 [00:02<00:00,  1.0s/it]\n"


def test_a_cleared_bar_and_cursor_moves_leave_nothing_and_plain_text_passes_unchanged():
    lines = RedrawnLines()
    assert lines.feed("\r 10%|#|\r          \r\n\x1b[A\r 20%|##|\x1b[A\n") == " 20%|##|\n"
    assert lines.feed("plain\n\nline without end") == "plain\n\n"
    assert lines.rest() == "line without end" and lines.rest() == ""


def test_a_pipe_and_the_log_get_lines_a_terminal_gets_the_bar(tmp_path):
    pipe, log = io.StringIO(), io.StringIO()
    tee = _Tee(pipe, log)
    tee.write(BAR)
    tee.close()
    assert "\r" not in pipe.getvalue() and pipe.getvalue() == log.getvalue()
    assert pipe.getvalue().splitlines()[-1].startswith("100%|")

    leader, follower = os.openpty()
    with open(follower, "w", closefd=True) as terminal:
        log = io.StringIO()
        tee = _Tee(terminal, log)
        tee.write(BAR)
        tee.flush()
        shown = os.read(leader, 65536).decode()
    os.close(leader)
    assert shown.count("\r") >= BAR.count("\r")  # the terminal (its line discipline adds \r to \n) saw the redraws
    assert "\r" not in log.getvalue() and log.getvalue().splitlines()[-1].startswith("100%|")


def test_a_progress_line_says_where_the_run_is_and_how_long_it_has_left():
    line = progress_line(4, 8, 12.4, 4, {"loss": 6.2483, "grad_norm": 0.61, "epoch": 0.5, "total_flos": 1.0})
    assert line == "step 4/8 (50%), 12 s, ~12 s left: loss 6.248, grad_norm 0.61, epoch 0.5"
    assert progress_line(500, 500, 3725, 450, {}) == "step 500/500 (100%), 1 h 02 min"
    assert (progress_line(30, 500, 90, 10, {"eval_loss": 1.0})
            == "step 30/500 (6%), 1 min 30 s, ~1 h 10 min left: eval_loss 1")


def test_a_run_logged_to_a_pipe_prints_a_line_per_logging_step_and_no_noise(trained_run):
    """The shared run trained with its output captured (not a terminal), as a SkyPilot job does."""
    log = (trained_run / "logs" / "attempt-1.log").read_bytes().decode()
    assert "\r" not in log and "\x1b" not in log
    steps = [int(m) for m in re.findall(r"^step (\d+)/8 \(\d+%\), \d+ s(?:, ~\d+ s left)?: loss ", log, re.M)]
    assert steps == list(range(1, 9))  # logging_steps 1
    assert re.search(r"^step 8/8 \(100%\), \d+ s: eval_loss ", log, re.M)
    assert "PAD/BOS/EOS" not in log  # the tiny model's configs agree with its tokenizer
    assert "cost/" not in log  # cost goes to W&B and cost.json, not into every log line


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "pipe"])
def test_the_trainer_keeps_the_bar_in_a_terminal_and_prints_lines_elsewhere(tiny_model_dir, tmp_path, monkeypatch,
                                                                           terminal):
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, ProgressCallback
    from trl import SFTConfig

    from wellocr.processing import load_processor
    from wellocr.sft import WellocrSFTTrainer

    leader, follower = os.openpty()
    with open(follower, "w") as console:
        monkeypatch.setattr(sys, "stdout", console if terminal else io.StringIO())
        args = SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, remove_unused_columns=False,
                         dataset_kwargs={"skip_prepare_dataset": True})
        trainer = WellocrSFTTrainer(model=AutoModelForImageTextToText.from_pretrained(tiny_model_dir), args=args,
                                    train_dataset=Dataset.from_dict({"x": [1]}),
                                    processing_class=load_processor(tiny_model_dir))
    os.close(leader)
    kinds = {type(callback) for callback in trainer.callback_handler.callbacks}
    assert (ProgressCallback in kinds, ProgressLines in kinds) == (terminal, not terminal)
