"""A README that lies fails CI: every shell command README.md shows runs here, or at least parses.

    python -m pytest tests/test_readme_commands.py -q

Commands come from the ```bash blocks of README.md (backslash continuations joined, comments dropped,
`A && B` split, `x=$(CMD)` read as CMD, leading VAR=value assignments dropped). Each one is:
- `python main.py ...`: parsed by semiseg's real parser; for train/preprocess/check-data/describe the
  configuration is resolved (preset, --config, --set, --data/--format) as main.py resolves it.
  Commands that run here in seconds are run for real, in README order, in a scratch folder, through
  `semiseg.cli.main` (one TensorFlow start for all): `train --preset smoke`, and `evaluate`/`predict`
  of the run folders earlier commands made, on tiny inputs made here when the README's are missing.
  A train command too long to run here (any other preset) is resolved only; its `--out` folder is
  then stood in for by a copy of the smoke run, so the `evaluate`/`predict` commands after it run for
  real on a real run folder. Commands on data that is not here (`/data/...`) or on a run folder no
  earlier command made (a MIRA-U run) are parsed only.
- `python X.py ...` (analysis/, slurm/, bench/): the script exists.
- `sbatch ... slurm/X.sbatch`: the script exists and `bash -n` accepts it.
- `pip install -r FILE`: FILE exists.
Every repository path the README names (docs/..., slurm/..., analysis/..., links) exists.
"""
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from semiseg import cli, config

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def bash_commands(text: str) -> list[str]:
    """Commands of the ```bash blocks, one string each."""
    lines, inside, pending = [], False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            inside = line.strip() == "```bash" if not inside else False
            continue
        if not inside:
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    commands = []
    for line in lines:
        line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        for part in filter(None, (p.strip() for p in line.split("&&"))):
            inner = re.fullmatch(r"\w+=\$\((.*)\)", part)
            commands.append(" ".join((inner.group(1) if inner else part).split()))
    return commands


def words_of(command: str) -> list[str]:
    words = shlex.split(command.split(">", 1)[0])      # an output redirection is not an argument
    while words and re.match(r"^[A-Z_]+=", words[0]):
        words.pop(0)
    return words


def test_bash_commands_are_extracted_as_written():
    text = "```bash\npip install -r a.txt && python -m pytest\nx=$(sbatch --parsable slurm/p.sbatch D)   # c\n" \
           "A=1 B=2 \\\n    sbatch slurm/s.sbatch f\n```\n```\npython main.py train [--resume]\n```\n"
    assert bash_commands(text) == ["pip install -r a.txt", "python -m pytest", "sbatch --parsable slurm/p.sbatch D",
                                   "A=1 B=2 sbatch slurm/s.sbatch f"]
    assert words_of("A=1 B=2 sbatch slurm/s.sbatch f > out.tsv") == ["sbatch", "slurm/s.sbatch", "f"]


def _make_input(path: Path) -> None:
    """A tiny stand-in for an input the README names: a picture, a NIfTI volume, or a folder of pictures."""
    from PIL import Image
    rng = np.random.default_rng(0)
    if path.suffix in (".png", ".jpg"):
        Image.fromarray(rng.integers(0, 255, (40, 44, 3), dtype=np.uint8)).save(path)
    elif path.name.endswith((".nii.gz", ".nii")):
        import nibabel as nib
        nib.save(nib.Nifti1Image(rng.normal(0, 300, (24, 20, 3)).astype(np.float32), np.diag([0.8, 0.8, 2.5, 1])), path)
    else:
        path.mkdir()
        for i in range(2):
            _make_input(path / f"p{i}.png")


def _resolve(parsed):
    cfg = config.resolve(parsed.preset, parsed.config, parsed.set, getattr(parsed, "method", ""))
    cli._apply_data_args(cfg, parsed)
    return cfg


def test_every_readme_command_runs_or_parses(tmp_path, monkeypatch):
    commands = bash_commands(README.read_text())
    parser = cli.build_parser()
    monkeypatch.chdir(tmp_path)
    ran, parsed_only, smoke_run = [], [], None
    for command in commands:
        words = words_of(command)
        if not words or words[0] in ("mkdir",):
            continue
        if words[0] == "pip":
            for i, w in enumerate(words):
                if w == "-r":
                    assert (REPO / words[i + 1]).exists(), command
            continue
        if words[:3] == ["python", "-m", "pytest"]:
            continue
        if words[0] == "sbatch":
            script = next(w for w in words if w.startswith("slurm/"))
            assert (REPO / script).is_file(), command
            assert subprocess.run(["bash", "-n", str(REPO / script)]).returncode == 0, command
            continue
        assert words[0] == "python", f"README command of an unknown kind: {command}"
        if words[1] != "main.py":
            assert (REPO / words[1]).is_file(), command
            continue
        args = words[2:]
        parsed = parser.parse_args(args)            # exits (fails the test) on a bad option
        external = any(w.startswith("/data") for w in args)
        if parsed.command in ("train", "preprocess", "check-data", "describe") and not getattr(parsed, "resume", False):
            cfg = _resolve(parsed)
        if parsed.command == "train" and cfg.preset == "smoke" and not external:
            assert cli.main(args) == 0, command
            smoke_run = Path(parsed.out)
            ran.append(command)
        elif parsed.command == "train":
            if parsed.out and smoke_run is not None and not Path(parsed.out).exists():
                Path(parsed.out).parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(smoke_run, parsed.out)      # a real run folder for the commands after it
            parsed_only.append(command)
        elif parsed.command in ("evaluate", "predict") and Path(parsed.run_dir).is_dir() and not external:
            if parsed.command == "predict" and not Path(parsed.input).exists():
                _make_input(Path(parsed.input))
            assert cli.main(args) == 0, command
            ran.append(command)
        else:
            parsed_only.append(command)
    # What the README promises runs here: the smoke run, and evaluate/predict of a real run folder.
    assert smoke_run is not None and (smoke_run / "metrics.json").exists()
    assert any(" evaluate " in c and "--tta" in c for c in ran), ran
    assert sum(" predict " in c for c in ran) >= 3, ran
    assert (tmp_path / "runs" / "mt" / "eval" / "val_tta" / "metrics.json").exists()
    assert (tmp_path / "mask.png").exists() and (tmp_path / "mask.nii.gz").exists()
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["p0.png", "p0_prob.npy", "p1.png", "p1_prob.npy"]
    assert len(parsed_only) >= 5, parsed_only


def test_every_path_the_readme_names_exists():
    text = README.read_text()
    links = re.findall(r"\]\(([^)#\s]+)", text)
    named = re.findall(r"(?<![\w/.$-])((?:docs|slurm|analysis|bench|semiseg|tests|\.ci)/[\w./-]*\w)", text)
    placeholder = re.compile(r"\b(NAME|RUN|RUN_DIR|METHOD|PRESET)\b")      # bench/NAME.py: a pattern, not a file
    missing = sorted({p for p in links + named
                      if not p.startswith("http") and not placeholder.search(p) and not (REPO / p).exists()})
    assert not missing, missing
    assert len(set(links + named)) >= 30
