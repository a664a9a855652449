"""Slice cache: reuse when unchanged, rebuild on changed files or a half-written cache, train_keep flags."""
import json
import os
import socket

import numpy as np

from semiseg import config
from semiseg.data import loader as data_loader_tf2
from semiseg.data import sources as data_sources
from semiseg.data import cache as slice_cache
from semiseg.data import workers as worker_pool
from data_layouts import make_msd


def _setup(tmp_path, **overrides):
    root = make_msd(tmp_path / "msd", n=4, n_test=1)
    data_cfg = config.DataConfig(image_size=16, cache_dir=str(tmp_path / "cache"), **overrides)
    return root, data_cfg, data_sources.list_msd_cases(root, data_cfg)


def _build(cases, data_cfg, log=None):
    return slice_cache.build_cache("msd", cases, data_cfg, progress=False, log=log or (lambda m: None), workers=1)


def test_unchanged_files_reuse_changed_file_rebuilds(tmp_path):
    root, data_cfg, cases = _setup(tmp_path)
    first = _build(cases, data_cfg)
    stamp = (first / "manifest.json").stat().st_mtime_ns
    assert _build(cases, data_cfg) == first and (first / "manifest.json").stat().st_mtime_ns == stamp
    label = root / "labelsTr" / "pancreas_002.nii.gz"
    st = label.stat()
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))          # same size, new mtime
    second = _build(cases, data_cfg)
    assert second != first and slice_cache.load_manifest(second) is not None
    with open(label, "ab") as fh:                                           # same mtime, new size
        fh.write(b"\0")
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert slice_cache.cache_key("msd", cases, data_cfg) != second.name.split("-", 1)[1]
    # Settings that change the slices change the key; split settings do not.
    assert slice_cache.cache_key("msd", cases, config.DataConfig(image_size=32)) != \
        slice_cache.cache_key("msd", cases, config.DataConfig(image_size=16))
    assert slice_cache.cache_key("msd", cases, config.DataConfig(labeled_fraction=0.5)) == \
        slice_cache.cache_key("msd", cases, config.DataConfig())


def test_half_written_cache_is_rebuilt_never_read(tmp_path):
    _, data_cfg, cases = _setup(tmp_path)
    final = _build(cases, data_cfg)
    complete = json.loads((final / "manifest.json").read_text())
    # A killed build: shards without a manifest, and a stale partial of a dead process.
    (final / "manifest.json").unlink()
    dead = final.parent / f"{final.name}.partial-{socket.gethostname()}-999999999"
    dead.mkdir()
    messages = []
    assert slice_cache.find_cache("msd", cases, data_cfg) is None
    rebuilt = _build(cases, data_cfg, messages.append)
    assert rebuilt == final and any("incomplete or stale" in m for m in messages)
    assert not dead.exists()
    assert json.loads((final / "manifest.json").read_text())["n_slices"] == complete["n_slices"]
    # A manifest naming a missing shard is not a cache either.
    (final / complete["shards"][0]["file"]).unlink()
    assert slice_cache.load_manifest(final) is None
    assert slice_cache.load_manifest(_build(cases, data_cfg)) is not None


def test_foreground_only_flags_training_slices_but_evaluation_reads_all(tmp_path):
    _, data_cfg, cases = _setup(tmp_path, foreground_only=True, background_ratio=0.0)
    manifest = slice_cache.load_manifest(_build(cases, data_cfg))
    info = manifest["cases"]["pancreas_000"]
    # make_msd labels slices 2 and 3 (z) of 6; the unlabelled imagesTs case keeps every slice.
    assert info["n_slices"] == 6 and info["n_train_slices"] == 2 and info["train_slices"] == [2, 3]
    assert manifest["cases"]["pancreas_004"]["n_train_slices"] == 6
    assert manifest["n_slices"] == 30 and manifest["n_train_slices"] == 4 * 2 + 6
    splits = {"labeled": ["pancreas_000", "pancreas_001"], "unlabeled": ["pancreas_004"], "val": ["pancreas_002"],
              "test": ["pancreas_003"], "hidden_truth": []}
    final = slice_cache.find_cache("msd", cases, data_cfg)
    bundle = data_loader_tf2.DataBundle(final, manifest, splits, data_cfg, seed=0, fmt="msd")
    assert bundle.n_slices("labeled") == 4 and bundle.n_slices("unlabeled") == 6 and bundle.n_slices("val") == 6
    ds = bundle.train_dataset("labeled", 2, with_mask=True)
    masks = [m.numpy() for _, m in ds.take(6)]                 # three passes over the 4 kept slices
    assert all(m.reshape(2, -1).max(axis=1).min() == 1 for m in masks)   # every training slice has foreground
    indices = [int(i) for b in bundle.eval_dataset("val", 4) for i in b["index"].numpy()]
    assert indices == list(range(6))


def test_chunks_do_not_depend_on_the_worker_count(tmp_path):
    cases = [data_sources.Case(f"v{i}", f"/x/v{i}.nii.gz", None, kind="3d") for i in range(9)]
    chunks = worker_pool.plan_chunks(cases)
    assert [len(c) for c in chunks] == [4, 4, 1]
    pictures = [data_sources.Case(f"p{i}", f"/x/p{i}.png") for i in range(130)]
    assert [len(c) for c in worker_pool.plan_chunks(pictures)] == [64, 64, 2]
    assert np.concatenate([[c.case_id for c in ch] for ch in chunks]).tolist() == [c.case_id for c in cases]


