"""Sweep specs: presets, sweep files (TOML / JSON), --set, and one-line errors for bad input."""

import json
from pathlib import Path

import pytest

from align.models import HEADS
from align.models.protonet import ProtoNetHead
from align.sweep import (
    RunPlan,
    SweepConfig,
    balance,
    load_spec,
    parse_assignments,
    resolve_reference,
    row_keys,
)
from cache import UserError

TOML = """
title = "lr"
shots = [1, 5]
reference = "low"

[defaults]
epochs = 6
episodes-per-epoch = 200

[[run]]
name = "low"
lr = 0.001

[[run]]
name = "high"
lr = 0.01
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_table3_preset_rows_and_their_comparisons():
    spec = load_spec("table3")
    names = [r.name for r in spec.runs]
    assert names == ["no module (ProtoNet)", "TTM", "TC", "TC + SC", "TTM + TC", "TTM + TC + SC"]
    assert spec.runs[0].options == {"head": "protonet"}
    assert spec.runs[5].options == {"head": "ta2n",
                                    "head_options": {"ttm": True, "tc": True, "sc": True}}
    vs = resolve_reference(spec, SweepConfig())
    assert vs == {"no module (ProtoNet)": None, "TTM": "no module (ProtoNet)",
                  "TC": "no module (ProtoNet)", "TC + SC": "TC", "TTM + TC": "TC",
                  "TTM + TC + SC": "TTM + TC"}
    # --reference: every row against one
    vs = resolve_reference(spec, SweepConfig(reference="TC"))
    assert vs["TC"] is None and {v for k, v in vs.items() if k != "TC"} == {"TC"}
    assert spec.shots == [1]


def test_table4_heads_and_shots_presets():
    table4 = load_spec("table4")
    modes = [r.options["head_options"]["sc_mode"] for r in table4.runs]
    assert modes == ["enumerate", "grid", "mask"]
    assert resolve_reference(table4, SweepConfig())["Enumerate"] == "Mask (ours)"
    heads = load_spec("heads")
    assert [r.options["head"] for r in heads.runs] == ["protonet", "otam", "ta2n"]
    shots = load_spec("shots", heads=["ta2n", "otam"])
    assert shots.shots == [1, 2, 3, 4, 5] and shots.reference == "ta2n"
    keys = row_keys(shots, SweepConfig())
    assert [(r.name, k) for r, k in keys][:3] == [("ta2n", 1), ("otam", 1), ("ta2n", 2)]
    assert len(row_keys(shots, SweepConfig(shots=(1, 5)))) == 4  # --shots wins


def test_table2_reads_the_registry_when_it_runs(monkeypatch):
    monkeypatch.setitem(HEADS, "late-head", ProtoNetHead)
    names = [r.name for r in load_spec("table2").runs]
    assert names[-1] == "late-head" and {"protonet", "otam", "ta2n"} <= set(names)


def test_the_documented_table2_short_recipe_is_a_valid_sweep_file(tmp_path):
    """docs/table2.md writes bench/table2.py's former `short` recipe (TARN at its own learning
    rate) as a sweep file: it must parse, cover every head of the table2 preset and give TARN,
    alone, lr 0.1."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "table2.md").read_text()
    block = page.split("```toml\n", 1)[1].split("```", 1)[0]
    spec = load_spec(write(tmp_path, "table2-short.toml", block))
    assert spec.reference == "ta2n" and spec.shots == [1, 5]
    assert {r.name for r in spec.runs} == {r.name for r in load_spec("table2").runs}
    rates = {r.name: r.options["lr"] for r in spec.runs}
    assert rates.pop("tarn") == 0.1 and set(rates.values()) == {0.001}
    assert all(r.options["recipe"] == "paper" and r.options["momentum"] == 0.9
               for r in spec.runs)


def test_toml_and_json_files_give_the_same_spec(tmp_path):
    toml_spec = load_spec(write(tmp_path, "lr.toml", TOML))
    payload = {"title": "lr", "shots": [1, 5], "reference": "low",
               "defaults": {"epochs": 6, "episodes_per_epoch": 200},
               "run": [{"name": "low", "lr": 0.001}, {"name": "high", "lr": 0.01}]}
    json_spec = load_spec(write(tmp_path, "lr.json", json.dumps(payload)))
    assert toml_spec == json_spec
    assert toml_spec.runs[1].options == {"epochs": 6, "episodes_per_epoch": 200, "lr": 0.01}
    assert toml_spec.shots == [1, 5]


