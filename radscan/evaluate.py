"""`radscan evaluate`: how well one or more models separate labelled normal and abnormal images.

Metrics come from scikit-learn. AUC gets a 95% interval from a stratified bootstrap (normals and
abnormals resampled separately, so every replicate has both classes); two models are compared on
the same images with a paired bootstrap of the AUC difference (the same resampled images for
both). Sensitivity, specificity, F1 and the TP/FP/TN/FN counts are reported at each model's stored
threshold; accuracy and F1 at the threshold that is best on the evaluated set itself are reported
too, clearly labelled, for comparison with papers that report that way (it is optimistic: the
threshold is tuned on the test data). Quality control judges every film first, as `radscan score`
does (with the first model's reference): under --qc strict the films it rejects are not in the
measure, which then describes the films the nightly job scores, and the summary counts them. With
an output folder: per-image scores (CSV), the ROC curves and score histograms (matplotlib) and one
HTML page that explains them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, confusion_matrix, f1_score, roc_auc_score, roc_curve

from radscan.ingest import check_outputs_apart, load_images
from radscan.model.engine import load_engine
from radscan.model.metadata import ModelIdentity, films_it_knows, is_exported
from radscan.policy import Policy, for_model
from radscan.qc import DEFAULT_VIEWS, apply_qc, copy_groups, quality_control
from radscan.records import printable
from radscan.report import CsvStream, atomic_output

log = logging.getLogger(__name__)

__all__ = ["evaluate", "metrics_at", "bootstrap_auc", "paired_bootstrap_auc_difference"]

DISCLAIMER = ("radscan scores are for research and triage support only: they order a reading list and are not a "
              "diagnosis")


def metrics_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity, precision, F1 and accuracy when `score >= threshold` is flagged."""
    predicted = scores >= threshold
    tn, fp, fn, tp = confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    return {
        "threshold": float(threshold),
        "sensitivity": float(tp / (tp + fn)) if tp + fn else float("nan"),
        "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
        "precision": float(tp / (tp + fp)) if tp + fp else float("nan"),
        "f1": float(f1_score(labels, predicted, zero_division=0)),
        "accuracy": float((tp + tn) / len(labels)),
        "flagged_normals": float(fp / (tn + fp)) if tn + fp else float("nan"),
        "tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn),
    }


