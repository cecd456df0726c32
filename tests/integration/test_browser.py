"""The Dagster and MLflow UIs in a real browser: after one `fsad run` of a small sweep, `dagster dev` and
`fsad mlflow-ui` on 127.0.0.1 serve its home (started once for the module), headless Chromium (Debian's,
driven by Playwright) follows the report's links, launches a backfill and a materialisation, and shows the
asset graph and the sweep's materialisations; both process groups are gone afterwards."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from fewshot_core.backbones import DEFAULT_BACKBONE

CHROMIUM = Path("/usr/bin/chromium")
PROJECT = Path(__file__).resolve().parents[2]
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                       "(apt-get install -y chromium; .ci/run installs it)"),
]

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _processes_with_env(marker: str) -> list[int]:
    """Pids of live processes whose environment holds ``marker`` (catches children that left the group)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                status = (entry / "status").read_text()
                if "\nState:\tZ" not in status:
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


@contextlib.contextmanager
def _instance(home: Path):
    """The Dagster instance of ``home`` (its dagster.yaml defines storage relative to ``$DAGSTER_HOME``)."""
    import dagster as dg

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(home))
        yield dg.DagsterInstance.get()


def _run_ids(home: Path) -> set:
    with _instance(home) as instance:
        return {r.run_id for r in instance.get_runs()}


def _wait_for_run(home: Path, asset: str, known: set, timeout: float):
    """The run that materialises ``asset`` (launched from the UI: not in ``known``), once it has finished."""
    import dagster as dg

    with _instance(home) as instance:
        deadline = time.time() + timeout
        while time.time() < deadline:
            runs = [r for r in instance.get_runs(limit=10) if r.run_id not in known
                    and r.asset_selection and dg.AssetKey(asset) in r.asset_selection]
            if runs and runs[0].status.value in ("SUCCESS", "FAILURE", "CANCELED"):
                return runs[0]
            time.sleep(1)
    raise AssertionError(f"no finished run of {asset} within {timeout} s")


def _skip_welcome(page) -> None:
    """Close "Join the Dagster community" (shown once on a fresh instance, over whatever page opens first)."""
    try:
        page.get_by_role("button", name="Skip").click(timeout=15_000)
    except Exception:  # noqa: BLE001 - the dialog is optional
        pass


def _stop_group(proc: subprocess.Popen) -> None:
    pgid = proc.pid  # start_new_session=True: the leader's pid is the group id
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        if not _group_alive(pgid):
            break
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.time() + wait
        while time.time() < deadline and _group_alive(pgid):
            proc.poll()
            time.sleep(0.3)
    proc.wait(timeout=10)


SWEEP_LINKS = """\
name: ui-links
data: {{source: synthetic, synth: {{categories: 1, size: 64, n_train: 4, n_test_good: 2, n_test_per_defect: 1}}}}
image_size: 64
oneclass: {{shots: [1, 2], seeds: [0, 1]}}
supervised: {{ratios: [[1, 1]], label_modes: [binary], seeds: [0]}}
methods: [{{id: knn, method: knn}}]
work_dir: {work}
"""