def test_set_assignments_are_options():
    assert parse_assignments(["epochs=6", "head_options.sc_mode=grid", "lr=0.01", "amp=false",
                              "head-options.ttm=false"]) == {
        "epochs": 6, "head_options": {"sc_mode": "grid", "ttm": False}, "lr": 0.01,
        "amp": False}


def one_line_error(call) -> str:
    with pytest.raises(UserError) as info:
        call()
    message = info.value.format_message()
    assert "\n" not in message
    return message


# each case breaks one thing; lines added at the end land in the last run ("high")
BAD_FILES = {
    "unknown option": (TOML + "no_vs_here = 1\n",
                       ["run 'high': unknown option 'no_vs_here'", "known: ", "lr_step"]),
    "wrong type": (TOML.replace("lr = 0.01", 'lr = "fast"'), ["'lr' must be float"]),
    "float epochs": (TOML.replace("epochs = 6", "epochs = 6.5"), ["'epochs' must be int"]),
    "no name": (TOML.replace('name = "high"', ""), ["run 2 needs a name"]),
    "same name": (TOML.replace('"high"', '"low"'), ["two runs are named 'low'"]),
    "same folder": (TOML.replace('"high"', '"LOW"'), ["would share the folder"]),
    "unknown vs": (TOML + 'vs = "medium"\n', ["vs 'medium' is not a run"]),
    "unknown reference": (TOML.replace('reference = "low"', 'reference = "x"'),
                          ["reference 'x' is not a run"]),
    "unknown top key": ("epochs = 3\n" + TOML, ["unknown key 'epochs'", "known: title"]),
    "owned option": (TOML + "seed = 3\n", ["set by the sweep (--seeds)"]),
    "unknown head": (TOML + 'head = "nope"\n', ["unknown head 'nope'"]),
    "bad sc mode": (TOML + 'head = "ta2n"\nhead_options = {sc_mode = "box"}\n',
                    ["run 'high': ta2n: option 'sc_mode' must be one of mask, grid, enumerate"]),
    "unknown head option": (TOML + 'head = "trx"\nhead_options = {combin = "mean"}\n',
                            ["run 'high': trx has no option 'combin'; its options: combine, "
                             "dim, sets"]),
    "head options not a table": (TOML + 'head_options = 3\n', ["head_options must be a table"]),
    "bad shots": (TOML.replace("shots = [1, 5]", "shots = [0]"), ["shots must be a positive"]),
    "no runs": ('title = "x"\n', ["no runs"]),
    "bad toml": ("[[run]\nname = 1", ["not valid TOML"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_sweep_files_give_one_line_errors(tmp_path, case):
    text, expected = BAD_FILES[case]
    message = one_line_error(lambda: load_spec(write(tmp_path, "bad.toml", text)))
    for part in expected:
        assert part in message, message


def test_other_bad_sources(tmp_path):
    assert "not valid JSON" in one_line_error(
        lambda: load_spec(write(tmp_path, "bad.json", "{\"run\": [")))
    assert "ends in .toml or .json" in one_line_error(
        lambda: load_spec(write(tmp_path, "bad.yaml", "run: []")))
    message = one_line_error(lambda: load_spec("tabel3"))
    assert "neither a preset" in message and "table3" in message
    assert "--heads applies" in one_line_error(lambda: load_spec("table3", heads=["ta2n"]))
    assert "unknown head 'nope'" in one_line_error(lambda: load_spec("heads", heads=["nope"]))
    assert "expected KEY=VALUE" in one_line_error(lambda: parse_assignments(["epochs"]))
    assert "unknown option 'epoch'" in one_line_error(lambda: parse_assignments(["epoch=3"]))


def plan(index, cost):
    return RunPlan(index=index, total=6, name=f"r{index}", shot=1, seed=0, head="ta2n",
                   training_free=cost == 0, train={}, requested={}, run_dir="", episodes_file="",
                   workdir="", eval_options={}, cost=cost)


def test_balance_spreads_the_costliest_runs_first():
    plans = [plan(0, 0.0), plan(1, 10.0), plan(2, 10.0), plan(3, 5.0), plan(4, 5.0),
             plan(5, 0.0)]
    queues = balance(plans, 2)
    assert sorted(p.index for q in queues for p in q) == list(range(6))
    assert [sum(p.cost for p in q) for q in queues] == [15.0, 15.0]
    assert all([p.index for p in q] == sorted(p.index for p in q) for q in queues)
