"""The original SToFM architecture + objective vs the project's variant, same data, same steps, several seeds.

    python benchmarks/stofm_arch_compare.py --steps 300 --seeds 0 1 2 --threads 1

Data: synthetic slides with spatial domains (Voronoi regions of random centres); each domain mixes shared cell types
in its own proportions, so a cell's own expression says little about its domain and its neighbourhood says more.
Two slides pretrain, a third is held out. Per variant and seed: ``stofm pretrain`` for ``--steps`` steps (same
batch size, learning rate, sub-slice size, k-means virtual cells), then on the held-out slide: the MCM loss
(mean 1 - cos of the predicted masked-cell embedding, each variant with its own masking), the PDR R² (1 - MSE /
variance of the targets: scale free, since the two objectives measure distances in different units), a linear
probe of the domain (logistic regression on the two training slides' SE(2) cell embeddings, accuracy on the held-out
slide; the frozen cell encoder's own embeddings as the baseline) and the embedding throughput (cells/s,
``stofm.embed`` of a larger synthetic slide with the trained model, each model config's sub-slice size: 1,000).
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import load_average, parser, record, setup, table  # noqa: E402

VARIANTS = {  # name -> (model config, objective, model overrides)
    "original (stofm-original-tiny, original MCM/PDR)": ("stofm-original-tiny", "original", {}),
    "project (stofm-tiny SE(2), project MCM/PDR)": ("stofm-tiny", "project", {}),
}


def domain_slide(n_cells: int, n_genes: int, *, seed: int, n_domains: int = 4, n_types: int = 6):
    """AnnData (counts, obsm['spatial'] in µm, obs['domain']); the biology (type profiles, domain mixes) is shared by
    all slides, the layout (domain centres, positions) is the slide's own."""
    import anndata as ad
    import numpy as np

    bio = np.random.default_rng(12345)
    profiles = bio.gamma(0.4, 2.0, size=(n_types, n_genes))
    mixes = bio.dirichlet(np.full(n_types, 0.6), size=n_domains)
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 2000, size=(n_cells, 2))
    centres = rng.uniform(0, 2000, size=(n_domains, 2))
    domain = np.argmin(((xy[:, None] - centres[None]) ** 2).sum(-1), 1)
    types = np.array([rng.choice(n_types, p=mixes[d]) for d in domain])
    size = rng.lognormal(0.0, 0.3, size=(n_cells, 1))
    X = rng.poisson(profiles[types] * size).astype(np.float32)
    a = ad.AnnData(X=X, obsm={"spatial": xy})
    a.var_names = [f"gene{i}" for i in range(n_genes)]
    a.obs["domain"] = domain.astype(str)
    return a


def heldout_losses(model: Any, slide: Any, objective: str, *, batch_size: int = 4) -> dict[str, float]:
    """MCM 1 - cos and PDR R² on every sub-slice of a prepared held-out slide (fixed draws)."""
    import torch
    import torch.nn.functional as F

    cos, pred, target = [], [], []
    model.eval()
    with torch.no_grad():
        if objective == "original":
            from stofm.objectives_original import masked_batch, mlm_outputs, tile_subslices

            subs = tile_subslices(slide)
            for i in range(0, len(subs), batch_size):
                batch = masked_batch(subs[i:i + batch_size], seed=10_000 + i)
                out = mlm_outputs(model, batch)
                rows = (batch["labels"] != -100).any(-1)
                cos.append(F.cosine_similarity(out["logits"], batch["labels"][rows], dim=-1))
                pred.append(out["pair_pred"])
                target.append(batch["pair_labels"][batch["pair_labels"] != -100])
        else:
            from stofm.embedding import collate_subslices
            from stofm.objectives import mean_nn_spacing

            items = [(slide, t) for t in slide.tiles]
            for i in range(0, len(items), batch_size):
                batch = collate_subslices(items[i:i + batch_size])
                out = model.pretrain_forward(batch, generator=torch.Generator().manual_seed(10_000 + i))
                cos.append(F.cosine_similarity(out["cell_pred"], batch["cell_emb"], dim=-1)[out["mcm_target"]])
                c, pad = batch["coords"], batch["pad_mask"]
                d = torch.cdist(c, c) / mean_nn_spacing(c, pad).clamp_min(1e-6)[:, None, None]
                real = ~pad
                eye = torch.eye(c.shape[1], dtype=torch.bool)
                pairs = ((out["perturbed"][:, :, None] | out["perturbed"][:, None, :]) & out["cell_graph"]
                         & real[:, :, None] & real[:, None, :] & ~eye)
                pred.append(out["dist_pred"][pairs])
                target.append(d[pairs])
    p, t = torch.cat(pred).double(), torch.cat(target).double()
    return {"mcm": float(1 - torch.cat(cos).mean()), "pdr_r2": float(1 - ((p - t) ** 2).mean() / t.var())}


