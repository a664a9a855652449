import pytest
import yaml

from semiseg import config
from semiseg.config import ConfigError


def test_yaml_round_trip(tmp_path):
    cfg = config.resolve("smoke", overrides=["train.lr=3e-4", "data.labeled_fraction=0.3", "data.ct_window=[-100,200]"],
                         method="mean_teacher")
    path = tmp_path / "c.yaml"
    config.save_yaml(cfg, path)
    back = config.from_dict(config.load_yaml(path))
    assert back == cfg
    assert back.train.lr == pytest.approx(3e-4) and back.data.ct_window == [-100.0, 200.0]
    assert back.method == "mean_teacher" and back.preset == "smoke"


def test_override_order_and_coercion(tmp_path):
    f = tmp_path / "o.yaml"
    f.write_text(yaml.safe_dump({"train": {"epochs": 7, "batch_size": 2}}))
    cfg = config.resolve("cpu", str(f), ["train.epochs=9", "data.hide_labels=yes", "seed=3"])
    assert cfg.train.epochs == 9            # --set beats the file
    assert cfg.train.batch_size == 2        # the file beats the preset
    assert cfg.data.image_size == 64        # the preset beats defaults
    assert cfg.data.hide_labels is True and cfg.seed == 3


@pytest.mark.parametrize("override, fragment", [
    ("train.lrr=1", "unknown config key 'train.lrr'"),
    ("nosection.x=1", "unknown config key 'nosection'"),
    ("train.epochs=many", "train.epochs: expected int"),
    ("train.epochs=2.5", "train.epochs: expected int"),
    ("data.hide_labels=maybe", "data.hide_labels: expected true/false"),
    ("train.precision=float8", "train.precision"),
    ("data.labeled_fraction=0", "data.labeled_fraction"),
    ("trainlr", "section.key=value"),
])
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        config.resolve("smoke", overrides=[override])


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        config.resolve("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.resolve(config_file=str(bad))


def test_image_size_must_fit_depth():
    with pytest.raises(ConfigError, match="divisible by 2\\*\\*model.depth"):
        config.resolve("cpu", overrides=["data.image_size=60"])


def test_cli_prints_yaml(capsys):
    assert config.main(["--preset", "smoke", "--set", "seed=5"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["seed"] == 5
    assert config.main(["--set", "bogus.key=1"]) == 2


def test_optimizer_choice_is_checked_and_builds_sgd_with_momentum():
    with pytest.raises(config.ConfigError, match="train.optimizer"):
        config.resolve(overrides=["train.optimizer=rmsprop"])
    import keras
    from semiseg.training import trainer as train_ssl_tf2
    trainer = train_ssl_tf2.Trainer.__new__(train_ssl_tf2.Trainer)
    trainer.cfg = config.resolve(overrides=["train.optimizer=sgd", "train.momentum=0.95", "train.lr=0.01"])
    trainer.n_replicas, trainer.steps_per_epoch, trainer.total_steps = 1, 10, 100
    opt = trainer._build_optimizer()
    assert isinstance(opt, keras.optimizers.SGD) and opt.momentum == pytest.approx(0.95)
    trainer.cfg = config.resolve()
    from semiseg.training.fused_optimizers import FusedAdam
    assert type(trainer._build_optimizer()) is FusedAdam       # Keras' Adam, one kernel per variable


REPEATED_SET = ["--preset", "smoke", "--set", "data.labeled_fraction=0.1", "train.epochs=3",
                "--set", "seed=2", "--set", "train.epochs=5"]


@pytest.mark.parametrize("command", ["train", "describe", "preprocess", "check-data"])
def test_repeated_set_accumulates_in_every_main_command(command):
    # The sbatch scripts build `--set a=1 --set b=2`; argparse's plain nargs="*" kept only the last
    # occurrence, so sweeps trained at the preset's labeled fraction.
    from semiseg import cli as main
    args = main.build_parser().parse_args([command, *REPEATED_SET])
    assert args.set == ["data.labeled_fraction=0.1", "train.epochs=3", "seed=2", "train.epochs=5"]
    cfg = config.resolve(args.preset, args.config, args.set)
    assert (cfg.data.labeled_fraction, cfg.seed, cfg.train.epochs) == (0.1, 2, 5)   # later wins per key
    assert main.build_parser().parse_args([command]).set == []       # no default shared between parses


def test_repeated_set_accumulates_in_config_cli(capsys):
    assert config.main(REPEATED_SET) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert (resolved["data"]["labeled_fraction"], resolved["seed"], resolved["train"]["epochs"]) == (0.1, 2, 5)


def test_a_run_saved_before_labeled_forward_existed_reads_as_joint(tmp_path):
    """Runs saved before train.labeled_forward existed trained joint: --resume and evaluate read
    them so (KEYS_ADDED_LATER), while a new run gets today's default and a saved value stays as saved."""
    cfg = config.resolve("smoke", method="mean_teacher")
    assert cfg.train.labeled_forward == "separate"
    old = config.to_dict(cfg)
    del old["train"]["labeled_forward"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert config.load_saved_config(tmp_path / "config.yaml").train.labeled_forward == "joint"
    config.save_yaml(cfg, tmp_path / "config.yaml")
    assert config.load_saved_config(tmp_path / "config.yaml").train.labeled_forward == "separate"
