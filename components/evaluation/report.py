"""metrics.json schema check (DESIGN.md, "Evaluation protocol") and the one-page HTML report."""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Per-NFE entries must carry one of these key sets (2-D data or images) plus sec_per_sample.
ENTRY_KEYS_2D = ("sw2", "sw2_ratio", "mmd", "mmd_ratio")
ENTRY_KEYS_IMAGE = ("fd", "fd_ratio", "precision", "recall")
FLOOR_KEYS_2D = ("sw2", "mmd")
FLOOR_KEYS_IMAGE = ("fd",)


class MetricsSchemaError(ValueError):
    """metrics.json does not have the shape fixed in DESIGN.md."""


def _require_mapping(value: Any, where: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise MetricsSchemaError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _require_number(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MetricsSchemaError(f"{where}: expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise MetricsSchemaError(f"{where}: expected a finite number, got {value}")


def _require_key(mapping: Mapping, key: str, where: str) -> Any:
    if key not in mapping:
        raise MetricsSchemaError(f"{where}: missing required key '{key}'")
    return mapping[key]


def _require_keys_of_one_kind(mapping: Mapping, options: tuple[tuple[str, ...], ...], where: str) -> None:
    """All keys of at least one option must be present; otherwise name the first missing key of the closest one."""
    best = max(options, key=lambda keys: sum(k in mapping for k in keys))
    for key in best:
        _require_key(mapping, key, where)


def validate_metrics_schema(metrics: Mapping[str, Any]) -> None:
    """Raise MetricsSchemaError (a ValueError) naming the first bad key path; return None if valid.

    Required: ``dataset`` (str); ``floor`` with sw2+mmd (2-D) or fd (images); ``models`` (non-empty)
    mapping each model to {"nfe": {str(int >= 1): entry}}, each entry holding sec_per_sample and either
    sw2, sw2_ratio, mmd, mmd_ratio or fd, fd_ratio, precision, recall. Every value is a finite number.
    Optional sections ``reflow`` (straightness per model) and ``dpo`` are checked when present.
    """
    root = _require_mapping(metrics, "metrics")
    dataset = _require_key(root, "dataset", "metrics")
    if not isinstance(dataset, str) or not dataset:
        raise MetricsSchemaError("metrics.dataset: expected a non-empty string")

    floor = _require_mapping(_require_key(root, "floor", "metrics"), "metrics.floor")
    _require_keys_of_one_kind(floor, (FLOOR_KEYS_2D, FLOOR_KEYS_IMAGE), "metrics.floor")
    for key, value in floor.items():
        _require_number(value, f"metrics.floor.{key}")

    models = _require_mapping(_require_key(root, "models", "metrics"), "metrics.models")
    if not models:
        raise MetricsSchemaError("metrics.models: expected at least one model")
    for model, model_entry in models.items():
        where = f"metrics.models.{model}"
        nfe_entries = _require_mapping(_require_key(_require_mapping(model_entry, where), "nfe", where), f"{where}.nfe")
        for nfe, entry in nfe_entries.items():
            entry_where = f"{where}.nfe.{nfe}"
            if not isinstance(nfe, str) or not nfe.isdigit() or int(nfe) < 1:
                raise MetricsSchemaError(f"{entry_where}: NFE key must be a string of an int >= 1")
            entry = _require_mapping(entry, entry_where)
            _require_key(entry, "sec_per_sample", entry_where)
            _require_keys_of_one_kind(entry, (ENTRY_KEYS_2D, ENTRY_KEYS_IMAGE), entry_where)
            for key, value in entry.items():
                _require_number(value, f"{entry_where}.{key}")

    if "reflow" in root:
        reflow = _require_mapping(root["reflow"], "metrics.reflow")
        straightness = _require_mapping(_require_key(reflow, "straightness", "metrics.reflow"), "metrics.reflow.straightness")
        for model, value in straightness.items():
            _require_number(value, f"metrics.reflow.straightness.{model}")

    if "dpo" in root:
        dpo = _require_mapping(root["dpo"], "metrics.dpo")
        for key in ("win_rate", "implicit_accuracy"):
            _require_number(_require_key(dpo, key, "metrics.dpo"), f"metrics.dpo.{key}")
        reward_mean = _require_mapping(_require_key(dpo, "reward_mean", "metrics.dpo"), "metrics.dpo.reward_mean")
        for key in ("reference", "dpo"):
            _require_number(_require_key(reward_mean, key, "metrics.dpo.reward_mean"), f"metrics.dpo.reward_mean.{key}")


# --------------------------------------------------------------------------- HTML report

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; } td.name { text-align: left; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
img { max-width: 640px; border: 1px solid #ddd; }
"""


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[Any]], name_columns: int = 1) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="name">{_format_value(v)}</td>' if i < name_columns else f"<td>{_format_value(v)}</td>"
            for i, v in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _quality_section(metrics: Mapping[str, Any]) -> str:
    models = metrics.get("models", {})
    metric_keys: list[str] = []
    for model_entry in models.values():
        for entry in model_entry.get("nfe", {}).values():
            metric_keys.extend(k for k in entry if k not in metric_keys)
    rows = []
    for model, model_entry in models.items():
        nfe_entries = model_entry.get("nfe", {})
        for nfe in sorted(nfe_entries, key=int):
            rows.append([model, int(nfe)] + [nfe_entries[nfe].get(k, "") for k in metric_keys])
    if not rows:
        return "<p>No model was evaluated.</p>"
    return _table(["model", "NFE"] + metric_keys, rows, name_columns=1)


def _image_tag(name: str, image_path: Path, report_dir: Path) -> str:
    """Embed PNGs as data URIs so the page is self-contained; link other files relatively."""
    caption = f"<figcaption>{html.escape(name)}</figcaption>"
    if image_path.suffix.lower() == ".png" and image_path.is_file():
        encoded = base64.b64encode(image_path.read_bytes()).decode("ascii")
        return f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{encoded}">{caption}</figure>'
    relative = os.path.relpath(image_path, report_dir)
    return f'<figure><a href="{html.escape(relative)}">{html.escape(name)}</a>{caption}</figure>'


def write_html_report(
    path: str | Path,
    metrics: Mapping[str, Any],
    images: Mapping[str, str | Path],
    lineage: Mapping[str, Mapping[str, Any]],
) -> Path:
    """Write one self-contained HTML page: floor, models x NFE table (with ratios), extra sections,
    the plots (PNG embedded, others linked relatively) and the lineage table (lineage[model] = {field: value},
    e.g. run_id, stage, git_commit). Returns the path."""
    path = Path(path)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Evaluation report: {html.escape(str(metrics.get('dataset', '')))}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Evaluation report: {html.escape(str(metrics.get('dataset', '')))}</h1>",
    ]
    floor = metrics.get("floor", {})
    if floor:
        parts.append("<h2>Floor (two disjoint real sets)</h2>")
        parts.append(_table(list(floor), [list(floor.values())], name_columns=0))
    parts.append("<h2>Quality vs NFE</h2>")
    parts.append("<p>Ratios are value / floor (1 = as good as real data); sec_per_sample is sampling wall time.</p>")
    parts.append(_quality_section(metrics))
    straightness = metrics.get("reflow", {}).get("straightness", {})
    if straightness:
        parts.append("<h2>Straightness of sampling trajectories</h2>")
        parts.append(_table(["model", "straightness"], [[m, v] for m, v in straightness.items()]))
    dpo = metrics.get("dpo")
    if dpo:
        parts.append("<h2>Preference alignment (DPO)</h2>")
        flat = [[k, v] for k, v in dpo.items() if not isinstance(v, Mapping)]
        flat += [[f"{k}.{sub}", v2] for k, v in dpo.items() if isinstance(v, Mapping) for sub, v2 in v.items()]
        parts.append(_table(["quantity", "value"], flat))
    if images:
        parts.append("<h2>Plots</h2>")
        parts.extend(_image_tag(name, Path(image), path.parent) for name, image in images.items())
    parts.append("<h2>Lineage</h2>")
    if lineage:
        fields: list[str] = []
        for info in lineage.values():
            fields.extend(k for k in info if k not in fields)
        rows = [[model] + [info.get(f, "") for f in fields] for model, info in lineage.items()]
        parts.append(_table(["model"] + fields, rows, name_columns=len(fields) + 1))
    else:
        parts.append("<p>No lineage recorded.</p>")
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
