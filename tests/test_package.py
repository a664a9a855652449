"""The house: semiseg is a package without import circles, the checkout's top-level modules re-export
it, its commands start quietly, and `pip install .` gives a working `semiseg` command.

    python -m pytest tests/test_package.py -q
"""
import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "semiseg"
# What the flat modules offered before the package (public names defined at their top level).
OLD_PUBLIC_API = {
    "config": ["CHOICES", "Config", "ConfigError", "DATA_FORMATS", "DataConfig", "METHODS", "MODEL_NAMES",
               "MeanTeacherConfig", "MethodInfo", "MiraUConfig", "MixMatchConfig", "ModelConfig", "PRESETS",
               "RANGES", "TrainConfig", "add_set_argument", "apply_mapping", "from_dict", "get", "load_yaml",
               "main", "parse_set", "resolve", "save_yaml", "to_dict", "validate"],
    "models_tf2": ["MODELS", "build_model", "build_unet", "register_model", "unet_forward_flops"],
    "data_loader_tf2": ["DataBundle", "SPLITS", "TRAIN_FILTERED_SPLITS", "make_splits", "prepare_data",
                        "resolve_source", "save_splits", "steps_per_epoch"],
    "train_ssl_tf2": ["EXIT_PREEMPTED", "EpochLogSums", "METHODS", "Preemption", "Supervised", "Trainer",
                      "ema_update", "get_method", "model_variables", "register_method", "save_checkpoint",
                      "sigmoid_rampup"],
    "main": ["EXIT_BAD_INPUT", "EXIT_WRITE_FAILED", "build_parser", "cmd_check_data", "cmd_describe",
             "cmd_evaluate", "cmd_predict", "cmd_preprocess", "cmd_train", "main"],
}
# Old names whose definitions moved: method sections into the method packages, ramps and EMA out of
# the trainer module. The shims still offer them.
MOVED = {"get_method": ("semiseg.methods", "get_method"), "Supervised": ("semiseg.methods.supervised.trainer", "Supervised"),
         "MethodInfo": ("semiseg.methods.spec", "MethodSpec"),
         "MeanTeacherConfig": ("semiseg.methods.mean_teacher", "MeanTeacherConfig"),
         "MixMatchConfig": ("semiseg.methods.mixmatch", "MixMatchConfig"),
         "MiraUConfig": ("semiseg.methods.mira_u", "MiraUConfig"),
         "ema_update": ("semiseg.training.ema", "ema_update"), "sigmoid_rampup": ("semiseg.training.ramps", "sigmoid_rampup")}
# A line of TensorFlow's C++ log (absl format) and absl's notice printed before them.
CPP_LOG_MARKERS = ("] oneDNN custom operations", "Could not find cuda drivers", "absl::InitializeLog")


# ----------------------------------------------------------------------------- import graph
def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the modules of `root`'s package it imports anywhere (top level or inside functions).
    `from pkg import name` counts as importing pkg.name when that is a module, else pkg."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in modules else node.module)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_sees_the_circles_the_flat_layout_had(tmp_path):
    """The checker itself: the old layout's registry circle (models_tf2 <-> models_transformer, the
    latter importing back at module level) is found, function-level imports included."""
    pkg = tmp_path / "old"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models_tf2.py").write_text("def build_model():\n    from old import models_transformer\n")
    (pkg / "models_transformer.py").write_text("from old.models_tf2 import register_model\n")
    (pkg / "leaf.py").write_text("import json\n")
    assert find_cycle(import_graph(pkg)) == ["old.models_tf2", "old.models_transformer", "old.models_tf2"]
    (pkg / "models_transformer.py").write_text("from old import leaf\n")
    assert find_cycle(import_graph(pkg)) is None


def test_semiseg_has_no_import_circle():
    graph = import_graph(PACKAGE)
    assert len(graph) >= 30 and "semiseg.training.trainer" in graph
    # The edges that replaced the old circles exist, so the graph really is read.
    assert "semiseg.training.registry" in graph["semiseg.training.trainer"]
    assert "semiseg.models.registry" in graph["semiseg.models.transformer"]
    assert "semiseg.errors" in graph["semiseg.data.volumes"]
    assert find_cycle(graph) is None
    # The registries and the error classes are leaves: they import nothing of semiseg.
    for leaf in ("semiseg.errors", "semiseg.models.registry", "semiseg.training.registry"):
        assert graph[leaf] == set(), leaf


