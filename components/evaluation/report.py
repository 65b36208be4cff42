"""metrics.json schema check (DESIGN.md, "Evaluation protocol"), the one-page HTML report and the terminal
leaderboard (`python -m flows.summary`)."""

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


def _require_entry_value(key: str, value: Any, where: str) -> None:
    if key.endswith("_ci"):
        if not (isinstance(value, (list, tuple)) and len(value) == 2):
            raise MetricsSchemaError(f"{where}: expected an interval [lo, hi], got {value!r}")
        for bound in value:
            _require_number(bound, where)
        if value[0] > value[1]:
            raise MetricsSchemaError(f"{where}: interval lower bound {value[0]} above upper bound {value[1]}")
    elif key.endswith("_below_floor"):
        if not isinstance(value, bool):
            raise MetricsSchemaError(f"{where}: expected true/false, got {value!r}")
    elif key in ("sampler", "vs_teacher_best"):
        if not isinstance(value, str):
            raise MetricsSchemaError(f"{where}: expected a string, got {value!r}")
    else:
        _require_number(value, where)


def validate_metrics_schema(metrics: Mapping[str, Any]) -> None:
    """Raise MetricsSchemaError (a ValueError) naming the first bad key path; return None if valid.

    Required: ``dataset`` (str); ``floor`` with sw2+mmd (2-D) or fd (images); ``models`` (non-empty)
    mapping each model to {"nfe": {str(int >= 1): entry}}, each entry holding sec_per_sample and either
    sw2, sw2_ratio, mmd, mmd_ratio or fd, fd_ratio, precision, recall. Values are finite numbers, except
    `<metric>_ci` ([lo, hi] with lo <= hi), `<metric>_below_floor` (bool), `sampler` and `vs_teacher_best` (str).
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
                _require_entry_value(key, value, f"{entry_where}.{key}")

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
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, float) for v in value):
        return f"[{value[0]:.4g}, {value[1]:.4g}]"
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


def _cell_text(entry: Mapping[str, Any], metric: str) -> str:
    """'1.52 [1.31, 1.75] tie' for the ratio of `metric`; flags a below-floor value."""
    value, ci = entry.get(f"{metric}_ratio"), entry.get(f"{metric}_ratio_ci")
    if value is None:
        return ""
    text = f"{value:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
    verdict = entry.get("vs_teacher_best")
    if verdict:
        text += f" {verdict}"
    if entry.get(f"{metric}_below_floor"):
        text += f" BELOW FLOOR (recall {entry['recall']:.2f})" if "recall" in entry else " BELOW FLOOR"
    return text


def primary_metric(metrics: Mapping[str, Any]) -> str:
    """The metric a metrics.json ranks by: sw2 for 2-D data, fd for images."""
    return "sw2" if "sw2" in metrics.get("floor", {}) else "fd"


def _quality_section(metrics: Mapping[str, Any]) -> str:
    models = metrics.get("models", {})
    if not models:
        return "<p>No model was evaluated.</p>"
    metric = primary_metric(metrics)
    parts = [f"<p>{metric} as a multiple of the floor, best sampler x grid at each NFE, with its 95% interval; "
             "'tie' where the interval overlaps that of the teacher's best cell.</p>"]
    nfes = sorted({int(n) for m in models.values() for n in m.get("nfe", {})})
    rows = []
    for model, entry in models.items():
        best = entry.get("best", entry.get("nfe", {}))
        rows.append([model] + [_cell_text(best[str(n)], metric) + (f" ({best[str(n)]['sampler']})"
                                                                    if "sampler" in best.get(str(n), {}) else "")
                               if str(n) in best else "" for n in nfes])
        default = entry.get("nfe", {})
        rows.append([f"{model} (default {entry.get('sampler', '')})"]
                    + [_cell_text(default[str(n)], metric) if str(n) in default else "" for n in nfes])
    parts.append(_table(["model"] + [f"NFE {n}" for n in nfes], rows, name_columns=1))
    metric_keys: list[str] = []
    for model_entry in models.values():
        for entry in model_entry.get("best", model_entry.get("nfe", {})).values():
            metric_keys.extend(k for k in entry if k not in metric_keys)
    full = []
    for model, model_entry in models.items():
        table = model_entry.get("best", model_entry.get("nfe", {}))
        for nfe in sorted(table, key=int):
            full.append([model, int(nfe)] + [_format_value(table[nfe].get(k, "")) for k in metric_keys])
    parts.append("<h3>All metrics, best sampler</h3>")
    parts.append(_table(["model", "NFE"] + metric_keys, full, name_columns=1))
    return "\n".join(parts)


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
        draws = metrics.get("floor_draws")
        parts.append("<h2>Floor (disjoint real sets" + (f", mean and sd over {draws} draws)" if draws else ")") + "</h2>")
        rows = [list(floor.values())]
        if metrics.get("floor_sd"):
            rows.append([metrics["floor_sd"].get(k, "") for k in floor])
        parts.append(_table(list(floor), rows, name_columns=0))
    parts.append("<h2>Quality vs NFE</h2>")
    parts.append("<p>Ratios are value / floor (1 = as good as real data); sec_per_sample is sampling wall time.</p>")
    parts.append(_quality_section(metrics))
    straightness = metrics.get("reflow", {}).get("straightness", {})
    if straightness:
        parts.append("<h2>Straightness of sampling trajectories</h2>")
        all_straightness = metrics.get("straightness", {})
        parts.append(_table(["model", "straightness", "95% interval"],
                            [[m, v, _format_value(all_straightness.get(f"{m}_ci", ""))] for m, v in straightness.items()]))
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


# --------------------------------------------------------------------------- terminal leaderboard

SUMMARY_MARK = {"tie": "=", "better": "+", "worse": "", None: ""}


def summary_cell(entry: Mapping[str, Any], metric: str) -> str:
    """'1.61 [1.40,1.80]=': the ratio to the floor, its interval, '=' tie / '+' better than the teacher's best,
    '!' below the floor."""
    value, ci = entry.get(f"{metric}_ratio"), entry.get(f"{metric}_ratio_ci")
    if value is None:
        return "-"
    text = f"{value:.2f}" + (f" [{ci[0]:.2f},{ci[1]:.2f}]" if ci else "")
    text += SUMMARY_MARK.get(entry.get("vs_teacher_best"), "")
    if entry.get(f"{metric}_below_floor"):
        text += "!"
    return text


def summary_lines(metrics: Mapping[str, Any]) -> list[str]:
    """The leaderboard as text: models x NFE, each cell the best sampler's ratio to the floor with its interval."""
    metric = primary_metric(metrics)
    nfes = sorted({int(n) for m in metrics["models"].values() for n in m["nfe"]})
    width = 19
    head = f"{'model':12s}" + "".join(f"{'NFE ' + str(n):>{width}s}" for n in nfes)
    floor_sd = metrics.get("floor_sd", {}).get(metric)
    floor_text = f"{metrics['floor'][metric]:.4g}" + (f" +- {floor_sd:.2g} sd over {metrics.get('floor_draws')} draws"
                                                       if floor_sd is not None else "")
    lines = [f"{metrics.get('dataset', '?')}: {metric} as a multiple of the floor ({metric} between disjoint real sets "
             f"= {floor_text}), n = {metrics.get('n_samples')}; best sampler at each NFE, [95% interval];",
             "'=' tie with the teacher's best (intervals overlap), '+' better, '!' below the floor (an artefact, "
             "not a win); lower is better, 1 = floor",
             head, "-" * len(head)]
    for name, model in metrics["models"].items():
        table = model.get("best", model["nfe"])
        lines.append(f"{name:12s}" + "".join(f"{summary_cell(table[str(n)], metric) if str(n) in table else '-':>{width}s}"
                                             for n in nfes))
    best = metrics.get("teacher_best")
    if best:
        ci = best[f"{metric}_ratio_ci"]
        lines.append(f"teacher's best: NFE {best['nfe']} with {best['sampler']}: {best[f'{metric}_ratio']:.2f} "
                     f"[{ci[0]:.2f}, {ci[1]:.2f}]")
    samplers = {name: sorted({c.get("sampler", "") for c in m.get("best", {}).values()})
                for name, m in metrics["models"].items()}
    lines.append("best samplers: " + "; ".join(f"{k} {', '.join(v)}" for k, v in samplers.items() if v))
    if metrics.get("straightness"):
        lines.append("straightness (0 = straight paths): " +
                     ", ".join(f"{k} {v:.3f}" for k, v in metrics["straightness"].items() if not k.endswith("_ci")))
    return lines
