"""Instruction quality (paper Table 3): BLEU-1/4, METEOR, ROUGE-L, CIDEr and SPICE of the generated visual
instructions against the references, through pycocoevalcap (the COCO caption evaluation code; its
``COCOEvalCap.evaluate`` pipeline: PTB tokenisation, then every scorer on the tokenised text).

Variants, as pycocoevalcap computes them:

* tokenisation: Stanford CoreNLP 3.4.1's ``PTBTokenizer -preserveLines -lowerCase`` (Java), then
  pycocoevalcap's punctuation tokens removed. **Without Java** the same rule in Python
  (:func:`simple_tokenize`: lower case, PTB's split of contractions and punctuation, the same punctuation
  removed); the variant then says so. On the instructions of the MeadText pattern both agree
  (``tests/test_metrics_captions.py`` checks it where Java is present).
* BLEU-n: corpus-level BLEU (``Bleu(4)``, the "closest" reference length for the brevity penalty).
* METEOR 1.5 (Java; ``-l en -norm``), the mean of the per-segment scores as the jar reports it.
* ROUGE-L: LCS F-measure with beta 1.2, the mean over the instructions.
* CIDEr: pycocoevalcap's ``Cider`` (the CIDEr-D form: n = 1..4, Gaussian length penalty sigma 6, clipped
  counts), document frequencies from the evaluated set's references.
* SPICE 1.0 (Java): needs the Stanford CoreNLP 3.6.0 jars (``stanford-corenlp-3.6.0.jar`` and
  ``stanford-corenlp-3.6.0-models.jar``, from stanford-corenlp-full-2015-12-09.zip) in a folder given by the
  user; run here directly (``edu.anu.spice.SpiceScorer``), never through pycocoevalcap's ``Spice()``, which
  downloads them. Without them SPICE is reported unavailable, never as 0.

Scores are in [0, 1] as pycocoevalcap returns them; the paper's Table 3 prints them x 100.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from typing import Any, Sequence

from avi_jax.errors import ConfigError, InputError

CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
METRICS = ("BLEU_1", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS: the tokens it drops after PTB tokenisation
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                          "--", "...", ";"])
_TOKEN = re.compile(r"[a-z0-9]+(?=n't\b)|n't\b|[a-z0-9]+(?='(?:s|re|ve|ll|d|m)\b)|'(?:s|re|ve|ll|d|m)\b"
                    r"|(?:[a-z]\.){2,}|[a-z0-9]+(?:[-'.][a-z0-9]+)*|\.\.\.|--|\S")
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", '"': "''"}   # PTB's (lower-cased) forms
VARIANTS = {
    "BLEU_1": "pycocoevalcap Bleu(4), corpus-level, 1-grams",
    "BLEU_4": "pycocoevalcap Bleu(4), corpus-level, up to 4-grams",
    "METEOR": "pycocoevalcap Meteor (METEOR 1.5 jar, -l en -norm)",
    "ROUGE_L": "pycocoevalcap Rouge (LCS F-measure, beta 1.2), mean over instructions",
    "CIDEr": "pycocoevalcap Cider (CIDEr-D form, n<=4, sigma 6), IDF from this set's references",
    "SPICE": "SPICE 1.0 (pycocoevalcap's spice-1.0.jar with the given CoreNLP 3.6.0 jars), mean F-score",
}


def java_version() -> str | None:
    """The ``java -version`` line (e.g. 'openjdk version "17.0.15"'), or None when no Java runs."""
    if shutil.which("java") is None:
        return None
    try:
        out = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = (out.stderr or out.stdout).strip().splitlines()
    return lines[0] if out.returncode == 0 and lines else None


def pycocoevalcap_version() -> str | None:
    """The installed pycocoevalcap version, or None when it is not installed."""
    from importlib import metadata
    try:
        return metadata.version("pycocoevalcap")
    except metadata.PackageNotFoundError:
        return None


def simple_tokenize(text: str) -> str:
    """The no-Java stand-in for pycocoevalcap's PTB tokenisation of one sentence: lower case; contractions
    split as PTB does ("don't" -> "do n't", "man's" -> "man 's"); punctuation split off and the tokens of
    ``PUNCTUATIONS`` dropped; brackets become ``-lrb-`` ...; tokens joined by single spaces."""
    tokens = [_BRACKETS.get(t, t) for t in _TOKEN.findall(text.replace("\n", " ").lower())]
    return " ".join(t for t in tokens if t not in PUNCTUATIONS)


def tokenize(captions: dict[str, list[str]], use_java: bool) -> dict[str, list[str]]:
    """``{id: [sentence, ...]}`` -> the same with each sentence tokenised (PTB through Java, or
    :func:`simple_tokenize`)."""
    if not use_java:
        return {k: [simple_tokenize(s) for s in v] for k, v in captions.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    return PTBTokenizer().tokenize({k: [{"caption": s} for s in v] for k, v in captions.items()})


def check_spice_jars(folder: str) -> None:
    """Raise ``ConfigError`` unless ``folder`` holds both Stanford CoreNLP 3.6.0 jars SPICE needs."""
    missing = [j for j in CORENLP_JARS if not os.path.isfile(os.path.join(folder, j))]
    if missing:
        raise ConfigError(f"--spice-jars {folder}: missing {', '.join(missing)} (from "
                          "http://nlp.stanford.edu/software/stanford-corenlp-full-2015-12-09.zip)")


def spice_score(gts: dict[str, list[str]], res: dict[str, list[str]], jars: str) -> float:
    """SPICE of tokenised ``res`` ({id: [hypothesis]}) against ``gts`` ({id: [reference, ...]}): the mean
    over ids of SPICE's 'All' F-score. Runs pycocoevalcap's ``spice-1.0.jar`` with the CoreNLP 3.6.0 jars of
    ``jars`` on the class path (no download; temporary files in a private folder).

    Raises:
      ConfigError: jars missing; InputError: the SPICE jar fails (its stderr tail in the message).
    """
    import numpy as np
    import pycocoevalcap.spice.spice as spice_module

    check_spice_jars(jars)
    spice_dir = os.path.dirname(os.path.abspath(spice_module.__file__))
    classpath = os.pathsep.join([os.path.join(spice_dir, "spice-1.0.jar")]
                                + [os.path.join(os.path.abspath(jars), j) for j in CORENLP_JARS])
    with tempfile.TemporaryDirectory(prefix="spice") as tmp:
        inp, out = os.path.join(tmp, "in.json"), os.path.join(tmp, "out.json")
        with open(inp, "w") as f:
            json.dump([{"image_id": k, "test": res[k][0], "refs": gts[k]} for k in sorted(gts)], f)
        cmd = ["java", "-Xmx8G", "-cp", classpath, "edu.anu.spice.SpiceScorer", inp, "-out", out,
               "-subset", "-silent"]
        done = subprocess.run(cmd, cwd=spice_dir, capture_output=True, text=True)
        if done.returncode != 0 or not os.path.isfile(out):
            raise InputError(f"SPICE failed (exit {done.returncode}): {done.stderr.strip()[-300:]}")
        with open(out) as f:
            items = json.load(f)

    def f_score(item):
        try:
            return float(item["scores"]["All"]["f"])
        except (TypeError, ValueError):
            return float("nan")
    return float(np.nanmean([f_score(it) for it in items]))


def read_instructions(path: str) -> list[tuple[str, str, list[str]]]:
    """``[(clip_id, instruction, references)]`` from an export's ``instructions.jsonl`` (one JSON object per
    line with ``clip_id``, ``instruction`` and ``references``). A multi-window instruction's
    ``[a-b s] text`` lines are joined into one text.

    Raises:
      InputError: unreadable, a line that is not such an object, or no line.
    """
    rows = []
    try:
        with open(path) as f:
            lines = [ln for ln in f if ln.strip()]
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e})") from e
    for n, line in enumerate(lines, 1):
        try:
            obj = json.loads(line)
            text = " ".join(re.sub(r"^\[[0-9.]+-[0-9.]+ s\] ", "", t) for t in str(obj["instruction"]).splitlines())
            refs = [str(r) for r in obj["references"]]
            rows.append((str(obj["clip_id"]), text, refs))
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{path}:{n}: expected a JSON object with clip_id, instruction, references ({e})") from e
    if not rows:
        raise InputError(f"{path}: no instructions")
    return rows


def instruction_metrics(rows: Sequence[tuple[str, str, Sequence[str]]], spice_jars: str | None = None,
                        java: bool | None = None) -> dict[str, Any]:
    """Table 3's figures of generated instructions against their references.

    Args:
      rows: ``[(id, generated instruction, [reference, ...])]``; rows without references are not scored
        (counted in ``counts['no_references']``).
      spice_jars: folder with the CoreNLP 3.6.0 jars for SPICE, or None (SPICE unavailable).
      java: whether to use Java (default: whether ``java -version`` runs).

    Returns:
      ``{"metrics": {name: score in [0, 1]}, "variants": {name: definition}, "unavailable": {name: reason},
      "counts": {"instructions", "references", "no_references"}, "tokenizer": ..., "versions": {...}}``.

    Raises:
      InputError: no row with references; ConfigError: pycocoevalcap not installed or bad ``spice_jars``.
    """
    if pycocoevalcap_version() is None:
        raise ConfigError("the instruction metrics need pycocoevalcap: pip install 'pycocoevalcap>=1.2'")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    jv = java_version() if java is None or java else None
    use_java = jv is not None
    scored = [r for r in rows if len(r[2])]
    if not scored:
        raise InputError("instruction metrics: no instruction has references")
    if spice_jars is not None:
        check_spice_jars(spice_jars)
    ids = [f"{i}" for i in range(len(scored))]              # unique even when a clip id repeats
    gts = tokenize({i: list(r[2]) for i, r in zip(ids, scored)}, use_java)
    res = tokenize({i: [r[1]] for i, r in zip(ids, scored)}, use_java)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    metrics = {"BLEU_1": float(bleu[0]), "BLEU_4": float(bleu[3])}
    unavailable: dict[str, str] = {}
    if use_java:
        from pycocoevalcap.meteor.meteor import Meteor
        metrics["METEOR"] = float(Meteor().compute_score(gts, res)[0])
    else:
        unavailable["METEOR"] = "needs Java (METEOR 1.5 jar); no 'java' on PATH"
    metrics["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    metrics["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if not use_java:
        unavailable["SPICE"] = "needs Java; no 'java' on PATH"
    elif spice_jars is None:
        unavailable["SPICE"] = ("needs the Stanford CoreNLP 3.6.0 jars: give --spice-jars DIR with "
                                + " and ".join(CORENLP_JARS) + " (stanford-corenlp-full-2015-12-09.zip)")
    else:
        metrics["SPICE"] = spice_score(gts, res, spice_jars)
    tokenizer = ("PTB (Stanford CoreNLP 3.4.1 PTBTokenizer -lowerCase), punctuation removed" if use_java else
                 "no Java: avi_jax.metrics.captions.simple_tokenize (PTB's rules in Python), punctuation removed")
    return {"metrics": {k: metrics[k] for k in METRICS if k in metrics},
            "variants": {k: f"{VARIANTS[k]}; tokens: {tokenizer}" for k in metrics},
            "unavailable": unavailable,
            "counts": {"instructions": len(scored), "references": sum(len(r[2]) for r in scored),
                       "no_references": len(rows) - len(scored)},
            "tokenizer": tokenizer,
            "versions": {"pycocoevalcap": pycocoevalcap_version(), "java": jv}}


__all__ = ["METRICS", "VARIANTS", "java_version", "pycocoevalcap_version", "simple_tokenize", "tokenize",
           "check_spice_jars", "spice_score", "read_instructions", "instruction_metrics"]
