"""`orlik data anonymize`: typed placeholders for Polish personal data, checksum-invalid look-alikes
untouched, precision and recall per type on the project's labelled sentences."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_helpers import cli

from orlik.training.data import pii, pii_eval


def anon(text: str) -> str:
    return pii.replace(text, pii.find(text))


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("PESEL pacjenta: 44051401359.", "PESEL pacjenta: [PESEL]."),
        ("NIP 526-104-08-28, REGON 012345675.", "NIP [NIP], REGON [REGON]."),
        ("Konto PL61 1090 1014 0000 0712 1981 2874.", "Konto [IBAN]."),
        ("Tel. +48 601 234 567 lub (22) 123 45 67.", "Tel. [PHONE] lub [PHONE]."),
        ("Pisz na jan.kowalski@poczta.pl albo wejdź na https://urzad.gov.pl/sprawy?id=3.",
         "Pisz na [EMAIL] albo wejdź na [URL]."),
        ("Biuro mieści się przy ul. Jana Pawła II 15/3, 31-042 Kraków, od 2019 roku.",
         "Biuro mieści się przy [ADDRESS], od 2019 roku."),
        ("Spotkanie na pl. Grunwaldzkim 8 i al. 3 Maja 12a.", "Spotkanie na [ADDRESS] i [ADDRESS]."),
    ],
)  # fmt: skip
def test_each_type_replaced(text: str, want: str) -> None:
    assert anon(text) == want


@pytest.mark.parametrize(
    "text",
    [
        "Stary numer 44051401358 ma złą cyfrę kontrolną.",  # PESEL look-alike: wrong check digit
        "44053201357 nie istnieje: miesiąc 32 to luty 2000 roku, a 32 lutego nie było.",
        "NIP 526-104-08-27 jest błędny, tak samo 5261040827.",
        "Konto PL61 1090 1014 0000 0712 1981 2875 ma złą sumę kontrolną.",
        "Zamówienie 123456789 z 12.03.2024 na 1 299 zł, ISBN 978-83-01-17285-4.",
        "Na ul. Długiej zamknięto dwa pasy ruchu.",
    ],
)
def test_lookalikes_untouched(text: str) -> None:
    assert pii.find(text) == [] and anon(text) == text


def test_checksums() -> None:
    assert pii.pesel_ok("44051401359") and not pii.pesel_ok("44051401358")
    assert pii.nip_ok("5261040828") and not pii.nip_ok("5261040827")
    assert pii.regon_ok("012345675") and not pii.regon_ok("012345674")
    assert pii.iban_ok("PL61109010140000071219812874") and not pii.iban_ok("PL61109010140000071219812875")


def test_precision_recall_per_type(tmp_path: Path) -> None:
    r = cli("-q", "data", "anonymize", "--evaluate", "--report", tmp_path / "eval")
    assert r.code == 0, r.err
    rep = json.loads((tmp_path / "eval.json").read_text())
    for name in ("templated", "handwritten"):
        for t, v in rep[name]["per_type"].items():
            assert v["tp"] > 0, (name, t)
            assert v["precision"] >= 0.95 and v["recall"] >= 0.95, (name, t, v)
    assert "| PESEL |" in (tmp_path / "eval.md").read_text()
    # The templated set really holds look-alikes with wrong check digits that must not be caught.
    noisy = [e for e in pii_eval.examples(600) if any(c.isdigit() for c in e.text) and not e.gold]
    assert noisy


def test_jsonl_in_jsonl_out(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    rows = [{"id": 1, "text": "Mój PESEL to 44051401359, tel. 601 234 567.", "lang": "pl"},
            {"id": 2, "text": "Nic osobistego.", "lang": "pl"}]  # fmt: skip
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    r = cli("-q", "data", "anonymize", src, "--out", tmp_path / "out.jsonl")
    assert r.code == 0, r.err
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert (
        out[0] == {"id": 1, "text": "Mój PESEL to [PESEL], tel. [PHONE].", "lang": "pl"} and out[1] == rows[1]
    )
    rep = json.loads((tmp_path / "out.report.json").read_text())
    assert rep["replaced"]["PESEL"] == 1 and rep["documents_changed"] == 1
    src.write_bytes(b'{"text": "b\xea\xb3dny"}\n')
    r = cli("-q", "data", "anonymize", src, "--out", tmp_path / "bad.jsonl")
    assert r.code == 2 and "not UTF-8" in r.err and not (tmp_path / "bad.jsonl").exists()
