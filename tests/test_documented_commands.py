"""Every training command the docs show resolves, and its global batch splits over its replicas.

    python -m pytest tests/test_documented_commands.py -q

Commands are read from the fenced blocks of README.md, slurm/README.md and docs/*.md and from the
usage comments of slurm/*.sbatch (backslash continuations joined). The replica count of an sbatch
command is nodes x GPUs per node, from its own options (`--nodes`, `-N`, `--gres=gpu:N`) over the
script's `#SBATCH` defaults: the train scripts run one task per node using all its GPUs. A plain
`python main.py train` has one replica, or SEMISEG_LOGICAL_CPUS of them. The config is resolved as
main.py does (its parser, then config.resolve), so a bad key or value fails here too. Not checked:
`--resume` (the run folder holds the config) and sweep.sbatch (one GPU per task, batch from a file).
"""
import re
import shlex
from pathlib import Path

import config
from semiseg import cli as main  # main.py is a thin entry point over semiseg.cli

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPTS = ("train_1gpu.sbatch", "train_node.sbatch", "train_multinode.sbatch")


def _joined(lines):
    out, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return out


def _doc_lines(path: Path):
    """Lines of shell a document shows: fenced blocks of Markdown, usage comments of a script."""
    text = path.read_text().splitlines()
    if path.suffix == ".md":
        lines, inside = [], False
        for line in text:
            if line.startswith("```"):
                inside = not inside
            elif inside:
                lines.append(line)
        return _joined(lines)
    return _joined([line[1:].strip() for line in text if line.startswith("#   ") or line.startswith("#       ")])


def documented_commands():
    files = [REPO / "README.md", REPO / "slurm" / "README.md", *sorted((REPO / "docs").glob("*.md")),
             *sorted((REPO / "slurm").glob("*.sbatch"))]
    for path in files:
        for line in _doc_lines(path):
            if "main.py train" in line or any(s in line for s in TRAIN_SCRIPTS):
                yield path.relative_to(REPO), line


def _sbatch_defaults(script: str) -> list[str]:
    return [line.split(None, 1)[1].strip() for line in (REPO / "slurm" / script).read_text().splitlines()
            if line.startswith("#SBATCH ")]


def _replicas_from_sbatch(options: list[str]) -> int:
    """nodes x GPUs per node; later options win (the command line after the script's defaults)."""
    nodes, gpus = 1, 0
    it = iter(options)
    for opt in it:
        if opt in ("-N", "--nodes"):
            opt = f"--nodes={next(it)}"
        if opt.startswith("--nodes="):
            nodes = int(opt.split("=", 1)[1].split("-")[0])
        match = re.match(r"--gres=gpu(?::[\w-]+)?:(\d+)$", opt)
        if match:
            gpus = int(match.group(1))
    assert gpus >= 1, f"no --gres=gpu:N in {options}"
    return nodes * gpus


def train_args_and_replicas(line: str):
    """(main.py train arguments, replica count) of a documented command, or None to skip it."""
    # Synopses: optional parts dropped, the first of {a,b,...} alternatives taken.
    line = re.sub(r"\{([\w.-]+),[^}]*\}", r"\1", re.sub(r"\s\[[^\]]*\]", "", line))
    words = shlex.split(line, comments=True)
    env = {}
    while words and re.match(r"^[A-Z_]+=", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    if not words:
        return None
    if "main.py" in words[:2] and words[words.index("main.py") + 1:][:1] == ["train"]:
        args = words[words.index("main.py") + 2:]
        return args, int(env.get("SEMISEG_LOGICAL_CPUS", "1"))
    if words[0] != "sbatch":
        return None
    script_at = next(i for i, w in enumerate(words) if w.startswith("slurm/"))
    script = Path(words[script_at]).name
    if script not in TRAIN_SCRIPTS:
        return None
    replicas = _replicas_from_sbatch(_sbatch_defaults(script) + words[1:script_at])
    positional = words[script_at + 1:]
    method, preset, data = (positional + [None] * 3)[:3]
    rest = positional[3:]
    method, preset, data = method or env.get("METHOD"), preset or env.get("PRESET"), data or env.get("DATA")
    args = ["--method", method] + (["--preset", preset] if preset else []) + (["--data", data] if data else [])
    if env.get("FORMAT"):
        args += ["--set", f"data.format={env['FORMAT']}"]
    return args + shlex.split(env.get("EXTRA", "")) + rest, replicas


def test_every_documented_train_command_resolves_and_splits_its_batch():
    parser = main.build_parser()
    checked, seen_replicas, problems = 0, set(), []
    for where, line in documented_commands():
        found = train_args_and_replicas(line)
        if found is None:
            continue
        args, replicas = found
        if "--resume" in args:
            continue
        try:
            # As main.py does, short of checking files that earlier documented steps create.
            parsed = parser.parse_args(["train", *args])
            cfg = config.resolve(parsed.preset, parsed.config, parsed.set, parsed.method)
            main._apply_data_args(cfg, parsed)
        except (config.ConfigError, SystemExit) as err:
            problems.append(f"{where}: {line.strip()}\n    {err}")
            continue
        checked += 1
        seen_replicas.add(replicas)
        if cfg.train.batch_size % replicas:
            problems.append(f"{where}: {line.strip()}\n    train.batch_size={cfg.train.batch_size} on "
                            f"{replicas} replicas")
    assert not problems, "\n".join(problems)
    # The parser found the commands it is meant to check: single-process, 2 logical CPUs, one node
    # of 4 and of 8 GPUs, 2 and 4 nodes (8, 16 and 32 GPUs).
    assert {1, 2, 4, 8, 16, 32} <= seen_replicas, seen_replicas
    assert checked >= 15, checked


def test_replica_count_of_sbatch_options():
    defaults = _sbatch_defaults("train_multinode.sbatch")
    assert _replicas_from_sbatch(defaults) == 8                              # 2 nodes x gpu:4
    assert _replicas_from_sbatch(defaults + ["--nodes=4", "--gres=gpu:8"]) == 32
    assert _replicas_from_sbatch(_sbatch_defaults("train_1gpu.sbatch")) == 1


def test_linear_lr_scaling_is_relative_to_the_reference_batch():
    from train_ssl_tf2 import effective_lr
    cfg = config.resolve("pancreas_mean_teacher", "", ["train.lr_scaling=linear"], "mean_teacher")
    assert effective_lr(cfg.train) == cfg.train.lr                 # the preset's own batch: unchanged
    cfg = config.resolve("pancreas_mean_teacher", "", ["train.lr_scaling=linear", "train.batch_size=64"],
                         "mean_teacher")
    assert cfg.train.lr_reference_batch == 8                         # the preset family's batch
    assert abs(effective_lr(cfg.train) - 8 * cfg.train.lr) < 1e-12
    try:
        config.resolve("cpu", "", ["train.lr_scaling=linear"], "supervised")
    except config.ConfigError as err:
        assert "train.lr_reference_batch" in str(err)
    else:
        raise AssertionError("linear scaling without a reference batch was accepted")
