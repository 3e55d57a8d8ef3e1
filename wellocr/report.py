"""`report.html`: one evaluation as a single self-contained page a person opens in a browser.

Everything is inline (CSS, the training-curve PNG and the sample images as data URIs), so the file can be
copied off a pod or attached to a message and still render. Sections: header (run, checkpoint, split, date);
headline metrics, with the base model's column and the change beside them when a base-model evaluation of the
same split sits in `<run>/eval/base*/`; every evaluation of the run on the same split side by side (fine-tuned,
base, classical OCR engines: field exact match, field F1, CER, WER, seconds per image), with a note when CER and
field exact match rank them differently; training curves (from the newest `trainer_state.json`); the worst
samples, each with its image and reference vs prediction, differences marked (<del> in the reference, <ins> in
the prediction); and per-field scores.
"""

from __future__ import annotations

import base64
import difflib
import html
import io
import json
import re
from pathlib import Path
from typing import Any

from wellocr.artifacts import evaluation_kind, list_evaluations, seconds_per_image
from wellocr.checkpoint import list_checkpoints, read_trainer_state, write_text_atomic

THUMBNAIL_WIDTH = 560
JPEG_QUALITY = 80
SIMILAR_ENOUGH_FOR_CHAR_DIFF = 0.5
_TOKENS = re.compile(r"\s+|\S+")

# (key in metrics.json, label, lower is better)
HEADLINE = (
    ("cer", "CER", True), ("wer", "WER", True), ("cer_normalized", "CER (normalised)", True),
    ("wer_normalized", "WER (normalised)", True), ("fields.f1", "Field F1", False),
    ("fields.exact_match", "Field exact match", False), ("mean_loss", "Mean loss", True),
)

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330;
       margin: 0 auto; padding: 24px; max-width: 1150px; background: #fafbfc; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 10px; }
