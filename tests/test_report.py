"""``aligncurate report``: the HTML report of real versions, checked in headless Chromium.

Versions: the demo spec built twice through the Prefect flow (the second build tightens
the length filter, so the report has a diff), and two versions committed from
``tests/data/report/``: a sample of a real CRaFT build and of a real synthesis build of the
fact world (made by ``make_fixtures.py`` there). Chromium is Debian's ``chromium``, driven
over the DevTools protocol: every console message, exception and network request is seen.
Without it (``make system-deps`` installs it) the browser tests skip, or fail under CI.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from system_deps import require
from typer.testing import CliRunner

from pipelines.build import build_dataset
from pipelines.cli import app
from pipelines.report import collect as collect_module
from pipelines.report import write_report
from pipelines.report.collect import collect
from pipelines.report.html import sample_row
from storage.dataset import DatasetStore

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "data" / "report"
CHROMIUM = shutil.which("chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
]


# -- a small DevTools-protocol driver -------------------------------------------------------


class Chromium:
    """Debian's chromium, headless, with a fresh profile, driven over the DevTools protocol."""

    def __init__(self) -> None:
        if CHROMIUM is None:
            raise RuntimeError("chromium is not installed (make system-deps installs it)")
        self.profile = Path(tempfile.mkdtemp(prefix="aligncurate-chromium-"))
        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and len(port_file.read_text().splitlines()) >= 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port, path = port_file.read_text().splitlines()[:2]
        from websockets.sync.client import connect

        self.ws = connect(f"ws://127.0.0.1:{port}{path}", max_size=None)
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """One command; events that arrive meanwhile are kept in :attr:`events`."""
        ident = next(self.ids)
        message = {"id": ident, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(self.ws.recv(timeout=60))
            if reply.get("id") == ident:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            self.events.append(json.loads(self.ws.recv(timeout=deadline - time.monotonic())))

    def open(self, path: Path) -> dict[str, Any]:
        """Load a page in a new tab; return what the checks need: console errors,
        exceptions, every requested URL, plot sizes, and a full-page screenshot."""
        self.events = []
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session)
        self.send(
            "Emulation.setDeviceMetricsOverride",
            session,
            width=1280,
            height=900,
            deviceScaleFactor=1,
            mobile=False,
        )
        self.send("Page.navigate", session, url=path.resolve().as_uri())
        self.wait_for("Page.loadEventFired")
        probe = self.send(
            "Runtime.evaluate",
            session,
            returnByValue=True,
            expression="""JSON.stringify({
              images: [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight]),
              svgs: [...document.querySelectorAll('svg')].map(s => {
                const r = s.getBoundingClientRect(); return [r.width, r.height]; }),
              scripts: document.scripts.length,
              sections: [...document.querySelectorAll('section')].map(s => s.id),
              text: document.body.innerText,
              layout: (() => {
                const blocks = [...document.querySelectorAll(
                  'header, nav, main, section, h1, h2, h3, p, ul, table, figure, pre, '
                  + '.plots, .row, .row > div, .turn')];
                const isBlock = new Set(blocks);
                const name = e => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '')
                  + (e.className ? '.' + e.className : '');
                const overlaps = [];
                for (const parent of new Set(blocks.map(b => b.parentElement))) {
                  const kids = [...parent.children].filter(k => isBlock.has(k));
                  const rects = kids.map(k => k.getBoundingClientRect());
                  for (let i = 0; i < kids.length; i++) for (let j = i + 1; j < kids.length; j++) {
                    const a = rects[i], b = rects[j];
                    const w = Math.min(a.right, b.right) - Math.max(a.left, b.left);
                    const h = Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top);
                    if (w > 1 && h > 1) overlaps.push([name(kids[i]), name(kids[j])]);
                  }
                }
                const cut = [...document.querySelectorAll('td, th')]
                  .filter(c => c.scrollWidth > c.clientWidth + 1)
                  .map(c => c.textContent.slice(0, 80));
                const wide = document.documentElement.scrollWidth
                  > document.documentElement.clientWidth;
                return {overlaps, cut, wide};
              })(),
            })""",
        )
        shot = self.send(
            "Page.captureScreenshot", session, format="png", captureBeyondViewport=True
        )
        self.send("Target.closeTarget", targetId=target)
        events = self.events
        return {
            **json.loads(probe["result"]["value"]),
            "console_errors": [
                e["params"]
                for e in events
                if (
                    e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error"
                )
                or (
                    e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"
                )
            ],
            "exceptions": [
                e["params"] for e in events if e.get("method") == "Runtime.exceptionThrown"
            ],
            "requests": [
                e["params"]["request"]["url"]
                for e in events
                if e.get("method") == "Network.requestWillBeSent"
            ],
            "screenshot": base64.b64decode(shot["data"]),
        }

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Chromium]:
    require("chromium")  # skipped without it (failed under CI)
    chromium = Chromium()
    yield chromium
    chromium.close()