def bootstrap_auc(labels: np.ndarray, scores: np.ndarray, rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the AUC, resampling each class separately."""
    rng = np.random.default_rng(seed)
    normal, abnormal = scores[labels == 0], scores[labels == 1]
    both = np.r_[np.zeros(len(normal)), np.ones(len(abnormal))]
    aucs = [roc_auc_score(both, np.r_[rng.choice(normal, len(normal)), rng.choice(abnormal, len(abnormal))])
            for _ in range(rounds)]
    low, high = np.percentile(aucs, [2.5, 97.5])
    return float(low), float(high)


def paired_bootstrap_auc_difference(labels: np.ndarray, first: np.ndarray, second: np.ndarray, rounds: int = 2000,
                                    seed: int = 0) -> dict[str, float]:
    """AUC(second) - AUC(first) on the same images, with its 95% percentile interval from a paired,
    stratified bootstrap (each replicate resamples normals and abnormals separately and scores the
    same resampled images with both models), and the share of replicates in which `second` is not
    better (a one-sided bootstrap p-value)."""
    rng = np.random.default_rng(seed)
    normal, abnormal = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    differences = np.empty(rounds)
    for index in range(rounds):
        rows = np.r_[rng.choice(normal, len(normal)), rng.choice(abnormal, len(abnormal))]
        differences[index] = roc_auc_score(labels[rows], second[rows]) - roc_auc_score(labels[rows], first[rows])
    low, high = np.percentile(differences, [2.5, 97.5])
    return {"difference": float(roc_auc_score(labels, second) - roc_auc_score(labels, first)),
            "ci95": (float(low), float(high)), "p_not_better": float((differences <= 0).mean())}


def _best_accuracy_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    candidates = np.unique(scores)
    accuracy = [((scores >= t) == labels).mean() for t in candidates]
    return float(candidates[int(np.argmax(accuracy))])


def evaluate(normal: Sequence[str], abnormal: Sequence[str], model_dirs: Sequence[Path], batch_size: int = 64,
             device: str = "auto", workers: int = -1, policy: Policy | None = None, progress: bool = True,
             out_dir: Path | None = None, roc_png: Path | None = None, bootstrap_rounds: int = 2000,
             qc_mode: str = "strict") -> dict[str, Any]:
    """Score the labelled images with every model in `model_dirs` (the images are read once).

    Returns the first model's metrics at the top level (auc, auc_ci95, average_precision,
    at_model_threshold with tp/fp/tn/fn, ...), every model's under "models", and, for each further
    model, "comparisons" against the first (paired bootstrap of the AUC difference), and
    "rejected_by_qc": how many normal and abnormal films quality control set aside (`qc_mode`
    "strict"; "warn" and "off" measure every film) and, under "films", each one's path, label and
    reason; "failed_qc_but_measured": how many films that failed quality control were measured
    (`qc_mode` "warn"); "warnings" (`set_warnings`: copies in both classes, too few films of a class)
    and "files_unreadable" (files that could not be read: the command exits 3; "unreadable_films" lists
    each with its label and reason, as per_image.csv does). Each model's result
    names its "engine" (torch, or onnxruntime for an export)
    and its "label" (name, version, engine, sha256), as the text, the page and comparisons show it. `out_dir`
    receives per_image.csv (path, label, model, model_version, model_sha256, engine, score, flag,
    status, qc, reason: a row per film and model with quality control's verdict (pass, warn, fail;
    empty under "off") and reason, the films set aside with status "rejected by quality control" and
    no score), roc.png, histogram.png and evaluation.html; `roc_png` the
    ROC figure alone. Raises SettingError (exit 2) for an output inside the inputs, ModelError (65)
    for a model that cannot be verified."""
    policy = policy or Policy()
    outputs = [roc_png, out_dir]
    check_outputs_apart([*normal, *abnormal], outputs)  # no figure may overwrite a radiograph
    loaded = [load_engine(Path(model_dir), device) for model_dir in model_dirs]  # verify all before reading
    readings = [for_model(policy, metadata, Path(model_dir))  # how each model reads films (its box)
                for model_dir, (_, metadata) in zip(model_dirs, loaded, strict=True)]
    # one quality control for every model (the first's reference), judged once, on the first reading: the
    # models are measured on the same films (another reading's whole film may differ by a grey level or so:
    # radscan.preprocess.to_qc_input, and a film at a limit must not be kept for one model and not another)
    qc = quality_control(Path(model_dirs[0]), loaded[0][1], qc_mode, DEFAULT_VIEWS)
    set_aside: list[dict[str, str]] = []  # path (as shown), label, reason of each
    # the verdict on each film measured, in the order of the films read (`--qc warn` measures failed films, marked)
    measured: dict[str, list[tuple[str, str]]] = {"normal": [], "abnormal": []}
    kept: dict[str, set[tuple[str, str]]] = {}  # label -> (root, path) of the films the first reading kept

    def judge(label: str):
        def verdicts(records, films) -> list[bool]:
            if label in kept:  # a later reading: the first reading's verdicts
                return [(record.root, record.path) in kept[label] for record in records]
            keep = apply_qc(qc, records, films)
            kept[label] = {(record.root, record.path) for record, ok in zip(records, keep, strict=True) if ok}
            set_aside.extend({"path": printable(os.path.join(record.root, record.path)), "label": label,
                              "reason": record.qc_reason}
                             for record, ok in zip(records, keep, strict=True) if not ok)
            measured[label] = [(record.qc_status, record.qc_reason)
                               for record, ok in zip(records, keep, strict=True) if ok]
            return keep
        return verdicts

    read: dict[Policy, tuple[np.ndarray, list[str], list[str]]] = {}  # the films, once per way of reading
    unreadable: dict[str, list[tuple[str, str]]] = {"normal": [], "abnormal": []}  # (path, reason) by label
    for reading in readings:
        if reading not in read:
            later = bool(read)  # its counts and warnings were said by the first reading
            # paths with their folder: two folders may hold files of one name
            normals, normal_names, _ = load_images(normal, reading, workers, progress, label="normals",
                                                   judge=judge("normal"), with_roots=True, quiet=later,
                                                   unreadable=None if later else unreadable["normal"])
            abnormals, abnormal_names, _ = load_images(abnormal, reading, workers, progress, label="abnormals",
                                                       judge=judge("abnormal"), with_roots=True, quiet=later,
                                                       unreadable=None if later else unreadable["abnormal"])
            read[reading] = np.concatenate([normals, abnormals]), normal_names, abnormal_names
    # cutting a box never makes a file unreadable and the verdicts are the first reading's: every reading
    # has the same films in the same order
    _, normal_names, abnormal_names = next(iter(read.values()))
    if any((n, a) != (normal_names, abnormal_names) for _, n, a in read.values()):
        raise RuntimeError("the models' readings of the films differ: a bug, please report it")
    labels = np.r_[np.zeros(len(normal_names), dtype=int), np.ones(len(abnormal_names), dtype=int)]
    warnings = set_warnings(labels, read[readings[0]][0])
    for warning in warnings:
        log.warning("%s", warning)
    results, all_scores, model_warnings, flag_warnings = [], [], [], []
    for model_dir, (engine, metadata), reading in zip(model_dirs, loaded, readings, strict=True):
        images = read[reading][0]
        scores = np.concatenate([engine.score(images[start:start + batch_size], components=False).scores
                                 for start in range(0, len(images), batch_size)]).astype(np.float64)
        all_scores.append(scores)
        identity, exported = ModelIdentity.of(metadata), is_exported(metadata)
        known, said = _films_it_knows(Path(model_dir), identity, normal_names, abnormal_names)
        model_warnings += filter(None, [said])  # --json says it too (only stderr did: a trial); the page apart
        results.append({
            "model": str(model_dir), **identity.provenance(), "engine": "onnxruntime" if exported else "torch",
            # an export and its torch model share name and version: the engine and sha256 tell them apart
            "label": f"{identity.name} {identity.version} ({'ONNX Runtime export' if exported else 'torch'}, "
                     f"sha256 {identity.sha256[:12]})",
            "normal": len(normal_names),
            "abnormal": len(abnormal_names),
            # films of these sets the model was trained or calibrated on: its figures here are optimistic
            "films_it_knows": known,
            "auc": float(roc_auc_score(labels, scores)), "auc_ci95": bootstrap_auc(labels, scores, bootstrap_rounds),
            "average_precision": float(average_precision_score(labels, scores)),
            "at_model_threshold": metrics_at(labels, scores, float(engine.threshold)),
            "at_best_accuracy_threshold_on_this_set": metrics_at(labels, scores,
                                                                 _best_accuracy_threshold(labels, scores)),
        })
        weak = _weak_flag(results[-1])
        if weak:
            log.warning("%s", weak)
            model_warnings.append(weak)
            flag_warnings.append(weak)  # the page shows it too (the films-it-knows warnings have their own place)
    comparisons = [{"first": results[0]["model"], "second": result["model"],
                    "first_name": results[0]["label"], "second_name": result["label"],
                    **paired_bootstrap_auc_difference(labels, all_scores[0], scores, bootstrap_rounds)}
                   for result, scores in zip(results[1:], all_scores[1:], strict=True)]
    verdicts = measured["normal"] + measured["abnormal"]  # in the order of the films measured
    # what calling every image the larger class scores: beside it, an accuracy says little (a trial
    # read a best accuracy of 0.897 on a set where calling every film abnormal scores 0.889)
    majority = {"majority_class": "abnormal" if labels.mean() > 0.5 else "normal",
                "majority_class_accuracy": float(max(labels.mean(), 1 - labels.mean()))}
    summary = {**results[0], "models": results, "comparisons": comparisons, **majority,
               "rejected_by_qc": {**{label: sum(film["label"] == label for film in set_aside) for label in measured},
                                  "qc": qc_mode, "films": set_aside},
               "failed_qc_but_measured": {label: sum(status == "fail" for status, _ in measured[label])
                                          for label in measured},
               "warnings": [*warnings, *model_warnings], "files_unreadable": sum(map(len, unreadable.values())),
               "unreadable_films": [{"path": printable(path), "label": label, "reason": reason}
                                    for label, films in unreadable.items() for path, reason in films],
               "disclaimer": DISCLAIMER}
    if roc_png is not None:
        _save_figure(_roc_figure(labels, all_scores, results), roc_png)
        summary["roc_png"] = str(roc_png)
    if out_dir is not None:
        summary["outputs"] = _write_report(Path(out_dir), labels, [*normal_names, *abnormal_names], all_scores,
                                           results, comparisons, summary["rejected_by_qc"], verdicts,
                                           [*warnings, *flag_warnings], summary["unreadable_films"], majority)
    return summary


# a model whose stored threshold flags fewer than this share of the abnormal images measured is said
# to flag weakly: its flags miss most of them, while its ranking may still carry what it knows (a
# trial: an adult model of AUC 0.75 flagged 6% of 319 pneumonias at specificity 0.95)
WEAK_FLAG_SENSITIVITY = 0.5


def _weak_flag(result: dict[str, Any]) -> str:
    """The warning for a model whose threshold flags few of the abnormal images measured, or ''."""
    at = result["at_model_threshold"]
    if not at["sensitivity"] < WEAK_FLAG_SENSITIVITY:  # nan (no abnormal image) says nothing either
        return ""
    return (f"at its threshold model {result['label']} flags only {at['tp']} of these {at['tp'] + at['fn']} "
            f"abnormal images ({at['sensitivity']:.1%}; specificity {at['specificity']:.1%}): on such films its flags "
            f"miss most abnormal ones, and the list's order (AUC {result['auc']:.3f}) is what it offers; a lower "
            "--target-specificity in `radscan calibrate` flags more, normal films too")


# fewer films of a class than this, and the AUC's bootstrap interval cannot be read (one abnormal
# film: "1.000 (1.000-1.000)")
MIN_FILMS_PER_CLASS = 10


def set_warnings(labels: np.ndarray, films: np.ndarray) -> list[str]:
    """What makes a labelled set unfit to measure on, in plain words: (N,) labels (0 normal, 1
    abnormal) and (N, 128, 128) uint8 films as read. Films of both classes that are copies of one
    film (the same file given twice, re-encoded, DICOM and JPEG: radscan.qc.copy_groups), and classes
    of fewer than MIN_FILMS_PER_CLASS films, whose AUC interval is degenerate or too wide to read;
    copies within a class, which count twice."""
    warnings = []
    groups = copy_groups(films)
    both = set(groups[labels == 0].tolist()) & set(groups[labels == 1].tolist())
    if both:
        films_in_both = int(np.isin(groups, list(both)).sum())
        warnings.append(f"{films_in_both} films are copies of one another labelled both normal and abnormal (the same "
                        "film given in both classes?): check the labels; the AUC counts them against each other")
    within = sum(int((labels == value).sum()) - len(set(groups[labels == value].tolist())) for value in (0, 1))
    if within:
        warnings.append(f"{within} films are copies of another film of their own class (the same film under "
                        "another name or format): each counts on its own in the AUC and its interval; measure on "
                        "distinct films")
    small = {name: int((labels == value).sum()) for name, value in (("normal", 0), ("abnormal", 1))}
    if min(small.values()) < MIN_FILMS_PER_CLASS:
        warnings.append(f"only {small['normal']} normal and {small['abnormal']} abnormal films: with fewer than "
                        f"{MIN_FILMS_PER_CLASS} of a class the AUC and its 95% interval say little (one abnormal film "
                        "gives an interval of width 0); measure on more films")
    return warnings


def _films_it_knows(model_dir: Path, identity: ModelIdentity, normal_names: list[str],
                    abnormal_names: list[str]) -> tuple[dict[str, int] | None, str]:
    """How many of the films measured the model was trained on ("train") or set its threshold on
    ("calibration"; radscan.model.metadata.films_it_knows: by name), and the warning (logged) when
    any: an AUC on them is optimistic, and the specificity at the threshold is not a measurement on
    new normals. None, with a warning, when the model does not say which films it was made with."""
    known = films_it_knows(model_dir, [*normal_names, *abnormal_names])
    if known is None:
        said = (f"model {identity.name} {identity.version} does not say which films it was trained and calibrated "
                "on (no readable training_split.csv): whether it has seen these films cannot be told")
        log.warning("%s", said)
        return None, said
    counts = {"train": known["train"], "calibration": known["calibration"]}
    said = ""
    if any(counts.values()):
        said = (f"{counts['train']} of the films measured have the names of films model {identity.name} "
                f"{identity.version} was trained on and {counts['calibration']} of its calibration normals: its "
                "figures here are optimistic; measure it on films it has not seen")
        log.warning("%s", said)
    return counts, said


def _write_report(out_dir: Path, labels: np.ndarray, names: list[str], all_scores: list[np.ndarray],
                  results: list[dict[str, Any]], comparisons: list[dict[str, Any]],
                  rejected: dict[str, Any], verdicts: list[tuple[str, str]], warnings: list[str],
                  unreadable: list[dict[str, str]], majority: dict[str, Any]) -> dict[str, str]:
    """per_image.csv, roc.png, histogram.png and evaluation.html in `out_dir` (each atomic)."""
    from radscan.htmlreport import write_evaluation_html

    paths = {name: out_dir / name for name in ("per_image.csv", "roc.png", "histogram.png", "evaluation.html")}
    with CsvStream(paths["per_image.csv"], ("path", "label", "model", "model_version", "model_sha256", "engine",
                                            "score", "flag", "status", "qc", "reason")) as table:
        for scores, result in zip(all_scores, results, strict=True):
            threshold = result["at_model_threshold"]["threshold"]
            model = {key: result[key] for key in ("model_version", "model_sha256", "engine")} | {
                "model": result["model_name"]}  # two versions of one model, or a model and its export, differ
            for name, label, score, (qc, reason) in zip(names, labels, scores, verdicts, strict=True):
                table.write({"path": printable(name), "label": "abnormal" if label else "normal", **model,
                             "score": round(float(score), 6), "flag": bool(score >= threshold), "status": "scored",
                             "qc": qc, "reason": reason})  # under --qc warn, a failed film is measured, marked
            for film in rejected["films"]:  # not measured, and not lost: each with its reason
                table.write({**film, **model, "score": "", "flag": "", "status": "rejected by quality control",
                             "qc": "fail"})
            for film in unreadable:
                table.write({**film, **model, "score": "", "flag": "", "status": "could not be read", "qc": ""})
    _save_figure(_roc_figure(labels, all_scores, results), paths["roc.png"])
    _save_figure(_histogram_figure(labels, all_scores, results), paths["histogram.png"])
    write_evaluation_html(paths["evaluation.html"], results, comparisons, DISCLAIMER, rejected,
                          sum(qc == "fail" for qc, _ in verdicts), warnings, unreadable, majority)
    return {name: str(path) for name, path in paths.items()}


def _roc_figure(labels: np.ndarray, all_scores: list[np.ndarray], results: list[dict[str, Any]]):
    """ROC curve of every model, its operating point at the stored threshold and the sample sizes."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 6.0), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    for scores, result in zip(all_scores, results, strict=True):
        fpr, tpr, _ = roc_curve(labels, scores)
        low, high = result["auc_ci95"]
        line, = axes.plot(fpr, tpr, linewidth=2,
                          label=f"{_figure_name(result, results)}: AUC {result['auc']:.3f} (95% CI "
                                f"{low:.3f}-{high:.3f})")
        at = result["at_model_threshold"]
        axes.plot(1 - at["specificity"], at["sensitivity"], "o", markersize=9, markerfacecolor="none",
                  markeredgewidth=2, color=line.get_color(),
                  label=f"  at its threshold: sensitivity {at['sensitivity']:.2f}, specificity {at['specificity']:.2f}")
    axes.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity (share of normals flagged)",
             ylabel="sensitivity (share of abnormals flagged)",
             title=f"ROC: {results[0]['normal']} normal, {results[0]['abnormal']} abnormal images")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    return figure


