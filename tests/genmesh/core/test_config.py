"""``ServerConfig``: a service's config from defaults, ``GENMESH_<SERVICE>_<FIELD>``
variables, then flags (a flag wins over a variable, a variable over a default)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar

import pytest

from genmesh.core.config import ServerConfig


class Mode(StrEnum):
    FAST = "fast"
    SAFE = "safe"


@dataclass(frozen=True, slots=True)
class EchoConfig(ServerConfig):
    SERVICE: ClassVar[str] = "echo"
    DESCRIPTION: ClassVar[str] = "a test service"

    port: int = 50099
    shutdown_grace_s: float = 10.0
    mode: Mode = Mode.FAST
    is_strict: bool = False
    max_num_items: int = 8


def test_defaults_keep_the_shared_fields_first_and_take_the_services_own():
    cfg = EchoConfig.load([], {})
    assert [f.name for f in dataclasses.fields(cfg)][:7] == [
        "host", "port", "shutdown_grace_s", "otlp_endpoint", "trace_sample_ratio",
        "metrics_port", "log_level"]
    assert (cfg.host, cfg.port, cfg.shutdown_grace_s, cfg.log_level) == (
        "127.0.0.1", 50099, 10.0, "INFO")
    assert cfg.address == "127.0.0.1:50099"
    assert EchoConfig.env_prefix() == "GENMESH_ECHO_"


def test_variables_override_defaults_and_flags_override_variables():
    environ = {"GENMESH_ECHO_HOST": "0.0.0.0", "GENMESH_ECHO_PORT": "7000",
               "GENMESH_ECHO_MODE": "safe", "GENMESH_ECHO_IS_STRICT": "yes",
               "GENMESH_ECHO_METRICS_PORT": "9100", "GENMESH_OTHER_PORT": "1"}
    cfg = EchoConfig.load(["--port", "7001", "--max-num-items", "3"], environ)
    assert (cfg.host, cfg.port, cfg.metrics_port) == ("0.0.0.0", 7001, 9100)
    assert (cfg.mode, cfg.is_strict, cfg.max_num_items) == (Mode.SAFE, True, 3)
    assert EchoConfig.load(["--is-strict", "off"], environ).is_strict is False


def test_bad_values_and_unknown_flags_are_refused(capsys):
    with pytest.raises(SystemExit):
        EchoConfig.load(["--is-strict", "maybe"], {})
    with pytest.raises(SystemExit):
        EchoConfig.load(["--no-such-flag", "1"], {})
    assert "genmesh-echo" in capsys.readouterr().err


def test_help_names_each_flags_variable(capsys):
    with pytest.raises(SystemExit):
        EchoConfig.load(["--help"], {})
    out = capsys.readouterr().out
    assert "a test service" in out
    assert "--shutdown-grace-s" in out and "GENMESH_ECHO_SHUTDOWN_GRACE_S" in out


def test_a_config_must_name_its_service():
    with pytest.raises(TypeError, match="SERVICE"):
        ServerConfig.load([], {})