# ----------------------------------------------------------------------------- top-level modules
@pytest.mark.parametrize("shim, target", [("config", "semiseg.config"), ("models_tf2", "semiseg.models.unet"),
                                          ("data_loader_tf2", "semiseg.data.loader"),
                                          ("train_ssl_tf2", "semiseg.training.trainer"), ("main", "semiseg.cli")])
def test_top_level_modules_re_export_the_old_api(shim, target):
    import importlib
    old, new = importlib.import_module(shim), importlib.import_module(target)
    assert Path(old.__file__).parent == REPO and old.__doc__ and "python " in old.__doc__
    for name in OLD_PUBLIC_API[shim]:
        here = getattr(old, name)
        moved = MOVED.get(name)
        there = getattr(importlib.import_module(moved[0]), moved[1]) if moved else getattr(new, name)
        assert here is there, (shim, name)


def test_error_classes_keep_their_bases_and_homes():
    from semiseg import config, errors
    from semiseg.data import sources
    from semiseg.runs import atomic_write, run_dir
    assert config.ConfigError is errors.ConfigError and issubclass(errors.ConfigError, ValueError)
    assert sources.DataError is errors.DataError and issubclass(errors.DataError, ValueError)
    assert run_dir.RunDirError is errors.RunDirError and issubclass(errors.RunDirError, RuntimeError)
    assert atomic_write.WriteError is errors.WriteError and issubclass(errors.WriteError, OSError)


# ----------------------------------------------------------------------------- quiet start-up
def test_cpp_log_filter_drops_info_and_warning_lines_only():
    from semiseg.startup import filter_cpp_log
    text = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
            "I0000 00:00:1796052335.439702    6758 port.cc:153] oneDNN custom operations are on.\n"
            "W0000 00:00:1796052335.440015    6758 cudart_stub.cc:31] Could not find cuda drivers\n"
            "E0000 00:00:1796052335.440015    6758 cuda_dnn.cc:8] Unable to register cuDNN factory\n"
            "/x/y.py:3: UserWarning: a real Python warning\n")
    assert filter_cpp_log(text) == ("E0000 00:00:1796052335.440015    6758 cuda_dnn.cc:8] Unable to register "
                                    "cuDNN factory\n/x/y.py:3: UserWarning: a real Python warning\n")


def _run(cmd, cwd, env=None, timeout=300):
    env = {k: v for k, v in (env or os.environ).items() if k != "TF_CPP_MIN_LOG_LEVEL"}   # as a user's shell
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_describe_starts_quietly(tmp_path):
    """`python main.py describe`: stdout is the JSON, stderr holds no TensorFlow C++ log line
    (`train` is checked on the runs of tests/test_crash_resume.py)."""
    proc = _run([sys.executable, str(REPO / "main.py"), "describe", "--method", "supervised", "--preset", "smoke"],
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.lstrip().startswith("{") and json.loads(proc.stdout)["parameters"]["student"] > 0
    assert not [m for m in CPP_LOG_MARKERS if m in proc.stderr], proc.stderr[-2000:]


def test_a_log_level_the_user_set_is_left_alone(monkeypatch):
    from semiseg import startup
    finders = list(sys.meta_path)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    startup.quiet_tensorflow_import()
    assert sys.meta_path == finders and os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL")
    startup.quiet_tensorflow_import()        # unset: the hook goes in (and is taken out again here)
    try:
        assert isinstance(sys.meta_path[0], startup._QuietFinder) and os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"
    finally:
        sys.meta_path[:] = finders



def test_usage_names_the_command_as_it_was_invoked(tmp_path):
    """`python main.py --help` says `usage: main.py`, `python -m semiseg` says so too (the installed
    `semiseg` command is checked in test_pip_install_gives_the_semiseg_command)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
    for cmd, prog in (([sys.executable, str(REPO / "main.py")], "main.py"),
                      ([sys.executable, "-m", "semiseg"], "python -m semiseg")):
        proc = _run([*cmd, "--help"], cwd=tmp_path, env=env)
        assert proc.returncode == 0 and proc.stdout.startswith(f"usage: {prog} [-h]"), (cmd, proc.stdout[:200])

# ----------------------------------------------------------------------------- pip install .
@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A venv (system site-packages: TensorFlow is not downloaded again) with `pip install .` (not
    editable) of a copy of the checkout; (venv, env, a folder outside the checkout, seconds taken)."""
    started = time.monotonic()
    tmp = tmp_path_factory.mktemp("install")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", "PIP_ROOT_USER_ACTION": "ignore"}
    env.pop("PYTHONPATH", None)
    build = tmp / "src"          # a copy, so the build leaves no build/ or egg-info in the checkout
    _copy_tracked_tree(build)
    pip = _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                str(build)], cwd=tmp, env=env, timeout=300)
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-2000:]
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return venv, env, elsewhere, time.monotonic() - started


