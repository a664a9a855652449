"""Every configuration is checked before any work: ranges and choices of each field, the rules
between fields, the method table against the registered Trainers, and the CLI's exit code 2.

    python -m pytest tests/test_config_rules.py -q
"""
import dataclasses
import subprocess
import sys
import textwrap
import typing

import pytest

from semiseg import config
from semiseg import cli as main
from semiseg.config import ConfigError
from test_equivalence import SUBPROCESS_TIMEOUT_S, python_env


def test_method_table_agrees_with_registered_trainers():
    """Each method's spec (read without TensorFlow) must say what its Trainer class really builds,
    and every method package registers both halves under its folder's name."""
    from semiseg import methods
    from semiseg.training import registry as train_ssl_tf2
    for name in methods.names():
        assert methods.get_method(name).method_name == name
    assert set(config.METHODS) == set(train_ssl_tf2.METHODS) == set(methods.names())
    exportable = set(config.CHOICES["train.export"]) - {"auto"}     # what train.export can name
    variants = {"mean_teacher": [[], ["mean_teacher.evaluate_teacher=false"]],
                "mixmatch": [[], ["mixmatch.ema_decay=0"]],
                "mira_u": [["mira_u.ema_target=student_ema"], ["mira_u.ema_target=teacher_head"]]}
    for name, cls in train_ssl_tf2.METHODS.items():
        info = config.METHODS[name]
        assert info.uses_unlabeled == cls.uses_unlabeled, name
        for sets in variants.get(name, [[]]):
            cfg = config.resolve("smoke", overrides=sets, method=name)
            nets = cls.build_networks(cfg, cfg.data.image_size, 1)
            assert set(info.networks) == set(nets) & exportable, (name, sets, sorted(nets))


def test_model_and_format_choices_agree_with_registries():
    from semiseg.data import sources as data_sources
    from semiseg.models import unet as models_tf2
    from semiseg.models import transformer as models_transformer  # noqa: F401  (registers 'hybrid')
    assert set(config.MODEL_NAMES) == set(models_tf2.MODELS)
    assert set(config.DATA_FORMATS) == set(data_sources.SOURCES) | {"auto"}


def _numeric_fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        typ = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(typ):
            yield from _numeric_fields(typ, f"{prefix}{f.name}.")
        elif typ in (int, float):
            yield f"{prefix}{f.name}"


def test_every_numeric_field_has_a_range_and_defaults_pass():
    missing = [k for k in _numeric_fields(config.Config) if k not in config.RANGES]
    assert missing == []
    config.validate(config.Config())


@pytest.mark.parametrize("preset", sorted(config.PRESETS))
@pytest.mark.parametrize("method", sorted(config.METHODS))
def test_every_preset_resolves_with_every_method(preset, method):
    """No combination is refused by design today: the presets' image sizes (32, 64, 256) are
    multiples of 16 and of 2**model.depth, so they fit the U-Net, the hybrid student and the ViT
    teacher's 8x8 patches alike, and every preset keeps unlabeled_ratio >= 1."""
    cfg = config.resolve(preset, method=method)
    assert cfg.method == method and cfg.preset == preset