def assert_page_ok(page: dict[str, Any]) -> None:
    """No console errors or exceptions, nothing fetched but the page, every plot drawn,
    no script on the page, and a screenshot that is not blank."""
    assert page["console_errors"] == [] and page["exceptions"] == []
    fetched = [u for u in page["requests"] if not u.startswith(("file:", "data:"))]
    assert fetched == []
    assert page["images"] or page["svgs"]
    for complete, width, height in page["images"]:
        assert complete and width > 0 and height > 0
    for width, height in page["svgs"]:
        assert width > 0 and height > 0
    assert page["scripts"] == 0
    assert_layout_ok(page)
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(page["screenshot"])).convert("L"), dtype=float)
    assert pixels.shape[0] > 900  # the whole page, beyond the first screen
    assert pixels.std() > 20  # not blank


def assert_layout_ok(page: dict[str, Any]) -> None:
    """At 1280 px no block (panel, table, plot, heading, paragraph) overlaps a sibling
    block, no table cell is cut (its content wider than the cell), and the page does not
    scroll sideways."""
    layout = page["layout"]
    assert layout["overlaps"] == [], layout["overlaps"][:10]
    assert layout["cut"] == [], layout["cut"][:10]
    assert not layout["wide"]


# -- versions ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """demo-sft built twice through the flow: v0 as shipped, v1 with a tighter filter."""
    folder = tmp_path_factory.mktemp("report-demo")
    spec = yaml.safe_load((REPO / "examples" / "demo" / "spec.yaml").read_text())
    for source in spec["sources"]:
        source["path"] = str(REPO / "examples" / "demo" / source["path"])
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    store = DatasetStore(str(folder / "store"))
    first = build_dataset(str(path), store=store.root)
    spec["stages"][-1] = {"filter": {"max_chars": 800}}
    path.write_text(yaml.safe_dump(spec))
    second = build_dataset(str(path), store=store.root)
    return {"store": store, "first": first, "second": second, "folder": folder}


def test_a_report_that_cannot_be_written_does_not_fail_the_build(
    demo: dict[str, Any], tmp_path: Path
) -> None:
    """The reports folder is a file: the report fails, the version is committed, and the
    summary's statistics are measured from the shards instead, to the same numbers."""
    shutil.copytree(demo["store"].root, tmp_path / "store")
    store = DatasetStore(str(tmp_path / "store"))
    reports = tmp_path / "store" / "_work" / "demo-sft" / "reports"
    shutil.rmtree(reports)
    reports.write_text("not a folder")
    spec = demo["folder"] / "spec.yaml"
    again = build_dataset(str(spec), store=store.root)
    assert again["report"] is None and again["version"] == 2
    assert again["dataset_stats"] == demo["second"]["dataset_stats"]
    assert store.read("demo-sft@2").num_rows == demo["second"]["rows"]["train"]


def commit_fixture(
    store: DatasetStore, name: str, file: str, shards_dir: Path | None = None
) -> None:
    """Commit a table saved from a real build (both splits, with ``split``) as a version
    (its shards written to ``shards_dir``, by default the store's local root)."""
    table = pq.read_table(FIXTURES / file)
    folder = str(shards_dir) if shards_dir is not None else store.root
    shards = {}
    for split in ("train", "rejected"):
        part = table.filter(pc.equal(table["split"], split)).drop_columns(["split"])
        if split == "train":
            part = part.drop_columns(
                [c for c in ("reject_stage", "reject_reason") if c in part.column_names]
            )
        shards[split] = folder + f"/{name}-{split}.parquet"
        pq.write_table(part, shards[split])
    store.commit(
        name,
        [shards["train"]],
        [shards["rejected"]],
        {"spec_name": name, "note": f"tests/data/report/{file}: a sample of a real build"},
    )


