"""Training precision: every policy trains, models leave in float32, `auto` picks what was measured to pay."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from emnist_exp import precision

ROOT = Path(__file__).resolve().parent.parent
MIXED = {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}


def test_auto_picks_float16_on_tensor_cores_and_bf16_only_where_it_was_measured_to_pay():
    assert precision.choose([(8, 0), (7, 0)], set()) == "mixed_float16"
    assert precision.choose([(6, 1)], {"avx512_bf16"}) == "float32"  # a pre-Volta GPU: no tensor cores
    assert precision.choose([], {"avx512_bf16"}, bf16_speedup=precision.PAYS) == "mixed_bfloat16"
    assert precision.choose([], {"amx_bf16", "avx2"}, bf16_speedup=1.9) == "mixed_bfloat16"
    assert precision.choose([], {"avx2", "fma"}, bf16_speedup=1.9) == "float32"  # no native bf16
    assert precision.choose([], {"avx512_bf16"}, bf16_speedup=1.2) == "float32"
    assert precision.choose([], {"avx512_bf16"}, bf16_speedup=None) == "float32"


def test_auto_on_this_machine_is_what_the_benchmark_measured():
    """benchmarks/precision.py measured bf16 below PAYS here, so auto trains in float32 on this CPU."""
    assert precision.MEASURED_BF16_SPEEDUP < precision.PAYS
    assert precision.choose([], {"avx512_bf16"}) == "float32"  # the constant alone keeps bf16 off CPUs
    if precision.gpu_capabilities():
        pytest.skip("a GPU is visible: auto follows the GPU, not the CPU")
    assert precision.resolve("auto") == "float32"
    assert precision.resolve("mixed_bfloat16") == "mixed_bfloat16"  # an explicit choice is kept as given


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert precision.cpu_flags(str(info)) == {"fpu", "avx2", "avx512_bf16"}
    assert precision.cpu_flags(str(tmp_path / "missing")) == set()


# Each policy on the seed CNN: float32 in the fast tier, the mixed policies (emulated, slow on a CPU without
# native bf16 or float16) in the slow one. The policy is set on the layers the same way in every architecture.
POLICY_ARCHS = [("float32", "cnn")] + [pytest.param(policy, "cnn", marks=pytest.mark.slow) for policy in MIXED]


@pytest.mark.parametrize("policy, arch", POLICY_ARCHS)
def test_each_policy_trains_a_step_and_the_model_that_leaves_is_float32(policy, arch):
    import keras

    from emnist_exp import model
    from emnist_exp.spec import TrialSpec

    keras.backend.clear_session()
    spec = TrialSpec(arch=arch, width=8, batch_size=8)
    net = model.compile_model(model.build_model(spec, 47, policy), spec, steps_per_epoch=2, epochs=1)
    assert keras.config.dtype_policy().name == "float32"  # the policy stayed with the model
    hidden = {layer.compute_dtype for layer in net.layers if isinstance(layer, keras.layers.Conv2D)}
    assert hidden == {MIXED.get(policy, "float32")}
    assert net.output.dtype == "float32"  # the softmax in float32 whatever the policy
    # Keras scales the loss under float16 by itself, and only there
    assert (type(net.optimizer).__name__ == "LossScaleOptimizer") == (policy == "mixed_float16")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (8, 28, 28, 1)).astype(np.uint8)
    loss = net.train_on_batch(pixels.astype(np.float32), np.eye(47, dtype=np.float32)[rng.integers(0, 47, 8)])
    assert np.isfinite(np.asarray(loss)).all()
    out = precision.float32_copy(net, lambda: model.build_model(spec, 47))
    assert out.dtype_policy.name == "float32" and out.input.dtype == "float32" and out.output.dtype == "float32"
    assert all(v.dtype == "float32" for v in out.weights)
    scores = out.predict(pixels, verbose=0)  # uint8 pixels in, float32 scores out
    assert scores.dtype == np.float32 and scores.shape == (8, 47)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)
    trained = net.predict(pixels.astype(np.float32), verbose=0)
    np.testing.assert_allclose(scores, trained, atol=0.02)  # the same weights, read in float32


def test_a_bad_precision_is_one_sentence(capsys, tmp_path, monkeypatch):
    from emnist_exp import train

    monkeypatch.chdir(tmp_path)
    assert train.main(["--precision", "float8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: precision must be one of auto, float32, mixed_bfloat16, mixed_float16, got 'float8'."]


@pytest.mark.slow
def test_a_bad_precision_through_the_command_line_exits_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "emnist_exp.train", "--precision", "fp16"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: precision must be one of auto, float32, mixed_bfloat16, mixed_float16, got 'fp16'."]


@pytest.fixture(scope="module")
def bf16_trial(workdir):
    """One trial of one epoch trained in mixed_bfloat16 through the train entry point, and its console."""
    import contextlib
    import io

    from emnist_exp import train
    from emnist_exp.tracking import queries

    args = ["--dataset", "synthetic:600", "--study", "bf16", "--n_trials", "1", "--epochs", "1", "--seed", "5",
            "--space", "kaggle", "--precision", "mixed_bfloat16"]
    console = io.StringIO()
    with contextlib.redirect_stderr(console):
        assert train.main(args) == 0
    (run,) = queries.finished_trials(study="bf16")
    return run, console.getvalue()


@pytest.mark.slow
def test_a_bf16_trial_logs_its_policy_and_a_float32_model(bf16_trial):
    import mlflow

    from emnist_exp.tracking import models, queries

    bf16_trial, console = bf16_trial
    assert "dataset synthetic:600: 47 classes; train 540, val 60, test 100; precision mixed_bfloat16" in console
    assert bf16_trial.data.params["precision_policy"] == "mixed_bfloat16"
    assert bf16_trial.data.tags["precision"] == "mixed_bfloat16"
    (study,) = queries.study_runs("bf16", "study")
    assert study.data.tags["precision"] == "mixed_bfloat16" and study.data.params["config.precision"] == "mixed_bfloat16"
    uri = models.model_uri(bf16_trial.info.run_id)
    info = mlflow.models.get_model_info(uri)
    assert [s["tensor-spec"]["dtype"] for s in info.signature.inputs.to_dict()] == ["float32"]
    assert [s["tensor-spec"]["dtype"] for s in info.signature.outputs.to_dict()] == ["float32"]
    net = mlflow.keras.load_model(uri)
    assert net.dtype_policy.name == "float32" and {layer.compute_dtype for layer in net.layers} == {"float32"}


@pytest.mark.slow
def test_a_bf16_trained_model_served_over_http_returns_its_float32_scores(bf16_trial, tmp_path):
    import mlflow

    from emnist_exp.tracking import models
    from test_serving import mlflow_serve

    bf16_trial, _ = bf16_trial
    uri = models.model_uri(bf16_trial.info.run_id)
    images = np.random.default_rng(3).integers(0, 256, (4, 28, 28, 1)).astype(np.float32)
    with mlflow_serve(uri, tmp_path / "serve.log") as url:
        request = urllib.request.Request(f"{url}/invocations", data=json.dumps({"inputs": images.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=120) as response:
            served = np.asarray(json.loads(response.read())["predictions"], dtype=np.float64)
    local = mlflow.keras.load_model(uri).predict(images, verbose=0)
    assert local.dtype == np.float32 and served.shape == (4, 47)
    np.testing.assert_allclose(served, local, rtol=1e-6, atol=1e-9)
    # JSON carries float32 scores exactly: every served number is a float32 value (float64 ones mostly are not)
    np.testing.assert_array_equal(served.astype(np.float32).astype(np.float64), served)
