"""The screens people use, as a person uses them: the Prefect UI's run form and a run's artifacts and
the MLflow UI's run page, in headless Chromium (system packages, driven by Selenium); and the
champion served by `mlflow models serve`, answering a POSTed image.

Marked `browser`: `.ci/run` runs them after the default suite. Chromium and its driver come from the
system packages (installed here with apt-get when missing). Every step leaves a screenshot in
screenshots/ (ignored by git), so a failing run can be looked at.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import deployment, free_port, make_idx_folder, png_base64, run_test_images, tiny_overrides, wait_until

pytestmark = pytest.mark.browser
SHOTS = Path(__file__).resolve().parents[1] / "screenshots"
PROPERTY = "//div[contains(concat(' ', @class, ' '), ' schema-form-property ')][.//span[normalize-space()='{}']]"


@pytest.fixture(scope="module")
def browser():
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]):
            subprocess.run(command, check=True, capture_output=True)
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1500"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    driver.implicitly_wait(20)
    SHOTS.mkdir(exist_ok=True)
    yield driver
    driver.quit()


def shot(driver, name: str) -> None:
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def started(args: list[str], cwd: Path, env: dict, log: str) -> subprocess.Popen:
    with open(cwd / log, "w") as output:
        return subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=env, stdout=output,
                                stderr=subprocess.STDOUT)


def test_a_run_started_from_the_prefect_form_shows_its_results_in_both_uis(prefect_server, browser, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url, env = prefect_server
    prefect_ui, mlflow_port = url.removesuffix("/api"), free_port()
    mlflow_ui = f"http://127.0.0.1:{mlflow_port}"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(env, PREFECT_API_URL=url, MLFLOW_TRACKING_URI=store, CNNFLOW_MLFLOW_UI=mlflow_ui,
               TF_CPP_MIN_LOG_LEVEL="2")
    idx = make_idx_folder(tmp_path / "idx")
    # served as the fast recipe; the form then picks the chapter's recipe from the list
    recipe_epochs = [o for o in tiny_overrides(idx) if not o.startswith("train.epochs")]
    serving = started(["cnnflow.flows.cli", "serve", "experiment=mnist_fast", *recipe_epochs], tmp_path, env, "serve.log")
    viewer = None
    try:
        wait_until(lambda: deployment(url, "train/mnist_fast") is not None, 120, "the train deployment")
        train = deployment(url, "train/mnist_fast")
        browser.get(f"{prefect_ui}/deployments/deployment/{train.id}")
        browser.find_element(By.XPATH, "//button[normalize-space()='Run']").click()
        browser.find_element(By.XPATH, "//a[normalize-space()='Custom run']").click()
        recipes = Select(browser.find_element(By.XPATH, PROPERTY.format("experiment (Optional)") + "//select"))
        assert {"mnist", "celeba", "quickstart"} <= {option.text for option in recipes.options}
        recipes.select_by_visible_text("mnist")
        browser.find_elements(By.XPATH, PROPERTY.format("epochs (Optional)"))[-1].find_element(
            By.XPATH, ".//button[normalize-space()='int']").click()  # from "None" (the recipe's) to a number
        wait_until(lambda: browser.find_elements(By.XPATH, PROPERTY.format("epochs (Optional)"))[-1]
                   .find_element(By.CSS_SELECTOR, "input[type=number]").send_keys("1") is None, 20, "the epochs field")
        shot(browser, "1-prefect-run-form")
        browser.find_element(By.XPATH, "//button[normalize-space()='Submit']").click()

        with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            def flow_runs():
                return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[train.id])))

            wait_until(lambda: len(flow_runs()) == 1, 60, "the submitted flow run")
            wait_until(lambda: flow_runs()[0].state.is_final(), 400, "the flow run to end")
            [flow_run] = flow_runs()
        assert flow_run.state.is_completed(), (flow_run.state, (tmp_path / "serve.log").read_text()[-3000:])
        assert flow_run.parameters["experiment"] == "mnist" and flow_run.parameters["epochs"] == 1

        mlflow.set_tracking_uri(store)
        [run] = MlflowClient().search_runs([mlflow.get_experiment_by_name("mnist").experiment_id])
        assert run.info.run_name == "mnist-200-s1" and run.data.params["train.epochs"] == "1"
        test_accuracy = run.data.metrics["test_accuracy"]

        browser.get(f"{prefect_ui}/runs/flow-run/{flow_run.id}")
        browser.find_element(By.XPATH, "//li[contains(@class,'p-tab') and normalize-space()='Artifacts']").click()
        shot(browser, "2-prefect-run-artifacts")
        browser.find_element(By.XPATH, "//*[normalize-space()='training-mnist-200-s1']").click()
        wait_until(lambda: "test_accuracy" in browser.find_element(By.TAG_NAME, "body").text, 30, "the summary")
        shot(browser, "3-prefect-run-summary")
        page = browser.find_element(By.TAG_NAME, "body").text
        assert f"test_accuracy {test_accuracy:.4f}" in page and "training images 200" in page
        assert any((image.get_attribute("src") or "").startswith("data:image/png;base64,")
                   for image in browser.find_elements(By.TAG_NAME, "img"))  # the learning curves
        links = [link.get_attribute("href") for link in browser.find_elements(By.TAG_NAME, "a")]
        assert f"{mlflow_ui}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in links

        viewer = started(["mlflow", "ui", "--backend-store-uri", store, "--host", "127.0.0.1", "--port",
                          str(mlflow_port)], tmp_path, env, "mlflow-ui.log")
        wait_until(lambda: urllib.request.urlopen(f"{mlflow_ui}/health", timeout=2).status == 200, 90, "the MLflow UI")
        browser.get(f"{mlflow_ui}/#/experiments/{run.info.experiment_id}/runs")
        browser.find_element(By.XPATH, "//a[normalize-space()='mnist-200-s1']").click()  # found by its name
        wait_until(lambda: "test_accuracy" in browser.find_element(By.TAG_NAME, "body").text, 30, "the run page")
        shot(browser, "4-mlflow-run")
        page = browser.find_element(By.TAG_NAME, "body").text
        assert "mnist-train" in page and "Training" in page  # the dataset input
        assert str(test_accuracy) in page  # the metric, as logged
        browser.find_element(By.XPATH, "//*[@role='tab' and normalize-space()='Artifacts'] | "
                                       "//*[normalize-space()='Artifacts' and (self::a or self::button)]").click()
        browser.find_element(By.XPATH, "//*[normalize-space()='figures']").click()
        browser.find_element(By.XPATH, "//*[normalize-space()='learning_curves.png']").click()
        from PIL import Image

        with Image.open(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/figures/learning_curves.png")) as png:
            width = png.size[0]
        wait_until(lambda: any((image.get_attribute("src") or "").startswith("blob:")  # the figure, fetched and shown
                               and image.get_property("naturalWidth") == width
                               for image in browser.find_elements(By.TAG_NAME, "img")), 30, "the figure's preview")
        shot(browser, "5-mlflow-run-figure")
    finally:
        for process in (serving, viewer):
            if process:
                process.terminate()
                process.wait(timeout=60)


def test_mlflow_models_serve_answers_a_posted_image_with_the_champions_label(mlflow_store, tmp_path):
    from cnnflow.flows.orchestration.engine import in_process
    from cnnflow.flows.train import train_flow

    idx = make_idx_folder(tmp_path / "idx")
    with in_process():
        run_id = train_flow("mnist", tiny_overrides(idx, epochs=2) + ["registry.name=digits", "plots=none"])
    images, output = run_test_images(run_id, 3)
    with np.load(output / "predictions.npz") as saved:  # what the trained Keras model says of these images
        probabilities = saved["probabilities"][:3]
    expected = [str(label) for label in probabilities.argmax(axis=1)]
    port = free_port()
    server = started(["mlflow", "models", "serve", "-m", "models:/digits@champion", "--env-manager", "local",
                      "--host", "127.0.0.1", "--port", str(port)], tmp_path,
                     dict(os.environ, MLFLOW_TRACKING_URI=mlflow_store), "serve.log")
    try:
        wait_until(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).status == 200, 180,
                   "mlflow models serve")
        body = {"dataframe_split": {"columns": ["image"],
                                    "data": [[png_base64(image)] for image in images] + [["bm90IGFuIGltYWdl"]]}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert [row["label"] for row in answer[:3]] == expected and all(row["error"] is None for row in answer[:3])
    assert _label_where_cnnflow_is_not_installed(tmp_path, images[0]) == expected[0]
    assert [row["probability"] for row in answer[:3]] == pytest.approx(probabilities.max(axis=1), abs=0.02)
    assert answer[3]["label"] is None and "not a readable image" in answer[3]["error"]


def _label_where_cnnflow_is_not_installed(tmp_path, image) -> str:
    """The champion's serving model, copied out of the store, loaded by a Python that cannot import
    the installed cnnflow: it runs on the code it carries."""
    import textwrap

    model_dir = mlflow.artifacts.download_artifacts("models:/digits@champion", dst_path=str(tmp_path / "served"))
    script = textwrap.dedent(f"""
        import sys
        sys.meta_path = [finder for finder in sys.meta_path if "editable" not in repr(finder)]  # hide the install
        sys.path = [entry for entry in sys.path if "editable" not in entry]
        try:
            import cnnflow.components
            raise SystemExit("cnnflow is still importable")
        except ImportError:
            pass
        import mlflow, pandas
        model = mlflow.pyfunc.load_model({model_dir!r})
        import cnnflow.components.serving as serving
        print(serving.__file__)
        print(model.predict(pandas.DataFrame({{"image": [{png_base64(image)!r}]}}))["label"][0])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    where, label = done.stdout.split()[-2:]
    assert where.startswith(str(Path(model_dir) / "code" / "cnnflow"))
    return label
