"""Phone numbers as people write them are redacted whether or not phonenumbers knows their area
code; digit runs that are not phones (counts, order numbers, versions, dates) are left alone."""

from __future__ import annotations

import json
import re

import pytest

from data_contracts.config import PiiConfig
from tasks.io import read_records
from tasks.pii import run_pii

# Phone-shaped, several with area codes no one has been assigned (999, 555, 123, 289-000...).
PHONES = [
    "Call me at +1-999-555-0123 tomorrow.",
    "My cell is 999.555.0198 after six.",
    "The office line (123) 456-7890 rings twice.",
    "You can reach the desk on 1-289-000-4411.",
    "Dial +1 (555) 010-4477 for the night shift.",
    "Our branch: 555 247 9910, ask for Sam.",
    "The London office is +44 20 7946 0958.",
    "Paris: +33 6 12 34 56 78 on weekdays.",
    "Berlin support +49 30 1234 5678 helps too.",
    "Sydney uses +61 2 9876 5432 now.",
    "Tel: 4155550173 (bare, with a phone word).",
    "please call 02079460958 before noon",
]
# Digits that are not phones: no phone shape and no phone word near a bare run.
LOOKALIKES = [
    "The model has 7000000000 parameters and 4096 hidden units.",
    "We trained on 1234567890 tokens last week.",
    "order 4155550123 shipped on 2024-10-15.",
    "Upgrade to v10.123.4567 fixes the build.",
    "Build 10.0.19045.3693 crashes at 10:30:45.",
    "ISBN 978-3-16-148410-0 is the second edition.",
    "Invoice INV-2024-000123, PO 123-4567-8901.",
    "The report from 15.10.2024 and 2024.10.15 match.",
    "Kernel 4.18.0-553 answers on port 8080.",
    "Dates 20241015 and 10/15/2024 are the same day.",
]


@pytest.fixture(scope="module")
def scrubbed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    work = tmp_path_factory.mktemp("pii-recall")
    src = work / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n"
                           for i, t in enumerate(PHONES + LOOKALIKES)))
    run_pii(str(src), work / "out", PiiConfig(workers=1), home=work)
    return {r.id: r.text for r in read_records(work / "out")}


@pytest.mark.parametrize("i", range(len(PHONES)), ids=lambda i: PHONES[i][:28])
def test_phone_shapes_are_redacted(scrubbed: dict[str, str], i: int) -> None:
    text = scrubbed[f"t{i}"]
    assert "<PHONE>" in text, text
    assert not re.search(r"\d{3}", text.replace("<PHONE>", "")), text  # no digits left over


@pytest.mark.parametrize("i", range(len(LOOKALIKES)), ids=lambda i: LOOKALIKES[i][:28])
def test_lookalikes_are_left_alone(scrubbed: dict[str, str], i: int) -> None:
    assert scrubbed[f"t{len(PHONES) + i}"] == LOOKALIKES[i]
