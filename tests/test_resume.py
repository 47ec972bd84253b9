"""A stopped compress continues from its last finished stage (resume.py) and ends with the plan and the weights of an
uninterrupted run, bit for bit. A stop is simulated by raising from the hook that saves a stage, after it saved."""

import json
import logging

import pytest
import torch
from helpers import fast_config
from safetensors.torch import load_file
from tinymodels import sample_text, save_tiny, tiny_model

from foldgpt import api
from foldgpt.resume import Resume, state_dir
from foldgpt.stages.cure_state import CureCheckpoints


class Stop(BaseException):
    """Stands for the process being killed: neither an Exception nor a FoldGPTError."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = save_tiny(root / "llama", "llama", model=tiny_model("llama", layers=6, train_steps=60))
    text = root / "calib.txt"
    text.write_text(sample_text(30000, seed=1))
    other = root / "other.txt"
    other.write_text(sample_text(30000, seed=3))
    return {"root": root, "model": str(model), "text": str(text), "other": str(other), "runs": {}}


def config(ranking: str = "search", **kw):
    cfg = fast_config(ranking=ranking, target_params=0.5, calib_seqs=24, **kw)
    cfg.cure.steps, cfg.cure.checkpoint_every = 6, 2
    cfg.ranking.per_step = 1  # one action per search step: 8 steps
    return cfg


class SearchLog(logging.Handler):
    """The search's step lines (the actions taken, the loss, how many actions were scored) while it is attached."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        if record.getMessage().startswith(("search: layer", "FoldGPT ranking")):
            self.lines.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("foldgpt").addHandler(self)
        logging.getLogger("foldgpt").setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        logging.getLogger("foldgpt").removeHandler(self)


def reference(setup, ranking: str = "search"):
    """The uninterrupted run: its output folder and its search steps (made once per ranking)."""
    if ranking not in setup["runs"]:
        out = setup["root"] / f"ref-{ranking}"
        with SearchLog() as steps:
            api.compress(setup["model"], [setup["text"]], out, config(ranking))
        assert not state_dir(out).exists()
        setup["runs"][ranking] = out, steps.lines
    return setup["runs"][ranking]


def assert_same_result(out, ref):
    """Same plan (but for when it was made), same summary (but for the seconds), the same weights bit for bit."""
    def plan(folder):
        d = json.loads((folder / "plan.json").read_text())
        d["provenance"].pop("created")
        return d

    def summary(folder):
        d = json.loads((folder / "summary.json").read_text())
        d.pop("seconds")
        return d

    assert plan(out) == plan(ref)
    assert summary(out) == summary(ref)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not state_dir(out).exists()


def stop_after(monkeypatch, cls, name: str, when):
    """Make cls.name raise Stop right after it did its work, when `when(*args)` holds."""
    original = getattr(cls, name)

    def hooked(*args, **kw):
        result = original(*args, **kw)
        if when(*args, **kw):
            raise Stop
        return result

    monkeypatch.setattr(cls, name, hooked)


STOPS = {  # where the run stops -> (the hook, when it stops, what the rerun says it resumes)
    "analysis": (Resume, "save_similarity", lambda *a: True, "resuming: analysis from"),
    "search": (Resume, "save_search", lambda self, state: state["rounds"] == 3, "resuming: analysis, 3 search steps"),
    "plan": (Resume, "planned", lambda *a: True, "resuming: analysis, plan from"),
    "cure": (CureCheckpoints, "step_done", lambda self, step, *a: step == 3,
             "resuming: analysis, plan, cure at step 2"),
    "measuring": (CureCheckpoints, "step_done", lambda self, step, steps, *a: step == steps,
                  "resuming: analysis, plan, cure at step 6"),
}


@pytest.mark.parametrize("stage", list(STOPS))
def test_a_stopped_compress_continues_from_its_last_stage_with_the_same_result(setup, stage, monkeypatch, caplog):
    ref, ref_steps = reference(setup)
    out = setup["root"] / f"stopped-{stage}"
    cls, name, when, said = STOPS[stage]
    with monkeypatch.context() as m, SearchLog() as before:
        stop_after(m, cls, name, when)
        with pytest.raises(Stop):
            api.compress(setup["model"], [setup["text"]], out, config())
    assert not out.exists() and state_dir(out).is_dir()
    with caplog.at_level(logging.INFO, logger="foldgpt"), SearchLog() as after:
        api.compress(setup["model"], [setup["text"]], out, config())
    assert said in caplog.text
    if stage == "cure":
        assert "cure: continuing from the checkpoint at step 2" in caplog.text
    assert_same_result(out, ref)
    # the search steps before the stop and after it are the uninterrupted search's: same actions, same losses, the
    # same number of actions scored (the lazy search's saved scores carried over)
    assert len(ref_steps) == 8 and before.lines + after.lines == ref_steps


