"""How two input pipelines (one per worker) share a training stream: data.shard_policy (CPU).

    python -m pytest tests/test_shard_policy.py -q

A real slice cache of 256 synthetic images in 4 shard files, read through tf.distribute.InputContext
(2 pipelines, 2 replicas). Decodes are counted by wrapping the bundle's `parse_record` (the one place
pixels are decoded) with a py_function that records each decoded record's case id.
- record (default): each pipeline decodes about half of what the two consume together (never the
  whole split), and the global batches are those of one pipeline (tests/test_equivalence.py).
- file: the pipelines' files are disjoint and together all files of the split; each pipeline decodes
  records of its own files only, and over a pass every one of them; one pipeline of `file` is the
  `record` stream exactly, a resumed file stream continues where it stopped, and more pipelines
  than files is refused with a ConfigError naming the key.
- Two real localhost workers (TF_CONFIG): refused at start-up with exit 2 on a one-file cache; the
  slow test trains Mean Teacher with each worker streaming 2 of the 4 files.
"""
import numpy as np
import pytest

N_CASES = 256            # 4 cache shard files of 64 images (cache.plan_chunks), 45 labelled


@pytest.fixture(scope="module")
def bundle():
    from semiseg import config
    from semiseg.data import loader
    cfg = config.resolve("smoke", "", [f"data.synthetic_cases={N_CASES}"])
    b = loader.prepare_data(cfg, log=lambda m: None, progress=False)
    assert len(b.manifest["shards"]) == 4
    return b


def _policy(bundle, policy):
    bundle.data_cfg.shard_policy = policy
    return bundle


def _counting(bundle):
    """Make `bundle.parse_record` append each decoded record's case id to the returned list."""
    import tensorflow as tf
    decoded, parse = [], type(bundle).parse_record.__get__(bundle)

    def note(case, image):
        decoded.append(case.numpy().decode())
        return image

    def counting(serialized):
        r = parse(serialized)
        image = tf.py_function(note, [r["case"], r["image"]], tf.float32)
        image.set_shape(r["image"].shape)
        return {**r, "image": image}

    bundle.parse_record = counting
    return decoded


def _context(pipe, n_pipe=2):
    import tensorflow as tf
    return tf.distribute.InputContext(num_input_pipelines=n_pipe, input_pipeline_id=pipe,
                                      num_replicas_in_sync=n_pipe)


def _batches(bundle, split, context, start, per_replica, n, augment=None):
    ds = bundle.train_dataset(split, per_replica, context, start, augment)
    return [images.numpy() for images, _ in ds.take(n)]


