"""The CLI is generated from Config (gateway/config.py Flag metadata, gateway/cli.py): with
no flags, `gateway serve` builds exactly Config(); every generated flag reaches its field;
choices are checked by Config itself, so the Python API gets the same refusal."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from gateway.cli import _kind, build_parser, config_from_args
from gateway.config import Config, flag_of


def serve(*argv: str, environ: dict | None = None) -> Config:
    return config_from_args(build_parser().parse_args(["serve", *argv]), environ or {})


def test_no_flags_means_the_config_defaults():
    assert serve() == Config()
    chat = build_parser().parse_args(["chat"])
    assert config_from_args(chat, {}) == Config()


def test_every_flag_reaches_its_field():
    defaults, hints = Config(), typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        flag = flag_of(f)
        if flag is None or f.name == "model":
            continue
        name = flag.option_strings(f.name)[0]
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            argv, expected = [name], not default
        elif isinstance(default, list) or f.name == "api_keys":
            argv, expected = [name, "x"], ["x"]
        elif flag.choices:
            expected = next(c for c in flag.choices if c != default)
            argv = [name, expected]
        elif f.name == "kv_cache_memory":
            argv, expected = [name, "3MiB"], "3MiB"
        elif f.name == "pp_layers":   # one count per stage
            argv, expected = [name, "7", "--pp", "1"], "7"
        elif f.name in ("nnodes", "node_rank"):   # needs a rendezvous port and ranks to spread
            argv, expected = [name, "2" if f.name == "nnodes" else "1", "--nnodes", "2", "--pp", "2",
                              "--master-port", "29500"], 2 if f.name == "nnodes" else 1
        else:   # a valid value other than the default, of the field's type
            kind = _kind(hints[f.name])
            expected = {int: 2048 if f.name != "max_model_len" else 64, float: 7.5, str: "x.py"}[kind]
            argv = [name, str(expected)]
        assert getattr(serve(*argv), f.name) == expected, name


def test_distributed_flags_and_torchrun_variables():
    config = serve("--pp", "2", "--pp-layers", "20,10", "--nnodes", "2", environ={"MASTER_ADDR": "10.0.0.1",
                                                                             "MASTER_PORT": "29501"})
    assert (config.pp_layer_counts, config.master_addr, config.master_port, config.world_size) == \
        ([20, 10], "10.0.0.1", 29501, 2)
    for argv, message in [(["--pp", "2", "--pp-layers", "30"], "must give 2 positive layer counts"),
                          (["--pp-layers", "a"], "comma-separated integers"),
                          (["--nnodes", "2", "--pp", "2"], "needs --master-port"),
                          (["--nnodes", "2", "--master-port", "1"], r"--tp x --pp \(1 ranks\) must divide"),
                          (["--node-rank", "2", "--nnodes", "2", "--master-port", "1"], "--node-rank 2 must be in")]:
        with pytest.raises(ValueError, match=message):
            serve(*argv)


def test_aliases_env_and_csv():
    assert serve("--tensor-parallel-size", "2").tensor_parallel_size == 2
    assert serve(environ={"GATEWAY_DEVICE": "auto"}).device == "auto"
    assert serve("--device", "cpu", environ={"GATEWAY_DEVICE": "auto"}).device == "cpu"
    assert serve("--cors-allow-methods", "GET, POST", "--cors-allow-methods", "PUT").cors_allow_methods == [
        "GET", "POST", "PUT"]
    assert serve("--no-web-ui").web_ui is False and serve().web_ui is True


@pytest.mark.parametrize("field,value,message", [
    ("dtype", "int8", "--dtype must be auto, bfloat16, float16 or float32, not 'int8'"),
    ("log_level", "trace", "--log-level must be debug, info, warning or error"),
    ("metrics_compat", "prom", "--metrics-compat must be vllm"),
])
def test_choices_are_checked_by_config(field, value, message):
    with pytest.raises(ValueError, match=message):
        Config(**{field: value})
