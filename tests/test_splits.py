from semiseg import config
from semiseg.data.splits import make_splits
from semiseg.data.sources import Case


def _cases(n, unlabeled=0):
    cases = [Case(f"c{i:03d}", f"/x/c{i}.png", f"/x/c{i}_seg.png") for i in range(n)]
    return cases + [Case(f"u{i:03d}", f"/x/u{i}.png", None) for i in range(unlabeled)]


def test_split_is_per_case_disjoint_and_complete():
    d = config.DataConfig(labeled_fraction=0.1, val_fraction=0.15, test_fraction=0.15)
    s = make_splits(_cases(100, unlabeled=5), d, seed=0)
    parts = [set(s[k]) for k in ("labeled", "unlabeled", "val", "test")]
    assert sum(len(p) for p in parts) == 105
    assert len(set().union(*parts)) == 105                 # no case on two sides
    assert len(s["test"]) == 15 and len(s["val"]) == 15 and len(s["labeled"]) == 7
    assert {f"u{i:03d}" for i in range(5)} <= set(s["unlabeled"])
    assert set(s["hidden_truth"]) == set(s["unlabeled"]) - {f"u{i:03d}" for i in range(5)}


def test_split_reproducible_and_seed_dependent():
    d = config.DataConfig(labeled_fraction=0.3)
    a, b = make_splits(_cases(60), d, 1), make_splits(_cases(60), d, 1)
    assert a == b
    c = make_splits(_cases(60), d, 2)
    assert c["labeled"] != a["labeled"]
    # Input order must not matter: the same cases listed in reverse give the same split.
    assert make_splits(list(reversed(_cases(60))), d, 1) == a


def test_val_and_test_do_not_depend_on_labeled_fraction():
    """Fair comparisons: changing the label budget must not change the evaluation cases."""
    s10 = make_splits(_cases(80), config.DataConfig(labeled_fraction=0.1), 0)
    s50 = make_splits(_cases(80), config.DataConfig(labeled_fraction=0.5), 0)
    assert s10["test"] == s50["test"] and s10["val"] == s50["val"]
    assert set(s10["labeled"]) < set(s50["labeled"])


def test_fixed_subsets_are_respected():
    cases = [Case(f"t{i}", "i", "l", subset="test") for i in range(3)] + _cases(20)
    s = make_splits(cases, config.DataConfig(), 0)
    assert set(s["test"]) == {"t0", "t1", "t2"}


def test_run_seeds_share_one_test_and_validation_set():
    """Methods and seeds must be scored on one test set: the run seed draws only the labelled
    subset; the data set's split_seed alone decides validation and test."""
    d = config.DataConfig(labeled_fraction=0.2)
    by_seed = [make_splits(_cases(80), d, seed) for seed in range(3)]
    assert all(s["test"] == by_seed[0]["test"] and s["val"] == by_seed[0]["val"] for s in by_seed)
    assert len({tuple(s["labeled"]) for s in by_seed}) == 3
    other = make_splits(_cases(80), config.DataConfig(labeled_fraction=0.2, split_seed=1), 0)
    assert other["test"] != by_seed[0]["test"]