def _figure_name(result: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """A model's name in the figures: its name, or its whole label (version, engine, sha256) where
    another model measured shares the name (a model and its recalibrated copy: a trial found two
    panels titled alike)."""
    shared = sum(other["model_name"] == result["model_name"] for other in results) > 1
    return str(result["label"] if shared else result["model_name"])


def _histogram_figure(labels: np.ndarray, all_scores: list[np.ndarray], results: list[dict[str, Any]]):
    """Score histograms of the normal and the abnormal images, per model, with the threshold."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 2.6 * len(results) + 0.6), dpi=100, layout="constrained")
    for index, (scores, result) in enumerate(zip(all_scores, results, strict=True)):
        axes = figure.add_subplot(len(results), 1, index + 1)
        bins = np.linspace(0, 1, 41)
        axes.hist(scores[labels == 0], bins=bins, alpha=0.6, label=f"normal ({int((labels == 0).sum())})")
        axes.hist(scores[labels == 1], bins=bins, alpha=0.6, label=f"abnormal ({int((labels == 1).sum())})")
        threshold = result["at_model_threshold"]["threshold"]
        axes.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3f}")
        axes.set(xlabel="anomaly score (0-1)", ylabel="images", title=_figure_name(result, results))
        axes.legend(fontsize=8, loc="upper left")
    return figure


def _save_figure(figure, path: Path) -> None:
    with atomic_output(Path(path), "wb") as handle:
        figure.savefig(handle, format="png")
