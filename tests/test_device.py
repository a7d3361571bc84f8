"""Device selection: --device and $GATEWAY_DEVICE reach the Config, and asking for CUDA
where there is none stops `serve` and `generate` at start-up with a clear message."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import make_tiny_model
from procs import free_port
from gateway.cli import build_parser, config_from_args

NO_CUDA_MESSAGE = "--device cuda was asked for, but no CUDA device is available"
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.mark.parametrize("command", [["serve"], ["generate", "hi"], ["chat"]])
def test_gateway_device_is_read_from_the_environment(command):
    args = build_parser().parse_args(command)
    assert config_from_args(args, environ={"GATEWAY_DEVICE": "auto"}).device == "auto"
    assert config_from_args(args, environ={}).device == "cpu"


def test_the_device_flag_wins_over_the_environment():
    args = build_parser().parse_args(["serve", "--device", "cpu"])
    assert config_from_args(args, environ={"GATEWAY_DEVICE": "cuda"}).device == "cpu"


def test_an_unknown_device_in_the_environment_is_refused():
    with pytest.raises(ValueError, match="--device must be cpu, cuda or auto"):
        config_from_args(build_parser().parse_args(["serve"]), environ={"GATEWAY_DEVICE": "tpu"})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_model_dir):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", default_model_dir)


def run_cli(args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_DEVICE"} | (env_extra or {})
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


@needs_no_cuda
def test_serve_with_device_cuda_fails_at_start_up(tiny_dir):
    done = run_cli(["serve", str(tiny_dir), "--device", "cuda", "--port", str(free_port())])
    assert done.returncode == 2
    assert NO_CUDA_MESSAGE in done.stderr and "gateway: error:" in done.stderr
    assert "Uvicorn running" not in done.stderr


@needs_no_cuda
def test_generate_with_gateway_device_cuda_fails_at_start_up(tiny_dir):
    done = run_cli(["generate", "hi", str(tiny_dir)], env_extra={"GATEWAY_DEVICE": "cuda"})
    assert done.returncode == 2 and NO_CUDA_MESSAGE in done.stderr and done.stdout == ""
