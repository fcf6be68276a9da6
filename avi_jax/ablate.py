"""Train, export and evaluate the full system and its ablations, and print the paper's Tables 3 and 4:
``python -m avi_jax.ablate --config configs/avi_talking.py:demo --workdir runs/ablate [--ablations a,b,...]``.

Each system (``full`` and every name of ``configs/avi_talking.py``'s ``ABLATIONS``, default all) is trained
into ``WORKDIR/<name>`` with the same seed and the same data (one demo corpus in ``WORKDIR/data``, or the
config's prepared dataset). A stage whose defining config (``training.experiment.defining_fields``) is the
same as the full system's, and whose earlier stages are too, is *copied* from ``WORKDIR/full`` instead of
trained again (e.g. the stage-2 ablations reuse the full run's ``lm``/``align``/``tune``/``motion``; the
stage-1 ones its ``motion`` and ``style``); the log says which. Then the test split is exported
(``python -m avi_jax.export``, ``--num-samples`` styles per clip for Diversity) to ``WORKDIR/<name>/export``
and evaluated by ``python -m avi_jax.evaluate`` (``WORKDIR/<name>/eval.json``), and the demo's versions of
Table 3 (instructions; the stage-1 ablations) and Table 4 (synthesis; the stage-2 ones), the full system
last as in the paper, plus the Table 1 row "w/o LLM", are printed and written to ``WORKDIR/tables.json``
and ``WORKDIR/tables.md``. A rerun skips every step already complete (stages, export clips, evaluations).
Errors: one line ``error: ...``, exit status 2.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
from typing import Any, Sequence

from avi_jax.errors import ConfigError, run_command

FULL = "full"
# Which ablations each table compares (paper Tables 3 and 4; Table 1's "w/o LLM" row)
TABLE3_SYSTEMS = ("no_aug", "no_llama", "no_qformer_align")
TABLE4_SYSTEMS = ("no_aug", "no_diffusion", "no_cont_align", "no_llm")
LABELS = {"no_aug": "w/o Aug.", "no_llama": "w/o LLaMA", "no_qformer_align": "w/o Q-Former",
          "no_cont_align": "w/o Cont Align", "no_diffusion": "w/o Diffusion", "no_llm": "w/o LLM (Table 1)",
          FULL: "Full"}
TABLE3 = (("BLEU_1", "BLEU_1 ↑"), ("BLEU_4", "BLEU_4 ↑"), ("METEOR", "METEOR ↑"), ("ROUGE_L", "ROUGE_L ↑"),
          ("CIDEr", "CIDEr ↑"), ("SPICE", "SPICE ↑"), ("emotion_accuracy", "Emotion acc. ↑"))
TABLE4 = (("video", "lse_d", "LSE-D ↓"), ("diversity", "diversity_style", "Diversity ↑"),
          ("video", "fid", "FID ↓"), ("video", "kid", "KID ↓"),
          ("motion", "expression_mse", "Expr. MSE ↓"), ("motion", "jaw_open_pearson", "Jaw-open r ↑"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m avi_jax.ablate", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/avi_talking.py:demo",
                   help="a configs/avi_talking.py config and its argument (default: configs/avi_talking.py:demo)")
    p.add_argument("--workdir", required=True, help="folder of the runs: WORKDIR/full, WORKDIR/<ablation>, ...")
    p.add_argument("--ablations", help="comma-separated ablation names (default: all)")
    p.add_argument("--split", default="test", help="held-out split exported and evaluated (default: test)")
    p.add_argument("--num-samples", type=int, default=3, help="styles sampled per clip (Diversity; default 3)")
    p.add_argument("--max-clips", type=int, default=0, help="export only the first N clips (0 = all)")
    return p


def _config_module(spec: str) -> Any:
    """The config file of ``path/to/config.py:ARG``, which must define ``ABLATIONS`` (the whole system)."""
    path = spec.partition(":")[0]
    if not os.path.isfile(path):
        raise ConfigError(f"--config {spec}: {path} not found")
    module_spec = importlib.util.spec_from_file_location("_ablate_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "ABLATIONS"):
        raise ConfigError(f"--config {spec}: not the whole system (configs/avi_talking.py has ABLATIONS)")
    return module


def load_config(spec: str, ablation: str = "") -> Any:
    """``path/to/config.py:ARG`` with ``ablation=NAME`` added to ARG. Raises ``ConfigError``."""
    module, arg = _config_module(spec), spec.partition(":")[2]
    arg = ",".join(a for a in (arg, f"ablation={ablation}" if ablation else "") if a)
    try:
        return module.get_config(arg)
    except ValueError as e:
        raise ConfigError(f"--config {spec}: {e}") from None


def system_names(spec: str, ablations: str | None) -> list[str]:
    """The systems to run, ``full`` first: ``ablations`` (comma-separated) or every known ablation."""
    known = list(_config_module(spec).ABLATIONS)
    names = [a.strip() for a in ablations.split(",") if a.strip()] if ablations else known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"--ablations: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    return [FULL] + [n for n in names if n != FULL]


def shareable_stages(config: Any, full: Any) -> list[str]:
    """The stages of ``config`` that train exactly as in ``full``: same defining fields
    (``experiment.defining_fields``) for the stage and every stage before it in its family, and for
    ``style`` also ``motion`` (its frozen style encoder)."""
    from avi_jax.training import experiment
    shared = []
    for family in experiment.run_families(config):
        order = experiment.family_stages(family)
        mine, theirs = experiment.stage_record(config, family), experiment.stage_record(full, family)
        for stage in order:
            if stage not in config.stages or stage not in full.stages:
                break
            if experiment.defining_fields(mine, stage, order) != experiment.defining_fields(theirs, stage, order):
                break
            if family == "style" and "motion" not in shared:
                break
            shared.append(stage)
    return shared


def copy_shared(name: str, config: Any, full: Any, root: str) -> list[str]:
    """Copy the finished stages ``name`` shares with the full system (checkpoints left out) from
    ``root/full`` into ``root/name``, and the demo tokenizer with them; returns the stages copied."""
    src, dst = os.path.join(root, FULL), os.path.join(root, name)
    copied = []
    for stage in shareable_stages(config, full):
        if os.path.isfile(os.path.join(dst, stage, "final_metrics.json")) or \
                not os.path.isfile(os.path.join(src, stage, "final_metrics.json")):
            continue
        shutil.rmtree(os.path.join(dst, stage), ignore_errors=True)
        shutil.copytree(os.path.join(src, stage), os.path.join(dst, stage),
                        ignore=shutil.ignore_patterns("checkpoints"))
        copied.append(stage)
    if any(s in copied for s in ("lm", "align", "tune")) and os.path.isdir(os.path.join(src, "tokenizer")) \
            and not os.path.isdir(os.path.join(dst, "tokenizer")):
        shutil.copytree(os.path.join(src, "tokenizer"), os.path.join(dst, "tokenizer"))
    if copied:
        logging.info("ablate: %s reuses the full system's stage(s) %s (same config; copied, not retrained)",
                     name, ", ".join(copied))
    return copied


def run_system(name: str, config: Any, full: Any, root: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train (sharing what it can), export and evaluate one system; returns its evaluation."""
    from avi_jax import evaluate, export
    from avi_jax.assembly.common import dataset_path, family_config
    from avi_jax.training.experiment import train_and_evaluate

    workdir = os.path.join(root, name)
    out_json = os.path.join(workdir, "eval.json")
    if os.path.isfile(out_json):
        with open(out_json) as f:
            return json.load(f)
    shared = copy_shared(name, config, full, root) if name != FULL else []
    train_and_evaluate(config, workdir)
    data = dataset_path(family_config(config, "instruct", workdir), workdir)
    out = os.path.join(workdir, "export")
    code = export.main(["--workdir", workdir, "--split", args.split, "--out", out,
                        "--num-samples", str(args.num_samples), "--max-clips", str(args.max_clips)])
    if code:
        raise ConfigError(f"{name}: python -m avi_jax.export --workdir {workdir} --out {out} failed (exit {code})")
    code = evaluate.main(["--export", out, "--dataset", data, "--split", args.split, "--no-render",
                          "--method", LABELS.get(name, name), "--out", out_json + ".partial"])
    if code:
        raise ConfigError(f"{name}: python -m avi_jax.evaluate --export {out} failed (exit {code})")
    with open(out_json + ".partial") as f:
        result = json.load(f)
    with open(os.path.join(workdir, "final_metrics.json")) as f:
        result["training"] = json.load(f)
    result["shared_with_full"] = shared or result.get("shared_with_full", [])
    with open(out_json + ".partial", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(out_json + ".partial", out_json)
    return result


def _value(result: dict[str, Any], section: str, key: str) -> tuple[float | None, str | None]:
    """A figure of an evaluation, or None and the reason it is missing."""
    if section == "training":
        value = result.get("training", {}).get(key)
        return (value, None) if value is not None else (None, "not reported by training")
    sec = result.get(section, {})
    if key in sec.get("metrics", {}):
        return sec["metrics"][key], None
    return None, sec.get("unavailable", {}).get(key, "not computed")


def build_tables(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Tables 3 and 4 as ``{"columns"/"rows": ..., "values": {row: {column: float | None}},
    "unavailable": {reason: [cells]}}``: Table 3 metrics x systems (x 100, full last), Table 4 systems x
    metrics (full last), as the paper lays them out. Emotion accuracy is the tune stage's (held-out split)."""
    def table(systems, metrics, by_row_system):
        present = [s for s in systems if s in results] + [FULL]
        values, missing = {}, {}
        for s in present:
            for spec in metrics:
                section, key, label = spec if len(spec) == 3 else (
                    ("training", spec[0], spec[1]) if spec[0] == "emotion_accuracy" else ("instructions",) + spec)
                v, reason = _value(results[s], section, key)
                if v is not None and section == "instructions":
                    v *= 100.0
                row, col = (LABELS[s], label) if by_row_system else (label, LABELS[s])
                values.setdefault(row, {})[col] = v
                if v is None:
                    missing.setdefault(reason, []).append(f"{LABELS[s]}: {label}")
        cols = [m[-1] for m in metrics] if by_row_system else [LABELS[s] for s in present]
        return {"columns": cols, "rows": list(values), "values": values, "unavailable": missing}

    return {"table3": table(TABLE3_SYSTEMS, TABLE3, False), "table4": table(TABLE4_SYSTEMS, TABLE4, True)}


def markdown(tables: dict[str, Any]) -> str:
    """Both tables as markdown, with the reasons for the missing cells."""
    titles = {"table3": "Table 3: instruction stage (held-out split; NLG scores x 100)",
              "table4": "Table 4: synthesis stage (held-out split)"}
    parts = []
    for key, t in tables.items():
        corner = "Metric" if key == "table3" else "Method"
        lines = [f"**{titles[key]}**", "", "| " + " | ".join([corner] + t["columns"]) + " |",
                 "|" + "---|" * (len(t["columns"]) + 1)]
        for row in t["rows"]:
            cells = [("n/a" if t["values"][row].get(c) is None else f"{t['values'][row][c]:.4g}")
                     for c in t["columns"]]
            lines.append("| " + " | ".join([row] + cells) + " |")
        lines += [""] + [f"- n/a: {reason} ({len(cells)} cells)" for reason, cells in t["unavailable"].items()]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def run(args: argparse.Namespace) -> int:
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {args.num_samples}")
    names = system_names(args.config, args.ablations)
    configs = {n: load_config(args.config, "" if n == FULL else n) for n in names}
    root = os.path.abspath(args.workdir)
    for config in configs.values():            # one dataset for every system
        if config.instruct.data.source == "demo" and not config.instruct.data.dir:
            config.instruct.data.dir = os.path.join(root, "data")
    results = {}
    for name in names:
        logging.info("=== ablate: %s ===", name)
        results[name] = run_system(name, configs[name], configs[FULL], root, args)
    tables = build_tables(results)
    text = markdown(tables)
    print(text)
    from avi_jax.inference.outputs import atomic_write
    atomic_write(os.path.join(root, "tables.json"), lambda f: json.dump(
        {"tables": tables, "systems": names, "config": args.config, "split": args.split,
         "shared_with_full": {n: r.get("shared_with_full", []) for n, r in results.items()}}, f, indent=2),
        mode="w")
    atomic_write(os.path.join(root, "tables.md"), lambda f: f.write(text), mode="w")
    print(f"wrote {os.path.join(root, 'tables.md')} and tables.json")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = _parser().parse_args(argv)
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
