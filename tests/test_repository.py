"""The repository stands alone: it cites no file outside itself, and carries its licence and citation.

    python -m pytest tests/test_repository.py -q

Files are those git tracks (or, outside a git checkout, every text file under the repository). The
yardsticks of bench/ (reference scripts kept outside the repository) are found through
$SEMISEG_YARDSTICKS or a `shared/yardsticks` folder beside the checkout (bench/common.py,
tests/test_bench_quick.py); that lookup names no relative path such as "../shared", so no file
needs an exception here.
"""
import re
import subprocess
from pathlib import Path

import yaml

import semiseg

REPO = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".sh", ".sbatch", ".toml", ".txt", ".cff", ".yaml", ".yml", ".cfg", ".ini", ""}
# A development machine's layout, a design file that is not in the repository, a sibling folder.
FORBIDDEN = re.compile(r"\.\./shared|DESIGN\.md|/work/")
THIS_FILE = Path(__file__).resolve().relative_to(REPO).as_posix()


def repository_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        paths = [REPO / p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for p in REPO.rglob("*") if ".git" not in p.parts]
    return [p for p in paths if p.is_file() and p.suffix in TEXT_SUFFIXES]


def test_no_file_cites_a_path_outside_the_repository():
    files = repository_files()
    assert len(files) > 50 and any(p.name == "README.md" for p in files)
    hits = []
    for path in files:
        rel = path.relative_to(REPO).as_posix()
        if rel == THIS_FILE:
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{rel}:{number}: {line.strip()[:120]}")
    assert not hits, "\n".join(hits)


def test_the_forbidden_pattern_catches_what_it_is_for():
    for line in ("see DESIGN.md", "`../shared/yardsticks/plain_step.py`", 'Path("/work/shared/x")'):
        assert FORBIDDEN.search(line), line
    assert not FORBIDDEN.search("docs/design.md, section 7; shared/yardsticks beside the checkout")


def test_citation_cff_is_valid_cff_and_carries_the_package_version():
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0"
    assert cff["version"] == semiseg.__version__
    assert cff["title"] and cff["message"] and cff["license"] == "Apache-2.0"
    assert cff["authors"] == [{"name": "semiseg developers"}]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(cff["date-released"])), cff["date-released"]
    # The CFF 1.2.0 schema's required keys, and no key it does not know (it forbids extra ones).
    known = {"abstract", "authors", "cff-version", "commit", "contact", "date-released", "doi", "identifiers",
             "keywords", "license", "license-url", "message", "preferred-citation", "references", "repository",
             "repository-artifact", "repository-code", "title", "type", "url", "version"}
    assert {"authors", "cff-version", "message", "title"} <= set(cff) <= known, set(cff) - known
    assert cff.get("type", "software") in ("software", "dataset")


def test_licence_is_apache_2_and_every_place_says_so():
    licence = (REPO / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert "Apache-2.0" in (REPO / "pyproject.toml").read_text()
    readme = (REPO / "README.md").read_text()
    assert "Apache License 2.0" in readme and "[LICENSE](LICENSE)" in readme and "patent" in readme


def test_readme_method_table_names_every_method_with_its_class_length():
    """README section 4 lists every method package with the length of its Trainer class; adding a
    method or growing one without updating the table fails here."""
    import inspect
    import re
    from semiseg import methods
    readme = (REPO / "README.md").read_text()
    for name in methods.names():
        row = re.search(rf"^\| `{name}` \|.*\| (\d+) lines \|$", readme, re.M)
        assert row, f"README's method table has no row for {name}"
        assert int(row.group(1)) == len(inspect.getsourcelines(methods.get_method(name))[0]), name
