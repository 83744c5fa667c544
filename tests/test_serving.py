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


def post(url: str, body: bytes) -> tuple[int, dict]:
    """POST a JSON body to /invocations: the status and the decoded answer, error or not."""
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"},
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_out_of_contract_input_gets_400_and_the_project_sentence(server):
    """Outside the contract (28x28 images of 0-255 pixels or 0-1 floats, top_k 1-47): HTTP 400 with our sentence,
    no stack trace and none of the input echoed back. Answered one after the other by one server."""
    images = characters().astype(np.float64)
    flooded = images.copy()
    flooded[0, 0, 0] = np.nan
    top_k = "top_k must be a whole number between 1 and 47, got {}."
    cases = [
        *[({"inputs": images.tolist(), "params": {"top_k": k}}, top_k.format(k)) for k in (0, 1000)],
        ({"inputs": np.full((2, 27, 27), 200.0).tolist()}, "expected a batch of 28x28 images, got shape (2, 27, 27)."),
        ({"inputs": flooded.tolist()},
         "pixels must be numbers from 0 to 255 (or floats from 0 to 1), got NaN or infinity."),
        ({"inputs": np.linspace(-500, 500, 3 * 784).reshape(3, 28, 28).tolist()},
         "pixels must be numbers from 0 to 255 (or floats from 0 to 1), got values from -500 to 500."),
        ({"inputs": np.full((1, 28, 28), 1e300).tolist()},
         "pixels must be numbers from 0 to 255 (or floats from 0 to 1), got values from 1e+300 to 1e+300."),
        ({"inputs": np.ones((1, 28, 28), bool).tolist()},
         "pixels must be numbers from 0 to 255 (or floats from 0 to 1), got booleans."),
    ]
    for payload, sentence in cases:
        code, answer = post(server, json.dumps(payload).encode())
        assert code == 400, (sentence, answer)
        assert answer["error_code"] == "INVALID_PARAMETER_VALUE", answer
        assert answer["message"] == sentence, answer  # the sentence alone: no input, no trace
        assert "stack_trace" not in answer, answer
    code, answer = post(server, json.dumps({"inputs": (images / 255).tolist()}).encode())  # 0-1 floats are in it
    assert code == 200 and len(answer["predictions"]) == len(images), answer
