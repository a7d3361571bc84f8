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


def test_a_runner_takes_the_placement_it_is_given_and_is_an_executor(tiny_dir, monkeypatch):
    """Tensor-parallel workers get the driver's device and dtype (WorkerSpec.placement) and must
    not resolve their own: a runner given a placement never calls the resolver, even where
    its config asks for another dtype. It also offers everything the engine calls."""
    from gateway.config import Config
    from gateway.executor import placement
    from gateway.executor.interface import Executor
    from gateway.executor.model_runner import ModelRunner
    from gateway.models.loader import load_hf_config, resolve_source

    config = Config(model=str(tiny_dir), dtype="bfloat16", num_kv_blocks=8)
    source = resolve_source(config.model, tiny_dir)
    hf_config = load_hf_config(source)
    assert placement.resolve_placement(config, hf_config) == placement.Placement(torch.device("cpu"), torch.bfloat16)
    monkeypatch.setattr(placement, "_resolve_device", lambda name: pytest.fail("resolved a second time"))
    runner = ModelRunner(config, source, hf_config, set(), placement=placement.Placement(torch.device("cpu"), torch.float32))
    assert runner.dtype == torch.float32 and {p.dtype for p in runner.model.parameters()} == {torch.float32}
    assert isinstance(runner, Executor) and runner.worker_pids == [] and runner.death_listener is None
    runner.check_health()
    runner.shutdown()
