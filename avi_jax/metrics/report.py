"""An evaluation as sections and tables laid out like the paper's (AVI-Talking Tables 1, 3 and 4, plus the 3D
field's motion metrics).

Every section is a dict ``{"metrics": {name: float}, "variants": {name: definition},
"unavailable": {name: reason}, "counts": {...}}``; the sections are ``motion``, ``diversity``,
``instructions`` (:mod:`avi_jax.metrics.captions`) and ``video`` (FID/KID and SyncNet LSE, computed by the
video evaluator; metric names ``fid``, ``kid``, ``lse_d``, ``lse_c`` and the ground-truth row's
``gt_lse_d``, ``gt_lse_c``). A table cell whose metric is unavailable shows ``n/a (k)``, with reason k
listed under the table; never 0.
"""
from __future__ import annotations

from typing import Any

TABLE3 = (("BLEU_1", "BLEU_1 ↑"), ("BLEU_4", "BLEU_4 ↑"), ("METEOR", "METEOR ↑"), ("ROUGE_L", "ROUGE_L ↑"),
          ("CIDEr", "CIDEr ↑"), ("SPICE", "SPICE ↑"))
TABLE1 = (("fid", "FID ↓"), ("kid", "KID ↓"), ("lse_d", "LSE-D ↓"), ("lse_c", "LSE-C ↑"))
TABLE4 = (("video", "lse_d", "LSE-D ↓"), ("diversity", "diversity_style", "Diversity ↑"),
          ("diversity", "diversity_vertex_mm", "Div. vertex (mm) ↑"), ("video", "fid", "FID ↓"),
          ("video", "kid", "KID ↓"))
VIDEO_METRICS = ("fid", "kid", "lse_d", "lse_c", "gt_lse_d", "gt_lse_c")


class _Notes:
    """Footnotes of one table: each distinct reason once, numbered."""

    def __init__(self):
        self.reasons: list[str] = []

    def cell(self, section: dict | None, name: str, fmt: str, scale: float = 1.0) -> str:
        section = section or {}
        if name in section.get("metrics", {}):
            return format(section["metrics"][name] * scale, fmt)
        reason = section.get("unavailable", {}).get(name, "not computed")
        if reason not in self.reasons:
            self.reasons.append(reason)
        return f"n/a ({self.reasons.index(reason) + 1})"

    def lines(self) -> list[str]:
        return [f"  ({i + 1}) {r}" for i, r in enumerate(self.reasons)]


def _grid(header: list[str], rows: list[list[str]], left: tuple[int, ...] = (0,)) -> list[str]:
    """Aligned plain-text rows: columns in ``left`` left-aligned, the others (figures) right-aligned."""
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def fmt(r):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return [fmt(header), "-" * len(fmt(header))] + [fmt(r) for r in rows]


def table1(result: dict[str, Any], method: str) -> str:
    """Table 1: FID, KID, LSE-D (and LSE-C) of the method, and the ground truth's LSE-D/C."""
    video, notes = result.get("video"), _Notes()
    rows = [[method] + [notes.cell(video, k, ".4g") for k, _ in TABLE1],
            ["GT", "-", "-", notes.cell(video, "gt_lse_d", ".4g"), notes.cell(video, "gt_lse_c", ".4g")]]
    return "\n".join(["Table 1 (visual quality and lip sync; as the paper's Table 1)"]
                     + _grid(["Method"] + [h for _, h in TABLE1], rows) + notes.lines())


def table3(result: dict[str, Any], method: str) -> str:
    """Table 3: instruction quality, scores x 100 as in the paper."""
    notes = _Notes()
    rows = [[h, notes.cell(result.get("instructions"), k, ".1f", 100.0)] for k, h in TABLE3]
    return "\n".join(["Table 3 (instruction quality, x 100; as the paper's Table 3)"]
                     + _grid(["Metric", method], rows) + notes.lines())


def table4(result: dict[str, Any], method: str) -> str:
    """Table 4: LSE-D, Diversity (the paper's, on style embeddings, and the vertex-space one), FID, KID."""
    notes = _Notes()
    columns = list(TABLE4)
    if "diversity_coefficient" in result.get("diversity", {}).get("metrics", {}):     # no FLAME model
        columns.insert(3, ("diversity", "diversity_coefficient", "Div. coef. ↑"))
    rows = [[method] + [notes.cell(result.get(sec), k, ".4g") for sec, k, _ in columns]]
    return "\n".join(["Table 4 (synthesis; as the paper's Table 4)"]
                     + _grid(["Method"] + [h for _, _, h in columns], rows) + notes.lines())


def motion_table(result: dict[str, Any]) -> str:
    """The 3D field's motion metrics, one per line with its variant."""
    sec = result["motion"]
    c = sec["counts"]
    notes = _Notes()
    names = list(sec["metrics"]) + [k for k in sec["unavailable"] if k not in sec["metrics"]]
    rows = [[k, notes.cell(sec, k, ".6g"), sec["variants"].get(k, "")] for k in names]
    head = (f"Motion ({c['clips']} clips, {c['frames']} frames; {c['frames_trimmed']} frames trimmed to match "
            f"lengths; {c['missing']} reference clips without a prediction, {c['no_reference']} without "
            f"coefficients, {c['vertex_only']} vertex-only predictions)")
    return "\n".join([head] + _grid(["metric", "value", "variant"], rows, left=(0, 2)) + notes.lines())


def format_report(result: dict[str, Any], method: str) -> str:
    """All tables of an evaluation ``result`` (sections as in the module docstring), for printing."""
    return "\n\n".join([motion_table(result), table1(result, method), table3(result, method),
                        table4(result, method)])


__all__ = ["VIDEO_METRICS", "table1", "table3", "table4", "motion_table", "format_report"]
