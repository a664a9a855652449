"""The data path is one-way: source -> check -> cache -> splits -> streams.

    python -m pytest tests/test_data_path.py -q

A walk of one configuration through `prepare_data` (synthetic default, a folders layout of
pictures, a Decathlon layout of NIfTI volumes; each with a cache built, then reused) is traced
with sys.setprofile. Two things must hold:
- the walk: the stages prepare_data hands the data to, in call order (consecutive calls to one
  stage are one visit), visit each stage once and in stage order;
- every call from one data module into another goes down the stage order: no stage calls a
  stage above it (a check that asks the cache, a cache that asks the loader). Calls made by the
  worker pool are the callbacks the calling stage gave it (its own per-chunk function), not calls
  of the pool's own.
"""
import sys

import pytest

from semiseg import config
from data_layouts import make_folders_png, make_msd

ORCHESTRATOR = "semiseg.data.loader"
# Stage order, lowest first: a module may call only modules of a lower rank. The readers and the
# generator (volumes, synthetic) serve the source; the worker pool serves the check and the cache.
RANK = {"semiseg.data.volumes": 0, "semiseg.data.synthetic": 0, "semiseg.data.workers": 0,
        "semiseg.data.sources": 1, "semiseg.data.checks": 2, "semiseg.data.cache": 3,
        "semiseg.data.splits": 4, "semiseg.data.loader": 5}
STAGES = ["semiseg.data.sources", "semiseg.data.checks", "semiseg.data.cache", "semiseg.data.splits"]


def _module(frame) -> str:
    return frame.f_globals.get("__name__", "") if frame is not None else ""


def trace(fn, *args, **kwargs):
    """(walk, upward calls, result) of fn(*args, **kwargs): walk = the data modules that frames of
    the orchestrator module call, consecutive repeats collapsed; upward = (caller, callee, function)
    of calls from a data module into one of a higher rank."""
    walk, upward = [], set()

    def profile(frame, event, _arg):
        if event != "call":
            return
        callee, caller = _module(frame), _module(frame.f_back)
        if not callee.startswith("semiseg.data.") or callee == caller or not caller.startswith("semiseg.data."):
            return
        if caller == ORCHESTRATOR and (not walk or walk[-1] != callee):
            walk.append(callee)
        if caller != "semiseg.data.workers" and RANK.get(callee, 99) > RANK.get(caller, -1):
            upward.add((caller, callee, frame.f_code.co_name))

    sys.setprofile(profile)
    try:
        result = fn(*args, **kwargs)
    finally:
        sys.setprofile(None)
    return walk, upward, result


def _layouts(tmp_path):
    folders = make_folders_png(tmp_path / "folders")
    msd = make_msd(tmp_path / "msd")
    return {"synthetic": [], "folders": ["data.format=folders", f"data.path={folders}"],
            "msd": ["data.format=auto", f"data.path={msd}"]}


@pytest.mark.parametrize("layout", ["synthetic", "folders", "msd"])
def test_a_configuration_visits_each_data_stage_once_in_order(layout, tmp_path):
    from semiseg.data import loader
    sets = _layouts(tmp_path)[layout]
    cfg = config.resolve("smoke", "", [*sets, f"data.cache_dir={tmp_path / 'cache'}"])
    for attempt in ("built", "reused"):
        walk, upward, bundle = trace(loader.prepare_data, cfg, log=lambda m: None, progress=False)
        assert len(walk) == len(set(walk)), (attempt, walk)
        assert [s for s in STAGES if s in walk] == walk, (attempt, walk)
        # Everything the loader needs came through the walk: sources listed, the cache was found
        # or built, the split was made (the checks run inside the cache stage, only when building).
        assert walk == ["semiseg.data.sources", "semiseg.data.cache", "semiseg.data.splits"], (attempt, walk)
        assert upward == set(), (attempt, sorted(upward))
        assert bundle.n_slices("val") > 0


def test_the_tracer_sees_a_second_visit_and_an_upward_call():
    """The tracer itself, on functions that claim to live in the data modules (their globals'
    __name__ is what it reads): an orchestrator that returns to the source after the cache, and a
    cache that calls back into the loader."""
    def make(module, source, **names):
        scope = {"__name__": module, **names}
        exec(source, scope)
        return scope["f"]

    loader_helper = make("semiseg.data.loader", "def f():\n    return 1\n")
    list_cases = make("semiseg.data.sources", "def f():\n    return [1]\n")
    cache = make("semiseg.data.cache", "def f(cases):\n    return helper()\n", helper=loader_helper)
    orchestrator = make("semiseg.data.loader", "def f():\n    cache(list_cases())\n    return list_cases()\n",
                        cache=cache, list_cases=list_cases)
    walk, upward, result = trace(orchestrator)
    assert result == [1]
    assert walk == ["semiseg.data.sources", "semiseg.data.cache", "semiseg.data.sources"]
    assert upward == {("semiseg.data.cache", "semiseg.data.loader", "f")}
