"""Instruction metrics (paper Table 3) against pycocoevalcap called directly and against hand computations;
the no-Java path; SPICE never downloads."""
from __future__ import annotations

import json
import math

import pytest

from avi_jax.errors import ConfigError, InputError
from avi_jax.metrics import captions

ROWS = [("c0", "A fairly happy man speaks with lip corner strongly pulled.",
         ["A happy man speaks with lip corner strongly pulled and cheek raised.", "The man talks happily."]),
        ("c1", "The woman doesn't look angry; her brows are lowered.",
         ["An angry woman speaks with brows strongly lowered.", "The woman talks with an angry face."]),
        ("c2", "A sad (very) man talks.", ["A very sad man talks with lip corner depressed."])]
JAVA = captions.java_version() is not None


def _direct(rows):
    """pycocoevalcap's own pipeline, as COCOEvalCap.evaluate runs it."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": r} for r in refs] for i, (_, _, refs) in enumerate(rows)})
    res = tok.tokenize({i: [{"caption": h}] for i, (_, h, _) in enumerate(rows)})
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
    return {"BLEU_1": bleu[0], "BLEU_4": bleu[3], "METEOR": Meteor().compute_score(gts, res)[0],
            "ROUGE_L": Rouge().compute_score(gts, res)[0], "CIDEr": Cider().compute_score(gts, res)[0]}


@pytest.mark.skipif(not JAVA, reason="needs Java for pycocoevalcap's PTB tokenizer and METEOR")
def test_matches_pycocoevalcap_called_directly():
    got = captions.instruction_metrics(ROWS)
    want = _direct(ROWS)
    assert set(got["metrics"]) == set(want)
    for k, v in want.items():
        assert got["metrics"][k] == pytest.approx(v, rel=1e-9), k
    assert "--spice-jars" in got["unavailable"]["SPICE"] and "SPICE" not in got["metrics"]
    assert got["counts"] == {"instructions": 3, "references": 5, "no_references": 0}
    assert got["versions"]["pycocoevalcap"] and got["versions"]["java"]


def test_bleu1_and_rouge_by_hand():
    """Hypothesis 'a b c d' vs reference 'a b e f g h': unigram precision 2/4, brevity penalty
    exp(1 - 6/4) -> BLEU-1 = 0.5 exp(-0.5). ROUGE-L: LCS 2, P = 2/4, R = 2/6, beta 1.2:
    (1 + b^2) P R / (R + b^2 P). Identical text scores BLEU-1 = 1."""
    got = captions.instruction_metrics([("x", "a b c d", ["a b e f g h"])], java=False)["metrics"]
    assert got["BLEU_1"] == pytest.approx(0.5 * math.exp(-0.5), rel=1e-6)
    p, r, b2 = 0.5, 1 / 3, 1.2 ** 2
    assert got["ROUGE_L"] == pytest.approx((1 + b2) * p * r / (r + b2 * p), rel=1e-9)
    assert captions.instruction_metrics([("x", "a b c d", ["a b c d"])], java=False)["metrics"]["BLEU_1"] == \
        pytest.approx(1.0)


def test_without_java_the_others_still_run():
    got = captions.instruction_metrics(ROWS, java=False)
    assert set(got["metrics"]) == {"BLEU_1", "BLEU_4", "ROUGE_L", "CIDEr"}
    assert "Java" in got["unavailable"]["METEOR"] and "Java" in got["unavailable"]["SPICE"]
    assert "no Java" in got["tokenizer"] and got["versions"]["java"] is None
    if JAVA:     # the Python tokenizer reproduces PTB on these sentences, so the figures agree
        want = _direct(ROWS)
        for k in got["metrics"]:
            assert got["metrics"][k] == pytest.approx(want[k], rel=1e-9), k


@pytest.mark.skipif(not JAVA, reason="needs Java for the PTB tokenizer")
def test_simple_tokenize_matches_ptb():
    sents = ["The man doesn't smile; he's (very) sad... isn't he?", "I'm sure they're fine, aren't they?",
             'Lips "pressed" tight -- e.g. a 3.5-year-old frown!', "A fairly happy man speaks with lip corner "
             "strongly pulled and cheek mildly raised."]
    ptb = captions.tokenize({"s": sents}, use_java=True)["s"]
    assert [captions.simple_tokenize(s) for s in sents] == ptb


def test_spice_never_downloads(tmp_path, monkeypatch):
    import urllib.request

    def refuse(*a, **k):
        raise AssertionError("SPICE tried to download")
    monkeypatch.setattr(urllib.request, "urlretrieve", refuse)
    with pytest.raises(ConfigError, match="stanford-corenlp-3.6.0-models.jar"):
        captions.instruction_metrics(ROWS, spice_jars=str(tmp_path))
    for j in captions.CORENLP_JARS:              # present but not jars: the SPICE jar fails, one clear error
        (tmp_path / j).write_bytes(b"not a jar")
    if JAVA:
        with pytest.raises(InputError, match="SPICE failed"):
            captions.instruction_metrics(ROWS, spice_jars=str(tmp_path))


def test_read_instructions(tmp_path):
    p = tmp_path / "instructions.jsonl"
    p.write_text(json.dumps({"clip_id": "a", "instruction": "[0.00-10.00 s] one\n[10.00-12.00 s] two",
                             "references": ["r"]}) + "\n\n")
    assert captions.read_instructions(str(p)) == [("a", "one two", ["r"])]
    p.write_text('{"clip_id": "a"}\n')
    with pytest.raises(InputError, match=r"instructions.jsonl:1"):
        captions.read_instructions(str(p))
    with pytest.raises(InputError, match="no instruction has references"):
        captions.instruction_metrics([("a", "x", [])], java=False)
