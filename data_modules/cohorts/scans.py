"""Finding scans: walking a BIDS-like tree, or reading a user scan table.

BIDS layout read (README "Data layout"): ``<root>/sub-<ID>/[ses-<S>/]{anat,dwi}/<name>_<suffix>.nii[.gz]`` with suffix
``T1w``, ``T2w``, ``FLAIR`` or ``dwi``/``DWI`` (-> modality ``DWI``). Other suffixes (``_mask``, ``_T2star``, sidecar
JSON) are ignored. Scan table: a CSV or DataFrame with columns ``subject_id`` (or ``id``/``subject``), optional
``session_id`` (or ``session``), ``modality`` and ``path``; relative paths are resolved against the table's folder
(or ``data_root`` for a DataFrame). A per-scan manifest is a valid scan table.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .spec import MODALITIES

INVENTORY_COLUMNS = ("subject", "session", "modality", "path")
_SUFFIX_TO_MODALITY = {"T1w": "T1w", "T2w": "T2w", "FLAIR": "FLAIR", "dwi": "DWI", "DWI": "DWI"}
_DATATYPE_FOLDERS = ("anat", "dwi")


def _strip_nifti_extension(name: str) -> str | None:
    for extension in (".nii.gz", ".nii"):
        if name.endswith(extension):
            return name[: -len(extension)]
    return None


def _modality_of(filename: str) -> str | None:
    stem = _strip_nifti_extension(filename)
    if stem is None:
        return None
    return _SUFFIX_TO_MODALITY.get(stem.rsplit("_", 1)[-1])


def _scan_datatype_folders(folder: str, subject: str, session: str, wanted: set[str], rows: list[tuple]) -> None:
    for datatype in _DATATYPE_FOLDERS:
        datatype_dir = os.path.join(folder, datatype)
        if not os.path.isdir(datatype_dir):
            continue
        with os.scandir(datatype_dir) as entries:
            for entry in entries:
                modality = _modality_of(entry.name)
                if modality in wanted and entry.is_file():
                    rows.append((subject, session, modality, os.path.abspath(entry.path)))


def scan_bids_tree(data_root: str | Path, modalities: tuple[str, ...] = MODALITIES) -> pd.DataFrame:
    """List the scans of ``modalities`` in a BIDS-like tree.

    Args:
        data_root: folder holding ``sub-*`` folders.
        modalities: which modalities to keep.

    Returns:
        DataFrame with :data:`INVENTORY_COLUMNS`: raw ``subject`` / ``session`` labels without the ``sub-`` / ``ses-``
        prefix (``session`` is ``""`` when the tree has no session level), ``modality``, absolute ``path``; sorted.

    Raises:
        FileNotFoundError: ``data_root`` does not exist or holds no ``sub-*`` folder.
    """
    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"data_root {root} does not exist; expected a BIDS-like tree sub-<ID>/[ses-<S>/]anat/.")
    wanted = set(modalities)
    rows: list[tuple] = []
    subjects = 0
    with os.scandir(root) as entries:
        for entry in entries:
            if not (entry.name.startswith("sub-") and entry.is_dir()):
                continue
            subjects += 1
            subject = entry.name[len("sub-") :]
            _scan_datatype_folders(entry.path, subject, "", wanted, rows)
            with os.scandir(entry.path) as sessions:
                for session in sessions:
                    if session.name.startswith("ses-") and session.is_dir():
                        _scan_datatype_folders(session.path, subject, session.name[len("ses-") :], wanted, rows)
    if subjects == 0:
        raise FileNotFoundError(
            f"data_root {root} holds no sub-* folder. Expected sub-<ID>/[ses-<S>/]anat/*_<T1w|T2w|FLAIR>.nii.gz "
            "(or pass scan_table= with subject_id, session_id, modality, path)."
        )
    frame = pd.DataFrame(rows, columns=list(INVENTORY_COLUMNS))
    return frame.sort_values(["subject", "session", "modality", "path"], ignore_index=True)


def _pick_column(frame: pd.DataFrame, names: tuple[str, ...], what: str, source: str, required: bool) -> str | None:
    for name in names:
        if name in frame.columns:
            return name
    if required:
        raise ValueError(
            f"scan table {source}: no {what} column; expected one of {list(names)}, found {list(frame.columns)}."
        )
    return None


def read_scan_table(
    scan_table: str | Path | pd.DataFrame,
    data_root: str | Path | None = None,
    modalities: tuple[str, ...] = MODALITIES,
    check_files: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read a user scan table into the inventory form of :func:`scan_bids_tree`.

    Args:
        scan_table: CSV path or DataFrame (columns in the module docstring).
        data_root: base of relative paths when ``scan_table`` is a DataFrame.
        modalities: which modalities to keep.
        check_files: drop (and return) rows whose file does not exist.

    Returns:
        ``(inventory, missing)``: the inventory (existing files only when ``check_files``) and the rows (same columns)
        whose file does not exist.

    Raises:
        ValueError: a required column is missing, a modality is not one of :data:`MODALITIES`, or a relative path
            cannot be resolved.
    """
    if isinstance(scan_table, pd.DataFrame):
        base = os.path.abspath(data_root) if data_root is not None else None
        frame, source = scan_table.copy(), "<DataFrame>"
    else:
        source = str(scan_table)
        frame = pd.read_csv(scan_table, dtype=str, keep_default_na=False)
        base = str(Path(scan_table).resolve().parent)
    subject_col = _pick_column(frame, ("subject_id", "id", "subject"), "subject", source, required=True)
    session_col = _pick_column(frame, ("session_id", "session"), "session", source, required=False)
    _pick_column(frame, ("modality",), "modality", source, required=True)
    _pick_column(frame, ("path",), "path", source, required=True)
    bad = sorted(set(frame["modality"]) - set(MODALITIES))
    if bad:
        raise ValueError(f"scan table {source}: modalities {bad} are not in {MODALITIES}.")
    frame = frame[frame["modality"].isin(modalities)]

    def resolve(path: str) -> str:
        if os.path.isabs(path):
            return os.path.normpath(path)
        if base is None:
            raise ValueError(
                f"scan table {source}: relative path {path!r} but no data_root to resolve it against; "
                "give absolute paths or pass data_root."
            )
        return os.path.normpath(os.path.join(base, path))

    inventory = pd.DataFrame(
        {
            "subject": frame[subject_col].astype(str).str.strip().str.replace(r"^sub-", "", regex=True),
            "session": (
                frame[session_col].astype(str).str.strip().str.replace(r"^ses-", "", regex=True) if session_col else ""
            ),
            "modality": frame["modality"],
            "path": frame["path"].astype(str).map(resolve),
        }
    )
    missing = inventory.iloc[:0]
    if check_files:
        exists = inventory["path"].map(os.path.isfile)
        missing = inventory[~exists].reset_index(drop=True)
        inventory = inventory[exists]
    inventory = inventory.sort_values(["subject", "session", "modality", "path"], ignore_index=True)
    return inventory, missing
