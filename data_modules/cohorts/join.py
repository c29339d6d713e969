"""Joining published split IDs to scan paths: :func:`build_cohort_manifest`.

Order of operations (each step's losses land in the report, never silently):

1. read the three split files (:mod:`.split_files`), renaming label aliases;
2. leakage: a subject in two splits is an error (:class:`CohortLeakageError`) unless ``allow_leakage=True``; then its
   rows stay in the earliest split (train < val < test) and are removed from the later ones;
3. duplicates: a row repeating an earlier (subject, scan IDs) of the same split is collapsed (``duplicates="keep"``
   keeps it);
4. join every remaining row to scans, per modality:

   * scan-level specs (the file names each scan): the scan of ``(subject, modality)`` in the session whose label
     matches the row's scan ID under the cohort's key rule;
   * subject-level specs (one row per participant or per visit, no scan ID: ADHD-200, CNP, ICSPR, NACC, OpenBHB,
     PPMI tte, SOOP, UCSF-PDGM): the subject's sessions holding every needed modality, in natural sort order, are
     given to the subject's rows in file order (k-th row -> k-th session). Subjects whose rows carry different labels
     are listed as ambiguous, because the files cannot confirm which visit each label belongs to;
   * several files of one modality in one session: the first by name is used, the others are reported unused;
5. rows whose task label (or survival time/event) is missing, or whose survival time is not > 0, are dropped
   (``drop_missing_labels=False`` keeps them);
6. every scan of the requested modalities that no manifest row uses is listed with the reason.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from neurojepa_pl.data import PATH_COLUMNS

from .registry import get_cohort_spec
from .report import DROPPED_COLUMNS, UNUSED_COLUMNS, CohortLeakageError, CohortReport
from .scans import read_scan_table, scan_bids_tree
from .spec import SPLITS, CohortSpec, normalise_id
from .split_files import PATH_PREFIX, SCAN_ID_PREFIX, SCAN_KEY_PREFIX, default_split_dir, read_split_files

NO_SESSION = "nosession"
"""``session_id`` written for scans of a BIDS tree without a session level (the manifest needs a non-empty value)."""

_EXTRA_FILE = "another file of this modality in the same session; the first by name is used"
_SPLIT_ORDER = {split: index for index, split in enumerate(SPLITS)}
_DIGITS = re.compile(r"(\d+)")
_SESSION_IN_PATH = re.compile(r"(?:^|[/\\_])ses-([0-9A-Za-z]+)")


def _plain(value):
    if pd.isna(value):
        return None
    return value.item() if hasattr(value, "item") else value


def _natural_key(text: str) -> tuple:
    # "ses-2" before "ses-10": sessions are given to visit rows in this order.
    return tuple(int(part) if part.isdigit() else part for part in _DIGITS.split(text))


def _map_unique(values: pd.Series, function) -> pd.Series:
    # The key rules are regex-based: evaluate them once per distinct value (cohorts repeat IDs a lot).
    distinct = values.unique()
    return values.map(dict(zip(distinct, (function(v) for v in distinct))))


def find_leakage(table: pd.DataFrame) -> dict[str, list[str]]:
    """Subjects present in two splits of a split table.

    Args:
        table: output of :func:`read_split_files` (``split``, ``subject_key``, ``subject_id``).

    Returns:
        ``{"train&val": [raw IDs], ...}`` for the pairs that share subjects (empty dict when splits are disjoint).
    """
    keys = {split: table.loc[table["split"] == split].drop_duplicates("subject_key") for split in SPLITS}
    leakage: dict[str, list[str]] = {}
    for i, first in enumerate(SPLITS):
        for second in SPLITS[i + 1 :]:
            shared = keys[first].merge(keys[second][["subject_key"]], on="subject_key")
            if len(shared):
                leakage[f"{first}&{second}"] = sorted(shared["subject_id"].tolist())
    return leakage


def _dropped_records(rows: pd.DataFrame, spec: CohortSpec, category: str, reasons) -> pd.DataFrame:
    if len(rows) == 0:
        return pd.DataFrame(columns=list(DROPPED_COLUMNS))
    scan_ids = [SCAN_ID_PREFIX + m for m in spec.scan_columns]
    scan_id = rows[scan_ids].astype(str).agg("+".join, axis=1) if scan_ids else pd.Series("", index=rows.index)
    return pd.DataFrame(
        {
            "split": rows["split"],
            "subject_id": rows["subject_id"],
            "scan_id": scan_id,
            "source_file": _map_unique(rows["source_file"], lambda p: Path(p).name),
            "source_row": rows["source_row"],
            "category": category,
            "reason": reasons,
        }
    )[list(DROPPED_COLUMNS)]


def _remove_leakage(table: pd.DataFrame, spec: CohortSpec) -> tuple[pd.DataFrame, pd.DataFrame]:
    order = table["split"].map(_SPLIT_ORDER)
    first = order.groupby(table["subject_key"]).transform("min")
    later = order > first
    reasons = [
        f"subject also in {SPLITS[f]} (the published splits leak it); kept in {SPLITS[f]}, removed here"
        for f in first[later]
    ]
    return table[~later], _dropped_records(table[later], spec, "leakage", reasons)


def _collapse_duplicates(table: pd.DataFrame, spec: CohortSpec, keep: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    keys = ["split", "subject_key", *(SCAN_KEY_PREFIX + m for m in spec.scan_columns)]
    keys += [PATH_PREFIX + m for m in spec.path_columns]
    repeated = table.duplicated(subset=keys, keep="first")
    if keep or not repeated.any():
        return table, pd.DataFrame(columns=list(DROPPED_COLUMNS))
    first_line = table.groupby(keys, sort=False)["source_row"].transform("first")
    label_columns = [label.column for label in spec.labels]
    first_labels = table.groupby(keys, sort=False)[label_columns].transform("first")
    same = (table[label_columns] == first_labels) | (table[label_columns].isna() & first_labels.isna())
    conflicting = ~same.all(axis=1)
    reasons = [
        f"repeats line {line} of the same file"
        + (" with DIFFERENT labels (the first row's labels are kept)" if differs else "")
        for line, differs in zip(first_line[repeated], conflicting[repeated])
    ]
    return table[~repeated], _dropped_records(table[repeated], spec, "duplicate", reasons)


def _inventory(
    spec: CohortSpec, data_root: str | Path | None, scan_table, check_files: bool
) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    if spec.join_level == "path":
        empty = pd.DataFrame(columns=["subject", "session", "modality", "path", "subject_key", "session_key"])
        return empty, None, "paths in the split files" + (f" (relative to {data_root})" if data_root else "")
    if scan_table is not None:
        inventory, missing = read_scan_table(scan_table, data_root, spec.modalities, check_files)
        source = "scan table " + (str(scan_table) if not isinstance(scan_table, pd.DataFrame) else "<DataFrame>")
    elif data_root is not None:
        inventory, missing = scan_bids_tree(data_root, spec.modalities), None
        source = f"BIDS tree {Path(data_root).resolve()}"
    else:
        raise ValueError(
            f"{spec.key}: give data_root (a BIDS-like tree) or scan_table (subject_id, [session_id,] modality, path)."
        )
    frames = []
    for frame in (inventory, missing):
        if frame is None:
            frames.append(None)
            continue
        frame = frame.copy()
        frame["subject_key"] = _map_unique(frame["subject"], normalise_id)
        frame["session_key"] = _map_unique(frame["session"], lambda s: spec.scan_key(s) if s else "")
        frames.append(frame)
    return frames[0], frames[1], source


def _first_per_key(scans: pd.DataFrame, keys: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """First scan (by path) per key, and the others (reported as unused)."""
    ordered = scans.sort_values([*keys, "path"], kind="stable")
    extra = ordered.duplicated(subset=keys, keep="first")
    return ordered[~extra], ordered[extra]


def _join_scan_level(table, inventory, missing, spec):
    """Per modality: path + session of the row's scan, or the reason it was not found.

    Returns:
        ``(found, reasons, unused)``: modality -> frame (``path``, ``session``; NaN path when not found) indexed like
        ``table``; modality -> reason per lost row; frames of scans that are reported unused.
    """
    found: dict[str, pd.DataFrame] = {}
    reasons: dict[str, pd.Series] = {}
    unused_extra = []
    for modality in spec.modalities:
        scans = inventory[inventory["modality"] == modality]
        chosen, extra = _first_per_key(scans, ["subject_key", "session_key"])
        unused_extra.append(extra.assign(reason=_EXTRA_FILE))
        key_column = SCAN_KEY_PREFIX + modality
        left = table[["subject_key", key_column]].reset_index().rename(columns={key_column: "session_key"})
        candidates = chosen[["subject_key", "session_key", "path", "session"]]
        merged = left.merge(candidates, how="left", on=["subject_key", "session_key"]).set_index("index")
        merged = merged.reindex(table.index)
        found[modality] = merged[["path", "session"]]
        lost = merged["path"].isna()
        lost_subjects = set(table.loc[lost, "subject_key"])
        near = scans[scans["subject_key"].isin(lost_subjects)]
        subject_sessions = near.groupby("subject_key")["session"].agg(lambda s: sorted(set(s))[:5])
        missing_paths = (
            missing[missing["modality"] == modality].set_index(["subject_key", "session_key"])["path"].to_dict()
            if missing is not None
            else {}
        )
        texts = []
        for index in table.index[lost]:
            subject, scan_id = table.at[index, "subject_id"], table.at[index, SCAN_ID_PREFIX + modality]
            key = (table.at[index, "subject_key"], table.at[index, key_column])
            if key in missing_paths:
                texts.append(f"{modality}: the scan table lists {missing_paths[key]} but the file does not exist")
            elif key[0] in subject_sessions.index:
                texts.append(
                    f"{modality}: subject {subject!r} has no {modality} scan in a session matching scan ID {scan_id!r} "
                    f"(sessions with {modality}: {subject_sessions[key[0]]})"
                )
            else:
                texts.append(f"{modality}: no {modality} scan of subject {subject!r} (scan ID {scan_id!r})")
        reasons[modality] = pd.Series(texts, index=table.index[lost], dtype=object)
    return found, reasons, unused_extra


def _join_path_level(table: pd.DataFrame, spec: CohortSpec, data_root, check_files: bool):
    """Per modality: the path written in the split file (resolved against data_root or the file's folder)."""
    found: dict[str, pd.DataFrame] = {}
    reasons: dict[str, pd.Series] = {}
    for modality, column in spec.path_columns.items():
        raw = table[PATH_PREFIX + modality]
        bases = (
            table["source_file"].map(os.path.dirname)
            if data_root is None
            else pd.Series(os.path.abspath(data_root), index=table.index)
        )
        resolved = pd.Series(
            [
                None if pd.isna(p) or p == "" else os.path.normpath(p if os.path.isabs(p) else os.path.join(b, p))
                for p, b in zip(raw, bases)
            ],
            index=table.index,
            dtype=object,
        )
        exists = resolved.map(lambda p: p is not None and (not check_files or os.path.isfile(p)))
        sessions = resolved.map(lambda p: m.group(1) if p and (m := _SESSION_IN_PATH.search(p)) else "")
        found[modality] = pd.DataFrame({"path": resolved.where(exists), "session": sessions})
        texts = [
            f"{modality}: column {column!r} is empty" if p is None else f"{modality}: file {p} does not exist"
            for p in resolved[~exists]
        ]
        reasons[modality] = pd.Series(texts, index=table.index[~exists], dtype=object)
    return found, reasons, []


def _complete_sessions(inventory: pd.DataFrame, spec: CohortSpec, require_all: bool):
    """One row per (subject, session) with the first path of each modality; sessions lacking modalities are unused."""
    chosen, extra = _first_per_key(inventory, ["subject_key", "session", "modality"])
    unused = [extra.assign(reason=_EXTRA_FILE)]
    wide = chosen.set_index(["subject_key", "session", "modality"])["path"].unstack("modality")
    wide = wide.reindex(columns=list(spec.modalities))
    complete = wide.notna().all(axis=1) if require_all else wide.notna().any(axis=1)
    if (~complete).any():
        lacking = wide[~complete].isna().apply(lambda r: str([m for m in spec.modalities if r[m]]), axis=1)
        lacking = lacking.rename("lacking").reset_index()
        incomplete = chosen.merge(lacking, on=["subject_key", "session"])
        lacking_text = "session lacks " + incomplete["lacking"] + f" needed for {spec.modality}"
        unused.append(incomplete.assign(reason=lacking_text))
    sessions = wide[complete].reset_index()
    sessions.columns.name = None
    sessions["_order"] = sessions["session"].map(_natural_key)
    sessions = sessions.sort_values(["subject_key", "_order"], kind="stable").drop(columns="_order")
    sessions["rank"] = sessions.groupby("subject_key").cumcount()
    return sessions, unused


def _join_subject_level(table, inventory, spec, require_all):
    sessions, unused = _complete_sessions(inventory, spec, require_all)
    left = table[["subject_key"]].copy()
    left["rank"] = table.groupby("subject_key").cumcount()
    merged = left.reset_index().merge(sessions, how="left", on=["subject_key", "rank"]).set_index("index")
    merged = merged.reindex(table.index)
    found = {m: merged[[m, "session"]].rename(columns={m: "path"}) for m in spec.modalities}
    n_sessions = sessions.groupby("subject_key").size()
    n_rows = left.groupby("subject_key").size()
    lost = merged["session"].isna()
    texts = []
    for index in table.index[lost]:
        key, subject = table.at[index, "subject_key"], table.at[index, "subject_id"]
        have = int(n_sessions.get(key, 0))
        if have == 0:
            texts.append(f"no session of subject {subject!r} holds {spec.modality}")
        else:
            texts.append(
                f"subject {subject!r} has {have} session(s) with {spec.modality} but {int(n_rows[key])} split rows; "
                f"rows take sessions in order and this is row {int(left.at[index, 'rank']) + 1}"
            )
    reasons = {"all": pd.Series(texts, index=table.index[lost], dtype=object)}
    return found, reasons, unused


def _ambiguous_subjects(table: pd.DataFrame, spec: CohortSpec) -> list[dict]:
    columns = list(spec.task_labels)
    multi = table[table.duplicated("subject_key", keep=False)]
    out = []
    for subject, group in multi.groupby("subject_id", sort=True):
        distinct = group[columns].drop_duplicates()
        if len(distinct) > 1:
            out.append(
                {
                    "subject_id": subject,
                    "rows": len(group),
                    "labels": {column: [_plain(v) for v in group[column]] for column in columns},
                }
            )
    return out


def _label_problems(rows: pd.DataFrame, spec: CohortSpec) -> pd.Series:
    """Reason per row whose task labels are unusable (missing, or survival time <= 0); absent rows are fine."""
    columns = list(spec.task_labels)
    texts = pd.Series(index=rows.index, dtype=object)
    for column in columns:
        missing = rows[column].isna() & texts.isna()
        texts[missing] = f"missing label {column!r}"
    if spec.time_column:
        bad_time = rows[spec.time_column].notna() & (rows[spec.time_column] <= 0) & texts.isna()
        times = rows.loc[bad_time, spec.time_column]
        texts[bad_time] = [f"survival time {spec.time_column}={t!r} is not > 0" for t in times]
    return texts.dropna()


def _assemble(rows: pd.DataFrame, found: dict[str, pd.DataFrame], spec: CohortSpec) -> pd.DataFrame:
    label_columns = [label.column for label in spec.labels]
    extra_columns = (["site"] if spec.site_column else []) + list(spec.extra_columns)
    out = pd.DataFrame({"subject_id": rows["subject_id"]}, index=rows.index)
    sessions = pd.DataFrame({m: found[m].loc[rows.index, "session"] for m in spec.modalities})
    scan_ids = {m: rows[SCAN_ID_PREFIX + m] for m in spec.scan_columns}

    def session_of(modality: str) -> pd.Series:
        session = sessions[modality].fillna("")
        if modality in scan_ids:
            session = session.where(session != "", scan_ids[modality])
        return session.where(session != "", NO_SESSION)

    if not spec.is_multimodal:
        modality = spec.modality
        out["session_id"] = session_of(modality)
        out["modality"] = modality
        out["path"] = found[modality].loc[rows.index, "path"]
    else:
        per_modality = pd.DataFrame({m: session_of(m) for m in spec.modalities})
        anchor = per_modality[spec.modalities[0]]
        shared = per_modality.eq(anchor, axis=0).all(axis=1)
        joined = per_modality[spec.modalities[0]].str.cat([per_modality[m] for m in spec.modalities[1:]], sep="+")
        out["session_id"] = anchor.where(shared, joined)
        for modality in ("T1w", "T2w", "FLAIR", *(["DWI"] if "DWI" in spec.modalities else [])):
            column = PATH_COLUMNS[modality]
            out[column] = found[modality].loc[rows.index, "path"].fillna("") if modality in found else ""
        for modality in ("T1w", "T2w", "FLAIR", *(["DWI"] if "DWI" in spec.modalities else [])):
            out[f"{modality.lower()}_valid"] = out[PATH_COLUMNS[modality]] != ""
    out["split"] = rows["split"]
    for column in label_columns + extra_columns:
        out[column] = rows[column]
    for modality in spec.scan_columns:
        name = "scan_id" if not spec.is_multimodal else f"{modality.lower()}_scan_id"
        out[name] = rows[SCAN_ID_PREFIX + modality]
    out["source_file"] = _map_unique(rows["source_file"], lambda p: Path(p).name)
    out["source_row"] = rows["source_row"]
    return out.reset_index(drop=True)


def build_cohort_manifest(
    cohort: str | CohortSpec,
    task: str | None = None,
    modality: str | None = None,
    data_root: str | Path | None = None,
    split_dir: str | Path | None = None,
    scan_table: str | Path | pd.DataFrame | None = None,
    *,
    allow_leakage: bool = False,
    check_files: bool = True,
    duplicates: str = "collapse",
    drop_missing_labels: bool = True,
    require_all_modalities: bool = True,
) -> tuple[pd.DataFrame, CohortReport]:
    """Join the published split IDs of one cohort/task/modality to scan paths.

    Args:
        cohort: registered cohort name (``"ADNI"``) or a :class:`CohortSpec` (e.g. from :class:`GenericCohort`).
        task: task name (ignored when ``cohort`` is a spec).
        modality: ``"T1w"`` ... or a pair ``"T1w+FLAIR"`` (ignored when ``cohort`` is a spec).
        data_root: BIDS-like tree ``sub-<ID>/[ses-<S>/]{anat,dwi}/*_<suffix>.nii[.gz]``; also the base of relative
            paths of a DataFrame ``scan_table``.
        split_dir: folder with the published ``unimodal/`` and ``multimodal/`` split CSVs (default
            :func:`default_split_dir`).
        scan_table: instead of walking ``data_root``: CSV/DataFrame with ``subject_id``, optional ``session_id``,
            ``modality``, ``path``.
        allow_leakage: keep going when the published files put a subject in two splits (its rows are removed from
            the later split and reported); otherwise raise :class:`CohortLeakageError`.
        check_files: drop scan-table rows whose file does not exist (their split rows are reported as ``no_scan``).
        duplicates: ``"collapse"`` (default) or ``"keep"`` rows repeating an earlier (subject, scan) of the same file.
        drop_missing_labels: drop rows whose task label / survival time or event is missing or whose time is <= 0.
        require_all_modalities: multimodal rows need every modality (paper protocol); ``False`` keeps rows with at
            least one modality, with empty paths and ``<mod>_valid`` False for the rest.

    Returns:
        ``(manifest, report)``. Unimodal specs give the per-scan form (``subject_id, session_id, modality, path,
        split``, all label columns of the file, ``site``/extra columns, ``scan_id``, ``source_file``,
        ``source_row``); multimodal specs give the paired form of :func:`neurojepa_pl.data.pair_modalities`
        (``t1w_path, t2w_path, flair_path`` + ``<mod>_valid``, ``<mod>_scan_id``). Paths are absolute.

    Raises:
        CohortLeakageError: subjects in two splits and ``allow_leakage`` is False (``error.report`` has the details).
        ValueError / FileNotFoundError / KeyError: unknown cohort, missing split files or columns, bad labels,
            no data source.
    """
    if duplicates not in ("collapse", "keep"):
        raise ValueError(f"duplicates must be 'collapse' or 'keep', found {duplicates!r}.")
    spec = cohort if isinstance(cohort, CohortSpec) else get_cohort_spec(cohort, task, modality)
    split_root = Path(split_dir) if split_dir is not None else default_split_dir()
    table, paths, notes = read_split_files(spec, split_root)
    report = CohortReport(
        cohort=spec.cohort,
        task=spec.task,
        modality=spec.modality,
        split_files={split: str(path) for split, path in paths.items()},
        rows_in_split_files={split: int((table["split"] == split).sum()) for split in SPLITS},
        column_notes=notes,
    )
    dropped: list[pd.DataFrame] = []

    report.leakage = find_leakage(table)
    if report.leakage:
        if not allow_leakage:
            report.leakage_action = "error"
            pairs = ", ".join(f"{pair}: {ids[:5]}" for pair, ids in report.leakage.items())
            raise CohortLeakageError(
                f"{spec.key}: the published split files put {len(report.leaked_subjects)} subject(s) in two splits "
                f"({pairs}). Pass allow_leakage=True to keep each such subject in its earliest split only "
                "(its rows are removed from the later split and listed in the report).",
                report,
            )
        report.leakage_action = "removed from the later split"
        table, lost = _remove_leakage(table, spec)
        dropped.append(lost)
    if spec.join_level != "subject":
        keep = duplicates == "keep"
        if keep:
            keys = ["split", "subject_key", *(SCAN_KEY_PREFIX + m for m in spec.scan_columns)]
            repeated = int(table.duplicated(subset=keys + [PATH_PREFIX + m for m in spec.path_columns]).sum())
            if repeated:
                report.column_notes.append(
                    f"{repeated} rows repeat an earlier (subject, scan) row of the same file; kept (duplicates='keep')"
                )
        table, lost = _collapse_duplicates(table, spec, keep=keep)
        dropped.append(lost)

    inventory, missing, report.data_source = _inventory(spec, data_root, scan_table, check_files)
    if missing is not None:
        report.missing_files = missing["path"].tolist()
    if spec.join_level == "subject":
        report.ambiguous_subjects = _ambiguous_subjects(table, spec)
    found, kept, lost, unused = _join(table, inventory, missing, spec, data_root, check_files, require_all_modalities)
    dropped.append(lost)
    if drop_missing_labels and spec.task_type != "multilabel":
        kept, lost = _drop_unusable_labels(kept, spec)
        dropped.append(lost)

    manifest = _assemble(kept, found, spec)
    report.manifest_rows = {split: int((manifest["split"] == split).sum()) for split in SPLITS}
    report.manifest_subjects = {
        split: int(manifest.loc[manifest["split"] == split, "subject_id"].nunique()) for split in SPLITS
    }
    non_empty = [frame for frame in dropped if len(frame)]
    report.dropped = (
        pd.concat(non_empty, ignore_index=True) if non_empty else pd.DataFrame(columns=list(DROPPED_COLUMNS))
    )
    report.unused_scans = _unused_scans(inventory, manifest, table, report.dropped, unused, spec)
    return manifest, report


def _join(table, inventory, missing, spec, data_root, check_files, require_all):
    """Join every row; returns ``(found, kept rows, dropped no_scan records, unused-scan frames)``."""
    if spec.join_level == "subject":
        found, reasons, unused = _join_subject_level(table, inventory, spec, require_all)
        lost_text = reasons["all"]
        lost_mask = table.index.isin(lost_text.index)
    else:
        if spec.join_level == "scan":
            found, reasons, unused = _join_scan_level(table, inventory, missing, spec)
        else:
            found, reasons, unused = _join_path_level(table, spec, data_root, check_files)
        lost_by_modality = pd.DataFrame(reasons, index=table.index, dtype=object)
        lost_by_modality = lost_by_modality.reindex(table.index)
        lost_mask = (lost_by_modality.notna().any if require_all else lost_by_modality.notna().all)(axis=1)
        lost_text = lost_by_modality[lost_mask].apply(lambda r: "; ".join(t for t in r if isinstance(t, str)), axis=1)
        lost_mask = lost_mask.to_numpy()
    reasons_list = lost_text.reindex(table.index[lost_mask]).tolist()
    return found, table[~lost_mask], _dropped_records(table[lost_mask], spec, "no_scan", reasons_list), unused


def _drop_unusable_labels(kept: pd.DataFrame, spec: CohortSpec) -> tuple[pd.DataFrame, pd.DataFrame]:
    problems = _label_problems(kept, spec)
    if not len(problems):
        return kept, pd.DataFrame(columns=list(DROPPED_COLUMNS))
    is_time = problems.str.startswith("survival time")
    records = pd.concat(
        [
            _dropped_records(kept.loc[problems.index[~is_time]], spec, "missing_label", problems[~is_time].tolist()),
            _dropped_records(kept.loc[problems.index[is_time]], spec, "nonpositive_time", problems[is_time].tolist()),
        ],
        ignore_index=True,
    )
    return kept.drop(index=problems.index), records


def _unused_scans(inventory, manifest, table, dropped, extra_frames, spec) -> pd.DataFrame:
    path_columns = ["path"] if not spec.is_multimodal else [PATH_COLUMNS[m] for m in spec.modalities]
    used = set(np.concatenate([manifest[c].to_numpy(dtype=object) for c in path_columns])) if len(manifest) else set()
    reasons = {}
    for frame in extra_frames:
        for path, reason in zip(frame["path"], frame["reason"]):
            reasons.setdefault(path, reason)
    known_subjects = set(table["subject_key"])
    dropped_subjects = set(dropped["subject_id"].map(normalise_id)) if len(dropped) else set()
    rows = inventory[~inventory["path"].isin(used)]
    texts = []
    for subject_key, path in zip(rows["subject_key"], rows["path"]):
        if path in reasons:
            texts.append(reasons[path])
        elif subject_key not in known_subjects:
            texts.append("subject not in the split files")
        elif subject_key in dropped_subjects:
            texts.append("a split row of this subject was dropped (see the dropped rows)")
        elif spec.join_level == "subject":
            texts.append("the subject has more sessions than split rows")
        else:
            texts.append("the subject is in the split files but this session is not")
    out = pd.DataFrame(
        {
            "subject": rows["subject"],
            "session": rows["session"],
            "modality": rows["modality"],
            "path": rows["path"],
            "reason": texts,
        }
    )
    return out[list(UNUSED_COLUMNS)].reset_index(drop=True)