# (method, --set values, the key the error must name): one per rule, then type errors.
BAD = [
    ("supervised", ["train.export=teacher"], "train.export"),
    ("mixmatch", ["train.export=teacher"], "train.export"),
    ("mixmatch", ["mixmatch.temperature=0"], "mixmatch.temperature"),
    ("mixmatch", ["mixmatch.alpha=0"], "mixmatch.alpha"),
    ("mira_u", ["mira_u.kappa=0"], "mira_u.kappa"),
    ("mira_u", ["mira_u.mc_samples=1"], "mira_u.mc_samples"),
    ("mira_u", ["data.image_size=40"], "data.image_size"),
    ("mira_u", ["mira_u.patch_size=6"], "mira_u.patch_size"),
    ("mira_u", ["mira_u.embed_dim=30", "mira_u.num_heads=4"], "mira_u.embed_dim"),
    ("mira_u", ["mira_u.student=unet"], "mira_u.student"),
    ("mira_u", ["mira_u.pseudo_label=hard"], "mira_u.pseudo_label"),
    # The U-Net student (mira_u.student=model) obeys model.*'s rules; the hybrid ignores model.*.
    ("mira_u", ["mira_u.student=model", "model.depth=6"], "data.image_size"),
    ("mira_u", ["mira_u.student=model", "model.dropout=1"], "model.dropout"),
    ("mean_teacher", ["train.unlabeled_ratio=0"], "train.unlabeled_ratio"),
    ("mixmatch", ["train.unlabeled_ratio=0"], "train.unlabeled_ratio"),
    ("mean_teacher", ["mean_teacher.ema_decay=1"], "mean_teacher.ema_decay"),
    ("mean_teacher", ["mean_teacher.consistency=-1"], "mean_teacher.consistency"),
    ("supervised", ["model.name=hybrid", "data.image_size=40"], "data.image_size"),
    ("supervised", ["model.name=hybrid", "model.dropout=0.3"], "model.dropout"),
    ("supervised", ["model.name=hybrid", "model.batchnorm=false"], "model.batchnorm"),
    ("supervised", ["model.name=transformer"], "model.name"),
    ("supervised", ["model.dropout=1"], "model.dropout"),
    ("supervised", ["model.bn_momentum=1.5"], "model.bn_momentum"),
    ("supervised", ["train.lr=0"], "train.lr"),
    ("supervised", ["train.weight_decay=-0.1"], "train.weight_decay"),
    ("supervised", ["train.keep_checkpoints=0"], "train.keep_checkpoints"),
    ("supervised", ["train.eval_batch_size=0"], "train.eval_batch_size"),
    ("supervised", ["train.warmup_epochs=1"], "train.warmup_epochs"),      # constant schedule: no warm-up
    ("supervised", ["train.lambda_dice=0", "train.lambda_bce=0"], "train.lambda_dice"),
    ("supervised", ["data.background_ratio=1.5"], "data.background_ratio"),
    ("supervised", ["data.val_fraction=0.6", "data.test_fraction=0.5"], "data.val_fraction"),
    ("supervised", ["data.ct_window=[300,100]"], "data.ct_window"),
    ("supervised", ["data.format=nifti"], "data.format"),
    ("supervised", ["data.classes=[RV,MYO,LV]", "data.label_set=[1,2]"], "data.label_set"),
    ("supervised", ["data.labeled_cases=-1"], "data.labeled_cases"),
    ("supervised", ["seed=-1"], "seed"),
    ("supervised", ["train.epochs=many"], "train.epochs"),
    ("supervised", ["train.batch_size=2.5"], "train.batch_size"),
    ("supervised", ["data.hide_labels=maybe"], "data.hide_labels"),
    ("supervised", ["model.dropout=abc"], "model.dropout"),
    ("supervised", ["train.lrr=1"], "train.lrr"),
    ("nope", [], "method"),
]


@pytest.mark.parametrize("method, sets, key", BAD, ids=[f"{m}:{' '.join(s) or 'method'}" for m, s, _ in BAD])
def test_bad_value_exits_2_naming_the_key_without_a_run_folder(method, sets, key, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--method", method, "--preset", "smoke", *(["--set", *sets] if sets else [])]
    assert main.main(["train", *argv, "--out", str(out), "--no-progress"]) == 2
    assert key in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert main.main(["describe", *argv]) == 2
    assert key in capsys.readouterr().err


def test_hybrid_honours_bn_momentum_and_sync_batchnorm():
    import keras
    from semiseg.models import unet as models_tf2
    # dropout=0 says what the hybrid does (it has no dropout layer), so it is accepted.
    cfg = config.resolve("smoke", overrides=["model.name=hybrid", "model.bn_momentum=0.8", "model.sync_batchnorm=true",
                                              "model.dropout=0"])
    model = models_tf2.build_model(cfg.model, 32, 1)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) > 10
    assert {(n.momentum, n.synchronized) for n in norms} == {(0.8, True)}


