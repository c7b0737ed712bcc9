"""The 14 ChestX-ray14 findings, in the order of Wang et al. 2017, defined once for the whole project."""

from __future__ import annotations

FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NUM_CLASSES = len(FINDINGS)
NO_FINDING = "No Finding"

# Spellings seen in NIH files that mean one of the findings above.
ALIASES: dict[str, str] = {
    "Infiltrate": "Infiltration",  # BBox_List_2017.csv
    "Pleural Thickening": "Pleural_Thickening",
}


def canonical_finding(name: str) -> str:
    """Map an NIH spelling to its entry in FINDINGS; raise KeyError for an unknown name."""
    name = name.strip()
    name = ALIASES.get(name, name)
    if name not in FINDINGS:
        raise KeyError(name)
    return name