def test_pip_install_gives_the_semiseg_command(installed):
    """From another folder: `semiseg --version`, `import semiseg` resolves in the venv's
    site-packages, and no generic top-level module (config, metrics, ...) was installed."""
    venv, env, elsewhere, seconds = installed
    version = _run([str(venv / "bin" / "semiseg"), "--version"], cwd=elsewhere, env=env)
    from semiseg import __version__
    assert (version.returncode, version.stdout.strip()) == (0, f"semiseg {__version__}"), version.stderr
    where = _run([str(venv / "bin" / "python"), "-c", "import semiseg, importlib.util as u, json; print(json.dumps("
                  "[semiseg.__file__, [m for m in ('config', 'metrics', 'predict', 'augment', 'main', 'models_tf2', "
                  "'train_ssl_tf2', 'data_loader_tf2') if u.find_spec(m)]]))"], cwd=elsewhere, env=env)
    assert where.returncode == 0, where.stderr
    location, generic = json.loads(where.stdout)
    assert Path(location).is_relative_to(venv) and "site-packages" in location
    assert generic == []
    # Package data: the shipped split files (data.split_file=acdc_ssl4mis) are installed too.
    shipped = _run([str(venv / "bin" / "python"), "-c", "from semiseg.data.splits import load_split_file; "
                    "path, spec = load_split_file('acdc_ssl4mis'); print(path, len(spec['train']))"], cwd=elsewhere, env=env)
    assert shipped.returncode == 0 and shipped.stdout.split()[1] == "70", shipped.stderr[-2000:]
    assert Path(shipped.stdout.split()[0]).is_relative_to(venv)
    # Usage lines name the command the user typed (argparse's prog from argv[0]).
    usage = _run([str(venv / "bin" / "semiseg"), "--help"], cwd=elsewhere, env=env)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: semiseg [-h]"), usage.stdout[:200]
    wrong = _run([str(venv / "bin" / "semiseg"), "trian"], cwd=elsewhere, env=env)
    assert wrong.returncode == 2 and "usage: semiseg [-h]" in wrong.stderr and "semiseg: error:" in wrong.stderr
    print(f"venv + pip install .: {seconds:.1f} s")


@pytest.mark.slow   # a TF start and a training run in the venv: about 55 s here on top of the install
def test_installed_command_trains_and_starts_quietly(installed):
    venv, env, elsewhere, _ = installed
    started = time.monotonic()
    train = _run([str(venv / "bin" / "semiseg"), "train", "--method", "supervised", "--preset", "smoke", "--out",
                  "RUN", "--no-progress", "--set", "train.epochs=1"], cwd=elsewhere, env=env, timeout=400)
    assert train.returncode == 0, train.stderr[-3000:]
    first = train.stdout.splitlines()[0]
    assert first.startswith("semiseg: method=supervised preset=smoke"), first
    assert not [m for m in CPP_LOG_MARKERS if m in train.stderr], train.stderr[-2000:]
    assert (elsewhere / "RUN" / "config.yaml").is_file()
    print(f"semiseg train (smoke, 1 epoch) from the venv: {time.monotonic() - started:.1f} s")


def _copy_tracked_tree(dest: Path) -> None:
    """The checkout's tracked and untracked-but-not-ignored files, as `pip install .` of a clone sees them."""
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file() and (name.startswith("semiseg/") or name in ("pyproject.toml", "README.md")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read_bytes())