def probe(model: Any, slides: list, *, n_virtual: int, cells_per_tile: int) -> tuple[float, float]:
    """(SE(2) accuracy, cell-encoder accuracy) of a logistic-regression domain probe: fit on all but the last
    slide, scored on the last."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from stofm.embedding import embed

    feats = {"se2": [], "cell": []}
    for a in slides:
        b = a.copy()
        embed(b, model, progress=False, key_cells="X_cells", cluster_method="kmeans", n_virtual=n_virtual,
              cells_per_tile=cells_per_tile)
        feats["se2"].append(b.obsm["X_stofm"])
        feats["cell"].append(b.obsm["X_cells"])
    y = [np.asarray(a.obs["domain"]) for a in slides]
    acc = []
    for key in ("se2", "cell"):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        clf.fit(np.concatenate(feats[key][:-1]), np.concatenate(y[:-1]))
        acc.append(float((clf.predict(feats[key][-1]) == y[-1]).mean()))
    return acc[0], acc[1]


def throughput(model: Any, adata: Any, *, n_virtual: int) -> float:
    from stofm.embedding import embed

    embed(adata[:500].copy(), model, progress=False, cluster_method="kmeans", n_virtual=n_virtual)  # warm-up
    t0 = time.perf_counter()
    embed(adata, model, progress=False, cluster_method="kmeans", n_virtual=n_virtual)
    return adata.n_obs / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cells", type=int, default=1200, help="cells per synthetic slide")
    p.add_argument("--genes", type=int, default=100)
    p.add_argument("--cells-per-tile", type=int, default=100)
    p.add_argument("--virtual", type=int, default=8, help="k-means virtual cells per slide (both variants)")
    p.add_argument("--throughput-cells", type=int, default=20_000)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.cells, args.throughput_cells = 3, [0], 300, 1000
    device = setup(args)
    load_before = load_average()

    from stofm.model import create_model
    from stofm.pretrain import load_config, pretrain

    slides = [domain_slide(args.cells, args.genes, seed=s) for s in (1, 2, 3)]
    big = domain_slide(args.throughput_cells, args.genes, seed=4)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, a in enumerate(slides[:2]):
            paths.append(str(Path(tmp) / f"slide{i}.h5ad"))
            a.write_h5ad(paths[-1])
        for name, (model_name, objective, overrides) in VARIANTS.items():
            for seed in args.seeds:
                cfg = load_config(None, data=paths, output_dir=str(Path(tmp) / f"{model_name}_{seed}"),
                                  model=model_name, objective=objective, model_overrides=overrides, seed=seed,
                                  max_steps=args.steps, batch_size=4, lr=1e-3, warmup_steps=max(1, args.steps // 10),
                                  cells_per_tile=args.cells_per_tile, n_virtual=args.virtual, cluster_method="kmeans",
                                  save_every=0, log_every=max(1, args.steps), progress=False, cpu=device.type == "cpu")
                t0 = time.perf_counter()
                res = pretrain(cfg)
                seconds = time.perf_counter() - t0
                model = create_model(res["model"], device=device)
                from stofm.embedding import prepare_slide

                held = prepare_slide(slides[2], model, cells_per_tile=args.cells_per_tile, n_virtual=args.virtual,
                                     cluster_method="kmeans", seed=seed)
                row = {"seed": seed, "train_s": seconds, "final_train_loss": res["losses"][-1]["loss"],
                       **heldout_losses(model, held, objective)}
                row["probe_se2"], row["probe_cells"] = probe(model, slides, n_virtual=args.virtual,
                                                            cells_per_tile=args.cells_per_tile)
                row["cells_per_s"] = throughput(model, big.copy(), n_virtual=args.virtual) if seed == args.seeds[0] \
                    else float("nan")
                runs[name].append(row)
                print(name, row, flush=True)

    def ms(vals: list[float]) -> str:
        vals = [v for v in vals if v == v]
        if len(vals) > 1:
            return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"
        return f"{vals[0]:.3f}" if vals else "n/a"

    rows = [{"variant": name, "seeds": len(r), "held-out MCM 1-cos": ms([x["mcm"] for x in r]),
             "held-out PDR R²": ms([x["pdr_r2"] for x in r]), "domain probe acc (SE(2))": ms([x["probe_se2"] for x in r]),
             "domain probe acc (cell encoder only)": ms([x["probe_cells"] for x in r]),
             "pretrain s": ms([x["train_s"] for x in r]),
             "embed cells/s": f"{next(x['cells_per_s'] for x in r):,.0f}"} for name, r in runs.items()]
    notes = [f"{len(slides)} synthetic slides of {args.cells} cells x {args.genes} genes, 4 domains mixing 6 cell types; "
             f"pretraining on 2, held out 1; {args.steps} steps, batch 4, lr 1e-3, sub-slices of {args.cells_per_tile} "
             f"cells, {args.virtual} k-means virtual cells, frozen random MLP cell encoder; mean ± sd over seeds "
             f"{args.seeds}; throughput: stofm.embed of {args.throughput_cells:,} cells with the seed-{args.seeds[0]} model",
             "MCM: lower is better; PDR R²: 1 - MSE/var(targets), each objective's own targets (original: kNN distances "
             "in model units; project: distances in mean-spacing units); probe: accuracy, higher is better"]
    record(args, title=f"stofm architectures: original vs project variant, {args.steps} steps", device=device,
           body=table(rows), load_before=load_before, notes=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
