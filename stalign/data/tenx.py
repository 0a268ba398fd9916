"""10x Genomics Space Ranger files: the feature-barcode HDF5 matrix, tissue positions and scale factors."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from stalign.data.errors import BarcodeError, CoordinateError, DataPrepError, ExpressionError, examples
from stofm.util.errors import InputError

POSITION_COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")


def _strings(ds: Any) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in ds[()]], dtype=object)


def read_10x_h5(path: str | Path, *, var_names: str = "gene_symbols",
                feature_type: str | None = "Gene Expression") -> Any:
    """AnnData (spots x features, float32 counts) from a Cell/Space Ranger ``*_feature_bc_matrix.h5``.

    Reads both the v3+ layout (``matrix/{data,indices,indptr,shape,barcodes}``, ``matrix/features/{id,name,
    feature_type}``) and the v2 layout (one genome group with ``genes``/``gene_names``). ``var_names`` is
    ``"gene_symbols"`` or ``"gene_ids"``; the other one is kept in ``var``. Only features of ``feature_type``
    are kept (None keeps all).
    """
    import anndata as ad
    import h5py
    from scipy import sparse

    path = Path(path)
    if var_names not in ("gene_symbols", "gene_ids"):
        raise InputError(f"var_names must be 'gene_symbols' or 'gene_ids', got {var_names!r}")
    try:
        with h5py.File(path, "r") as f:
            if "matrix" in f:
                grp = f["matrix"]
                ids, names = _strings(grp["features/id"]), _strings(grp["features/name"])
                types = (_strings(grp["features/feature_type"]) if "features/feature_type" in grp
                         else np.full(len(ids), "Gene Expression", dtype=object))
            else:
                groups = [k for k in f if isinstance(f[k], h5py.Group)]
                if len(groups) != 1:
                    raise DataPrepError(f"{path}: not a 10x feature-barcode matrix (no 'matrix' group, "
                                        f"{len(groups)} genome groups)")
                grp = f[groups[0]]
                ids, names = _strings(grp["genes"]), _strings(grp["gene_names"])
                types = np.full(len(ids), "Gene Expression", dtype=object)
            barcodes = _strings(grp["barcodes"])
            n_features, n_barcodes = (int(v) for v in grp["shape"][()])
            csc = sparse.csc_matrix((grp["data"][()], grp["indices"][()], grp["indptr"][()]),
                                    shape=(n_features, n_barcodes))
    except DataPrepError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise ExpressionError(f"{path}: cannot read the 10x feature-barcode matrix: {type(exc).__name__}: "
                              f"{exc}") from exc
    if len(ids) != n_features or len(barcodes) != n_barcodes:
        raise ExpressionError(f"{path}: matrix shape {n_features}x{n_barcodes} does not match "
                              f"{len(ids)} features and {len(barcodes)} barcodes")
    keep = np.ones(n_features, dtype=bool) if feature_type is None else types == feature_type
    if not keep.any():
        raise ExpressionError(f"{path}: no features of type {feature_type!r} (types: {sorted(set(types))})")
    x = csc[keep].T.tocsr().astype(np.float32)
    adata = ad.AnnData(X=x)
    adata.obs_names = list(barcodes)
    adata.var_names = list(names[keep] if var_names == "gene_symbols" else ids[keep])
    adata.var["gene_ids"] = ids[keep]
    adata.var["gene_symbols"] = names[keep]
    adata.var["feature_types"] = types[keep]
    return adata


def find_tissue_positions(spatial: Path) -> Path:
    """``tissue_positions.csv`` (Space Ranger >= 2) or ``tissue_positions_list.csv`` (older) in ``spatial``."""
    for name in ("tissue_positions.csv", "tissue_positions_list.csv"):
        if (spatial / name).is_file():
            return spatial / name
    if (spatial / "tissue_positions.parquet").is_file():
        raise CoordinateError(f"{spatial / 'tissue_positions.parquet'}: parquet positions are a Visium HD bin "
                              "folder; read it with --visium-hd (stalign.data.visium_hd.read_visium_hd)")
    raise CoordinateError(f"{spatial}: no tissue_positions.csv or tissue_positions_list.csv")


def read_tissue_positions(path: Path) -> Any:
    """Positions table indexed by barcode: ``in_tissue`` (bool), full-res pixel ``x``, ``y`` and the spot's
    ``array_row``, ``array_col`` (float; every row of the file, in tissue or not)."""
    import pandas as pd

    with open(path, encoding="utf-8") as fh:
        has_header = fh.readline().split(",")[0].strip().strip('"') == "barcode"
    try:
        table = pd.read_csv(path, header=0 if has_header else None)
    except (ValueError, pd.errors.ParserError) as exc:
        raise CoordinateError(f"{path}: cannot parse the tissue positions: {exc}") from exc
    if table.shape[1] != len(POSITION_COLUMNS):
        raise CoordinateError(f"{path}: expected {len(POSITION_COLUMNS)} columns {POSITION_COLUMNS}, "
                              f"found {table.shape[1]}")
    table.columns = list(POSITION_COLUMNS)
    return positions_frame(table, path)


def positions_frame(table: Any, path: Path) -> Any:
    """A table of the ``POSITION_COLUMNS`` (a CSV's or Visium HD's parquet) as the readers use it: indexed by
    barcode (duplicates refused, naming ``path``), ``in_tissue`` (bool), full-res pixel ``x``, ``y`` and
    ``array_row``, ``array_col`` (float)."""
    import pandas as pd

    barcodes = table["barcode"].astype(str)
    if barcodes.duplicated().any():
        raise BarcodeError(f"{path}: {int(barcodes.duplicated().sum())} duplicated barcodes, e.g. "
                           f"{examples(barcodes[barcodes.duplicated()])}")
    num = {c: pd.to_numeric(table[c], errors="coerce").to_numpy(np.float64) for c in POSITION_COLUMNS[1:]}
    return pd.DataFrame({"in_tissue": num["in_tissue"] == 1, "x": num["pxl_col_in_fullres"],
                         "y": num["pxl_row_in_fullres"], "array_row": num["array_row"],
                         "array_col": num["array_col"]}, index=pd.Index(barcodes, name="barcode"))


def read_scalefactors(path: Path) -> dict[str, float]:
    """``scalefactors_json.json`` as a dict; :class:`DataPrepError` when missing or not JSON."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataPrepError(f"{path}: scale factors file is missing") from None
    except (OSError, ValueError) as exc:
        raise DataPrepError(f"{path}: cannot read the scale factors: {exc}") from exc
    return data