CLASS_RULES = [
    (["data.classes=[]"], "data.classes", "one or more"),
    (["data.classes=[a,'']"], "data.classes", "non-empty"),
    (["data.format=msd", "data.classes=[RV,'my o']", "data.label_set=[1,2]"], "data.classes", "letters, digits"),
    (["data.classes=[RV,RV]", "data.label_set=[1,2]"], "data.classes", "unique"),
    (["data.classes=[background,RV]", "data.label_set=[1,2]"], "data.classes", "implicit background"),
    (["data.classes=[RV,MYO,LV]", "data.label_set=[1,2]"], "data.label_set", "exactly 3"),
    (["data.classes=[RV,MYO]", "data.label_set=[1,0]"], "data.label_set", ">= 1"),
    (["data.classes=[RV,MYO]", "data.label_set=[2,2]"], "data.label_set", "twice"),
    (["data.classes=[RV,MYO]", "data.label_set=[1,2]"], "data.classes", "embedded 2D set has one structure"),
]


@pytest.mark.parametrize("sets, key, words", CLASS_RULES)
def test_class_rules_name_the_key(sets, key, words):
    with pytest.raises(ConfigError) as err:
        config.resolve("smoke", overrides=sets)
    assert str(err.value).startswith(key) and words in str(err.value)


def test_class_count_helpers():
    binary = config.resolve("smoke").data
    assert binary.classes == ["foreground"] and binary.label_set == [1, 2]     # today's default: 1 and 2 merge
    assert (config.num_classes(binary), config.is_multiclass(binary), config.output_channels(binary)) == (2, False, 1)
    three = config.resolve("smoke", overrides=["data.format=acdc", "data.classes=RV,MYO,LV", "data.label_set=[1,2,3]"]).data
    assert three.classes == ["RV", "MYO", "LV"]
    assert (config.num_classes(three), config.is_multiclass(three), config.output_channels(three)) == (4, True, 4)


# Runs main.main in a fresh interpreter: is TensorFlow loaded by the time the error is reported?
PROBE = textwrap.dedent("""
    import sys, main
    rc = main.main(sys.argv[1:])
    print("RESULT", rc, "tensorflow" in sys.modules)
""")


def test_unknown_method_exits_2_before_tensorflow_loads(tmp_path):
    proc = subprocess.run([sys.executable, "-c", PROBE, "train", "--method", "nope", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=tmp_path, env=python_env(), timeout=SUBPROCESS_TIMEOUT_S)
    assert "RESULT 2 False" in proc.stdout, proc.stderr[-2000:]
    assert "method" in proc.stderr and "mean_teacher" in proc.stderr     # names the known methods
    assert not (tmp_path / "run").exists()


def test_batch_not_divisible_by_replicas_exits_2_before_data_or_run_folder(tmp_path):
    """Two logical CPUs mirrored: a global batch of 3 cannot split in two."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, "train", "--method", "supervised", "--preset", "smoke", "--out",
         str(tmp_path / "run"), "--no-progress", "--set", "train.distribution=mirrored", "train.batch_size=3",
         "data.cache_dir=" + str(tmp_path / "cache")],
        capture_output=True, text=True, cwd=tmp_path, env=python_env(SEMISEG_LOGICAL_CPUS="2"),
        timeout=SUBPROCESS_TIMEOUT_S)
    assert "RESULT 2" in proc.stdout, (proc.stdout + proc.stderr)[-3000:]
    assert "train.batch_size" in proc.stderr and "3" in proc.stderr and "2 replicas" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []          # no run folder, no slice cache
