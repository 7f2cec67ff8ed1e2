import pytest

from mofserve.server.config import ServeConfig, load_config


def test_precedence_is_defaults_then_file_then_environment_then_flags(tmp_path):
    file = tmp_path / "mofserve.toml"
    file.write_text('[serve]\nprofile = "small"\ngrpc_port = 50061\nhttp_port = 8081\n'
                    "[limits]\nmax_image_bytes = 1000\n")
    env = {"MOFSERVE_HTTP_PORT": "8082", "MOFSERVE_MAX_QUESTION_CHARS": "50", "MOFSERVE_HOME": "/ignored"}
    config = load_config(file, flags={"http_port": 8083, "host": None}, environ=env)
    assert config.profile == "small" and config.grpc_port == 50061
    assert config.http_port == 8083  # flag beats environment beats file
    assert config.limits.max_image_bytes == 1000 and config.limits.max_question_chars == 50
    assert config.host == "127.0.0.1"  # an unset flag keeps what is below it


def test_defaults_bind_loopback_on_the_documented_ports():
    config = load_config(environ={})
    assert (config.host, config.grpc_port, config.http_port) == ("127.0.0.1", 50051, 8080)
    assert config == ServeConfig()


def test_unknown_setting_in_a_file_is_an_error_naming_it(tmp_path):
    file = tmp_path / "bad.toml"
    file.write_text("grpc_prot = 1\n")
    with pytest.raises(ValueError, match="config: unknown setting 'grpc_prot'"):
        load_config(file, environ={})


def test_a_non_numeric_port_names_the_setting():
    with pytest.raises(ValueError, match="grpc_port: expected a number"):
        load_config(environ={"MOFSERVE_GRPC_PORT": "fifty"})
