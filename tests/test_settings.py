from pathlib import Path

import pytest

from webapp.settings import (
    Settings,
    SettingsError,
    load_settings,
    settings_markdown_table,
)

README = Path(__file__).resolve().parent.parent / "docs" / "operations.md"


def test_defaults_match_the_product_card():
    s = load_settings([], environ={})
    assert (s.host, s.port, s.model, s.load_in_4bit, s.demo) == ("127.0.0.1", 7860, "embedded", False, False)
    assert s.resolved_adapters_dir == s.data_dir / "adapters"


def test_cli_beats_env_beats_toml(tmp_path):
    config = tmp_path / "hangjia.toml"
    config.write_text('port = 9000\nmodel = "Qwen/Qwen3-14B"\nload-in-4bit = true\ndata_dir = "/srv/hj"\n')
    env = {"HANGJIA_PORT": "9100", "HANGJIA_DEMO": "yes"}
    s = load_settings(["--config", str(config), "--port", "9200", "--no-demo"], environ=env)
    assert s.port == 9200  # CLI wins over env and file
    assert s.demo is False  # --no-demo wins over HANGJIA_DEMO
    assert s.model == "Qwen/Qwen3-14B" and s.load_in_4bit is True  # from the file
    assert s.data_dir == Path("/srv/hj")
    s = load_settings(["--config", str(config)], environ=env)
    assert s.port == 9100 and s.demo is True  # env wins over the file


def test_env_var_can_name_the_config_file(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("max_new_tokens = 64\n")
    assert load_settings([], environ={"HANGJIA_CONFIG": str(config)}).max_new_tokens == 64


def test_unknown_keys_fail_with_a_hint_and_all_problems_are_reported_at_once(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("prot = 1\nmax_new_tokens = 'many'\n")
    with pytest.raises(SettingsError) as info:
        load_settings(["--config", str(config)], environ={"HANGJIA_MODLE": "x", "HANGJIA_PORT": "http"})
    message = str(info.value)
    assert "unknown key 'prot'" in message and "Did you mean 'port'" in message
    assert "HANGJIA_MODLE" in message and "Did you mean HANGJIA_MODEL" in message
    assert "'many' is not a valid int for max_new_tokens" in message
    assert "'http' is not a valid int for port" in message
    assert len(info.value.problems) == 4


def test_invalid_values_name_the_flag_and_the_choices():
    with pytest.raises(SettingsError) as info:
        Settings(port=70000, dtype="int3", top_p=0, replay_answer_tokens=0)
    message = str(info.value)
    assert "--port" in message and "float32, bfloat16" in message and "--top-p" in message
    assert "--replay-answer-tokens" in message


def test_the_refresh_trains_with_the_replay_answer_length_set():
    """--replay-answer-tokens reaches the recipe the nightly refresh runs."""
    from webapp.services import refresh_settings

    assert refresh_settings(Settings(replay_answer_tokens=320)).replay_answer_tokens == 320
    assert refresh_settings(Settings()).replay_answer_tokens == 32


def test_the_refresh_can_keep_its_backward_in_bf16():
    """--no-fp8-backward (or HANGJIA_FP8_BACKWARD=0) reaches the recipe; on by default."""
    from webapp.services import refresh_settings

    assert refresh_settings(Settings()).fp8_backward is True
    assert refresh_settings(Settings(fp8_backward=False)).fp8_backward is False


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(["--config", str(tmp_path / "nope.toml")], environ={})


def test_cli_rejects_an_invalid_choice(capsys):
    with pytest.raises(SystemExit):
        load_settings(["--device", "tpu"], environ={})
    assert "invalid choice" in capsys.readouterr().err


def test_help_lists_every_setting(capsys):
    """`launch.py --help` prints (a help text with a literal % once crashed argparse)."""
    from dataclasses import fields

    with pytest.raises(SystemExit) as exit_info:
        load_settings(["--help"], environ={})
    assert exit_info.value.code == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert all(f"--{f.name.replace('_', '-')}" in printed for f in fields(Settings))
    assert "4.3% of near" in printed  # a literal % (argparse may wrap at the hyphen)


def test_readme_lists_every_setting_as_generated():
    assert settings_markdown_table() in README.read_text(encoding="utf-8"), (
        "docs/operations.md's settings table is out of date: paste the output of `python launch.py --settings-table`"
    )
