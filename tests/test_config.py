import pytest

from tract_dist.cli import main
from tract_dist.config import ConfigError, load_config

REPO_CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs"


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_errors_name_file_and_dotted_key(tmp_path):
    p = _write(tmp_path, "model:\n  name_or_path: m\ntraining:\n  learning_rate: fast\n  bogus: 1\nloss:\n  lam: -1\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert f"{p}: training.learning_rate: Input should be a valid number" in msg
    assert f"{p}: training.bogus: unknown key" in msg
    assert f"{p}: loss.lam: Input should be greater than or equal to 0" in msg


def test_missing_required_and_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"model: required value is missing"):
        load_config(_write(tmp_path, "data:\n  max_length: 512\n"))
    with pytest.raises(ConfigError, match=r"modle: unknown key"):
        load_config(_write(tmp_path, "modle:\n  name_or_path: x\nmodel:\n  name_or_path: x\n"))
    with pytest.raises(ConfigError, match=r"model.lora.r: Input should be greater than 0"):
        load_config(_write(tmp_path, "model:\n  name_or_path: x\n  lora:\n    r: 0\n"))


def test_yaml_is_parsed_safely(tmp_path):
    p = _write(tmp_path, "model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_overrides(tmp_path):
    p = _write(tmp_path, "model:\n  name_or_path: m\n")
    cfg = load_config(p, ["training.learning_rate=3e-4", "model.lora.enabled=true", "cluster.num_workers=2",
                          "generation.stop=[a, b]", "model.tokenizer=llama3"])
    assert cfg.training.learning_rate == 3e-4 and cfg.model.lora.enabled is True
    assert cfg.cluster.num_workers == 2 and cfg.generation.stop == ["a", "b"] and cfg.model.tokenizer == "llama3"
    assert cfg.flat()["training.learning_rate"] == 3e-4
    with pytest.raises(ConfigError, match=r"\(\+ overrides\): training.lr: unknown key"):
        load_config(p, ["training.lr=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(p, ["training.lr"])
    with pytest.raises(ConfigError, match=r"'model.name_or_path' is not a section"):
        load_config(p, ["model.name_or_path.x=1"])


@pytest.mark.parametrize("path", sorted(REPO_CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    load_config(path)


def test_cli_overrides_for_every_command(tmp_path, capsys):
    p = _write(tmp_path, "model:\n  name_or_path: llama3\n")
    assert main(["config", "show", str(p), "data.scale=1-10"]) == 0
    assert "scale: 1-10" in capsys.readouterr().out
    assert main(["score-tokens", "--config", str(p), "data.scale=1-10"]) == 0
    assert '"token_ids": [16, 17, 18, 19, 20, 21, 22, 23, 24, 605]' in capsys.readouterr().out
    assert main(["score-tokens", "--tokenizer", "llama3", "data.bogus=1"]) == 2
    assert "data.bogus: unknown key" in capsys.readouterr().err