@pytest.fixture(scope="module")
def fixtures_store(tmp_path_factory: pytest.TempPathFactory) -> DatasetStore:
    folder = tmp_path_factory.mktemp("report-fixtures")
    store = DatasetStore(str(folder / "store"))
    Path(store.root).mkdir(parents=True)
    commit_fixture(store, "fw-craft", "craft.parquet")
    commit_fixture(store, "fw-synthesis", "synthesis.parquet")
    return store


# -- tests ------------------------------------------------------------------------------------


def test_build_publishes_the_report_as_a_prefect_artifact(demo: dict[str, Any]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    second = demo["second"]
    report = Path(second["report"])
    assert report.is_file() and report.name == "index.html"
    assert report.parent.name == "v1" and "_work" in report.parts
    assert "demo-sft@1" in report.read_text()

    async def artifacts() -> list[Any]:
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["demo-sft-report"]))
            )

    import asyncio

    found = asyncio.run(artifacts())
    links = {a.data for a in found if a.type == "markdown" or a.type == "link"}
    assert any(report.as_uri() in str(d) for d in links), links


def test_demo_report_renders_in_chromium(
    demo: dict[str, Any], browser: Chromium, tmp_path: Path
) -> None:
    result = write_report(demo["store"], "demo-sft@1", tmp_path / "demo")
    page = browser.open(Path(result.path))
    assert_page_ok(page)
    assert page["sections"] == ["counts", "lengths", "statistics", "diff", "samples"]
    assert len(page["svgs"]) == 3  # stage bars, prompt and response histograms
    text = page["text"]
    assert "duplicate_of" in text and "too_long" in text  # reject reasons of two stages
    diff = demo["store"].diff("demo-sft@0", "demo-sft@1")
    assert diff.moved > 0  # the tighter filter moved rows to rejected
    assert "From demo-sft@0 to demo-sft@1" in text.replace("\n", " ")


def test_report_numbers_match_the_store_and_the_build(demo: dict[str, Any]) -> None:
    store, second = demo["store"], demo["second"]
    data = collect(store, "demo-sft@1")
    assert {s: d.rows for s, d in data.splits.items()} == {
        "train": second["rows"]["train"],
        "rejected": second["rows"]["rejected"],
    }
    # the instruction/response statistics are the build summary's, to the digit
    assert data.stats == second["dataset_stats"]
    rejected = store.read("demo-sft@1", "rejected")
    assert set(data.splits["rejected"].reasons) == {
        ("exact_dedup", "duplicate_of:<id>"),  # one line for every duplicate
        ("filter", "too_long:chars>800"),
    }
    assert sum(data.splits["rejected"].reasons.values()) == rejected.num_rows
    by_stage: dict[str, int] = {}
    for (stage, _), n in data.splits["rejected"].reasons.items():
        by_stage[stage] = by_stage.get(stage, 0) + n
    assert by_stage == {s: c["rejected"] for s, c in second["counts"].items() if c["rejected"]}
    train_lengths = data.splits["train"].response_tokens
    words = pc.list_value_length(pc.utf8_split_whitespace(store.read("demo-sft@1")["response"]))
    assert int(train_lengths.sum()) == pc.sum(words).as_py()


