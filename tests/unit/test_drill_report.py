"""ha.drill.report: the JSON round-trips, the table says the figures, the PNG is written and decodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from ha.drill import measure, report
from ha.drill.traffic import Call, Registration, Sample, TrafficRecord


def _record() -> tuple[TrafficRecord, list[tuple[float, dict[str, bool]]]]:
    samples = []
    for i in range(100):  # every 20 ms from t=50.0; silent from 50.6 to 51.2 (fault at 50.6)
        sent = 50.0 + i * 0.02
        ans = None if 50.6 <= sent < 51.2 else sent + 0.002
        samples.append(Sample(i + 1, sent, ans, 200 if ans else None))
    regs = [Registration(f"u{i}", f"sip:u{i}@198.51.100.50:{6000 + i}", 50.1, 200, 51.6, 200, True) for i in range(3)]
    calls = [
        Call("c1", "u0", "established", 50.2, 200, 50.21, ["<sip:198.51.100.10;lr>"], bye_sent=51.7, bye_status=200),
        Call("c2", "u1", "new", 50.8, None, 54.8),
    ]
    own = [(50.0 + i * 0.01, {"node1": i < 80, "node2": i >= 95}) for i in range(200)]
    rec = TrafficRecord(samples=samples, registrations=regs, calls=calls, errors=["just a note"])
    return rec, own


def _doc() -> dict:
    rec, own = _record()
    figs = measure.figures(rec.samples, rec.registrations, rec.calls, fault_at=50.6, old_node="node1", ownership=own)
    return report.document(rec, figs, fault="node-crash", target="active", old_node="node1",
                           marks={"fault injected": 50.6, "fault undone": 51.0}, ownership=own,
                           extra={"transport": "udp"})  # fmt: skip


def test_document_has_every_figure_relative_times_and_round_trips(tmp_path: Path) -> None:
    doc = _doc()
    figs = doc["figures"]
    assert figs["gap_ms"] == pytest.approx(620.0)  # last answer 50.582 -> first after 51.202
    assert figs["first_answer_new_node_ms"] == pytest.approx(602.0)  # 51.202 - 50.6, node2 holds it by then
    assert figs["registrations_reachable"] == 3 and figs["calls_bye_ok"] == 1
    assert figs["details"]["gap"]["start"] == pytest.approx(0.582)  # relative to the first probe (50.0)
    events = [e["event"] for e in doc["timeline"]]
    assert events == ["last answer before the gap", "fault injected", "fault undone", "first answer after the gap"]
    assert doc["samples"][0] == [0.0, 0.002, 200, "node1"]  # credited to the VIP holder at answer time
    path = report.write_json(doc, tmp_path / "drill.json")
    assert report.read_json(path) == json.loads(json.dumps(doc))
    assert doc["transport"] == "udp" and doc["version"] == report.VERSION


def test_summary_and_repeat_tables_render() -> None:
    doc = _doc()
    console = Console(record=True, width=120)
    report.print_report(doc, console)
    text = console.export_text()
    assert "drill node-crash on active (VIP was on node1)" in text
    assert "620.0" in text and "3 / 3" in text and "just a note" in text
    agg = measure.aggregate([doc["figures"], {**doc["figures"], "gap_ms": 900.0, "recovered": False}])
    console = Console(record=True, width=140)
    console.print(report.repeat_table(agg, "node-crash", 2))
    text = console.export_text()
    assert "x 2" in text and "900" in text and "1/2 yes" in text


def test_png_is_written_and_decodes(tmp_path: Path) -> None:
    out = report.plot(_doc(), tmp_path / "drill.png")
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 800 and img.size[1] > 400


def test_png_from_a_saved_json_without_ownership(tmp_path: Path) -> None:
    doc = _doc()
    doc["ownership"] = []
    report.write_json(doc, tmp_path / "d.json")
    out = report.plot(report.read_json(tmp_path / "d.json"), tmp_path / "d.png")
    with Image.open(out) as img:
        assert img.format == "PNG"
