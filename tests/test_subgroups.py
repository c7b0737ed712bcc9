"""The subgroup audit: age bands on the real NIH table (and a copy with impossible ages), planted gaps, small groups."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from cxr.audit import subgroup_columns
from cxr.data import DataError, load_nih, read_nih_table, table_to_index
from cxr.labels import FINDINGS
from cxr.preflight import format_report, preflight
from cxr.subgroups import age_groups, audit_subgroups, column_groups, format_subgroup_summary, sex_groups, view_groups, write_subgroups

REAL_TABLE = "Data_Entry_2017_v2020.csv"
# Counted once with pandas.cut on the 2020 table (ages 0 to 95, none unknown).
REAL_AGE_BANDS = {"0-19": 7046, "20-39": 29393, "40-59": 49243, "60-79": 25419, "80+": 1019}


def test_age_bands_of_the_real_table(nih_sample):
    index = table_to_index(read_nih_table(nih_sample / REAL_TABLE))
    bands = age_groups(index.ages)
    names, counts = np.unique(bands, return_counts=True)
    assert dict(zip(names.tolist(), counts.tolist())) == REAL_AGE_BANDS
    assert sum(REAL_AGE_BANDS.values()) == len(index) == 112_120  # every image in exactly one band
    assert index.ages.max() == 95 and bands[index.ages == 95][0] == "80+"
    assert set(bands[index.ages == 19]) == {"0-19"} and set(bands[index.ages == 20]) == {"20-39"}
    sex, view = sex_groups(index.genders), view_groups(index.views)
    assert (sex == "female").sum() == 48_780 and (sex == "male").sum() == 63_340
    assert (view == "AP").sum() == 44_810 and (view == "PA").sum() == 67_310


def test_impossible_ages_are_excluded_and_reported(nih_sample, tmp_path):
    lines = (nih_sample / REAL_TABLE).read_text().splitlines()
    changed = {1: "148", 2: "412", 100: "155"}  # the 2017 release had a few ages above 140
    for line_number, age in changed.items():
        cells = lines[line_number].split(",")
        cells[4] = age
        lines[line_number] = ",".join(cells)
    copy = tmp_path / "nih"
    copy.mkdir()
    (copy / REAL_TABLE).write_text("\n".join(lines) + "\n")
    index = table_to_index(read_nih_table(copy / REAL_TABLE))
    bands = age_groups(index.ages)
    assert (bands == "").sum() == 3 and set(bands[[0, 1, 99]]) == {""}
    assert (bands != "").sum() == 112_117
    report = preflight(copy)  # no images here: the whole table is reported
    assert report["impossible_ages"] == 3 and report["age_range"] == [0.0, 412.0]
    assert report["impossible_age_examples"] == index.image_names[[0, 1, 99]].tolist()
    assert "3 impossible (> 120, left out of the age subgroups)" in format_report(report)


def planted_audit_inputs(n_patients: int = 400, seed: int = 0):
    """Labels and scores where women's positives score lower for Effusion (planted underdiagnosis)."""
    rng = np.random.default_rng(seed)
    patients = np.repeat(np.arange(n_patients), 2)
    sex = np.where(patients % 2 == 0, "female", "male")
    labels = (rng.random((len(patients), len(FINDINGS))) < 0.2).astype(np.float64)
    labels[:, FINDINGS.index("Hernia")] = 0
    labels[(sex == "male") & (np.arange(len(patients)) % 40 == 1), FINDINGS.index("Hernia")] = 1  # men only
    signal = labels * 2.0
    effusion = FINDINGS.index("Effusion")
    signal[sex == "female", effusion] *= 0.3
    scores = 1 / (1 + np.exp(-(signal + rng.normal(0, 1, labels.shape) - 1)))
    return labels, scores, patients, sex


def test_planted_gap_is_the_largest_and_a_tiny_group_is_kept():
    labels, scores, patients, sex = planted_audit_inputs()
    thresholds = np.full(len(FINDINGS), 0.5)
    view = np.where(np.arange(len(patients)) < 6, "AP", "PA")  # six AP films
    audit = audit_subgroups(labels, scores, patients, {"sex": sex, "view": view}, thresholds, FINDINGS, n_resamples=100)
    female, male = (audit["attributes"]["sex"]["groups"][name] for name in ("female", "male"))
    assert female["n_images"] == male["n_images"] == 400 and female["n_patients"] == 200
    effusion = audit["attributes"]["sex"]["gaps"]["Effusion"]
    assert effusion["tpr"]["lowest"] == "female" and effusion["tpr"]["gap"] > 0.3
    assert effusion["auroc"]["lowest"] == "female" and effusion["auroc"]["gap"] > 0.15
    positives = labels[sex == "female", FINDINGS.index("Effusion")] == 1
    predicted = scores[sex == "female", FINDINGS.index("Effusion")] >= 0.5
    assert female["classes"]["Effusion"]["tpr"] == pytest.approx(predicted[positives].mean())
    entry = female["classes"]["Effusion"]
    assert entry["ci_low"] < entry["auroc"] < entry["ci_high"] and entry["status"] == "ok"
    hernia = female["classes"]["Hernia"]  # no positive woman: reported, not dropped
    assert np.isnan(hernia["auroc"]) and hernia["positives"] == 0 and hernia["status"].startswith("AUROC undefined")
    assert audit["attributes"]["view"]["groups"]["AP"]["classes"]["Mass"]["n"] == 6
    summary = format_subgroup_summary(audit)
    assert "Effusion" in summary.splitlines()[summary.splitlines().index("  largest TPR (underdiagnosis) gaps:") + 1]


def test_subgroup_files(tmp_path):
    labels, scores, patients, sex = planted_audit_inputs(n_patients=40)
    ages = np.where(np.arange(len(patients)) < 10, 150.0, 45.0)
    audit = audit_subgroups(labels, scores, patients, {"sex": sex, "age": age_groups(ages)}, np.full(14, 0.5), FINDINGS,
                            n_resamples=20)
    assert audit["attributes"]["age"]["excluded"] == 10 and list(audit["attributes"]["age"]["groups"]) == ["40-59"]
    write_subgroups(audit, tmp_path)
    with open(tmp_path / "subgroups.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == (2 + 1) * len(FINDINGS)
    assert {row["group"] for row in rows} == {"female", "male", "40-59"}
    saved = json.loads((tmp_path / "subgroups.json").read_text())
    assert saved["attributes"]["age"]["excluded"] == 10


def test_subgroup_columns_from_the_table(synthetic_nih):
    data = load_nih(synthetic_nih)
    rows = data.splits["test"]
    groups = subgroup_columns("sex,view,follow-up,OriginalImage Width", data, rows)
    assert list(groups) == ["sex", "view", "follow-up", "OriginalImage Width"]
    assert set(groups["view"]) <= {"AP", "PA"} and len(groups["OriginalImage Width"]) == len(rows)
    assert subgroup_columns("none", data, rows) == {}
    with pytest.raises(DataError, match="--subgroups sex,Hospital: .*no column 'Hospital'"):
        subgroup_columns("sex,Hospital", data, rows)


def test_column_groups_bin_many_numbers_and_keep_categories():
    assert column_groups(np.array([1.0, 2.0, 1.0, np.nan])).tolist() == ["1", "2", "1", ""]
    binned = column_groups(np.arange(100, dtype=np.float64))
    assert len(set(binned)) == 4 and binned[0] == "[0, 24.75)" and binned[-1] == "[74.25, 99]"
    assert column_groups(np.array(["a", "b"])).tolist() == ["a", "b"]
