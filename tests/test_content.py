"""Content type of a 3GPP clause from its Markdown: hand-labelled real clauses, and a hand-counted share."""

import os

import pytest

from jaxtele.data import threegpp
from jaxtele.data.content import content_shares, content_type

# Labelled by reading each clause: what a reader would call it.
LABELLED = {
    "38.413_NGAP_j20.md": {"TS 38.413 9.4.3": "asn1",  # the elementary procedure definitions module
                           "TS 38.413 9.4.1": "prose",  # talks about ASN.1 but holds none
                           "TS 38.413 9.3.1.33": "table",  # one IE table after one sentence
                           "TS 38.413 8.18.1.1": "prose"},
    "38.101-1_RF_Requirements_FR1_j50.md": {"TS 38.101-1 5.2": "table"},  # the operating band table
    "38.321_MAC_j20.md": {"TS 38.321 5.1.2": "prose"},  # random access resource selection
}


@pytest.mark.parametrize("spec", sorted(LABELLED))
def test_real_clauses(shared_data, spec):
  clauses = {c.id: c.text for c in threegpp.read_specs_file(os.path.join(shared_data, "3gpp", spec))}
  for cid, label in LABELLED[spec].items():
    assert content_type(clauses[cid]) == label, cid


def test_hand_counted_shares():
  text = ("5.1 Title\n"  # prose: 9 chars
          "| a | b |\n"  # table: 9
          "\n"
          "-- ASN1START\n"  # asn1: 12, and the 3 lines up to and including STOP
          "X ::= INTEGER\n"  # 13
          "y\n"  # 1 (inside the block)
          "-- ASN1STOP\n"  # 11
          "after\n")  # prose: 5
  shares = content_shares(text)
  total = 9 + 9 + 12 + 13 + 1 + 11 + 5
  assert shares == pytest.approx({"prose": 14 / total, "table": 9 / total, "asn1": 37 / total}, abs=1e-12)
  assert content_type(text) == "asn1"
  assert content_shares("  \n") == {"prose": 0.0, "table": 0.0, "asn1": 0.0}