def _wait_http(url: str, proc: subprocess.Popen, log: Path, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, f"{what} did not answer within {timeout} s"
            time.sleep(1)


def _wait_for_backfill(home: Path, known: set, timeout: float):
    """The backfill launched from the UI (not in ``known``), once the daemon has finished it."""
    with _instance(home) as instance:
        deadline = time.time() + timeout
        while time.time() < deadline:
            new = [b for b in instance.get_backfills(limit=10) if b.backfill_id not in known]
            if new and new[0].status.value not in ("REQUESTED", "CANCELING"):
                return new[0]
            time.sleep(1)
    raise AssertionError(f"the backfill launched from the UI did not finish within {timeout} s")


def _backfill_runs(home: Path, backfill_id: str) -> set:
    import dagster as dg

    with _instance(home) as instance:
        return {r.run_id for r in instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": backfill_id}))}


def _backfill_ids(home: Path) -> set:
    with _instance(home) as instance:
        return {b.backfill_id for b in instance.get_backfills(limit=100)}


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """One `fsad run` of a small sweep, then `fsad mlflow-ui` and `dagster dev` on its home, shared by the tests
    that open the UIs (one sweep and one server start for all of them); both process groups, and every
    process of that home, are gone afterwards."""
    tmp_path = tmp_path_factory.mktemp("ui")
    home, work = tmp_path / "dagster_home", tmp_path / "work"
    home.mkdir()
    shutil.copyfile(PROJECT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP_LINKS.format(work=work))
    ml_port, dg_port = _free_port(), _free_port()
    env = dict(os.environ, DAGSTER_HOME=str(home), FSAD_SWEEP_CONFIG=str(config), MLFLOW_TRACKING_URI="",
               FSAD_MLFLOW_UI=f"http://127.0.0.1:{ml_port}")
    subprocess.run([sys.executable, "-m", "fewshot_core", "run", "--config", str(config), "--dagster-home",
                    str(home)], cwd=PROJECT, env=env, check=True, timeout=900, capture_output=True)

    procs = []
    ml_log, dg_log = tmp_path / "mlflow-ui.log", tmp_path / "dagster-dev.log"
    try:
        # `fsad mlflow-ui` without --port serves where the report's links point (FSAD_MLFLOW_UI)
        procs.append(subprocess.Popen([sys.executable, "-m", "fewshot_core", "mlflow-ui", "--dagster-home", str(home)],
                                      cwd=PROJECT, env=env, stdout=ml_log.open("w"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
        procs.append(subprocess.Popen([str(Path(sys.executable).parent / "dagster"), "dev", "-w", "workspace.yaml",
                                       "-h", "127.0.0.1", "-p", str(dg_port)], cwd=PROJECT, env=env,
                                      stdout=dg_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True))
        _wait_http(f"http://127.0.0.1:{ml_port}/health", procs[0], ml_log, "MLflow UI")
        _wait_http(f"http://127.0.0.1:{dg_port}/server_info", procs[1], dg_log, "dagster dev")
        yield {"home": home, "work": work, "tmp": tmp_path, "ml_port": ml_port,
               "dagster": f"http://127.0.0.1:{dg_port}"}
    finally:
        for proc in procs:
            _stop_group(proc)
    for proc in procs:
        assert not _group_alive(proc.pid), "a server left processes in its group"
    assert _processes_with_env(f"DAGSTER_HOME={home}") == [], "servers left processes behind"


def test_report_links_and_partition_pages_open_their_mlflow_runs(ui):
    """After `fsad run`: a report link opens its run in a running MLflow UI, an evaluation partition's page
    in the Dagster UI links its own (latest, not superseded) MLflow run, and a backfill of one setting's
    seeds, picked with clicks in the asset's launch dialog, runs and succeeds."""
    import re

    import pandas as pd
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    home, work, tmp_path, ml_port, url = ui["home"], ui["work"], ui["tmp"], ui["ml_port"], ui["dagster"]
    report = work / "report" / "report.html"
    table = pd.read_parquet(next((work / "tables").rglob("benchmark_table*")))
    oc = table[table["setting_key"] == "oc-k1-s0"].iloc[0]

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(90_000)
            # 1. The report answers the deploy question first, then the run link opens that run in MLflow.
            page.goto(report.as_uri())
            _check_report_page(page)
            link = page.locator(f'h2#runs ~ div a[href*="/runs/{oc["mlflow_run_id"]}"]').first
            href = link.get_attribute("href")
            assert href.startswith(f"http://127.0.0.1:{ml_port}/#/experiments/{oc['mlflow_experiment_id']}/")
            link.click()
            page.wait_for_url(re.compile(f".*/runs/{oc['mlflow_run_id']}.*"))
            page.get_by_text(f"knn|{oc['category']}|oc-k1-s0").first.wait_for()  # the run's name
            page.get_by_text("image_auroc").first.wait_for()  # its metrics
            # 2. The partition's own page links its own (latest) MLflow run.
            from fewshot_core.tracking.runs import Tracker
            from fewshot_core.tracking.store import default_tracking_uri

            latest = [r for r in Tracker(default_tracking_uri(home)).evaluation_runs("ui-links")
                      if r.data.tags.get("dagster.partition_key") == oc["partition_key"]
                      and r.data.tags.get("fsad.superseded") == "false"]
            assert len(latest) == 1
            page.goto(url + f"/assets/evaluation/{DEFAULT_BACKBONE}/knn?view=partitions&partition="
                      + urllib.parse.quote(oc["partition_key"]))
            own = page.locator(f'a[href*="/runs/{latest[0].info.run_id}"]').first
            own.wait_for()
            assert own.get_attribute("href").startswith(f"http://127.0.0.1:{ml_port}/")
            # 3. A backfill of one setting's seeds (1 shot, seeds 0 and 1; not the 2-shot ones), with clicks:
            # the category dimension's "All", then the two seeds in the setting dimension's list.
            known = _backfill_ids(home)
            page.goto(url + f"/assets/evaluation/{DEFAULT_BACKBONE}/knn")
            _skip_welcome(page)
            page.get_by_text(re.compile(r"^Materialize")).first.click()
            dialog = page.locator('[role="dialog"]', has_text="Partition selection").first
            # the category dimension's "All": on a loaded machine a click can land before the dialog
            # listens, so it is repeated until the category shows as selected
            for attempt in range(5):
                dialog.get_by_role("button", name="All").first.click()
                try:
                    dialog.get_by_text(oc["category"], exact=True).first.wait_for(timeout=10_000)
                    break
                except PlaywrightTimeout:
                    if attempt == 4:
                        raise
            dialog.get_by_text("Select a partition or create one").last.click()
            for key in ("oc-k1-s0", "oc-k1-s1"):
                page.get_by_role("menuitem", name=key).click()  # its name repeats the key (truncation helper)
            page.keyboard.press("Escape")
            dialog.get_by_text("2 partitions").first.wait_for()
            dialog.get_by_role("button", name="Launch backfill").click()
            backfill = _wait_for_backfill(home, known, timeout=900)
            assert backfill.status.value == "COMPLETED_SUCCESS", backfill.status
            targeted = backfill.asset_backfill_data.target_subset.partitions_subsets_by_asset_key
            assert {k.to_user_string(): set(v.get_partition_keys()) for k, v in targeted.items()} == {
                f"evaluation/{DEFAULT_BACKBONE}/knn": {f"{oc['category']}|oc-k1-s0", f"{oc['category']}|oc-k1-s1"}}
            page.goto(url + f"/runs/b/{backfill.backfill_id}")
            page.get_by_text("Succeeded").first.wait_for()
            page.get_by_text("100% completed").first.wait_for()
            # each seed got a new MLflow run, and the one it replaced is tagged superseded
            runs = Tracker(default_tracking_uri(home)).evaluation_runs("ui-links")
            launched = _backfill_runs(home, backfill.backfill_id)
            for seed in (0, 1):
                key = f"{oc['category']}|oc-k1-s{seed}"
                mine = [r for r in runs if r.data.tags.get("dagster.partition_key") == key]
                current = [r for r in mine if r.data.tags.get("fsad.superseded") == "false"]
                assert len(mine) == 2 and len(current) == 1, key
                assert current[0].data.tags["dagster.run_id"] in launched
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"))
            raise
        finally:
            browser.close()


def test_dagster_ui_shows_asset_graph_and_materialisation(ui):
    """The asset graph and catalog, the dataset's materialisation by `fsad run` with its metadata, and a
    materialisation launched from the UI: queued, dequeued by the daemon, run, shown."""
    from playwright.sync_api import sync_playwright

    home, work, url = ui["home"], ui["work"], ui["dagster"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(url + "/asset-groups")
            _skip_welcome(page)
            # The global graph: one node per stage group, code location loaded.
            for group in ("data", "features", "evaluation", "reports"):
                page.get_by_text(group, exact=True).first.wait_for()
            assert "Global asset lineage" in page.inner_text("body")
            # The catalog lists every asset of the code location.
            page.goto(url + "/assets")
            for name in ("dataset", "image_manifest", "embeddings", "benchmark_table", "html_report"):
                page.get_by_text(name, exact=True).first.wait_for()
            # keys with a backbone part (support banks, evaluations) are folders of the catalog
            for prefix in ("memory_banks", "evaluation"):
                page.get_by_text(prefix).first.wait_for()
            # The materialisation made beforehand (by `fsad run`), with its metadata.
            page.goto(url + "/assets/dataset")
            page.get_by_text("Latest materialization").first.wait_for()
            page.get_by_text("synth_fabric").first.wait_for()
            page.get_by_text(str(work / "synthetic")).first.wait_for()
            # A materialisation launched from the UI: queued, dequeued by the daemon, run, shown.
            known = _run_ids(home)
            page.goto(url + "/assets/image_manifest")
            page.get_by_text("Materialize", exact=True).first.click()
            run = _wait_for_run(home, "image_manifest", known, timeout=180)
            assert run.status.value == "SUCCESS", run.status
            page.goto(url + "/assets/image_manifest")
            page.get_by_text("Latest materialization").first.wait_for()
            page.get_by_text("image-level categories (no masks)").first.wait_for()
            page.goto(url + f"/runs/{run.run_id}")
            page.get_by_text("Success").first.wait_for()
        finally:
            browser.close()


def _check_report_page(page) -> None:
    """The report's deploy and decision answers, visible without scrolling sideways."""
    page.locator("h2#deploy").wait_for()
    deploy = page.locator("h2#deploy ~ h3").first.inner_text()
    assert "@champion" in deploy, deploy
    body = page.inner_text("body")
    for field in ("Which model to deploy", "false-alarm rate", "miss rate", "balanced accuracy",
                  "time per image, end to end (ms)", "machine", "cores usable", "score_seconds is the time"):
        assert field in body, field
    # the time column of the decisions table lies inside its scroll box's visible width
    table = page.locator("h2#decisions ~ div.scroll").first
    box = table.bounding_box()
    time_head = table.locator("th", has_text="time per image").first.bounding_box()
    assert time_head["x"] + time_head["width"] <= box["x"] + box["width"] + 1, (time_head, box)
    # every per-seed row of "All runs" is one line, on a narrow window too: setting keys and supports are not
    # broken at their hyphens (the table scrolls sideways in its box instead)
    size = page.viewport_size
    page.set_viewport_size({"width": 800, "height": size["height"]})
    heights = page.locator("table.runs tr:has(td)").evaluate_all("rows => rows.map(r => r.getBoundingClientRect().height)")
    line = page.locator("table.runs td").first.evaluate(  # the height of one line of the table's text
        "td => { const s = td.appendChild(document.createElement('span')); s.textContent = 'x';"
        " const h = s.getBoundingClientRect().height; s.remove(); return h; }")
    page.set_viewport_size(size)
    assert len(heights) > 2 and max(heights) < 2 * line, (heights, line)
    link = page.locator("table.runs a").first
    assert len(link.inner_text()) == 8 and link.get_attribute("title") in link.get_attribute("href")
    assert link.get_attribute("href").endswith("?workflowType=machine_learning")  # MLflow's model-training view


def test_report_of_a_small_sweep_opens_with_deploy_errors_speed_and_gallery(tmp_path):
    """A small sweep's report in headless Chromium: the champion, false-alarm and miss rates, recall per defect
    type, time per image and the machine are on the page; the gallery strip marks the threshold."""
    import numpy as np
    from _builders import sweep_rows
    from playwright.sync_api import sync_playwright

    from fewshot_core.figures.gallery import anomaly_gallery
    from fewshot_core.reports import aggregate, render_report, write_report
    from fewshot_core.reports.timing import add_timings

    rows = add_timings(sweep_rows(), {"bottle-lite0-64": {"images_per_s": 20.0, "device": "cpu"}})
    rng = np.random.default_rng(0)
    items = [{"image": np.full((64, 64, 3), 90, np.uint8), "map": rng.random((64, 64)) * peak, "caption": cap}
             for peak, cap in ((10.0, "crack s=9.9 > t=2.50: caught"), (3.0, "good s=3.0 > t=2.50: false alarm"))]
    png = anomaly_gallery(items, "ldknn · bottle · oc-k4-s0", threshold=2.5)
    gallery = [{"title": "ldknn · bottle · oc-k4-s0", "png": png, "mlflow_run_id": "run-ldknn-4-0",
                "mlflow_experiment_id": "3"}]
    report = write_report(tmp_path / "report.html",
                          render_report(rows, aggregate(rows), gallery, info={"sweep": "small"}))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(report.as_uri())
            _check_report_page(page)
            assert "bottle: ldknn (tf_efficientnet_lite0) with 4 good shots" in page.inner_text("body")
            recall = page.locator("h3#recall ~ div.scroll").first.inner_text()
            assert "broken_large" in recall and "contamination" in recall
            assert page.locator('h2#gallery ~ img').count() == 1
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