@pytest.mark.parametrize("split", ["labeled", "unlabeled"])
def test_file_policy_pipelines_read_disjoint_files_that_together_are_all(bundle, split):
    b = _policy(bundle, "file")
    try:
        all_files = dict(b.split_files(split))
        shares = [b.file_shard(split, 2, p) for p in range(2)]
        files = [set(f) for f, _ in shares]
        assert files[0] and files[1] and not files[0] & files[1]
        assert files[0] | files[1] == set(all_files) and len(all_files) == 4
        # Records per pass: each pipeline's files' records, together the whole split, shares as even
        # as whole files allow (no pipeline ahead by more than its largest file).
        assert [n for _, n in shares] == [sum(all_files[f] for f in fs) for fs in files]
        assert sum(n for _, n in shares) == b.n_slices(split)
        assert abs(shares[0][1] - shares[1][1]) <= max(all_files.values())
        shard_of = {c: str(b.cache_dir / b.manifest["shards"][b.case_info(c)["shard"]]["file"])
                    for c in b.splits[split]}
        decoded_sets = []
        for p in range(2):
            decoded = _counting(b)
            per_pass = shares[p][1]
            _batches(b, split, _context(p), 0, 2, per_pass // 2 + 1, None)    # a little over one pass
            b.parse_record = type(b).parse_record.__get__(b)
            assert decoded and {shard_of[c] for c in decoded} <= files[p]   # its own files only ...
            assert len(set(decoded)) == per_pass                            # ... and all their records
            decoded_sets.append(set(decoded))
        assert not decoded_sets[0] & decoded_sets[1]
        assert decoded_sets[0] | decoded_sets[1] == set(b.splits[split])
    finally:
        _policy(bundle, "record")


def test_record_policy_decodes_only_its_share(bundle):
    """Both pipelines read every file, but each decodes only the records it keeps: after consuming C
    records each, a pipeline has decoded C plus what tf.data prefetched, far from the 2C that
    decoding before sharding would cost."""
    b = _policy(bundle, "record")
    consumed = 200                                  # per pipeline: over two passes of the 135 unlabelled
    ratios = []
    for p in range(2):
        decoded = _counting(b)
        _batches(b, "unlabeled", _context(p), 0, 2, consumed // 2, None)
        b.parse_record = type(b).parse_record.__get__(b)
        ratios.append(len(decoded) / consumed)
        assert set(decoded) <= set(b.splits["unlabeled"])
    print(f"\nrecord policy: decoded / consumed per pipeline {ratios}")
    assert all(1.0 <= r < 1.3 for r in ratios), ratios


def test_one_file_pipeline_is_the_record_stream_and_a_file_stream_resumes_exactly(bundle):
    from semiseg.data import augment
    aug = augment.weak_augment
    record = _batches(_policy(bundle, "record"), "labeled", None, 0, 4, 14, aug)   # 56 > 45: a new pass
    try:
        file_one = _batches(_policy(bundle, "file"), "labeled", None, 0, 4, 14, aug)
        assert all(np.array_equal(a, b) for a, b in zip(record, file_one))
        for p in range(2):
            straight = _batches(bundle, "labeled", _context(p), 0, 2, 14, aug)
            resumed = _batches(bundle, "labeled", _context(p), 5, 2, 9, aug)
            assert all(np.array_equal(a, b) for a, b in zip(straight[5:], resumed))
    finally:
        _policy(bundle, "record")


def test_file_policy_refuses_more_pipelines_than_files(bundle):
    from semiseg.errors import ConfigError
    try:
        with pytest.raises(ConfigError, match=r"data.shard_policy=file.* 4 shard file\(s\).* 5 input pipelines"):
            _policy(bundle, "file").train_dataset("labeled", 2, _context(0, n_pipe=5))
    finally:
        _policy(bundle, "record")


def test_shard_policy_is_validated_and_not_part_of_the_cache_key():
    from semiseg import config
    from semiseg.data import cache
    from semiseg.errors import ConfigError
    with pytest.raises(ConfigError, match="data.shard_policy: must be one of record, file, got 'files'"):
        config.resolve("smoke", "", ["data.shard_policy=files"])
    record, by_file = (config.resolve("smoke", "", [f"data.shard_policy={p}"]).data for p in ("record", "file"))
    assert cache.key_settings(record) == cache.key_settings(by_file)


def _two_workers(tmp_path, *sets):
    """`main.py train` as two localhost workers (TF_CONFIG, MultiWorkerMirroredStrategy)."""
    import json
    import os
    import sys
    from test_equivalence import REPO, free_ports, python_env, run_processes
    cluster = {"worker": [f"localhost:{port}" for port in free_ports(2)]}
    cmd = [sys.executable, os.path.join(REPO, "main.py"), "train", "--method", "mean_teacher", "--preset", "smoke",
           "--out", str(tmp_path / "run"), "--no-progress", "--set", "train.epochs=1", "data.shard_policy=file", *sets]
    return run_processes([(cmd, python_env(SEMISEG_CACHE=os.environ["SEMISEG_CACHE"], TF_CONFIG=json.dumps(
        {"cluster": cluster, "task": {"type": "worker", "index": i}}))) for i in range(2)])


def test_two_workers_refuse_file_sharding_of_a_one_file_cache_before_a_run_folder_exists(tmp_path):
    """Real MultiWorkerMirroredStrategy on the smoke cache (one shard file): both workers exit 2
    with the key and the numbers, at start-up, not after a run folder was made."""
    for rc, _, stderr in _two_workers(tmp_path):
        assert rc == 2, stderr[-3000:]
        assert "data.shard_policy=file" in stderr and "1 shard file(s)" in stderr
        assert "fewer than the 2 input pipelines" in stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_workers_train_mean_teacher_with_file_sharding(bundle, tmp_path):
    """Real MultiWorkerMirroredStrategy (~80 s here): each worker streams 2 of the 4 files, and the
    run trains and checkpoints."""
    outputs = _two_workers(tmp_path, f"data.synthetic_cases={N_CASES}")
    for rc, _, stderr in outputs:
        assert rc == 0, stderr[-3000:]
    chief = outputs[0][1]
    for split in ("labeled", "unlabeled"):
        assert f"input '{split}' pipeline 1/2: data.shard_policy=file: reads 2 of 4 file(s)" in chief, chief[-3000:]
    assert (tmp_path / "run" / "checkpoints").is_dir() and (tmp_path / "run" / "history.csv").exists()


def test_file_sharded_run_resumes_only_with_its_worker_count(tmp_path, capsys):
    """A file-sharded run trained by one worker; its run_info.json then says two (as a two-worker
    session would have written): resuming with one refuses with exit 2, the folder untouched."""
    import json
    from semiseg import cli
    run = tmp_path / "run"
    assert cli.main(["train", "--method", "supervised", "--preset", "smoke", "--out", str(run), "--no-progress",
                     "--set", "train.epochs=1", "data.shard_policy=file"]) == 0
    info = json.loads((run / "run_info.json").read_text())
    assert info["strategy"]["num_workers"] == 1
    info["strategy"]["num_workers"] = 2
    (run / "run_info.json").write_text(json.dumps(info))
    before = sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*"))
    capsys.readouterr()
    assert cli.main(["train", "--out", str(run), "--resume", "--no-progress", "--set", "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert "data.shard_policy=file" in err and "trained by 2 worker(s), this job has 1" in err
    assert sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*")) == before