def test_samples_are_evenly_spaced_across_batches(
    demo: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(collect_module, "BATCH_ROWS", 37)  # many batches
    data = collect(demo["store"], "demo-sft@1", sample=4, diff=False)
    ids = demo["store"].read("demo-sft@1", "train", columns=["id"])["id"].to_pylist()
    positions = np.linspace(0, len(ids) - 1, 4).astype(int)
    assert [r["id"] for r in data.splits["train"].sample] == [ids[p] for p in positions]


def test_craft_report_has_the_scatter(
    fixtures_store: DatasetStore, browser: Chromium, tmp_path: Path
) -> None:
    result = write_report(fixtures_store, "fw-craft", tmp_path / "craft")
    page = browser.open(Path(result.path))
    assert_page_ok(page)
    assert "craft" in page["sections"] and "lineage" not in page["sections"]
    assert len(page["images"]) == 1  # the μ/σ scatter, a PNG
    data = collect(fixtures_store, "fw-craft", diff=False)
    mu, sigma, labels = data.craft_points()
    table = pq.read_table(FIXTURES / "craft.parquet")
    assert len(labels) == pc.sum(pc.is_valid(table["correctness_init"])).as_py()
    assert {"vanilla", "idk"} <= set(labels)
    assert ((mu >= 0) & (mu <= 1)).all() and np.isfinite(sigma).all()
    assert "Version 0: there is no previous version." in page["text"]


def test_synthesis_report_shows_lineage(
    fixtures_store: DatasetStore, browser: Chromium, tmp_path: Path
) -> None:
    result = write_report(fixtures_store, "fw-synthesis", tmp_path / "synthesis")
    page = browser.open(Path(result.path))
    assert_page_ok(page)
    assert "lineage" in page["sections"]
    table = pq.read_table(FIXTURES / "synthesis.parquet")
    generated = table.filter(pc.is_valid(table["lineage_method"]))
    data = collect(fixtures_store, "fw-synthesis", diff=False)
    counted = sum(n for s in data.splits.values() for n in s.lineage.values())
    assert counted == generated.num_rows > 0
    methods = set(generated["lineage_method"].to_pylist())
    assert all(m in page["text"] for m in methods)
    examples = [r for s in data.splits.values() for r in s.lineage_examples]
    assert examples and all(p in page["text"] for p in examples[0]["lineage_parents"])


def test_row_text_is_escaped(browser: Chromium, tmp_path: Path) -> None:
    row = {
        "id": "x",
        "prompt": [{"role": "user", "content": "<script>document.title='owned'</script>"}],
        "response": '<img src="https://example.com/x.png" onerror="alert(1)">',
        "source": "<b>bold</b>",
    }
    html = sample_row(row)
    assert "<script>" not in html and "<img" not in html and "<b>" not in html
    page_path = tmp_path / "row.html"
    page_path.write_text(f"<!DOCTYPE html><html><body>{html}</body></html>")
    page = browser.open(page_path)
    assert (
        page["scripts"] == 0 and page["images"] == [] and page["requests"] == [page_path.as_uri()]
    )
    assert "<script>document.title='owned'</script>" in page["text"]


HOSTILE = '<script>alert(1)</script>"><img src=x>'


@pytest.mark.fast
def test_the_templates_escape_hostile_text(tmp_path: Path) -> None:
    """Autoescape: markup in row text (prompt, response, columns, lineage, reject reason)
    and in the commit's metadata comes out escaped everywhere on the page; only the plots
    are passed to the templates as Markup."""
    table = pq.read_table(FIXTURES / "synthesis.parquet").drop_columns(["split"])
    train = table.filter(pc.is_valid(table["lineage_method"])).slice(0, 1)
    rejected = table.filter(pc.is_valid(table["reject_reason"])).slice(0, 1)
    shards = []
    for split, part in (("train", train), ("rejected", rejected)):
        rows = part.to_pylist()
        rows[0].update(prompt=[{"role": HOSTILE, "content": HOSTILE}], response=HOSTILE)
        rows[0].update(source=HOSTILE, lineage_method=HOSTILE)
        if split == "rejected":
            rows[0]["reject_reason"] = HOSTILE
        else:
            rows = [{k: v for k, v in r.items() if not k.startswith("reject_")} for r in rows]
        schema = pa.schema([f for f in table.schema if f.name in rows[0]])
        shards.append(str(tmp_path / f"{split}.parquet"))
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), shards[-1])
    store = DatasetStore(str(tmp_path / "store"))
    Path(store.root).mkdir(parents=True)
    metadata = {"spec_name": HOSTILE, "build_id": HOSTILE, "code_version": HOSTILE}
    store.commit("hostile", [shards[0]], [shards[1]], metadata)
    result = write_report(store, "hostile", tmp_path / "report")
    page = Path(result.path).read_text()
    assert "lineage" in result.sections
    assert [p.name for p in (tmp_path / "report").iterdir()] == ["index.html"]  # no temp file
    assert "<script" not in page and "<img" not in page
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;&#34;&gt;&lt;img src=x&gt;"
    # in the header, both sample rows, the reasons, the lineage and the counts by source
    assert page.count(escaped) >= 14, page.count(escaped)


