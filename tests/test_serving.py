"""`mlflow models serve` on the registered ensemble answers a real HTTP request like the in-process model."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from emnist_exp import preprocess

pytestmark = pytest.mark.slow  # each test here trains a study, starts a server or runs a script
STARTUP_SECONDS = 240  # TensorFlow and three Keras members load on 2 busy cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def characters() -> np.ndarray:
    """Three drawn characters (an L, a 7, an O) as model input, uint8 (3, 28, 28)."""
    shapes = [[(40, 20, 40, 100), (40, 100, 80, 100)], [(20, 20, 90, 20), (90, 20, 45, 110)], []]
    out = []
    for lines in shapes:
        image = Image.new("L", (120, 130), 235)
        draw = ImageDraw.Draw(image)
        for line in lines:
            draw.line(line, fill=20, width=10)
        if not lines:
            draw.ellipse((25, 15, 95, 115), outline=20, width=10)
        out.append(preprocess.to_emnist(image))
    return np.stack(out)


def wait_for_ping(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    pytest.fail(f"no answer on {url}/ping within {STARTUP_SECONDS}s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def mlflow_serve(model_uri: str, log: Path):
    """`mlflow models serve -m <model_uri> --env-manager local` on a free local port; yields its URL."""
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    with open(log, "wb") as sink:
        # Its own session: the server's uvicorn child is stopped with it.
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_ping(url, process, log)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def server(tiny_ensemble, tmp_path):
    """The registered ensemble served over HTTP."""
    with mlflow_serve(f"models:/emnist-ensemble/{tiny_ensemble}", tmp_path / "serve.log") as url:
        yield url


def test_rest_predictions_match_the_in_process_model(server, tiny_ensemble):
    import mlflow

    images = characters()
    body = json.dumps({"inputs": images.astype(np.float32).tolist()}).encode()
    request = urllib.request.Request(f"{server}/invocations", data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200
        served = json.loads(response.read())["predictions"]
    expected = mlflow.pyfunc.load_model(f"models:/emnist-ensemble/{tiny_ensemble}").predict(
        images.astype(np.float32))
    assert len(served) == len(images)
    for got, (_, want) in zip(served, expected.iterrows()):
        assert got["class_index"] == want["class_index"]
        assert got["character"] == want["character"]
        assert got["probability"] == pytest.approx(want["probability"], abs=1e-6)


def test_rest_clients_ask_for_the_top_k_through_params(server, tiny_ensemble):
    import mlflow

    images = characters()
    body = json.dumps({"inputs": images.tolist(), "params": {"top_k": 3}}).encode()
    request = urllib.request.Request(f"{server}/invocations", data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=120) as response:
        served = json.loads(response.read())["predictions"]
    expected = mlflow.pyfunc.load_model(f"models:/emnist-ensemble/{tiny_ensemble}").predict(
        images, params={"top_k": 3})
    assert [(r["image"], r["rank"]) for r in served] == [(i, k) for i in range(len(images)) for k in (1, 2, 3)]
    assert [r["class_index"] for r in served] == list(expected["class_index"])
    for image in range(len(images)):
        probabilities = [r["probability"] for r in served if r["image"] == image]
        assert probabilities == sorted(probabilities, reverse=True)


def test_a_wrong_shape_gets_the_project_sentence_without_a_stack_trace(server):
    """A 27x27 batch: HTTP 400 (INVALID_PARAMETER_VALUE) whose message holds our sentence and no traceback."""
    body = json.dumps({"inputs": np.zeros((2, 27, 27), np.float32).tolist()}).encode()
    request = urllib.request.Request(f"{server}/invocations", data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=120)
    assert caught.value.code == 400
    answer = json.loads(caught.value.read())
    assert answer["error_code"] == "INVALID_PARAMETER_VALUE", answer
    assert "expected a batch of 28x28 images, got shape (2, 27, 27)" in answer["message"], answer
    assert "Traceback" not in json.dumps(answer) and 'File "' not in json.dumps(answer), answer