def test_a_stopped_greedy_ranking_continues_its_search(setup, monkeypatch, caplog):
    from foldgpt.resume import _Searches

    ref, ref_steps = reference(setup, "greedy")
    out = setup["root"] / "stopped-greedy"
    with monkeypatch.context() as m, SearchLog() as before:
        stop_after(m, _Searches, "put", lambda self, key, search: len(search.order) == 2)
        with pytest.raises(Stop):
            api.compress(setup["model"], [setup["text"]], out, config("greedy"))
    with caplog.at_level(logging.INFO, logger="foldgpt"), SearchLog() as after:
        api.compress(setup["model"], [setup["text"]], out, config("greedy"))
    assert "resuming: analysis, 1 greedy search from" in caplog.text
    assert "continuing the greedy search saved in" in caplog.text
    assert_same_result(out, ref)
    # the second step was saved before the stop, but not logged
    assert len(ref_steps) == 4 and before.lines + after.lines == ref_steps[:1] + ref_steps[2:]


def test_state_saved_for_other_text_or_settings_is_ignored_and_replaced(setup, monkeypatch, caplog):
    ref, _ = reference(setup)
    out = setup["root"] / "other-text"
    with monkeypatch.context() as m:
        stop_after(m, Resume, "planned", lambda *a: True)
        with pytest.raises(Stop):
            api.compress(setup["model"], [setup["other"]], out, config())
    with caplog.at_level(logging.INFO, logger="foldgpt"):
        api.compress(setup["model"], [setup["text"]], out, config())
    assert "ignoring and replacing the analysis, plan saved in" in caplog.text
    assert "resuming" not in caplog.text
    assert_same_result(out, ref)
    # only the cure's settings differ: the analysis and the plan are reused, the cure's checkpoint is not
    out = setup["root"] / "other-cure"
    with monkeypatch.context() as m:
        stop_after(m, CureCheckpoints, "step_done", lambda self, step, *a: step == 4)
        with pytest.raises(Stop):
            api.compress(setup["model"], [setup["text"]], out, config())
    caplog.clear()
    cfg = config()
    cfg.cure.lr = 1e-3
    with caplog.at_level(logging.INFO, logger="foldgpt"):
        api.compress(setup["model"], [setup["text"]], out, cfg)
    assert "ignoring and replacing the cure saved in" in caplog.text
    assert "resuming: analysis, plan from" in caplog.text


def test_fresh_deletes_the_saved_state_and_the_cli_takes_the_options(setup, monkeypatch, caplog):
    from foldgpt.cli import main

    ref, _ = reference(setup)
    out = setup["root"] / "fresh"
    with monkeypatch.context() as m:
        stop_after(m, Resume, "planned", lambda *a: True)
        with pytest.raises(Stop):
            api.compress(setup["model"], [setup["text"]], out, config())
    state = state_dir(out)
    assert (state / "plan.json").is_file()
    with caplog.at_level(logging.INFO, logger="foldgpt"):
        code = main(["compress", setup["model"], "--text", setup["text"], "--out", str(out), "--fresh",
                     "--target-params", "0.5", "--seq-len", "32", "--calib-seqs", "24", "--cure-steps", "6",
                     "--cure-checkpoint-every", "2", "--ranking", "search", "--unit", "layer", "--adapter-rank", "2",
                     "--gate-steps", "24", "--per-step", "1"])
    assert code == 0
    assert f"--fresh: removed the state saved in {state}" in caplog.text and "resuming" not in caplog.text
    assert not state.exists()
    plan, ref_plan = (json.loads((d / "plan.json").read_text()) for d in (out, ref))
    assert (plan["removed"], plan["groups"], plan["child_ranks"]) == (
        ref_plan["removed"], ref_plan["groups"], ref_plan["child_ranks"])


def test_bad_input_leaves_no_state(setup, monkeypatch):
    import foldgpt.api
    from foldgpt.errors import FoldGPTError

    def late(*args, **kwargs):  # a bad input found after the analysis is saved
        raise FoldGPTError("a late bad input")

    monkeypatch.setattr(foldgpt.api, "run_method", late)
    out = setup["root"] / "bad"
    with pytest.raises(FoldGPTError, match="a late bad input"):
        api.compress(setup["model"], [setup["text"]], out, config())
    assert not out.exists() and not state_dir(out).exists()


@pytest.mark.parametrize("what", ["save_tensors_atomic", "write_text_atomic"])
def test_a_state_that_cannot_be_written_is_logged_once_and_the_run_goes_on(setup, what, monkeypatch, caplog):
    import foldgpt.resume
    from foldgpt.errors import FoldGPTError

    def full(*a, **kw):  # the tensors' writer raises the OSError; the JSON's, the line fileio makes of it
        if what == "save_tensors_atomic":
            raise OSError(28, "No space left on device")
        raise FoldGPTError("No space left on the device")

    ref, _ = reference(setup)
    out = setup["root"] / f"full-{what}"
    monkeypatch.setattr(foldgpt.resume, what, full)
    with caplog.at_level(logging.INFO, logger="foldgpt"):
        api.compress(setup["model"], [setup["text"]], out, config())
    assert caplog.text.count("cannot save the finished stages") == 1 and "No space left on" in caplog.text
    assert_same_result(out, ref)