def test_a_miss_names_the_nearest_cache_and_how_it_differs(tmp_path):
    root, data_cfg, cases = _setup(tmp_path)
    messages = []
    first = _build(cases, data_cfg, messages.append)
    key = slice_cache.key_of(first)
    assert messages[0] == f"no slice cache with key {key} under {tmp_path / 'cache'}; no msd cache exists there yet; building it"
    assert json.loads((first / "manifest.json").read_text())["settings"]["image_size"] == 16
    messages.clear()
    assert _build(cases, data_cfg, messages.append) == first and messages == [f"slice cache: reusing {key} at {first}"]
    other = config.DataConfig(image_size=32, modality="ct", cache_dir=data_cfg.cache_dir)
    miss = slice_cache.explain_miss("msd", cases, other)
    assert miss.startswith(f"no slice cache with key {slice_cache.cache_key('msd', cases, other)} under ")
    assert miss.endswith(f"the nearest existing cache for this data is {first.name}, which differs in "
                         "(here vs there): data.image_size 32 vs 16, data.modality ct vs auto")
    label = root / "labelsTr" / "pancreas_002.nii.gz"                       # the same settings, a newer file
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10 ** 9))
    assert slice_cache.explain_miss("msd", cases, data_cfg).endswith(
        f"cache (made from other files or file versions) is {first.name}, which differs in (here vs there): "
        "no data.* setting")


def test_a_manifest_without_recorded_settings_is_still_reused(tmp_path):
    _, data_cfg, cases = _setup(tmp_path)
    final = _build(cases, data_cfg)
    manifest = json.loads((final / "manifest.json").read_text())
    for recorded in ("key", "settings", "files_digest"):          # as written before they were recorded
        del manifest[recorded]
    (final / "manifest.json").write_text(json.dumps(manifest))
    messages = []
    assert _build(cases, data_cfg, messages.append) == final
    assert messages == [f"slice cache: reusing {slice_cache.key_of(final)} at {final}"]
    other = config.DataConfig(image_size=32, cache_dir=data_cfg.cache_dir)
    assert slice_cache.explain_miss("msd", cases, other).endswith("; 1 older msd cache(s) there record no settings to compare")


def test_pancreas_presets_share_one_slice_cache():
    # The docs preprocess Task07 once with one pancreas_* preset for every pancreas_* training run.
    settings = [slice_cache.key_settings(config.resolve(name).data) for name in config.PRESETS if name.startswith("pancreas_")]
    assert len(settings) == 3 and all(s == settings[0] for s in settings)
    assert (settings[0]["format"], settings[0]["image_size"], settings[0]["modality"]) == ("msd", 256, "ct")


def test_train_reuses_the_cache_preprocess_built_with_the_same_preset(tmp_path, monkeypatch, capsys):
    from semiseg import cli as main
    cache = tmp_path / "cache"
    monkeypatch.setenv("SEMISEG_CACHE", str(cache))
    assert main.main(["preprocess", "--preset", "smoke", "--no-progress"]) == 0
    (built,) = [p for p in cache.iterdir() if p.name.startswith("synthetic-")]
    key = slice_cache.key_of(built)
    assert f"slice cache ready: key {key} at {built} (" in capsys.readouterr().out
    folders = sorted(cache.iterdir())
    run = tmp_path / "run"
    assert main.main(["train", "--method", "supervised", "--preset", "smoke", "--out", str(run), "--no-progress",
                      "--set", "train.epochs=1", "train.steps_per_epoch=1"]) == 0
    out = capsys.readouterr().out
    assert f"slice cache: reusing {key} at {built}\n" in out and "building it" not in out
    assert sorted(cache.iterdir()) == folders                       # no second cache appeared
    assert json.loads((run / "run_info.json").read_text())["data"]["cache"] == str(built)
    # Another image size: train's data step says why it builds a new cache.
    messages = []
    cfg = config.resolve("smoke", overrides=["data.image_size=16"])
    bundle = data_loader_tf2.prepare_data(cfg, log=messages.append, progress=False)
    assert bundle.cache_dir != built and bundle.image_size == 16
    assert any(m.startswith("no slice cache with key") and m.endswith(
        f"the nearest existing cache for this data is {built.name}, which differs in (here vs there): "
        "data.image_size 16 vs 32; building it") for m in messages), messages


def test_documented_preprocess_commands_name_a_preset():
    # A preprocess without the training command's preset builds a cache training never reads.
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    files = [repo / "README.md", *repo.glob("*.py"), *repo.glob("semiseg/**/*.py"), *repo.glob("docs/*.md"),
             *repo.glob("slurm/*")]
    commands = [(path.name, line) for path in files if path.is_file() for line in path.read_text().splitlines()
                if "main.py preprocess --" in line or "preprocess.sbatch /" in line]
    assert len(commands) >= 8
    assert [c for c in commands if "--preset" not in c[1]] == []