.meta { color: #5a6375; margin-bottom: 16px; } .meta b { color: #1d2330; }
table { border-collapse: collapse; background: #fff; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
th, td { padding: 5px 12px; border-bottom: 1px solid #e6e9ef; text-align: right; }
th:first-child, td:first-child { text-align: left; } th { background: #f0f2f6; font-weight: 600; }
.better { color: #137333; } .worse { color: #b3261e; }
.curves img { max-width: 100%; background: #fff; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
.top { display: flex; flex-wrap: wrap; gap: 0 32px; align-items: flex-start; }
.sample { background: #fff; box-shadow: 0 1px 2px rgba(0,0,0,.08); border-radius: 6px; padding: 14px;
          margin-bottom: 18px; }
.sample h3 { font-size: 15px; margin: 0 0 8px; } .sample .scores { color: #5a6375; font-weight: normal; }
.sample img { display: block; width: 100%; border: 1px solid #d5d9e0; }
.row { display: grid; grid-template-columns: minmax(0, 1.25fr) minmax(0, 1fr) minmax(0, 1fr); gap: 12px; }
.row h4 { margin: 0 0 4px; font-size: 13px; color: #5a6375; text-transform: uppercase; letter-spacing: .04em; }
pre { white-space: pre-wrap; word-break: break-word; margin: 0; padding: 8px; background: #f6f7f9;
      border: 1px solid #e6e9ef; border-radius: 4px; font: 13px/1.4 ui-monospace, Menlo, Consolas, monospace; }
del { background: #fbd3d0; color: #8c1d18; text-decoration: line-through; }
ins { background: #ccefd6; color: #0d5a25; text-decoration: none; }
.legend { color: #5a6375; font-size: 13px; max-width: 640px; } .empty { color: #8a93a5; font-style: italic; }
"""


# ---------------------------------------------------------------- data the report reads


def _metric(metrics: dict[str, Any], key: str) -> float | None:
    value: Any = metrics
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value if isinstance(value, (int, float)) else None


def read_log_history(run_dir: Path) -> list[dict]:
    """The trainer's log_history: final/'s trainer_state.json if it has one, else the newest checkpoint's."""
    candidates = [Path(run_dir) / "final", *reversed(list_checkpoints(Path(run_dir)))]
    for directory in candidates:
        state = read_trainer_state(directory)
        if state is not None:
            return state.get("log_history", [])
    return []


def find_base_metrics(run_dir: Path, metrics: dict[str, Any], eval_dir: Path | None = None) -> dict | None:
    """A base-model evaluation of the same split from `<run>/eval/base*/`: same --limit first, else the largest."""
    if metrics.get("base_model") or metrics.get("engine"):
        return None
    found = []
    for path in sorted((Path(run_dir) / "eval").glob("base*/metrics.json")):
        if eval_dir is not None and path.parent.resolve() == Path(eval_dir).resolve():
            continue
        try:
            base = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if base.get("base_model") and base.get("split") == metrics.get("split"):
            found.append(base)
    if not found:
        return None
    return max(found, key=lambda b: (b.get("limit") == metrics.get("limit"), b.get("samples", 0)))


# ---------------------------------------------------------------- pictures


def training_curves_png(log_history: list[dict]) -> bytes | None:
    """Train loss, eval loss and eval CER against step, as a PNG (None when nothing was logged)."""
    def series(key: str) -> tuple[list, list]:
        points = [(e["step"], e[key]) for e in log_history if key in e and "step" in e]
        return [s for s, _ in points], [v for _, v in points]

    train, evaluation = series("loss"), series("eval_loss")
    cer = series("eval/cer") if any("eval/cer" in e for e in log_history) else series("eval_cer")
    if not (train[0] or evaluation[0] or cer[0]):
        return None

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    panels = 2 if cer[0] else 1
    fig = Figure(figsize=(4.6 * panels, 3.2), dpi=100, layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    if train[0]:
        axes[0].plot(*train, label="train loss", color="#1f6feb", linewidth=1.2)
    if evaluation[0]:
        axes[0].plot(*evaluation, "o-", label="eval loss", color="#d1242f", linewidth=1.5, markersize=4)
    axes[0].set(xlabel="step", ylabel="loss", title="Loss")
    axes[0].legend(frameon=False)
    if cer[0]:
        axes[1].plot(*cer, "o-", color="#8250df", linewidth=1.5, markersize=4)
        axes[1].set(xlabel="step", ylabel="CER", title="Eval CER (generation)")
    for ax in axes:
        ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def image_data_uri(image: Any, max_width: int = THUMBNAIL_WIDTH) -> str:
    """A downscaled JPEG of a PIL image as a data: URI."""
    thumb = image.convert("RGB")
    if thumb.width > max_width:
        thumb = thumb.resize((max_width, max(1, round(thumb.height * max_width / thumb.width))))
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------- diff


def diff_html(reference: str, prediction: str) -> tuple[str, str]:
    """Escaped HTML of both texts with differences marked: <del> in the reference, <ins> in the prediction.

    Aligns words (difflib on whitespace-separated tokens); a replaced run that still resembles its counterpart
    is refined character by character, so one wrong digit shows as one character, not a whole word.
    """
    ref_tokens, hyp_tokens = _TOKENS.findall(reference), _TOKENS.findall(prediction)
    ref_out, hyp_out = [], []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, ref_tokens, hyp_tokens, autojunk=False).get_opcodes():
        ref_part, hyp_part = "".join(ref_tokens[i1:i2]), "".join(hyp_tokens[j1:j2])
        if op == "equal":
            ref_out.append(html.escape(ref_part))
            hyp_out.append(html.escape(hyp_part))
        elif op == "replace" and _similar(ref_part, hyp_part):
            ref_html, hyp_html = _char_diff(ref_part, hyp_part)
            ref_out.append(ref_html)
            hyp_out.append(hyp_html)
        else:
            ref_out.append(_mark("del", ref_part))
            hyp_out.append(_mark("ins", hyp_part))
    return "".join(ref_out), "".join(hyp_out)


def _similar(a: str, b: str) -> bool:
    return difflib.SequenceMatcher(None, a, b).ratio() >= SIMILAR_ENOUGH_FOR_CHAR_DIFF


def _char_diff(reference: str, prediction: str) -> tuple[str, str]:
    ref_out, hyp_out = [], []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, reference, prediction, autojunk=False).get_opcodes():
        if op == "equal":
            ref_out.append(html.escape(reference[i1:i2]))
            hyp_out.append(html.escape(prediction[j1:j2]))
        else:
            ref_out.append(_mark("del", reference[i1:i2]))
            hyp_out.append(_mark("ins", prediction[j1:j2]))
    return "".join(ref_out), "".join(hyp_out)


def _mark(tag: str, text: str) -> str:
    return f"<{tag}>{html.escape(text)}</{tag}>" if text else ""


# ---------------------------------------------------------------- sections


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _header(metrics: dict[str, Any], run_dir: Path | None) -> str:
    run = metrics.get("run") or (Path(run_dir).name if run_dir else None) or "(no run)"
    ckpt = metrics["checkpoint"]
    step = f" (step {ckpt['step']})" if ckpt.get("step") is not None else ""
    samples = f"{metrics['samples']}" + (f" (--limit {metrics['limit']})" if metrics.get("limit") else "")
    engine = metrics.get("engine")
    what = (("engine", f"{metrics.get('model', '')} {engine.get('options') or ''}".strip()) if engine
            else ("checkpoint", f"{ckpt['name']}{step}"))
    items = [what, ("split", metrics["split"]), ("samples", samples),
             ("model", metrics.get("model", "")), ("date", metrics.get("created_at", ""))]
    if engine:
        del items[3]
    meta = " · ".join(f"{html.escape(k)} <b>{html.escape(str(v))}</b>" for k, v in items)
    return f"<h1>Evaluation of {html.escape(run)}</h1>\n<div class=\"meta\">{meta}</div>"


def _change(mine: float | None, theirs: float | None, lower_is_better: bool) -> str:
    if mine is None or theirs is None:
        return "<td>–</td>"
    delta = mine - theirs
    css = "" if not delta else "better" if (delta < 0) == lower_is_better else "worse"
    return f'<td class="{css}">{delta:+.4f}</td>'


def _metrics_table(metrics: dict[str, Any], base: dict[str, Any] | None) -> str:
    """Headline metrics; with a base-model evaluation, its column and the change side by side."""
    name = html.escape(metrics["checkpoint"]["name"])
    if base is None:
        head = "<tr><th>metric</th><th>value</th></tr>"
        rows = [f"<tr><td>{html.escape(label)}</td><td>{_fmt(_metric(metrics, key))}</td></tr>"
                for key, label, _ in HEADLINE]
        table = f'<table id="metrics">{head}{"".join(rows)}</table>'
    else:
        head = (f"<tr><th>metric</th><th>fine-tuned<br>{name}, n={metrics['samples']}</th>"
                f"<th>base<br>n={base['samples']}</th><th>change</th></tr>")
        rows = []
        for key, label, lower in HEADLINE:
            mine, theirs = _metric(metrics, key), _metric(base, key)
            rows.append(f"<tr><td>{html.escape(label)}</td><td>{_fmt(mine)}</td><td>{_fmt(theirs)}</td>"
                        f"{_change(mine, theirs, lower)}</tr>")
        table = f'<table id="metrics" class="vs-base">{head}{"".join(rows)}</table>'
    gen = metrics.get("generation") or {}
    note = ""
    if gen:
        note = (f'<p class="legend">Generation: {gen["samples_per_second"]:.2f} samples/s, '
                f'{gen["new_tokens_per_second"]:.0f} new tokens/s (batch {gen["batch_size"]}); '
                f'{gen["hit_max_new_tokens"]} of {metrics["samples"]} stopped at max_new_tokens '
                f'{gen["max_new_tokens"]}.</p>')
    title = "Metrics: fine-tuned vs base" if base is not None else "Metrics"
    return f"<h2>{title}</h2>\n{table}\n{note}"


def sibling_evaluations(run_dir: Path, metrics: dict[str, Any], eval_dir: Path | None = None) -> list[tuple]:
    """(name, metrics) of every evaluation in `<run>/eval/` on the split of `metrics`, this one included (named by
    `eval_dir`), fine-tuned first, then base, then engines."""
    found = {name: other for name, other in list_evaluations(run_dir) if other.get("split") == metrics.get("split")}
    if eval_dir is not None:
        found[Path(eval_dir).name] = metrics
    order = {"fine-tuned": 0, "base": 1, "engine": 2}
    return sorted(found.items(), key=lambda item: (order[evaluation_kind(item[1])], item[0]))


SIDE_BY_SIDE = (("fields.exact_match", "Field exact match"), ("fields.f1", "Field F1"), ("cer", "CER"),
                ("wer", "WER"))


def _side_by_side(evaluations: list[tuple], current: str | None) -> str:
    """One row per evaluation of the split; shown when the run has more than this one."""
    if len(evaluations) < 2:
        return ""
    head = ("<tr><th>evaluation</th><th>kind</th><th>samples</th>"
            + "".join(f"<th>{html.escape(label)}</th>" for _, label in SIDE_BY_SIDE) + "<th>s / image</th></tr>")
    rows = []
    for name, other in evaluations:
        mark = " (this report)" if name == current else ""
        seconds = seconds_per_image(other)
        cells = "".join(f"<td>{_fmt(_metric(other, key))}</td>" for key, _ in SIDE_BY_SIDE)
        rows.append(f'<tr data-kind="{evaluation_kind(other)}"><td>{html.escape(name)}{mark}</td>'
                    f"<td>{evaluation_kind(other)}</td><td>{other.get('samples', '–')}</td>{cells}"
                    f"<td>{'–' if seconds is None else f'{seconds:.2f}'}</td></tr>")
    legend = ("<p class=\"legend\">Every evaluation of this run on this split "
              "(<code>python -m wellocr.evaluate</code>; engines with <code>--engine</code>). Seconds per image: "
              "for an engine, CPU time reading one image; "
              "for a model, generation time per sample at its batch size on its device. Compare rows with the "
              "same number of samples.</p>")
    return (f"<h2>Side by side: fine-tuned, base and OCR engines</h2>\n<table id=\"side-by-side\">{head}"
            f"{''.join(rows)}</table>\n{legend}{_disagreement(evaluations)}")


def _disagreement(evaluations: list[tuple]) -> str:
    """A note for the first pair that CER and field exact match rank in opposite orders."""
    scored = [(name, _metric(m, "cer"), _metric(m, "fields.exact_match")) for name, m in evaluations]
    scored = [s for s in scored if s[1] is not None and s[2] is not None]
    for name_a, cer_a, exact_a in scored:
        for name_b, cer_b, exact_b in scored:
            if cer_a < cer_b and exact_a < exact_b:
                return (f'<p class="legend" id="cer-vs-fields"><b>{html.escape(name_a)}</b> has the lower CER '
                        f"({cer_a:.3f} vs {cer_b:.3f}) but <b>{html.escape(name_b)}</b> gets more fields exactly "
                        f"right ({exact_b:.3f} vs {exact_a:.3f}). CER counts character edits over the whole "
                        "answer, so a reading that is nearly right everywhere (say, with its spaces dropped) scores "
                        "well on it; a field counts only when its whole value is right, under the right label. "
                        "Field exact match is what a user of the extracted fields gets.</p>")
    return ""


def _per_field(metrics: dict[str, Any]) -> str:
    per_field = (metrics.get("fields") or {}).get("per_field") or {}
    if not per_field:
        return ""
    body = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v['exact']:.3f}</td><td>{v['cer']:.3f}</td><td>{v['support']}</td></tr>"
        for k, v in per_field.items()
    )
    return ("<h2>Per field</h2>\n<table id=\"fields\"><tr><th>field</th><th>exact match</th><th>CER</th>"
            f"<th>samples</th></tr>{body}</table>")


def _curves(run_dir: Path | None) -> str:
    png = training_curves_png(read_log_history(run_dir)) if run_dir is not None else None
    if png is None:
        return "<h2>Training curves</h2>\n<p class=\"empty\">No training log found for this run.</p>"
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return f"<h2>Training curves</h2>\n<div class=\"curves\"><img alt=\"training curves\" src=\"{uri}\"></div>"


def _sample(record: dict[str, Any], rank: int) -> str:
    ref_html, hyp_html = diff_html(record["reference"], record["prediction"])
    empty = '<span class="empty">(empty)</span>'
    image = '<span class="empty">(no image)</span>'
    if record.get("image") is not None:
        image = f'<img alt="row {record["index"]}" src="{image_data_uri(record["image"])}">'
    scores = f"CER {record['cer']:.3f} · WER {record['wer']:.3f}"
    if record.get("loss") is not None:
        scores += f" · loss {record['loss']:.3f}"
    return (
        f'<div class="sample"><h3>#{rank} · row {record["index"]} <span class="scores">{scores}</span></h3>'
        f'<div class="row"><div><h4>Image</h4>{image}</div>'
        f"<div><h4>Reference</h4><pre>{ref_html or empty}</pre></div>"
        f"<div><h4>Prediction</h4><pre>{hyp_html or empty}</pre></div></div></div>"
    )


def _worst(worst: list[dict]) -> str:
    if not worst:
        return ""
    cards = "\n".join(_sample(r, i + 1) for i, r in enumerate(worst))
    legend = ("<p class=\"legend\">Highest CER first (ties: higher loss). <del>struck out</del> = in the "
              "reference, missing or wrong in the prediction; <ins>green</ins> = in the prediction only.</p>")
    return f"<h2>Worst {len(worst)} samples</h2>\n{legend}\n{cards}"


# ---------------------------------------------------------------- the page


def render_report(metrics: dict[str, Any], worst: list[dict], run_dir: Path | None = None,
                  eval_dir: Path | None = None) -> str:
    """The page as a string. `worst` are per-sample records (index, prediction, reference, cer, wer, loss and
    optionally a PIL `image`), shown in the order given."""
    base = find_base_metrics(run_dir, metrics, eval_dir) if run_dir is not None else None
    siblings = sibling_evaluations(run_dir, metrics, eval_dir) if run_dir is not None else []
    title = html.escape(" · ".join(["wellocr", metrics.get("run") or "", metrics["checkpoint"]["name"],
                                    metrics["split"]]))
    top = (f'<div class="top"><section>{_metrics_table(metrics, base)}</section>'
           f"<section>{_curves(run_dir)}</section></div>")
    side = _side_by_side(siblings, Path(eval_dir).name if eval_dir is not None else None)
    body = "\n".join(s for s in [_header(metrics, run_dir), top, side, _worst(worst), _per_field(metrics)] if s)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{title}</title>"
            f"<style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def write_report(path: Path, metrics: dict[str, Any], worst: list[dict], run_dir: Path | None = None,
                 eval_dir: Path | None = None) -> Path:
    """Render and write report.html atomically."""
    path = Path(path)
    write_text_atomic(path, render_report(metrics, worst, run_dir, eval_dir))
    return path