def test_the_checks_catch_a_broken_page(browser: Chromium, tmp_path: Path) -> None:
    """The browser checks are not vacuous: a blocked fetch and a broken image fail them."""
    from pipelines.report.html import CSP

    path = tmp_path / "broken.html"
    path.write_text(
        f'<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '</head><body><img src="https://example.invalid/x.png"></body></html>'
    )
    page = browser.open(path)
    assert page["console_errors"]  # the CSP refuses the fetch, and says so
    assert page["images"] == [[True, 0, 0]]
    with pytest.raises(AssertionError):
        assert_page_ok(page)


def test_cli_report(demo: dict[str, Any], tmp_path: Path) -> None:
    runner = CliRunner()
    store = demo["store"].root
    result = runner.invoke(
        app, ["report", "demo-sft@0", "--out", str(tmp_path), "--store", store, "--json"]
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["version"] == 0 and Path(data["path"]) == (tmp_path / "index.html").resolve()
    assert data["rows"]["train"] == demo["first"]["rows"]["train"]
    bad = runner.invoke(app, ["report", "demo-sft@7", "--out", str(tmp_path), "--store", store])
    assert bad.exit_code == 2
    assert "unknown version 7" in bad.stderr and "Traceback" not in bad.stderr


def test_report_of_a_version_in_an_s3_store(tmp_path: Path, browser: Chromium) -> None:
    """``aligncurate report`` reads an ``s3://`` store configured by the ``AWS_*``
    variables (a real moto_server on loopback, request signing enforced)."""
    from s3server import moto_s3

    with moto_s3(tmp_path / "moto.log") as server:
        env = server.env()
        store = DatasetStore("s3://aligncurate/reports", storage_options=env)
        commit_fixture(store, "fw-craft", "craft.parquet", shards_dir=tmp_path)
        result = CliRunner().invoke(
            app,
            ["report", "fw-craft", "--out", str(tmp_path / "out"), "--store", store.root, "--json"],
            env=env,
        )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    splits = pq.read_table(FIXTURES / "craft.parquet", columns=["split"])["split"]
    assert data["rows"] == {s: pc.sum(pc.equal(splits, s)).as_py() for s in ("train", "rejected")}
    assert "craft" in data["sections"]
    assert_page_ok(browser.open(Path(data["path"])))


@pytest.mark.fast
@pytest.mark.parametrize("absent", ["lineage_round", "lineage_generator"])
def test_lineage_counts_by_column_name_when_one_is_absent(tmp_path: Path, absent: str) -> None:
    """A version with lineage but without one of its columns: each value is read by its
    column's name (the generator was once read as the round, and int() failed)."""
    table = pq.read_table(FIXTURES / "synthesis.parquet").drop_columns(["split", absent])
    train = table.filter(pc.is_valid(table["lineage_method"]))
    train = train.drop_columns([c for c in train.column_names if c.startswith("reject_")])
    pq.write_table(train, tmp_path / "train.parquet")
    store = DatasetStore(str(tmp_path / "store"))
    Path(store.root).mkdir(parents=True)
    store.commit("partial", [str(tmp_path / "train.parquet")], [], {})
    lineage = collect(store, "partial", diff=False).splits["train"].lineage
    assert sum(lineage.values()) == train.num_rows
    for method, round_, generator in lineage:
        assert method in set(train["lineage_method"].to_pylist())
        if absent == "lineage_round":
            assert round_ == 0 and generator in set(train["lineage_generator"].to_pylist())
        else:
            assert generator == "-" and round_ in set(train["lineage_round"].to_pylist())
